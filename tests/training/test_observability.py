"""Trainer observability: step time without compiles, tokens/s, MFU, device memory, the profiler
trace, `--profile` range errors and Weights & Biases offline logging."""

import glob
import os
import subprocess
import sys

import pytest

from umv2_jax import hardware
from umv2_jax.eval.accounting import account
from umv2_jax.training import loop, throughput
from umv2_jax.training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_mfu_arithmetic_on_a_fake_chip():
    chip = hardware.Chip("fake", 1e12, 1e9, 1e9, 1e9, "gpu")
    # 2 devices × 1e12 FLOP/s; 4096 tokens in 0.5 s at 1e8 FLOPs/token = 8.192e11 FLOP/s.
    fields = throughput.throughput_fields(0.5, 4096, 1e8, chip, 2)
    assert fields["tokens_per_s"] == pytest.approx(8192.0)
    assert fields["mfu"] == pytest.approx(8192.0 * 1e8 / 2e12)
    assert throughput.console(fields) == {"step": "0.5s", "tok_s": "8,192", "mfu": "41.0%"}
    assert throughput.throughput_fields(0.5, 4096, 1e8, None, 2)["mfu"] is None  # CPU
    assert throughput.throughput_fields(None, 4096, 1e8, chip, 2)["tokens_per_s"] is None
    assert throughput.console({"step_time_s": None, "tokens_per_s": None, "mfu": None}) == {
        "step": "n/a",
        "tok_s": "n/a",
        "mfu": "n/a",
    }


def test_step_clock_leaves_out_compiles_and_other_work():
    now = [0.0]
    clock = throughput.StepClock(now=lambda: now[0])
    clock.step_started()
    now[0] = 5.0  # compile + the first step
    assert clock.step_finished(True, wait=lambda: None) == 5.0
    for _ in range(4):
        clock.step_started()
        now[0] += 0.25
        assert clock.step_finished(False, wait=lambda: None) is None
    assert clock.close() == pytest.approx(0.25)
    now[0] += 30.0  # an evaluation
    clock.restart()
    clock.step_started()
    now[0] += 0.5
    clock.step_finished(False, wait=lambda: None)
    assert clock.close() == pytest.approx(0.5)
    assert clock.close() is None  # an empty window
    assert clock.summary()["compile_s"] == 5.0


def test_memory_fields_none_on_cpu_and_max_where_reported():
    import jax

    assert throughput.memory_fields(jax.local_devices())["memory_bytes_in_use"] is None

    class Device:
        def __init__(self, used):
            self.used = used

        def memory_stats(self):
            return {"bytes_in_use": self.used, "peak_bytes_in_use": 2 * self.used}

    fields = throughput.memory_fields([Device(10), Device(30)])
    assert fields == {
        "memory_bytes_in_use": 30,
        "memory_peak_bytes": 60,
        "memory_bytes_in_use_per_device": [10, 30],
    }


def test_cpu_run_records_throughput_a_trace_and_wandb(tmp_path, tiny_config, monkeypatch):
    """One short run (compiles dominate the suite's time) checks every output: the throughput
    fields of metrics.jsonl, the profiler trace and the offline W&B run."""
    monkeypatch.setenv("WANDB_MODE", "offline")  # train.wandb_mode is online; the variable wins
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_config(
        "train.profile=3:4",
        "train.steps=6",
        "train.eval_every=6",
        "train.eval_batches=1",
        "checkpoint.every=6",
        "train.wandb_project=umv2-test",
    )
    lines = []
    result = loop.train(config, str(tmp_path), progress=False, echo=lines.append, account=account)
    records = read_metrics(str(tmp_path))
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    # log_every=2: step 1 compiled (timed on its own), so its window holds step 2 only.
    assert steps[0]["compile_s"] > 0 and all("compile_s" not in r for r in steps[1:])
    tokens = config.train.batch_size * config.data.seq_len
    for record in steps:
        assert 0 < record["step_time_s"] < steps[0]["compile_s"]
        assert record["tokens_per_s"] == pytest.approx(tokens / record["step_time_s"])
        assert record["mfu"] is None  # CPU: no peak
        assert record["memory_bytes_in_use"] is None
        assert "loss" in record and "learning_rate" in record  # the existing fields stay
    evals = [r for r in records if "eval_loss" in r]
    assert evals and all(r["eval_time_s"] > 0 for r in evals)
    assert result.timing["compile_s"] == steps[0]["compile_s"]
    assert result.timing["mfu"] is None
    assert any(line.startswith("throughput: ") and "MFU n/a" in line for line in lines), lines

    traces = glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    assert glob.glob(str(tmp_path / "profile" / "plugins" / "profile" / "*" / "perfetto_trace*"))

    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    data = open(runs[0], "rb").read()
    # The history records hold the metric names and values metrics.jsonl has.
    for key in (b"step_time_s", b"tokens_per_s", b"learning_rate", b"eval_loss"):
        assert key in data, key
    assert repr(steps[-1]["loss"]).encode() in data


def _train_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


@pytest.mark.parametrize(
    "profile, expected",
    [
        ("5:40", "outside the run's steps 1 … 8"),
        ("0:2", "outside"),
        ("abc", "START:STOP"),
        ("4:2", "outside"),
        ("3", "START:STOP"),
    ],
)
def test_profile_outside_the_run_is_one_line_exit_2(tmp_path, profile, expected):
    from umv2_jax.config import load_config
    from umv2_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=expected):
        load_config(None, ["train.steps=8", f"train.profile='{profile}'"])


def test_profile_cli_error_exit_2(tmp_path):
    run = _train_cli(
        "--set", "train.steps=4", "--profile", "3:9", "--workdir", str(tmp_path / "run")
    )
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.profile" in errors[0] and "1 … 4" in errors[0]
    assert "Traceback" not in run.stderr
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
