"""product_key_topk: product-key selection (sum of half scores) against independent references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umv2_jax.ops import registry
from umv2_jax.ops.product_key_topk import product_key_topk, product_key_topk_reference

# Every registered implementation, Pallas kernels in the interpreter.
IMPLEMENTATIONS = [
    pytest.param(name, name == "pallas", id=name)
    for name in registry.registered("product_key_topk")
]


def _problem(seed: int, tokens: int = 24, n_keys: int = 20, key_dim: int = 8):
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=(tokens, key_dim)) for _ in range(2)]
    arrays += [rng.normal(size=(n_keys, key_dim)) for _ in range(2)]
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def _op(implementation, interpret, rc_topk, topk):
    return jax.jit(
        functools.partial(
            product_key_topk,
            rc_topk=rc_topk,
            topk=topk,
            implementation=implementation,
            interpret=interpret,
        )
    )


@pytest.mark.parametrize("implementation, interpret", IMPLEMENTATIONS)
@pytest.mark.parametrize("rc_topk, topk", [(5, 5), (4, 10), (20, 7)])
def test_matches_the_token_by_token_reference(implementation, interpret, rc_topk, topk):
    problem = _problem(seed=0)
    rows, scores = _op(implementation, interpret, rc_topk, topk)(*problem)
    want_rows, want_scores = product_key_topk_reference(*problem, rc_topk=rc_topk, topk=topk)
    assert rows.dtype == jnp.int32 and rows.shape == (24, topk)
    assert scores.dtype == jnp.float32
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation, interpret", IMPLEMENTATIONS)
def test_with_k_at_least_m_it_is_the_exact_top_m_of_the_whole_grid(implementation, interpret):
    q_row, q_col, k_row, k_col = _problem(seed=1)
    rows, scores = _op(implementation, interpret, 6, 6)(q_row, q_col, k_row, k_col)
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    grid = (f64(q_row) @ f64(k_row).T)[:, :, None] + (f64(q_col) @ f64(k_col).T)[:, None, :]
    flat = grid.reshape(grid.shape[0], -1)
    best = np.argsort(-flat, axis=1)[:, :6]
    np.testing.assert_array_equal(rows, best)
    np.testing.assert_allclose(scores, np.take_along_axis(flat, best, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation, interpret", IMPLEMENTATIONS)
def test_gradients_match_a_fixed_selection_and_skip_unselected_keys(implementation, interpret):
    problem = _problem(seed=2, tokens=6, n_keys=16)
    op = _op(implementation, interpret, 4, 6)
    rows, _ = op(*problem)
    weights = jnp.asarray(np.random.default_rng(3).normal(size=rows.shape), jnp.float32)
    n_keys = problem[2].shape[0]

    def loss_op(*arrays):
        return jnp.sum(weights * op(*arrays)[1])

    def loss_fixed(q_row, q_col, k_row, k_col):
        # The whole grid, read at the op's selection held fixed.
        grid = (q_row @ k_row.T)[:, :, None] + (q_col @ k_col.T)[:, None, :]
        picked = jnp.take_along_axis(grid.reshape(grid.shape[0], -1), rows, axis=1)
        return jnp.sum(weights * picked)

    argnums = (0, 1, 2, 3)
    got = jax.jit(jax.grad(loss_op, argnums))(*problem)
    want = jax.jit(jax.grad(loss_fixed, argnums))(*problem)
    for name, g, w in zip(("q_row", "q_col", "k_row", "k_col"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)
    unused = np.setdiff1d(np.arange(n_keys), np.unique(np.asarray(rows) // n_keys))
    assert unused.size > 0
    assert np.all(np.asarray(got[2])[unused] == 0.0)


def test_rejects_bad_widths():
    problem = _problem(seed=4, n_keys=8)
    with pytest.raises(ValueError, match="rc_topk"):
        product_key_topk(*problem, rc_topk=9, topk=4)
    with pytest.raises(ValueError, match="topk"):
        product_key_topk(*problem, rc_topk=2, topk=5)
