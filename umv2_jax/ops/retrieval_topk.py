"""Tucker-decomposed query-key retrieval: score the keys and select the memory slots (docs/model.md §2, steps 3–5).

    retrieval_topk(q_row, q_col, k_row, k_col, cores, u_star, t_star, rc_topk=k, topk=m)
        → grid_indices [T, m] int32, core_scores [T, m, C]

Stage 1 scores every row key and every column key with the rank-1 approximation (u*, t*) of the core sum
and keeps the best `rc_topk` per side; stage 2 scores the k × k candidate grid exactly with every core
and keeps the best `topk` cells by their summed score. One head; the caller vmaps or loops over heads.

Gradients: the selection is made on stop_gradient'ed scores and carries no gradient. The per-core scores
of the selected cells are then re-expressed from differentiable per-rank scores, so autodiff reaches the
queries, the keys that were selected (every other key gets an exact zero) and the cores.

Transients: the XLA path goes through the tokens in chunks (`selection.map_token_chunks`, sized by
`selection.TRANSIENT_BYTES`), so the [T, k, k] candidate grid, the [T, m, k] one-hot picks and the
dense [T, r, N] scores exist one chunk at a time, forward and backward (the 1B/7B shape, T 4096,
k = m = 128, on XLA:CPU: 609 MiB of temporaries in one pass, 53 MiB chunked, per head;
`benchmarks/selection_transients.py`). Under a mesh the memory layer already calls this op on each
device's own tokens (`umv2_jax.parallel.memory`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from umv2_jax.ops import registry
from umv2_jax.ops.selection import PRECISION as _PRECISION
from umv2_jax.ops.selection import (
    best_cells,
    check_finite_queries,
    check_selection_sizes,
    map_token_chunks,
    name_selected,
    pick_candidates,
    token_chunk_for,
)


def retrieval_topk(
    q_row: jax.Array,
    q_col: jax.Array,
    k_row: jax.Array,
    k_col: jax.Array,
    cores: jax.Array,
    u_star: jax.Array,
    t_star: jax.Array,
    *,
    rc_topk: int,
    topk: int,
    implementation: registry.Implementation = "auto",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Selects `topk` memory slots per token by two-stage Tucker retrieval (TDQKR).

    q_row, q_col: [T, r, D_k]  normalized row / column sub-queries, one per Tucker rank.
    k_row, k_col: [N, r, D_k]  normalized row / column keys (N keys per side, key_expand included).
    cores:        [C, r, r]    the Tucker cores C^c.
    u_star:       [r]          leading left singular vector of Σ_c C^c, sign-fixed; no gradient.
    t_star:       [r]          leading right singular vector.
    rc_topk:      k, candidates kept per side in stage 1 (k ≤ N).
    topk:         m, slots kept per token in stage 2 (m ≤ k²).

    Returns grid_indices [T, m] int32 = I_row·N + I_col, ordered by descending total score Σ_c s^c,
    and core_scores [T, m, C] = s^c = R C^c Qᵀ at the selected cells (differentiable).
    Plain-JAX equivalent (one token, stage 2): see `retrieval_topk_reference`.
    """
    _check_inputs(q_row, q_col, k_row, k_col, cores, u_star, t_star, rc_topk, topk)
    return registry.call(
        "retrieval_topk",
        q_row,
        q_col,
        k_row,
        k_col,
        cores,
        u_star,
        t_star,
        implementation=implementation,
        interpret=interpret,
        rc_topk=rc_topk,
        topk=topk,
    )


def retrieval_topk_reference(
    q_row: jax.Array,
    q_col: jax.Array,
    k_row: jax.Array,
    k_col: jax.Array,
    cores: jax.Array,
    u_star: jax.Array,
    t_star: jax.Array,
    *,
    rc_topk: int,
    topk: int,
) -> tuple[jax.Array, jax.Array]:
    """The test oracle: docs/model.md §2 steps 3–5 written out token by token, with argsort instead of top_k.

    Same contract as `retrieval_topk`. Slow and memory-hungry (it keeps every core's k × k grid);
    differentiable through plain indexing of the per-rank score matrices.
    """
    _check_inputs(q_row, q_col, k_row, k_col, cores, u_star, t_star, rc_topk, topk)
    f32 = jnp.float32
    n_keys = k_row.shape[0]
    cores32 = cores.astype(f32)

    def one_token(qr, qc):
        # qr, qc: [r, D_k]; per-rank scores S[a, i] (docs/model.md §2 step 3).
        s_row = jnp.einsum("ad,nad->an", qr.astype(f32), k_row.astype(f32), precision=_PRECISION)
        s_col = jnp.einsum("ad,nad->an", qc.astype(f32), k_col.astype(f32), precision=_PRECISION)
        # Stage 1 (step 4): rank-1 scores, best k per side.
        rank1_row = lax.stop_gradient(u_star.astype(f32) @ s_row)
        rank1_col = lax.stop_gradient(t_star.astype(f32) @ s_col)
        cand_row = jnp.argsort(-rank1_row, stable=True)[:rc_topk]
        cand_col = jnp.argsort(-rank1_col, stable=True)[:rc_topk]
        # Stage 2 (step 5): G^c = R C^c Qᵀ on the k × k grid, R = S_row[:, I_row]ᵀ.
        r = s_row[:, cand_row].T  # [k, r]
        q = s_col[:, cand_col].T
        grids = jnp.stack([r @ cores32[c] @ q.T for c in range(cores.shape[0])])  # [C, k, k]
        total = lax.stop_gradient(grids.sum(0)).reshape(-1)
        best = jnp.argsort(-total, stable=True)[:topk]
        i, j = best // rc_topk, best % rc_topk
        grid_indices = cand_row[i] * n_keys + cand_col[j]
        return grid_indices.astype(jnp.int32), grids[:, i, j].T  # [m], [m, C]

    grid_indices, core_scores = jax.vmap(one_token)(q_row, q_col)
    return grid_indices, core_scores.astype(_score_dtype(q_row, q_col, k_row, k_col, cores))


