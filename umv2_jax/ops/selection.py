"""Selection code shared by the score-and-select ops (`retrieval_topk`, `product_key_topk`).

Both keep `k` candidates per side, score the k × k candidate grid and keep its best `m` cells; they
differ in how a cell is scored (a Tucker form R C Qᵀ, or the sum of two half scores).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

# Selection decides which rows a token reads: score in full fp32 on every platform (TPU's default
# fp32 matmul is a single bf16 pass, which would flip near-tied candidates).
PRECISION = lax.Precision.HIGHEST

# The XLA paths hold at most about this many bytes of per-token transients (candidate grid,
# one-hot picks, dense scores) per head at a time: tokens go through in chunks (`map_token_chunks`).
TRANSIENT_BYTES = 64 * 2**20
# Name of the selection's integer results inside a chunk: kept for the backward, which recomputes
# the cheap differentiable scores of its chunk instead of storing them for every token.
SELECTED = "umv2_selected_candidates"


def token_chunk_for(n_tokens: int, per_token_bytes: int, budget: int = TRANSIENT_BYTES) -> int:
    """Tokens per chunk: the largest power of two whose transients fit `budget` (at least 8), or
    all `n_tokens` when they fit."""
    fit = max(1, budget // max(1, per_token_bytes))
    if fit >= n_tokens:
        return n_tokens
    return max(8, 1 << (fit.bit_length() - 1))


def map_token_chunks(body: Callable[..., Any], tokens: tuple[jax.Array, ...], chunk: int) -> Any:
    """`body(*tokens)` computed `chunk` tokens at a time: bounded transients, the same results up to
    fp32 rounding (XLA:CPU's dot rounds differently for a different number of rows: measured ≤ 1e-6
    relative on the scores; the selections agree unless two candidates tie within that).

    tokens: arrays whose leading dim is the T tokens; body maps [c, ...] chunks to a pytree of
    [c, ...] arrays and must treat tokens independently. With T ≤ chunk it is just `body(*tokens)`.
    Otherwise T is zero-padded to a multiple of `chunk`, chunks run under `lax.map`, and the
    padding is cut from the results. Each chunk is a `jax.checkpoint` that saves only the values
    named `SELECTED` (integer candidate ids), so the backward also holds one chunk's transients.
    Plain-JAX equivalent: `body(*tokens)`.
    """
    n_tokens = tokens[0].shape[0]
    if chunk >= n_tokens:
        return body(*tokens)
    n_chunks = -(-n_tokens // chunk)
    pad = n_chunks * chunk - n_tokens

    def split(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(n_chunks, chunk, *x.shape[1:])

    one_chunk = jax.checkpoint(
        lambda xs: body(*xs),
        policy=jax.checkpoint_policies.save_only_these_names(SELECTED),
        prevent_cse=False,
    )
    out = lax.map(one_chunk, tuple(split(x) for x in tokens))
    return jax.tree.map(lambda y: y.reshape(n_chunks * chunk, *y.shape[2:])[:n_tokens], out)


def name_selected(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """The arrays tagged `SELECTED` (see `map_token_chunks`); values unchanged."""
    return tuple(checkpoint_name(a, SELECTED) for a in arrays)


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


def check_finite_queries(**queries: jax.Array) -> None:
    """ValueError naming the argument when a concrete (not traced) query holds NaN or ±inf.

    Selection on a NaN score is undefined (every comparison is false), so eager calls fail here;
    traced values cannot be checked at trace time (wrap the caller in `jax.experimental.checkify`
    with float checks to catch them at run time).
    """
    for name, q in queries.items():
        if isinstance(q, jax.core.Tracer):
            continue
        bad = int(jnp.size(q) - jnp.sum(jnp.isfinite(q)))
        if bad:
            raise ValueError(
                f"{name} has {bad} non-finite entries of {jnp.size(q)}; selection needs finite "
                "queries (check the layer's inputs and normalization)"
            )


# --------------------------------------------------------------------------------------------------
# The kernel side of both ops: two selection kernels, and the differentiable op built around them.


@dataclasses.dataclass(frozen=True)
class SelectionKernels:
    """The two selection kernels a backend provides (Pallas GPU or TPU); neither carries gradients.

    stage1(q_row [T, r, D_k], q_col [T, r, D_k], k_row [N, r, D_k], k_col [N, r, D_k],
           w_row [r] f32, w_col [r] f32, *, rc_topk, interpret)
        → (cand_row [T, k] int32, cand_col [T, k] int32)
          or (cand_row, cand_col, r_cand [T, r, k] f32, q_cand [T, r, k] f32)
      The top-k key ids per side by Σ_a w_a <q[t, a], key[n, a]> (fp32, HIGHEST), descending; ties:
      lowest key id first. Plain JAX: `lax.top_k(jnp.einsum("a,tad,nad->tn", w, q, key), k)[1]`.
      The optional per-rank scores are <q[t, a], key[cand[t, i], a]> in fp32; returning them lets
      the op's forward skip the dense [T, r, N] score matrix.
    stage2(r_cand [T, r, k] f32, q_cand [T, r, k] f32, core_sum [r, r] f32 | None, *, topk,
           interpret)
        → (best_i [T, m] int32, best_j [T, m] int32)
      The top-m cells of total[t, i, j] = Σ_ab r_cand[t, a, i] core_sum[a, b] q_cand[t, b, j]
      (None: the product-key sum r_cand[t, 0, i] + q_cand[t, 0, j]), descending; ties: lowest flat
      position i·k + j first. Plain JAX: `lax.top_k(total.reshape(T, k * k), m)[1]` → (// k, % k).
    """

    stage1: Callable[..., Any]
    stage2: Callable[..., Any]


def retrieval_kernel_implementation(kernels: SelectionKernels) -> Callable[..., Any]:
    """The `retrieval_topk` implementation built on `kernels` (same contract as its XLA path).

    Selection runs in the kernels on stop_gradient'ed inputs; the selected per-core scores are
    re-expressed from differentiable per-rank candidate scores exactly as the XLA path does, so
    gradients reach the queries, the selected keys and the cores. The [T, k², C] (or [T, k²]) grid
    never exists outside the stage-2 kernel; the dense [T, r, N] score matrix exists only when
    stage 1 does not return the per-rank candidate scores (forward) and in the backward.
    """

    def retrieval_topk_kernels(
        q_row, q_col, k_row, k_col, cores, u_star, t_star, *, rc_topk, topk, interpret=False
    ):
        f32 = jnp.float32
        n_keys = k_row.shape[0]
        sg = lax.stop_gradient
        cand_row, cand_col, r_cand, q_cand = _candidates(
            kernels,
            q_row,
            q_col,
            k_row,
            k_col,
            sg(u_star).astype(f32),
            sg(t_star).astype(f32),
            rc_topk=rc_topk,
            interpret=interpret,
        )
        core_sum = sg(cores.astype(f32).sum(0))
        best_i, best_j = kernels.stage2(
            sg(r_cand), sg(q_cand), core_sum, topk=topk, interpret=interpret
        )
        grid_indices = _grid_indices(cand_row, cand_col, best_i, best_j, n_keys)
        r_sel = gather_candidates(best_i, r_cand)  # [T, m, r]
        q_sel = gather_candidates(best_j, q_cand)
        core_scores = jnp.einsum(
            "tma,cab,tmb->tmc", r_sel, cores.astype(f32), q_sel, precision=PRECISION
        )
        dtype = jnp.result_type(q_row, q_col, k_row, k_col, cores)
        return grid_indices, core_scores.astype(dtype)

    return retrieval_topk_kernels


def product_key_kernel_implementation(kernels: SelectionKernels) -> Callable[..., Any]:
    """The `product_key_topk` implementation built on `kernels`: the rank-1 case (r = 1, w = [1])
    with stage 2 scoring the sum of the half scores (core_sum None)."""

    def product_key_topk_kernels(q_row, q_col, k_row, k_col, *, rc_topk, topk, interpret=False):
        one = jnp.ones((1,), jnp.float32)
        cand_row, cand_col, r_cand, c_cand = _candidates(
            kernels,
            q_row[:, None, :],
            q_col[:, None, :],
            k_row[:, None, :],
            k_col[:, None, :],
            one,
            one,
            rc_topk=rc_topk,
            interpret=interpret,
        )
        sg = lax.stop_gradient
        best_i, best_j = kernels.stage2(
            sg(r_cand), sg(c_cand), None, topk=topk, interpret=interpret
        )
        rows = _grid_indices(cand_row, cand_col, best_i, best_j, k_row.shape[0])
        scores = (
            gather_candidates(best_i, r_cand)[..., 0] + gather_candidates(best_j, c_cand)[..., 0]
        )
        return rows, scores

    return product_key_topk_kernels


def gather_candidates(best: jax.Array, candidates: jax.Array) -> jax.Array:
    """best: [T, m] positions in [0, k); candidates: [T, r, k] → [T, m, r] fp32, differentiable.

    The values of `pick_candidates` (an exact gather, `jnp.take_along_axis(candidates,
    best[:, None, :], 2).transpose(0, 2, 1)`) without its [T, m, k] one-hot operand (6 GB at
    T 16384, m 768, k 128). The backward, dc[t, a, i] = Σ_m [best[t, m] = i] g[t, m, a], is a masked
    reduction that XLA fuses (no [T, m, k] buffer, no scatter-add: deterministic on every backend).
    """
    return _gather_candidates(best, candidates.astype(jnp.float32))


@jax.custom_vjp
def _gather_candidates(best, candidates):
    return jnp.take_along_axis(candidates, best[:, None, :], axis=2).transpose(0, 2, 1)


def _gather_candidates_fwd(best, candidates):
    return _gather_candidates(best, candidates), (best, candidates.shape[-1])


def _gather_candidates_bwd(residuals, g):
    best, k = residuals  # g: [T, m, r]
    hit = best[:, :, None] == jnp.arange(k, dtype=best.dtype)  # [T, m, k], fused into the sum
    grad = jnp.sum(jnp.where(hit[:, :, None, :], g[:, :, :, None], 0.0), axis=1)  # [T, r, k]
    return None, grad


_gather_candidates.defvjp(_gather_candidates_fwd, _gather_candidates_bwd)


def _grid_indices(cand_row, cand_col, best_i, best_j, n_keys):
    return (
        jnp.take_along_axis(cand_row, best_i, axis=1) * n_keys
        + jnp.take_along_axis(cand_col, best_j, axis=1)
    ).astype(jnp.int32)


def _candidates(kernels, q_row, q_col, k_row, k_col, w_row, w_col, *, rc_topk, interpret):
    """Stage 1 and the differentiable per-rank candidate scores r_cand, q_cand [T, r, k] fp32."""
    sg = lax.stop_gradient
    out = kernels.stage1(
        sg(q_row),
        sg(q_col),
        sg(k_row),
        sg(k_col),
        w_row,
        w_col,
        rc_topk=rc_topk,
        interpret=interpret,
    )
    if len(out) == 4:
        cand_row, cand_col, r_fwd, q_fwd = out
        r_cand = _scores_at(q_row, k_row, cand_row, sg(r_fwd))
        q_cand = _scores_at(q_col, k_col, cand_col, sg(q_fwd))
    else:
        cand_row, cand_col = out
        r_cand = _dense_scores_at(q_row, k_row, cand_row)
        q_cand = _dense_scores_at(q_col, k_col, cand_col)
    return cand_row, cand_col, r_cand, q_cand


def _per_rank_scores(queries, keys):
    """S[t, a, n] = <queries[t, a], keys[n, a]> in fp32 (the XLA path's step 3)."""
    return jnp.einsum(
        "tad,nad->tan", queries, keys, precision=PRECISION, preferred_element_type=jnp.float32
    )


def _dense_scores_at(queries, keys, cand):
    """[T, r, k]: the XLA path's candidate scores, S[t, a, cand[t, i]] from the dense S."""
    return jnp.take_along_axis(_per_rank_scores(queries, keys), cand[:, None, :], axis=2)


@jax.custom_vjp
def _scores_at(queries, keys, cand, forward):
    """`_dense_scores_at(queries, keys, cand)` whose value is `forward` (the kernel's per-rank
    candidate scores: the same numbers up to fp32 summation order) and whose backward is the XLA
    path's (the gather's transpose into the dense [T, r, N], then two matmuls)."""
    del queries, keys, cand
    return forward


def _scores_at_fwd(queries, keys, cand, forward):
    return forward, (queries, keys, cand)


def _scores_at_bwd(residuals, g):
    queries, keys, cand = residuals
    _, pull = jax.vjp(lambda q, k: _dense_scores_at(q, k, cand), queries, keys)
    d_queries, d_keys = pull(g)
    return d_queries, d_keys, None, None


_scores_at.defvjp(_scores_at_fwd, _scores_at_bwd)
