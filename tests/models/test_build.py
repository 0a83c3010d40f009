"""`build_model`: a config's whole initialisation, the `paper` calibration included, as one compiled
program, with the parameters of `Transformer(config, nnx.Rngs(seed))`."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from umv2_jax.config import MemoryConfig, ModelConfig
from umv2_jax.models import memory_init
from umv2_jax.models.build import build_model
from umv2_jax.models.retrieval import TuckerRetrieval
from umv2_jax.models.transformer import Transformer

CONFIG = ModelConfig(
    d_model=32,
    num_layers=2,
    num_heads=2,
    d_ff=64,
    vocab_size=64,
    sparse="ultramem_v2",
    memory=MemoryConfig(
        n_keys=8, key_dim=8, rc_topk=4, topk=4, value_dim=8, pre_value_dim=4, calibration_tokens=32
    ),
)


class _Compiles:
    """Counts XLA backend compiles while active (jax.monitoring)."""

    def __init__(self):
        self.count = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if self.active and event.endswith("backend_compile_duration"):
            self.count += 1


COMPILES = _Compiles()


@pytest.fixture(scope="module")
def built():
    CONFIG.validate()
    memory_init.calibrate.cache_clear()
    COMPILES.active = True
    try:
        model = build_model(CONFIG, seed=3)
    finally:
        COMPILES.active = False
    return model


def test_build_model_compiles_one_program(built):
    assert COMPILES.count == 1
    assert memory_init.calibrate.cache_info().currsize == 0  # calibrated inside that program


def test_build_model_draws_the_parameters_of_the_jitted_constructor(built):
    # The same RNG streams as Transformer(config, nnx.Rngs(seed)): the init program of
    # training.state.build, compiled separately.
    expected = jax.jit(lambda: nnx.state(Transformer(CONFIG, nnx.Rngs(3))))()
    for (path, a), (_, b) in zip(
        jax.tree.leaves_with_path(nnx.state(built)), jax.tree.leaves_with_path(expected)
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def test_traced_calibration_equals_the_eager_one(built):
    record = built.shared.calibration
    eager = memory_init.calibrate(CONFIG)
    # The same fp32 operations in two programs: XLA may order a reduction differently (last bits).
    for name in ("gain", "raw_mean_score", "mean_score", "sigma_s", "value_std"):
        assert float(getattr(record, name)[...]) == pytest.approx(getattr(eager, name), rel=1e-6)
    assert int(record.tokens[...]) == CONFIG.memory.calibration_tokens
    gains = [
        np.asarray(node.query_gain[...])
        for _, node in nnx.iter_graph(built)
        if isinstance(node, TuckerRetrieval)
    ]
    assert gains and all(np.allclose(g, eager.gain, rtol=1e-6, atol=0) for g in gains)


def test_abstract_construction_does_not_calibrate_eagerly():
    memory_init.calibrate.cache_clear()
    nnx.eval_shape(lambda: Transformer(CONFIG, nnx.Rngs(0)))
    assert memory_init.calibrate.cache_info().currsize == 0
