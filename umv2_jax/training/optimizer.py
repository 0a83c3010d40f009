"""AdamW with warmup + cosine, gradient clipping, and parameter groups (docs/model.md §5).

Groups:
  default  every ordinary parameter, at the schedule's learning rate;
  values   memory value and pre-value tables (`ValueParam`), at the schedule × an LR multiplier
           (`decay:F`: F× decaying linearly to 1× over a fraction of training; `constant:F`).

`train.table_optimizer` picks the values group's update rule (every other group keeps AdamW):
  adamw      AdamW, like the rest (two fp32 moments per table entry: 8 bytes);
  adafactor  Adafactor's factored second moment (`optax.scale_by_factored_rms`: for a table
             [L, n², D] a row statistic [L, n²] and a column statistic [L, D]; decay 1 − t^-0.8),
             no first moment, updates clipped to RMS 1 per parameter (Adafactor's d = 1), then
             decoupled weight decay and the values group's learning rate (schedule × multiplier);
  sgd        plain SGD with decoupled weight decay at the same learning rate: no state at all (its
             steps are the gradient's size, far smaller than Adam's at the same LR: raise the value
             LR multiplier, `model.memory.value_lr`, to compensate).

Weight decay applies to every parameter with two or more dimensions (matrices, keys, cores, value
tables); norm gains are not decayed.

`train.trainable` narrows what a step may change (warm-started finetuning, umv2_jax.training.finetune;
continual fact injection, umv2_jax.eval.injection):
  all     every parameter (the groups above; the optimizer state is exactly the one without it);
  values  only the values group: every other parameter is in the `frozen` group, which keeps no
          state and returns -0.0 updates, so `p + u == p` bitwise for every p (+0.0 would turn a
          -0.0 parameter into +0.0); no weight decay reaches it;
  memory  every parameter of the memory layers (paths through `shared` or a block's `sparse`: value
          tables in the values group, retrieval and projections in the default group); the rest
          is frozen as above;
  ffn     only the dense FFNs (paths through a block's `ffn`: gate, up, down; not the norm before
          them, which the memory layer reads too); the rest is frozen;
  rows    only chosen rows of the UltraMemV2 tables V [L, n², D_v] and P [L, n², D_p]: `row_mask`
          (bool [L, n²], the same rows of both) is passed to `make_optimizer`. Adam runs on the
          chosen rows gathered into [L, K, D] (K = the most rows any layer trains), so its moments
          exist for those rows only; every other row gets -0.0 updates (`gathered_rows`).
Frozen parameters (and untrained rows) keep no optimizer state: `optax.multi_transform` gives the
frozen group `freeze()`, whose state is empty. With anything but `all` the frozen gradients are
zeroed before clipping, so the global norm that clipping divides by is the norm of what is trained.

With `model.param_dtype: bfloat16` the parameters (and so the gradients) are bf16, but the whole update
rule, clipping included, runs in fp32 and keeps its state (the Adam moments) in fp32: a bf16 second
moment underflows for small gradients, and bf16 moment updates lose most of their bits.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


MEMORY_KEYS = ("shared", "sparse")  # MemoryTables at model level; a block's memory layer
FFN_KEYS = ("ffn",)  # a block's SwiGLU


def trainable_labels(labels: dict[str, Any], trainable: str) -> dict[str, Any]:
    """`labels` with every parameter `trainable` does not train moved to the frozen group.

    all: unchanged; values / rows: only the values group stays; memory: every parameter whose path
    passes through `shared` or `sparse`; ffn: every parameter whose path passes through `ffn`.
    """
    if trainable == "all":
        return labels
    if trainable in ("values", "rows"):
        return jax.tree.map(lambda label: label if label == VALUES_GROUP else FROZEN_GROUP, labels)
    keys = {"memory": MEMORY_KEYS, "ffn": FFN_KEYS}[trainable]

    def pick(path, label):
        names = {getattr(key, "key", None) for key in path}
        return label if names & set(keys) else FROZEN_GROUP

    return jax.tree_util.tree_map_with_path(pick, labels)


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
            "config 'train.trainable': 'rows' needs the rows to train; set train.rows_usage_base "
            "and train.rows_usage_new (python -m umv2_jax.evaluate --row-usage OUT.npz) or use "
            "train.trainable=values"
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

    values = table_rule(config, lambda step: schedule(step) * multiplier(step), adamw)
    if train.trainable == "all":
        groups = {DEFAULT_GROUP: adamw(schedule), VALUES_GROUP: values}
    else:
        groups = {
            VALUES_GROUP: values if row_mask is None else gathered_rows(values, row_mask),
            FROZEN_GROUP: freeze(),
        }
        if train.trainable in ("memory", "ffn"):
            groups[DEFAULT_GROUP] = adamw(schedule)
        used = set(jax.tree.leaves(labels))
        groups = {name: group for name, group in groups.items() if name in used}
    chain = [optax.multi_transform(groups, labels)]
    if train.grad_clip > 0:
        chain.insert(0, optax.clip_by_global_norm(train.grad_clip))
    if train.trainable != "all":
        chain.insert(0, zero_frozen_gradients(labels, row_mask))
    optimizer = optax.chain(*chain)
    if config.model.param_dtype != "float32":
        optimizer = with_float32_state(optimizer)
    return optimizer


def table_rule(config: Config, lr: optax.Schedule, adamw) -> optax.GradientTransformation:
    """The values group's update rule for `train.table_optimizer` (see the module docstring);
    `adamw(lr)` builds the AdamW the other groups use."""
    train = config.train
    if train.table_optimizer == "adamw":
        return adamw(lr)
    decay = optax.add_decayed_weights(
        train.weight_decay, mask=lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)
    )
    if train.table_optimizer == "sgd":
        return optax.chain(decay, optax.scale_by_learning_rate(lr))
    return optax.chain(
        optax.scale_by_factored_rms(),
        optax.clip_by_block_rms(1.0),
        decay,
        optax.scale_by_learning_rate(lr),
    )


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


def gathered_rows(
    inner: optax.GradientTransformation, row_mask: Any
) -> optax.GradientTransformation:
    """`inner` on tables [L, n², D] (any D), run on the chosen rows only: its state (the Adam
    moments) is [L, K, D] for K = the most rows any layer of row_mask [L, n²] chooses.

    Plain JAX, with idx [L, K] the chosen rows of each layer (padded with its first chosen row,
    `valid` False there) and take(x) = take_along_axis(x, idx[..., None], axis=1):

        u_rows, state = inner.update(where(valid, take(g), 0), state, take(p))
        u = zeros_like(g).at[l, idx].add(where(valid, u_rows, 0))
        u = where(row_mask[..., None], u, -0.0)        # untrained rows: p + (-0.0) == p bitwise
    """
    mask = np.asarray(row_mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"row_mask must be bool [L, n²], got shape {mask.shape}")
    width = max(int(mask.sum(axis=1).max(initial=0)), 1)
    index = np.zeros((mask.shape[0], width), np.int32)
    valid = np.zeros((mask.shape[0], width), bool)
    for layer, row_flags in enumerate(mask):
        rows = np.flatnonzero(row_flags)
        index[layer, : len(rows)] = rows
        index[layer, len(rows) :] = rows[0] if len(rows) else 0
        valid[layer, : len(rows)] = True
    rows_shape = tuple(mask.shape)

    def is_table(x: Any) -> bool:
        return getattr(x, "ndim", 0) == 3 and tuple(x.shape[:2]) == rows_shape

    def take(tree: Any) -> Any:
        def one(x):
            if not is_table(x):
                raise ValueError(
                    f"train.trainable=rows: a values-group parameter of shape {x.shape} is not "
                    f"a table [L, n², D] with [L, n²] = {list(rows_shape)} (the row mask's shape)"
                )
            return jnp.take_along_axis(x, jnp.asarray(index)[..., None], axis=1)

        return jax.tree.map(one, tree)

    def init(params: Any) -> Any:
        return inner.init(take(params))

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        keep = jnp.asarray(valid)[..., None]
        gathered = jax.tree.map(lambda g: jnp.where(keep, g, jnp.zeros_like(g)), take(updates))
        rows_updates, state = inner.update(
            gathered, state, None if params is None else take(params)
        )
        layers = jnp.arange(rows_shape[0])[:, None]

        def scatter(u_rows: jax.Array, g: jax.Array) -> jax.Array:
            full = (
                jnp.zeros_like(g)
                .at[layers, jnp.asarray(index)]
                .add(jnp.where(keep, u_rows, jnp.zeros_like(u_rows)).astype(g.dtype))
            )
            return jnp.where(jnp.asarray(mask)[..., None], full, jnp.full_like(g, -0.0))

        return jax.tree.map(scatter, rows_updates, updates), state

    return optax.GradientTransformation(init, update)


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
