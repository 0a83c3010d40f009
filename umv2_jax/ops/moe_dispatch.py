"""MoE dispatch: stable sort by expert → grouped SwiGLU experts → unsort (docs/model.md §7).

    out, kept = moe_dispatch(x, expert_ids, gate, up, down, capacity=None, valid=None)

    x: [T, h]   expert_ids: [T, k] int (each token's chosen experts)
    gate, up: [E, h, d_e]   down: [E, d_e, h]
    out:  [T, k, h]  out[t, j] = SwiGLU_e(x[t]) with e = expert_ids[t, j], zeros where not kept
    kept: [T, k] bool, False for the assignments over an expert's capacity (all True when dropless)
    valid: [T, k] bool or None: False marks an absent assignment (a padding row of an
           expert-parallel exchange buffer): no expert computes it, it counts toward no
           capacity, its out is 0 and its kept False

where SwiGLU_e(x) = (silu(x @ gate[e]) * (x @ up[e])) @ down[e]. Plain JAX (`moe_dispatch_reference`):

    for t, j: out[t, j] = swiglu(x[t], gate[e], up[e], down[e]) if kept[t, j] else 0
    # kept[t, j] = valid[t, j] and (capacity is None or the rank of (t, j) among e's valid ones
    #              in token order < capacity)

Assignment a = t·k + j; its flat order is token order. With `capacity` (an int) each expert keeps
its first `capacity` assignments in token order; without it the dispatch is dropless. Weighting the
k outputs by the router (the combine) is the caller's.

Implementations (`umv2_jax.ops.registry`): every one sorts the T·k assignments stably by expert and
moves rows by gathers whose gradients are gathers through the inverse map (no scatter-add; the
MaxText `ragged_sort` idea), so gradients are deterministic. Output dtype and compute dtype are
x's; matmuls accumulate in fp32. Gate and up share one grouped matmul.

- `xla`: tokens are gathered straight into the block-padded buffer of `grouped_matmul`'s `xla`
  path (`block_layout`), both expert matmuls run there as the custom-VJP block loop, and one gather
  takes the rows out again: one gather in, one out, no per-group copies.
- `ragged_dot`: rows gathered in expert order, two `grouped_matmul(implementation="ragged_dot")`.
- `pallas`: the same with `grouped_matmul(implementation="pallas")` (megablox on TPU).
- `auto`: `xla` on CPU; ("pallas", "ragged_dot", "xla") on GPU and TPU.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from umv2_jax.ops import registry
from umv2_jax.ops.grouped_matmul import (
    block_layout,
    block_padded_matmul,
    gather_rows,
    grouped_matmul,
)


class MoEDispatch(NamedTuple):
    """out: [T, k, h] each assignment's expert output; kept: [T, k] bool."""

    out: jax.Array
    kept: jax.Array


def moe_dispatch(
    x: jax.Array,
    expert_ids: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    *,
    capacity: int | None = None,
    implementation: registry.Implementation = "auto",
    block_size: int = 64,
    interpret: bool = False,
    valid: jax.Array | None = None,
) -> MoEDispatch:
    """x: [T, h], expert_ids: [T, k], gate/up: [E, h, d_e], down: [E, d_e, h] → MoEDispatch.

    capacity: assignments kept per expert (None: dropless). block_size: row block of `xla`.
    valid: [T, k] bool, False for absent assignments (None: all present).
    implementation / interpret: see `umv2_jax.ops.registry`.
    """
    _check_inputs(x, expert_ids, gate, up, down, capacity, block_size)
    dtype = x.dtype
    expert_ids = expert_ids.astype(jnp.int32)
    if valid is not None:
        if valid.shape != expert_ids.shape:
            raise ValueError(
                f"moe_dispatch: valid must have expert_ids' shape {expert_ids.shape}, got "
                f"{valid.shape}"
            )
        expert_ids = jnp.where(valid, expert_ids, -1)  # implementations: negative = absent
    out, kept = registry.call(
        "moe_dispatch",
        x,
        expert_ids,
        gate.astype(dtype),
        up.astype(dtype),
        down.astype(dtype),
        implementation=implementation,
        interpret=interpret,
        capacity=capacity,
        block_size=block_size,
    )
    return MoEDispatch(out, kept)


