"""The MoE layer (docs/model.md §7) against a per-token loop over each token's chosen experts."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from umv2_jax.config import ModelConfig, MoEConfig
from umv2_jax.errors import ConfigError
from umv2_jax.models import moe as moe_lib
from umv2_jax.models.init import backbone_std, output_std
from umv2_jax.models.transformer import Transformer
from umv2_jax.ops import moe_dispatch as dispatch_lib

HIDDEN, EXPERTS = 16, 4
BASE = MoEConfig(num_experts=EXPERTS, top_k=2, expert_d_ff=8, lb_loss=0.01, z_loss=0.001)


def _config(**moe_fields) -> ModelConfig:
    moe = dataclasses.replace(BASE, **moe_fields)
    return ModelConfig(
        d_model=HIDDEN, num_layers=2, num_heads=2, d_ff=0, sparse="moe", moe=moe, vocab_size=50
    )


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _flat(out) -> tuple[jax.Array, dict]:
    """SparseOutput → (y, {"loss/<type>": loss, **metrics})."""
    return out.y, {**{f"loss/{k}": v for k, v in out.losses.items()}, **out.metrics}


def _forward(layer: moe_lib.MoE, u: jax.Array):
    """layer(u) → (y, aux), jitted (cheaper than compiling the layer's ops one by one)."""
    graphdef, state = nnx.split(layer)
    return jax.jit(lambda state, u: _flat(nnx.merge(graphdef, state)(u, None)))(state, u)


def _pure_params(layer: moe_lib.MoE) -> dict:
    return nnx.to_pure_dict(nnx.state(layer, nnx.Param))


# --------------------------------------------------------------------------------------------------
# The reference: routing decided in numpy, then a Python loop over tokens and their chosen experts.
# --------------------------------------------------------------------------------------------------


def _router_probs(params, x):
    logits = jnp.dot(x, params["router"], precision=jax.lax.Precision.HIGHEST)
    return logits, jax.nn.softmax(logits, axis=-1)


def _routing(params, x, top_k, capacity):
    """Each token's experts (numpy argsort, highest first) and whether each assignment is kept."""
    _, probs = _router_probs(params, x)
    chosen = np.argsort(-np.asarray(probs), axis=-1, kind="stable")[:, :top_k]
    kept = np.ones(chosen.shape, bool)
    if capacity is not None:
        seen = np.zeros(probs.shape[1], int)
        for token in range(chosen.shape[0]):
            for slot in range(top_k):
                expert = chosen[token, slot]
                kept[token, slot] = seen[expert] < capacity
                seen[expert] += 1
    return chosen, kept


def _swiglu(x, gate, up, down):
    return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def _reference_moe(params, u, config: MoEConfig, chosen, kept):
    """y [B, S, h] and the aux losses, with routing fixed to `chosen` / `kept` ([T, k] numpy)."""
    batch, seq, h = u.shape
    x = u.reshape(-1, h)
    logits, probs = _router_probs(params, x)
    outputs = []
    for token in range(x.shape[0]):
        weights = probs[token, chosen[token]]
        if config.renormalize:
            weights = weights / jnp.sum(weights)
        y = jnp.zeros((h,), jnp.float32)
        for slot, expert in enumerate(chosen[token]):
            if kept[token, slot]:
                expert_params = (params[name][expert] for name in ("gate", "up", "down"))
                y = y + weights[slot] * _swiglu(x[token], *expert_params)
        if config.shared_expert_d_ff:
            shared = params["shared_expert"]
            y = y + _swiglu(x[token], shared["gate"], shared["up"], shared["down"])
        outputs.append(y)
    share = np.bincount(chosen.reshape(-1), minlength=config.num_experts) / chosen.size
    load_balance = config.num_experts * jnp.sum(share * jnp.mean(probs, axis=0))
    z = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    aux = {"loss/lb": config.lb_loss * load_balance, "loss/z": config.z_loss * z}
    return jnp.stack(outputs).reshape(batch, seq, h), aux


def _check_against_reference(layer: moe_lib.MoE, config: MoEConfig, u, capacity=None):
    """Output, aux losses and gradients (every parameter and the input) of the layer vs the loop.

    The scalar differentiated is sum(y · c) + loss/lb + loss/z, so the losses' gradients are checked
    too. Returns the layer's aux."""
    graphdef, state = nnx.split(layer)
    params = _pure_params(layer)
    cotangent = _random(u.shape, 99)
    x = u.reshape(-1, u.shape[-1])
    chosen, kept = _routing(params, x, config.top_k, capacity)

    def layer_loss(state, u):
        y, aux = _flat(nnx.merge(graphdef, state)(u, None))
        return jnp.sum(y * cotangent) + aux["loss/lb"] + aux["loss/z"], (y, aux)

    def reference_loss(params, u):
        y, aux = _reference_moe(params, u, config, chosen, kept)
        return jnp.sum(y * cotangent) + aux["loss/lb"] + aux["loss/z"], (y, aux)

    (_, (y, aux)), (state_grad, u_grad) = jax.jit(
        jax.value_and_grad(layer_loss, argnums=(0, 1), has_aux=True)
    )(state, u)
    # Op by op, not jitted: every op's compilation is cached across tests, whereas compiling the
    # unrolled loop as one program would cost seconds per test.
    (_, (y_ref, aux_ref)), (params_grad_ref, u_grad_ref) = jax.value_and_grad(
        reference_loss, argnums=(0, 1), has_aux=True
    )(params, u)

    tolerance = dict(rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(y, y_ref, **tolerance)
    for name in ("loss/lb", "loss/z"):
        np.testing.assert_allclose(aux[name], aux_ref[name], rtol=1e-5)
    np.testing.assert_allclose(u_grad, u_grad_ref, **tolerance)
    params_grad = nnx.to_pure_dict(state_grad)
    flat_grad = jax.tree_util.tree_leaves_with_path(params_grad)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(params_grad_ref))
    assert len(flat_grad) == len(flat_ref)
    for path, grad in flat_grad:
        np.testing.assert_allclose(
            grad, flat_ref[path], err_msg=jax.tree_util.keystr(path), **tolerance
        )
    return aux


def _force_router(layer: moe_lib.MoE, logit_rows: np.ndarray) -> jax.Array:
    """Inputs u [1, T, h] that make the router's logits exactly `logit_rows` [T, E]:
    u_t = (logit_rows[t], 0, …) and W_r = identity on the first E dimensions."""
    tokens, experts = logit_rows.shape
    router = np.zeros((HIDDEN, experts), np.float32)
    router[:experts, :experts] = np.eye(experts)
    layer.router[...] = jnp.asarray(router)
    u = np.zeros((1, tokens, HIDDEN), np.float32)
    u[0, :, :experts] = logit_rows
    # The other dimensions still feed the experts, so they see varied inputs.
    u[0, :, experts:] = np.random.default_rng(5).standard_normal((tokens, HIDDEN - experts))
    return jnp.asarray(u)


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["xla", "ragged_dot", "pallas"])
def test_output_and_gradients_match_per_token_loop(implementation, monkeypatch):
    if implementation == "pallas":
        # The TPU kernel (megablox) runs in the Pallas interpreter on CPU.
        interpreted = functools.partial(dispatch_lib.moe_dispatch, interpret=True)
        monkeypatch.setattr(moe_lib, "moe_dispatch", interpreted)
    config = _config(implementation=implementation, block_size=4)
    layer = moe_lib.MoE(config, nnx.Rngs(1))
    aux = _check_against_reference(layer, config.moe, _random((2, 4, HIDDEN), 2))
    assert "dropped_fraction" not in aux


