"""AdamW with warmup + cosine, gradient clipping, and parameter groups (SPEC §5).

Groups:
  default  every ordinary parameter, at the schedule's learning rate;
  values   memory value and pre-value tables (`ValueParam`), at the schedule × an LR multiplier
           (`decay:F`: F× decaying linearly to 1× over a fraction of training; `constant:F`).

Weight decay applies to every parameter with two or more dimensions (matrices, keys, cores, value
tables); norm gains are not decayed.

`train.trainable` narrows what a step may change (continual fact injection, umv2_jax.eval.injection):
  all     every parameter (the groups above; the optimizer state is exactly the one without it);
  values  only the values group: every other parameter is in the `frozen` group, which keeps no
          state and returns -0.0 updates, so `p + u == p` bitwise for every p (+0.0 would turn a
          -0.0 parameter into +0.0); no weight decay reaches it;
  rows    only chosen rows of the UltraMemV2 tables V [L, n², D_v] and P [L, n², D_p]: `row_mask`
          (bool [L, n²], the same rows of both) is passed to `make_optimizer`; the other rows get
          -0.0 updates and keep their Adam moments bitwise.
With `values` or `rows` the frozen gradients are zeroed before clipping, so the global norm that
clipping divides by is the norm of what is trained.

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
from umv2_jax.errors import ConfigError
from umv2_jax.models.init import ValueParam

DEFAULT_GROUP = "default"
VALUES_GROUP = "values"
FROZEN_GROUP = "frozen"


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


def trainable_labels(labels: dict[str, Any], trainable: str) -> dict[str, Any]:
    """`labels` with every non-values parameter moved to the frozen group unless `trainable` is all."""
    if trainable == "all":
        return labels
    return jax.tree.map(lambda label: label if label == VALUES_GROUP else FROZEN_GROUP, labels)


def make_optimizer(
    config: Config, labels: dict[str, Any], row_mask: Any = None
) -> optax.GradientTransformation:
    """The full update rule over a pure-dict parameter tree whose groups are given by `labels`.

    row_mask: bool [L, n²], the trainable rows of the value tables; required by (and only allowed
    with) `train.trainable: rows`.
    """
    train = config.train
    schedule = learning_rate_schedule(config)
    multiplier = value_lr_multiplier(config)
    if train.trainable == "rows" and row_mask is None:
        raise ConfigError(
            "config 'train.trainable': 'rows' needs the rows to train, which train.py cannot "
            "choose; run the finetune through umv2_jax.eval.injection or use train.trainable=values"
        )
    if train.trainable != "rows" and row_mask is not None:
        raise ValueError(f"row_mask is only used with train.trainable=rows, not {train.trainable}")
    labels = trainable_labels(labels, train.trainable)

    def adamw(lr: optax.Schedule) -> optax.GradientTransformation:
        return optax.adamw(
            lr,
            b1=train.b1,
            b2=train.b2,
            eps=train.eps,
            weight_decay=train.weight_decay,
            mask=lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree),
        )

    values = adamw(lambda step: schedule(step) * multiplier(step))
    if train.trainable == "all":
        groups = {DEFAULT_GROUP: adamw(schedule), VALUES_GROUP: values}
    else:
        mask = None if row_mask is None else jnp.asarray(row_mask, jnp.bool_)
        groups = {
            VALUES_GROUP: values if mask is None else keep_rows(values, mask),
            FROZEN_GROUP: freeze(),
        }
    chain = [optax.multi_transform(groups, labels)]
    if train.grad_clip > 0:
        chain.insert(0, optax.clip_by_global_norm(train.grad_clip))
    if train.trainable != "all":
        chain.insert(0, zero_frozen_gradients(labels, row_mask))
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


def freeze() -> optax.GradientTransformation:
    """No state; every update is -0.0, the one float x with p + x == p bitwise for every p."""

    def init(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        return jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates), state

    return optax.GradientTransformation(init, update)


def keep_rows(
    inner: optax.GradientTransformation, row_mask: jax.Array
) -> optax.GradientTransformation:
    """`inner` on tables [L, n², D] (any D), applied only to the rows where row_mask [L, n²] holds.

    Other rows get -0.0 updates, and every state leaf shaped like a table ([L, n², D]: the Adam
    moments) keeps those rows' old numbers: equivalent to
    `u = where(mask[..., None], u_inner, -0.0)`, `mu = where(mask[..., None], mu_new, mu_old)`.
    """
    rows_shape = tuple(row_mask.shape)

    def is_table(x: Any) -> bool:
        return getattr(x, "ndim", 0) == 3 and tuple(x.shape[:2]) == rows_shape

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        for leaf in jax.tree.leaves(updates):
            if not is_table(leaf):
                raise ValueError(
                    f"train.trainable=rows: a values-group parameter of shape {leaf.shape} is not "
                    f"a table [L, n², D] with [L, n²] = {list(rows_shape)} (the row mask's shape)"
                )
        new_updates, new_state = inner.update(updates, state, params)
        keep = row_mask[..., None]
        new_updates = jax.tree.map(
            lambda u: jnp.where(keep, u, jnp.full_like(u, -0.0)), new_updates
        )
        new_state = jax.tree.map(
            lambda new, old: jnp.where(keep, new, old) if is_table(new) else new,
            new_state,
            state,
        )
        return new_updates, new_state

    return optax.GradientTransformation(inner.init, update)


def zero_frozen_gradients(labels: dict[str, Any], row_mask: Any) -> optax.GradientTransformation:
    """Zeroes the gradients of frozen parameters (and of untrained rows when `row_mask` is given)."""
    mask = None if row_mask is None else jnp.asarray(row_mask, jnp.bool_)[..., None]

    def zero(gradient: jax.Array, label: str) -> jax.Array:
        if label == FROZEN_GROUP:
            return jnp.zeros_like(gradient)
        if mask is not None:
            return jnp.where(mask, gradient, jnp.zeros_like(gradient))
        return gradient

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        return jax.tree.map(zero, updates, labels), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
