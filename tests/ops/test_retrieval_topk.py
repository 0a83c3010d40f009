"""retrieval_topk: two-stage Tucker retrieval (docs/model.md §2 steps 3–5) against independent references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.fixtures import load_release_case
from umv2_jax.ops import registry
from umv2_jax.ops import retrieval_topk as retrieval_module

# Jitted once per shape: eager op-by-op dispatch costs more than the tiny computations here.
retrieval_topk = jax.jit(
    retrieval_module.retrieval_topk,
    static_argnames=("rc_topk", "topk", "implementation", "interpret"),
)
# Every registered implementation, Pallas kernels in the interpreter.
IMPLEMENTATIONS = [
    pytest.param(name, name == "pallas", id=name) for name in registry.registered("retrieval_topk")
]
retrieval_topk_reference = jax.jit(
    retrieval_module.retrieval_topk_reference, static_argnames=("rc_topk", "topk")
)


def _rms_normalized(rng: np.random.Generator, shape) -> jnp.ndarray:
    x = rng.normal(size=shape)
    return jnp.asarray(x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True)), jnp.float32)


def _rank1_vectors(cores: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Leading singular pair of Σ_c C^c with docs/model.md §2 step 4's sign rule (largest |u| entry positive)."""
    u, _, vt = np.linalg.svd(np.asarray(cores, np.float64).sum(0))
    sign = np.sign(u[np.argmax(np.abs(u[:, 0])), 0])
    return jnp.asarray(sign * u[:, 0], jnp.float32), jnp.asarray(sign * vt[0], jnp.float32)


def _problem(seed: int, tokens=32, rank=2, key_dim=16, n_keys=24, n_cores=2, cores=None):
    rng = np.random.default_rng(seed)
    q_row, q_col = (_rms_normalized(rng, (tokens, rank, key_dim)) for _ in range(2))
    k_row, k_col = (_rms_normalized(rng, (n_keys, rank, key_dim)) for _ in range(2))
    if cores is None:
        cores = rng.uniform(size=(n_cores, rank, rank))  # the release's init; generic rank 2
    u_star, t_star = _rank1_vectors(cores)
    return q_row, q_col, k_row, k_col, jnp.asarray(cores, jnp.float32), u_star, t_star


def _full_grids(q_row, q_col, k_row, k_col, cores):
    """G^c over the whole N × N grid for every token, in float64 numpy: [T, C, N, N]."""
    s_row = np.einsum("tad,nad->tan", *(np.asarray(a, np.float64) for a in (q_row, k_row)))
    s_col = np.einsum("tad,nad->tan", *(np.asarray(a, np.float64) for a in (q_col, k_col)))
    return np.einsum("tai,cab,tbj->tcij", s_row, np.asarray(cores, np.float64), s_col)


def _brute_force_topm(q_row, q_col, k_row, k_col, cores, topk):
    """Best `topk` cells of Σ_c G^c over all N² cells: indices [T, m] and per-core scores [T, m, C]."""
    grids = _full_grids(q_row, q_col, k_row, k_col, cores)
    n_tokens, n_cores = grids.shape[:2]
    flat = grids.reshape(n_tokens, n_cores, -1)
    best = np.argsort(-flat.sum(1), axis=1)[:, :topk]
    scores = np.take_along_axis(flat, best[:, None, :], axis=2).transpose(0, 2, 1)
    return best, scores


@pytest.mark.parametrize("implementation, interpret", IMPLEMENTATIONS)
def test_matches_reference_on_rank2_cores(implementation, interpret):
    problem = _problem(seed=0, tokens=48, n_keys=32)
    got_idx, got_scores = retrieval_topk(
        *problem, rc_topk=10, topk=12, implementation=implementation, interpret=interpret
    )
    want_idx, want_scores = retrieval_topk_reference(*problem, rc_topk=10, topk=12)
    assert got_idx.dtype == jnp.int32 and got_idx.shape == (48, 12)
    assert got_scores.shape == (48, 12, 2)
    # Same algorithm, different primitives (lax.top_k vs argsort): identical order, not just sets.
    np.testing.assert_array_equal(got_idx, want_idx)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-5)


