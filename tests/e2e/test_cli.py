"""The two commands a user runs, and what they see when they get something wrong."""

import subprocess
import sys
from pathlib import Path

import pytest

from umv2_jax.generate import main as generate_main
from umv2_jax.training.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--set",
    "model.d_model=32",
    "--set",
    "model.num_layers=1",
    "--set",
    "model.num_heads=2",
    "--set",
    "model.d_ff=64",
    "--set",
    "data.seq_len=32",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.eval_every=4",
    "--set",
    "train.eval_batches=1",
    "--set",
    "checkpoint.every=4",
]


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "model.num_layer=2"], "did you mean 'model.num_layers'"),
        (["--set", "model.num_layers=two"], "expected an integer"),
        (["--set", "data.seq_len=0"], "'data.seq_len': must be positive"),
        (["--set", "mesh.data=3"], "need 3 devices but 1 are available"),
        (["--config", "configs/missing.yaml"], "'configs/missing.yaml' does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    workdir = tmp_path / "run"
    code = main(TINY + argv + ["--workdir", str(workdir), "--steps", "4", "--quiet"])
    assert code == 2
    assert message in _one_error_line(capsys)
    assert not workdir.exists()


def test_train_then_resume_then_incompatible_then_generate(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    assert main(TINY + ["--workdir", workdir, "--steps", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "final validation (step 4)" in out and "bits/byte" in out
    # train.py hands the loop the accounting, so the summary has the paper-convention numbers.
    assert "activated," in out and "total (paper convention)" in out
    assert "M per token forward" in out
    assert (tmp_path / "run" / "loss.png").is_file() and (
        tmp_path / "run" / "metrics.jsonl"
    ).is_file()

    assert main(TINY + ["--workdir", workdir, "--steps", "8", "--quiet"]) == 0
    assert "Resumed from step 4" in capsys.readouterr().out

    assert main(TINY + ["--set", "model.d_model=64", "--workdir", workdir, "--quiet"]) == 2
    assert "different config (model.d_model: saved 32, now 64)" in _one_error_line(capsys)

    assert generate_main(["--workdir", workdir, "--prompt", "To be", "--max-new-tokens", "8"]) == 0
    assert "To be" in capsys.readouterr().out


def test_generate_without_a_run(tmp_path, capsys):
    assert generate_main(["--workdir", str(tmp_path)]) == 2
    assert "holds no run" in _one_error_line(capsys)


def test_unknown_flag_exits_2():
    completed = subprocess.run(
        [sys.executable, "train.py", "--stpes", "3"], cwd=REPO, capture_output=True, text=True
    )
    assert completed.returncode == 2
    assert "unrecognized arguments: --stpes" in completed.stderr
    assert "Traceback" not in completed.stderr
