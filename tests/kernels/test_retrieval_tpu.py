"""The Mosaic TPU selection kernels (pallas_kernels/retrieval_topk/tpu.py), in the TPU interpreter
on CPU: stage 1 and stage 2 against `lax.top_k` on the plain-JAX scores, the lowest-id tie rule,
padded keys and tokens, the strict interpreter (races, out-of-bounds reads), the ops built on them
against their XLA paths in value and gradient, lowering for TPU at every config shape, and a real
Mosaic compile for a TPU v5e from this host with VMEM inside the chip's default scoped limit."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax import lax

from pallas_kernels import testing
from pallas_kernels.retrieval_topk import tpu
from tests.kernels import retrieval_tpu_cases as cases
from umv2_jax.ops.product_key_topk import product_key_topk, product_key_topk_reference
from umv2_jax.ops.retrieval_topk import retrieval_topk, retrieval_topk_reference

HIGHEST = lax.Precision.HIGHEST
V5E_SCOPED_VMEM = 16 * 2**20  # v5e's default scoped VMEM limit (128 MiB physical)


def _normal(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _stage1_reference(q, keys, w, k):
    """lax.top_k of the rank-1-combined scores: descending, lowest id first on ties."""
    scores = jnp.einsum("a,tad,nad->tn", w, q, keys, precision=HIGHEST)
    return lax.top_k(scores, k)[1]


def _stage2_reference(r_cand, q_cand, core_sum, m):
    if core_sum is None:
        total = r_cand[:, 0, :, None] + q_cand[:, 0, None, :]
    else:
        total = jnp.einsum("tai,ab,tbj->tij", r_cand, core_sum, q_cand, precision=HIGHEST)
    n_tokens, k, _ = total.shape
    best = lax.top_k(total.reshape(n_tokens, k * k), m)[1]
    return best // k, best % k


def _stage1_inputs(seed, n_tokens, n_keys, rank, key_dim):
    q_row, q_col = (_normal(seed + i, (n_tokens, rank, key_dim)) for i in (0, 1))
    k_row, k_col = (_normal(seed + i, (n_keys, rank, key_dim)) for i in (2, 3))
    w_row, w_col = _normal(seed + 4, (rank,)), _normal(seed + 5, (rank,))
    return q_row, q_col, k_row, k_col, w_row, w_col


def _assert_ids_written(ids, bound, name):
    """Unwritten int32 elements hold the interpreter's fill 2³¹−1 (`uninitialized_memory`)."""
    ids = np.asarray(ids)
    assert ids.min() >= 0 and ids.max() < bound, f"{name}: ids outside [0, {bound})"


# --------------------------------------------------------------------------------------------------
# Stage 1: score and select


