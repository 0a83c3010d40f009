"""The Pallas Triton selection kernels (pallas_kernels/retrieval_topk/gpu.py), run by the Pallas
interpreter on CPU against the XLA path and the token-by-token references, and lowered for CUDA.

Inputs are fresh random fp32 (scores distinct almost surely: index arrays must be equal, in
order), or integer-valued inputs with planted exact ties (the tie rule: lowest key id in stage 1,
lowest flat position i·k + j in stage 2, as `lax.top_k`). Kernel outputs start as NaN / INT32_MIN
buffers aliased to the outputs (`poison=True`), so an element never written shows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st
from jax import lax

from pallas_kernels.retrieval_topk import gpu
from umv2_jax.ops import registry
from umv2_jax.ops.product_key_topk import _product_key_topk_xla, product_key_topk_reference
from umv2_jax.ops.retrieval_topk import _retrieval_topk_xla, retrieval_topk_reference
from umv2_jax.ops.selection import product_key_kernel_implementation

# Interpret mode is slow: a failure is reported as found, without shrinking.
_NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)
RTOL = ATOL = 1e-5  # fp32 scores summed in a different order than XLA's HIGHEST einsum

retrieval_kernels = jax.jit(
    gpu.retrieval_kernel_implementation(gpu.KERNELS),
    static_argnames=("rc_topk", "topk", "interpret"),
)
product_key_kernels = jax.jit(
    product_key_kernel_implementation(gpu.KERNELS), static_argnames=("rc_topk", "topk", "interpret")
)


def _normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


def _retrieval_inputs(rng, n_tokens, rank, key_dim, n_keys, n_cores):
    u, t = rng.standard_normal((2, rank)).astype(np.float32)
    return (
        _normal(rng, (n_tokens, rank, key_dim)),
        _normal(rng, (n_tokens, rank, key_dim)),
        _normal(rng, (n_keys, rank, key_dim)),
        _normal(rng, (n_keys, rank, key_dim)),
        _normal(rng, (n_cores, rank, rank)),
        jnp.asarray(u / np.linalg.norm(u)),
        jnp.asarray(t / np.linalg.norm(t)),
    )


@st.composite
def _shapes(draw):
    n_keys = draw(st.integers(1, 80))
    rc_topk = draw(st.integers(1, min(n_keys, 20)))
    return dict(
        n_tokens=draw(st.integers(1, 40)),
        rank=draw(st.sampled_from([1, 2, 3])),
        key_dim=draw(st.sampled_from([4, 8, 48])),
        n_keys=n_keys,
        n_cores=draw(st.integers(1, 3)),
        rc_topk=rc_topk,
        topk=draw(st.integers(1, min(rc_topk * rc_topk, 40))),
    )


def _shape(n_tokens, rank, key_dim, n_keys, n_cores, rc_topk, topk):
    return dict(n_tokens=n_tokens, rank=rank, key_dim=key_dim, n_keys=n_keys, n_cores=n_cores,
                rc_topk=rc_topk, topk=topk)  # fmt: skip


def _tied_keys(keys):
    """Key j + ceil(n/2) an exact copy of key j: planted ties between far-apart ids."""
    half = -(-keys.shape[0] // 2)
    return jnp.concatenate([keys[:half], keys[:half]])[: keys.shape[0]]


# Explicit cases: the smallest shape; every shape bound at its largest; k = n with m = k² (every key
# and every cell selected); each with planted ties.
@settings(max_examples=3, deadline=None, derandomize=True, phases=_NO_SHRINK)
@given(shape=_shapes(), ties=st.booleans(), seed=st.integers(0, 2**16))
@example(shape=_shape(1, 1, 4, 1, 1, 1, 1), ties=True, seed=0)
@example(shape=_shape(40, 3, 48, 80, 3, 20, 40), ties=True, seed=1)
@example(shape=_shape(7, 2, 8, 6, 2, 6, 36), ties=True, seed=2)
def test_retrieval_kernels_match_xla_and_reference(shape, ties, seed):
    rng = np.random.default_rng(seed)
    k, m = shape["rc_topk"], shape["topk"]
    args = _retrieval_inputs(
        rng, shape["n_tokens"], shape["rank"], shape["key_dim"], shape["n_keys"], shape["n_cores"]
    )
    if ties:
        args = (*args[:2], _tied_keys(args[2]), _tied_keys(args[3]), *args[4:])
    indices, scores = retrieval_kernels(*args, rc_topk=k, topk=m, interpret=True)
    for oracle in (_retrieval_topk_xla, retrieval_topk_reference):
        want_indices, want_scores = oracle(*args, rc_topk=k, topk=m)
        np.testing.assert_array_equal(indices, want_indices)
        # Absolute error relative to the largest score: cores summed in another order cancel
        # differently (at the largest shape, 1e-4 on a -0.3 score beside scores of 225).
        scale = max(10.0, float(np.abs(np.asarray(want_scores)).max()))
        np.testing.assert_allclose(scores, want_scores, rtol=RTOL, atol=ATOL * scale)


# Explicit cases (k = min(n, 1 + seed % 16), m = 1 + seed % k²): one token, n = k = 2, m = k² = 4;
# the largest shape with k = m = 16.
@settings(max_examples=2, deadline=None, derandomize=True, phases=_NO_SHRINK)
@given(
    n_tokens=st.integers(1, 33),
    n_keys=st.integers(2, 70),
    key_dim=st.sampled_from([8, 48]),
    seed=st.integers(0, 2**16),
)
@example(n_tokens=1, n_keys=2, key_dim=8, seed=3)
@example(n_tokens=33, n_keys=70, key_dim=48, seed=15 + 16 * 256)
def test_product_key_kernels_match_xla_and_reference(n_tokens, n_keys, key_dim, seed):
    rng = np.random.default_rng(seed)
    k = min(n_keys, 1 + seed % 16)
    m = 1 + seed % (k * k)
    args = [_normal(rng, s) for s in [(n_tokens, key_dim)] * 2 + [(n_keys, key_dim)] * 2]
    rows, scores = product_key_kernels(*args, rc_topk=k, topk=m, interpret=True)
    for oracle in (_product_key_topk_xla, product_key_topk_reference):
        want_rows, want_scores = oracle(*args, rc_topk=k, topk=m)
        np.testing.assert_array_equal(rows, want_rows)
        np.testing.assert_allclose(scores, want_scores, rtol=RTOL, atol=ATOL)


def test_stage1_writes_every_output_and_keeps_lowest_ids_on_planted_ties():
    """Integer-valued queries and keys: every score is exact, and each key appears three times."""
    rng = np.random.default_rng(0)
    n_tokens, rank, key_dim, rc_topk = 19, 2, 8, 11
    base = rng.integers(-2, 3, (23, rank, key_dim)).astype(np.float32)
    keys = jnp.asarray(np.concatenate([base, base[::-1], base]))  # 69 keys, triples tie
    q = jnp.asarray(rng.integers(-2, 3, (n_tokens, rank, key_dim)).astype(np.float32))
    w = jnp.asarray([1.0, 2.0])
    cand, cand2, s, s2 = gpu.stage1(
        q, q, keys, keys, w, w, rc_topk=rc_topk, interpret=True, poison=True
    )
    per_rank = jnp.einsum("tad,nad->tan", q, keys, precision=lax.Precision.HIGHEST)
    _, want = lax.top_k(jnp.einsum("a,tan->tn", w, per_rank), rc_topk)  # ties: lowest index
    np.testing.assert_array_equal(cand, want)
    np.testing.assert_array_equal(cand2, want)
    np.testing.assert_array_equal(s, jnp.take_along_axis(per_rank, want[:, None, :], 2))
    np.testing.assert_array_equal(s2, s)


@pytest.mark.parametrize("product_key", [False, True])
def test_stage2_writes_every_output_and_keeps_lowest_positions_on_planted_ties(product_key):
    rng = np.random.default_rng(1)
    n_tokens, rc_topk, topk = 21, 9, 50
    rank = 1 if product_key else 2
    r_cand = jnp.asarray(rng.integers(-2, 3, (n_tokens, rank, rc_topk)).astype(np.float32))
    q_cand = jnp.asarray(rng.integers(-2, 3, (n_tokens, rank, rc_topk)).astype(np.float32))
    core_sum = None if product_key else jnp.asarray([[1.0, 2.0], [0.0, -1.0]])
    best_i, best_j = gpu.stage2(r_cand, q_cand, core_sum, topk=topk, interpret=True, poison=True)
    if product_key:
        total = r_cand[:, 0, :, None] + q_cand[:, 0, None, :]
    else:
        total = jnp.einsum("tai,ab,tbj->tij", r_cand, core_sum, q_cand)
    _, want = lax.top_k(total.reshape(n_tokens, -1), topk)  # exact integers, many ties
    np.testing.assert_array_equal(best_i, want // rc_topk)
    np.testing.assert_array_equal(best_j, want % rc_topk)


# --------------------------------------------------------------------------------------------------
# Cross-lowering for CUDA from this host (abstract inputs: nothing is allocated).

# name: (T, r, D_k, n, k, m, C, heads)
RETRIEVAL_SHAPES = {
    "tiny_T_not_block_multiple": (37, 2, 48, 100, 12, 20, 3, 1),
    "S_config": (4096, 2, 64, 128, 16, 16, 2, 2),
    "227M": (16384, 2, 192, 360, 32, 32, 1, 1),
    "1B_7B": (16384, 2, 512, 528, 128, 128, 1, 1),
    "2.5B_top768": (16384, 2, 192, 360, 128, 768, 1, 1),
    "2.5B_top256": (16384, 2, 192, 360, 128, 256, 1, 1),
    "ring16_n3856": (4099, 2, 192, 3856, 32, 32, 1, 1),
    "heads_4": (1000, 2, 192, 360, 32, 32, 2, 4),
}
# name: (T, D_k, n, k, m, heads)
PRODUCT_KEY_SHAPES = {
    "memory_plus": (16384, 384, 1138, 32, 32, 2),
    "pkm_768": (1000, 256, 512, 128, 768, 1),
}


def _lowered_text(fn, args):
    with registry.lowering_platforms("cuda"):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("name", RETRIEVAL_SHAPES)
def test_retrieval_kernels_lower_for_cuda(name):
    n_tokens, rank, key_dim, n_keys, k, m, n_cores, heads = RETRIEVAL_SHAPES[name]
    impl = gpu.retrieval_kernel_implementation(gpu.KERNELS)
    f32 = jnp.float32

    def one_head(*args):
        return impl(*args, rc_topk=k, topk=m)

    fn = jax.vmap(one_head) if heads > 1 else one_head
    lead = (heads,) if heads > 1 else ()
    shapes = [(n_tokens, rank, key_dim)] * 2 + [(n_keys, rank, key_dim)] * 2
    shapes += [(n_cores, rank, rank), (rank,), (rank,)]
    args = [jax.ShapeDtypeStruct(lead + s, f32) for s in shapes]
    text = _lowered_text(fn, args)
    assert text.count("retrieval_stage1") >= 1 and text.count("retrieval_stage2") >= 1


@pytest.mark.parametrize("name", PRODUCT_KEY_SHAPES)
def test_product_key_kernels_lower_for_cuda(name):
    n_tokens, key_dim, n_keys, k, m, heads = PRODUCT_KEY_SHAPES[name]
    impl = product_key_kernel_implementation(gpu.KERNELS)

    def one_head(*args):
        return impl(*args, rc_topk=k, topk=m)

    shapes = [(heads, n_tokens, key_dim)] * 2 + [(heads, n_keys, key_dim)] * 2
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    text = _lowered_text(jax.vmap(one_head), args)
    assert text.count("retrieval_stage1") >= 1 and text.count("retrieval_stage2") >= 1
