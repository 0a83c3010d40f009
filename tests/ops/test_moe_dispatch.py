"""moe_dispatch: every registered implementation against the per-token loop, forward and gradients."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umv2_jax.ops import moe_dispatch as dispatch_lib
from umv2_jax.ops import registry
from umv2_jax.ops.moe_dispatch import moe_dispatch, moe_dispatch_reference

TOKENS, TOP_K, EXPERTS, HIDDEN, EXPERT_DIM = 12, 2, 4, 8, 6

# Every registered implementation that runs on this machine; Pallas kernels in the interpreter.
IMPLEMENTATIONS = [
    (name, {"interpret": True} if name == "pallas" else {})
    for name in registry.registered("moe_dispatch")
]
IDS = [name for name, _ in IMPLEMENTATIONS]


def _inputs(seed: int, skewed: bool = False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((TOKENS, HIDDEN), np.float32)
    if skewed:  # every token's first choice is expert 2: it overflows, the others stay short
        second = rng.choice([0, 1, 3], TOKENS)
        expert_ids = np.stack([np.full(TOKENS, 2), second], axis=1)
    else:  # k distinct experts per token, as a router's top-k gives
        expert_ids = np.stack([rng.permutation(EXPERTS)[:TOP_K] for _ in range(TOKENS)])
    weights = [
        rng.standard_normal(shape, np.float32) * 0.5
        for shape in [(EXPERTS, HIDDEN, EXPERT_DIM)] * 2 + [(EXPERTS, EXPERT_DIM, HIDDEN)]
    ]
    cotangent = rng.standard_normal((TOKENS, TOP_K, HIDDEN), np.float32)
    arrays = (x, expert_ids.astype(np.int32), *weights, cotangent)
    return tuple(jnp.asarray(a) for a in arrays)


def _output_and_gradients(op, x, expert_ids, gate, up, down, cotangent):
    """op(...) and the gradients of sum(out · cotangent) w.r.t. x, gate, up and down."""

    def run(x, gate, up, down):
        (out, kept), pullback = jax.vjp(
            lambda *w: op(w[0], expert_ids, *w[1:]), x, gate, up, down, has_aux=False
        )
        return out, kept, pullback((cotangent, np.zeros(kept.shape, jax.dtypes.float0)))

    return run(x, gate, up, down)


# (capacity, skewed routing): dropless; capacity 3 of 6 average with random routing; one overloaded
# expert whose overflow is dropped; capacity 0 drops everything.
CASES = [(None, False), (3, False), (4, True), (0, False)]
CASE_IDS = ["dropless", "capacity", "overloaded-expert", "capacity-zero"]


@pytest.mark.parametrize("capacity, skewed", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("implementation, options", IMPLEMENTATIONS, ids=IDS)
def test_matches_per_token_loop_forward_and_gradients(implementation, options, capacity, skewed):
    x, expert_ids, gate, up, down, cotangent = _inputs(seed=3 if skewed else 1, skewed=skewed)

    def op(x, ids, gate, up, down):
        return tuple(
            moe_dispatch(
                x,
                ids,
                gate,
                up,
                down,
                capacity=capacity,
                implementation=implementation,
                block_size=4,
                **options,
            )
        )

    out, kept, grads = jax.jit(functools.partial(_output_and_gradients, op))(
        x, expert_ids, gate, up, down, cotangent
    )
    reference = functools.partial(moe_dispatch_reference, capacity=capacity)
    out_ref, kept_ref, grads_ref = _output_and_gradients(
        lambda *a: tuple(reference(*a)), x, expert_ids, gate, up, down, cotangent
    )

    np.testing.assert_array_equal(kept, kept_ref)
    if capacity is not None:
        assert (~np.asarray(kept_ref)).sum() > 0  # the case really drops something
    assert out.shape == (TOKENS, TOP_K, HIDDEN) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, out_ref, rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(out)[~np.asarray(kept_ref)], 0.0)
    for name, got, want in zip(("x", "gate", "up", "down"), grads, grads_ref):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=name)


def test_auto_on_cpu_is_the_block_padded_loop():
    assert registry.resolve("moe_dispatch")["cpu"] == ("xla",)
    assert registry.resolve("moe_dispatch")["tpu"] == ("pallas", "ragged_dot", "xla")
    assert registry.resolve("moe_dispatch")["cuda"] == ("ragged_dot", "xla")


def test_bfloat16_inputs_give_bfloat16_outputs_close_to_fp32():
    x, expert_ids, gate, up, down, _ = _inputs(seed=5)
    out32, _ = moe_dispatch(x, expert_ids, gate, up, down, block_size=4)
    out16, _ = moe_dispatch(x.astype(jnp.bfloat16), expert_ids, gate, up, down, block_size=4)
    assert out16.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(out32)))
    np.testing.assert_allclose(out16.astype(jnp.float32), out32, atol=0.03 * scale)


def test_shape_mismatch_is_reported():
    x, expert_ids, gate, up, down, _ = _inputs(seed=6)
    with pytest.raises(ValueError, match="moe_dispatch: expected gate"):
        moe_dispatch(x, expert_ids, gate, up, down[:, :, :-1])


@pytest.mark.parametrize("num_keys, size", [(5, 64), (60_000, 40_000)])
def test_stable_argsort_is_numpys_stable_argsort(num_keys, size):
    # The second case overflows packed int32 keys (60 000 · 40 000 ≥ 2³¹) and takes the pair sort.
    keys = np.random.default_rng(19).integers(0, min(num_keys, 50), size).astype(np.int32)
    order = jax.jit(dispatch_lib._stable_argsort, static_argnums=1)(jnp.asarray(keys), num_keys)
    np.testing.assert_array_equal(order, np.argsort(keys, kind="stable"))
