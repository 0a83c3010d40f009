"""SIGTERM and SIGINT (Ctrl-C) in every phase of a run: real `train.py` subprocesses, real signals.

Each test starts a tiny dense run, waits until the child's output (or, at start-up, its signal
mask) shows it is in the phase under test, sends the signal with `os.kill` and checks the exit
status, the one stop line naming that phase, the absence of a traceback or crash, and the
checkpoint left behind.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from umv2_jax.config import load_config
from umv2_jax.generate import load_run
from umv2_jax.training import loop
from umv2_jax.training.cli import default_config_path
from umv2_jax.training.rundir import checkpoint_steps

REPO = Path(__file__).resolve().parents[2]
RUN = [
    "model.sparse=none",
    "model.d_model=32",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.d_ff=64",
    "data.seq_len=32",
    "train.batch_size=4",
    "train.steps=4",
    "train.eval_every=4",
    "train.eval_batches=2",
    "train.log_every=2",
    "checkpoint.every=2",
]
EXIT = {signal.SIGTERM: 0, signal.SIGINT: 130}
NAME = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT (Ctrl-C)"}
BOTH = pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])


class Child:
    """`python train.py` with RUN + `extra`, its stdout and stderr read line by line."""

    def __init__(self, workdir, *extra):
        sets = [arg for item in RUN + list(extra) for arg in ("--set", item)]
        self.process = subprocess.Popen(
            [sys.executable, "train.py", *sets, "--workdir", str(workdir), "--quiet"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self.watchdog = threading.Timer(120, self.process.kill)
        self.watchdog.start()

    def wait_for_line(self, marker: str) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if marker in line:
                return
        raise AssertionError(f"the run ended before printing {marker!r}:\n{self.output()}")

    def wait_for_handlers(self) -> None:
        """Until the child catches SIGTERM (the CLI's first act), read from /proc: SigCgt."""
        status = f"/proc/{self.process.pid}/status"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(status) as handle:
                caught = next(line for line in handle if line.startswith("SigCgt:"))
            if int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
                return
            time.sleep(0.002)
        raise AssertionError("the child never installed its SIGTERM handler")

    def finish(self) -> tuple[int, str]:
        self.lines.append(self.process.stdout.read())
        code = self.process.wait()
        self.watchdog.cancel()
        return code, self.output()

    def output(self) -> str:
        return "".join(self.lines)


def _stopped(child: Child, signum: int) -> str:
    child.process.send_signal(signum)  # os.kill(pid, signum)
    code, output = child.finish()
    assert code == EXIT[signum], output
    for crash in ("Traceback", "Segmentation", "Fatal Python error", "Exception ignored"):
        assert crash not in output, output
    return output


def _restored_step(workdir) -> int:
    return load_run(str(workdir))[4]  # the latest checkpoint reads back


@BOTH
def test_signal_during_start_up_stops_before_training_and_writes_nothing(tmp_path, signum):
    child = Child(tmp_path / "run")
    child.wait_for_handlers()  # then imports, config, data and model building take seconds
    output = _stopped(child, signum)
    assert f"{NAME[signum]} during start-up" in output, output
    assert "stopped before training a step" in output
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "config.json").exists()


@BOTH
def test_signal_during_a_step_finishes_it_and_saves_it(tmp_path, signum):
    child = Child(tmp_path, "checkpoint.every=100")
    child.wait_for_line("workdir ")  # the summary's last line; step 1 compiles next (seconds)
    time.sleep(0.5)
    output = _stopped(child, signum)
    assert f"{NAME[signum]} received during step 1: saved step 1" in output, output
    assert checkpoint_steps(str(tmp_path)) == [1]
    assert _restored_step(tmp_path) == 1


@BOTH
def test_signal_during_a_save_finishes_the_save_and_stops(tmp_path, signum):
    child = Child(tmp_path, "checkpoint.async_save=false")
    child.wait_for_line("step 2: saving checkpoint")  # printed just before the synchronous save
    output = _stopped(child, signum)
    assert f"{NAME[signum]} received during saving step 2: saved step 2" in output, output
    assert checkpoint_steps(str(tmp_path)) == [2]
    # Resumable: the rest of the run continues from step 2.
    config = load_config(default_config_path(), RUN)  # as train.py loads it
    result = loop.train(config, str(tmp_path), progress=False, echo=lambda line: None)
    assert result.step == 4 and len(result.losses) == 2 and not result.preempted


@BOTH
def test_signal_during_the_final_evaluation_leaves_the_run_complete(tmp_path, signum):
    child = Child(tmp_path)
    child.wait_for_line("step 4: evaluating")  # the first evaluation compiles (about a second)
    output = _stopped(child, signum)
    assert f"{NAME[signum]} received during evaluation at step 4: saved step 4" in output, output
    assert "validation (step" not in output  # the cut evaluation is not reported as any step's
    assert checkpoint_steps(str(tmp_path)) == [2, 4]
    assert _restored_step(tmp_path) == 4


def test_an_evaluation_before_the_stop_is_labelled_with_its_own_step(tmp_path):
    """SIGTERM right after the step 4 evaluation: stop at step 4 or 5, report step 4's eval."""
    child = Child(tmp_path, "train.steps=400", "checkpoint.every=100")
    child.wait_for_line("step 4: eval loss")
    output = _stopped(child, signal.SIGTERM)
    (line,) = [line for line in output.splitlines() if "validation (step" in line]
    assert line.startswith("last validation (step 4): "), output
    stopped_at = checkpoint_steps(str(tmp_path))[-1]
    assert stopped_at >= 4 and f"stopped      by SIGTERM at step {stopped_at}" in output


def test_the_rerun_after_a_stop_in_the_final_evaluation_records_that_evaluation(tmp_path):
    """The rerun of a run stopped during its final evaluation prints a final validation; its record
    lands in metrics.jsonl too (it had none)."""
    from umv2_jax.training.metrics import read_metrics

    child = Child(tmp_path)
    child.wait_for_line("step 4: evaluating")
    _stopped(child, signal.SIGTERM)
    assert not [r for r in read_metrics(str(tmp_path)) if "eval_loss" in r]
    config = load_config(default_config_path(), RUN)
    result = loop.train(config, str(tmp_path), progress=False, echo=lambda line: None)
    assert result.eval_step == 4 and result.eval
    evals = [r for r in read_metrics(str(tmp_path)) if "eval_loss" in r]
    assert [(r["step"], r["eval_loss"]) for r in evals] == [(4, result.eval["eval_loss"])]
    loop.train(config, str(tmp_path), progress=False, echo=lambda line: None)  # once more
    assert len([r for r in read_metrics(str(tmp_path)) if "eval_loss" in r]) == 1
