"""Memory-layer initialization (docs/model.md §4): the `paper` calibration and the `release` constants."""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from umv2_jax.config import MemoryConfig, ModelConfig
from umv2_jax.models import memory_init
from umv2_jax.models.sparse import SparseContext
from umv2_jax.models.transformer import SwiGLU
from umv2_jax.models.ultramem_v2 import MemoryTables, UltraMemV2

H = 64


def config_for(init: str, **memory) -> ModelConfig:
    fields = dict(
        n_keys=16,
        key_dim=16,
        rc_topk=8,
        topk=8,
        value_dim=32,
        pre_value_dim=16,
        calibration_tokens=256,
        init=init,
    )
    fields.update(memory)
    config = ModelConfig(
        d_model=H,
        num_layers=4,
        num_heads=4,
        d_ff=4 * H,
        sparse="ultramem_v2",
        memory=MemoryConfig(**fields),
    )
    config.validate()
    return config


def build(config: ModelConfig):
    """Tables, memory layer 0 and an FFN of the same config, built in one compiled program.

    Compiled at XLA backend optimization level 0: the draws are the same and it compiles ≈ 4× faster
    on a 2-core machine.
    """

    def make():
        rngs = nnx.Rngs(0)
        return (
            MemoryTables(config, rngs),
            UltraMemV2(config, 0, rngs),
            SwiGLU(config, config.d_ff, rngs),
        )

    graphdef, _ = nnx.split(nnx.eval_shape(make))
    init = (
        jax.jit(lambda: nnx.split(make())[1]).lower().compile({"xla_backend_optimization_level": 0})
    )
    return nnx.merge(graphdef, init())


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def paper():
    """A `paper` layer built from a cold calibration cache, with the log records it produced."""
    config = config_for("paper")
    logger = logging.getLogger("umv2_jax")
    records, level = _Records(), logger.level
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    memory_init.calibrate.cache_clear()
    try:
        tables, layer, ffn = build(config)
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    return config, tables, layer, ffn, records.messages


def unit_inputs(tokens: int = 2048, seed: int = 0) -> jax.Array:
    """Random inputs with unit variance per element, like the RMS-normalized block input."""
    return jax.random.normal(jax.random.key(seed), (tokens, H))


def forward(layer, tables, u):
    graphdef, state = nnx.split(layer)
    return jax.jit(lambda s, t, u: nnx.merge(graphdef, s)(u, SparseContext(shared=t)).y)(
        state, tables, u
    )


def test_paper_memory_output_std_is_within_half_to_twice_the_ffn_output_std(paper):
    _, tables, layer, ffn, _ = paper
    u = unit_inputs()
    memory_std = float(jnp.std(forward(layer, tables, u)))
    ffn_std = float(jnp.std(nnx.jit(lambda f, u: f(u))(ffn, u)))
    assert 0.5 <= memory_std / ffn_std <= 2.0, (memory_std, ffn_std)


def test_paper_calibration_makes_the_mean_selected_score_about_one_on_fresh_inputs(paper):
    _, _, layer, _, _ = paper
    graphdef, state = nnx.split(layer.retrieval)
    core_scores = jax.jit(lambda s, u: nnx.merge(graphdef, s)(u, implementation="xla").core_scores)(
        state, unit_inputs(seed=5)
    )
    scores = jnp.sum(core_scores, axis=-1)  # the total score each slot was selected by
    assert 0.8 <= float(jnp.mean(scores)) <= 1.25
    sigma_s = float(layer_calibration(paper).sigma_s[...])
    assert 0.75 * sigma_s <= float(jnp.std(scores)) <= 1.33 * sigma_s


def layer_calibration(paper):
    return paper[1].calibration