@pytest.mark.parametrize("implementation", ["xla", "ragged_dot"])
def test_experts_spanning_several_blocks_match_per_token_loop(implementation):
    # 16 tokens × top-3 = 48 assignments over 4 experts in blocks of 2: most experts fill several
    # blocks, some end in a half-empty one.
    config = _config(implementation=implementation, top_k=3, block_size=2)
    layer = moe_lib.MoE(config, nnx.Rngs(17))
    _check_against_reference(layer, config.moe, _random((2, 8, HIDDEN), 18))


def test_renormalize_makes_the_weights_sum_to_one():
    config = _config(renormalize=True)
    layer = moe_lib.MoE(config, nnx.Rngs(3))
    u = _random((2, 4, HIDDEN), 4)
    _check_against_reference(layer, config.moe, u)
    # With identical experts the output is then exactly that expert's output, whatever the router.
    for name in ("gate", "up", "down"):
        getattr(layer, name)[...] = jnp.broadcast_to(
            getattr(layer, name)[0], getattr(layer, name).shape
        )
    y, _ = _forward(layer, u)
    x = u.reshape(-1, HIDDEN)
    single = _swiglu(x, layer.gate[0], layer.up[0], layer.down[0]).reshape(u.shape)
    np.testing.assert_allclose(y, single, rtol=1e-5, atol=1e-6)


