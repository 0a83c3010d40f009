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


# Small sparse layers for end-to-end runs (T-size shapes, shrunk).
SPARSE = {
    "dense": [],
    "umv2": [
        "model.sparse=ultramem_v2",
        "model.memory.n_keys=12",
        "model.memory.key_dim=8",
        "model.memory.rc_topk=4",
        "model.memory.topk=4",
        "model.memory.value_dim=16",
        "model.memory.pre_value_dim=8",
        "model.memory.calibration_tokens=64",
    ],
    "moe": [
        "model.sparse=moe",
        "model.d_ff=0",
        "model.moe.num_experts=4",
        "model.moe.top_k=2",
        "model.moe.expert_d_ff=16",
    ],
}


@pytest.fixture
def tiny_config():
    def make(*overrides):
        return load_config(None, TINY + list(overrides))

    return make
