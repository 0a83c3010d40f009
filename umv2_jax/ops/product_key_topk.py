"""Product-key selection (Lample et al. 2019, §3.2): the PKM / Memory+ / PEER score-and-select op.

    rows, scores = product_key_topk(q_row, q_col, k_row, k_col, rc_topk=k, topk=m)

Per token, the score of grid cell (i, j) is the SUM of the half scores (eq. 2–4),

    s_ij = <q_row, K_row[i]> + <q_col, K_col[j]>,

so it is not the rank-1 Tucker case of `retrieval_topk` (a product R C Qᵀ); the two share the
candidate-grid selection (`umv2_jax.ops.selection`). The `k` best keys per side are kept, the `m`
best of the k × k candidate cells are selected; with k ≥ m they are the exact top-m of the whole
n × n grid (the sum is monotone in each half). One head; the caller vmaps over heads.

Gradients: the choice carries none; the selected scores reach the queries and the selected keys
(every other key gets an exact zero), through one-hot matmuls (deterministic).

Implementations (`umv2_jax.ops.registry`): `xla` (below); Pallas kernels register from
`pallas_kernels.product_key_topk.{gpu,tpu}`. The XLA path goes through the tokens in chunks
(`selection.map_token_chunks`), so its [T, k, k] grid and [T, m, k] one-hot picks exist one chunk at
a time (1B/7B-like widths, T 4096, k = m = 128, forward + backward on XLA:CPU: 536 MiB of
temporaries in one pass, 43 MiB chunked; `benchmarks/selection_transients.py`).

Under a mesh (`umv2_jax.parallel.use_mesh`) the op runs token-local (`token_local`): one shard_map
over the batch axes, so no score is all-gathered across data-parallel devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from umv2_jax.ops import registry
from umv2_jax.ops.selection import (
    PRECISION,
    best_cells,
    check_finite_queries,
    check_selection_sizes,
    map_token_chunks,
    name_selected,
    pick_candidates,
    token_chunk_for,
)


def product_key_topk(
    q_row: jax.Array,
    q_col: jax.Array,
    k_row: jax.Array,
    k_col: jax.Array,
    *,
    rc_topk: int,
    topk: int,
    implementation: registry.Implementation = "auto",
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """q_row, q_col: [T, D_k] sub-queries; k_row, k_col: [n, D_k] sub-keys.

    rc_topk: k candidates per side (k ≤ n); topk: m cells kept (m ≤ k²).
    Returns rows [T, m] int32 = i·n + j by descending score and scores [T, m] fp32 (differentiable).
    """
    _check_inputs(q_row, q_col, k_row, k_col, rc_topk, topk)

    def run(q_row, q_col, k_row, k_col):
        return registry.call(
            "product_key_topk",
            q_row,
            q_col,
            k_row,
            k_col,
            implementation=implementation,
            interpret=interpret,
            rc_topk=rc_topk,
            topk=topk,
        )

    return token_local(run, q_row.shape[0])(q_row, q_col, k_row, k_col)


def token_local(run, n_tokens: int):
    """`run(q_row, q_col, k_row, k_col)` on each device's own tokens when a mesh is active
    (`umv2_jax.parallel.mesh.token_local`): queries split over the batch axes, keys replicated, so no
    score or candidate is gathered across them; the keys' gradient is summed by the transpose."""
    from umv2_jax.parallel.mesh import token_local as local  # lazy: parallel imports the config

    return local(run, n_tokens, n_split=2, n_outputs=2)


