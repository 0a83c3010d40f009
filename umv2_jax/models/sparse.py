"""The sparse-layer slot of a block, and the registry that fills it.

A sparse layer (UltraMemV2, MoE, PKM, …) is an `nnx.Module` called as

    out = layer(u, context)        # u: [batch, seq, d_model] → out: SparseOutput, out.y like u

where `u` is the normalized input the block hands it (its own block's, or an earlier block's for
UltraMem v1's skip-layer wiring: the Transformer decides, the layer never looks it up). `out` is typed:
`losses` are already-weighted auxiliary losses keyed by their type (`lb`, `z`, `tucker_penalty`, …),
which the Transformer sums over layers per type and the trainer adds to the LM loss; `metrics` are
diagnostics (fp32 scalars, no gradient); `row_hits` is the per-row hit mask that evaluation ORs over
its window, computed only when `context.diagnostics` asks for it, so a train step pays nothing for it.

A layer must be stackable for scan over layers: everything that differs between two layers of one
kind (windows, permutations, indices) is an array in an `nnx.Variable`, never a Python attribute.

Later issues add layers with `register_sparse(...)` (and a line in `umv2_jax.models.kinds`)
without touching the block's code.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import jax
from flax import nnx

from umv2_jax.config import ModelConfig


@dataclasses.dataclass
class SparseContext:
    """What a sparse layer may read besides its input, for one forward pass.

    shared:        the model-level module built by the registry's `build_shared` (e.g. value tables
                   stacked over layers, `[L, n², D]`), or None.
    deterministic: True disables dropout.
    dropout_rng:   a PRNG key when `deterministic` is False; layers fold in their own index.
    diagnostics:   compute the evaluation-only diagnostics (row-hit masks and fractions).
    token_mask:    with diagnostics, [batch, seq] weights (1 = count the token) for the per-row
                   hit counts (`SparseOutput.row_counts`), or None: no counts computed.
    token_ids:     int32 [batch, seq] the pass's input token ids (layers addressed by ids: Engram).
    segment_ids:   int [batch, seq] document ids of packed rows, or None (one sequence per row).
    state:         a cached pass: this layer's decode state (built by the registry's `init_state`),
                   or None (a full pass, or a layer without state).
    window:        a cached pass: the `transformer.DecodeWindow` (slot of the first token, each
                   row's first real slot), else None.
    """

    shared: Any = None
    deterministic: bool = True
    dropout_rng: jax.Array | None = None
    diagnostics: bool = False
    token_mask: jax.Array | None = None
    token_ids: jax.Array | None = None
    segment_ids: jax.Array | None = None
    state: Any = None
    window: Any = None


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("y", "losses", "metrics", "row_hits", "row_counts", "state"),
    meta_fields=("addressable_rows",),
)
@dataclasses.dataclass
class SparseOutput:
    """What a sparse layer returns.

    y:                [..., d_model] the layer's contribution to the residual stream.
    losses:           {type: fp32 scalar} weighted auxiliary losses (`lb`, `z`, `tucker_penalty`, …).
    metrics:          {name: fp32 scalar} diagnostics without gradient.
    row_hits:         bool [rows] which memory rows this pass read, or None (only with diagnostics).
    row_counts:       int32 [rows] how many tokens (weighted by `context.token_mask`) read each row,
                      or None (only with diagnostics and a token mask; UltraMemV2 only).
    state:            a cached pass of a layer with decode state: the updated state, else None.
    addressable_rows: how many distinct rows the layer can reach (the denominator of hit fractions).
    """

    y: jax.Array
    losses: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    metrics: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    row_hits: jax.Array | None = None
    row_counts: jax.Array | None = None
    state: Any = None
    addressable_rows: int = 0


@dataclasses.dataclass(frozen=True)
class SparseBuilder:
    """How to build one kind of sparse layer.

    build_layer(config, block_index, rngs) → the module sitting in block `block_index`.
    build_shared(config, rngs) → a model-level module passed as `context.shared` (or None).
    replaces_ffn: the layer takes the FFN's place (MoE) instead of running beside it.
    init_state(config, batch) → one layer's zero decode state for `batch` rows (a pytree of
    arrays), for layers that look back over earlier tokens (Engram); None: token-wise, no state.
    init_scope(config) → a context manager the whole model is built inside (e.g. UltraMemV2's
        `calibration_scope`: one init calibration traced into the construction program).
    """

    build_layer: Callable[[ModelConfig, int, nnx.Rngs], nnx.Module]
    build_shared: Callable[[ModelConfig, nnx.Rngs], nnx.Module | None] | None = None
    replaces_ffn: bool = False
    init_state: Callable[[ModelConfig, int], Any] | None = None
    init_scope: Callable[[ModelConfig], AbstractContextManager] | None = None


# kind → builder, filled by the layer modules when imported (`register_sparse`); looked up through
# `umv2_jax.models.kinds.get_sparse_builder`, which imports a kind's module on first use (so this
# module, which the layers import, names none of them).
_REGISTRY: dict[str, SparseBuilder] = {}


def register_sparse(name: str, builder: SparseBuilder) -> None:
    _REGISTRY[name] = builder
