"""A subword source through the real trainer: N steps, a restart, N more steps equal 2N straight."""

from __future__ import annotations

import pytest

from umv2_jax.config import load_config
from umv2_jax.training import loop

from .conftest import SPM

QUIET = {"progress": False, "echo": lambda line: None}

# tests/training/conftest.py's tiny model with a small UltraMemV2 layer (configs/tiny_umv2.yaml in
# miniature), on the shipped BPE tokenizer.
TINY_SUBWORD = [
    "model.d_model=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.d_ff=64",
    "model.vocab_size=2048",
    "model.sparse=ultramem_v2",
    "model.memory.n_keys=12",
    "model.memory.key_dim=8",
    "model.memory.rc_topk=4",
    "model.memory.topk=4",
    "model.memory.value_dim=16",
    "model.memory.pre_value_dim=8",
    "model.memory.calibration_tokens=64",
    f"data.tokenizer={SPM}",
    "data.seq_len=32",
    "train.batch_size=4",
    "train.steps=6",
    "train.eval_every=6",
    "train.eval_batches=1",
    "train.log_every=1",
    "checkpoint.every=3",
]


@pytest.mark.slow  # about 45 s of CPU (three short runs compile the model)
def test_resume_with_a_subword_tokenizer_is_exact(tmp_path):
    config = load_config(None, TINY_SUBWORD)
    straight = loop.train(config, str(tmp_path / "straight"), **QUIET)
    first = loop.train(config, str(tmp_path / "split"), stop_after=3, **QUIET)
    second = loop.train(config, str(tmp_path / "split"), **QUIET)
    assert (first.step, second.step, straight.step) == (3, 6, 6)
    assert first.losses + second.losses == straight.losses
    assert straight.eval["eval_bpb"] == pytest.approx(second.eval["eval_bpb"])