def test_rank1_core_with_full_width_equals_brute_force_over_grid():
    # Two cores that sum to an exactly rank-1 matrix σ·u tᵀ: the rank-1 pre-selection is exact.
    rng = np.random.default_rng(1)
    u = rng.normal(size=2)
    t = rng.normal(size=2)
    u, t = u / np.linalg.norm(u), t / np.linalg.norm(t)
    noise = rng.normal(size=(2, 2))
    cores = np.stack([0.7 * np.outer(u, t) + noise, 0.5 * np.outer(u, t) - noise])
    problem = _problem(seed=2, tokens=24, n_keys=20, cores=cores)
    n_keys, topk = 20, 16
    got_idx, got_scores = retrieval_topk(*problem, rc_topk=n_keys, topk=topk)
    want_idx, want_scores = _brute_force_topm(*problem[:5], topk)
    np.testing.assert_array_equal(np.sort(got_idx, axis=1), np.sort(want_idx, axis=1))
    # Both are ordered by descending total score, so the per-core scores line up slot by slot.
    np.testing.assert_array_equal(got_idx, want_idx)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-5)


def test_rank2_recall_against_brute_force():
    tokens, n_keys, rc_topk, topk = 64, 48, 12, 16
    recalls = []
    for seed in range(3):
        problem = _problem(seed=10 + seed, tokens=tokens, n_keys=n_keys)
        got_idx, _ = retrieval_topk(*problem, rc_topk=rc_topk, topk=topk)
        want_idx, _ = _brute_force_topm(*problem[:5], topk)
        hits = [len(set(g) & set(w)) for g, w in zip(np.asarray(got_idx), want_idx)]
        recalls.append(np.sum(hits) / (tokens * topk))
    recall = float(np.mean(recalls))
    print(f"rank-2 recall of top-{topk} (rc_topk={rc_topk}, N={n_keys}): {recall:.3f} {recalls}")
    # Measured 0.48–0.54 on these shapes (seeds 0–4 and 10–12). With untrained random keys about
    # half of the true best cells pair two strongly *negative* rank-1 scores (their product is
    # large and positive), and stage 1 keeps only the most positive candidates per side, so ≈ 0.5
    # is what TDQKR does here, not a bug; selection equals the reference exactly (test above).
    # The floor guards against a broken stage 1 (random choice would give k²/N² ≈ 0.06).
    assert recall >= 0.4


