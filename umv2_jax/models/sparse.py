"""The sparse-layer slot of a block, and the registry that fills it.

A sparse layer (UltraMemV2, MoE, PKM, …) is an `nnx.Module` called as

    y, aux = layer(u, context)        # u: [batch, seq, d_model] → y: [batch, seq, d_model]

where `u` is the normalized input of block `layer.input_block` (normally the block the layer sits
in; UltraMem v1's skip-layer wiring reads an earlier block's), and `aux` is a flat dict of scalars:
keys starting with `loss/` are already-weighted auxiliary losses that the trainer adds to the LM loss
(and reports separately); every other key is a diagnostic metric. The Transformer prefixes the keys
with `layer{index}/`.

Later issues add layers with `register_sparse(...)` without touching the block's code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from umv2_jax.config import ModelConfig
from umv2_jax.errors import ConfigError


@dataclasses.dataclass
class SparseContext:
    """What a sparse layer may read besides its input, for one forward pass.

    shared:        the model-level module built by the registry's `build_shared` (e.g. value tables
                   stacked over layers, `[L, n², D]`), or None.
    taps:          normalized block inputs `u` recorded so far, by block index (skip-layer wiring).
    deterministic: True disables dropout.
    dropout_rng:   a PRNG key when `deterministic` is False; layers fold in their own index.
    """

    shared: Any = None
    taps: dict[int, jax.Array] = dataclasses.field(default_factory=dict)
    deterministic: bool = True
    dropout_rng: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class SparseBuilder:
    """How to build one kind of sparse layer.

    build_layer(config, block_index, rngs) → the module sitting in block `block_index`.
    build_shared(config, rngs) → a model-level module passed as `context.shared` (or None).
    replaces_ffn: the layer takes the FFN's place (MoE) instead of running beside it.
    """

    build_layer: Callable[[ModelConfig, int, nnx.Rngs], nnx.Module]
    build_shared: Callable[[ModelConfig, nnx.Rngs], nnx.Module | None] | None = None
    replaces_ffn: bool = False


_REGISTRY: dict[str, SparseBuilder] = {}
# Modules that register a kind when imported; imported lazily so the backbone does not depend on them.
_PROVIDERS: dict[str, str] = {
    "ultramem_v2": "umv2_jax.models.ultramem_v2",
    "moe": "umv2_jax.models.moe",
    "ultramem": "umv2_jax.models.product_key",
    "memory_plus": "umv2_jax.models.product_key",
    "pkm": "umv2_jax.models.product_key",
    "peer": "umv2_jax.models.product_key",
}


def register_sparse(name: str, builder: SparseBuilder) -> None:
    _REGISTRY[name] = builder


def get_sparse_builder(name: str) -> SparseBuilder:
    if name not in _REGISTRY and name in _PROVIDERS:
        import importlib

        try:
            importlib.import_module(_PROVIDERS[name])
        except ModuleNotFoundError as error:
            if error.name != _PROVIDERS[name]:
                raise
    if name not in _REGISTRY:
        available = ", ".join(sorted(_REGISTRY)) or "none yet"
        raise ConfigError(
            f"config 'model.sparse': '{name}' is not implemented (available: {available})"
        )
    return _REGISTRY[name]
