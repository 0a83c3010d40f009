"""Grouped matrix multiplication: the expert matmul of a dropless MoE.

    out = grouped_matmul(lhs, rhs, group_sizes)   # lhs: [M, K], rhs: [G, K, N], group_sizes: [G] int32

Rows of `lhs` are sorted by group: rows `[sum(group_sizes[:g]), sum(group_sizes[:g + 1]))` are
multiplied by `rhs[g]`. `sum(group_sizes)` may be smaller than `M`; the rows past it give zeros (they
are the dropped assignments of a capacity-limited MoE). Equivalent plain JAX (`grouped_matmul_reference`):

    start = 0
    for g in range(G):
        out[start : start + group_sizes[g]] = lhs[start : start + group_sizes[g]] @ rhs[g]
        start += group_sizes[g]

Implementations (all differentiable w.r.t. `lhs` and `rhs`; the output dtype is
`result_type(lhs, rhs)`, accumulation is fp32):

- `block_padded` (the CPU default): every group is padded to a multiple of `block_size` rows inside a
  static buffer of `round_up(M + G·(block_size − 1), block_size)` rows; each row block gathers its
  group's weight matrix and a single batched einsum does all the work; the result is un-padded by a
  gather. Only gathers and one einsum: no data-dependent shapes, and no work outside the groups
  beyond the padding.
- `ragged_dot`: `jax.lax.ragged_dot` (the GPU/TPU default). On CPU XLA lowers it to a computation
  over every group, so it costs far more than the useful FLOPs. Measured on this project's 2-core CPU
  machine (jax 0.10.2, fp32, jit, best of 3, other jobs sharing the cores so ±50%):
  M = 4096·8 = 32768 rows, K = 128, N = 64, G = 64 groups of ≈512 rows (`benchmark_cpu()` in
  this file): forward ragged_dot 0.9–2.0 s vs block_padded 0.085 s (block 16), forward +
  backward 3.0–4.2 s vs 0.21–0.24 s: 10–23× slower. The whole MoE layer (`umv2_jax.models.moe`,
  T = 4096 tokens, top-8 of 64 experts, h = 128, d_e = 64): forward 2.6 s vs 0.32 s (block 16) /
  0.19 s (block 64), forward + backward 12.2 s vs 0.75 s / 0.41 s. Most of block_padded's time is
  the per-block weight gather ([M/block, K, N] floats), so blocks of 64 are ≈2× faster whenever the
  groups hold a few hundred rows each.
- `megablox`: jax's Pallas Mosaic TPU `gmm` kernel (`jax.experimental.pallas.ops.tpu.megablox`),
  with its own custom VJP (`gmm` forward, `gmm` on the transposed weights and `tgmm` backward). TPU
  only, or the Pallas interpreter when `interpret=True` (tests on CPU).
- `auto`: `block_padded` on CPU, `ragged_dot` on GPU and TPU.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "block_padded", "ragged_dot", "megablox")

# Largest megablox tile along each dimension (the kernel's tuned default).
_MEGABLOX_TILE = 128


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    implementation: str = "auto",
    block_size: int = 16,
    interpret: bool = False,
) -> jax.Array:
    """lhs: [M, K] (rows sorted by group), rhs: [G, K, N], group_sizes: [G] int32 → [M, N].

    `implementation`: one of `IMPLEMENTATIONS`. `block_size`: row block of `block_padded`.
    `interpret`: run `megablox` in the Pallas interpreter (so it works off TPU; slow).
    """
    _check_shapes(lhs, rhs, group_sizes)
    name = resolve_implementation(implementation, interpret=interpret)
    group_sizes = group_sizes.astype(jnp.int32)
    if name == "block_padded":
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        return _block_padded(lhs, rhs, group_sizes, block_size)
    if name == "ragged_dot":
        out_dtype = jnp.result_type(lhs.dtype, rhs.dtype)
        out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
        return out.astype(out_dtype)
    return _megablox(lhs, rhs, group_sizes, interpret=interpret)


def resolve_implementation(implementation: str, *, interpret: bool = False) -> str:
    """The concrete implementation `grouped_matmul` runs for `implementation` on this platform."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"grouped_matmul: unknown implementation '{implementation}'; "
            f"allowed: {', '.join(IMPLEMENTATIONS)}"
        )
    platform = _platform()
    if implementation == "auto":
        return "block_padded" if platform == "cpu" else "ragged_dot"
    if implementation == "megablox" and platform != "tpu" and not interpret:
        raise ValueError(
            f"grouped_matmul: implementation 'megablox' is a TPU kernel and this platform is "
            f"'{platform}'; use 'auto' (or 'block_padded' / 'ragged_dot'), or interpret=True in tests"
        )
    return implementation


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


