"""Initialization schemes (SPEC §4) for the backbone.

`paper`: every linear layer ~ N(0, sqrt(2/(5h))) truncated at ±3σ; attention-out and FFN-down are
additionally divided by sqrt(2L). `release` uses the same backbone init (the authors' release only
changes the memory layer's constants; see `umv2_jax.models.ultramem_v2`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from umv2_jax.config import ModelConfig


def backbone_std(config: ModelConfig) -> float:
    """σ = sqrt(2/(5h)) of every backbone linear layer (SPEC §4)."""
    return math.sqrt(2.0 / (5.0 * config.d_model))


def output_std(config: ModelConfig) -> float:
    """σ of attention-out and FFN-down: sqrt(2/(5h)) / sqrt(2L)."""
    return backbone_std(config) / math.sqrt(2.0 * config.num_layers)


def truncated_normal(std: float) -> nnx.Initializer:
    """N(0, std²) truncated at ±3σ (the truncation keeps the requested std, not the raw one)."""

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        # jax's truncated_normal draws a *unit* normal truncated at ±3, whose std is ≈ 0.9866.
        unit = jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32)
        return (unit * (std / 0.986_64)).astype(dtype)

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
    (its own LR multiplier schedule, SPEC §5); everything else is an ordinary `nnx.Param`."""


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
