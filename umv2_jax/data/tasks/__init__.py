"""Synthetic and small-corpus evaluation tasks (docs/evaluation.md, tasks 1–6): seeded numpy generators.

    from umv2_jax.data.tasks import TASKS, make_task
    task = make_task("mqar", {"mix": [[256, 16]]})   # ConfigError for unknown / impossible params
    batch = task.batch(16, 256, seed=0, index=0, split="test")
    batch["inputs"], batch["targets"]      int32[16, 256]
    batch["loss_mask"]                     float32[16, 256], 1.0 only at answer positions
    batch["slice/pairs"]                   int32[16, 256], the slice label there, -1 elsewhere

From the trainer: `data.source: task:mqar` with the parameters under `data.task` (a mapping,
checked by the task itself); the pipeline keeps only inputs / targets / loss_mask for the device.
Every task is also a tfds builder (`umv2_jax.data.tasks.tfds_builders`) for a cluster run that
wants the batches materialized to ArrayRecord once.

Tasks (one module each; each class docstring documents its parameters, tokens and slices):
    mqar                   multi-query associative recall, the Zoology generator      mqar.py
    overwrite              multi-round overwrite recall (current value, stale rate)   overwrite.py
    needle_passkey         a 5-digit passkey in Shakespeare                           needles.py
    needle_multikey        four key → value needles, one queried                      needles.py
    variable_tracking      X_a = v; X_b = X_a; … over 2–4 hops with distractors       needles.py
    fact_base              n1 n2 n3 r o ; fact memorization, disjoint bases A / B     fact_base.py
    icl_regression         in-context linear regression, finite or infinite pools     icl_regression.py
    bursty_classification  Reddy-style bursty few-shot classification (ICL vs IWL)    bursty.py
    shakespeare_lm         next-byte LM on Shakespeare windows, held-out works test   lm.py
"""

from __future__ import annotations

from typing import Any

from umv2_jax.config import register_check
from umv2_jax.data.tasks.base import SPLIT_STREAMS, Task, from_params
from umv2_jax.data.tasks.bursty import BurstyClassification
from umv2_jax.data.tasks.fact_base import FactBase
from umv2_jax.data.tasks.icl_regression import ICLRegression
from umv2_jax.data.tasks.lm import ShakespeareLM
from umv2_jax.data.tasks.mqar import MQAR
from umv2_jax.data.tasks.needles import MultiKeyNeedle, PasskeyNeedle, VariableTracking
from umv2_jax.data.tasks.overwrite import OverwriteRecall
from umv2_jax.errors import ConfigError

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (
        MQAR,
        OverwriteRecall,
        PasskeyNeedle,
        MultiKeyNeedle,
        VariableTracking,
        FactBase,
        ICLRegression,
        BurstyClassification,
        ShakespeareLM,
    )
}

__all__ = ["SPLIT_STREAMS", "TASKS", "Task", "make_task"]


def make_task(name: str, params: dict[str, Any] | None = None) -> Task:
    """The task `name` with `params` (plain data, as in YAML); ConfigError naming the problem."""
    if name not in TASKS:
        raise ConfigError(
            f"config 'data.source': unknown task '{name}'; use task:NAME with NAME one of "
            f"{', '.join(TASKS)}"
        )
    return from_params(TASKS[name], params)


def _check_data(data) -> None:
    """config.DataConfig.validate for `task:NAME`: the parameters and the sequence length."""
    make_task(data.task_name, data.task_params()).check_seq_len(data.seq_len)


def _check_config(config) -> None:
    """config.Config.validate: the model's vocabulary holds every token the task generates."""
    if config.data.task_name is None:
        return
    task = make_task(config.data.task_name, config.data.task_params())
    if task.vocab_size > config.model.vocab_size:
        raise ConfigError(
            f"config 'model.vocab_size': {config.model.vocab_size} is too small for task "
            f"{task.name}, whose tokens go up to {task.vocab_size - 1}; set "
            f"model.vocab_size={task.vocab_size}"
        )


# The config floor cannot import this module; it runs these checks once the module is imported
# (every entry point that reads a config imports it first: training.cli, compare, aot, evaluate).
register_check("data", _check_data)
register_check("config", _check_config)