@pytest.mark.parametrize("implementation, interpret", IMPLEMENTATIONS)
def test_gradients_match_fixed_index_reference(implementation, interpret):
    problem = _problem(seed=3, tokens=16, n_keys=20)
    rc_topk, topk = 6, 8
    options = dict(implementation=implementation, interpret=interpret)
    grid_idx, _ = retrieval_topk(*problem, rc_topk=rc_topk, topk=topk, **options)
    n_keys = problem[2].shape[0]
    weights = jnp.asarray(np.random.default_rng(4).normal(size=(16, topk, 2)), jnp.float32)

    def loss_op(q_row, q_col, k_row, k_col, cores):
        _, scores = retrieval_topk(
            q_row, q_col, k_row, k_col, cores, *problem[5:], rc_topk=rc_topk, topk=topk, **options
        )
        return jnp.sum(weights * scores)

    def loss_fixed(q_row, q_col, k_row, k_col, cores):
        # Every core's full N × N grid; read at the op's own selection, held fixed.
        s_row = jnp.einsum("tad,nad->tan", q_row, k_row)
        s_col = jnp.einsum("tad,nad->tan", q_col, k_col)
        grids = jnp.einsum("tai,cab,tbj->tcij", s_row, cores, s_col).reshape(16, 2, -1)
        scores = jnp.take_along_axis(grids, grid_idx[:, None, :], axis=2).transpose(0, 2, 1)
        return jnp.sum(weights * scores)

    argnums = (0, 1, 2, 3, 4)
    got = jax.jit(jax.grad(loss_op, argnums))(*problem[:5])
    want = jax.jit(jax.grad(loss_fixed, argnums))(*problem[:5])
    for name, g, w in zip(("q_row", "q_col", "k_row", "k_col", "cores"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
    # Keys that no selected cell uses get an exact zero.
    used_rows = np.unique(np.asarray(grid_idx) // n_keys)
    unused = np.setdiff1d(np.arange(n_keys), used_rows)
    assert unused.size > 0
    assert np.all(np.asarray(got[2])[unused] == 0.0)


def test_heads_by_vmap_match_per_head_calls():
    heads = [_problem(seed=20 + h, tokens=8, n_keys=16) for h in range(2)]
    stacked = [jnp.stack(parts) for parts in zip(*heads)]
    by_vmap = jax.jit(jax.vmap(lambda *a: retrieval_topk(*a, rc_topk=5, topk=6)))(*stacked)
    for h, problem in enumerate(heads):
        idx, scores = retrieval_topk(*problem, rc_topk=5, topk=6)
        np.testing.assert_array_equal(by_vmap[0][h], idx)
        np.testing.assert_allclose(by_vmap[1][h], scores, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["small_sn", "ket2_sn"])
def test_reproduces_release_selection(case):
    data = load_release_case(case)
    # Feed the release's per-rank scores through one-hot keys: S[t, a, i] = <q[t, a], e_i>.
    s_row = data["tdqkr/scores1_refine"][:, 0].transpose(0, 2, 1)  # [T, r, K]
    s_col = data["tdqkr/scores2_refine"][:, 0].transpose(0, 2, 1)
    n_keys, rank = s_row.shape[2], s_row.shape[1]
    one_hot_keys = jnp.asarray(np.broadcast_to(np.eye(n_keys)[:, None, :], (n_keys, rank, n_keys)))
    cores = np.concatenate([data[f"param/query_layer/tucker_core.{c}"] for c in range(2)])
    knn = data["tdqkr/best_indices"].shape[1]
    idx, scores = retrieval_topk(
        jnp.asarray(s_row),
        jnp.asarray(s_col),
        one_hot_keys.astype(jnp.float32),
        one_hot_keys.astype(jnp.float32),
        jnp.asarray(cores),
        jnp.asarray(data["buffer/query_layer/tucker_core_u"].reshape(-1)),
        jnp.asarray(data["buffer/query_layer/tucker_core_v"].reshape(-1)),
        rc_topk=knn,
        topk=knn,
    )
    np.testing.assert_array_equal(np.sort(idx, 1), np.sort(data["tdqkr/best_indices"], 1))
    np.testing.assert_array_equal(idx, data["tdqkr/best_indices"])
    np.testing.assert_allclose(scores, data["tdqkr/best_scores"], rtol=1e-5, atol=1e-6)


def test_implementation_switch():
    # "auto" resolving to "xla" on CPU is tested with the registry (test_registry.py).
    problem = _problem(seed=5, tokens=4, n_keys=8)
    # "pallas" alone on CPU runs the registered kernels in the interpreter (tests/kernels/ checks
    # them in depth); it selects what the XLA path selects.
    want = retrieval_topk(*problem, rc_topk=4, topk=4, implementation="xla")
    got = retrieval_topk(*problem, rc_topk=4, topk=4, implementation="pallas")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="auto, xla, pallas"):
        retrieval_topk(*problem, rc_topk=4, topk=4, implementation="cuda")


def test_rejects_bad_shapes_and_widths():
    problem = _problem(seed=6, tokens=4, n_keys=8)
    with pytest.raises(ValueError, match="rc_topk"):
        retrieval_topk(*problem, rc_topk=9, topk=4)
    with pytest.raises(ValueError, match="topk"):
        retrieval_topk(*problem, rc_topk=2, topk=5)
    with pytest.raises(ValueError, match="cores"):
        retrieval_topk(*problem[:4], problem[4][:, :1], *problem[5:], rc_topk=4, topk=4)
