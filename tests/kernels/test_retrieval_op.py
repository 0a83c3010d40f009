"""`retrieval_topk` / `product_key_topk` built on selection kernels (umv2_jax/ops/selection.py):
forward and every gradient equal the XLA path's, with stand-in kernels written in plain JAX (both
stage-1 output forms) and with the Pallas Triton kernels in the interpreter, end to end through
the UltraMemV2 and Memory+ layers; and the ops' trace-time ValueErrors.

Gradient tolerance: fp32, the kernels' candidate scores are summed in a different order (1e-4
relative, atol 1e-4 × the largest magnitude).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from pallas_kernels.retrieval_topk import gpu
from tests.models import test_product_key as pk_tests
from tests.models import test_ultramem_v2 as v2_tests
from umv2_jax.models.sparse import SparseContext
from umv2_jax.ops import registry
from umv2_jax.ops.product_key_topk import _product_key_topk_xla, product_key_topk
from umv2_jax.ops.retrieval_topk import _retrieval_topk_xla, retrieval_topk
from umv2_jax.ops.selection import (
    SelectionKernels,
    product_key_kernel_implementation,
    retrieval_kernel_implementation,
)

GRAD_RTOL = 1e-4


def _close(actual, expected, rtol=GRAD_RTOL):
    expected = np.asarray(expected)
    np.testing.assert_allclose(
        actual, expected, rtol=rtol, atol=rtol * max(1.0, float(np.abs(expected).max()))
    )


def _plain_stage1(with_scores):
    def stage1(q_row, q_col, k_row, k_col, w_row, w_col, *, rc_topk, interpret=False):
        del interpret
        out_ids, out_scores = [], []
        for q, key, w in ((q_row, k_row, w_row), (q_col, k_col, w_col)):
            s = jnp.einsum("tad,nad->tan", q, key, precision=lax.Precision.HIGHEST)
            _, ids = lax.top_k(jnp.einsum("a,tan->tn", w, s), rc_topk)
            out_ids.append(ids)
            out_scores.append(jnp.take_along_axis(s, ids[:, None, :], 2))
        return (*out_ids, *out_scores) if with_scores else tuple(out_ids)

    return stage1


def _plain_stage2(r_cand, q_cand, core_sum, *, topk, interpret=False):
    del interpret
    if core_sum is None:
        total = r_cand[:, 0, :, None] + q_cand[:, 0, None, :]
    else:
        total = jnp.einsum("tai,ab,tbj->tij", r_cand, core_sum, q_cand)
    k = r_cand.shape[-1]
    _, best = lax.top_k(total.reshape(total.shape[0], k * k), topk)
    return best // k, best % k


PLAIN = {
    "plain_dense": SelectionKernels(_plain_stage1(False), _plain_stage2),
    "plain_scores": SelectionKernels(_plain_stage1(True), _plain_stage2),
    "triton_interpret": gpu.KERNELS,
}


def _retrieval_args(seed, n_tokens=13, rank=2, key_dim=8, n_keys=17, n_cores=3):
    rng = np.random.default_rng(seed)
    shapes = [(n_tokens, rank, key_dim)] * 2 + [(n_keys, rank, key_dim)] * 2
    shapes += [(n_cores, rank, rank)]
    arrays = [jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    u, t = rng.standard_normal((2, rank)).astype(np.float32)
    return [*arrays, jnp.asarray(u / np.linalg.norm(u)), jnp.asarray(t / np.linalg.norm(t))]


def _forward_and_grads(fn, args, cotangent, **options):
    def loss(q_row, q_col, k_row, k_col, cores):
        indices, scores = fn(q_row, q_col, k_row, k_col, cores, *args[5:], **options)
        return jnp.sum(scores * cotangent), indices

    (value, indices), grads = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(
        *args[:5]
    )
    return indices, value, grads


@pytest.mark.parametrize("kernels", PLAIN)
def test_retrieval_with_kernels_matches_xla_forward_and_gradients(kernels):
    k, m = 6, 9
    args = _retrieval_args(0)
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal((13, m, 3)), jnp.float32)
    impl = retrieval_kernel_implementation(PLAIN[kernels])
    interpret = {"interpret": True} if kernels == "triton_interpret" else {}
    got = _forward_and_grads(impl, args, cotangent, rc_topk=k, topk=m, **interpret)
    want = _forward_and_grads(_retrieval_topk_xla, args, cotangent, rc_topk=k, topk=m)
    np.testing.assert_array_equal(got[0], want[0])
    _close(got[1], want[1], rtol=1e-5)
    for name, g, w in zip(["q_row", "q_col", "k_row", "k_col", "cores"], got[2], want[2]):
        assert float(jnp.abs(w).max()) > 0, name
        _close(g, w)


@pytest.mark.parametrize("kernels", PLAIN)
def test_product_key_with_kernels_matches_xla_forward_and_gradients(kernels):
    rng = np.random.default_rng(2)
    k, m = 5, 7
    args = [jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in [(11, 8)] * 2]
    args += [jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in [(14, 8)] * 2]
    cotangent = jnp.asarray(rng.standard_normal((11, m)).astype(np.float32))
    impl = product_key_kernel_implementation(PLAIN[kernels])
    interpret = kernels == "triton_interpret"

    def run(fn, **options):
        def loss(*arrays):
            rows, scores = fn(*arrays, rc_topk=k, topk=m, **options)
            return jnp.sum(scores * cotangent), rows

        return jax.jit(jax.value_and_grad(loss, argnums=range(4), has_aux=True))(*args)

    (value, rows), grads = run(impl, **({"interpret": True} if interpret else {}))
    (want_value, want_rows), want_grads = run(_product_key_topk_xla)
    np.testing.assert_array_equal(rows, want_rows)
    _close(value, want_value, rtol=1e-5)
    for g, w in zip(grads, want_grads):
        _close(g, w)


def test_auto_reaches_the_triton_kernels_when_lowered_for_cuda_and_xla_on_cpu():
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in _retrieval_args(0)]

    def fn(*arrays):
        return retrieval_topk(*arrays, rc_topk=4, topk=5)

    with registry.lowering_platforms("cuda"):
        cuda = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    cpu = jax.jit(fn).trace(*args).lower(lowering_platforms=("cpu",)).as_text()
    assert "retrieval_stage1" in cuda and "retrieval_stage2" in cuda
    assert "retrieval_stage1" not in cpu


# --------------------------------------------------------------------------------------------------
# End to end: the layers with the op's xla implementation swapped for the Triton kernels.


@pytest.fixture
def triton_as_xla(monkeypatch):
    """Within the test, the ops' "xla" name runs the Triton kernels in the interpreter (so the layers,
    whose implementation resolves to "xla" on CPU, reach them); "auto" otherwise unchanged."""

    def swap(op_name, impl):
        def interpreted(*args, interpret=False, **options):
            del interpret
            return impl(*args, interpret=True, **options)

        op = registry._op(op_name)
        monkeypatch.setitem(
            op.implementations, "xla", dict.fromkeys(registry.PLATFORMS, interpreted)
        )

    def apply():
        swap("retrieval_topk", retrieval_kernel_implementation(gpu.KERNELS))
        swap("product_key_topk", product_key_kernel_implementation(gpu.KERNELS))

    return apply


def _ultramem_v2_run(config):
    layer, tables = v2_tests.random_layer(config, 1, seed=3)
    rng = np.random.default_rng(4)
    u = jnp.asarray(rng.standard_normal((*v2_tests.TOKENS, v2_tests.D_MODEL)).astype(np.float32))
    cotangent = jnp.asarray(rng.standard_normal(u.shape).astype(np.float32))
    from flax import nnx

    graphdef, params, rest = nnx.split((layer, tables), nnx.Param, ...)

    def loss(params, u):
        layer, tables = nnx.merge(graphdef, params, rest)
        y = layer(u, SparseContext(shared=tables)).y
        return jnp.sum(y * cotangent), y

    (_, y), (grads, grad_u) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, u)
    return y, grad_u, nnx.to_pure_dict(grads)


def test_ultramem_v2_layer_with_triton_kernels_matches_xla(triton_as_xla):
    config = v2_tests.model_config(2, n_keys=6, key_dim=8, rc_topk=4, topk=6, heads=2)
    want = _ultramem_v2_run(config)
    triton_as_xla()
    got = _ultramem_v2_run(config)
    _compare_runs(got, want)


def test_memory_plus_layer_with_triton_kernels_matches_xla(triton_as_xla):
    config = pk_tests._config("memory_plus", value_dim=12, key_norm=True)
    holder = pk_tests._build(config, 3, seed=4)
    u = pk_tests._random((2, 3, pk_tests.HIDDEN), 5)
    cotangent = pk_tests._random(u.shape, 6)
    want = pk_tests._layer_outputs(holder, u, cotangent)
    triton_as_xla()
    got = pk_tests._layer_outputs(holder, u, cotangent)
    _compare_runs(got, want)


def _compare_runs(got, want):
    _close(got[0], want[0], rtol=1e-5)
    _close(got[1], want[1])
    flat_got = jax.tree_util.tree_leaves_with_path(got[2])
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want[2]))
    assert len(flat_got) == len(flat_want) > 0
    for path, g in flat_got:
        _close(g, flat_want[path])


# --------------------------------------------------------------------------------------------------
# Bad input: trace-time ValueErrors naming the argument and the numbers.


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rc_topk=18), "rc_topk must be in \\[1, keys per side=17\\]; got 18"),
        (dict(topk=37), "topk must be in \\[1, rc_topk²=36\\]; got 37"),
        (dict(cores=jnp.zeros((3, 3, 3))), "cores must be \\[C, r=2, r=2\\]"),
        (dict(k_row=jnp.zeros((17, 3, 8))), "k_row and k_col must both be \\[N, r=2, D_k=8\\]"),
        (dict(q_row=jnp.full((13, 2, 8), jnp.nan)), "q_row has 208 non-finite entries"),
    ],
)
def test_retrieval_rejects_bad_inputs(change, message):
    names = ["q_row", "q_col", "k_row", "k_col", "cores", "u_star", "t_star"]
    arrays = dict(zip(names, _retrieval_args(0)))
    options = dict(rc_topk=6, topk=9)
    for key, value in change.items():
        (options if key in options else arrays)[key] = value
    with pytest.raises(ValueError, match=message):
        retrieval_topk(*arrays.values(), **options)


def test_product_key_rejects_non_finite_queries():
    q = jnp.zeros((3, 4)).at[1, 2].set(jnp.inf)
    with pytest.raises(ValueError, match="q_col has 1 non-finite entries of 12"):
        product_key_topk(
            jnp.zeros((3, 4)), q, jnp.zeros((5, 4)), jnp.zeros((5, 4)), rc_topk=2, topk=2
        )


def test_explicit_pallas_on_cpu_runs_vmapped_over_heads_under_jit():
    """implementation="pallas" alone on CPU interprets the kernel; heads vmapped over the op's
    per-platform conditional must batch (the TPU interpreter's IO callbacks could not)."""
    keys = jax.random.split(jax.random.key(3), 3)
    heads, tokens, n_keys, rank, key_dim = 2, 16, 12, 2, 8
    queries = jax.random.normal(keys[0], (heads, tokens, rank, key_dim))
    key_table = jax.random.normal(keys[1], (heads, n_keys, rank, key_dim))
    cores = jax.random.normal(keys[2], (heads, 2, rank, rank))
    u_star = jnp.full((rank,), rank**-0.5)

    def select(implementation):
        one = lambda q, k, c: retrieval_topk(  # noqa: E731
            q, q, k, k, c, u_star, u_star, rc_topk=4, topk=6, implementation=implementation
        )
        return jax.jit(jax.vmap(one))(queries, key_table, cores)

    (got_rows, got_scores), (want_rows, want_scores) = select("pallas"), select("xla")
    np.testing.assert_array_equal(got_rows, want_rows)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-5)