def benchmark_cpu(
    rows: int = 4096 * 8,
    in_dim: int = 128,
    out_dim: int = 64,
    groups: int = 64,
    implementations: tuple[str, ...] = ("block_padded", "ragged_dot"),
    block_size: int = 16,
    repeats: int = 3,
) -> dict[str, dict[str, float]]:
    """Seconds per jitted forward and forward+backward call, best of `repeats`, per implementation."""
    keys = jax.random.split(jax.random.key(0), 3)
    lhs = jax.random.normal(keys[0], (rows, in_dim), jnp.float32)
    rhs = jax.random.normal(keys[1], (groups, in_dim, out_dim), jnp.float32)
    group_ids = jnp.sort(jax.random.randint(keys[2], (rows,), 0, groups))
    group_sizes = jnp.bincount(group_ids, length=groups).astype(jnp.int32)
    results = {}
    for name in implementations:

        def forward(a, b, name=name):
            return grouped_matmul(a, b, group_sizes, implementation=name, block_size=block_size)

        timings = {}
        for label, fn in (
            ("forward", jax.jit(forward)),
            ("forward_backward", jax.jit(jax.grad(lambda a, b: forward(a, b).sum(), (0, 1)))),
        ):
            jax.block_until_ready(fn(lhs, rhs))
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(fn(lhs, rhs))
                best = min(best, time.perf_counter() - start)
            timings[label] = best
        results[name] = timings
    return results


# --------------------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------------------


def _platform() -> str:
    """The backend programs are compiled for ("cpu", "gpu", "tpu"); tests patch it to lower for TPU."""
    return jax.default_backend()


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


def _block_padded(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, block_size: int
) -> jax.Array:
    rows, in_dim = lhs.shape
    groups, _, out_dim = rhs.shape
    out_dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    # Worst case every group wastes block_size − 1 rows, so this static size always suffices.
    padded_rows = _round_up(rows + groups * (block_size - 1), block_size)
    num_blocks = padded_rows // block_size

    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    padded_sizes = (group_sizes + block_size - 1) // block_size * block_size
    padded_ends = jnp.cumsum(padded_sizes)
    padded_starts = padded_ends - padded_sizes

    # Pad: slot p of the buffer holds row starts[g] + (p − padded_starts[g]) of group g, or zeros.
    slot = jnp.arange(padded_rows, dtype=jnp.int32)
    slot_group = jnp.searchsorted(padded_ends, slot, side="right")  # G past the last group
    group = jnp.minimum(slot_group, groups - 1)
    offset = slot - padded_starts[group]
    source = starts[group] + offset
    valid = (slot_group < groups) & (offset < group_sizes[group]) & (source < rows)
    buffer = jnp.where(valid[:, None], lhs[jnp.where(valid, source, 0)], 0)

    # Padded group sizes are multiples of the block, so a block's first slot names its group.
    block_weights = rhs[group[::block_size]]  # [num_blocks, K, N]
    products = jnp.einsum(
        "bik,bkn->bin",
        buffer.reshape(num_blocks, block_size, in_dim),
        block_weights,
        preferred_element_type=jnp.float32,
    ).reshape(padded_rows, out_dim)

    # Un-pad: row r of group g sits at padded_starts[g] + (r − starts[g]); rows past the groups → 0.
    row = jnp.arange(rows, dtype=jnp.int32)
    row_group = jnp.searchsorted(ends, row, side="right")
    in_group = row_group < groups
    row_group = jnp.minimum(row_group, groups - 1)
    destination = jnp.where(in_group, padded_starts[row_group] + row - starts[row_group], 0)
    return jnp.where(in_group[:, None], products[destination], 0).astype(out_dtype)


def _megablox(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, interpret: bool
) -> jax.Array:
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox_ops

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
