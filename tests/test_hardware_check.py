"""benchmarks/hardware_check.py: the CPU smoke run end to end, its bad-argument errors, and the GPU
path of every kernel it times, cross-lowered for CUDA at the full shapes from this CPU host."""

import json
import os
import subprocess
import sys

import jax
import pytest

from benchmarks import hardware_check
from umv2_jax.ops import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "hardware_check.py")


def _run(*args):
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT, timeout=600
    )


@pytest.mark.slow  # ~120 CPU-seconds (XLA:CPU compiles of interpreted kernels and two train steps)
def test_smoke_run_writes_json_and_markdown(tmp_path):
    run = _run("--smoke", "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.startswith("hardware check (smoke")
    assert "device   cpu" in run.stdout and f"jax {jax.__version__}" in run.stdout
    report = json.loads((tmp_path / "hardware_check.json").read_text())
    assert set(report["sections"]) == set(hardware_check.SECTIONS)
    assert all(entry["status"] == "ok" for entry in report["sections"].values())
    kernels = report["sections"]["kernels"]["result"]
    assert {row["op"] for row in kernels} == {"value_bag", "retrieval_topk", "product_key_topk"}
    for row in kernels:  # the interpreted kernels against XLA
        assert row["forward/max_scaled_error"] < 1e-4, row
        assert row["forward+backward/max_scaled_error"] < 1e-4, row
        assert row.get("forward/int_equal_fraction", 1.0) == 1.0, row
    (train,) = report["sections"]["train_steps"]["result"]
    assert train["losses_match"] and len(train["runs"]["xla"]["losses"]) == 2
    assert train["runs"]["pallas"]["mfu"] is None  # CPU
    assert [row["batch"] for row in report["sections"]["decode"]["result"]] == [1]
    markdown = (tmp_path / "hardware_check.md").read_text()
    assert markdown.startswith("# Hardware check (smoke)") and "## train_steps: ok" in markdown


def test_smoke_copy_section_writes_the_report(tmp_path, capsys):
    """The default suite's cheap end-to-end pass: header, one section, JSON and Markdown."""
    assert (
        hardware_check.main(["--smoke", "--out", str(tmp_path), "--sections", "copy_bandwidth"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("hardware check (smoke") and f"jax {jax.__version__}" in out
    report = json.loads((tmp_path / "hardware_check.json").read_text())
    assert report["header"]["platform"] == "cpu" and report["header"]["chip"] is None
    copy = report["sections"]["copy_bandwidth"]
    assert copy["status"] == "ok" and copy["result"]["GBps"] > 0
    assert "## copy_bandwidth: ok" in (tmp_path / "hardware_check.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "X"], "no GPU or TPU here"),
        (["--smoke", "--out", "X", "--sections", "kernels,bogus"], "--sections bogus"),
    ],
)
def test_bad_arguments_are_one_line_exit_2(tmp_path, args, message, capsys):
    args = [str(tmp_path / a) if a == "X" else a for a in args]
    assert hardware_check.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "X")


def test_a_failing_section_is_recorded_and_exits_1(tmp_path, monkeypatch, capsys):
    def broken(smoke, reps):
        raise RuntimeError("no decoder today")

    monkeypatch.setattr(hardware_check, "decode", broken)
    code = hardware_check.main(["--smoke", "--out", str(tmp_path), "--sections", "decode"])
    assert code == 1
    report = json.loads((tmp_path / "hardware_check.json").read_text())
    assert report["sections"]["decode"]["status"] == "failed"
    assert "no decoder today" in report["sections"]["decode"]["error"]


@pytest.mark.parametrize("index", range(len(hardware_check.kernel_cases(smoke=False))))
def test_full_size_kernels_lower_for_cuda(index):
    """What the GPU run times: the Triton kernels, forward and forward + backward, at its shapes."""
    case = hardware_check.kernel_cases(smoke=False)[index]
    specs = jax.eval_shape(case.args)
    for build in (case.forward, case.forward_backward):
        with registry.lowering_platforms("cuda"):
            traced = build("pallas", False).trace(*specs)
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
        assert "triton" in text.lower(), f"{case.op} {case.shape}: no Triton kernel in the HLO"


@pytest.mark.slow
@pytest.mark.parametrize("case", list(hardware_check.TRAIN_CASES))
def test_train_steps_lower_for_cuda_with_pallas(case):
    """The GPU run's train steps with model.memory.implementation=pallas reach the Triton
    kernels when lowered for CUDA (slow: traces the whole model)."""
    from umv2_jax.config import load_config

    path, overrides, batch = hardware_check.TRAIN_CASES[case]
    config = load_config(
        os.path.join(ROOT, path),
        [*overrides, f"train.batch_size={batch}", "model.memory.implementation=pallas"],
    )
    text = hardware_check.lower_train_step(config, batch, ("cuda",)).as_text()
    assert "triton" in text.lower()
