"""The TPU (Mosaic) value_bag kernels: interpret-mode numerics vs `value_bag_reference` with
poisoned (NaN-initialised) outputs, the strict interpreter (races, out-of-bounds reads) with bad
row ids, gradients and their determinism, lowering for TPU at the model shapes, and a real Mosaic
compile for TPU v5e in a subprocess (skipped only where no Python with libtpu exists)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pallas_kernels import testing
from pallas_kernels.value_bag import tpu
from tests.kernels import value_bag_tpu_cases as cases
from umv2_jax.ops.value_bag import value_bag_reference


def _inputs(seed, n_tokens, n_slots, n_cores, n_rows, value_dim, pre_dim, dtype, pre, repeat=False):
    k = jax.random.split(jax.random.key(seed), 5)
    values = jax.random.normal(k[0], (n_rows, value_dim)).astype(dtype)
    pre_values = jax.random.normal(k[1], (n_rows, pre_dim)).astype(dtype) if pre else None
    high = 2 if repeat else n_rows  # repeated rows everywhere
    rows = jax.random.randint(k[2], (n_tokens, n_slots), 0, high)
    scores = jax.random.normal(k[3], (n_tokens, n_slots, n_cores))
    x_p = jax.random.normal(k[4], (n_tokens, pre_dim)).astype(dtype) if pre else None
    return values, pre_values, rows, scores, x_p


def _run(args, act, interpret=True):
    return tpu.value_bag_tpu(
        *args, pre_score_act=act, token_chunk=16, table_reduction="auto", interpret=interpret
    )


# Derandomized (tests/conftest.py). Explicit cases: one token and slot; T = 40 (not a multiple of
# the 16-token block) with every row id in {0, 1} (repeats everywhere) in bf16; T = 16, one block.
@settings(max_examples=3, deadline=None)
@example(n_tokens=1, n_slots=1, n_cores=1, value_dim=48, pre_dim=8, dtype=jnp.float32, pre=True,
         act="identity", repeat=False, seed=0)  # fmt: skip
@example(n_tokens=40, n_slots=4, n_cores=2, value_dim=96, pre_dim=48, dtype=jnp.bfloat16, pre=True,
         act="gelu", repeat=True, seed=1)  # fmt: skip
@example(n_tokens=16, n_slots=3, n_cores=2, value_dim=48, pre_dim=8, dtype=jnp.float32, pre=False,
         act="identity", repeat=True, seed=2)  # fmt: skip
@given(
    n_tokens=st.integers(1, 40),
    n_slots=st.integers(1, 4),
    n_cores=st.sampled_from([1, 2]),
    value_dim=st.sampled_from([48, 96]),
    pre_dim=st.sampled_from([8, 48]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    pre=st.booleans(),
    act=st.sampled_from(["identity", "gelu"]),
    repeat=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_matches_reference(
    n_tokens, n_slots, n_cores, value_dim, pre_dim, dtype, pre, act, repeat, seed
):
    args = _inputs(seed, n_tokens, n_slots, n_cores, 38, value_dim, pre_dim, dtype, pre, repeat)
    # uninitialized_memory="nan": outputs start NaN, so an element never written fails.
    out, p = _run(args, act, interpret=testing.tpu_interpret_params(detect_races=False))
    testing.assert_written(out, "out")
    testing.assert_written(p, "p")
    ref_out, ref_p = value_bag_reference(*args, pre_score_act=act, return_pre_scores=True)
    tol = testing.tolerance(dtype)
    np.testing.assert_allclose(np.asarray(p), np.asarray(ref_p), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out, np.float32), **tol)


def test_strict_interpreter_and_out_of_range_ids():
    """Races detected, out-of-bounds reads raising: ids -1 and N never read outside the tables, and
    the slots they fill come out NaN (the bug shows) while every other token is exact."""
    args = list(_inputs(0, 18, 3, 2, 20, 48, 8, jnp.float32, True))
    rows = args[2].at[3, 1].set(-1).at[17, 0].set(20)
    args[2] = rows
    out, p = _run(args, "gelu", interpret=testing.tpu_interpret_params())
    assert not testing.races_detected()
    bad = np.zeros(18, bool)
    bad[[3, 17]] = True
    assert np.isnan(np.asarray(out)[bad]).all() and np.isnan(np.asarray(p)[bad]).any()
    ref_out, ref_p = value_bag_reference(*args, pre_score_act="gelu", return_pre_scores=True)
    np.testing.assert_allclose(
        np.asarray(out)[~bad], np.asarray(ref_out)[~bad], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(np.asarray(p)[~bad], np.asarray(ref_p)[~bad], rtol=1e-5, atol=1e-5)
    d_scores, d_raw, d_x_p = tpu._backward_slots(
        *args,
        jnp.zeros((18, 3)),
        jnp.ones((18, 48)),
        jnp.ones((18, 3)),
        pre_score_act="gelu",
        token_chunk=16,
        interpret=testing.tpu_interpret_params(),
    )
    assert not testing.races_detected()
    assert np.isfinite(np.asarray(d_x_p)[~bad]).all() and np.isnan(np.asarray(d_x_p)[bad]).all()


@pytest.mark.parametrize("pre,act", [(True, "gelu"), (False, "identity")])
def test_gradients_match_reference_and_are_deterministic(pre, act):
    values, pre_values, rows, scores, x_p = _inputs(1, 21, 3, 2, 11, 48, 8, jnp.float32, pre, True)
    weights = jax.random.normal(jax.random.key(9), (21, 48))

    def loss(fn):
        def f(values, pre_values, scores, x_p):
            out, p = fn(values, pre_values, rows, scores, x_p)
            return jnp.sum(out * weights) + jnp.sum(jnp.sin(p))

        return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))

    kernel = loss(lambda *a: _run(a, act))
    reference = loss(lambda *a: value_bag_reference(*a, pre_score_act=act, return_pre_scores=True))
    got = kernel(values, pre_values, scores, x_p)
    want = reference(values, pre_values, scores, x_p)
    for name, g, w in zip(("values", "pre_values", "scores", "x_p"), got, want):
        if w is None:
            continue
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5, err_msg=name)
    again = kernel(values, pre_values, scores, x_p)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(again[0]))  # bitwise


def test_bf16_tables_match_reference():
    """bf16 tables are read as uint32 row pairs: even and odd rows (both halves of a word)."""
    args = _inputs(3, 20, 3, 2, 10, 48, 16, jnp.bfloat16, True)
    out, p = _run(args, "gelu", interpret=testing.tpu_interpret_params(detect_races=False))
    ref_out, ref_p = value_bag_reference(*args, pre_score_act="gelu", return_pre_scores=True)
    np.testing.assert_allclose(np.asarray(p), np.asarray(ref_p), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(out, np.float32),
        np.asarray(ref_out, np.float32),
        **testing.tolerance("bfloat16"),
    )


def test_declines_odd_bf16_row_count():
    args = cases.abstract_args("S_bf16")
    args = (jax.ShapeDtypeStruct((args[0].shape[0] - 1, args[0].shape[1]), jnp.bfloat16),) + (
        jax.ShapeDtypeStruct((args[1].shape[0] - 1, args[1].shape[1]), jnp.bfloat16),
        *args[2:],
    )
    with pytest.raises(NotImplementedError, match="odd number of rows"):
        jax.eval_shape(cases.forward, *args)


@pytest.mark.parametrize("pre", [True, False])
def test_table_kernel_strict_interpreter(pre):
    """backward_tables alone under the strict interpreter: every row vs the XLA scatter, rows that
    repeat across slot blocks (carried runs), untouched rows zero, ids outside [0, N) dropped, and
    (without pre-values) a last run that only the final grid step writes."""
    n_tokens, n_slots, n_cores, n_rows = 40, 8, 2, 13  # 320 slots: two blocks of 256
    k = jax.random.split(jax.random.key(5), 5)
    rows = jax.random.randint(k[0], (n_tokens, n_slots), 0, n_rows - 1)  # row 12 untouched
    if pre:  # without pre-values the last sorted run is a real row: the final flush writes it
        rows = rows.at[0, 0].set(n_rows).at[1, 1].set(n_rows + 5)
    flat = rows.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    weights = jax.random.normal(k[1], (n_tokens * n_slots, n_cores))
    d_out = jax.random.normal(k[2], (n_tokens, 48))
    d_raw = jax.random.normal(k[3], (n_tokens * n_slots,)) if pre else None
    x_p = jax.random.normal(k[4], (n_tokens, 8)) if pre else None
    args = (order, flat[order], weights, d_out, d_raw, x_p)
    got = tpu._backward_tables(
        *args, n_rows=n_rows, n_slots=n_slots, interpret=testing.tpu_interpret_params()
    )
    assert not testing.races_detected()
    tokens = order // n_slots
    contrib = weights[order][:, :, None] * d_out[tokens].reshape(-1, n_cores, 48 // n_cores)
    want = [jnp.zeros((n_rows, 48)).at[flat[order]].add(contrib.reshape(-1, 48), mode="drop")]
    if pre:
        want.append(
            jnp.zeros((n_rows, 8))
            .at[flat[order]]
            .add(d_raw[order][:, None] * x_p[tokens], mode="drop")
        )
    for g, w in zip(got, want):
        testing.assert_written(g, "d_table")
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
        assert not np.asarray(g)[n_rows - 1].any()
    if not pre:
        assert got[1] is None


def _compile(case_fn):
    if testing.tpu_python() is None:
        # Under CI (`CI` set) the test extra installs libtpu: a missing one fails, never skips.
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            "no Python with libtpu (pip install -e '.[test]' on linux x86_64)"
        )
    results = testing.compile_for_tpu_v5e(f"tests.kernels.value_bag_tpu_cases:{case_fn}")
    failed = {name: r.get("error") for name, r in results.items() if not r["ok"]}
    assert results and not failed, failed
    return results


def test_compiles_for_tpu_v5e():
    """Mosaic and XLA:TPU accept both kernels (one subprocess: S forward + gradients), compiled
    from this CPU host with the CPU as the default device (no `jax.default_device(tpu)` needed)."""
    results = _compile("default_compile_cases")
    assert {r["device_kind"] for r in results.values()} == {"TPU v5 lite"}
    assert {r["default_platform"] for r in results.values()} == {"cpu"}


@pytest.mark.slow
def test_compiles_for_tpu_v5e_every_shape():
    _compile("compile_cases")