def test_paper_calibration_is_logged_and_stored_in_the_model(paper):
    config, tables, layer, _, messages = paper
    result = memory_init.calibrate(config)
    stored = tables.calibration
    assert float(stored.gain[...]) == pytest.approx(result.gain, rel=1e-6)
    assert float(stored.sigma_s[...]) == pytest.approx(result.sigma_s, rel=1e-6)
    assert float(stored.mean_score[...]) == pytest.approx(1.0, abs=1e-3)
    assert int(stored.tokens[...]) == config.memory.calibration_tokens
    # Calibration state is saved with the model but never trained.
    assert not any(isinstance(v, nnx.Param) for _, v in nnx.iter_graph(stored))
    assert sum("memory init calibration" in m for m in messages) == 1
    assert f"{result.gain:.4f}" in messages[0] and f"{result.sigma_s:.4f}" in messages[0]
    # Both norm gains start at the calibrated gain.
    np.testing.assert_allclose(layer.retrieval.query_gain[...], result.gain, rtol=1e-6)
    np.testing.assert_allclose(layer.retrieval.key_gain[...], result.gain, rtol=1e-6)


def test_paper_value_std_follows_the_spec_formula(paper):
    config, tables, _, _, _ = paper
    memory = config.memory
    sigma_s = float(tables.calibration.sigma_s[...])
    k_inner = config.d_ff / config.d_model
    expected = (
        0.2
        * k_inner
        * H
        / (
            memory.topk
            * memory.heads
            * (1 + sigma_s**2)
            * memory.pre_value_dim
            * memory.value_dim
            * config.num_layers
        )
    ) ** 0.25
    assert float(tables.calibration.value_std[...]) == pytest.approx(expected, rel=1e-5)
    for table in (tables.values[...], tables.pre_values[...]):
        assert float(jnp.std(table)) == pytest.approx(expected, rel=0.03)
        assert float(jnp.max(jnp.abs(table))) <= 3.05 * expected  # truncated at ±3σ


def test_paper_projections_use_the_backbone_std_truncated(paper):
    _, _, layer, _, _ = paper
    std = math.sqrt(2 / (5 * H))
    for weight in (layer.retrieval.query[...], layer.pre_value_proj[...], layer.output_proj[...]):
        assert float(jnp.std(weight)) == pytest.approx(std, rel=0.06)
        assert float(jnp.max(jnp.abs(weight))) <= 3.05 * std


def test_paper_value_std_without_pre_values_matches_the_same_derivation():
    config = config_for("paper", pre_value_dim=0)
    memory = config.memory
    sigma_s = 0.4
    expected = math.sqrt(
        0.08
        * (config.d_ff / H)
        * H
        / (memory.topk * memory.heads * (1 + sigma_s**2) * memory.value_dim * config.num_layers)
    )
    assert memory_init.paper_value_std(config, sigma_s) == pytest.approx(expected, rel=1e-12)


def test_release_init_uses_the_authors_constants():
    key_dim, value_dim, key_expand = 16, 32, 2
    config = config_for("release", key_expand=key_expand, heads=2)
    tables, layer, _ = build(config)
    retrieval = layer.retrieval
    # Gains are exactly D_k^-0.4.
    np.testing.assert_array_equal(retrieval.query_gain[...], np.float32(key_dim**-0.4))
    np.testing.assert_array_equal(retrieval.key_gain[...], np.float32(key_dim**-0.4))
    expected = {
        "W_q": (retrieval.query[...], key_dim**-0.5),
        "keys": (retrieval.keys[...], key_dim**-0.5),
        "W_p": (layer.pre_value_proj[...], H**-0.5),
        "W_o": (layer.output_proj[...], (key_expand**2 * value_dim) ** -0.5),
        "values": (tables.values[...], 0.02),
        "pre-values": (tables.pre_values[...], 0.02),
    }
    for name, (weight, std) in expected.items():
        assert float(jnp.std(weight)) == pytest.approx(std, rel=0.06), name
        assert abs(float(jnp.mean(weight))) < 0.1 * std, name
    # Plain (untruncated) normals: some draws fall beyond 3σ in the large tables.
    assert float(jnp.max(jnp.abs(tables.values[...]))) > 3 * 0.02
    cores = np.asarray(retrieval.cores[...])
    assert cores.min() >= 0.0 and cores.max() <= 1.0
    assert tables.calibration is None
