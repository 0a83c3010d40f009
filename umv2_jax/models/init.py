"""Initialization schemes (docs/model.md §4) for the backbone (`model.init`) and the parameter dtype.

`paper`: every linear layer and the embedding ~ N(0, sqrt(2/(5h))) truncated at ±3σ; attention-out and
FFN-down are additionally divided by sqrt(2L).

`release`: the backbone init of the authors' release. docs/model.md §4 lists the release's constants for the
memory layer only (`model.memory.init`, umv2_jax.models.memory_init); its backbone is OLMo's, trained
with OLMoE's `init_fn: normal, init_std: 0.02, init_cutoff_factor: 3`: every linear layer and the
embedding `trunc_normal_(std=0.02, a=-0.06, b=0.06)`, with no depth scaling of the output
projections. That distribution (a 0.02-scale normal cut at ±3 units) has std 0.02·0.98664, which is
what `backbone_std` returns, so `truncated_normal(backbone_std(config))` draws exactly it. The two
fields are independent: `model.init` picks the backbone's (and, under `memory.init: paper`, the memory
projections') std, `model.memory.init` the memory layer's constants.

Every parameter is created in fp32; `store_params` casts them to `model.param_dtype` afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from umv2_jax.config import ModelConfig

# jax's truncated_normal draws a *unit* normal truncated at ±3, whose std is this.
_UNIT_TRUNCATED_STD = 0.986_64
RELEASE_INIT_STD = 0.02  # OLMoE's init_std: the scale of the normal before its ±3-unit cut


def backbone_std(config: ModelConfig) -> float:
    """σ of every backbone linear layer: sqrt(2/(5h)) (`paper`, docs/model.md §4) or 0.02·0.98664 (`release`)."""
    if config.init == "release":
        return RELEASE_INIT_STD * _UNIT_TRUNCATED_STD
    return math.sqrt(2.0 / (5.0 * config.d_model))


def output_std(config: ModelConfig) -> float:
    """σ of attention-out and FFN-down: sqrt(2/(5h)) / sqrt(2L) (`paper`); `release` does not scale."""
    if config.init == "release":
        return backbone_std(config)
    return backbone_std(config) / math.sqrt(2.0 * config.num_layers)


def truncated_normal(std: float) -> nnx.Initializer:
    """N(0, std²) truncated at ±3σ (the truncation keeps the requested std, not the raw one)."""

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        unit = jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32)
        return (unit * (std / _UNIT_TRUNCATED_STD)).astype(dtype)

    return init


def make_param(
    rngs: nnx.Rngs,
    initializer: nnx.Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype=jnp.float32,
) -> nnx.Param:
    """A parameter annotated with logical axis names (mapped to mesh axes by umv2_jax.parallel)."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    value = initializer(rngs.params(), tuple(shape), dtype)
    return nnx.Param(value, sharding_names=tuple(axes), eager_sharding=False)


class ValueParam(nnx.Param):
    """Memory value and pre-value tables. The optimizer puts every `ValueParam` in the values group
    (its own LR multiplier schedule, docs/model.md §5); everything else is an ordinary `nnx.Param`."""


def make_value_param(
    rngs: nnx.Rngs,
    initializer: nnx.Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype=jnp.float32,
) -> ValueParam:
    """Like `make_param`, for value / pre-value tables (axes e.g. ("layers", "mem_rows", "mem_dim"))."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {shape}")
    value = initializer(rngs.params(), tuple(shape), dtype)
    return ValueParam(value, sharding_names=tuple(axes), eager_sharding=False)


def store_params(module: nnx.Module, param_dtype: str) -> None:
    """Casts every `nnx.Param` of `module` (value tables included) to `param_dtype`, in place.

    Non-trainable state (permutations, calibration records) keeps its dtype; "float32" is a no-op.
    """
    if param_dtype == "float32":
        return
    dtype = jnp.dtype(param_dtype)
    for _, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Param):
            variable.set_value(variable.get_value().astype(dtype))