def product_key_topk_reference(
    q_row: jax.Array,
    q_col: jax.Array,
    k_row: jax.Array,
    k_col: jax.Array,
    *,
    rc_topk: int,
    topk: int,
) -> tuple[jax.Array, jax.Array]:
    """The test oracle: token by token, stable argsorts and plain indexing, in fp32."""
    _check_inputs(q_row, q_col, k_row, k_col, rc_topk, topk)
    f32 = jnp.float32
    n_keys = k_row.shape[0]

    def one_token(qr, qc):
        s_row = jnp.dot(k_row.astype(f32), qr.astype(f32), precision=PRECISION)  # [n]
        s_col = jnp.dot(k_col.astype(f32), qc.astype(f32), precision=PRECISION)
        cand_row = jnp.argsort(-lax.stop_gradient(s_row), stable=True)[:rc_topk]
        cand_col = jnp.argsort(-lax.stop_gradient(s_col), stable=True)[:rc_topk]
        grid = s_row[cand_row][:, None] + s_col[cand_col][None, :]  # [k, k]
        best = jnp.argsort(-lax.stop_gradient(grid).reshape(-1), stable=True)[:topk]
        i, j = best // rc_topk, best % rc_topk
        rows = (cand_row[i] * n_keys + cand_col[j]).astype(jnp.int32)
        return rows, grid[i, j]

    return jax.vmap(one_token)(q_row, q_col)


def _product_key_topk_xla(
    q_row, q_col, k_row, k_col, *, rc_topk, topk, interpret=False, token_chunk=None
):
    """The XLA path, `token_chunk` tokens at a time (default: as many as fit
    `selection.TRANSIENT_BYTES` of candidate grid, one-hot picks and dense scores)."""
    del interpret
    n_tokens, n_keys = q_row.shape[0], k_row.shape[0]
    per_token = 4 * (2 * n_keys + rc_topk * rc_topk + 2 * topk * rc_topk)
    chunk = token_chunk or token_chunk_for(n_tokens, per_token)

    def body(q_row, q_col):
        return _product_key_chunk(q_row, q_col, k_row, k_col, rc_topk=rc_topk, topk=topk)

    return map_token_chunks(body, (q_row, q_col), chunk)


def _product_key_chunk(q_row, q_col, k_row, k_col, *, rc_topk, topk):
    """Scores and selection for a chunk of tokens (every token independent of the others)."""
    f32 = jnp.float32
    s_row = jnp.einsum("td,nd->tn", q_row, k_row, precision=PRECISION).astype(f32)
    s_col = jnp.einsum("td,nd->tn", q_col, k_col, precision=PRECISION).astype(f32)
    _, cand_row = lax.top_k(lax.stop_gradient(s_row), rc_topk)  # [T, k]
    _, cand_col = lax.top_k(lax.stop_gradient(s_col), rc_topk)
    cand_row, cand_col = name_selected(cand_row, cand_col)
    # Candidates are distinct within a token, so this gather's backward never collides.
    r_cand = jnp.take_along_axis(s_row, cand_row, axis=1)  # [T, k]
    c_cand = jnp.take_along_axis(s_col, cand_col, axis=1)
    grid = lax.stop_gradient(r_cand[:, :, None] + c_cand[:, None, :])  # [T, k, k]
    rows, best_i, best_j = name_selected(
        *best_cells(grid, cand_row, cand_col, k_row.shape[0], topk)
    )
    scores = pick_candidates(best_i, r_cand) + pick_candidates(best_j, c_cand)
    return rows, scores


def _check_inputs(q_row, q_col, k_row, k_col, rc_topk, topk) -> None:
    if q_row.ndim != 2 or q_col.shape != q_row.shape:
        raise ValueError(f"q_row and q_col must both be [T, D_k]; got {q_row.shape}, {q_col.shape}")
    if k_row.ndim != 2 or k_col.shape != k_row.shape or k_row.shape[1] != q_row.shape[1]:
        raise ValueError(
            f"k_row and k_col must both be [n, D_k={q_row.shape[1]}]; got {k_row.shape}, "
            f"{k_col.shape}"
        )
    check_selection_sizes(k_row.shape[0], rc_topk, topk)
    check_finite_queries(q_row=q_row, q_col=q_col)


registry.declare_op("product_key_topk", _product_key_topk_xla)
