"""The XLA paths of retrieval_topk and product_key_topk in token chunks: the same selection as one
pass over all tokens (exactly), scores and gradients equal up to fp32 rounding (XLA:CPU's dot rounds
differently for a different number of rows, so the scores are not bit for bit), and the compiled
temporaries bounded by the chunk instead of growing with the tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops.test_retrieval_topk import _problem
from umv2_jax.ops import product_key_topk as pk_module
from umv2_jax.ops import retrieval_topk as retrieval_module
from umv2_jax.ops import selection

TOKENS = 53  # not a multiple of the chunk: the last chunk is padded


def _retrieval(token_chunk):
    return jax.jit(
        lambda *a: retrieval_module._retrieval_topk_xla(
            *a, rc_topk=6, topk=8, token_chunk=token_chunk
        )
    )


def _product_key(token_chunk):
    return jax.jit(
        lambda *a: pk_module._product_key_topk_xla(*a, rc_topk=5, topk=7, token_chunk=token_chunk)
    )


def _pk_problem(seed=0, tokens=TOKENS, n_keys=12, key_dim=8):
    rng = np.random.default_rng(seed)
    q = [jnp.asarray(rng.normal(size=(tokens, key_dim)), jnp.float32) for _ in range(2)]
    k = [jnp.asarray(rng.normal(size=(n_keys, key_dim)), jnp.float32) for _ in range(2)]
    return (*q, *k)


CASES = {
    "retrieval_topk": (_retrieval, lambda: _problem(seed=3, tokens=TOKENS, n_keys=20)),
    "product_key_topk": (_product_key, _pk_problem),
}


@pytest.mark.parametrize("op", list(CASES))
def test_chunks_select_what_one_pass_selects(op):
    make, problem = CASES[op]
    args = problem()
    indices, scores = make(None)(*args)  # 53 tokens fit the default budget: one pass
    for chunk in (8, 16):
        got_indices, got_scores = make(chunk)(*args)
        assert got_indices.dtype == indices.dtype and got_scores.dtype == scores.dtype
        np.testing.assert_array_equal(got_indices, indices)
        np.testing.assert_allclose(got_scores, scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", list(CASES))
def test_chunked_gradients_equal_the_one_pass_gradients(op):
    make, problem = CASES[op]
    args = problem()
    n_float = 5 if op == "retrieval_topk" else 4  # u*, t* carry no gradient (selection only)
    rng = np.random.default_rng(1)
    weights = None

    def loss(fn):
        def value(*a):
            _, scores = fn(*a)
            return jnp.sum(scores * weights)

        return jax.jit(jax.grad(value, argnums=tuple(range(n_float))))

    whole = make(None)
    weights = jnp.asarray(rng.normal(size=whole(*args)[1].shape), jnp.float32)
    want = loss(whole)(*args)
    got = loss(make(8))(*args)
    for name, g, w in zip(("q_row", "q_col", "k_row", "k_col", "cores"), got, want):
        scale = float(jnp.max(jnp.abs(w)))
        assert scale > 0, name
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6 * scale, err_msg=name)


def test_chunk_size_follows_the_transient_budget():
    # 4096 tokens of the 1B/7B shape (k = m = 128, r = 2, N = 528): 4·(2·2·528 + 128² + 2·128²)
    # = 205 056 bytes per token → 64 MiB holds 327 tokens → chunks of 256.
    per_token = 4 * (2 * 2 * 528 + 128 * 128 + 2 * 128 * 128)
    assert selection.token_chunk_for(4096, per_token) == 256
    assert selection.token_chunk_for(100, per_token) == 100  # they all fit: one pass
    assert selection.token_chunk_for(4096, 10**9) == 8  # never below 8 tokens


def _temporaries(fn, *shapes) -> int:
    return fn.trace(*shapes).lower().compile().memory_analysis().temp_size_in_bytes


def test_compiled_temporaries_are_bounded_by_the_chunk():
    """Forward and backward: temporaries at 64 tokens per chunk stay flat as tokens grow 4×,
    while one pass grows with them (the [T, k, k] grid and the [T, m, k] one-hot picks)."""
    k = m = 32
    f32 = jnp.float32

    def grad_fn(chunk):
        def value(q_row, q_col, k_row, k_col):
            _, scores = pk_module._product_key_topk_xla(
                q_row, q_col, k_row, k_col, rc_topk=k, topk=m, token_chunk=chunk
            )
            return jnp.sum(scores)

        return jax.jit(jax.grad(value, argnums=(0, 1, 2, 3)))

    def shapes(tokens):
        q = jax.ShapeDtypeStruct((tokens, 16), f32)
        keys = jax.ShapeDtypeStruct((64, 16), f32)
        return q, q, keys, keys

    one_pass = [_temporaries(grad_fn(t), *shapes(t)) for t in (512, 2048)]
    chunked = [_temporaries(grad_fn(64), *shapes(t)) for t in (512, 2048)]
    grid_bytes = 2048 * k * k * 4  # one pass's [T, k, k] grid alone at 2048 tokens
    assert one_pass[1] >= grid_bytes
    assert one_pass[1] > 3 * one_pass[0]
    # Chunked: what grows with tokens is only the inputs' and outputs' size (T × 16 or T × m).
    assert chunked[1] < one_pass[1] / 4
    assert chunked[1] - chunked[0] < 1536 * (2 * 16 + 3 * m) * 4 * 2
