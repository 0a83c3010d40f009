"""grouped_matmul: every implementation against the per-group loop, forward and gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umv2_jax.ops import grouped_matmul as gmm_lib
from umv2_jax.ops import registry
from umv2_jax.ops.grouped_matmul import grouped_matmul, grouped_matmul_reference

# (implementation, extra keyword arguments): every registered implementation, run on CPU; the
# block-padded loop (xla) at several block sizes, Pallas kernels (megablox) in the interpreter.
_OPTIONS = {
    "xla": [{"block_size": 1}, {"block_size": 4}, {}],  # {}: the default block of 16 rows
    "pallas": [{"interpret": True}],
}
CPU_IMPLEMENTATIONS = [
    (name, options)
    for name in registry.registered("grouped_matmul")
    for options in _OPTIONS.get(name, [{}])
]
IDS = [f"{name}-{'-'.join(f'{k}{v}' for k, v in o.items())}" for name, o in CPU_IMPLEMENTATIONS]

# (rows M, group sizes): uneven with an empty group, one group takes everything, rows past the
# groups (they must come out as zeros), no rows at all in any group.
GROUPINGS = [
    (32, [5, 0, 17, 10]),
    (24, [0, 0, 24, 0]),
    (20, [3, 4, 0, 2]),
    (8, [0, 0, 0, 0]),
]
GROUPING_IDS = ["uneven", "one-group", "rows-past-groups", "all-empty"]


def _inputs(rows: int, groups: int, in_dim: int = 12, out_dim: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    lhs = rng.standard_normal((rows, in_dim), np.float32)
    rhs = rng.standard_normal((groups, in_dim, out_dim), np.float32)
    cotangent = rng.standard_normal((rows, out_dim), np.float32)
    return jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(cotangent)


def _output_and_gradients(op, lhs, rhs, group_sizes, cotangent):
    """op(lhs, rhs, group_sizes) and the gradients of sum(op(...) · cotangent) w.r.t. lhs and rhs."""

    def run(a, b, gs, ct):
        out, pullback = jax.vjp(lambda x, w: op(x, w, gs), a, b)
        return out, pullback(ct)

    return jax.jit(run)(lhs, rhs, group_sizes, cotangent)


@functools.cache
def _expected(rows: int, sizes: tuple[int, ...]):
    lhs, rhs, cotangent = _inputs(rows, len(sizes), seed=rows)
    reference = lambda a, b, _: grouped_matmul_reference(a, b, sizes)
    return _output_and_gradients(reference, lhs, rhs, None, cotangent)


@pytest.mark.parametrize("rows, sizes", GROUPINGS, ids=GROUPING_IDS)
@pytest.mark.parametrize("implementation, options", CPU_IMPLEMENTATIONS, ids=IDS)
def test_matches_per_group_loop_forward_and_gradients(implementation, options, rows, sizes):
    lhs, rhs, cotangent = _inputs(rows, len(sizes), seed=rows)

    def op(a, b, gs):
        return grouped_matmul(a, b, gs, implementation=implementation, **options)

    # group_sizes is traced: the implementations must not need it concrete.
    group_sizes = jnp.array(sizes, jnp.int32)
    out, grads = _output_and_gradients(op, lhs, rhs, group_sizes, cotangent)
    expected, expected_grads = _expected(rows, tuple(sizes))

    assert out.shape == (rows, rhs.shape[2]) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[sum(sizes) :], 0.0)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["xla", "ragged_dot"])
def test_bfloat16_inputs_give_bfloat16_close_to_fp32_reference(implementation):
    lhs, rhs, _ = _inputs(40, 3, in_dim=32, out_dim=16, seed=7)
    sizes = [13, 20, 7]
    lhs16, rhs16 = lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16)
    op = jax.jit(functools.partial(grouped_matmul, implementation=implementation))
    out = op(lhs16, rhs16, jnp.array(sizes, jnp.int32))
    expected = grouped_matmul_reference(lhs16.astype(jnp.float32), rhs16.astype(jnp.float32), sizes)
    assert out.dtype == jnp.bfloat16
    # Inputs are exact in both; only the bf16 rounding of the fp32-accumulated output differs.
    np.testing.assert_allclose(out.astype(jnp.float32), expected, rtol=1e-2, atol=1e-2)


def test_auto_is_the_block_padded_loop_on_cpu_and_prefers_kernels_elsewhere():
    plan = registry.resolve("grouped_matmul")
    assert plan["cpu"] == ("xla",)
    assert plan["cuda"] == ("ragged_dot", "xla")  # no GPU kernel yet
    assert plan["tpu"] == ("pallas", "ragged_dot", "xla")


def test_unknown_implementation_lists_the_allowed_names():
    lhs, rhs, _ = _inputs(4, 2)
    with pytest.raises(ValueError, match="choose one of auto, xla, pallas, ragged_dot"):
        grouped_matmul(lhs, rhs, jnp.array([2, 2], jnp.int32), implementation="block_padded")


def test_pallas_alone_on_cpu_runs_the_tpu_kernel_in_the_interpreter():
    lhs, rhs, _ = _inputs(4, 2)
    sizes = jnp.array([2, 2], jnp.int32)
    out = grouped_matmul(lhs, rhs, sizes, implementation="pallas")
    expected = grouped_matmul(lhs, rhs, sizes, implementation="xla")
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert registry.resolve("grouped_matmul", ("pallas", "xla"))["cpu"] == ("xla",)


def test_shape_mismatch_is_reported():
    lhs, rhs, _ = _inputs(4, 2)
    with pytest.raises(ValueError, match="disagree"):
        grouped_matmul(lhs, rhs, jnp.array([1, 1, 2], jnp.int32))


@pytest.mark.parametrize("implementation", ["pallas", "auto"])
def test_megablox_forward_and_backward_lower_for_tpu(implementation):
    """The real (non-interpreted) kernel lowers to Mosaic TPU custom calls from this CPU machine."""
    shapes = (
        jax.ShapeDtypeStruct((256, 128), jnp.bfloat16),
        jax.ShapeDtypeStruct((4, 128, 256), jnp.bfloat16),
        jax.ShapeDtypeStruct((4,), jnp.int32),
    )

    def op(a, b, gs):
        return grouped_matmul(a, b, gs, implementation=implementation)

    def loss(a, b, gs):
        return jnp.sum(op(a, b, gs).astype(jnp.float32) ** 2)

    with registry.lowering_platforms("tpu"):
        forward = jax.jit(op).trace(*shapes).lower(lowering_platforms=("tpu",)).as_text()
        backward = jax.jit(jax.grad(loss, (0, 1))).trace(*shapes).lower(lowering_platforms=("tpu",))
    assert forward.count("tpu_custom_call") == 1
    # Forward gmm, lhs-gradient gmm and rhs-gradient tgmm.
    assert backward.as_text().count("tpu_custom_call") == 3


def test_auto_lowers_one_program_to_each_platforms_choice():
    """One traced program: the block loop for CPU, ragged_dot for CUDA, megablox for TPU."""
    shapes = (
        jax.ShapeDtypeStruct((64, 128), jnp.float32),
        jax.ShapeDtypeStruct((4, 128, 128), jnp.float32),
        jax.ShapeDtypeStruct((4,), jnp.int32),
    )
    # Squared, so the backward needs the forward product: gmm, gmm and tgmm on TPU.
    loss = lambda a, b, gs: jnp.sum(grouped_matmul(a, b, gs) ** 2)  # noqa: E731
    with registry.lowering_platforms("all"):
        traced = jax.jit(jax.grad(loss, (0, 1))).trace(*shapes)
    texts = {p: traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda", "tpu")}
    assert "stablehlo.while" in texts["cpu"] and "ragged_dot" not in texts["cpu"]
    assert "tpu_custom_call" not in texts["cpu"]
    assert "ragged_dot" in texts["cuda"] and "stablehlo.while" not in texts["cuda"]
    assert texts["tpu"].count("tpu_custom_call") == 3 and "ragged_dot" not in texts["tpu"]


@pytest.mark.parametrize("rows, sizes", GROUPINGS, ids=GROUPING_IDS)
def test_block_layout_maps_rows_and_slots_to_each_other(rows, sizes):
    block = 4
    layout = jax.jit(gmm_lib.block_layout, static_argnums=(1, 2))(
        jnp.array(sizes, jnp.int32), rows, block
    )
    slot_row, slot_valid = np.asarray(layout.slot_row), np.asarray(layout.slot_valid)
    row_slot, row_valid = np.asarray(layout.row_slot), np.asarray(layout.row_valid)
    np.testing.assert_array_equal(row_valid, np.arange(rows) < sum(sizes))
    np.testing.assert_array_equal(slot_row[row_slot[row_valid]], np.flatnonzero(row_valid))
    assert slot_valid.sum() == sum(sizes)
    np.testing.assert_array_equal(row_slot[slot_row[slot_valid]], np.flatnonzero(slot_valid))
    # Every group starts on a block boundary and the used blocks are exactly the padded groups.
    padded = [-(-size // block) * block for size in sizes]
    assert int(layout.used_blocks) == sum(padded) // block
    expected_groups = np.repeat(np.arange(len(sizes)), np.array(padded) // block)
    used = int(layout.used_blocks)
    np.testing.assert_array_equal(np.asarray(layout.block_group)[:used], expected_groups)


def test_block_padded_matmul_leaves_blocks_past_the_groups_zero():
    sizes = jnp.array([3, 0, 6], jnp.int32)
    layout = gmm_lib.block_layout(sizes, 9, 4)
    lhs, rhs, _ = _inputs(layout.slot_row.shape[0], 3, seed=3)
    out = gmm_lib.block_padded_matmul(lhs, rhs, layout)
    used = int(layout.used_blocks) * 4
    np.testing.assert_array_equal(out[used:], 0.0)
    expected = jnp.concatenate([lhs[:4] @ rhs[0], lhs[4:used] @ rhs[2]])
    np.testing.assert_allclose(out[:used], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("copies", [1, 3])
def test_gather_rows_gradient_is_the_scatter_add_of_plain_indexing(copies):
    """The gather-through-the-inverse gradient equals autodiff's scatter-add of plain indexing."""
    rng = np.random.default_rng(4)
    sources, out_dim = 5, 6
    # Every source row is read `copies` times, in shuffled order, and two output rows are padding.
    index = rng.permutation(np.repeat(np.arange(sources), copies))
    index = np.concatenate([index, [0, 0]])
    valid = np.arange(index.size) < sources * copies
    inverse = np.stack([np.flatnonzero((index == s) & valid) for s in range(sources)])
    if copies == 1:
        inverse = inverse[:, 0]
    source = jnp.asarray(rng.standard_normal((sources, out_dim), np.float32))
    cotangent = jnp.asarray(rng.standard_normal((index.size, out_dim), np.float32))
    args = (jnp.asarray(index), jnp.asarray(valid), jnp.asarray(inverse))

    def gathered(x):
        return gmm_lib.gather_rows(x, *args, jnp.ones(inverse.shape, bool))

    def plain(x):
        return jnp.where(jnp.asarray(valid)[:, None], x[jnp.asarray(index)], 0.0)

    np.testing.assert_array_equal(gathered(source), plain(source))
    grad = jax.grad(lambda x: jnp.sum(gathered(x) * cotangent))(source)
    grad_plain = jax.grad(lambda x: jnp.sum(plain(x) * cotangent))(source)
    np.testing.assert_allclose(grad, grad_plain, rtol=1e-6, atol=1e-6)
