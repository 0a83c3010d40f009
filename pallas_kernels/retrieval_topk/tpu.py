"""Mosaic TPU selection kernels for `retrieval_topk` and `product_key_topk` (both TDQKR stages).

    cand_row, cand_col = stage1(q_row, q_col, k_row, k_col, w_row, w_col, rc_topk=k)
    best_i, best_j = stage2(r_cand, q_cand, core_sum, topk=m)

Stage 1, for a tile of 128 tokens and a tile of keys in VMEM, scores every key of both sides
(f32 accumulation, precision HIGHEST) and keeps the best k per side; only [k, 128] ids per tile
reach HBM, never the [T, n] scores. Plain JAX:

    scores = jnp.einsum("a,tad,nad->tn", w, q, key, precision=HIGHEST)   # [T, n] f32
    cand = lax.top_k(scores, k)[1]                                     # [T, k] int32

Stage 2, for a tile of 128 tokens, builds the k × k candidate grid in VMEM and keeps its best m
cells; only [m, 128] flat positions reach HBM, never the [T, k²] grid. Plain JAX:

    total = jnp.einsum("tai,ab,tbj->tij", r_cand, core_sum, q_cand)     # None: r[:, 0, :, None]
    best = lax.top_k(total.reshape(T, k * k), m)[1]                      #       + q[:, 0, None, :]
    best_i, best_j = best // k, best % k

Layout: tokens on the 128 lanes, keys (stage 1) or grid rows (stage 2) on sublanes, so every
reduction of the selection is elementwise across vregs plus one 8-sublane reduce per pick, and no
relayout (lane ↔ sublane transpose) happens inside a kernel. The scores are one MXU matmul per
rank, keys [n_blk, D_k] · queriesᵀ [D_k, 128] → [n_blk, 128].

Selection: `count` rounds of "the best element strictly after the previous pick" in the total
order (score descending, id ascending), which is `lax.top_k`'s order with its lowest-id tie rule.
A round is one read of the candidates (no mask is written back) folding an elementwise running
(max, lowest id) over 8-row slices, then one 8-sublane reduce. `lax.top_k`, sort and argsort do
not lower in Mosaic; why this select and not a bitonic or threshold one: DEVELOPERS.md,
"Retrieval kernels (TPU)".

Padding: tokens pad to a multiple of 128 (zero queries, outputs sliced off); keys pad to the key
tile with score −inf and id 2³¹−1, so a padded key is never picked while a real one is left (and
rc_topk ≤ n leaves one). Grid rows pad to a multiple of 8 the same way.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from umv2_jax.ops import registry
from umv2_jax.ops import retrieval_topk as _declares_op  # noqa: F401  (declares the op)
from umv2_jax.ops.selection import (
    SelectionKernels,
    retrieval_kernel_implementation,
)

LANES = 128  # tokens per tile: one vreg's lanes
SUBLANES = 8
# Key bytes per side per key tile (f32 [n_blk, r, D_k], double-buffered, two sides: 4× this in
# VMEM). 2 MiB keeps stage 1 under v5e's 16 MiB default scoped VMEM at every config shape.
KEY_TILE_BYTES = 2 * 2**20
# Rows of candidates read per step of a selection round (a multiple of 8).
CHUNK_ROWS = 64
_NO_ID = jnp.iinfo(jnp.int32).max
_NEG_INF = float("-inf")


def stage1(q_row, q_col, k_row, k_col, w_row, w_col, *, rc_topk, interpret=False, key_block=None):
    """Top-`rc_topk` key ids per side by the rank-1-combined score.

    q_row, q_col: [T, r, D_k] queries (any float dtype; scored in f32).
    k_row, k_col: [N, r, D_k] keys.
    w_row, w_col: [r] f32 weights of the ranks (u*, t*; ones(1) for product keys).
    key_block:    keys per VMEM tile (a multiple of 128); default: as many as KEY_TILE_BYTES holds.
    Returns cand_row, cand_col [T, k] int32, by descending Σ_a w_a <q[t, a], key[n, a]>; ties:
    lowest key id first.
    """
    n_tokens, rank, key_dim = q_row.shape
    n_keys = k_row.shape[0]
    k_pad = _round_up(rc_topk, SUBLANES)
    key_block = stage1_key_block(n_keys, rank, key_dim, rc_topk, key_block)
    n_pad = _round_up(n_keys, key_block)
    n_blocks = n_pad // key_block
    t_pad = _round_up(n_tokens, LANES)

    f32 = jnp.float32
    # Rank-major [r, T, D_k] / [r, N, D_k], so a rank's tile is one compact [rows, D_k] VMEM
    # buffer: Mosaic blocks cannot squeeze the second-minor dim of [T, r, D_k], and a [T, r, D_k]
    # block pads r to 8 sublanes in VMEM (4× the bytes at r = 2).
    queries = [_pad_axis(q.astype(f32), 0, t_pad).transpose(1, 0, 2) for q in (q_row, q_col)]
    keys = [_pad_axis(k.astype(f32), 0, n_pad).transpose(1, 0, 2) for k in (k_row, k_col)]
    weights = jnp.stack([w_row.astype(f32), w_col.astype(f32)])  # [2, r] → SMEM

    kernel = functools.partial(
        _stage1_kernel,
        rank=rank,
        n_keys=n_keys,
        key_block=key_block,
        rc_topk=rc_topk,
        n_blocks=n_blocks,
    )
    query_spec = pl.BlockSpec((rank, LANES, key_dim), lambda t, n: (0, t, 0))
    key_spec = pl.BlockSpec((rank, key_block, key_dim), lambda t, n: (0, n, 0))
    out_spec = pl.BlockSpec((k_pad, LANES), lambda t, n: (0, t))
    scratch = [pltpu.VMEM((key_block, LANES), f32)]
    if n_blocks > 1:
        scratch += [
            pltpu.VMEM((2, k_pad, LANES), f32),  # running best scores per side
            pltpu.VMEM((2, k_pad, LANES), jnp.int32),  # running best ids per side
            pltpu.VMEM((k_pad, LANES), f32),  # this tile's picks (scores)
            pltpu.VMEM((k_pad, LANES), jnp.int32),  # this tile's picks (ids)
        ]
    flops = 2 * 2 * t_pad * n_pad * rank * key_dim
    cand_row, cand_col = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((k_pad, t_pad), jnp.int32)] * 2,
        grid=(t_pad // LANES, n_blocks),
        in_specs=[
            pl.BlockSpec(memory_space=pltpu.SMEM),
            query_spec,
            query_spec,
            key_spec,
            key_spec,
        ],
        out_specs=[out_spec, out_spec],
        scratch_shapes=scratch,
        compiler_params=_compiler_params(("parallel", "arbitrary"), interpret),
        cost_estimate=pl.CostEstimate(
            flops=flops,
            transcendentals=0,
            bytes_accessed=4 * (2 * t_pad * rank * key_dim + 2 * n_pad * rank * key_dim)
            + 2 * 4 * k_pad * t_pad,
        ),
        interpret=_interpret_params(interpret),
    )(weights, *queries, *keys)
    return cand_row[:rc_topk, :n_tokens].T, cand_col[:rc_topk, :n_tokens].T


def stage2(r_cand, q_cand, core_sum, *, topk, interpret=False):
    """Top-`topk` cells of each token's k × k candidate grid.

    r_cand, q_cand: [T, r, k] f32 per-rank scores of the row / column candidates.
    core_sum:       [r, r] f32 Σ_c C^c, or None for the product-key sum r_cand[:, 0, i] +
                    q_cand[:, 0, j] (r = 1).
    Returns best_i, best_j [T, m] int32 candidate positions, by descending total; ties: lowest
    flat position i·k + j first.
    """
    n_tokens, rank, rc_topk = r_cand.shape
    k_pad = _round_up(rc_topk, SUBLANES)
    m_pad = _round_up(topk, SUBLANES)
    t_pad = _round_up(n_tokens, LANES)
    f32 = jnp.float32
    # [r, k, T]: tokens on lanes (a transpose of the small candidate scores, not of the grid).
    sides = [_pad_axis(x.astype(f32).transpose(1, 2, 0), 2, t_pad) for x in (r_cand, q_cand)]
    product_key = core_sum is None
    core = jnp.zeros((1, 1), f32) if product_key else core_sum.astype(f32)

    kernel = functools.partial(
        _stage2_kernel, rank=rank, rc_topk=rc_topk, topk=topk, product_key=product_key
    )
    side_spec = pl.BlockSpec((rank, rc_topk, LANES), lambda t: (0, 0, t))
    best = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_pad, t_pad), jnp.int32),
        grid=(t_pad // LANES,),
        in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM), side_spec, side_spec],
        out_specs=pl.BlockSpec((m_pad, LANES), lambda t: (0, t)),
        scratch_shapes=[pltpu.VMEM((rc_topk * k_pad, LANES), f32)],
        compiler_params=_compiler_params(("parallel",), interpret),
        cost_estimate=pl.CostEstimate(
            flops=t_pad * rc_topk * rc_topk * (2 * rank + 12 * topk),
            transcendentals=0,
            bytes_accessed=4 * (2 * rank * rc_topk * t_pad + m_pad * t_pad),
        ),
        interpret=_interpret_params(interpret),
    )(core, *sides)
    best = best[:topk, :n_tokens].T
    return best // rc_topk, best % rc_topk


def stage1_key_block(n_keys, rank, key_dim, rc_topk, key_block=None) -> int:
    """Keys per stage-1 VMEM tile: a multiple of 128, at least rc_topk (each merge must see ≥ k
    real candidates), at most n rounded up; by default as many as KEY_TILE_BYTES holds."""
    floor = _round_up(rc_topk, LANES)
    if key_block is None:
        key_block = KEY_TILE_BYTES // (rank * _round_up(key_dim, LANES) * 4) // LANES * LANES
    return min(max(_round_up(key_block, LANES), floor), _round_up(n_keys, LANES))


def stage1_vmem_bytes(n_keys, rank, key_dim, rc_topk, key_block=None) -> int:
    """VMEM the stage-1 kernel allocates: double-buffered query and key tiles of both sides (lanes
    padded to 128), the id outputs, the score tile and, with several key tiles, the running lists."""
    key_block = stage1_key_block(n_keys, rank, key_dim, rc_topk, key_block)
    lanes = _round_up(key_dim, LANES)
    k_pad = _round_up(rc_topk, SUBLANES)
    buffers = 2 * 2 * 4 * rank * lanes * (LANES + key_block)  # 2 sides × 2 buffers, f32
    outputs = 2 * 2 * 4 * k_pad * LANES
    scratch = 4 * key_block * LANES
    if _round_up(n_keys, key_block) > key_block:
        scratch += 4 * (2 * 2 + 2) * k_pad * LANES  # running (score, id) × 2 sides; the picks
    return buffers + outputs + scratch


def stage2_vmem_bytes(rank, rc_topk, topk) -> int:
    """VMEM the stage-2 kernel allocates: the [k · k_pad, 128] f32 grid, the double-buffered
    candidate scores of both sides and the position output."""
    k_pad = _round_up(rc_topk, SUBLANES)
    grid = 4 * rc_topk * k_pad * LANES
    inputs = 2 * 2 * 4 * rank * k_pad * LANES
    outputs = 2 * 4 * _round_up(topk, SUBLANES) * LANES
    return grid + inputs + outputs


KERNELS = SelectionKernels(stage1=stage1, stage2=stage2)

registry.register_implementation(
    "retrieval_topk", "pallas", retrieval_kernel_implementation(KERNELS), platforms=("tpu",)
)


# --------------------------------------------------------------------------------------------------
# Kernel bodies


def _stage1_kernel(
    w_ref,
    qr_ref,
    qc_ref,
    kr_ref,
    kc_ref,
    out_r_ref,
    out_c_ref,
    score_ref,
    *running_refs,
    rank,
    n_keys,
    key_block,
    rc_topk,
    n_blocks,
):
    """Grid (token tile t, key tile n). q*_ref: [r, 128, D_k]; k*_ref: [r, key_block, D_k];
    out_*_ref: [k_pad, 128] ids; score_ref: [key_block, 128] one side's scores of this key tile.
    running_refs (n_blocks > 1): running best scores / ids [2, k_pad, 128] and this tile's picks."""
    for side, (q_ref, k_ref, out_ref) in enumerate(
        ((qr_ref, kr_ref, out_r_ref), (qc_ref, kc_ref, out_c_ref))
    ):
        _stage1_side(
            side, w_ref, q_ref, k_ref, out_ref, score_ref, running_refs,
            rank=rank, n_keys=n_keys, key_block=key_block, rc_topk=rc_topk, n_blocks=n_blocks,
        )  # fmt: skip


