"""`model.param_dtype: bfloat16`: parameters stored in bf16, the optimizer's state in fp32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.training.conftest import SPARSE
from umv2_jax.training import state as state_lib
from umv2_jax.training.optimizer import with_float32_state
from umv2_jax.training.step import make_train_step


def _floating(tree):
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


@pytest.mark.parametrize("kind", ["dense", "umv2"])
def test_bfloat16_params_train_with_float32_moments(tiny_config, kind):
    config = tiny_config(
        "model.param_dtype=bfloat16",
        "train.steps=12",
        "train.warmup_fraction=0",
        "train.learning_rate=1e-2",
        *SPARSE[kind],
    )
    setup = state_lib.build(config)
    params, opt_state = setup.state["params"], setup.state["opt_state"]
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    # The Adam moments (mu, nu) of every parameter: one fp32 array per parameter and moment.
    moments = _floating(opt_state)
    assert len(moments) >= 2 * len(jax.tree.leaves(params))
    assert {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}

    step = jax.jit(make_train_step(setup.parts, setup.optimizer, 1, config.train.seed))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (config.train.batch_size, config.data.seq_len + 1))
    batch = {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "loss_mask": jnp.ones((config.train.batch_size, config.data.seq_len), jnp.float32),
    }
    state, losses = setup.state, []
    for _ in range(config.train.steps):  # one batch, again and again: the loss must fall
        state, metrics = step(state, setup.rest, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.5, losses
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in _floating(state["opt_state"])} == {jnp.dtype(jnp.float32)}


def test_float32_state_wrapper_runs_the_inner_rule_in_float32():
    import optax

    seen = {}

    def init(params):
        seen["init"] = {x.dtype for x in jax.tree.leaves(params)}
        return optax.EmptyState()

    def update(updates, state, params=None):
        seen["update"] = {x.dtype for x in jax.tree.leaves((updates, params))}
        return jax.tree.map(lambda u: u * 1.0001, updates), state

    wrapped = with_float32_state(optax.GradientTransformation(init, update))
    params = {"w": jnp.ones((3,), jnp.bfloat16)}
    state = wrapped.init(params)
    updates, _ = wrapped.update({"w": jnp.full((3,), 3.0, jnp.bfloat16)}, state, params)
    assert seen == {"init": {jnp.dtype(jnp.float32)}, "update": {jnp.dtype(jnp.float32)}}
    assert updates["w"].dtype == jnp.bfloat16
