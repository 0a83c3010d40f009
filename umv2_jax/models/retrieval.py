"""Tucker-decomposed query-key retrieval (TDQKR, docs/model.md §2 steps 1–5) for every head of one memory layer.

    retrieval = TuckerRetrieval.from_memory(memory, d_model, keys_per_side, initializers, rngs)
    result = retrieval(x)            # x: [T, h]
    result.grid_indices              # [heads, T, m] int32, I_row·N + I_col, best first
    result.core_scores               # [heads, T, m, C] fp32, s^c of the selected cells (differentiable)

Per head: `q = W_q x` reshaped to row / column sub-queries (one pair per Tucker rank, or one shared pair
with `per_rank_query: false`, docs/model.md §9.1), RMS-normalized over D_k with gain γ_q; keys `K [2, N, r, D_k]`
RMS-normalized on the fly with gain γ_k; cores `C^c [r, r]`. The rank-1 pre-selection vectors (u*, t*)
come from an fp32 SVD of Σ_c C^c with a deterministic sign (`rank_one_vectors`). Scoring and selection
are `umv2_jax.ops.retrieval_topk`; this module owns the parameters and the query / key preparation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from umv2_jax.config import MemoryConfig
from umv2_jax.models import init as init_lib
from umv2_jax.ops.retrieval_topk import retrieval_topk


@dataclasses.dataclass(frozen=True)
class RetrievalInit:
    """Initializers of the retrieval parameters (chosen by `umv2_jax.models.memory_init`).

    query:  W_q [h, heads, 2, r_q, D_k]
    keys:   K [heads, 2, N, r, D_k]
    cores:  C [heads, C, r, r]
    gain:   the constant both RMSNorm gains γ_q and γ_k start at
    """

    query: nnx.Initializer
    keys: nnx.Initializer
    cores: nnx.Initializer
    gain: float


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RetrievalResult:
    """What one retrieval pass returns (leading axis: heads).

    grid_indices:    [H, T, m] int32, I_row·N + I_col ordered by descending total score
    core_scores:     [H, T, m, C] fp32 per-core scores s^c (differentiable; no softmax)
    singular_values: [H, r] fp32 singular values of Σ_c C^c (differentiable, for the Tucker penalty)
    key_balance:     scalar fp32 unweighted key-balance term (docs/model.md §5), or None when not requested
    """

    grid_indices: jax.Array
    core_scores: jax.Array
    singular_values: jax.Array
    key_balance: jax.Array | None = None


def rank_one_vectors(cores: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Leading singular pair (u*, t*) of C = Σ_c C^c with the docs/model.md step-4 sign rule; no gradient.

    cores: [C, r, r] → (u* [r], t* [r]) fp32. The SVD's sign is arbitrary and flipping (u*, t*)
    together would flip both stage-1 orderings, so the pair is flipped to make u*'s largest-magnitude
    entry positive (`canonical_sign`). Computed from the current cores every call (docs/model.md §9.5).
    """
    core_sum = jax.lax.stop_gradient(cores.astype(jnp.float32).sum(0))
    left, _, right_t = jnp.linalg.svd(core_sum, full_matrices=False)
    return canonical_sign(left[:, 0], right_t[0, :])


