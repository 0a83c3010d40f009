"""A run directory is never mixed: every fault below is made for real (files deleted, a second
trainer started, a loss driven to NaN) and the CLI's exit status and one line are checked."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from umv2_jax.training import rundir
from umv2_jax.training.cli import main
from umv2_jax.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
ARGS = [
    *("--set", "model.sparse=none"),
    *("--set", "model.d_model=32"),
    *("--set", "model.num_layers=1"),
    *("--set", "model.num_heads=2"),
    *("--set", "model.d_ff=64"),
    *("--set", "data.seq_len=32"),
    *("--set", "train.batch_size=4"),
    *("--set", "train.eval_every=4"),
    *("--set", "train.eval_batches=1"),
    *("--set", "train.log_every=1"),
    *("--set", "checkpoint.every=2"),
    "--quiet",
]


def _train(capsys, workdir, *extra):
    code = main(ARGS + ["--workdir", str(workdir), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def _one_error_line(err):
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _listing(workdir: Path) -> dict[str, bytes]:
    """Every file under `workdir` with its bytes: equal listings mean nothing was written."""
    return {
        str(path.relative_to(workdir)): path.read_bytes()
        for path in sorted(workdir.rglob("*"))
        if path.is_file()
    }


def _loss_steps(workdir):
    return [r["step"] for r in read_metrics(str(workdir)) if "loss" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run: checkpoints at steps 2 and 4, metrics of steps 1-4."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    assert main(ARGS + ["--workdir", str(workdir), "--steps", "4"]) == 0
    return workdir


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def test_a_run_describes_itself_in_its_manifest(run):
    manifest = json.loads((run / rundir.MANIFEST_FILE).read_text())
    assert manifest["status"] == "finished" and manifest["step"] == 4
    assert manifest["checkpoints"] == [2, 4] == rundir.checkpoint_steps(str(run))
    assert manifest["config"] == json.loads((run / "config.json").read_text())
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{8}", manifest["run_id"])
    assert not (run / rundir.LOCK_FILE).exists()  # released at the end


@pytest.mark.parametrize("manifest", ["kept", "deleted too"])
def test_deleted_checkpoints_keeping_metrics_stop_with_exit_2(run, capsys, manifest):
    shutil.rmtree(run / "checkpoints")
    if manifest == "deleted too":
        (run / rundir.MANIFEST_FILE).unlink()
    before = _listing(run)
    code, _, err = _train(capsys, run, "--steps", "8")
    assert code == 2
    line = _one_error_line(err)
    if manifest == "kept":
        assert "lists checkpoints at steps 2, 4" in line and "holds none" in line
    else:
        assert "holds metrics.jsonl (5 records, up to step 4) but no checkpoint" in line
    assert "--no-resume" in line
    assert _listing(run) == before  # no second run appended, no fresh checkpoints/


def test_deleted_config_stops_with_exit_2_and_the_advice_works(run, capsys):
    (run / "config.json").unlink()
    before = _listing(run)
    code, _, err = _train(capsys, run, "--steps", "6")
    assert code == 2
    line = _one_error_line(err)
    assert "has checkpoints (steps 2, 4) but no config.json" in line and "--no-resume" in line
    assert _listing(run) == before
    source, target = re.search(r"\(cp (\S+) (\S+)\)", line).groups()
    shutil.copy(source, target)  # what the line says to do
    code, out, _ = _train(capsys, run, "--steps", "6")
    assert code == 0 and "Resumed from step 4" in out


def test_nan_before_the_first_save_then_resume(tmp_path, capsys):
    workdir = tmp_path / "run"
    diverging = ["--set", "train.learning_rate=1e30", "--set", "train.warmup_fraction=0"]
    code, _, err = _train(capsys, workdir, *diverging, "--set", "checkpoint.every=100")
    assert code == 1
    line = err[-1]
    assert re.search(r"loss became nan at step \d+; stopped\. No checkpoint was saved", line), err
    assert "checkpoint is step 0" not in line and "--no-resume" in line
    assert rundir.checkpoint_steps(str(workdir)) == []
    before = _listing(workdir)
    code, _, err = _train(capsys, workdir, "--steps", "6")  # a sane learning rate, same workdir
    assert code == 2
    line = _one_error_line(err)
    assert re.search(r"diverged at step \d+ before its first checkpoint", line)
    assert "--no-resume" in line
    assert _listing(workdir) == before  # not silently restarted


def test_metrics_after_a_resume_have_no_duplicate_steps(run, capsys):
    original = {r["step"]: r["loss"] for r in read_metrics(str(run)) if "loss" in r}
    shutil.rmtree(run / "checkpoints" / "4")  # the newest checkpoint is lost: steps 3-4 are redone
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss": 2.')  # and a record cut short by a crash
    code, out, _ = _train(capsys, run, "--steps", "4")
    assert code == 0 and "Resumed from step 2" in out
    records = read_metrics(str(run))
    assert _loss_steps(run) == [1, 2, 3, 4]
    assert [r["step"] for r in records if "eval_loss" in r] == [4]
    redone = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert redone == original  # exact resume: the redone records replaced the old ones
    assert '{"step": 5' not in (run / "metrics.jsonl").read_text()


def test_two_trainers_on_one_workdir(tmp_path, capsys, caplog):
    workdir = tmp_path / "run"
    command = [sys.executable, "train.py", *ARGS, "--workdir", str(workdir)]
    first = subprocess.Popen(
        command + ["--steps", "100000", "--set", "checkpoint.every=2"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lock = workdir / rundir.LOCK_FILE
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text()) and first.poll() is None:
            assert time.monotonic() < deadline, "the first trainer never took the lock"
            time.sleep(0.2)
        assert json.loads(lock.read_text())["pid"] == first.pid
        second = subprocess.run(
            command + ["--steps", "4"], cwd=REPO, capture_output=True, text=True, timeout=300
        )
        assert first.poll() is None  # still training, undisturbed
        # While it trains, its manifest lists the checkpoints finalized so far.
        manifest = workdir / rundir.MANIFEST_FILE
        while not (manifest.is_file() and json.loads(manifest.read_text())["checkpoints"]):
            assert time.monotonic() < deadline + 120 and first.poll() is None
            time.sleep(0.2)
        assert json.loads(manifest.read_text())["status"] == "running"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2, second.stderr[-2000:]
    line = _one_error_line(second.stderr.strip().splitlines())
    assert f"in use by another training process (pid {first.pid} on host " in line
    assert f"on host {socket.gethostname()}" in line
    # The first one is gone (killed): its lock is stale and taken over, with a log line.
    assert lock.is_file()
    code, out, _ = _train(capsys, workdir, "--no-resume", "--steps", "2")
    assert code == 0
    assert f"took over the stale lock {lock} of pid {first.pid}" in caplog.text
    assert not lock.exists()


def test_a_lock_naming_another_host_is_never_taken_over(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = {"pid": 4242, "host": "elsewhere.example", "since": "2026-01-01T00:00:00+00:00"}
    (workdir / rundir.LOCK_FILE).write_text(json.dumps(holder))
    code, _, err = _train(capsys, workdir, "--steps", "2")
    assert code == 2
    assert "(pid 4242 on host elsewhere.example since" in _one_error_line(err)
    assert sorted(p.name for p in workdir.iterdir()) == [rundir.LOCK_FILE]


def test_steps_below_the_saved_step_is_an_error_and_rewrites_nothing(run, capsys):
    before = _listing(run)
    mtimes = {name: os.stat(run / name).st_mtime_ns for name in ("config.json", "run.json")}
    code, _, err = _train(capsys, run, "--steps", "3")
    assert code == 2
    line = _one_error_line(err)
    assert "'train.steps': 3 is below the step of the latest checkpoint" in line
    assert "--steps 4 or more" in line
    assert _listing(run) == before
    assert mtimes == {name: os.stat(run / name).st_mtime_ns for name in mtimes}


def test_no_resume_prints_each_path_it_deletes(run, capsys):
    old_id = json.loads((run / "run.json").read_text())["run_id"]
    present = sorted(p.name for p in run.iterdir())
    assert present == sorted(
        [
            "checkpoints",
            "config.json",
            "loss.png",
            "metrics.jsonl",
            "run.json",
            "tensorboard",
            "tokenizer",
        ]
    )
    code, out, _ = _train(capsys, run, "--no-resume", "--steps", "2")
    assert code == 0
    deleted = [line for line in out.splitlines() if line.startswith("--no-resume:")]
    assert [line.split()[2] for line in deleted] == [
        str(run / name)
        for name in (
            "checkpoints",
            "tensorboard",
            "metrics.jsonl",
            "loss.png",
            "run.json",
            "config.json",
            "tokenizer",
        )
    ]
    assert "(checkpoints at steps 2, 4)" in deleted[0]
    assert "(5 records, up to step 4)" in deleted[2]
    assert _loss_steps(run) == [1, 2]  # the new run's records only
    assert json.loads((run / "run.json").read_text())["run_id"] != old_id


def test_no_resume_over_another_models_run_needs_the_flag(run, capsys):
    other = ["--set", "model.d_model=64", "--no-resume", "--steps", "2"]
    before = _listing(run)
    code, _, err = _train(capsys, run, *other)
    assert code == 2
    line = _one_error_line(err)
    assert "holds a run of another model (model.d_model: saved 32, now 64)" in line
    assert "--overwrite-other-model" in line
    assert _listing(run) == before
    code, out, _ = _train(capsys, run, *other, "--overwrite-other-model")
    assert code == 0 and f"--no-resume: deleting {run / 'checkpoints'}" in out
    assert json.loads((run / "config.json").read_text())["model"]["d_model"] == 64


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "name=../../x"], "config 'name': '../../x' is not a plain name"),
        (["--config", "empty.yaml"], "config file 'empty.yaml' is empty"),
        (["--set", "train.learning_rate=inf"], "'train.learning_rate': inf is not a finite"),
        (["--set", "model.memory.dropout=nan"], "'model.memory.dropout': nan is not a finite"),
    ],
)
def test_bad_names_empty_files_and_non_finite_values_write_nothing(
    tmp_path, monkeypatch, capsys, argv, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    code = main(ARGS + argv + ["--steps", "2"])  # default workdir: runs/<name>
    assert code == 2
    assert message in _one_error_line(capsys.readouterr().err.strip().splitlines())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.yaml"]
    assert not (tmp_path.parent / "x").exists()  # runs/../../x


def test_a_non_finite_evaluation_loss_stops_the_run_like_a_divergence(
    tmp_path, capsys, monkeypatch
):
    """The review's `--set model.vocab_size=100` run trained to the end and printed `eval loss
    nan`; here the evaluation at step 4 is made to return NaN."""
    from umv2_jax.training import loop

    real = loop.summarize_eval

    def nan_at_step_4(sums):
        result = real(sums)
        if len(read_metrics(str(workdir))) >= 4:
            result["eval_loss"] = result["eval_bpb"] = float("nan")
        return result

    monkeypatch.setattr(loop, "summarize_eval", nan_at_step_4)
    workdir = tmp_path / "run"
    code, out, err = _train(capsys, workdir, "--steps", "6")
    assert code == 1
    line = _one_error_line(err)
    assert line.startswith("error: evaluation loss became nan at step 4"), line
    assert "the last good checkpoint is step 2" in line.lower()
    assert "final validation" not in out and "sample with" not in out
    manifest = json.loads((workdir / "run.json").read_text())
    assert manifest["status"] == "diverged" and manifest["diverged_at"] == 4
    assert manifest["diverged_during"] == "evaluation"
    assert 2 in rundir.checkpoint_steps(str(workdir))
    assert [r["eval_loss"] for r in read_metrics(str(workdir)) if "eval_loss" in r] == ["nan"]


# ---- a full disk between checkpoint saves: every writer fails into the same one line ------------


def _enospc(path="?"):
    import errno

    return OSError(errno.ENOSPC, "No space left on device", path)


def _fail_metrics(monkeypatch, workdir):
    """metrics.jsonl's writes fail once the run has written 3 records."""
    from umv2_jax.training import metrics

    class Handle:
        def __init__(self, real):
            self.real = real

        def write(self, text):
            if len(read_metrics(str(workdir))) >= 3:
                raise _enospc()
            return self.real.write(text)

        def __getattr__(self, name):
            return getattr(self.real, name)

    def fake_open(path, *args, **kwargs):
        handle = open(path, *args, **kwargs)
        appending = str(path).endswith("metrics.jsonl") and args[:1] == ("a",)
        return Handle(handle) if appending else handle

    monkeypatch.setattr(metrics, "open", fake_open, raising=False)


def _fail_tensorboard(monkeypatch, workdir):
    pytest.importorskip("tensorboardX")
    from tensorboardX import record_writer

    real = record_writer.RecordWriter.write

    def write(self, data):
        if len(read_metrics(str(workdir))) >= 3:
            raise _enospc()
        return real(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", write)


def _fail_plot(monkeypatch, workdir):
    from matplotlib.figure import Figure

    def savefig(self, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"\x89PNG partial")
        raise _enospc(path)

    monkeypatch.setattr(Figure, "savefig", savefig)


def _fail_manifest(monkeypatch, workdir):
    """run.json's writes fail after the first save, also over the old file's bytes."""
    real = rundir.write_json_atomically
    real_open = open

    def fake_open(path, *args, **kwargs):
        handle = real_open(path, *args, **kwargs)
        if ".tmp." in str(path) and rundir.checkpoint_steps(str(workdir)):
            handle.close()
            raise _enospc(path)  # after creating the temporary file, as a full disk does
        return handle

    monkeypatch.setattr(rundir, "open", fake_open, raising=False)
    monkeypatch.setattr(rundir, "_write_in_place", lambda path, text: False)
    assert real is rundir.write_json_atomically


@pytest.mark.parametrize(
    "fail", [_fail_metrics, _fail_tensorboard, _fail_plot, _fail_manifest], ids=lambda f: f.__name__
)
def test_a_full_disk_between_saves_is_one_line_for_every_writer(
    tmp_path, capsys, monkeypatch, fail
):
    import faulthandler

    workdir = tmp_path / "run"
    fail(monkeypatch, workdir)
    # tensorboardX's writer thread died on the error and the run blocked for ever, deaf to SIGTERM
    faulthandler.dump_traceback_later(300, exit=True, file=sys.__stderr__)
    try:
        code, out, err = _train(capsys, workdir, "--steps", "6")
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert code == 2, err
    line = _one_error_line(err)
    assert re.match(
        r"error: the run stopped: could not write \S+: no space left on the device", line
    )
    assert "kept the checkpoint of step" in line and "free disk space" in line, line
    assert "sample with" not in out
    kept = rundir.checkpoint_steps(str(workdir))
    assert kept and f"kept the checkpoint of step {kept[-1]} " in line
    status = json.loads((workdir / "run.json").read_text()).get("status")
    assert status != "running" or fail is _fail_manifest  # recorded, unless run.json is the fault
    assert not list(workdir.glob("*.tmp*")), list(workdir.iterdir())
    monkeypatch.undo()  # the disk has room again: the resume finishes and leaves no stray file
    code, out, err = _train(capsys, workdir, "--steps", "6")
    assert code == 0, err
    assert "final validation (step 6)" in out
    assert json.loads((workdir / "run.json").read_text())["status"] == "finished"
    assert not list(workdir.glob("*.tmp*"))


# ---- messages that named the wrong thing ---------------------------------------------------------


def _signal_in(monkeypatch, module, name, signum=signal.SIGINT):
    """`module.name` sends this process `signum` (caught by the run's handler) before running."""
    real = getattr(module, name)

    def sending(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, sending)


def test_ctrl_c_while_building_the_model_of_a_resume_names_the_step_it_stays_at(
    run, capsys, monkeypatch
):
    from umv2_jax.training import loop

    loop.signals.set_phase("start-up")
    _signal_in(monkeypatch, loop, "build")
    code, _, err = _train(capsys, run)
    assert code == 130
    assert err == [
        f"SIGINT (Ctrl-C) during start-up (building the model): stopped before training a step; "
        f"the run in {run} stays at step 4. Run the same command to continue"
    ]


def test_a_stop_before_the_model_build_does_not_name_start_up_twice(run, capsys, monkeypatch):
    from umv2_jax.training import loop

    _signal_in(monkeypatch, loop.pipeline, "make_eval_batches", signal.SIGTERM)
    code, _, err = _train(capsys, run)
    assert code == 0
    assert err == [
        f"SIGTERM during start-up: stopped before training a step; the run in {run} stays at "
        "step 4. Run the same command to continue"
    ]


def test_no_resume_also_deletes_the_checkpoints_set_aside_as_unreadable(run, capsys):
    aside = run / "checkpoints_unreadable" / "4-1700000000"
    aside.mkdir(parents=True)
    (aside / "checksums.json").write_text("{}")
    code, out, _ = _train(capsys, run, "--no-resume", "--steps", "2")
    assert code == 0
    assert f"--no-resume: deleting {run / 'checkpoints_unreadable'}" in out
    assert not (run / "checkpoints_unreadable").exists()


def test_the_changed_model_error_names_both_flags_and_following_it_works(run, capsys):
    other = ["--set", "model.d_model=64", "--steps", "2"]
    code, _, err = _train(capsys, run, *other)
    assert code == 2
    line = _one_error_line(err)
    assert "different config (model.d_model: saved 32, now 64)" in line
    assert "pass --no-resume --overwrite-other-model to delete that run" in line
    code, _, _ = _train(capsys, run, *other, "--no-resume", "--overwrite-other-model")
    assert code == 0


def test_the_printed_sample_command_is_shell_quoted(trained, tmp_path, capsys):
    workdir = tmp_path / "my run's dir"
    shutil.copytree(trained, workdir)
    code, out, _ = _train(capsys, workdir)
    assert code == 0
    quoted = "'" + str(workdir).replace("'", "'\"'\"'") + "'"
    assert f"sample with  python -m umv2_jax.generate --workdir {quoted} --prompt" in out