def _tied_keys(keys):
    """Key j + ceil(n/2) an exact copy of key j: planted ties, across key tiles when n > 128."""
    half = -(-keys.shape[0] // 2)
    return jnp.concatenate([keys[:half], keys[:half]])[: keys.shape[0]]


# Derandomized (tests/conftest.py); explicit cases: the smallest shape, a key count of exactly one
# tile and one past it (tiled), k at its largest, each with planted ties.
@settings(max_examples=2, deadline=None)
@given(
    n_tokens=st.integers(1, 140),
    n_keys=st.integers(20, 300),
    rank=st.sampled_from([1, 2]),
    key_dim=st.sampled_from([4, 16]),
    rc_topk=st.integers(1, 20),
    tiled=st.booleans(),
    ties=st.booleans(),
    seed=st.integers(0, 1000),
)
@example(n_tokens=1, n_keys=20, rank=1, key_dim=4, rc_topk=1, tiled=False, ties=True, seed=0)
@example(n_tokens=16, n_keys=128, rank=2, key_dim=16, rc_topk=20, tiled=True, ties=True, seed=1)
@example(n_tokens=9, n_keys=129, rank=2, key_dim=4, rc_topk=20, tiled=True, ties=True, seed=2)
def test_stage1_matches_top_k_of_the_rank1_scores(
    n_tokens, n_keys, rank, key_dim, rc_topk, tiled, ties, seed
):
    q_row, q_col, k_row, k_col, w_row, w_col = _stage1_inputs(seed, n_tokens, n_keys, rank, key_dim)
    if ties:
        k_row, k_col = _tied_keys(k_row), _tied_keys(k_col)
    cand_row, cand_col = tpu.stage1(
        q_row, q_col, k_row, k_col, w_row, w_col, rc_topk=rc_topk, interpret=True,
        key_block=128 if tiled else None,
    )  # fmt: skip
    np.testing.assert_array_equal(cand_row, _stage1_reference(q_row, k_row, w_row, rc_topk))
    np.testing.assert_array_equal(cand_col, _stage1_reference(q_col, k_col, w_col, rc_topk))


@pytest.mark.parametrize("key_block", [None, 128])
def test_stage1_breaks_ties_by_lowest_key_id_across_key_tiles(key_block):
    n_tokens, n_keys, rank, key_dim, rc_topk = 9, 300, 2, 8, 12
    q_row, q_col, k_row, k_col, w_row, w_col = _stage1_inputs(7, n_tokens, n_keys, rank, key_dim)
    # Unit keys, exact copies of key 3 in the first and later key tiles, and queries equal to key 3
    # with positive weights: the copies tie (bitwise) at the top score Σ_a w_a and must come out
    # in id order 3, 150, 200, 290.
    k_row = _unit(k_row)
    for copy in (150, 200, 290):
        k_row = k_row.at[copy].set(k_row[3])
    q_row = q_row.at[:5].set(jnp.broadcast_to(k_row[3], (5, rank, key_dim)))
    # Zero column queries: every score is 0, so the top k are ids 0 … k − 1 in order.
    q_col = jnp.zeros_like(q_col)
    w_row = jnp.abs(w_row)
    cand_row, cand_col = tpu.stage1(
        q_row, q_col, k_row, k_col, w_row, w_col, rc_topk=rc_topk, interpret=True,
        key_block=key_block,
    )  # fmt: skip
    np.testing.assert_array_equal(cand_row[:5, :4], np.tile([3, 150, 200, 290], (5, 1)))
    np.testing.assert_array_equal(cand_row, _stage1_reference(q_row, k_row, w_row, rc_topk))
    np.testing.assert_array_equal(cand_col, np.tile(np.arange(rc_topk), (n_tokens, 1)))


def test_stage1_selects_every_real_key_and_no_padded_one_when_k_is_n():
    # n = 70 pads to a 128-key tile; k = n must return a permutation of the real ids only, even
    # where every score ties (zero queries: ids in order).
    n_tokens, n_keys, rank, key_dim = 5, 70, 2, 8
    q_row, q_col, k_row, k_col, w_row, w_col = _stage1_inputs(3, n_tokens, n_keys, rank, key_dim)
    q_col = jnp.zeros_like(q_col)
    cand_row, cand_col = tpu.stage1(
        q_row, q_col, k_row, k_col, w_row, w_col, rc_topk=n_keys, interpret=True
    )
    np.testing.assert_array_equal(np.sort(cand_row, axis=1), np.tile(np.arange(n_keys), (5, 1)))
    np.testing.assert_array_equal(cand_row, _stage1_reference(q_row, k_row, w_row, n_keys))
    np.testing.assert_array_equal(cand_col, np.tile(np.arange(n_keys), (n_tokens, 1)))


# --------------------------------------------------------------------------------------------------
# Stage 2: grid and select


# Explicit cases: k = m = 1; m = k² at the largest k (every cell kept); m = 1 of a large grid; each
# with planted ties (odd column candidates copy even ones: their cells tie bitwise).
@settings(max_examples=2, deadline=None)
@given(
    n_tokens=st.integers(1, 140),
    rank=st.sampled_from([1, 2, 3]),
    rc_topk=st.integers(1, 12),
    topk_fraction=st.floats(0.0, 1.0),
    product_key=st.booleans(),
    ties=st.booleans(),
    seed=st.integers(0, 1000),
)
@example(n_tokens=1, rank=1, rc_topk=1, topk_fraction=1.0, product_key=True, ties=True, seed=0)
@example(n_tokens=20, rank=3, rc_topk=12, topk_fraction=1.0, product_key=False, ties=True, seed=1)
@example(n_tokens=5, rank=2, rc_topk=12, topk_fraction=0.0, product_key=False, ties=True, seed=2)
def test_stage2_matches_top_k_of_the_grid(
    n_tokens, rank, rc_topk, topk_fraction, product_key, ties, seed
):
    rank = 1 if product_key else rank
    topk = max(1, round(topk_fraction * rc_topk * rc_topk))
    r_cand = _normal(seed, (n_tokens, rank, rc_topk))
    q_cand = _normal(seed + 1, (n_tokens, rank, rc_topk))
    if ties and rc_topk > 1:
        q_cand = q_cand.at[:, :, 1::2].set(q_cand[:, :, 0 : rc_topk - 1 : 2])
    core_sum = None if product_key else _normal(seed + 2, (rank, rank))
    best_i, best_j = tpu.stage2(r_cand, q_cand, core_sum, topk=topk, interpret=True)
    want_i, want_j = _stage2_reference(r_cand, q_cand, core_sum, topk)
    np.testing.assert_array_equal(best_i, want_i)
    np.testing.assert_array_equal(best_j, want_j)


@pytest.mark.parametrize("product_key", [False, True])
def test_stage2_breaks_ties_by_lowest_flat_position(product_key):
    n_tokens, rank, rc_topk, topk = 6, 1 if product_key else 2, 9, 40
    r_cand = _normal(11, (n_tokens, rank, rc_topk))
    q_cand = _normal(12, (n_tokens, rank, rc_topk))
    # Column candidates 2, 5 and 8 equal: cells (i, 2), (i, 5), (i, 8) tie bitwise in every row.
    q_cand = q_cand.at[:, :, 5].set(q_cand[:, :, 2]).at[:, :, 8].set(q_cand[:, :, 2])
    # Token 0: an all-zero grid, so the picks are flat positions 0, 1, … in order.
    r_cand, q_cand = r_cand.at[0].set(0.0), q_cand.at[0].set(0.0)
    core_sum = None if product_key else _normal(13, (rank, rank))
    best_i, best_j = tpu.stage2(r_cand, q_cand, core_sum, topk=topk, interpret=True)
    flat = np.asarray(best_i) * rc_topk + np.asarray(best_j)
    np.testing.assert_array_equal(flat[0], np.arange(topk))
    want_i, want_j = _stage2_reference(r_cand, q_cand, core_sum, topk)
    np.testing.assert_array_equal(best_i, want_i)
    np.testing.assert_array_equal(best_j, want_j)


def test_stage2_keeps_every_cell_when_m_is_k_squared():
    r_cand, q_cand = _normal(21, (3, 2, 5)), _normal(22, (3, 2, 5))
    best_i, best_j = tpu.stage2(r_cand, q_cand, _normal(23, (2, 2)), topk=25, interpret=True)
    flat = np.sort(np.asarray(best_i) * 5 + np.asarray(best_j), axis=1)
    np.testing.assert_array_equal(flat, np.tile(np.arange(25), (3, 1)))


# --------------------------------------------------------------------------------------------------
# The strict interpreter: no races, no out-of-bounds reads, every output element written


def test_kernels_are_race_free_and_in_bounds_under_the_strict_interpreter():
    strict = testing.tpu_interpret_params()
    q_row, q_col, k_row, k_col, w_row, w_col = _stage1_inputs(31, 130, 260, 2, 8)
    cand_row, cand_col = tpu.stage1(
        q_row, q_col, k_row, k_col, w_row, w_col, rc_topk=10, interpret=strict, key_block=128
    )
    assert not testing.races_detected()
    _assert_ids_written(cand_row, 260, "cand_row")
    _assert_ids_written(cand_col, 260, "cand_col")
    np.testing.assert_array_equal(cand_row, _stage1_reference(q_row, k_row, w_row, 10))

    r_cand, q_cand, core_sum = (
        _normal(32, (130, 2, 6)),
        _normal(33, (130, 2, 6)),
        _normal(34, (2, 2)),
    )
    best_i, best_j = tpu.stage2(r_cand, q_cand, core_sum, topk=20, interpret=strict)
    assert not testing.races_detected()
    _assert_ids_written(best_i, 6, "best_i")
    _assert_ids_written(best_j, 6, "best_j")
    np.testing.assert_array_equal(best_i, _stage2_reference(r_cand, q_cand, core_sum, 20)[0])


# --------------------------------------------------------------------------------------------------
# The ops on these kernels: values and gradients equal the XLA path's


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def test_retrieval_topk_on_the_tpu_kernels_matches_xla_and_the_reference_with_gradients():
    heads, n_tokens, rank, key_dim, n_keys, n_cores, rc_topk, topk = 2, 130, 2, 8, 40, 2, 6, 10
    q_row, q_col = (_unit(_normal(40 + i, (heads, n_tokens, rank, key_dim))) for i in (0, 1))
    k_row, k_col = (_unit(_normal(42 + i, (heads, n_keys, rank, key_dim))) for i in (0, 1))
    cores = _normal(44, (heads, n_cores, rank, rank))
    u_star, t_star = jnp.array([0.8, 0.6]), jnp.array([0.6, -0.8])
    weights = _normal(45, (heads, n_tokens, topk, n_cores))

    def run(implementation):
        def loss(q_row, q_col, k_row, k_col, cores):
            select = lambda qr, qc, kr, kc, c: retrieval_topk(  # noqa: E731
                qr, qc, kr, kc, c, u_star, t_star, rc_topk=rc_topk, topk=topk,
                implementation=implementation, interpret=True,
            )  # fmt: skip
            indices, scores = jax.vmap(select)(q_row, q_col, k_row, k_col, cores)
            return jnp.sum(scores * weights), (indices, scores)

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(
            q_row, q_col, k_row, k_col, cores
        )

    grads, (indices, scores) = run("pallas")
    want_grads, (want_indices, want_scores) = run("xla")
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(scores, want_scores, **testing.tolerance(jnp.float32))
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, **testing.tolerance(jnp.float32))
    ref_indices, ref_scores = jax.vmap(
        lambda qr, qc, kr, kc, c: retrieval_topk_reference(
            qr, qc, kr, kc, c, u_star, t_star, rc_topk=rc_topk, topk=topk
        )
    )(q_row, q_col, k_row, k_col, cores)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(scores, ref_scores, **testing.tolerance(jnp.float32))


