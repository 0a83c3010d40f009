"""Preflight: a work directory that is a file or read-only, a disk too small for two checkpoints
and a model too large for memory are refused before any model is built, with the numbers, and
nothing is written. Faults are real: a file, a directory another user cannot write (the check runs
as `nobody`), a real tmpfs, this machine's RAM."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from umv2_jax.config import to_dict
from umv2_jax.errors import ResourceError
from umv2_jax.training import loop, preflight

from .conftest import SPARSE

REPO = Path(__file__).resolve().parents[2]
QUIET = {"progress": False, "echo": lambda line: None}
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _cli(config_path, workdir, *extra, prefix=()):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    command = [*prefix, sys.executable, str(REPO / "train.py"), "--config", str(config_path)]
    command += ["--workdir", str(workdir), "--quiet", *extra]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def _tree(path: Path) -> list[tuple[str, int]]:
    return sorted((str(p), p.stat().st_mtime_ns) for p in path.rglob("*"))


def test_workdir_that_is_a_file_is_refused(tmp_path, tiny_config):
    workdir = tmp_path / "run"
    workdir.write_text("not a directory")
    with pytest.raises(ResourceError, match="is not a directory; pass a directory"):
        loop.train(tiny_config(), str(workdir), **QUIET)
    with pytest.raises(ResourceError, match=r"is inside the file .*run; pass a directory"):
        loop.train(tiny_config(), str(workdir / "sub"), **QUIET)
    assert workdir.read_text() == "not a directory" and os.listdir(tmp_path) == ["run"]


def test_read_only_workdir_is_one_line_exit_2_as_an_unprivileged_user(tiny_config):
    """Root ignores permission bits, so the run is started as `nobody` (uid 65534), in a directory
    of root's under /tmp that nobody may read but not write (pytest's tmp_path is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="preflight-ro-", dir="/tmp"))
    try:
        base.chmod(0o755)
        config_path = base / "tiny.json"
        config_path.write_text(json.dumps(to_dict(tiny_config())))
        config_path.chmod(0o644)
        parent = base / "readonly"
        parent.mkdir(mode=0o755)
        for workdir, hint in ((parent, ""), (parent / "new-run", "the run would create")):
            status, output = _cli(config_path, workdir, prefix=NOBODY)
            assert status == 2, output[-2000:]
            assert output.strip().count("\n") == 0 and "Traceback" not in output
            assert output.startswith(f"error: {parent} is not writable") and hint in output
        assert os.listdir(parent) == []
    finally:
        shutil.rmtree(base)


def test_disk_without_room_for_two_checkpoints_is_refused_with_the_numbers(tmp_path, tiny_config):
    """A real 600 KB tmpfs: one tiny checkpoint (~0.5 MB on disk) fits, two do not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], check=True)
    try:
        with pytest.raises(ResourceError) as caught:
            loop.train(tiny_config(), str(mount / "run"), **QUIET)
        message = str(caught.value)
        assert f"the disk of {mount} has 600.0 KiB free" in message
        need, each = re.search(
            r"2 checkpoints of this model need ([\d.]+) MiB \(([\d.]+) KiB each", message
        ).groups()
        assert float(each) < 600 < float(need) * 1024  # one would fit, two do not
        assert "larger disk" in message and "\n" not in message
        assert os.listdir(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_checkpoint_estimate_matches_what_orbax_writes(tmp_path, tiny_config):
    """The disk check's size, from abstract shapes, against a real saved checkpoint."""
    config = tiny_config(*SPARSE["umv2"])
    loop.train(config, str(tmp_path), stop_after=2, **QUIET)
    step_dir = tmp_path / "checkpoints" / "2"
    on_disk = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
    estimate = preflight.estimate(config).checkpoint
    assert 0.9 * on_disk < estimate < 1.5 * on_disk, (estimate, on_disk)


def test_model_too_large_for_memory_is_refused_before_it_is_built(tmp_path):
    """`n_keys=20000` used to pass validation and die with RESOURCE_EXHAUSTED after 15 s."""
    config_path = REPO / "configs" / "default.yaml"
    workdir = tmp_path / "run"
    status, output = _cli(config_path, workdir, "--set", "model.memory.n_keys=20000")
    assert status == 2, output[-2000:]
    assert output.strip().count("\n") == 0 and "Traceback" not in output
    assert "RESOURCE_EXHAUSTED" not in output
    needed = float(re.match(r"error: the model needs about ([\d.]+) GiB", output).group(1))
    assert needed > 1000  # the value tables alone: 4 layers × 20000² rows × 64 floats ≈ 410 GB
    assert "MemAvailable in /proc/meminfo" in output and "model.memory.n_keys" in output
    assert not workdir.exists()


def test_memory_limit_on_cpu_is_the_machines_available_ram():
    import jax

    with open("/proc/meminfo") as handle:
        fields = dict(line.split(":", 1) for line in handle)
    available = int(fields["MemAvailable"].split()[0]) * 1024
    limit, source = preflight.device_memory(jax.devices("cpu")[0])
    assert source == "MemAvailable in /proc/meminfo"
    assert abs(limit - available) < 0.1 * available  # read a moment apart
    sizes = preflight.Sizes(
        params=limit // 3, optimizer=limit // 2, rest=0, arrays=1, activations=0
    )
    mesh = jax.sharding.Mesh(jax.devices("cpu")[:1], ("data",))
    with pytest.raises(ResourceError, match=r"the model needs about .*\(MemAvailable"):
        preflight.check_memory(sizes, mesh)  # 2 × 1/3 + 1/2 of it
    small = preflight.Sizes(
        params=limit // 10, optimizer=limit // 5, rest=0, arrays=1, activations=0
    )
    preflight.check_memory(small, mesh)


def test_a_metrics_file_the_user_cannot_write_is_refused_before_the_model_is_built(tiny_config):
    """It used to be a PermissionError traceback after building the model. As `nobody`, in a work
    directory of nobody's holding root's read-only metrics.jsonl; --no-resume deletes it."""
    base = Path(tempfile.mkdtemp(prefix="preflight-metrics-", dir="/tmp"))
    try:
        base.chmod(0o755)
        config_path = base / "tiny.json"
        config_path.write_text(json.dumps(to_dict(tiny_config())))
        config_path.chmod(0o644)
        workdir = base / "run"
        workdir.mkdir()
        os.chown(workdir, 65534, 65534)
        metrics = workdir / "metrics.jsonl"
        metrics.write_text('{"step": 1, "loss": 5.0}\n')
        metrics.chmod(0o644)
        status, output = _cli(config_path, workdir, prefix=NOBODY)
        assert status == 2, output[-2000:]
        assert output.strip().count("\n") == 0 and "Traceback" not in output
        assert output.startswith(f"error: {metrics} is not writable; fix its permissions")
        assert sorted(os.listdir(workdir)) == ["metrics.jsonl"]
        status, output = _cli(config_path, workdir, "--no-resume", "--steps", "2", prefix=NOBODY)
        assert status == 0, output[-2000:]
        assert f"--no-resume: deleting {metrics}" in output
    finally:
        shutil.rmtree(base)


def test_a_workdir_name_that_is_not_utf8_is_refused_up_front(tmp_path, tiny_config):
    """orbax (tensorstore) cannot take such a path: the run trained, then failed to save."""
    workdir = os.fsdecode(bytes(tmp_path) + b"/run-\xff")
    with pytest.raises(ResourceError, match=r"is not UTF-8 \(it holds the byte 0xff\)"):
        loop.train(tiny_config(), workdir, **QUIET)
    assert os.listdir(tmp_path) == []
