"""The functional train and eval steps.

The model is split once (`nnx.split`) into a graph definition, the trainable parameters (a pure dict)
and the other variables (`rest`: permutations, calibration constants — never updated by the step).
The steps are pure functions of arrays, jitted by the loop with explicit shardings and donation.

Loss: mean next-token cross entropy over tokens with `loss_mask` = 1, plus the already-weighted
auxiliary losses that sparse layers report under `loss/…` (averaged over micro-batches).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

Batch = dict[str, jax.Array]
BYTE_VOCAB = 256  # targets below this id are bytes; the rest are BOS/EOS/PAD specials


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """What is needed to rebuild the model from pure-dict trees inside a jitted function.

    The templates hold shapes only (`jax.ShapeDtypeStruct` leaves), never arrays, so nothing is
    baked into a compiled step as a constant.
    """

    graphdef: nnx.GraphDef
    params_template: nnx.State
    rest_template: nnx.State

    @classmethod
    def split(cls, model: nnx.Module) -> tuple[ModelParts, dict, dict]:
        """(parts, params pure dict, rest pure dict) of a model."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        shapes = lambda state: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        parts = cls(graphdef, shapes(params), shapes(rest))
        return parts, params.to_pure_dict(), rest.to_pure_dict()

    def build(self, params: dict, rest: dict) -> nnx.Module:
        params_state = jax.tree.map(lambda x: x, self.params_template)  # fresh copies
        rest_state = jax.tree.map(lambda x: x, self.rest_template)
        nnx.replace_by_pure_dict(params_state, params)
        nnx.replace_by_pure_dict(rest_state, rest)
        return nnx.merge(self.graphdef, params_state, rest_state)


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross entropy in nats. logits: [B, S, V] fp32, targets: [B, S] → [B, S]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


HITS = "hits/"  # aux entries that are per-row hit masks (memory layers), used by evaluation only


def split_aux(aux: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(sum of the `…loss/…` entries, every scalar entry as fp32; `hits/` masks are left out)."""
    total = jnp.zeros((), jnp.float32)
    for name, value in aux.items():
        if "loss/" in name:
            total = total + value.astype(jnp.float32)
    scalars = {n: jnp.asarray(v, jnp.float32) for n, v in aux.items() if HITS not in n}
    return total, scalars


def make_train_step(
    parts: ModelParts,
    optimizer: optax.GradientTransformation,
    micro_batches: int,
    seed: int,
) -> Callable[[dict, dict, Batch], tuple[dict, dict[str, jax.Array]]]:
    """train_step(state, rest, batch) → (new_state, metrics); `rest` is the non-trainable pure dict.

    state: {"params": pure dict, "opt_state": optax state, "step": int32 scalar}.
    batch: {"inputs", "targets": int32 [B, S], "loss_mask": float32 [B, S]}; B is split into
    `micro_batches` slices whose gradients are accumulated (sum of token losses / total tokens, so
    the result equals one step over the whole batch up to float rounding).
    """
    base_key = jax.random.key(seed)

    def micro_loss(params, rest, micro, dropout_rng, total_tokens):
        model = parts.build(params, rest)
        logits, aux = model(micro["inputs"], deterministic=False, dropout_rng=dropout_rng)
        losses = token_losses(logits, micro["targets"]) * micro["loss_mask"]
        aux_loss, aux_metrics = split_aux(aux)
        lm_loss_share = jnp.sum(losses) / total_tokens
        return lm_loss_share + aux_loss / micro_batches, (lm_loss_share, aux_metrics)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state: dict, rest: dict, batch: Batch):
        params, step = state["params"], state["step"]
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        micro = jax.tree.map(
            lambda x: x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:]), batch
        )
        step_key = jax.random.fold_in(base_key, step)

        def accumulate(carry, inputs):
            grads_sum, lm_sum, aux_sum = carry
            index, micro_batch = inputs
            (_, (lm_share, aux_metrics)), grads = grad_fn(
                params, rest, micro_batch, jax.random.fold_in(step_key, index), total_tokens
            )
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            aux_sum = jax.tree.map(lambda a, b: a + b / micro_batches, aux_sum, aux_metrics)
            return (grads_sum, lm_sum + lm_share, aux_sum), None

        first = jax.tree.map(lambda x: x[0], micro)
        aux_shapes = jax.eval_shape(
            lambda: grad_fn(params, rest, first, step_key, total_tokens)[0][1][1]
        )
        zeros = (
            jax.tree.map(jnp.zeros_like, params),
            jnp.zeros((), jnp.float32),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shapes),
        )
        indices = jnp.arange(micro_batches)
        (grads, lm_loss, aux_metrics), _ = jax.lax.scan(accumulate, zeros, (indices, micro))
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        aux_loss, _ = split_aux(aux_metrics)
        metrics = {
            "loss": lm_loss + aux_loss,
            "lm_loss": lm_loss,
            "grad_norm": optax.global_norm(grads),
            **aux_metrics,
        }
        new_state = {"params": new_params, "opt_state": opt_state, "step": step + 1}
        return new_state, metrics

    return train_step


def make_eval_step(parts: ModelParts):
    """eval_step(params, rest, batch) → sums {"loss_sum", "tokens", "byte_loss_sum", "bytes", aux…}.

    Sums (not means) so that the loop can add them over batches; bits-per-byte counts byte targets
    only (the BOS/EOS separators are not bytes of the text).
    """

    def eval_step(params: dict, rest: dict, batch: Batch):
        model = parts.build(params, rest)
        logits, aux = model(batch["inputs"], deterministic=True)
        losses = token_losses(logits, batch["targets"]) * batch["loss_mask"]
        is_byte = (batch["targets"] < BYTE_VOCAB).astype(jnp.float32) * batch["loss_mask"]
        _, aux_metrics = split_aux(aux)
        hits = {name: value for name, value in aux.items() if HITS in name}
        return {
            **hits,
            "loss_sum": jnp.sum(losses),
            "tokens": jnp.sum(batch["loss_mask"]),
            "byte_loss_sum": jnp.sum(losses * is_byte),
            "bytes": jnp.sum(is_byte),
            **aux_metrics,
        }

    return eval_step


def summarize_eval(sums: list[dict[str, Any]]) -> dict[str, float]:
    """Mean loss (nats/token), bits per byte, the mean of every aux metric over eval batches, and
    for memory layers the fraction of addressable rows hit anywhere in the eval window."""
    scalars = [key for key in sums[0] if HITS not in key]
    total = {key: sum(float(s[key]) for s in sums) for key in scalars}
    result = {
        "eval_loss": total["loss_sum"] / max(total["tokens"], 1.0),
        "eval_bpb": total["byte_loss_sum"] / max(total["bytes"], 1.0) / math.log(2.0),
    }
    for key, value in total.items():
        if key not in ("loss_sum", "tokens", "byte_loss_sum", "bytes"):
            result[f"eval/{key}"] = value / len(sums)
    for key in sums[0]:
        if key.endswith(HITS + "rows"):
            layer = key[: -len(HITS + "rows")]
            hit_anywhere = np.logical_or.reduce([np.asarray(s[key], bool) for s in sums])
            addressable = float(sums[0][layer + HITS + "addressable"])
            result[f"eval/{layer}rows_hit_fraction_window"] = (
                float(hit_anywhere.sum()) / addressable
            )
    return result
