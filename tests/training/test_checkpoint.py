"""Checkpoints through the loop: a corrupt latest step falls back to the one before, all corrupt is
an error, and a checkpoint of another config is refused before anything is written; checksums catch
a damaged file, orbax's error output becomes one line, and a full disk during a save loses nothing."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from umv2_jax.config import load_config, to_dict
from umv2_jax.errors import CheckpointError
from umv2_jax.training import loop
from umv2_jax.training.checkpoint import CHECKSUM_FILE, verify_checksums

from .conftest import TINY

QUIET = {"progress": False, "echo": lambda line: None}


def test_corrupt_latest_checkpoint_falls_back_and_says_so(tmp_path, tiny_config, caplog):
    config = tiny_config()
    loop.train(config, str(tmp_path), stop_after=6, **QUIET)
    latest = tmp_path / "checkpoints" / "6" / "state"
    files = [p for p in latest.rglob("*") if p.is_file() and p.stat().st_size > 100]
    for path in files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with caplog.at_level("WARNING", logger="umv2_jax"):
        result = loop.train(config, str(tmp_path), **QUIET)
    assert "checkpoint at step 6" in caplog.text and "unreadable" in caplog.text
    assert "resumed from step 4" in caplog.text
    assert result.step == 8 and len(result.losses) == 4


def test_every_checkpoint_corrupt_is_an_error(tmp_path, tiny_config):
    config = tiny_config("checkpoint.keep=1")
    loop.train(config, str(tmp_path), stop_after=2, **QUIET)
    for path in (tmp_path / "checkpoints").rglob("*"):
        if path.is_file() and "state" in path.parts and path.stat().st_size > 100:
            path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        loop.train(config, str(tmp_path), **QUIET)


def test_incompatible_checkpoint_is_refused_without_writing(tmp_path, tiny_config):
    loop.train(tiny_config(), str(tmp_path), stop_after=2, **QUIET)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    with pytest.raises(
        CheckpointError, match=r"different config \(model.d_model: saved 32, now 48\)"
    ):
        loop.train(tiny_config("model.d_model=48"), str(tmp_path), **QUIET)
    assert sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_block_layout_is_part_of_a_runs_identity_and_remat_is_not(tmp_path, tiny_config):
    """A loop checkpoint is not resumed by a scanned model (its tree differs); remat may change."""
    import json

    from umv2_jax.training.checkpoint import check_compatible

    config = tiny_config()  # 2 blocks: `scan_layers: auto` is the loop
    loop.train(config, str(tmp_path), stop_after=2, **QUIET)
    with pytest.raises(CheckpointError, match="model.scan_layers: saved False, now True"):
        check_compatible(str(tmp_path), tiny_config("model.scan_layers=true"))
    assert check_compatible(str(tmp_path), tiny_config("model.scan_layers=false"))
    assert check_compatible(str(tmp_path), tiny_config("model.remat=full"))
    # A run saved before the layout fields existed was a loop, and still resumes as one.
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    del saved["model"]["scan_layers"], saved["model"]["remat"]
    path.write_text(json.dumps(saved))
    assert check_compatible(str(tmp_path), config)
    result = loop.train(tiny_config("model.remat=full"), str(tmp_path), stop_after=4, **QUIET)
    assert result.step == 4


# --------------------------------------------------------------------------------------------------
# Integrity: checksums verified on restore, orbax's noise summarized, a full disk during a save.
# Faults are real: bytes flipped or cut in the files on disk, a real 1.4 MB tmpfs.
# --------------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def _cli(config_path, workdir, *extra):
    """train.py in a subprocess: (exit status, stdout + stderr)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / "train.py"), "--config", str(config_path)]
    command += ["--workdir", str(workdir), "--quiet", *extra]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A tiny run stopped at step 6 (checkpoints 2, 4, 6) and its config file; copied per test."""
    root = tmp_path_factory.mktemp("saved_run")
    config = load_config(None, TINY)
    loop.train(config, str(root / "run"), stop_after=6, **QUIET)
    config_path = root / "tiny.json"  # JSON is YAML
    config_path.write_text(json.dumps(to_dict(config)))
    return root / "run", config_path


def _largest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _unreadable_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "unreadable" in line]


def test_every_saved_step_carries_checksums_that_verify(saved_run):
    run, _ = saved_run
    for step in (2, 4, 6):
        step_dir = run / "checkpoints" / str(step)
        files = json.loads((step_dir / CHECKSUM_FILE).read_text())["files"]
        assert any(name.startswith("state/") for name in files) and len(files) > 5
        assert verify_checksums(str(step_dir)) is None


# Written or rewritten by orbax when it commits the step, after the checksums: not covered.
_COMMIT_MARKERS = {"_CHECKPOINT_METADATA", "commit_success.txt"}


def _item_kind(relative: str) -> str:
    item, _, rest = relative.partition("/")
    if item == "state":  # the train state: parameters and optimizer state, one OCDBT store
        return "state arrays" if "/d/" in f"/{rest}" else "state metadata"
    return {"data": "data iterator", "config": "config", "rest": "rest"}.get(item, relative)


def test_damage_to_any_file_of_any_item_fails_verification(saved_run, tmp_path):
    """One byte flipped in each file of a step, in turn: the arrays of the train state (parameters
    and optimizer state), its metadata, the data iterator's state, the config and every small file
    (commit markers of the items, a few dozen bytes). Files are found on disk, not read from
    checksums.json, so an item left out of the checksums fails here too."""
    run, _ = saved_run
    step_dir = tmp_path / "6"
    shutil.copytree(run / "checkpoints" / "6", step_dir)
    files = sorted(
        p.relative_to(step_dir).as_posix()
        for p in step_dir.rglob("*")
        if p.is_file()
        and not (p.parent == step_dir and p.name in _COMMIT_MARKERS | {CHECKSUM_FILE})
    )
    kinds = {_item_kind(f) for f in files}
    assert {"state arrays", "state metadata", "data iterator", "config"} <= kinds, kinds
    assert min((step_dir / f).stat().st_size for f in files) < 200  # small files are included
    assert verify_checksums(str(step_dir)) is None
    for relative in files:
        path = step_dir / relative
        data = path.read_bytes()
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :])
        reason = verify_checksums(str(step_dir))
        path.write_bytes(data)
        assert reason == f"{relative} does not match its checksum", (_item_kind(relative), reason)
    assert verify_checksums(str(step_dir)) is None


def test_a_changed_data_iterator_state_of_the_same_size_is_caught_and_the_run_falls_back(
    saved_run, tmp_path, caplog
):
    """The data iterator's state is valid JSON after the edit (its position moved, same size): only its
    checksum tells; restoring it would silently resume at another place in the data."""
    run, _ = saved_run
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    metadata = workdir / "checkpoints" / "6" / "data" / "metadata"
    text = metadata.read_text()
    # The last digit of a row's offset moved by one (same length, still valid JSON).
    changed = re.sub(
        r'("offset": \d*)(\d)', lambda m: m[1] + str((int(m[2]) + 1) % 10), text, count=1
    )
    assert changed != text and len(changed) == len(text)
    metadata.write_text(changed)
    with caplog.at_level("WARNING", logger="umv2_jax"):
        result = loop.train(load_config(None, TINY), str(workdir), stop_after=6, **QUIET)
    assert "checkpoint at step 6" in caplog.text
    assert "data/metadata does not match its checksum" in caplog.text
    assert "resumed from step 4" in caplog.text
    assert result.step == 6


@pytest.mark.parametrize("fault", ["flip 4 KB", "truncate", "truncate, no checksums"])
def test_damaged_newest_checkpoint_is_one_line_and_the_run_falls_back(saved_run, tmp_path, fault):
    """Flipping 4 KB inside the newest checkpoint's largest file used to load silently; cutting it
    was caught by orbax under thousands of lines of asyncio tracebacks. Both are one line now,
    naming the step and where it went, and the run resumes from step 4."""
    run, config_path = saved_run
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    newest = workdir / "checkpoints" / "6"
    target = _largest_file(newest)
    data = bytearray(target.read_bytes())
    if fault == "flip 4 KB":
        middle = len(data) // 2
        data[middle : middle + 4096] = bytes(b ^ 0xFF for b in data[middle : middle + 4096])
    else:
        data = data[: len(data) // 3]
    target.write_bytes(bytes(data))
    if fault == "truncate, no checksums":  # a step saved before checksums: orbax must notice
        (newest / CHECKSUM_FILE).unlink()

    status, output = _cli(config_path, workdir)

    assert status == 0, output[-3000:]
    assert "Traceback" not in output and "Exception ignored" not in output
    lines = _unreadable_lines(output)
    assert len(lines) == 1, lines
    assert "checkpoint at step 6" in lines[0] and "resumed from step 4" in lines[0]
    assert "checkpoints_unreadable" in lines[0]
    if fault == "flip 4 KB":
        assert "does not match its checksum" in lines[0]
    elif fault == "truncate":
        assert "bytes," in lines[0] and "were saved" in lines[0]
    assert len(lines[0]) < 400
    assert verify_checksums(str(newest)) is None  # step 6 saved anew by the resumed run
    assert [p.name.split("-")[0] for p in (workdir / "checkpoints_unreadable").iterdir()] == ["6"]
    assert "final validation (step 8)" in output


def test_full_disk_during_a_save_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    """A real 1.4 MB tmpfs: preflight passes (two checkpoints of ~0.55 MB fit), the third save
    (keep=3) runs out of space. The partial step directory goes, steps 2 and 4 stay intact."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", str(mount)], check=True)
    try:
        config_path = tmp_path / "tiny.json"
        config_path.write_text(json.dumps(to_dict(load_config(None, TINY))))
        workdir = mount / "run"
        status, output = _cli(config_path, workdir)
        assert status == 2, output[-3000:]
        assert "Traceback" not in output and "RESOURCE_EXHAUSTED" not in output
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and output.rstrip().endswith(errors[0])
        assert "could not save the checkpoint of step 6" in errors[0]
        assert "no space left" in errors[0] and "kept step 4" in errors[0]
        names = sorted(os.listdir(workdir / "checkpoints"))
        assert names == ["2", "4"], names
        for step in names:
            assert verify_checksums(str(workdir / "checkpoints" / step)) is None
    finally:
        subprocess.run(["umount", str(mount)], check=True)


