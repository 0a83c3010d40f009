"""value_bag's Pallas Triton kernels (pallas_kernels.value_bag.gpu): numerics in the interpreter,
gradients through the custom VJP, determinism, out-of-range ids, and lowering for CUDA from CPU.

Tolerances (pallas_kernels.testing.tolerance): float32 1e-5 (same float32 products, another
summation order than the HIGHEST-precision einsum reference); bfloat16 1e-2 (one final rounding to
8 mantissa bits). Outputs are poisoned (NaN-filled buffers aliased to the outputs): any element a
kernel does not write stays NaN and fails.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from pallas_kernels.testing import assert_written, tolerance
from pallas_kernels.value_bag import gpu
from umv2_jax.ops import registry
from umv2_jax.ops import value_bag as value_bag_lib
from umv2_jax.ops.value_bag import XLA_KERNELS, custom_value_bag, value_bag_reference


def _inputs(seed, *, tokens, slots, n_rows, n_cores, chunk_dim, pre_dim, with_pre, dtype,
            repeat=True):  # fmt: skip
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n_rows, size=(tokens, slots))
    if repeat and slots > 1:
        rows[:, 1] = rows[:, 0]  # the same row twice within a token
    if repeat:
        rows[::2, -1] = rows[0, 0]  # a hot row shared across tokens
    value_dim = n_cores * chunk_dim
    as_array = lambda x: None if x is None else jnp.asarray(x, dtype)
    return (
        as_array(rng.normal(size=(n_rows, value_dim))),
        as_array(rng.normal(size=(n_rows, pre_dim)) if with_pre else None),
        jnp.asarray(rows, jnp.int32),
        as_array(rng.normal(size=(tokens, slots, n_cores))),
        as_array(rng.normal(size=(tokens, pre_dim)) if with_pre else None),
    )


def _passes(inputs, act, seed, poison=True):
    """(forward, backward_slots, backward_tables) outputs of GPU_KERNELS and of XLA_KERNELS."""
    values, pre_values, rows, core_scores, x_p = inputs
    tokens, slots, n_cores = core_scores.shape
    rng = np.random.default_rng(seed)
    d_out = jnp.asarray(rng.normal(size=(tokens, values.shape[1])), values.dtype)
    d_pre = jnp.asarray(rng.normal(size=(tokens, slots)), jnp.float32)
    options = dict(pre_score_act=act, token_chunk=8, table_reduction="auto")

    def run(kernels, **extra):
        out, raw = kernels.forward(*inputs, **options, **extra)
        slot_grads = kernels.backward_slots(*inputs, raw, d_out, d_pre, **options, **extra)
        p = value_bag_lib._pre_scores(raw, pre_values, act)
        weights = core_scores.astype(jnp.float32).reshape(-1, n_cores) * p.reshape(-1, 1)
        flat = rows.reshape(-1)
        order = jnp.argsort(flat, stable=True).astype(jnp.int32)
        d_raw = None if pre_values is None else slot_grads[1].reshape(-1)
        tables = kernels.backward_tables(
            order, flat[order], weights, d_out, d_raw, x_p, n_rows=values.shape[0],
            n_slots=slots, **options, **extra,
        )  # fmt: skip
        return (out, raw), slot_grads, tables

    got = jax.jit(functools.partial(run, gpu.GPU_KERNELS, interpret=True, poison=poison))()
    want = jax.jit(functools.partial(run, XLA_KERNELS))()
    return got, want


# Derandomized (tests/conftest.py). Explicit cases: every dimension 1; a one-row table (every slot
# the same row: one run of all T·m sorted slots, the table passes' tie case) at the largest other
# bounds in bf16; repeated rows within and across tokens at odd sizes.
_EXAMPLE_FIELDS = ("tokens", "slots", "n_rows", "n_cores", "chunk_dim", "pre_dim", "with_pre", "act",
                   "dtype", "repeat", "seed")  # fmt: skip


def _example(*values):
    return example(**dict(zip(_EXAMPLE_FIELDS, values, strict=True)))


@settings(max_examples=4, deadline=None, phases=(Phase.explicit, Phase.generate))
@_example(1, 1, 1, 1, 1, 1, True, "identity", jnp.float32, False, 0)
@_example(20, 5, 1, 3, 24, 48, True, "gelu", jnp.bfloat16, True, 1)
@_example(17, 4, 3, 2, 3, 6, False, "identity", jnp.float32, True, 2)
@given(
    tokens=st.integers(1, 20),
    slots=st.integers(1, 5),
    n_rows=st.integers(1, 24),
    n_cores=st.sampled_from([1, 2, 3]),
    chunk_dim=st.sampled_from([1, 3, 8, 24]),
    pre_dim=st.sampled_from([1, 6, 16, 48]),
    with_pre=st.booleans(),
    act=st.sampled_from(["identity", "gelu"]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    repeat=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_every_pass_matches_xla_and_forward_matches_reference(
    tokens, slots, n_rows, n_cores, chunk_dim, pre_dim, with_pre, act, dtype, repeat, seed
):
    inputs = _inputs(seed, tokens=tokens, slots=slots, n_rows=n_rows, n_cores=n_cores,
                     chunk_dim=chunk_dim, pre_dim=pre_dim, with_pre=with_pre, dtype=dtype,
                     repeat=repeat)  # fmt: skip
    got, want = _passes(inputs, act, seed)
    tol = tolerance(dtype)
    names = ("out", "raw", "d_scores", "d_raw", "d_x_p", "d_values", "d_pre_values")
    flat = lambda tree: [x for group in tree for x in group]
    for name, g, w in zip(names, flat(got), flat(want), strict=True):
        if w is None:
            assert g is None, name
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert_written(g, name)
        scale = max(1.0, float(jnp.max(jnp.abs(w.astype(jnp.float32)))))
        np.testing.assert_allclose(
            np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol["rtol"],
            atol=tol["atol"] * scale, err_msg=name,
        )  # fmt: skip
    # And the forward against the oracle itself (one gather, one einsum).
    out, pre_scores = value_bag_reference(*inputs, pre_score_act=act, return_pre_scores=True)
    p = value_bag_lib._pre_scores(got[0][1], inputs[1], act)
    np.testing.assert_allclose(np.asarray(got[0][0], np.float32), np.asarray(out, np.float32),
                               **tol)  # fmt: skip
    np.testing.assert_allclose(p, pre_scores, **tolerance(jnp.float32))


def test_gelu_without_erf_matches_exact_gelu():
    """The in-kernel erf (Triton has none) agrees with jax.nn.gelu(approximate=False) and its
    derivative to float32 rounding over the range that matters."""
    x = jnp.linspace(-8.0, 8.0, 4001, dtype=jnp.float32)
    exact = jax.nn.gelu(x, approximate=False)
    np.testing.assert_allclose(gpu._act(x, "gelu"), exact, rtol=2e-6, atol=2e-7)
    exact_grad = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    np.testing.assert_allclose(gpu._act_grad(x, "gelu"), exact_grad, rtol=2e-6, atol=2e-7)


# Small shapes for the gradient tests; T = 13 is not a multiple of the token block.
SMALL = dict(tokens=13, slots=4, n_rows=9, n_cores=2, chunk_dim=3, pre_dim=5)


def _op(reduction="auto", act="gelu"):
    return functools.partial(
        custom_value_bag, gpu.GPU_KERNELS, pre_score_act=act, token_chunk=8,
        table_reduction=reduction, interpret=True,
    )  # fmt: skip


def _grads(fn, inputs, seed=5):
    values, pre_values, rows, core_scores, x_p = inputs
    rng = np.random.default_rng(seed)
    w_out = jnp.asarray(rng.normal(size=(rows.shape[0], values.shape[1])), jnp.float32)
    w_pre = jnp.asarray(rng.normal(size=rows.shape), jnp.float32)

    def loss(values, pre_values, core_scores, x_p):
        out, p = fn(values, pre_values, rows, core_scores, x_p)
        return jnp.sum(w_out * out.astype(jnp.float32)) + jnp.sum(w_pre * p)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(
        values, pre_values, core_scores, x_p
    )


@pytest.mark.parametrize("with_pre, act", [(True, "gelu"), (True, "identity"), (False, "identity")])
def test_every_gradient_matches_reference(with_pre, act):
    inputs = _inputs(0, **SMALL, with_pre=with_pre, dtype=jnp.float32)
    got_loss, got = _grads(_op(act=act), inputs)
    reference = functools.partial(value_bag_reference, pre_score_act=act, return_pre_scores=True)
    want_loss, want = _grads(reference, inputs)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for name, g, w in zip(("values", "pre_values", "core_scores", "x_p"), got, want):
        if w is None:
            assert g is None, name
            continue
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_check_grads_through_the_op():
    inputs = _inputs(1, tokens=5, slots=3, n_rows=4, n_cores=2, chunk_dim=2, pre_dim=3,
                     with_pre=True, dtype=jnp.float32)  # fmt: skip
    values, pre_values, rows, core_scores, x_p = inputs
    op = _op()

    def f(values, pre_values, core_scores, x_p):
        out, p = op(values, pre_values, rows, core_scores, x_p)
        return out, p

    check_grads(
        f, (values, pre_values, core_scores, x_p), order=1, modes=("rev",), atol=1e-2, rtol=1e-2,
        eps=1e-3,
    )  # fmt: skip


def test_table_gradient_is_bitwise_identical_across_runs_and_atomic_matches():
    inputs = _inputs(2, **SMALL, with_pre=True, dtype=jnp.float32)
    values, pre_values, rows, core_scores, x_p = inputs

    def table_grads(reduction):
        op = _op(reduction)
        loss = lambda v, p: jnp.sum(op(v, p, rows, core_scores, x_p)[0] ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    first = table_grads("auto")(values, pre_values)
    second = table_grads("auto")(values, pre_values)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The opt-in atomic reduction sums in another order: equal to rounding, not bitwise.
    for a, b in zip(table_grads("atomic")(values, pre_values), first):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_out_of_range_ids_read_nan_and_drop_their_gradient():
    """A bad id never touches memory: its token reads NaN (as the XLA path does, negative ids
    included), the other tokens are exact, and the table gradient ignores the slot."""
    inputs = _inputs(3, **SMALL, with_pre=True, dtype=jnp.float32, repeat=False)
    values, pre_values, rows, core_scores, x_p = inputs
    n_rows = values.shape[0]
    bad = rows.at[2, 1].set(n_rows + 5).at[7, 0].set(-3)
    out, raw = gpu.forward(values, pre_values, bad, core_scores, x_p, pre_score_act="identity",
                           interpret=True)  # fmt: skip
    want, want_raw = XLA_KERNELS.forward(
        values, pre_values, bad, core_scores, x_p, pre_score_act="identity", token_chunk=8
    )
    assert np.isnan(np.asarray(out)[[2, 7]]).all()
    good = np.setdiff1d(np.arange(rows.shape[0]), [2, 7])
    np.testing.assert_allclose(np.asarray(out)[good], np.asarray(want)[good], rtol=1e-5, atol=1e-5)
    # Exactly the bad slots' raw pre-scores are NaN, in the kernel and on the XLA path.
    expected_nan = np.zeros(rows.shape, bool)
    expected_nan[2, 1] = expected_nan[7, 0] = True
    np.testing.assert_array_equal(np.isnan(raw), expected_nan)
    np.testing.assert_array_equal(np.isnan(want_raw), expected_nan)
    np.testing.assert_allclose(np.asarray(raw)[~expected_nan], np.asarray(want_raw)[~expected_nan],
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    # Table gradients with the bad slots present: finite, and equal to the gradient without them.
    rng = np.random.default_rng(0)
    d_out = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
    weights = jnp.ones((bad.size, 2), jnp.float32)
    d_raw = jnp.ones((bad.size,), jnp.float32)
    flat = bad.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    for reduction in ("auto", "atomic"):
        got = gpu.backward_tables(order, flat[order], weights, d_out, d_raw, x_p, n_rows=n_rows,
                                  n_slots=bad.shape[1], table_reduction=reduction,
                                  interpret=True)  # fmt: skip
        # The reference: the same slots with the two bad ones given zero weight.
        keep = ((flat >= 0) & (flat < n_rows)).astype(jnp.float32)
        clean = jnp.where(keep > 0, flat, 0)
        clean_order = jnp.argsort(clean, stable=True).astype(jnp.int32)
        ref = XLA_KERNELS.backward_tables(clean_order, clean[clean_order], weights * keep[:, None],
                                          d_out, d_raw * keep, x_p, n_rows=n_rows,
                                          n_slots=bad.shape[1], token_chunk=8,
                                          table_reduction="sorted_scatter")  # fmt: skip
        for g, w in zip(got, ref):
            assert np.isfinite(np.asarray(g)).all()
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=reduction)


def test_declines_unsupported_table_dtypes():
    inputs = _inputs(4, **SMALL, with_pre=False, dtype=jnp.float16)
    with pytest.raises(NotImplementedError, match="float16"):
        gpu.value_bag_gpu(*inputs, pre_score_act="identity", token_chunk=8,
                          table_reduction="auto")  # fmt: skip


def test_pieces_cover_every_dim_in_powers_of_two():
    for dim in (1, 7, 24, 48, 192, 384, 768, 1000):
        parts = gpu.pieces(dim)
        assert sum(size for _, size in parts) == dim
        assert all(size & (size - 1) == 0 for _, size in parts)
        assert [start for start, _ in parts] == list(
            np.cumsum([0] + [size for _, size in parts])[:-1]
        )


# ---------------------------------------------------------------------------------------------------
# Lowering for CUDA from this CPU machine (Triton IR is built at lowering time).

SHAPES = {
    # name: (T, m, C, N rows, D_v, D_p, table dtype)
    "S": (512, 16, 2, 4 * 146**2, 48, 16, jnp.bfloat16),
    "227M": (16384, 32, 2, 20 * 360**2, 192, 192, jnp.bfloat16),
    "1B7B": (4096, 128, 2, 16 * 528**2, 768, 384, jnp.bfloat16),
    # > 2^31 elements in the value table (float32: 8.6 GB), given as a ShapeDtypeStruct only.
    "huge": (256, 32, 2, 2**31 // 192 + 4096, 192, 192, jnp.float32),
}


def _lower_training_step(shape, reduction="auto"):
    tokens, slots, n_cores, n_rows, value_dim, pre_dim, dtype = shape
    sd = jax.ShapeDtypeStruct
    args = (
        sd((n_rows, value_dim), dtype),
        sd((n_rows, pre_dim), dtype),
        sd((tokens, slots), jnp.int32),
        sd((tokens, slots, n_cores), jnp.float32),
        sd((tokens, pre_dim), dtype),
    )

    def step(values, pre_values, rows, core_scores, x_p):
        def loss(values, pre_values, core_scores, x_p):
            out, p = value_bag_lib.value_bag(
                values, pre_values, rows, core_scores, x_p, pre_score_act="gelu",
                implementation="auto", table_reduction=reduction, return_pre_scores=True,
            )  # fmt: skip
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(p)

        return jax.grad(loss, argnums=(0, 1, 2, 3))(values, pre_values, core_scores, x_p)

    with registry.lowering_platforms("cuda"):
        return jax.jit(step).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("name", list(SHAPES))
def test_forward_and_backward_lower_for_cuda(name, monkeypatch, capsys):
    monkeypatch.setattr(gpu, "DEBUG", True)  # print each kernel's Triton module
    text = _lower_training_step(SHAPES[name])
    # auto on CUDA reaches the three kernels (forward, backward_slots, backward_tables).
    assert text.count("__gpu$xla.gpu.triton") == 3
    triton = capsys.readouterr().out
    for kernel in ("value_bag_forward", "value_bag_backward_slots", "value_bag_backward_tables"):
        assert kernel in triton, kernel
    table_offsets = "tensor<16x128x!tt.ptr<f32>>, tensor<16x128xi64>"
    if name == "huge":
        # Rows of the > 2^31-element table are addressed with 64-bit offsets.
        assert table_offsets in triton
    elif name == "227M":
        assert "xi64>" not in triton  # small tables keep 32-bit offsets


def test_atomic_table_reduction_lowers_for_cuda():
    text = _lower_training_step(SHAPES["227M"], reduction="atomic")
    assert text.count("__gpu$xla.gpu.triton") == 3
