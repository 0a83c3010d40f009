"""AdamW with warmup + cosine, gradient clipping, and parameter groups (SPEC §5).

Groups:
  default  every ordinary parameter, at the schedule's learning rate;
  values   memory value and pre-value tables (`ValueParam`), at the schedule × an LR multiplier
           (`decay:F`: F× decaying linearly to 1× over a fraction of training; `constant:F`).

Weight decay applies to every parameter with two or more dimensions (matrices, keys, cores, value
tables); norm gains are not decayed.

With `model.param_dtype: bfloat16` the parameters (and so the gradients) are bf16, but the whole update
rule, clipping included, runs in fp32 and keeps its state (the Adam moments) in fp32: a bf16 second
moment underflows for small gradients, and bf16 moment updates lose most of their bits.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from umv2_jax.config import Config
from umv2_jax.models.init import ValueParam

DEFAULT_GROUP = "default"
VALUES_GROUP = "values"


def learning_rate_schedule(config: Config) -> optax.Schedule:
    """Linear warmup to the peak LR, then cosine decay to `min_lr_ratio` × peak at the last step."""
    train = config.train
    warmup = int(round(train.warmup_fraction * train.steps))
    decay_steps = max(train.steps - warmup, 1)
    cosine = optax.cosine_decay_schedule(
        train.learning_rate, decay_steps=decay_steps, alpha=train.min_lr_ratio
    )
    if warmup == 0:
        return cosine
    ramp = optax.linear_schedule(0.0, train.learning_rate, transition_steps=warmup)
    return optax.join_schedules([ramp, cosine], boundaries=[warmup])


def value_lr_multiplier(config: Config) -> optax.Schedule:
    """The values group's LR multiplier as a function of the step."""
    memory = config.model.memory
    kind, factor = memory.value_lr.kind, memory.value_lr.factor
    if kind == "constant":
        return lambda step: jnp.asarray(factor, jnp.float32)
    decay_steps = max(int(round(memory.value_lr_decay_fraction * config.train.steps)), 1)
    return optax.linear_schedule(factor, 1.0, transition_steps=decay_steps)


def parameter_labels(params: nnx.State) -> dict[str, Any]:
    """Pure-dict tree of group names matching `params.to_pure_dict()`."""
    labels = jax.tree.map(
        lambda v: VALUES_GROUP if isinstance(v, ValueParam) else DEFAULT_GROUP,
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return labels.to_pure_dict()


def make_optimizer(config: Config, labels: dict[str, Any]) -> optax.GradientTransformation:
    """The full update rule over a pure-dict parameter tree whose groups are given by `labels`."""
    train = config.train
    schedule = learning_rate_schedule(config)
    multiplier = value_lr_multiplier(config)

    def adamw(lr: optax.Schedule) -> optax.GradientTransformation:
        return optax.adamw(
            lr,
            b1=train.b1,
            b2=train.b2,
            eps=train.eps,
            weight_decay=train.weight_decay,
            mask=lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree),
        )

    groups = {
        DEFAULT_GROUP: adamw(schedule),
        VALUES_GROUP: adamw(lambda step: schedule(step) * multiplier(step)),
    }
    chain = [optax.multi_transform(groups, labels)]
    if train.grad_clip > 0:
        chain.insert(0, optax.clip_by_global_norm(train.grad_clip))
    optimizer = optax.chain(*chain)
    if config.model.param_dtype != "float32":
        optimizer = with_float32_state(optimizer)
    return optimizer


def with_float32_state(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs `inner` in fp32 on low-precision parameters: gradients and parameters are upcast before
    it, its state is initialized from fp32 parameters (so the Adam moments are fp32), and the updates
    come back in each gradient's dtype."""

    def upcast(tree: Any) -> Any:
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)

    def init(params: Any) -> Any:
        return inner.init(upcast(params))

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        new, state = inner.update(
            upcast(updates), state, None if params is None else upcast(params)
        )
        return jax.tree.map(lambda u, g: u.astype(g.dtype), new, updates), state

    return optax.GradientTransformation(init, update)
