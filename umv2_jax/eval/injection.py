"""Continual fact injection: learn fact base A, then finetune on a new base B, and watch both.

    result = run(make_config, spec, model_name="T-umv2", seed=0)   # what the comparison runner calls
    mask = finetune.select_rows(counts_a, tokens_a, counts_b, tokens_b, count=64)   # bool [L, n²]

Phases, all on the fact_base task (umv2_jax.data.tasks.fact_base; base 0 = A, base 1 = B, the same
fact_seed, so A and B never share a fact):
  1. pretrain every parameter on A for `pretrain_steps`;
  2. from those weights, finetune on B for `finetune_steps` in each mode of `spec.modes`:
       all     every parameter (`train.trainable: all`), a fresh optimizer state;
       values  only the memory value and pre-value tables (`train.trainable: values`);
       rows    only the rows most specific to B (`train.trainable: rows`, `finetune.select_rows`);
     evaluating A retention and B recall (exact match on every fact of each base) every
     `eval_every` steps and at step 0.

Row specificity: the TF-IDF ranking of sparse memory finetuning (arXiv 2510.15103), the same path
as `train.trainable: rows` from the CLI: `umv2_jax.training.finetune.count_row_usage` counts, per
memory table and row, the positions of A's and of B's facts (their test splits, loss-masked
positions: the answer tokens) that read the row, and `finetune.select_rows` keeps the
`rows_fraction` · n² rows per table with the highest tf(B) · idf(A) (formula: that module).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from umv2_jax.data.tasks import make_task
from umv2_jax.training import finetune

BASE_A, BASE_B = 0, 1


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

    counts_a, tokens_a = finetune.count_row_usage(
        programs.parts, params, rest, test_batches(task_a)
    )
    counts_b, tokens_b = finetune.count_row_usage(
        programs.parts, params, rest, test_batches(task_b)
    )
    count = max(1, int(round(spec.rows_fraction * counts_a.shape[1])))
    mask = finetune.select_rows(counts_a, tokens_a, counts_b, tokens_b, count)
    return mask, int(mask.sum())
