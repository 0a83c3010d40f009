"""Tucker retrieval (docs/model.md §3) against brute force over the grid, and the rank-1 vectors of the core."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from umv2_jax.config import MemoryConfig
from umv2_jax.models.retrieval import (
    RetrievalInit,
    TuckerRetrieval,
    canonical_sign,
    rank_one_vectors,
)

D_MODEL = 24


def fill_random(module: nnx.Module, rng: np.random.Generator) -> None:
    """Gives every variable fresh random values: gains 1 ± 0.3, others N(0, 1)/2."""
    for path, node in nnx.iter_graph(module):
        if not isinstance(node, nnx.Variable):
            continue
        shape = node.get_value().shape
        if path and str(path[-1]).endswith("gain"):
            value = (1.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
        else:
            value = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        node.set_value(jnp.asarray(value))


def rms(x, gain, eps, xp=np):
    return x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps) * gain


def jit_retrieval(retrieval: TuckerRetrieval, x: np.ndarray):
    graphdef, state = nnx.split(retrieval)
    run = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, implementation="xla"))
    return run(state, jnp.asarray(x))


def test_rank_one_core_with_full_stage_one_equals_brute_force_over_the_grid():
    memory = MemoryConfig(n_keys=6, key_dim=8, rc_topk=6, topk=9, n_cores=2, heads=1)
    keys_per_side = 6
    zeros = jax.nn.initializers.zeros  # every value is overwritten below
    init = RetrievalInit(query=zeros, keys=zeros, cores=zeros, gain=1.0)
    retrieval = nnx.eval_shape(
        lambda: TuckerRetrieval.from_memory(memory, D_MODEL, keys_per_side, init, nnx.Rngs(0))
    )
    rng = np.random.default_rng(3)
    fill_random(retrieval, rng)
    a, b = rng.standard_normal(2), rng.standard_normal(2)
    cores = np.stack([0.7 * np.outer(a, b), -1.9 * np.outer(a, b)])[None].astype(np.float32)
    retrieval.cores.set_value(jnp.asarray(cores))
    x = rng.standard_normal((16, D_MODEL)).astype(np.float32)
    result = jit_retrieval(retrieval, x)

    q = np.einsum("th,hsad->tsad", x, np.asarray(retrieval.query[...][:, 0], np.float64))
    q = rms(q, np.asarray(retrieval.query_gain[...][0], np.float64), memory.norm_eps)
    keys = rms(
        np.asarray(retrieval.keys[...][0], np.float64), retrieval.key_gain[...][0], memory.norm_eps
    )
    s_row = np.einsum("tad,iad->tai", q[:, 0], keys[0])
    s_col = np.einsum("tad,iad->tai", q[:, 1], keys[1])
    per_core = np.einsum("tai,cab,tbj->tcij", s_row, cores[0], s_col)  # every cell of the grid
    total = per_core.sum(1).reshape(16, -1)
    best = np.argsort(-total, axis=1, kind="stable")[:, : memory.topk]
    np.testing.assert_array_equal(result.grid_indices[0], best)
    expected_scores = np.take_along_axis(per_core.reshape(16, 2, -1), best[:, None, :], axis=2)
    np.testing.assert_allclose(
        result.core_scores[0], expected_scores.transpose(0, 2, 1), rtol=1e-5, atol=1e-6
    )


def test_rank_one_vectors_are_the_leading_singular_pair_with_the_sign_rule():
    rng = np.random.default_rng(11)
    for _ in range(5):
        cores = rng.standard_normal((2, 3, 3)).astype(np.float32)
        u_star, t_star = rank_one_vectors(jnp.asarray(cores))
        left, s, right_t = np.linalg.svd(cores.sum(0).astype(np.float64))
        # Leading pair up to a common sign, and the sign puts u*'s largest-|entry| positive.
        sign = np.sign(np.dot(u_star, left[:, 0]))
        np.testing.assert_allclose(u_star, sign * left[:, 0], atol=1e-5)
        np.testing.assert_allclose(t_star, sign * right_t[0], atol=1e-5)
        assert u_star[np.argmax(np.abs(u_star))] > 0
        np.testing.assert_allclose(
            np.asarray(u_star) @ cores.sum(0) @ np.asarray(t_star), s[0], rtol=1e-5
        )


def test_rank_one_vectors_do_not_flip_between_calls_or_with_a_negated_svd(monkeypatch):
    cores = jnp.asarray(np.random.default_rng(5).standard_normal((2, 2, 2)), jnp.float32)
    first = rank_one_vectors(cores)
    second = rank_one_vectors(cores)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    flipped = canonical_sign(-first[0], -first[1])
    np.testing.assert_array_equal(flipped[0], first[0])
    np.testing.assert_array_equal(flipped[1], first[1])

    svd = jnp.linalg.svd

    def negated_svd(a, *args, **kwargs):
        left, s, right_t = svd(a, *args, **kwargs)
        return -left, s, -right_t

    monkeypatch.setattr(jnp.linalg, "svd", negated_svd)
    third = rank_one_vectors(cores)
    np.testing.assert_allclose(third[0], first[0], atol=1e-7)
    np.testing.assert_allclose(third[1], first[1], atol=1e-7)


def test_no_gradient_reaches_the_rank_one_vectors():
    cores = jnp.asarray(np.random.default_rng(6).standard_normal((2, 2, 2)), jnp.float32)
    weights = jnp.asarray([0.3, -1.2])
    grad = jax.grad(lambda c: jnp.sum(weights * sum(rank_one_vectors(c))))(cores)
    np.testing.assert_array_equal(grad, np.zeros((2, 2, 2)))