def _retrieval_topk_xla(
    q_row,
    q_col,
    k_row,
    k_col,
    cores,
    u_star,
    t_star,
    *,
    rc_topk,
    topk,
    interpret=False,
    token_chunk=None,
):
    """The XLA path, `token_chunk` tokens at a time (default: as many as fit
    `selection.TRANSIENT_BYTES` of candidate grid, one-hot picks and dense scores)."""
    del interpret
    n_tokens, rank, _ = q_row.shape
    n_keys = k_row.shape[0]
    per_token = 4 * (2 * rank * n_keys + rc_topk * rc_topk + 2 * topk * rc_topk)
    chunk = token_chunk or token_chunk_for(n_tokens, per_token)

    def body(q_row, q_col):
        return _retrieval_chunk(
            q_row, q_col, k_row, k_col, cores, u_star, t_star, rc_topk=rc_topk, topk=topk
        )

    return map_token_chunks(body, (q_row, q_col), chunk)


def _retrieval_chunk(q_row, q_col, k_row, k_col, cores, u_star, t_star, *, rc_topk, topk):
    """Steps 3–5 for a chunk of tokens (every token independent of the others)."""
    f32 = jnp.float32
    n_keys = k_row.shape[0]

    # Step 3, differentiable: [T, r, N]. Its backward is two dense matmuls (deterministic, and far
    # fewer bytes than gathering the k selected keys per token: N·r scores vs k·r·D_k key entries).
    s_row = _per_rank_scores(q_row, k_row)
    s_col = _per_rank_scores(q_col, k_col)

    # Step 4: stage-1 candidates from the rank-1 scores, on stop_gradient'ed inputs.
    rank1_row = jnp.einsum("a,tan->tn", u_star.astype(f32), lax.stop_gradient(s_row))
    rank1_col = jnp.einsum("a,tan->tn", t_star.astype(f32), lax.stop_gradient(s_col))
    _, cand_row = lax.top_k(rank1_row, rc_topk)  # [T, k]
    _, cand_col = lax.top_k(rank1_col, rc_topk)
    cand_row, cand_col = name_selected(cand_row, cand_col)

    # R[t, a, i] = S_row[t, a, I_row[t, i]]. Candidates are distinct within a token, so the backward
    # scatter of this gather never adds two values into one address (deterministic on every backend).
    r_cand = jnp.take_along_axis(s_row, cand_row[:, None, :], axis=2)  # [T, r, k]
    q_cand = jnp.take_along_axis(s_col, cand_col[:, None, :], axis=2)

    # Step 5: the summed grid Σ_c G^c = R (Σ_c C^c) Qᵀ decides the selection.
    core_sum = lax.stop_gradient(cores.astype(f32).sum(0))
    total = jnp.einsum(
        "tai,ab,tbj->tij",
        lax.stop_gradient(r_cand),
        core_sum,
        lax.stop_gradient(q_cand),
        precision=_PRECISION,
    )
    grid_indices, best_i, best_j = name_selected(
        *best_cells(total, cand_row, cand_col, n_keys, topk)
    )

    # Per-core scores of the selected cells, s^c = R[i] C^c Q[j]ᵀ.
    r_sel = pick_candidates(best_i, r_cand)  # [T, m, r]
    q_sel = pick_candidates(best_j, q_cand)
    core_scores = jnp.einsum(
        "tma,cab,tmb->tmc", r_sel, cores.astype(f32), q_sel, precision=_PRECISION
    )
    return grid_indices, core_scores.astype(_score_dtype(q_row, q_col, k_row, k_col, cores))


def _per_rank_scores(queries: jax.Array, keys: jax.Array) -> jax.Array:
    """S[t, a, n] = <queries[t, a], keys[n, a]> in fp32. queries [T, r, D_k], keys [N, r, D_k]."""
    return jnp.einsum(
        "tad,nad->tan",
        queries,
        keys,
        precision=_PRECISION,
        preferred_element_type=jnp.float32,
    )


def _score_dtype(*arrays: jax.Array):
    return jnp.result_type(*(a.dtype for a in arrays))


def _check_inputs(q_row, q_col, k_row, k_col, cores, u_star, t_star, rc_topk, topk) -> None:
    if q_row.ndim != 3 or q_col.shape != q_row.shape:
        raise ValueError(
            f"q_row and q_col must both be [T, r, D_k]; got {q_row.shape} and {q_col.shape}"
        )
    _, rank, key_dim = q_row.shape
    if k_row.ndim != 3 or k_col.shape != k_row.shape or k_row.shape[1:] != (rank, key_dim):
        raise ValueError(
            f"k_row and k_col must both be [N, r={rank}, D_k={key_dim}]; "
            f"got {k_row.shape} and {k_col.shape}"
        )
    if cores.ndim != 3 or cores.shape[1:] != (rank, rank):
        raise ValueError(f"cores must be [C, r={rank}, r={rank}]; got {cores.shape}")
    if u_star.shape != (rank,) or t_star.shape != (rank,):
        raise ValueError(
            f"u_star and t_star must be [r={rank}]; got {u_star.shape} and {t_star.shape}"
        )
    check_selection_sizes(k_row.shape[0], rc_topk, topk)
    check_finite_queries(q_row=q_row, q_col=q_col)


registry.declare_op("retrieval_topk", _retrieval_topk_xla)