_ABANDONED_TASKS = """
import asyncio, gc
from umv2_jax.training import checkpoint
checkpoint._install_unraisable_filter()
# A coroutine of a file under an 'orbax' path fails and nobody awaits its task (a failed save).
namespace = {}
exec(compile("async def write():\\n    raise ValueError('RESOURCE_EXHAUSTED: disk full')\\n",
             "/site-packages/orbax/serialization.py", "exec"), namespace)
async def ours():
    raise ValueError("not orbax")
async def main():
    asyncio.ensure_future(namespace["write"]())
    asyncio.ensure_future(ours())
    await asyncio.sleep(0.01)
asyncio.run(main())
gc.collect()
"""


def test_asyncio_reports_of_abandoned_orbax_tasks_are_dropped_and_others_kept():
    """A failed save leaves orbax tasks whose exception asyncio reports, traceback and all, when
    they are collected (often at exit, after the one-line error); only those reports go."""
    result = subprocess.run(
        [sys.executable, "-c", _ABANDONED_TASKS], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "RESOURCE_EXHAUSTED" not in result.stderr
    assert "not orbax" in result.stderr and "never retrieved" in result.stderr


_FILL_AFTER_FIRST_SAVE = """
import os, sys
from umv2_jax.training import rundir
from umv2_jax.training.cli import main

filler = sys.argv[1]
real = rundir.RunDir.saved


def saved(self, step):
    real(self, step)
    if not os.path.exists(filler):  # the disk fills up between two checkpoint saves
        with open(filler, "wb", buffering=0) as handle:
            for size in (2**20, 2**12, 1):
                try:
                    while True:
                        handle.write(b"x" * size)
                except OSError:
                    pass


rundir.RunDir.saved = saved
sys.exit(main(sys.argv[2:]))
"""


def test_a_disk_that_fills_between_saves_stops_the_run_in_one_line(tmp_path):
    """A real 30 MB tmpfs filled after the first checkpoint (with tensorboardX installed, its writer
    thread used to die and leave the trainer blocked for ever): exit 2 in one line, the checkpoint
    kept, run.json not left `running`; with room again the resume finishes, no stray files."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(mount)], check=True)
    try:
        config_path = tmp_path / "tiny.json"
        config_path.write_text(json.dumps(to_dict(load_config(None, TINY))))
        workdir, filler = mount / "run", mount / "filler"
        sets = ["checkpoint.every=10", "checkpoint.async_save=false", "train.log_every=1"]
        argv = ["--config", str(config_path), "--workdir", str(workdir), "--quiet"]
        argv += ["--steps", "20"] + [arg for item in sets for arg in ("--set", item)]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
        done = subprocess.run(
            [sys.executable, "-c", _FILL_AFTER_FIRST_SAVE, str(filler), *argv],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,  # it used to hang
        )
        output = done.stdout + done.stderr
        assert done.returncode == 2, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        errors = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("error: "), errors
        assert "no space left on the device" in errors[0] and "step 10" in errors[0], errors
        assert os.listdir(workdir / "checkpoints") == ["10"]
        assert verify_checksums(str(workdir / "checkpoints" / "10")) is None
        assert json.loads((workdir / "run.json").read_text())["status"] != "running"
        filler.unlink()
        status, output = _cli(config_path, workdir, "--steps", "20", *argv[5:])
        assert status == 0, output[-3000:]
        assert "Resumed from step 10" in output and "final validation (step 20)" in output
        assert not [name for name in os.listdir(workdir) if ".tmp" in name], os.listdir(workdir)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_checkpoint_without_checksums_is_named_in_a_warning_or_refused(saved_run, tmp_path):
    """64 bytes flipped in the largest state file of a step whose checksums.json is gone used to
    resume silently ("Resumed from step 6"): now one warning line names it, and under
    checkpoint.require_checksums it is refused (exit 2, one line, nothing moved)."""
    run, config_path = saved_run
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    newest = workdir / "checkpoints" / "6"
    (newest / CHECKSUM_FILE).unlink()
    target = _largest_file(newest / "state")
    saved = target.read_bytes()
    data = bytearray(saved)
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0x01 for b in data[middle : middle + 64])
    target.write_bytes(bytes(data))
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())

    status, output = _cli(config_path, workdir, "--set", "checkpoint.require_checksums=true")
    assert status == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: checkpoint at step 6"), errors
    assert "has no checksums.json" in errors[0] and "require_checksums" in errors[0]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
    assert target.read_bytes() == bytes(data)  # refused, not read

    # Without the flag it is restored, and said so (undamaged here: damaged weights may diverge).
    target.write_bytes(saved)
    status, output = _cli(config_path, workdir)
    assert status == 0, output[-3000:]
    warnings = [line for line in output.splitlines() if "has no checksums.json" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: checkpoint at step 6"), output
    assert "cannot be verified" in warnings[0] and "require_checksums=true" in warnings[0]
    assert "Resumed from step 6" in output
