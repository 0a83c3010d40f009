"""Pallas Triton selection kernels for `retrieval_topk` and `product_key_topk` (GPU).

    cand_row, cand_col, r_cand, q_cand = stage1(q_row, q_col, k_row, k_col, w_row, w_col,
                                                rc_topk=k)
    best_i, best_j = stage2(r_cand, q_cand, core_sum, topk=m)

The `umv2_jax.ops.selection.SelectionKernels` contract (read its docstring). Plain-JAX equivalent:

    s = jnp.einsum("tad,nad->tan", q, key, precision=HIGHEST)           # per side, fp32
    _, cand = lax.top_k(jnp.einsum("a,tan->tn", w, s), k)               # stage 1
    r_cand = jnp.take_along_axis(s, cand[:, None, :], 2)                # [T, r, k]
    total = jnp.einsum("tai,ab,tbj->tij", r_cand, core_sum, q_cand)     # stage 2 (None: r + q)
    _, best = lax.top_k(total.reshape(T, k * k), m); best_i, best_j = best // k, best % k

Stage 1, one program per block of `_T_BLOCK` tokens, both sides in the same program: the keys are
scored tile by tile (`_N_BLOCK` keys × `_D_BLOCK` features per fp32 IEEE dot, so D_k 48 … 512 and
any n fit on chip) and each score tile is merged into a running k-slot buffer by insertion: while
some row's best remaining tile score beats (score desc, id asc) that row's worst buffered key, it
replaces it. Tiles are visited in increasing key id, so "strictly beats" is the lowest-id tie rule,
and once the buffer is full few tile scores enter (the while loop exits early). The per-rank scores
of each buffered key ride along, so the op needs no dense [T, r, N]. A final k-step max-and-mask
orders the buffer. Nothing of size [T, n] is written to HBM.

Stage 2, one program per block of tokens: per token the k × k grid is never formed whole. Each row
i of the grid is recomputed on demand from the candidate scores (row_i = Σ_b p_b[i] q_b with
p_b = Σ_a core_sum[a, b] r_a); a k-vector holds each row's best remaining cell. m times: the best
row best (score desc, row asc) is emitted, and only that row is recomputed, keeping the cells that
come after the emitted one in (score desc, flat position asc) order. Cost O(k² + m·k) per token
instead of max-and-mask's O(m·k²); on-chip state is a few [T_block, k] tensors.

`lax.top_k`/`sort` do not lower in Triton kernels, so both selects are hand-written. Blocks are
powers of two; inputs are zero-padded in the wrapper (key ids ≥ n and candidates ≥ k are masked to
-inf inside). Choices were made by reasoning and cross-lowering (no GPU was available): see
DEVELOPERS.md for what to measure.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from umv2_jax.ops import registry
from umv2_jax.ops import retrieval_topk as _op  # noqa: F401  (declares the op)
from umv2_jax.ops.selection import (
    SelectionKernels,
    retrieval_kernel_implementation,
)

_T_BLOCK = 16  # tokens per program (Triton dots need ≥ 16 rows)
_N_BLOCK = 64  # keys per stage-1 score tile
_NUM_WARPS = 4
_NEG = float("-inf")
_BIG_ID = 2**30  # ids of empty buffer slots (above every key id; n² < 2^31 is checked by the op)


def _pow2(x: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(x) - 1).bit_length())


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _d_block(key_dim: int) -> int:
    return 64 if key_dim > 32 else _pow2(key_dim, 16)


# --------------------------------------------------------------------------------------------------
# Stage 1: score every key of both sides, keep the top k per side.


def stage1(
    q_row: jax.Array,
    q_col: jax.Array,
    k_row: jax.Array,
    k_col: jax.Array,
    w_row: jax.Array,
    w_col: jax.Array,
    *,
    rc_topk: int,
    interpret: bool = False,
    poison: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """q_*: [T, r, D_k]; k_*: [N, r, D_k]; w_*: [r] fp32.

    Returns cand_row, cand_col [T, k] int32 (descending Σ_a w_a <q[t, a], key[n, a]>, ties lowest
    id first) and r_cand, q_cand [T, r, k] fp32 (the per-rank scores of those keys).
    poison: outputs start as NaN / INT32_MIN buffers aliased to the kernel's outputs (tests).
    """
    n_tokens, rank, key_dim = q_row.shape
    n_keys = k_row.shape[0]
    k_pad = _pow2(rc_topk, 8)
    d_block = _d_block(key_dim)
    d_pad = _round_up(key_dim, d_block)
    t_pad = _round_up(max(n_tokens, 1), _T_BLOCK)
    n_pad = _round_up(n_keys, _N_BLOCK)
    w_pad = _pow2(rank, 2)

    def queries(q):  # [T, r, D_k] → [T_pad, r·D_pad] fp32
        q = jnp.pad(q.astype(jnp.float32), ((0, t_pad - n_tokens), (0, 0), (0, d_pad - key_dim)))
        return q.reshape(t_pad, rank * d_pad)

    def keys(k):
        k = jnp.pad(k.astype(jnp.float32), ((0, n_pad - n_keys), (0, 0), (0, d_pad - key_dim)))
        return k.reshape(n_pad, rank * d_pad)

    def weights(w):
        return jnp.pad(w.astype(jnp.float32), (0, w_pad - rank))

    kernel = functools.partial(
        _stage1_kernel,
        rank=rank,
        n_keys=n_keys,
        n_tiles=n_pad // _N_BLOCK,
        d_pad=d_pad,
        d_block=d_block,
        rc_topk=rc_topk,
        k_pad=k_pad,
    )
    q_spec = pl.BlockSpec((_T_BLOCK, rank * d_pad), lambda i: (i, 0))
    k_spec = pl.BlockSpec((n_pad, rank * d_pad), lambda i: (0, 0))
    w_spec = pl.BlockSpec((w_pad,), lambda i: (0,))
    id_spec = pl.BlockSpec((_T_BLOCK, k_pad), lambda i: (i, 0))
    score_spec = pl.BlockSpec((_T_BLOCK, rank * k_pad), lambda i: (i, 0))
    out_shape = [
        jax.ShapeDtypeStruct((t_pad, k_pad), jnp.int32),
        jax.ShapeDtypeStruct((t_pad, k_pad), jnp.int32),
        jax.ShapeDtypeStruct((t_pad, rank * k_pad), jnp.float32),
        jax.ShapeDtypeStruct((t_pad, rank * k_pad), jnp.float32),
    ]
    args = [
        queries(q_row),
        queries(q_col),
        keys(k_row),
        keys(k_col),
        weights(w_row),
        weights(w_col),
    ]
    in_specs = [q_spec, q_spec, k_spec, k_spec, w_spec, w_spec]
    aliases = {}
    if poison:
        aliases = {len(args) + o: o for o in range(4)}
        args += [_poison(s.shape, s.dtype) for s in out_shape]
        in_specs += [id_spec, id_spec, score_spec, score_spec]
        kernel = _ignoring_aliased(kernel, 6, 4)
    cand_row, cand_col, s_row, s_col = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(t_pad // _T_BLOCK,),
        in_specs=in_specs,
        out_specs=[id_spec, id_spec, score_spec, score_spec],
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="retrieval_stage1",
    )(*args)

    def scores(s):  # [T_pad, r·K] → [T, r, k]
        return s.reshape(t_pad, rank, k_pad)[:n_tokens, :, :rc_topk]

    return (
        cand_row[:n_tokens, :rc_topk],
        cand_col[:n_tokens, :rc_topk],
        scores(s_row),
        scores(s_col),
    )


def _stage1_kernel(
    q_row_ref,
    q_col_ref,
    k_row_ref,
    k_col_ref,
    w_row_ref,
    w_col_ref,
    cand_row_ref,
    cand_col_ref,
    s_row_ref,
    s_col_ref,
    *,
    rank,
    n_keys,
    n_tiles,
    d_pad,
    d_block,
    rc_topk,
    k_pad,
):
    sides = (
        (q_row_ref, k_row_ref, w_row_ref, cand_row_ref, s_row_ref),
        (q_col_ref, k_col_ref, w_col_ref, cand_col_ref, s_col_ref),
    )
    for q_ref, k_ref, w_ref, cand_ref, s_ref in sides:
        ids, per_rank = _select_side(
            q_ref,
            k_ref,
            w_ref,
            rank=rank,
            n_keys=n_keys,
            n_tiles=n_tiles,
            d_pad=d_pad,
            d_block=d_block,
            rc_topk=rc_topk,
            k_pad=k_pad,
        )
        cand_ref[...] = ids
        for a in range(rank):
            s_ref[:, pl.ds(a * k_pad, k_pad)] = per_rank[a]


def _select_side(q_ref, k_ref, w_ref, *, rank, n_keys, n_tiles, d_pad, d_block, rc_topk, k_pad):
    """([T_blk, K] ids, r × [T_blk, K] per-rank scores) of one side's top k, ordered."""
    shape = (_T_BLOCK, k_pad)
    slot = lax.broadcasted_iota(jnp.int32, shape, 1)
    valid = slot < rc_topk  # slots ≥ k are never used
    col = lax.broadcasted_iota(jnp.int32, (_T_BLOCK, _N_BLOCK), 1)
    w = [w_ref[a] for a in range(rank)]

    def tile_scores(tile):
        """r × [T_blk, N_blk] per-rank scores and the combined score (-inf past n)."""
        start = pl.multiple_of(tile * _N_BLOCK, _N_BLOCK)
        per_rank = []
        for a in range(rank):
            acc = jnp.zeros((_T_BLOCK, _N_BLOCK), jnp.float32)
            for d in range(0, d_pad, d_block):
                q = q_ref[:, pl.ds(a * d_pad + d, d_block)]  # [T_blk, D_blk]
                k = k_ref[pl.ds(start, _N_BLOCK), pl.ds(a * d_pad + d, d_block)]  # [N_blk, D_blk]
                acc += lax.dot_general(
                    q,
                    k,
                    (((1,), (1,)), ((), ())),
                    precision=lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32,
                )
            per_rank.append(acc)
        total = per_rank[0] * w[0]
        for a in range(1, rank):
            total = total + per_rank[a] * w[a]
        ids = start + col
        return per_rank, jnp.where(ids < n_keys, total, _NEG), ids

    def worst(buf_s, buf_id):
        """Per row: the buffered key ranked last (score asc, id desc) and its slot."""
        ws = jnp.min(jnp.where(valid, buf_s, jnp.inf), axis=1)
        wid = jnp.max(jnp.where(valid & (buf_s == ws[:, None]), buf_id, -1), axis=1)
        return ws, wid, buf_id == wid[:, None]  # ids are unique per row: one slot

    def best(total, ids):
        bs = jnp.max(total, axis=1)
        bid = jnp.min(jnp.where(total == bs[:, None], ids, _BIG_ID), axis=1)
        return bs, bid

    def beats(bs, bid, ws, wid):
        return (bs > _NEG) & ((bs > ws) | ((bs == ws) & (bid < wid)))

    def merge_tile(tile, buffers):
        buf_s, buf_id, buf_p = buffers
        per_rank, total, ids = tile_scores(tile)

        def state_beats(total, buf_s, buf_id):
            bs, bid = best(total, ids)
            ws, wid, _ = worst(buf_s, buf_id)
            return jnp.max(beats(bs, bid, ws, wid).astype(jnp.int32)) > 0

        def insert(state):
            total, buf_s, buf_id, buf_p, _ = state
            bs, bid = best(total, ids)
            ws, wid, at_worst = worst(buf_s, buf_id)
            enter = beats(bs, bid, ws, wid)[:, None]
            chosen = ids == bid[:, None]  # [T_blk, N_blk]
            put = enter & at_worst  # [T_blk, K]
            buf_s = jnp.where(put, bs[:, None], buf_s)
            buf_id = jnp.where(put, bid[:, None], buf_id)
            buf_p = tuple(
                jnp.where(put, jnp.sum(jnp.where(chosen, p, 0.0), axis=1)[:, None], bp)
                for p, bp in zip(per_rank, buf_p, strict=True)
            )
            total = jnp.where(enter & chosen, _NEG, total)
            return total, buf_s, buf_id, buf_p, state_beats(total, buf_s, buf_id)

        state = (total, buf_s, buf_id, buf_p, state_beats(total, buf_s, buf_id))
        _, buf_s, buf_id, buf_p, _ = lax.while_loop(lambda s: s[-1], insert, state)
        return buf_s, buf_id, buf_p

    empty = (
        jnp.full(shape, _NEG, jnp.float32),
        _BIG_ID + slot,
        tuple(jnp.zeros(shape, jnp.float32) for _ in range(rank)),
    )
    buf_s, buf_id, buf_p = lax.fori_loop(0, n_tiles, merge_tile, empty)

    def emit(i, state):
        """Moves the best remaining buffered key (score desc, id asc) to output slot i."""
        left, out_id, out_p = state
        bs = jnp.max(jnp.where(left, buf_s, _NEG), axis=1)
        bid = jnp.min(jnp.where(left & (buf_s == bs[:, None]), buf_id, 2**31 - 1), axis=1)
        at = left & (buf_id == bid[:, None])
        here = slot == i
        out_id = jnp.where(here, bid[:, None], out_id)
        out_p = tuple(
            jnp.where(here, jnp.sum(jnp.where(at, bp, 0.0), axis=1)[:, None], op)
            for bp, op in zip(buf_p, out_p, strict=True)
        )
        return left & ~at, out_id, out_p

    out = (valid, jnp.zeros(shape, jnp.int32), tuple(jnp.zeros(shape, jnp.float32) for _ in buf_p))
    _, out_id, out_p = lax.fori_loop(0, rc_topk, emit, out)
    return out_id, out_p