def test_shared_expert_is_added_to_every_token():
    config = _config(shared_expert_d_ff=12)
    layer = moe_lib.MoE(config, nnx.Rngs(5))
    assert layer.shared_expert.gate.shape == (HIDDEN, 12)
    _check_against_reference(layer, config.moe, _random((2, 4, HIDDEN), 6))


def test_dropless_handles_every_token_routed_to_one_expert():
    config = _config(top_k=1, block_size=4)
    layer = moe_lib.MoE(config, nnx.Rngs(7))
    tokens = 8
    logits = np.zeros((tokens, EXPERTS), np.float32)
    logits[:, 2] = 3.0  # every token prefers expert 2
    u = _force_router(layer, logits)
    aux = _check_against_reference(layer, config.moe, u)
    assert float(aux["max_expert_fraction"]) == 1.0
    # Counts (0, 0, T, 0): std/mean = sqrt(3).
    np.testing.assert_allclose(aux["tokens_per_expert_cv"], math.sqrt(3.0), rtol=1e-6)


def test_load_balance_loss_equals_its_weight_under_uniform_routing():
    # Logit rows are cyclic shifts of (2, 1, 0, 0): each expert is chosen by exactly T·k/E
    # assignments, and over a whole cycle every expert's mean probability is exactly 1/E.
    config = _config(top_k=2, lb_loss=0.37)
    layer = moe_lib.MoE(config, nnx.Rngs(8))
    base = np.array([2.0, 1.0, 0.0, 0.0], np.float32)
    logits = np.stack([np.roll(base, t) for t in range(3 * EXPERTS)])
    _, aux = _forward(layer, _force_router(layer, logits))
    np.testing.assert_allclose(aux["loss/lb"], 0.37, rtol=1e-6)
    assert float(aux["tokens_per_expert_cv"]) == 0.0
    assert float(aux["max_expert_fraction"]) == 1.0 / EXPERTS