def canonical_sign(u_star: jax.Array, t_star: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Flips (u*, t*) together so that u*'s entry of largest magnitude is positive. [r], [r] → same."""
    pivot = u_star[jnp.argmax(jnp.abs(u_star))]
    sign = jnp.where(pivot < 0, -1.0, 1.0).astype(u_star.dtype)
    return jax.lax.stop_gradient(u_star * sign), jax.lax.stop_gradient(t_star * sign)


def core_singular_values(cores: jax.Array) -> jax.Array:
    """Singular values λ_1 ≥ … ≥ λ_r of Σ_c C^c in fp32, differentiable w.r.t. the cores. [C, r, r] → [r]."""
    return jnp.linalg.svd(cores.astype(jnp.float32).sum(0), compute_uv=False)


def rank_one_and_singular_values(cores: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(u* [r], t* [r], λ [r]) of C = Σ_c C^c from ONE fp32 SVD. cores: [C, r, r].

    u*, t* are `rank_one_vectors` (sign rule, no gradient). λ_i = u_iᵀ C v_i with the singular
    vectors held constant: its value is the i-th singular value and its gradient u_i v_iᵀ is the
    exact derivative of a simple singular value, as `core_singular_values` would give by
    differentiating a second SVD (avoiding the SVD's own JVP, which divides by λ_i² − λ_j²).
    """
    core_sum = cores.astype(jnp.float32).sum(0)
    left, _, right_t = jnp.linalg.svd(jax.lax.stop_gradient(core_sum), full_matrices=False)
    left, right_t = jax.lax.stop_gradient(left), jax.lax.stop_gradient(right_t)
    singular_values = jnp.einsum(
        "ai,ab,ib->i", left, core_sum, right_t, precision=jax.lax.Precision.HIGHEST
    )
    u_star, t_star = canonical_sign(left[:, 0], right_t[0, :])
    return u_star, t_star, singular_values


def rms_normalize(x: jax.Array, gain: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x², last axis) + eps) · gain, in fp32. x: [..., D_k], gain: [D_k]."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * gain


class TuckerRetrieval(nnx.Module):
    """TDQKR for `heads` heads over a virtual grid of N × N cells (N = keys per side, E·n_eff).

    Parameters (logical axes in brackets; the memory-side dims are small and stay replicated):
        query       W_q [h, H, 2, r_q, D_k]  (embed, -, -, -, -); r_q = r, or 1 without per-rank queries
        query_gain  γ_q [H, D_k]
        key_gain    γ_k [H, D_k]
        keys        K   [H, 2, N, r, D_k]    (side 0 = rows, 1 = columns)
        cores       C   [H, C, r, r]
    """

    def __init__(
        self,
        d_model: int,
        keys_per_side: int,
        initializers: RetrievalInit,
        rngs: nnx.Rngs,
        *,
        heads: int,
        key_dim: int,
        tucker_rank: int,
        n_cores: int,
        rc_topk: int,
        topk: int,
        norm_eps: float,
        per_rank_query: bool = True,
        compute_dtype=jnp.float32,
    ):
        rank = tucker_rank
        query_ranks = rank if per_rank_query else 1
        self.heads, self.rank, self.key_dim = heads, rank, key_dim
        self.keys_per_side = keys_per_side
        self.rc_topk, self.topk = rc_topk, topk
        self.eps = norm_eps
        self.compute_dtype = compute_dtype
        self.query = init_lib.make_param(
            rngs,
            initializers.query,
            (d_model, heads, 2, query_ranks, key_dim),
            ("embed", None, None, None, None),
        )
        gain = _constant(initializers.gain)
        self.query_gain = init_lib.make_param(rngs, gain, (heads, key_dim), (None, None))
        self.key_gain = init_lib.make_param(rngs, gain, (heads, key_dim), (None, None))
        self.keys = init_lib.make_param(
            rngs,
            initializers.keys,
            (heads, 2, keys_per_side, rank, key_dim),
            (None, None, None, None, None),
        )
        self.cores = init_lib.make_param(
            rngs, initializers.cores, (heads, n_cores, rank, rank), (None, None, None, None)
        )

    @classmethod
    def from_memory(
        cls,
        memory: MemoryConfig,
        d_model: int,
        keys_per_side: int,
        initializers: RetrievalInit,
        rngs: nnx.Rngs,
        compute_dtype=jnp.float32,
    ) -> TuckerRetrieval:
        """The retrieval of an UltraMemV2 layer configured by `model.memory`."""
        return cls(
            d_model,
            keys_per_side,
            initializers,
            rngs,
            heads=memory.heads,
            key_dim=memory.key_dim,
            tucker_rank=memory.tucker_rank,
            n_cores=memory.n_cores,
            rc_topk=memory.rc_topk,
            topk=memory.topk,
            norm_eps=memory.norm_eps,
            per_rank_query=memory.per_rank_query,
            compute_dtype=compute_dtype,
        )

    def __call__(
        self,
        x: jax.Array,
        *,
        implementation: str = "auto",
        key_balance: bool = False,
        rank_one: tuple[jax.Array, jax.Array] | None = None,
        balance_axes: tuple[str, ...] = (),
    ) -> RetrievalResult:
        """x: [T, h] → RetrievalResult for every head.

        key_balance: also return the unweighted key-balance term Σ_side N·Σ_i f_i·p_i (mean over heads).
        rank_one:    optional (u* [H, r], t* [H, r]) used instead of the SVD's; for pinning the
                     release's buffers in compatibility tests. Never needed in training.
        balance_axes: inside a shard_map, the mesh axes over which devices hold different (equally
                     many) tokens: the key-balance statistics f and p are averaged over them before
                     their product, so the term is the global batch's (`lax.pmean`).
        """
        q_row, q_col = self.queries(x)  # [H, T, r, D_k] each
        k_row, k_col = self.normalized_keys()  # [H, N, r, D_k] each
        cores = self.cores[...].astype(jnp.float32)  # [H, C, r, r]
        # One SVD per head per step gives both the stage-1 vectors and the singular values.
        u_star, t_star, singular_values = jax.vmap(rank_one_and_singular_values)(cores)
        if rank_one is not None:
            u_star = jax.lax.stop_gradient(jnp.asarray(rank_one[0], jnp.float32))
            t_star = jax.lax.stop_gradient(jnp.asarray(rank_one[1], jnp.float32))

        def one_head(q_row, q_col, k_row, k_col, cores, u_star, t_star):
            return retrieval_topk(
                q_row,
                q_col,
                k_row,
                k_col,
                cores,
                u_star,
                t_star,
                rc_topk=self.rc_topk,
                topk=self.topk,
                implementation=implementation,
            )

        heads = (q_row, q_col, k_row, k_col, cores, u_star, t_star)
        grid_indices, core_scores = jax.vmap(one_head)(*heads)
        balance = None
        if key_balance:
            per_head = jax.vmap(
                lambda qr, qc, kr, kc, u, t: (
                    _key_balance(qr, kr, u, self.rc_topk, balance_axes)
                    + _key_balance(qc, kc, t, self.rc_topk, balance_axes)
                )
            )(q_row, q_col, k_row, k_col, u_star, t_star)
            balance = jnp.mean(per_head)
        return RetrievalResult(
            grid_indices=grid_indices,
            core_scores=core_scores.astype(jnp.float32),
            singular_values=singular_values,
            key_balance=balance,
        )

    def queries(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [T, h] → normalized (q_row, q_col), each [H, T, r, D_k] fp32 (docs/model.md §2 step 1).

        Without per-rank queries the single row / column pair is broadcast to every Tucker rank, which
        makes the op's per-rank scores identical across ranks, as in the release.
        """
        dtype = self.compute_dtype
        projected = jnp.einsum("th,hnsad->nstad", x.astype(dtype), self.query[...].astype(dtype))
        gain = self.query_gain[...][:, None, None, None, :]  # [H, 1, 1, 1, D_k]
        normalized = rms_normalize(projected, gain, self.eps)  # [H, 2, T, r_q, D_k]
        shape = (self.heads, x.shape[0], self.rank, self.key_dim)
        return (
            jnp.broadcast_to(normalized[:, 0], shape),
            jnp.broadcast_to(normalized[:, 1], shape),
        )

    def normalized_keys(self) -> tuple[jax.Array, jax.Array]:
        """RMS-normalized (k_row, k_col), each [H, N, r, D_k] fp32 (docs/model.md §2 step 2; stored keys stay raw)."""
        gain = self.key_gain[...][:, None, None, None, :]
        normalized = rms_normalize(self.keys[...], gain, self.eps)  # [H, 2, N, r, D_k]
        return normalized[:, 0], normalized[:, 1]


def _key_balance(
    queries: jax.Array, keys: jax.Array, vector: jax.Array, rc_topk: int, axes: tuple[str, ...] = ()
) -> jax.Array:
    """N·Σ_i f_i·p_i for one side of one head (docs/model.md §5). queries [T, r, D_k], keys [N, r, D_k].

    p = mean over tokens of softmax(rank-1 scores) carries the gradient; f = share of the stage-1
    selections that went to key i is a count and carries none. `axes`: mesh axes (inside a
    shard_map) over which p and f are averaged first, so both are the global batch's.
    """
    scores = jnp.einsum("a,tad,nad->tn", vector, queries, keys, precision="highest")
    n_keys = keys.shape[0]
    probabilities = jnp.mean(jax.nn.softmax(scores, axis=-1), axis=0)  # [N]
    _, chosen = jax.lax.top_k(jax.lax.stop_gradient(scores), rc_topk)
    share = jnp.zeros((n_keys,), jnp.float32).at[chosen.reshape(-1)].add(1.0) / chosen.size
    if axes:
        probabilities = jax.lax.pmean(probabilities, axes)
        share = jax.lax.pmean(share, axes)
    return n_keys * jnp.sum(share * probabilities)


def _constant(value: float) -> Callable:
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.full(shape, value, dtype)

    return init
