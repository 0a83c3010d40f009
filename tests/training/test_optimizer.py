"""Schedules and parameter groups (docs/model.md §5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from umv2_jax.config import load_config
from umv2_jax.models.init import ValueParam
from umv2_jax.training.optimizer import (
    learning_rate_schedule,
    make_optimizer,
    parameter_labels,
    value_lr_multiplier,
)


def test_warmup_then_cosine_to_min_ratio():
    config = load_config(
        None, ["train.steps=1000", "train.warmup_fraction=0.1", "train.learning_rate=1e-3"]
    )
    schedule = learning_rate_schedule(config)
    assert float(schedule(0)) == 0.0
    assert float(schedule(50)) == pytest.approx(0.5e-3)
    assert float(schedule(100)) == pytest.approx(1e-3)
    assert float(schedule(550)) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-4)
    assert float(schedule(1000)) == pytest.approx(1e-4, rel=1e-4)


def test_value_lr_multiplier_decay_and_constant():
    config = load_config(
        None,
        [
            "train.steps=100",
            "model.memory.value_lr=decay:4",
            "model.memory.value_lr_decay_fraction=0.5",
        ],
    )
    multiplier = value_lr_multiplier(config)
    assert float(multiplier(0)) == pytest.approx(4.0)
    assert float(multiplier(25)) == pytest.approx(2.5)
    assert float(multiplier(50)) == pytest.approx(1.0)
    assert float(multiplier(99)) == pytest.approx(1.0)
    constant = value_lr_multiplier(load_config(None, ["model.memory.value_lr=constant:2"]))
    assert float(constant(0)) == float(constant(10_000)) == 2.0


@pytest.mark.parametrize("spec", ["decay", "linear:4", "decay:-1", "constant:x"])
def test_bad_value_lr(spec):
    from umv2_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="value_lr"):
        load_config(None, ["model.sparse=ultramem_v2", f"model.memory.value_lr={spec}"])


class _Toy(nnx.Module):
    def __init__(self):
        self.matrix = nnx.Param(jnp.ones((3, 3)))
        self.gain = nnx.Param(jnp.ones((3,)))
        self.table = ValueParam(jnp.ones((4, 3)))


def test_values_group_gets_the_multiplied_learning_rate_and_decay():
    config = load_config(
        None,
        [
            "train.steps=10",
            "train.warmup_fraction=0",
            "train.learning_rate=0.1",
            "train.weight_decay=0.5",
            "train.grad_clip=0",
            "model.memory.value_lr=constant:3",
        ],
    )
    toy = _Toy()
    state = nnx.state(toy, nnx.Param)
    labels = parameter_labels(state)
    assert labels == {"matrix": "default", "gain": "default", "table": "values"}
    params = state.to_pure_dict()
    optimizer = make_optimizer(config, labels)
    grads = jax.tree.map(jnp.zeros_like, params)  # zero grads: the update is weight decay alone
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    # AdamW decoupled decay: update = -lr · wd · param for decayed leaves; gains are not decayed.
    np.testing.assert_allclose(updates["matrix"], -0.1 * 0.5 * np.ones((3, 3)), rtol=1e-6)
    np.testing.assert_allclose(updates["table"], -3 * 0.1 * 0.5 * np.ones((4, 3)), rtol=1e-6)
    np.testing.assert_allclose(updates["gain"], 0.0)


def test_values_group_update_follows_the_decaying_multiplier_step_by_step():
    """The multiplier the optimizer applies (not only `value_lr_multiplier`) moves from F× to 1×."""
    steps, peak, decay, factor, min_ratio = 100, 0.1, 0.5, 4.0, 0.1
    config = load_config(
        None,
        [
            f"train.steps={steps}",
            "train.warmup_fraction=0",
            f"train.learning_rate={peak}",
            f"train.min_lr_ratio={min_ratio}",
            f"train.weight_decay={decay}",
            "train.grad_clip=0",
            f"model.memory.value_lr=decay:{factor:g}",
            "model.memory.value_lr_decay_fraction=0.5",
        ],
    )
    state = nnx.state(_Toy(), nnx.Param)
    params = state.to_pure_dict()
    optimizer = make_optimizer(config, parameter_labels(state))
    update = jax.jit(optimizer.update)
    opt_state = optimizer.init(params)
    # Constant unit gradients: Adam's m̂/(√v̂ + ε) is 1/(1 + ε) at every step, so each update is
    # -lr(t) · group multiplier(t) · (1/(1 + ε) + weight decay · param) with params held at 1.
    grads = jax.tree.map(jnp.ones_like, params)
    adam = 1.0 / (1.0 + config.train.eps)
    seen = {}
    for t in range(steps):
        updates, opt_state = update(grads, opt_state, params)
        lr = peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + np.cos(np.pi * t / steps)))
        multiplier = factor + (1.0 - factor) * min(t / (0.5 * steps), 1.0)  # 4× at 0, 1× from 50
        np.testing.assert_allclose(updates["matrix"], -lr * (adam + decay), rtol=1e-5)
        np.testing.assert_allclose(updates["gain"], -lr * adam, rtol=1e-5)
        np.testing.assert_allclose(
            updates["table"], -lr * multiplier * (adam + decay), rtol=1e-5, err_msg=f"step {t}"
        )
        seen[t] = float(updates["table"][0, 0] / updates["matrix"][0, 0])
    assert seen[0] == pytest.approx(4.0, rel=1e-5)
    assert seen[25] == pytest.approx(2.5, rel=1e-5)
    assert seen[50] == pytest.approx(1.0, rel=1e-5) == seen[99]