def moe_dispatch_reference(
    x: jax.Array,
    expert_ids: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    *,
    capacity: int | None = None,
    valid: jax.Array | None = None,
) -> MoEDispatch:
    """The oracle: a Python loop over tokens and their slots (concrete expert_ids), in fp32."""
    ids = jax.device_get(expert_ids)
    present = jax.device_get(valid) if valid is not None else None
    tokens, top_k = ids.shape
    f32 = jnp.float32
    seen = [0] * gate.shape[0]
    rows, kept = [], []
    for token in range(tokens):
        for slot in range(top_k):
            expert = int(ids[token, slot])
            if present is not None and not present[token, slot]:
                kept.append(False)
                rows.append(jnp.zeros((x.shape[1],), f32))
                continue
            keep = capacity is None or seen[expert] < capacity
            seen[expert] += 1
            kept.append(keep)
            if not keep:
                rows.append(jnp.zeros((x.shape[1],), f32))
                continue
            hidden = jax.nn.silu(x[token].astype(f32) @ gate[expert].astype(f32))
            hidden = hidden * (x[token].astype(f32) @ up[expert].astype(f32))
            rows.append(hidden @ down[expert].astype(f32))
    out = jnp.stack(rows).reshape(tokens, top_k, x.shape[1]).astype(x.dtype)
    return MoEDispatch(out, jnp.asarray(kept).reshape(tokens, top_k))


# --------------------------------------------------------------------------------------------------
# Implementations


class _Plan(NamedTuple):
    """order / inverse: sorted position ↔ assignment [T·k]; group_sizes: [E]; kept: [T·k] bool."""

    order: jax.Array
    inverse: jax.Array
    group_sizes: jax.Array
    kept: jax.Array


def _plan(expert_ids: jax.Array, experts: int, capacity: int | None) -> _Plan:
    # Negative ids are absent assignments (moe_dispatch's `valid`): key `experts`, after all groups.
    present = expert_ids.reshape(-1) >= 0
    expert_of = jnp.where(present, expert_ids.reshape(-1), experts)
    counts = jnp.zeros((experts + 1,), jnp.int32).at[expert_of].add(1)[:experts]
    if capacity is not None:
        kept = present & (_rank_within_expert(expert_of, counts) < capacity)
        group_sizes = jnp.minimum(counts, capacity)
        # Dropped assignments sort after every expert's rows, past sum(group_sizes): the grouped
        # matmul gives them zeros.
        sort_key = jnp.where(kept, expert_of, experts)
    else:
        kept = present
        group_sizes = counts
        sort_key = expert_of
    order = _stable_argsort(sort_key, experts + 1)  # sorted position → assignment
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
    return _Plan(order, inverse, group_sizes, kept)


def _block_padded(x, expert_ids, gate, up, down, *, capacity, block_size, interpret=False):
    """Tokens go straight into the block-padded buffer; both expert matmuls run in it."""
    del interpret
    tokens, k = expert_ids.shape
    plan = _plan(expert_ids, gate.shape[0], capacity)
    layout = block_layout(plan.group_sizes, tokens * k, block_size)
    slot_assignment = plan.order[layout.slot_row]  # [P]
    assignment_slot = layout.row_slot[plan.inverse]  # [T·k]
    assignment_valid = layout.row_valid[plan.inverse]
    buffer = gather_rows(
        x,
        slot_assignment // k,
        layout.slot_valid,
        assignment_slot.reshape(tokens, k),
        assignment_valid.reshape(tokens, k),
    )
    d_e = gate.shape[2]
    projected = block_padded_matmul(buffer, jnp.concatenate([gate, up], axis=-1), layout)
    hidden = jax.nn.silu(projected[:, :d_e]) * projected[:, d_e:]
    out = block_padded_matmul(hidden, down, layout)
    out = gather_rows(out, assignment_slot, assignment_valid, slot_assignment, layout.slot_valid)
    return out.reshape(tokens, k, -1), plan.kept.reshape(tokens, k)


