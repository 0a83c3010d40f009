"""The functional train and eval steps.

The model is split once (`nnx.split`) into a graph definition, the trainable parameters (a pure dict)
and the other variables (`rest`: permutations, calibration constants — never updated by the step).
The steps are pure functions of arrays, jitted by the loop with explicit shardings and donation.

Loss: mean next-token cross entropy over tokens with `loss_mask` = 1 (the head and the loss in
vocabulary chunks: `model_token_losses`), plus the already-weighted auxiliary losses that sparse
layers report by type (`ModelAux.losses`; averaged over micro-batches and reported as `loss/<type>`).

Packed batches: where a batch has "segment_ids" and "positions" (int32 [B, S]: each token's
document, 0 for padding, and its position within the document) the model gets both, so attention
stays inside documents and RoPE restarts with each one (`document_kwargs`); without them (synthetic
tasks, older callers) the model runs on one sequence per row as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from umv2_jax.data.tokenizer import BYTE_VOCAB  # task batches: ids below it are bytes
from umv2_jax.models.transformer import ModelAux, Transformer
from umv2_jax.ops.cross_entropy import chunked_cross_entropy
from umv2_jax.training.state import ModelParts

Batch = dict[str, jax.Array]


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross entropy in nats. logits: [B, S, V] fp32, targets: [B, S] → [B, S]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def model_token_losses(
    model: Transformer, inputs: jax.Array, targets: jax.Array, **kwargs: Any
) -> tuple[jax.Array, ModelAux]:
    """(per-token cross entropy [B, S] fp32, ModelAux) of `model` on inputs / targets [B, S].

    With `model.config.loss_vocab_chunk` > 0 the head and the loss run in vocabulary chunks
    (`ops.cross_entropy`), so the f32 [B, S, padded_vocab] logits never exist; the numbers are
    `token_losses(model(inputs)[0], targets)` up to float rounding. kwargs go to the model.
    """
    chunk = model.config.loss_vocab_chunk
    if chunk == 0:
        logits, aux = model(inputs, **kwargs)
        return token_losses(logits, targets), aux
    hidden, aux = model(inputs, return_hidden=True, **kwargs)
    losses = chunked_cross_entropy(
        hidden, model.head_matrix(), targets, chunk=chunk, compute_dtype=model.compute_dtype
    )
    return losses, aux


def document_kwargs(batch: Batch) -> dict[str, jax.Array]:
    """The model kwargs of a packed batch: {"segment_ids", "positions"} where the batch has them
    (int32 [B, S] each); {} for a batch without (the model then sees one sequence per row)."""
    return {key: batch[key] for key in ("segment_ids", "positions") if batch.get(key) is not None}


def aux_losses_and_metrics(aux: ModelAux) -> tuple[jax.Array, dict, dict]:
    """(total weighted auxiliary loss, {"loss/<type>": loss summed over layers}, per-layer metrics),
    all fp32. Losses come typed from the layers (`SparseOutput.losses`); nothing matches strings."""
    losses = {f"loss/{name}": value.astype(jnp.float32) for name, value in aux.losses.items()}
    total = sum(losses.values(), jnp.zeros((), jnp.float32))
    metrics = {name: jnp.asarray(value, jnp.float32) for name, value in aux.metrics.items()}
    return total, losses, metrics


def make_train_step(
    parts: ModelParts,
    optimizer: optax.GradientTransformation,
    micro_batches: int,
    seed: int,
) -> Callable[[dict, dict, Batch], tuple[dict, dict[str, jax.Array]]]:
    """train_step(state, rest, batch) → (new_state, metrics); `rest` is the non-trainable pure dict.

    state: {"params": pure dict, "opt_state": optax state, "step": int32 scalar}.
    batch: {"inputs", "targets": int32 [B, S], "loss_mask": float32 [B, S]}, optionally
    "segment_ids" and "positions" (int32 [B, S], packed documents: `document_kwargs`); B is split
    into `micro_batches` slices (every key of the batch alike) whose gradients are accumulated (sum
    of token losses / total tokens, so the result equals one step over the whole batch up to float
    rounding).
    """
    base_key = jax.random.key(seed)

    def micro_loss(params, rest, micro, dropout_rng, total_tokens):
        model = parts.build(params, rest)
        losses, aux = model_token_losses(
            model,
            micro["inputs"],
            micro["targets"],
            deterministic=False,
            dropout_rng=dropout_rng,
            **document_kwargs(micro),
        )
        losses = losses * micro["loss_mask"]
        aux_loss, aux_losses, aux_metrics = aux_losses_and_metrics(aux)
        lm_loss_share = jnp.sum(losses) / total_tokens
        return lm_loss_share + aux_loss / micro_batches, (lm_loss_share, aux_losses, aux_metrics)

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
            (_, (lm_share, *aux_terms)), grads = grad_fn(
                params, rest, micro_batch, jax.random.fold_in(step_key, index), total_tokens
            )
            grads_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_sum, grads)
            aux_sum = jax.tree.map(lambda a, b: a + b / micro_batches, aux_sum, tuple(aux_terms))
            return (grads_sum, lm_sum + lm_share, aux_sum), None

        first = jax.tree.map(lambda x: x[0], micro)
        aux_shapes = jax.eval_shape(
            lambda: tuple(grad_fn(params, rest, first, step_key, total_tokens)[0][1][1:])
        )
        zeros = (
            # Gradients add up in fp32 whatever the parameter dtype (bf16 parameters included).
            jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
            jnp.zeros((), jnp.float32),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shapes),
        )
        indices = jnp.arange(micro_batches)
        (grads, lm_loss, (aux_losses, aux_metrics)), _ = jax.lax.scan(
            accumulate, zeros, (indices, micro)
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        aux_loss = sum(aux_losses.values(), jnp.zeros((), jnp.float32))
        metrics = {
            "loss": lm_loss + aux_loss,
            "lm_loss": lm_loss,
            "grad_norm": optax.global_norm(grads),
            **aux_losses,
            **aux_metrics,
        }
        new_state = {"params": new_params, "opt_state": opt_state, "step": step + 1}
        return new_state, metrics

    return train_step


def make_eval_step(parts: ModelParts, row_counts: bool = False):
    """eval_step(params, rest, batch) → sums {"loss_sum", "tokens", "byte_loss_sum", "bytes",
    "aux": {name: scalar}, "row_hits": {block: bool [rows]}, "addressable": {block: scalar}}.

    row_counts: also return "row_counts": {block: int32 [rows]}, how many of the batch's evaluated
    positions (loss_mask 1) read each row of each memory layer's window (UltraMemV2 only).

    Sums (not means) so that the loop can add them over batches. Bits per byte = the loss of the
    targets that cover text (batch["target_bytes"] > 0: not BOS/EOS/PAD) over the UTF-8 bytes they
    cover, so it compares across tokenizers; for the byte tokenizer it is the loss per byte target. The model runs with `diagnostics`, so
    memory layers also report which rows they read.
    """

    def eval_step(params: dict, rest: dict, batch: Batch):
        model = parts.build(params, rest)
        counting = {"token_mask": batch["loss_mask"] > 0} if row_counts else {}
        losses, aux = model_token_losses(
            model,
            batch["inputs"],
            batch["targets"],
            deterministic=True,
            diagnostics=True,
            **document_kwargs(batch),
            **counting,
        )
        losses = losses * batch["loss_mask"]
        if "target_bytes" in batch:  # text pipelines: the UTF-8 bytes each target covers
            covered = batch["target_bytes"]
        else:  # task sources: ids below 256 stand for one byte each
            covered = (batch["targets"] < BYTE_VOCAB).astype(jnp.float32) * batch["loss_mask"]
        _, aux_losses, aux_metrics = aux_losses_and_metrics(aux)
        extra = {"row_counts": aux.row_counts} if row_counts else {}
        return {
            **extra,
            "loss_sum": jnp.sum(losses),
            "tokens": jnp.sum(batch["loss_mask"]),
            "byte_loss_sum": jnp.sum(jnp.where(covered > 0, losses, 0.0)),
            "bytes": jnp.sum(covered),
            "aux": {**aux_losses, **aux_metrics},
            "row_hits": aux.row_hits,
            "addressable": aux.addressable,
        }

    return eval_step


def summarize_eval(sums: list[dict[str, Any]]) -> dict[str, float]:
    """Mean loss (nats/token), bits per byte, the mean of every aux metric over eval batches, and
    for memory layers the fraction of addressable rows hit anywhere in the eval window."""
    total = {
        key: sum(float(s[key]) for s in sums)
        for key in ("loss_sum", "tokens", "byte_loss_sum", "bytes")
    }
    result = {
        "eval_loss": total["loss_sum"] / max(total["tokens"], 1.0),
        "eval_bpb": total["byte_loss_sum"] / max(total["bytes"], 1.0) / math.log(2.0),
    }
    for key in sums[0]["aux"]:
        result[f"eval/{key}"] = sum(float(s["aux"][key]) for s in sums) / len(sums)
    for block in sums[0]["row_hits"]:
        hit_anywhere = np.logical_or.reduce([np.asarray(s["row_hits"][block], bool) for s in sums])
        addressable = float(sums[0]["addressable"][block])
        result[f"eval/layer{block}/rows_hit_fraction_window"] = (
            float(hit_anywhere.sum()) / addressable
        )
    return result