# --------------------------------------------------------------------------------------------------
# Stage 2: the best m cells of the k × k candidate grid.


def stage2(
    r_cand: jax.Array,
    q_cand: jax.Array,
    core_sum: jax.Array | None,
    *,
    topk: int,
    interpret: bool = False,
    poison: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """r_cand, q_cand: [T, r, k] fp32; core_sum: [r, r] fp32, or None for the sum r + q (r = 1).

    Returns best_i, best_j [T, m] int32: candidate positions of the top-m cells of
    total[t, i, j] = Σ_ab r_cand[t, a, i] core_sum[a, b] q_cand[t, b, j], descending, ties lowest
    flat position i·k + j first.
    """
    n_tokens, rank, rc_topk = r_cand.shape
    k_pad = _pow2(rc_topk, 8)
    m_pad = _pow2(topk, 8)
    t_pad = _round_up(max(n_tokens, 1), _T_BLOCK)
    c_pad = _pow2(rank * rank, 2)

    def candidates(c):  # [T, r, k] → [T_pad, r·K]
        c = jnp.pad(c.astype(jnp.float32), ((0, t_pad - n_tokens), (0, 0), (0, k_pad - rc_topk)))
        return c.reshape(t_pad, rank * k_pad)

    product_key = core_sum is None
    if product_key:
        if rank != 1:
            raise ValueError(f"core_sum None (product keys) needs r = 1; got r = {rank}")
        core_sum = jnp.ones((1, 1), jnp.float32)
    core = jnp.pad(core_sum.astype(jnp.float32).reshape(-1), (0, c_pad - rank * rank))

    kernel = functools.partial(
        _stage2_kernel,
        rank=rank,
        rc_topk=rc_topk,
        k_pad=k_pad,
        topk=topk,
        product_key=product_key,
    )
    c_spec = pl.BlockSpec((_T_BLOCK, rank * k_pad), lambda i: (i, 0))
    core_spec = pl.BlockSpec((c_pad,), lambda i: (0,))
    out_spec = pl.BlockSpec((_T_BLOCK, m_pad), lambda i: (i, 0))
    out_shape = [jax.ShapeDtypeStruct((t_pad, m_pad), jnp.int32)] * 2
    args = [candidates(r_cand), candidates(q_cand), core]
    in_specs = [c_spec, c_spec, core_spec]
    aliases = {}
    if poison:
        aliases = {3: 0, 4: 1}
        args += [_poison(s.shape, s.dtype) for s in out_shape]
        in_specs += [out_spec, out_spec]
        kernel = _ignoring_aliased(kernel, 3, 2)
    best_i, best_j = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(t_pad // _T_BLOCK,),
        in_specs=in_specs,
        out_specs=[out_spec, out_spec],
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
        interpret=interpret,
        name="retrieval_stage2",
    )(*args)
    return best_i[:n_tokens, :topk], best_j[:n_tokens, :topk]


def _stage2_kernel(
    r_ref, q_ref, core_ref, best_i_ref, best_j_ref, *, rank, rc_topk, k_pad, topk, product_key
):
    shape = (_T_BLOCK, k_pad)
    pos = lax.broadcasted_iota(jnp.int32, shape, 1)
    inside = pos < rc_topk
    r = [r_ref[:, pl.ds(a * k_pad, k_pad)] for a in range(rank)]
    q = [q_ref[:, pl.ds(b * k_pad, k_pad)] for b in range(rank)]
    if product_key:
        p = r
    else:
        core = [[core_ref[a * rank + b] for b in range(rank)] for a in range(rank)]
        p = []  # p_b[t, i] = Σ_a r_a[t, i] core[a][b]
        for b in range(rank):
            acc = r[0] * core[0][b]
            for a in range(1, rank):
                acc = acc + r[a] * core[a][b]
            p.append(acc)

    def row(i):
        """total[t, i[t], :] as [T_blk, K] (-inf past k); i: [T_blk] int32."""
        at = pos == i[:, None]
        p_i = [jnp.sum(jnp.where(at, pb, 0.0), axis=1)[:, None] for pb in p]
        if product_key:
            values = p_i[0] + q[0]
        else:
            values = p_i[0] * q[0]
            for b in range(1, rank):
                values = values + p_i[b] * q[b]
        return jnp.where(inside, values, _NEG)

    def first_max(values, after=None):
        """Per row of values [T_blk, K]: (max, lowest position holding it)."""
        v = jnp.max(values, axis=1)
        j = jnp.min(jnp.where(values == v[:, None], pos, k_pad), axis=1)
        return v, j

    def init_row(i, state):
        best_v, best_j = state
        v, j = first_max(row(jnp.full((_T_BLOCK,), i, jnp.int32)))
        here = pos == i
        return jnp.where(here, v[:, None], best_v), jnp.where(here, j[:, None], best_j)

    row_best = lax.fori_loop(
        0,
        rc_topk,
        init_row,
        (jnp.full(shape, _NEG, jnp.float32), jnp.zeros(shape, jnp.int32)),
    )

    def emit(t, state):
        best_v, best_j = state
        v, i = first_max(best_v)  # the best row best: score desc, row asc
        at_i = pos == i[:, None]
        j = jnp.sum(jnp.where(at_i, best_j, 0), axis=1)
        best_i_ref[:, pl.ds(t, 1)] = i[:, None]
        best_j_ref[:, pl.ds(t, 1)] = j[:, None]
        # Row i's next cell: the best one after (v, j) in (score desc, position asc) order.
        values = row(i)
        later = (values < v[:, None]) | ((values == v[:, None]) & (pos > j[:, None]))
        nv, nj = first_max(jnp.where(later, values, _NEG))
        return jnp.where(at_i, nv[:, None], best_v), jnp.where(at_i, nj[:, None], best_j)

    lax.fori_loop(0, topk, emit, row_best)


# --------------------------------------------------------------------------------------------------
# Helpers and registration


def _poison(shape, dtype):
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.full(shape, jnp.nan, dtype)
    return jnp.full(shape, jnp.iinfo(dtype).min, dtype)


def _ignoring_aliased(kernel, n_inputs, n_aliased):
    """kernel(*inputs, *outputs) called as (*inputs, *aliased_inputs, *outputs)."""

    def wrapped(*refs):
        return kernel(*refs[:n_inputs], *refs[n_inputs + n_aliased :])

    return wrapped


KERNELS = SelectionKernels(stage1=stage1, stage2=stage2)

registry.register_implementation(
    "retrieval_topk",
    "pallas",
    retrieval_kernel_implementation(KERNELS),
    platforms=("cuda", "rocm"),
)
