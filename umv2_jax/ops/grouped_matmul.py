"""Grouped matrix multiplication: the expert matmul of a dropless MoE.

    out = grouped_matmul(lhs, rhs, group_sizes)   # lhs: [M, K], rhs: [G, K, N], group_sizes: [G] int32

Rows of `lhs` are sorted by group: rows `[sum(group_sizes[:g]), sum(group_sizes[:g + 1]))` are
multiplied by `rhs[g]`. `sum(group_sizes)` may be smaller than `M`; the rows past it give zeros (they
are the dropped assignments of a capacity-limited MoE). Equivalent plain JAX (`grouped_matmul_reference`):

    start = 0
    for g in range(G):
        out[start : start + group_sizes[g]] = lhs[start : start + group_sizes[g]] @ rhs[g]
        start += group_sizes[g]

Implementations (`umv2_jax.ops.registry`; all differentiable w.r.t. `lhs` and `rhs`, output dtype
`result_type(lhs, rhs)`, fp32 accumulation):

- `xla`: the block-padded loop. Every group is padded to a multiple of `block_size` rows inside a
  static buffer of `round_up(M + G·(block_size − 1), block_size)` rows (`block_layout`); a loop over
  the used blocks only multiplies each by its group's weights (`block_padded_matmul`, custom VJP with
  a second loop for the backward); rows move in and out by gathers whose gradients are gathers
  (`gather_rows`). No data-dependent shapes, no per-block copy of the weights, no scatter-add.
  XLA's cost analysis counts a loop body once, so it under-reports its FLOPs.
- `ragged_dot`: `jax.lax.ragged_dot`. On CPU XLA computes it over every group (10–20× slower than
  `xla` at MoE shapes; `benchmarks/grouped_matmul.py`), on GPU / TPU it is a native grouped matmul.
- `pallas`: on TPU jax's Mosaic `gmm` kernel (`jax.experimental.pallas.ops.tpu.megablox`) with its
  own custom VJP (`gmm` forward, `gmm` on the transposed weights and `tgmm` backward); anywhere in the
  Pallas interpreter with `interpret=True` (tests on CPU). It declines dtypes other than fp32 / bf16.
- `auto`: `xla` on CPU; ("pallas", "ragged_dot", "xla") on GPU and TPU (this op's own preference:
  there is no GPU kernel yet, and there ragged_dot beats the loop).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from umv2_jax.ops import registry

# Largest megablox tile along each dimension (the kernel's tuned default).
_MEGABLOX_TILE = 128


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    implementation: registry.Implementation = "auto",
    block_size: int = 16,
    interpret: bool = False,
) -> jax.Array:
    """lhs: [M, K] (rows sorted by group), rhs: [G, K, N], group_sizes: [G] int32 → [M, N].

    `implementation`: a name of `registry.IMPLEMENTATIONS` or a preference tuple (module docstring).
    `block_size`: row block of `xla`. `interpret`: run `pallas` in the Pallas interpreter.
    """
    _check_shapes(lhs, rhs, group_sizes)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return registry.call(
        "grouped_matmul",
        lhs,
        rhs,
        group_sizes.astype(jnp.int32),
        implementation=implementation,
        interpret=interpret,
        block_size=block_size,
    )


class BlockLayout(NamedTuple):
    """Where the rows of group-sorted `lhs` [M, K] sit in a buffer [P, K] whose every group is
    padded to whole blocks (`block_layout`); P = round_up(M + G·(block − 1), block) always suffices.

    slot_row: [P] int32, the lhs row each slot holds; slot_valid: [P] bool, False for padding.
    row_slot: [M] int32, the slot of each lhs row; row_valid: [M] bool, False for rows past the groups.
    block_group: [P / block] int32, the group of each block; used_blocks: [] int32, blocks in groups
    (they come first; the rest of the buffer is padding).
    """

    slot_row: jax.Array
    slot_valid: jax.Array
    row_slot: jax.Array
    row_valid: jax.Array
    block_group: jax.Array
    used_blocks: jax.Array


def block_layout(group_sizes: jax.Array, rows: int, block_size: int) -> BlockLayout:
    """The block-padded layout of `rows` group-sorted rows with `group_sizes` [G] (traced)."""
    group_sizes = group_sizes.astype(jnp.int32)
    groups = group_sizes.shape[0]
    # Worst case every group wastes block_size − 1 rows, so this static size always suffices.
    padded_rows = _round_up(rows + groups * (block_size - 1), block_size)
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    padded_sizes = (group_sizes + block_size - 1) // block_size * block_size
    padded_ends = jnp.cumsum(padded_sizes)
    padded_starts = padded_ends - padded_sizes

    # Slot p holds row starts[g] + (p − padded_starts[g]) of group g, or nothing.
    slot = jnp.arange(padded_rows, dtype=jnp.int32)
    slot_group = jnp.searchsorted(padded_ends, slot, side="right")  # G past the last group
    group = jnp.minimum(slot_group, groups - 1)
    offset = slot - padded_starts[group]
    slot_row = starts[group] + offset
    slot_valid = (slot_group < groups) & (offset < group_sizes[group]) & (slot_row < rows)

    # Row r of group g sits at padded_starts[g] + (r − starts[g]).
    row = jnp.arange(rows, dtype=jnp.int32)
    row_group = jnp.searchsorted(ends, row, side="right")
    row_valid = row_group < groups
    row_group = jnp.minimum(row_group, groups - 1)
    row_slot = padded_starts[row_group] + row - starts[row_group]
    return BlockLayout(
        slot_row=jnp.where(slot_valid, slot_row, 0),
        slot_valid=slot_valid,
        row_slot=jnp.where(row_valid, row_slot, 0),
        row_valid=row_valid,
        # Padded group sizes are multiples of the block, so a block's first slot names its group.
        block_group=group[::block_size],
        used_blocks=padded_ends[-1] // block_size,
    )


def block_padded_matmul(buffer: jax.Array, rhs: jax.Array, layout: BlockLayout) -> jax.Array:
    """buffer: [P, K] in `layout`, rhs: [G, K, N] → [P, N]: each used block times its group's weights.

    A loop over the used blocks only (their number is data-dependent; the shapes are not), with a
    custom VJP whose backward is a second loop: no per-block copy of the weights is ever made, and
    the weight gradient is summed block by block in a fixed order. Padding slots must hold zeros
    (or be ignored by the caller); blocks past `used_blocks` come out as zeros.
    """
    return _blocked_matmul(buffer, rhs, layout.block_group, layout.used_blocks)


def gather_rows(
    source: jax.Array,
    index: jax.Array,
    valid: jax.Array,
    inverse_index: jax.Array,
    inverse_valid: jax.Array,
) -> jax.Array:
    """source: [S, D] → [R, D] with row r = source[index[r]] where valid[r], else zeros.

    Differentiable w.r.t. `source` by a gather instead of a scatter-add (the MaxText `ragged_sort`
    idea): `inverse_index` [S] or [S, c] lists, for each source row, the output rows that read it
    (`inverse_valid` marks the real entries); the gradient of source row s is the sum of the output
    gradients at those rows. The caller guarantees that the two maps are exact inverses:
    {r : valid[r] and index[r] = s} = {inverse_index[s, j] : inverse_valid[s, j]}.
    """
    return _gather_rows(source, index, valid, inverse_index, inverse_valid)


def grouped_matmul_reference(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array | np.ndarray
) -> jax.Array:
    """The per-group loop of the module docstring (the oracle). `group_sizes` must be concrete."""
    sizes = np.asarray(group_sizes)
    out_dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    pieces, start = [], 0
    for group, size in enumerate(sizes.tolist()):
        rows = lhs[start : start + size].astype(jnp.float32)
        pieces.append(rows @ rhs[group].astype(jnp.float32))
        start += size
    pieces.append(jnp.zeros((lhs.shape[0] - start, rhs.shape[2]), jnp.float32))
    return jnp.concatenate(pieces, axis=0).astype(out_dtype)


# --------------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------------


def _check_shapes(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> None:
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(
            f"grouped_matmul: expected lhs [M, K], rhs [G, K, N], group_sizes [G]; got "
            f"{lhs.shape}, {rhs.shape}, {group_sizes.shape}"
        )
    if lhs.shape[1] != rhs.shape[1] or rhs.shape[0] != group_sizes.shape[0]:
        raise ValueError(
            f"grouped_matmul: lhs {lhs.shape}, rhs {rhs.shape} and group_sizes "
            f"{group_sizes.shape} disagree on K or G"
        )
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"grouped_matmul: group_sizes must be integers, got {group_sizes.dtype}")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _block_padded(lhs, rhs, group_sizes, *, block_size: int, interpret: bool = False) -> jax.Array:
    del interpret
    layout = block_layout(group_sizes, lhs.shape[0], block_size)
    buffer = gather_rows(lhs, layout.slot_row, layout.slot_valid, layout.row_slot, layout.row_valid)
    products = block_padded_matmul(buffer, rhs, layout)
    return gather_rows(
        products, layout.row_slot, layout.row_valid, layout.slot_row, layout.slot_valid
    )


def _varying_like(value: jax.Array, *references: jax.Array) -> jax.Array:
    """`value` marked as varying over every manual mesh axis a reference varies over (inside
    `shard_map`; a no-op outside), so that a loop carry initialized from constants has the type
    of what the loop body returns."""
    axes = set()
    for reference in references:
        axes |= _varying_axes(reference)
    axes -= _varying_axes(value)
    return jax.lax.pcast(value, tuple(sorted(axes)), to="varying") if axes else value


def _sum_to_type(grad: jax.Array, primal: jax.Array) -> jax.Array:
    """A custom VJP's cotangent summed over the manual mesh axes it varies over and its primal does
    not (inside shard_map: a weight replicated over `data` used on `data`-split rows), which is the
    transpose of the implicit broadcast at the use; a no-op outside shard_map."""
    axes = _varying_axes(grad) - _varying_axes(primal)
    return jax.lax.psum(grad, tuple(sorted(axes))) if axes else grad


def _varying_axes(value: jax.Array) -> set:
    manual = getattr(jax.typeof(value), "manual_axis_type", None)
    return set(getattr(manual, "varying", ()))


@jax.custom_vjp
def _blocked_matmul(
    buffer: jax.Array, rhs: jax.Array, block_group: jax.Array, used_blocks: jax.Array
) -> jax.Array:
    out, _ = _blocked_matmul_forward(buffer, rhs, block_group, used_blocks)
    return out


def _blocked_matmul_forward(buffer, rhs, block_group, used_blocks):
    block_size = buffer.shape[0] // block_group.shape[0]
    out_dtype = jnp.result_type(buffer.dtype, rhs.dtype)

    def body(block, out):
        start = block * block_size
        rows = jax.lax.dynamic_slice_in_dim(buffer, start, block_size)
        weights = jax.lax.dynamic_index_in_dim(rhs, block_group[block], keepdims=False)
        product = jnp.dot(rows, weights, preferred_element_type=jnp.float32).astype(out_dtype)
        return jax.lax.dynamic_update_slice_in_dim(out, product, start, 0)

    out = _varying_like(
        jnp.zeros((buffer.shape[0], rhs.shape[2]), out_dtype), buffer, rhs, block_group
    )
    out = jax.lax.fori_loop(0, used_blocks, body, out)
    return out, (buffer, rhs, block_group, used_blocks)


def _blocked_matmul_backward(residuals, out_grad):
    buffer, rhs, block_group, used_blocks = residuals
    block_size = buffer.shape[0] // block_group.shape[0]

    def body(block, carry):
        buffer_grad, rhs_grad = carry
        start, group = block * block_size, block_group[block]
        rows = jax.lax.dynamic_slice_in_dim(buffer, start, block_size)
        grad = jax.lax.dynamic_slice_in_dim(out_grad, start, block_size)
        weights = jax.lax.dynamic_index_in_dim(rhs, group, keepdims=False)
        rows_grad = jnp.dot(grad, weights.T, preferred_element_type=jnp.float32)
        buffer_grad = jax.lax.dynamic_update_slice_in_dim(
            buffer_grad, rows_grad.astype(buffer.dtype), start, 0
        )
        # Blocks are visited in order, so each group's weight gradient is summed deterministically.
        weights_grad = jax.lax.dynamic_index_in_dim(rhs_grad, group, keepdims=True)
        weights_grad = weights_grad + jnp.dot(rows.T, grad, preferred_element_type=jnp.float32)
        rhs_grad = jax.lax.dynamic_update_slice_in_dim(rhs_grad, weights_grad, group, 0)
        return buffer_grad, rhs_grad

    carry = (jnp.zeros_like(buffer), jnp.zeros(rhs.shape, jnp.float32))
    carry = tuple(_varying_like(c, buffer, rhs, out_grad, block_group) for c in carry)
    buffer_grad, rhs_grad = jax.lax.fori_loop(0, used_blocks, body, carry)
    buffer_grad, rhs_grad = _sum_to_type(buffer_grad, buffer), _sum_to_type(rhs_grad, rhs)
    return buffer_grad, rhs_grad.astype(rhs.dtype), None, None


_blocked_matmul.defvjp(_blocked_matmul_forward, _blocked_matmul_backward)


@jax.custom_vjp
def _gather_rows(source, index, valid, inverse_index, inverse_valid):
    safe = jnp.where(valid, index, 0)
    return jnp.where(valid[:, None], jnp.take(source, safe, axis=0), 0).astype(source.dtype)


def _gather_rows_forward(source, index, valid, inverse_index, inverse_valid):
    out = _gather_rows(source, index, valid, inverse_index, inverse_valid)
    # source[:0]: no data, only its type (which mesh axes it varies over, inside shard_map).
    return out, (index, valid, inverse_index, inverse_valid, source[:0])


def _gather_rows_backward(residuals, out_grad):
    index, valid, inverse_index, inverse_valid, source_type = residuals
    safe = jnp.where(inverse_valid, inverse_index, 0)
    grad = jnp.where(inverse_valid[..., None], jnp.take(out_grad, safe, axis=0), 0)
    if grad.ndim == 3:  # several destination rows per source row: sum them
        grad = jnp.sum(grad, axis=1, dtype=jnp.float32)
    grad = _sum_to_type(grad, source_type)
    return grad.astype(out_grad.dtype), None, None, None, None


_gather_rows.defvjp(_gather_rows_forward, _gather_rows_backward)


def _ragged_dot(lhs, rhs, group_sizes, *, block_size: int, interpret: bool = False) -> jax.Array:
    del block_size, interpret
    out_dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def _megablox(lhs, rhs, group_sizes, *, block_size: int, interpret: bool = False) -> jax.Array:
    del block_size
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox_ops

    if jnp.result_type(lhs.dtype, rhs.dtype) not in (jnp.float32, jnp.bfloat16):
        raise NotImplementedError(f"megablox takes fp32 / bf16, not {lhs.dtype} × {rhs.dtype}")

    rows, in_dim = lhs.shape
    out_dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    # The kernel needs M divisible by the row tile (a multiple of 16 sublanes covers fp32 and bf16).
    row_tile = min(_MEGABLOX_TILE, _round_up(rows, 16))
    padded_rows = _round_up(rows, row_tile)
    # The kernel leaves rows outside every group (and their lhs gradient) uninitialized. An extra
    # all-zero group covers them: its outputs and lhs gradients are exact zeros, and the gradient
    # of its weights is dropped by the concatenation's transpose.
    lhs = jnp.pad(lhs.astype(out_dtype), ((0, padded_rows - rows), (0, 0)))
    rhs = jnp.concatenate([rhs.astype(out_dtype), jnp.zeros_like(rhs[:1], out_dtype)], axis=0)
    uncovered = padded_rows - jnp.sum(group_sizes)
    group_sizes = jnp.concatenate([group_sizes, uncovered[None].astype(jnp.int32)])
    tiling = (row_tile, _MEGABLOX_TILE, _MEGABLOX_TILE)
    out = megablox_ops.gmm(lhs, rhs, group_sizes, jnp.float32, tiling, None, None, False, interpret)
    return out[:rows].astype(out_dtype)


_ACCELERATED = ("pallas", "ragged_dot", "xla")
registry.declare_op(
    "grouped_matmul", _block_padded, auto=dict.fromkeys(registry.KERNEL_PLATFORMS, _ACCELERATED)
)
registry.register_implementation("grouped_matmul", "ragged_dot", _ragged_dot)
registry.register_implementation("grouped_matmul", "pallas", _megablox, platforms=("tpu",))