def test_product_key_topk_on_the_tpu_kernels_matches_xla_with_gradients():
    heads, n_tokens, key_dim, n_keys, rc_topk, topk = 2, 130, 8, 50, 7, 7
    q_row, q_col = (_normal(50 + i, (heads, n_tokens, key_dim)) for i in (0, 1))
    k_row, k_col = (_normal(52 + i, (heads, n_keys, key_dim)) for i in (0, 1))
    weights = _normal(54, (heads, n_tokens, topk))

    def run(implementation):
        def loss(*args):
            select = lambda *a: product_key_topk(  # noqa: E731
                *a, rc_topk=rc_topk, topk=topk, implementation=implementation, interpret=True
            )
            rows, scores = jax.vmap(select)(*args)
            return jnp.sum(scores * weights), (rows, scores)

        return jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q_row, q_col, k_row, k_col)

    grads, (rows, scores) = run("pallas")
    want_grads, (want_rows, want_scores) = run("xla")
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, **testing.tolerance(jnp.float32))
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, **testing.tolerance(jnp.float32))
    ref_rows, _ = jax.vmap(lambda *a: product_key_topk_reference(*a, rc_topk=rc_topk, topk=topk))(
        q_row, q_col, k_row, k_col
    )
    np.testing.assert_array_equal(rows, ref_rows)


