"""value_bag: weighted gather-sum with pre-values (docs/model.md §2 steps 7–8), custom VJP vs autodiff."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.extend import core as jax_core

from tests.fixtures import load_release_case
from umv2_jax.ops import registry
from umv2_jax.ops import value_bag as value_bag_lib
from umv2_jax.ops.value_bag import value_bag, value_bag_reference

# Every registered implementation, Pallas kernels in the interpreter.
IMPLEMENTATIONS = [
    pytest.param(name, name == "pallas", id=name) for name in registry.registered("value_bag")
]

# Small shapes; T = 37 is not a multiple of the token chunk of 8 (5 blocks, the last one padded).
TOKENS, SLOTS, N_ROWS, VALUE_DIM, PRE_DIM, N_CORES, CHUNK = 37, 5, 30, 8, 6, 2, 8


def _inputs(seed: int, with_pre: bool = True, dtype=jnp.float32, tokens: int = TOKENS):
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, N_ROWS, size=(tokens, SLOTS))
    rows[:, 1] = rows[:, 0]  # the same row twice within every token
    rows[::3, 2] = rows[0, 0]  # and a hot row shared across many tokens
    values = rng.normal(size=(N_ROWS, VALUE_DIM))
    core_scores = rng.normal(size=(tokens, SLOTS, N_CORES))
    pre_values = rng.normal(size=(N_ROWS, PRE_DIM)) if with_pre else None
    x_p = rng.normal(size=(tokens, PRE_DIM)) if with_pre else None
    as_array = lambda x: None if x is None else jnp.asarray(x, dtype)
    return (
        as_array(values),
        as_array(pre_values),
        jnp.asarray(rows, jnp.int32),
        as_array(core_scores),
        as_array(x_p),
    )


def _loss_and_grads(fn, inputs, act, seed=99):
    """Value and gradient (w.r.t. values, pre_values, core_scores, x_p) of a random linear
    functional of both outputs (o and the pre-scores p), so every cotangent path is exercised."""
    values, pre_values, rows, core_scores, x_p = inputs
    rng = np.random.default_rng(seed)
    w_out = jnp.asarray(rng.normal(size=(rows.shape[0], VALUE_DIM)), jnp.float32)
    w_pre = jnp.asarray(rng.normal(size=rows.shape), jnp.float32)

    def loss(values, pre_values, core_scores, x_p):
        out, pre_scores = fn(
            values,
            pre_values,
            rows,
            core_scores,
            x_p,
            pre_score_act=act,
            return_pre_scores=True,
        )
        return jnp.sum(w_out * out.astype(jnp.float32)) + jnp.sum(w_pre * pre_scores)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(
        values, pre_values, core_scores, x_p
    )


GRAD_NAMES = ("values", "pre_values", "core_scores", "x_p")


@functools.cache
def _reference_grads(with_pre: bool, act: str):
    return _loss_and_grads(value_bag_reference, _inputs(seed=0, with_pre=with_pre), act)


@pytest.mark.parametrize(
    "with_pre, act, reduction",
    [
        (True, "identity", "sorted_scatter"),
        (True, "gelu", "sorted_scatter"),
        (False, "identity", "sorted_scatter"),
        (True, "gelu", "segmented_scan"),
        (False, "identity", "segmented_scan"),
    ],
)
@pytest.mark.parametrize("implementation, interpret", IMPLEMENTATIONS)
def test_custom_vjp_matches_autodiff_of_reference(
    with_pre, act, reduction, implementation, interpret
):
    inputs = _inputs(seed=0, with_pre=with_pre)
    op = functools.partial(
        value_bag,
        token_chunk=CHUNK,
        table_reduction=reduction,
        implementation=implementation,
        interpret=interpret,
    )
    got_loss, got = _loss_and_grads(op, inputs, act)
    want_loss, want = _reference_grads(with_pre, act)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for name, g, w in zip(GRAD_NAMES, got, want):
        if w is None:
            assert g is None, name
            continue
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("implementation, interpret", IMPLEMENTATIONS)
def test_forward_matches_reference_and_direct_loop(implementation, interpret):
    values, pre_values, rows, core_scores, x_p = _inputs(seed=1)
    options = dict(implementation=implementation, interpret=interpret)
    out, pre_scores = jax.jit(
        functools.partial(value_bag, token_chunk=CHUNK, return_pre_scores=True, **options)
    )(values, pre_values, rows, core_scores, x_p)
    # Straight from docs/model.md §2 step 8, one slot at a time, in float64.
    v, p, x, s, r = (
        np.asarray(a, np.float64) for a in (values, pre_values, x_p, core_scores, rows)
    )
    want = np.zeros((TOKENS, VALUE_DIM))
    want_pre = np.zeros((TOKENS, SLOTS))
    half = VALUE_DIM // N_CORES
    for t in range(TOKENS):
        for slot in range(SLOTS):
            row = int(r[t, slot])
            want_pre[t, slot] = x[t] @ p[row]
            for c in range(N_CORES):
                chunk = slice(c * half, (c + 1) * half)
                want[t, chunk] += want_pre[t, slot] * s[t, slot, c] * v[row, chunk]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pre_scores, want_pre, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_match_float32_reference():
    inputs = _inputs(seed=2, dtype=jnp.bfloat16)
    upcast = [None if a is None or a.dtype == jnp.int32 else a.astype(jnp.float32) for a in inputs]
    upcast[2] = inputs[2]
    op = functools.partial(value_bag, token_chunk=CHUNK)
    out = jax.jit(op)(*inputs)
    assert out.dtype == jnp.bfloat16
    want_out = value_bag_reference(*upcast)
    # Accumulation is float32; what remains is the final rounding to bf16 (8 bits of mantissa).
    np.testing.assert_allclose(out.astype(jnp.float32), want_out, rtol=1e-2, atol=2e-2)
    _, got = _loss_and_grads(op, inputs, "gelu")
    _, want = _loss_and_grads(value_bag_reference, upcast, "gelu")
    for name, g, w in zip(GRAD_NAMES, got, want):
        assert g.dtype == jnp.bfloat16, name
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(
            g.astype(jnp.float32), w, rtol=1e-2, atol=1e-2 * scale, err_msg=name
        )


@pytest.mark.parametrize("reduction", ["sorted_scatter", "segmented_scan"])
def test_table_gradients_are_bitwise_deterministic(reduction):
    values, pre_values, rows, core_scores, x_p = _inputs(seed=3)
    op = functools.partial(value_bag, token_chunk=CHUNK, table_reduction=reduction)
    table_grads = jax.jit(
        jax.grad(lambda v, p: jnp.sum(op(v, p, rows, core_scores, x_p) ** 2), argnums=(0, 1))
    )
    first = table_grads(values, pre_values)
    second = table_grads(values, pre_values)
    for name, a, b in zip(GRAD_NAMES[:2], first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def _table_gradient_scatters(platform: str) -> list[str]:
    """The stablehlo.scatter ops of the table gradients, lowered for `platform` from this machine."""
    values, pre_values, rows, core_scores, x_p = _inputs(seed=3)
    # The XLA path's scatters (on CUDA "auto" now reaches the Triton kernel, which has none).
    op = functools.partial(value_bag, token_chunk=CHUNK, implementation="xla")  # reduction "auto"

    def table_grads(v, p):
        return jax.grad(lambda v, p: jnp.sum(op(v, p, rows, core_scores, x_p) ** 2), (0, 1))(v, p)

    with registry.lowering_platforms(platform):
        lowered = jax.jit(table_grads).trace(values, pre_values)
    lowered = lowered.lower(lowering_platforms=(platform,))
    return [line for line in lowered.as_text().splitlines() if "stablehlo.scatter" in line]


def test_table_gradients_on_gpu_scatter_only_unique_sorted_indices():
    """Determinism proven structurally: lowered for CUDA (where scatter-adds of colliding indices
    are atomics in no fixed order), every table-gradient scatter writes unique, sorted indices."""
    scatters = _table_gradient_scatters("cuda")
    assert len(scatters) == 2  # values and pre-values
    for scatter in scatters:
        assert "indices_are_sorted = true" in scatter, scatter
        assert "unique_indices = true" in scatter, scatter
    # The same program lowered for CPU keeps the sequential sorted scatter (no uniqueness claim).
    assert all("unique_indices = false" in line for line in _table_gradient_scatters("cpu"))


@pytest.mark.parametrize("seed", range(3))
def test_run_targets_are_unique_sorted_and_name_each_runs_row(seed):
    """The uniqueness the scatter flags claim holds: one target per run, strictly ascending."""
    rng = np.random.default_rng(seed)
    n_rows, slots = 12, 40
    rows = np.sort(rng.integers(0, n_rows, slots - 5))
    rows = np.concatenate([rows, np.full(5, n_rows)])  # padding slots point past the table
    targets, end_slot = jax.jit(value_bag_lib._run_targets, static_argnums=1)(
        jnp.asarray(rows, jnp.int32), n_rows
    )
    targets, end_slot = np.asarray(targets), np.asarray(end_slot)
    assert np.all(np.diff(targets) > 0)
    distinct = np.unique(rows)
    np.testing.assert_array_equal(targets[: distinct.size], distinct)
    # Each run's target reads the run's last slot (where the segmented prefix sum is complete).
    last = np.array([np.flatnonzero(rows == r)[-1] for r in distinct])
    np.testing.assert_array_equal(end_slot[: distinct.size], last)
    assert np.all(targets[distinct.size :] >= n_rows)  # the rest are dropped


def test_zero_core_scores_zero_exactly_that_value_chunk():
    values, pre_values, rows, core_scores, x_p = _inputs(seed=4)
    op = jax.jit(functools.partial(value_bag, token_chunk=CHUNK))
    full = np.asarray(op(values, pre_values, rows, core_scores, x_p))
    half = VALUE_DIM // N_CORES
    for c in range(N_CORES):
        masked = np.asarray(op(values, pre_values, rows, core_scores.at[..., c].set(0.0), x_p))
        chunk = slice(c * half, (c + 1) * half)
        assert np.all(masked[:, chunk] == 0.0)
        others = np.ones(VALUE_DIM, bool)
        others[chunk] = False
        assert np.all(full[:, chunk] != 0.0)
        np.testing.assert_array_equal(masked[:, others], full[:, others])


def _vjp_leaves(fn, inputs):
    values, pre_values, rows, core_scores, x_p = inputs
    _, pullback = jax.vjp(
        lambda v, p, s, x: fn(v, p, rows, s, x), values, pre_values, core_scores, x_p
    )
    return [leaf for leaf in jax.tree_util.tree_leaves(pullback) if hasattr(leaf, "shape")]


def test_residuals_hold_no_gathered_rows():
    inputs = _inputs(seed=5)
    gathered_size = TOKENS * SLOTS * VALUE_DIM
    op = functools.partial(value_bag, token_chunk=CHUNK)
    residual_sizes = sorted(int(np.prod(leaf.shape)) for leaf in _vjp_leaves(op, inputs))
    assert residual_sizes, "expected the pullback to carry residuals"
    assert max(residual_sizes) < gathered_size, residual_sizes
    # The check can see such a residual: autodiff of the reference keeps values[rows].
    reference_sizes = [
        int(np.prod(leaf.shape)) for leaf in _vjp_leaves(value_bag_reference, inputs)
    ]
    assert gathered_size in reference_sizes


def _largest_intermediate(jaxpr) -> int:
    """Element count of the largest value any equation produces, sub-jaxprs (scan bodies) included."""
    largest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(var.aval.shape)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    largest = max(largest, _largest_intermediate(sub.jaxpr))
                elif isinstance(sub, jax_core.Jaxpr):
                    largest = max(largest, _largest_intermediate(sub))
    return largest


def test_forward_and_backward_never_materialize_all_gathered_rows():
    inputs = _inputs(seed=6)
    # [T, m, D] for D = min(D_v, D_p) is the smallest all-slots gather; one block is T/chunk of it.
    all_slots = TOKENS * SLOTS * min(VALUE_DIM, PRE_DIM)

    def grad_jaxpr(fn):
        loss = lambda v, p, s, x: jnp.sum(fn(v, p, inputs[2], s, x) ** 2)
        args = (inputs[0], inputs[1], inputs[3], inputs[4])
        return jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args).jaxpr

    op = functools.partial(value_bag, token_chunk=CHUNK)
    assert _largest_intermediate(grad_jaxpr(op)) < all_slots
    assert _largest_intermediate(grad_jaxpr(value_bag_reference)) >= all_slots  # the check works


@pytest.mark.parametrize("case", ["small_sn", "ket2_sn"])
def test_reproduces_release_lookup_and_table_gradients(case):
    data = load_release_case(case)
    values = jnp.asarray(data["param/value_layer/values_for_look_up"])
    pre_values = jnp.asarray(data["param/value_layer/pre_values_for_look_up"])
    w_out = jnp.asarray(data["param/query_layer/values_proj.weight"])  # torch [out, in]
    # The release's slots: permuted grid index mod n² (key_expand groups are summed, docs/model.md §2 step 8).
    rows = jnp.asarray(data["tdqkr/shuffled_indices"] % values.shape[0], jnp.int32)
    core_scores = jnp.asarray(data["tdqkr/best_scores"])
    x_p = jnp.asarray(data["trace/XperfGlu/p_input"])

    def layer_out(values, pre_values):
        out, pre_scores = value_bag(
            values, pre_values, rows, core_scores, x_p, return_pre_scores=True
        )
        return out @ w_out.T, pre_scores

    (out, pre_scores), pullback = jax.vjp(layer_out, values, pre_values)
    np.testing.assert_allclose(pre_scores, data["trace/XperfGlu/out"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, data["output/out"], rtol=1e-5, atol=1e-7)
    # loss = Σ out²; the tables are reached only through this op.
    d_values, d_pre_values = pullback((2.0 * out, jnp.zeros_like(pre_scores)))
    for got, key in [
        (d_values, "grad/value_layer/values_for_look_up"),
        (d_pre_values, "grad/value_layer/pre_values_for_look_up"),
    ]:
        want = data[key]
        np.testing.assert_allclose(
            got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=key
        )


def test_rejects_bad_inputs():
    values, pre_values, rows, core_scores, x_p = _inputs(seed=7, tokens=4)
    with pytest.raises(ValueError, match="not divisible"):
        value_bag(values, pre_values, rows, jnp.ones((4, SLOTS, 3)), x_p)
    with pytest.raises(ValueError, match="together"):
        value_bag(values, pre_values, rows, core_scores, None)
    with pytest.raises(ValueError, match="pre_score_act"):
        value_bag(values, pre_values, rows, core_scores, x_p, pre_score_act="relu")
    with pytest.raises(ValueError, match="auto, xla, pallas"):
        value_bag(values, pre_values, rows, core_scores, x_p, implementation="gpu")
    too_many_rows = jax.ShapeDtypeStruct((2**31, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="at most 2147483647 rows"):
        jax.eval_shape(lambda v: value_bag(v, None, rows, core_scores, None), too_many_rows)


def test_checked_mode_reports_the_first_out_of_range_id_and_its_position():
    values, pre_values, rows, core_scores, x_p = _inputs(seed=8, tokens=4)
    checked = checkify.checkify(
        lambda rows: value_bag(values, pre_values, rows, core_scores, x_p, check_rows=True)
    )
    error, _ = jax.jit(checked)(rows)
    assert error.get() is None
    bad = rows.at[2, 1].set(values.shape[0]).at[3, 0].set(-1)
    error, _ = jax.jit(checked)(bad)
    assert error.get().startswith(
        f"value_bag: row id {values.shape[0]} at token 2, slot 1 is outside the table of "
        f"{values.shape[0]} rows"
    )


def _kernel_module(name):
    import importlib

    return importlib.import_module(f"pallas_kernels.value_bag.{name}")


# Each implementation on its own: xla, and each Pallas kernel in the interpreter (called directly,
# since `implementation="pallas", interpret=True` picks one of them only).
OUT_OF_RANGE_IMPLEMENTATIONS = {
    "xla": lambda *a, **o: value_bag(*a, implementation="xla", return_pre_scores=True, **o),
    "gpu": lambda *a, **o: _kernel_module("gpu").value_bag_gpu(
        *a, interpret=True, table_reduction="auto", **o
    ),
    "tpu": lambda *a, **o: _kernel_module("tpu").value_bag_tpu(
        *a, interpret=True, table_reduction="auto", **o
    ),
}


@pytest.mark.parametrize("with_pre", [True, False], ids=["pre", "no_pre"])
@pytest.mark.parametrize("name", OUT_OF_RANGE_IMPLEMENTATIONS)
def test_out_of_range_ids_read_nan_and_drop_their_table_gradient_in_every_implementation(
    name, with_pre
):
    """Ids -3, -1 (not wrapped NumPy-style to rows N-3, N-1), N and N+3 on a 6-row table: their
    tokens' outputs are NaN (and their slots' pre-scores), every other token is exact, and the table
    gradients equal those of the same inputs with the bad slots' scores zeroed (rows moved to 0):
    finite, with nothing sent to row N-3 or N-1."""
    fn = OUT_OF_RANGE_IMPLEMENTATIONS[name]
    n_rows, tokens, slots = 6, 9, 3
    rng = np.random.default_rng(21)
    values = jnp.asarray(rng.normal(size=(n_rows, VALUE_DIM)), jnp.float32)
    pre_values = jnp.asarray(rng.normal(size=(n_rows, PRE_DIM)), jnp.float32) if with_pre else None
    x_p = jnp.asarray(rng.normal(size=(tokens, PRE_DIM)), jnp.float32) if with_pre else None
    rows = jnp.asarray(rng.integers(0, n_rows, size=(tokens, slots)), jnp.int32)
    core_scores = jnp.asarray(rng.normal(size=(tokens, slots, N_CORES)), jnp.float32)
    bad_slots = [(1, 0, -3), (4, 2, n_rows), (6, 1, -1), (8, 0, n_rows + 3)]
    bad = rows
    bad_mask = np.zeros((tokens, slots), bool)
    for t, slot, row in bad_slots:
        bad = bad.at[t, slot].set(row)
        bad_mask[t, slot] = True
    bad_tokens = bad_mask.any(axis=1)
    # The reference: bad slots moved to row 0 with zero scores (they add nothing anywhere).
    clean = jnp.where(bad_mask, 0, bad)
    clean_scores = jnp.where(bad_mask[..., None], 0.0, core_scores)
    options = dict(pre_score_act="identity", token_chunk=4)

    def run(fn, rows, scores, tables):
        return fn(tables[0], tables[1], rows, scores, x_p, **options)

    (out, p), pullback = jax.vjp(lambda *t: run(fn, bad, core_scores, t), values, pre_values)
    reference = lambda *a, **o: value_bag_reference(
        *a, return_pre_scores=True, pre_score_act="identity"
    )
    (want, want_p), want_pullback = jax.vjp(
        lambda *t: run(reference, clean, clean_scores, t), values, pre_values
    )
    out, p = np.asarray(out), np.asarray(p)
    assert np.isnan(out[bad_tokens]).all(), "a bad id's token must read NaN"
    np.testing.assert_allclose(
        out[~bad_tokens], np.asarray(want)[~bad_tokens], rtol=1e-5, atol=1e-5
    )
    if with_pre:
        np.testing.assert_array_equal(np.isnan(p), bad_mask)
        np.testing.assert_allclose(
            p[~bad_mask], np.asarray(want_p)[~bad_mask], rtol=1e-5, atol=1e-5
        )
    # A cotangent on every token, bad ones included: a wrapped id would send its slot's share to a row.
    d_out = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
    d_p = jnp.asarray(np.where(bad_mask, 0.0, rng.normal(size=bad_mask.shape)), jnp.float32)
    got = pullback((d_out, d_p))
    expected = want_pullback((d_out, d_p))
    for table, g, w in zip(("values", "pre_values"), got, expected):
        if w is None:
            continue
        assert np.isfinite(np.asarray(g)).all(), table
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=table)
