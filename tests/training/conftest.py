import pytest

from umv2_jax.config import load_config

TINY = [
    "model.d_model=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.d_ff=64",
    "data.seq_len=32",
    "train.batch_size=4",
    "train.steps=8",
    "train.eval_every=4",
    "train.eval_batches=2",
    "train.log_every=2",
    "checkpoint.every=2",
    "checkpoint.async_save=true",
]


@pytest.fixture
def tiny_config():
    def make(*overrides):
        return load_config(None, TINY + list(overrides))

    return make