def test_aux_metrics_match_their_formulas():
    config = _config(top_k=2)
    layer = moe_lib.MoE(config, nnx.Rngs(9))
    u = _random((3, 7, HIDDEN), 10)
    _, aux = _forward(layer, u)
    x = u.reshape(-1, HIDDEN)
    logits = np.asarray(x, np.float64) @ np.asarray(layer.router[...], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.argsort(-probs, axis=-1)[:, :2]
    counts = np.bincount(chosen.reshape(-1), minlength=EXPERTS)
    share = counts / chosen.size
    log_partition = np.log(np.exp(logits).sum(-1))
    expected = {
        "loss/lb": 0.01 * EXPERTS * np.sum(share * probs.mean(0)),
        "loss/z": 0.001 * np.mean(log_partition**2),
        "tokens_per_expert_cv": counts.std() / counts.mean(),
        "router_entropy": np.mean(-np.sum(probs * np.log(probs), -1)),
        "max_expert_fraction": share.max(),
    }
    assert set(aux) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(aux[name], value, rtol=1e-5, err_msg=name)


def test_capacity_mode_drops_exactly_the_overflow_in_token_order():
    # Every token picks expert 1; capacity = ceil(1.0 · 8 · 1 / 4) = 2, so tokens 0 and 1 are kept.
    config = _config(top_k=1, capacity_factor=1.0, block_size=4)
    layer = moe_lib.MoE(config, nnx.Rngs(11))
    logits = np.zeros((8, EXPERTS), np.float32)
    logits[:, 1] = 4.0
    u = _force_router(layer, logits)
    aux = _check_against_reference(layer, config.moe, u, capacity=2)
    np.testing.assert_allclose(aux["dropped_fraction"], 6 / 8)
    y, _ = _forward(layer, u)
    assert np.all(np.abs(np.asarray(y[0, :2])) > 0)
    np.testing.assert_array_equal(y[0, 2:], 0.0)


def test_capacity_mode_with_random_routing_matches_the_loop():
    # T·k = 16 assignments over 4 experts at capacity factor 0.5: capacity 2, so some overflow.
    config = _config(top_k=2, capacity_factor=0.5)
    layer = moe_lib.MoE(config, nnx.Rngs(12))
    u = _random((2, 4, HIDDEN), 13)
    capacity = math.ceil(0.5 * 8 * 2 / EXPERTS)
    aux = _check_against_reference(layer, config.moe, u, capacity=capacity)
    params = _pure_params(layer)
    _, kept = _routing(params, u.reshape(-1, HIDDEN), 2, capacity)
    assert 0 < (~kept).sum()
    np.testing.assert_allclose(aux["dropped_fraction"], (~kept).mean(), rtol=1e-6)


def test_parameters_have_expert_axes_and_backbone_init():
    config = ModelConfig(
        d_model=64,
        num_layers=4,
        d_ff=0,
        sparse="moe",
        moe=MoEConfig(num_experts=8, top_k=2, expert_d_ff=64),
    )
    layer = moe_lib.MoE(config, nnx.Rngs(0))
    expected = {
        "router": ((64, 8), ("embed", "experts"), backbone_std(config)),
        "gate": ((8, 64, 64), ("experts", "embed", "mlp"), backbone_std(config)),
        "up": ((8, 64, 64), ("experts", "embed", "mlp"), backbone_std(config)),
        "down": ((8, 64, 64), ("experts", "mlp", "embed"), output_std(config)),
    }
    for name, (shape, axes, std) in expected.items():
        param = getattr(layer, name)
        assert param.shape == shape
        assert param.get_metadata()["out_sharding"] == axes
        np.testing.assert_allclose(np.std(np.asarray(param[...])), std, rtol=0.1, err_msg=name)


def test_bfloat16_compute_stays_close_to_float32():
    config = _config()
    u = _random((2, 5, HIDDEN), 14)
    y32, _ = _forward(moe_lib.MoE(config, nnx.Rngs(15)), u)
    config16 = dataclasses.replace(config, compute_dtype="bfloat16")
    y16, aux16 = _forward(moe_lib.MoE(config16, nnx.Rngs(15)), u)
    assert y16.dtype == jnp.bfloat16 and aux16["loss/lb"].dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(y32)))
    np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=0.03 * scale)


def test_transformer_with_moe_runs_forward_and_backward_with_per_layer_losses():
    config = _config()
    model = Transformer(config, nnx.Rngs(0))
    for block in model.blocks:
        assert block.ffn is None and isinstance(block.sparse, moe_lib.MoE)
    tokens = jnp.asarray(np.random.default_rng(16).integers(0, 50, (2, 8)), jnp.int32)
    graphdef, state = nnx.split(model)

    def loss_fn(state):
        logits, aux = nnx.merge(graphdef, state)(tokens)
        targets = jnp.roll(tokens, -1, axis=1)
        nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
        return nll + sum(aux.losses.values()), aux.metrics

    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state)
    assert np.isfinite(float(loss))
    for layer in range(2):
        for name in ("loss/lb", "loss/z", "tokens_per_expert_cv", "router_entropy"):
            assert f"layer{layer}/{name}" in aux
        assert float(aux[f"layer{layer}/loss/lb"]) > 0 and float(aux[f"layer{layer}/loss/z"]) > 0
    for path, grad in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads)):
        assert np.all(np.isfinite(np.asarray(grad))), jax.tree_util.keystr(path)
    for name in ("router", "gate", "up", "down"):
        assert float(jnp.abs(grads["blocks"][0]["sparse"][name]).max()) > 0, name


def test_top_k_above_num_experts_is_a_config_error():
    with pytest.raises(ConfigError, match="top_k"):
        _config(top_k=EXPERTS + 1).validate()
