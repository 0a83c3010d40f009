"""Selection code shared by the score-and-select ops (`retrieval_topk`, `product_key_topk`).

Both keep `k` candidates per side, score the k × k candidate grid and keep its best `m` cells; they
differ in how a cell is scored (a Tucker form R C Qᵀ, or the sum of two half scores).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Selection decides which rows a token reads: score in full fp32 on every platform (TPU's default
# fp32 matmul is a single bf16 pass, which would flip near-tied candidates).
PRECISION = lax.Precision.HIGHEST


def best_cells(
    grid: jax.Array, cand_row: jax.Array, cand_col: jax.Array, n_keys: int, topk: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The `topk` best cells of each token's candidate grid.

    grid: [T, k, k] scores (no gradient needed); cand_row, cand_col: [T, k] key ids per side.
    Returns grid_indices [T, m] int32 = row key · n_keys + column key, by descending score, and the
    cells' candidate positions best_i, best_j [T, m].
    """
    n_tokens, rc_topk = cand_row.shape
    _, best = lax.top_k(grid.reshape(n_tokens, rc_topk * rc_topk), topk)  # [T, m], descending
    best_i, best_j = best // rc_topk, best % rc_topk
    grid_indices = (
        jnp.take_along_axis(cand_row, best_i, axis=1) * n_keys
        + jnp.take_along_axis(cand_col, best_j, axis=1)
    ).astype(jnp.int32)
    return grid_indices, best_i, best_j


def pick_candidates(best: jax.Array, candidates: jax.Array) -> jax.Array:
    """best: [T, m] positions in [0, k); candidates: [T, ..., k] → [T, m, ...] fp32.

    Several cells share a row (or a column) candidate, so this is a one-hot matmul: its backward is
    a matmul too, where an indexed gather would scatter-add colliding values in a backend-dependent
    order.
    """
    one_hot = jax.nn.one_hot(best, candidates.shape[-1], dtype=jnp.float32)
    return jnp.einsum(
        "tmi,t...i->tm...", one_hot, candidates.astype(jnp.float32), precision=PRECISION
    )


def check_selection_sizes(n_keys: int, rc_topk: int, topk: int) -> None:
    """ValueError unless 1 ≤ rc_topk ≤ n_keys, 1 ≤ topk ≤ rc_topk² and n_keys² fits int32."""
    if not 1 <= rc_topk <= n_keys:
        raise ValueError(f"rc_topk must be in [1, keys per side={n_keys}]; got {rc_topk}")
    if not 1 <= topk <= rc_topk * rc_topk:
        raise ValueError(f"topk must be in [1, rc_topk²={rc_topk * rc_topk}]; got {topk}")
    if n_keys * n_keys > jnp.iinfo(jnp.int32).max:
        raise ValueError(f"{n_keys}² grid cells overflow the int32 grid index")