def _stage1_side(
    side, w_ref, q_ref, k_ref, out_ref, score_ref, running_refs, *, rank, n_keys, key_block,
    rc_topk, n_blocks,
):  # fmt: skip
    n = pl.program_id(1)
    k_pad = out_ref.shape[0]
    first_id = n * key_block
    scores = jnp.zeros((key_block, LANES), jnp.float32)
    for a in range(rank):
        # [key_block, D_k] · [128, D_k]ᵀ on the MXU, f32 at HIGHEST (as the XLA path).
        per_rank = lax.dot_general(
            k_ref[a],
            q_ref[a],
            (((1,), (1,)), ((), ())),
            precision=lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )
        scores = scores + w_ref[side, a] * per_rank
    row = lax.broadcasted_iota(jnp.int32, (key_block, LANES), 0)
    score_ref[...] = jnp.where(first_id + row < n_keys, scores, _NEG_INF)  # padded keys: −inf

    def tile_source(c, rows):
        start = pl.multiple_of(c * rows, SUBLANES)
        ids = first_id + start + lax.broadcasted_iota(jnp.int32, (rows, LANES), 0)
        return score_ref[pl.ds(start, rows), :], jnp.where(ids < n_keys, ids, _NO_ID)

    tile_rows = _chunk_rows(key_block)
    sources = [(key_block // tile_rows, tile_rows, tile_source)]
    if n_blocks == 1:
        _select(sources, rc_topk, k_pad, out_ref, None)
        return

    run_v_ref, run_i_ref, pick_v_ref, pick_i_ref = running_refs

    @pl.when(n == 0)
    def _():
        run_v_ref[side] = jnp.full((k_pad, LANES), _NEG_INF, jnp.float32)
        run_i_ref[side] = jnp.full((k_pad, LANES), _NO_ID, jnp.int32)

    def running_source(c, rows):
        del c, rows
        return run_v_ref[side], run_i_ref[side]

    # Running ids come from earlier tiles, so they are all lower than this tile's: the merged
    # order is still (score desc, id asc).
    sources.append((1, k_pad, running_source))
    _select(sources, rc_topk, k_pad, pick_i_ref, pick_v_ref)
    run_v_ref[side] = pick_v_ref[...]
    run_i_ref[side] = pick_i_ref[...]

    @pl.when(n == n_blocks - 1)
    def _():
        out_ref[...] = pick_i_ref[...]


def _stage2_kernel(core_ref, r_ref, q_ref, out_ref, grid_ref, *, rank, rc_topk, topk, product_key):
    """Grid (token tile). r_ref, q_ref: [r, k, 128]; grid_ref: [k · k_pad, 128] the total of cell
    (i, j) at row i·k_pad + j (rows j ≥ k: −inf)."""
    k_pad = grid_ref.shape[0] // rc_topk
    q_sides = [q_ref[b] for b in range(rank)]  # [k, 128] each
    if product_key:
        row_weights = [r_ref[0]]
    else:
        # p_b[i] = Σ_a C[a, b] r[a, i]: then total[i, j] = Σ_b p_b[i] q_b[j].
        row_weights = [sum(core_ref[a, b] * r_ref[a] for a in range(rank)) for b in range(rank)]
    pad_rows = jnp.full((k_pad - rc_topk, LANES), _NEG_INF, jnp.float32)
    for i in range(rc_topk):
        if product_key:
            cells = row_weights[0][i : i + 1, :] + q_sides[0]
        else:
            cells = sum(row_weights[b][i : i + 1, :] * q_sides[b] for b in range(rank))
        if k_pad > rc_topk:
            cells = jnp.concatenate([cells, pad_rows], axis=0)
        grid_ref[pl.ds(i * k_pad, k_pad), :] = cells

    def grid_source(c, rows):
        start = pl.multiple_of(c * rows, SUBLANES)
        j = lax.broadcasted_iota(jnp.int32, (rows, LANES), 0)
        return grid_ref[pl.ds(start, rows), :], jnp.where(j < rc_topk, c * rc_topk + j, _NO_ID)

    _select([(rc_topk, k_pad, grid_source)], topk, out_ref.shape[0], out_ref, None)


def _select(sources, count, count_pad, ids_out_ref, scores_out_ref):
    """Writes the best `count` (score, id) of `sources` to ids_out_ref[:count] (and their scores to
    scores_out_ref), best first, in the order (score descending, id ascending); rows count..count_pad
    get the filler (−inf, 2³¹−1).

    sources: [(n_chunks, rows, read)], read(c, rows) → (scores [rows, 128] f32, ids [rows, 128]
    int32) for chunk c, traced inside a fori_loop (c is a tracer). Ids must be distinct among real
    candidates; filler entries carry (−inf, 2³¹−1).
    """
    rows_iota = lax.broadcasted_iota(jnp.int32, (SUBLANES, LANES), 0)

    def fold(acc, values, ids, previous):
        prev_v, prev_i = previous
        for s in range(0, values.shape[0], SUBLANES):
            v, i = values[s : s + SUBLANES], ids[s : s + SUBLANES]
            # Strictly after the previous pick in (score desc, id asc): not yet picked.
            eligible = (v < prev_v) | ((v == prev_v) & (i > prev_i))
            v = jnp.where(eligible, v, _NEG_INF)
            i = jnp.where(eligible, i, _NO_ID)
            acc_v, acc_i = acc
            better = (v > acc_v) | ((v == acc_v) & (i < acc_i))
            acc = (jnp.where(better, v, acc_v), jnp.where(better, i, acc_i))
        return acc

    def pick(previous):
        acc = (
            jnp.full((SUBLANES, LANES), _NEG_INF, jnp.float32),
            jnp.full((SUBLANES, LANES), _NO_ID, jnp.int32),
        )
        for n_chunks, rows, read in sources:

            def body(c, acc, rows=rows, read=read):
                values, ids = read(c, rows)
                return fold(acc, values, ids, previous)

            acc = lax.fori_loop(0, n_chunks, body, acc) if n_chunks > 1 else body(0, acc)
        acc_v, acc_i = acc
        best_v = jnp.max(acc_v, axis=0, keepdims=True)  # [1, 128]
        best_i = jnp.min(jnp.where(acc_v == best_v, acc_i, _NO_ID), axis=0, keepdims=True)
        return best_v, best_i

    def group(g, previous):
        # Eight picks per aligned [8, 128] store.
        out_v = jnp.full((SUBLANES, LANES), _NEG_INF, jnp.float32)
        out_i = jnp.full((SUBLANES, LANES), _NO_ID, jnp.int32)
        for u in range(SUBLANES):
            best_v, best_i = pick(previous)
            live = g * SUBLANES + u < count
            best_v = jnp.where(live, best_v, _NEG_INF)
            best_i = jnp.where(live, best_i, _NO_ID)
            out_v = jnp.where(rows_iota == u, best_v, out_v)
            out_i = jnp.where(rows_iota == u, best_i, out_i)
            previous = (best_v, best_i)
        start = pl.multiple_of(g * SUBLANES, SUBLANES)
        ids_out_ref[pl.ds(start, SUBLANES), :] = out_i
        if scores_out_ref is not None:
            scores_out_ref[pl.ds(start, SUBLANES), :] = out_v
        return previous

    start = (
        jnp.full((1, LANES), float("inf"), jnp.float32),
        jnp.full((1, LANES), -1, jnp.int32),
    )
    lax.fori_loop(0, count_pad // SUBLANES, group, start)


# --------------------------------------------------------------------------------------------------
# Helpers


def _chunk_rows(rows: int) -> int:
    """The largest multiple of 8 ≤ CHUNK_ROWS dividing `rows` (a multiple of 8)."""
    return max(c for c in range(SUBLANES, CHUNK_ROWS + 1, SUBLANES) if rows % c == 0)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _compiler_params(dimension_semantics, interpret):
    """Mosaic's grid semantics; none in the interpreter, whose vmap of a pallas_call (heads) keeps
    the semantics of the unbatched grid and then fails on the extra grid dim (jax 0.10.2)."""
    if interpret:
        return None
    return pltpu.CompilerParams(dimension_semantics=dimension_semantics)


def _interpret_params(interpret):
    """pallas_call's `interpret` for Mosaic TPU: False, or an InterpretParams (True → defaults)."""
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret or False