def _sorted_rows(grouped_implementation: str):
    """The dispatch over rows gathered in expert order, with `grouped_matmul`'s `implementation`."""

    def dispatch(x, expert_ids, gate, up, down, *, capacity, block_size, interpret=False):
        tokens, k = expert_ids.shape
        plan = _plan(expert_ids, gate.shape[0], capacity)
        everything = jnp.ones((tokens * k,), bool)
        rows = gather_rows(
            x,
            plan.order // k,
            everything,
            plan.inverse.reshape(tokens, k),
            everything.reshape(tokens, k),
        )
        options = dict(
            implementation=grouped_implementation, block_size=block_size, interpret=interpret
        )
        d_e = gate.shape[2]
        gate_up = jnp.concatenate([gate, up], axis=-1)
        projected = grouped_matmul(rows, gate_up, plan.group_sizes, **options)
        hidden = jax.nn.silu(projected[:, :d_e]) * projected[:, d_e:]
        sorted_out = grouped_matmul(hidden, down, plan.group_sizes, **options)
        out = gather_rows(sorted_out, plan.inverse, everything, plan.order, everything)
        return out.reshape(tokens, k, -1), plan.kept.reshape(tokens, k)

    return dispatch


def _rank_within_expert(expert_of: jax.Array, counts: jax.Array) -> jax.Array:
    """For each assignment, how many earlier assignments (in token order) chose the same expert."""
    order = _stable_argsort(expert_of, counts.shape[0] + 1)  # key counts.shape[0]: absent
    starts = jnp.cumsum(counts) - counts
    starts = jnp.concatenate([starts, jnp.sum(counts, keepdims=True)])
    rank_sorted = jnp.arange(expert_of.size, dtype=jnp.int32) - starts[expert_of[order]]
    return jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)


def _stable_argsort(keys: jax.Array, num_keys: int) -> jax.Array:
    """jnp.argsort(keys, stable=True) for int keys in [0, num_keys): one sort of packed int32 keys
    (key · n + position, all distinct) when they fit, several times faster on CPU than sorting
    (key, position) pairs."""
    size = keys.shape[0]
    if num_keys * size >= 2**31:
        return jnp.argsort(keys, stable=True)
    position = jnp.arange(size, dtype=jnp.int32)
    return jax.lax.sort(keys.astype(jnp.int32) * size + position) % size


def _check_inputs(x, expert_ids, gate, up, down, capacity, block_size) -> None:
    if x.ndim != 2 or expert_ids.ndim != 2 or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"moe_dispatch: expected x [T, h] and expert_ids [T, k]; got {x.shape}, "
            f"{expert_ids.shape}"
        )
    experts, hidden, d_e = gate.shape
    if hidden != x.shape[1] or up.shape != gate.shape or down.shape != (experts, d_e, hidden):
        raise ValueError(
            f"moe_dispatch: expected gate / up [E, h={x.shape[1]}, d_e] and down [E, d_e, h]; got "
            f"{gate.shape}, {up.shape}, {down.shape}"
        )
    if not jnp.issubdtype(expert_ids.dtype, jnp.integer):
        raise ValueError(f"moe_dispatch: expert_ids must be integers, got {expert_ids.dtype}")
    if capacity is not None and capacity < 0:
        raise ValueError(f"moe_dispatch: capacity must be >= 0 or None, got {capacity}")
    if block_size < 1:
        raise ValueError(f"moe_dispatch: block_size must be >= 1, got {block_size}")


_ACCELERATED = ("pallas", "ragged_dot", "xla")
registry.declare_op(
    "moe_dispatch", _block_padded, auto=dict.fromkeys(registry.KERNEL_PLATFORMS, _ACCELERATED)
)
registry.register_implementation("moe_dispatch", "ragged_dot", _sorted_rows("ragged_dot"))
# The TPU kernel of grouped_matmul; a fused dispatch kernel would register here instead.
registry.register_implementation(
    "moe_dispatch", "pallas", _sorted_rows("pallas"), platforms=("tpu",)
)
