"""Numbers read off a results directory's learning curves and accounting (pure; no plotting).

A run's curve (compare.runner.train) is a list of points {step, loss, lm_loss, tokens, flops,
wall_s} where points at the task's `eval_every` also hold held-out values "test/<metric>"
(exact_match, answer_loss, bits_per_byte; the first `probe_batches` test batches).

    steps_to(curve, "test/exact_match", 0.5)     first step whose value is ≥ 0.5, else None
    value_at(curve, "test/bits_per_byte", x)     linear interpolation in training FLOPs (nan
                                                 outside the curve's probed range)
    derived_records(runs)                        records the report adds to the runs' own:
        knowledge_bits_per_param     knowledge bits / the model's total parameters (accounting
                                     `total_params`: the paper's convention, embeddings excluded)
        knowledge_bits_per_gflop     knowledge bits / the run's activated training GFLOPs
                                     (training FLOPs per token × tokens trained)
        bits_per_byte_at_equal_flops the held-out bits/byte curve of each model at the FLOPs the
                                     smallest model of that (task, seed) reached at its last step
                                     (the models are FLOP-matched within 3%, so this is within 3%
                                     of every model's end; suite models only)
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

THRESHOLDS = (0.5, 0.9)


def points(curve: list[dict[str, float]], key: str, axis: str = "step") -> tuple[list, list]:
    """(x values, metric values) of the curve points that hold `key`."""
    kept = [point for point in curve if key in point]
    return [point[axis] for point in kept], [point[key] for point in kept]


def steps_to(curve: list[dict[str, float]], key: str, threshold: float) -> int | None:
    """The first probed step whose `key` is ≥ threshold; None when never reached."""
    for step, value in zip(*points(curve, key)):
        if value >= threshold:
            return int(step)
    return None


def value_at(curve: list[dict[str, float]], key: str, flops: float) -> float:
    """`key` at `flops` training FLOPs, linear between probed points; nan outside their range."""
    xs, ys = points(curve, key, "flops")
    if not xs or flops < xs[0] - 1e-9 * abs(xs[0]) or flops > xs[-1] * (1 + 1e-9):
        return math.nan
    return float(np.interp(flops, xs, ys))


def derived_records(runs: list[dict[str, Any]], suite_models: set[str]) -> list[dict[str, Any]]:
    """Records {task, model, seed, metric, slice "all", split "test", value} (module docstring).

    runs: the run files (each with task, model, seed, curve, records, accounting)."""
    derived = []

    def add(run, metric, value):
        derived.append(
            {
                "task": run["task"],
                "model": run["model"],
                "seed": run["seed"],
                "metric": metric,
                "slice": "all",
                "split": "test",
                "value": float(value),
            }
        )

    for run in runs:
        bits = [
            r["value"]
            for r in run["records"]
            if r["metric"] == "knowledge_bits" and r["split"] == "test" and r["slice"] == "all"
        ]
        if bits and run["curve"]:
            add(run, "knowledge_bits_per_param", bits[0] / run["accounting"]["total_params"])
            add(run, "knowledge_bits_per_gflop", bits[0] / (run["curve"][-1]["flops"] / 1e9))
    finals: dict[tuple, list[float]] = defaultdict(list)
    key = "test/bits_per_byte"
    for run in runs:
        if run["model"] in suite_models and points(run["curve"], key)[0]:
            finals[run["task"], run["seed"]].append(points(run["curve"], key, "flops")[0][-1])
    for run in runs:
        budget = finals.get((run["task"], run["seed"]))
        if budget and points(run["curve"], key)[0]:
            add(run, "bits_per_byte_at_equal_flops", value_at(run["curve"], key, min(budget)))
    return derived
