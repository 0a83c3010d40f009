"""Continual fact injection: learn fact base A, then finetune on a new base B, and watch both.

    result = run(make_config, spec, model_name="T-umv2", seed=0)   # what the comparison runner calls
    mask = select_specific_rows(hits_a, hits_b, count=64)          # bool [L, n²]

Phases, all on the fact_base task (umv2_jax.data.tasks.fact_base; base 0 = A, base 1 = B, the same
fact_seed, so A and B never share a fact):
  1. pretrain every parameter on A for `pretrain_steps`;
  2. from those weights, finetune on B for `finetune_steps` in each mode of `spec.modes`:
       all     every parameter (`train.trainable: all`), a fresh optimizer state;
       values  only the memory value and pre-value tables (`train.trainable: values`);
       rows    only the rows most specific to B (`train.trainable: rows`, `select_specific_rows`);
     evaluating A retention and B recall (exact match on every fact of each base) every
     `eval_every` steps and at step 0.

Row specificity (in the spirit of sparse memory finetuning, arXiv 2510.15103): count, per memory
layer and row, how many sequences of A and of B read the row (the model's `row_hits` with
diagnostics, per sequence), and score each row by how much more often B's sequences hit it:

    rate_a = hits_a / n_a,  rate_b = hits_b / n_b                 (fractions of sequences)
    score  = rate_b / (rate_a + 1 / n_a)                          (1/n_a: a row A never hit)
    chosen = the `count` highest scores among rows with hits_b > 0, per layer

Ties go to the row B hits more, then to the lower row index, so the choice is deterministic.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from umv2_jax.data.tasks import make_task

BASE_A, BASE_B = 0, 1


def select_specific_rows(
    hits_a: np.ndarray, hits_b: np.ndarray, count: int, n_a: int, n_b: int
) -> np.ndarray:
    """The rows most specific to B, per layer: bool [L, rows] with at most `count` True per layer.

    hits_a, hits_b: int [L, rows], how many of the n_a (n_b) sequences of A (B) read each row.
    Only rows B hits at least once are chosen (fewer than `count` when B hits fewer rows).
    Equivalent numpy per layer: order = lexsort((arange(rows), -hits_b, -score)); take the first
    `count` of order with hits_b > 0.
    """
    hits_a = np.asarray(hits_a, np.float64)
    hits_b = np.asarray(hits_b, np.float64)
    if hits_a.shape != hits_b.shape or hits_a.ndim != 2:
        raise ValueError(
            f"hits_a {hits_a.shape} and hits_b {hits_b.shape} must both be [layers, rows]"
        )
    if count < 1 or n_a < 1 or n_b < 1:
        raise ValueError(f"count ({count}), n_a ({n_a}) and n_b ({n_b}) must be >= 1")
    score = (hits_b / n_b) / (hits_a / n_a + 1.0 / n_a)
    mask = np.zeros(hits_a.shape, bool)
    rows = np.arange(hits_a.shape[1])
    for layer in range(hits_a.shape[0]):
        order = np.lexsort((rows, -hits_b[layer], -score[layer]))
        order = order[hits_b[layer][order] > 0][:count]
        mask[layer, order] = True
    return mask


def row_hit_counts(
    programs, params: dict, rest: dict, batches: list[dict]
) -> tuple[np.ndarray, int]:
    """(int64 [L, n²] sequences reading each row of each memory table, number of sequences).

    Runs the model once per sequence (vmapped over the batch) with diagnostics, so a row's count is
    the number of sequences whose tokens selected it (`ModelAux.row_hits` of each layer, window
    rows = the layer's own table rows when value_share is none).
    """
    model_config = programs.config.model
    if model_config.sparse != "ultramem_v2" or model_config.memory.value_share.window != 1:
        raise ValueError("row_hit_counts needs an ultramem_v2 model with value_share none")
    layers = list(model_config.sparse_layer_indices())
    rows = model_config.memory.n_keys**2
    parts = programs.parts

    @jax.jit
    def hits(params, rest, inputs):
        model = parts.build(params, rest)

        def one(tokens):
            _, aux = model(tokens[None], deterministic=True, diagnostics=True)
            return {block: aux.row_hits[block] for block in layers}

        per_sequence = jax.vmap(one)(inputs)
        return {block: jnp.sum(per_sequence[block], axis=0, dtype=jnp.int32) for block in layers}

    total = np.zeros((len(layers), rows), np.int64)
    sequences = 0
    for batch in batches:
        valid = np.asarray(batch["loss_mask"]).sum(axis=1) > 0  # rows holding facts
        inputs = np.asarray(batch["inputs"])[valid]
        if not len(inputs):
            continue
        counts = jax.device_get(hits(params, rest, jnp.asarray(inputs)))
        for position, block in enumerate(layers):
            total[position] += np.asarray(counts[block])[:rows]
        sequences += len(inputs)
    return total, sequences


def recall(programs, params: dict, rest: dict, task, batch_size: int, seq_len: int) -> float:
    """Exact match on every fact of `task` (its test split: each fact once)."""
    from umv2_jax.compare.runner import device_batch

    right = total = 0
    for index in range(task.test_batches(batch_size)):
        batch = task.batch(batch_size, seq_len, seed=0, index=index, split="test")
        predictions = jax.device_get(
            programs.evaluate(params, rest, device_batch(batch), token_range=task.object_range)[0]
        )
        mask = batch["loss_mask"] > 0
        right += int(((predictions == batch["targets"]) & mask).sum())
        total += int(mask.sum())
    return right / max(total, 1)


def run(
    make_config: Callable[..., Any],
    spec: Any,
    *,
    model_name: str,
    seed: int,
    on_step: Callable[[int], None] | None = None,
    programs: Any = None,
) -> dict[str, Any]:
    """Pretrain on A, finetune on B in each of `spec.modes[model_name]`; the curves as plain data.

    make_config(seq_len=, batch_size=, steps=, lr=, extra=()) → Config of the model;
    spec: an `InjectionSpec` (umv2_jax.compare.suites); programs: a `runner.ProgramCache` to
    share compilations with the caller. Returns {"model", "seed", "pretrain":
    {"steps", "recall_a", "wall_s"}, "modes": {mode: {"curve": [{"step", "recall_a",
    "recall_b"}], "rows_trained", "wall_s"}}}.
    """
    from umv2_jax.compare import runner

    task_a = make_task("fact_base", {**spec.params, "base": BASE_A})
    task_b = make_task("fact_base", {**spec.params, "base": BASE_B})
    shapes = dict(seq_len=spec.seq_len, batch_size=spec.batch_size, lr=spec.learning_rate)
    cache = programs if programs is not None else runner.ProgramCache()
    config = make_config(steps=spec.pretrain_steps, **shapes)
    programs = cache.get(config)
    start = time.perf_counter()
    params, rest = programs.init(seed)

    def stream(task):
        return lambda index: task.batch(spec.batch_size, spec.seq_len, seed=seed, index=index)

    state, _, _, _ = runner.train(
        programs,
        programs.initial_state(params),
        rest,
        stream(task_a),
        spec.pretrain_steps,
        log_every=max(spec.pretrain_steps, 1),
        flops_per_token=0.0,
        on_step=on_step,
    )
    pretrained = state["params"]
    recall_a0 = recall(programs, pretrained, rest, task_a, spec.batch_size, spec.seq_len)
    recall_b0 = recall(programs, pretrained, rest, task_b, spec.batch_size, spec.seq_len)
    result: dict[str, Any] = {
        "model": model_name,
        "seed": seed,
        "kind": config.model.sparse,
        "pretrain": {
            "steps": spec.pretrain_steps,
            "recall_a": recall_a0,
            "wall_s": time.perf_counter() - start,
        },
        "modes": {},
    }
    for mode in spec.modes.get(model_name, ()):
        mode_start = time.perf_counter()
        row_mask, rows_trained = None, None
        if mode == "rows":
            row_mask, rows_trained = _specific_rows(
                programs, pretrained, rest, spec, task_a, task_b
            )
        ft_config = make_config(
            steps=spec.finetune_steps, extra=(f"train.trainable={mode}",), **shapes
        )
        ft = cache.get(ft_config, row_mask)
        state = ft.initial_state(jax.tree.map(jnp.copy, pretrained))
        curve = [{"step": 0, "recall_a": recall_a0, "recall_b": recall_b0}]
        done = 0
        while done < spec.finetune_steps:
            chunk = min(spec.eval_every, spec.finetune_steps - done)
            state, _, _, _ = runner.train(
                ft,
                state,
                rest,
                stream(task_b),
                chunk,
                log_every=chunk,
                flops_per_token=0.0,
                on_step=on_step,
                start_step=done,
            )
            done += chunk
            params = state["params"]
            curve.append(
                {
                    "step": done,
                    "recall_a": recall(
                        programs, params, rest, task_a, spec.batch_size, spec.seq_len
                    ),
                    "recall_b": recall(
                        programs, params, rest, task_b, spec.batch_size, spec.seq_len
                    ),
                }
            )
        result["modes"][mode] = {
            "curve": curve,
            "rows_trained": rows_trained,
            "wall_s": time.perf_counter() - mode_start,
        }
    return result


def _specific_rows(programs, params, rest, spec, task_a, task_b) -> tuple[np.ndarray, int]:
    """The row mask of mode `rows`: `spec.rows_fraction` of each table's rows, most specific to B."""

    def test_batches(task):
        return [
            task.batch(spec.batch_size, spec.seq_len, seed=0, index=i, split="test")
            for i in range(task.test_batches(spec.batch_size))
        ]

    hits_a, n_a = row_hit_counts(programs, params, rest, test_batches(task_a))
    hits_b, n_b = row_hit_counts(programs, params, rest, test_batches(task_b))
    count = max(1, int(round(spec.rows_fraction * hits_a.shape[1])))
    mask = select_specific_rows(hits_a, hits_b, count, n_a, n_b)
    return mask, int(mask.sum())