# --------------------------------------------------------------------------------------------------
# Lowering and a real Mosaic compile


@pytest.mark.parametrize("name", cases.SHAPES)
def test_vmem_plan_fits_the_v5e_default_scoped_limit(name):
    _, n_keys, key_dim, rank, rc_topk, topk, n_cores, _ = cases.SHAPES[name]
    rank = 1 if n_cores == 0 else rank
    assert tpu.stage1_vmem_bytes(n_keys, rank, key_dim, rc_topk) <= V5E_SCOPED_VMEM
    assert tpu.stage2_vmem_bytes(rank, rc_topk, topk) <= V5E_SCOPED_VMEM


@pytest.mark.parametrize("name", cases.DEFAULT_COMPILE)
def test_auto_lowers_both_kernels_for_tpu_and_none_for_cpu(name):
    step, args = cases.train_step(name), cases.abstract_args(name)
    # Forward: stage 1 and stage 2, one custom call each.
    assert testing.lower_for(step, args, "tpu").count("tpu_custom_call") == 2
    assert "tpu_custom_call" not in testing.lower_for(step, args, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(cases.SHAPES) - set(cases.DEFAULT_COMPILE)))
def test_auto_lowers_both_kernels_for_tpu_at_the_other_config_shapes(name):
    step, args = cases.train_step(name), cases.abstract_args(name)
    assert testing.lower_for(step, args, "tpu").count("tpu_custom_call") == 2


def _compile(function):
    try:
        return testing.compile_for_tpu_v5e(f"tests.kernels.retrieval_tpu_cases:{function}")
    except FileNotFoundError as error:
        # Under CI (`CI` set) the test extra installs libtpu: a missing one fails, never skips.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            f"no libtpu to compile for TPU v5e: {error}"
        )


def test_kernels_compile_with_mosaic_for_a_tpu_v5e_at_the_config_shapes():
    results = _compile("kernel_cases")
    assert set(results) == set(cases.DEFAULT_COMPILE)
    for name, result in results.items():
        assert result["ok"], f"{name}: {result.get('error')}"
        assert result["tpu_custom_calls"] == 2, name


@pytest.mark.slow
def test_kernels_compile_with_mosaic_for_a_tpu_v5e_at_every_config_shape():
    results = _compile("all_cases")
    assert set(results) == set(cases.SHAPES)
    for name, result in results.items():
        assert result["ok"], f"{name}: {result.get('error')}"
