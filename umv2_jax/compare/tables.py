"""The Markdown tables of a comparison with statistics over paired seeds (compare.stats).

    values = by_seed(records)      {(task, split, metric, slice, model): {seed: value}}
    metric_table(values, task, models, reference, metrics)
    speed_table(runs, task, models, reference)
    sweep_table(values, runs, sweep, tasks, metrics)

Every cell is mean ± sd over seeds; a difference column "R − M" is the paired difference of the
reference model R (UltraMemV2) and model M seed by seed, with its 95% t-interval, marked * when
the interval excludes 0.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from umv2_jax.compare import curves, stats

MARK_NOTE = (
    "Differences: the reference model minus the other, paired by seed, mean [95% t-interval]; "
    "`*` marks an interval that excludes 0."
)


def by_seed(records: list[dict[str, Any]]) -> dict[tuple, dict[int, float]]:
    values: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in records:
        values[r["task"], r["split"], r["metric"], r["slice"], r["model"]][r["seed"]] = r["value"]
    return values


def metric_table(
    values: dict[tuple, dict[int, float]],
    task: str,
    models: Sequence[str],
    reference: str | None,
    keys: Sequence[tuple[str, str, str]],
) -> list[str]:
    """Rows (split, metric, slice) of `task`: mean ± sd per model, then R − M per other model."""
    others = [m for m in models if m != reference] if reference in models else []
    header = "| split | metric | slice | " + " | ".join(models)
    header += "".join(f" | {reference} − {m}" for m in others) + " |"
    lines = [header, "|---|---|---|" + "---:|" * (len(models) + len(others))]
    for split, metric, slice_name in keys:
        cells = [
            stats.summary(
                list(values.get((task, split, metric, slice_name, m), {}).values())
            ).text()
            for m in models
        ]
        for m in others:
            cells.append(
                stats.paired_difference(
                    values.get((task, split, metric, slice_name, reference), {}),
                    values.get((task, split, metric, slice_name, m), {}),
                ).text()
            )
        lines.append(f"| {split} | {metric} | {slice_name} | " + " | ".join(cells) + " |")
    return lines


def speed_table(
    runs: list[dict[str, Any]], task: str, models: Sequence[str], reference: str | None
) -> list[str]:
    """Steps to 0.5 / 0.9 held-out exact match per model (seeds that reached it, of all seeds),
    and R − M over the seeds where both reached it. Empty when the task has no such curves."""
    key = "test/exact_match"
    reached: dict[tuple, dict[int, float]] = defaultdict(dict)
    seeds: dict[str, set[int]] = defaultdict(set)
    for run in runs:
        if run["task"] != task or not curves.points(run["curve"], key)[0]:
            continue
        seeds[run["model"]].add(run["seed"])
        for threshold in curves.THRESHOLDS:
            step = curves.steps_to(run["curve"], key, threshold)
            if step is not None:
                reached[run["model"], threshold][run["seed"]] = float(step)
    models = [m for m in models if seeds.get(m)]
    if not models:
        return []
    others = [m for m in models if m != reference] if reference in models else []
    lines = [
        "| steps to exact match | "
        + " | ".join(models)
        + "".join(f" | {reference} − {m}" for m in others)
        + " |",
        "|---|" + "---:|" * (len(models) + len(others)),
    ]
    for threshold in curves.THRESHOLDS:
        cells = []
        for m in models:
            got = reached.get((m, threshold), {})
            if not got:
                cells.append(f"not reached (0/{len(seeds[m])})")
            else:
                text = stats.summary(list(got.values())).text(0)
                cells.append(f"{text} ({len(got)}/{len(seeds[m])})")
        for m in others:
            cells.append(
                stats.paired_difference(
                    reached.get((reference, threshold), {}), reached.get((m, threshold), {})
                ).text(0)
            )
        lines.append(f"| ≥ {threshold} | " + " | ".join(cells) + " |")
    return lines


def sweep_table(
    values: dict[tuple, dict[int, float]],
    runs: list[dict[str, Any]],
    base: str,
    variants: Sequence[str],
    tasks: Sequence[str],
    metrics: Sequence[str],
) -> list[str]:
    """One row per model (the base, then its variants): its table size and topk, the total and
    activated parameters, and per (task, metric) mean ± sd and the paired difference from the
    base model."""
    shape = {}
    for run in runs:
        if run["model"] in (base, *variants) and run["model"] not in shape:
            counts = run["accounting"]
            shape[run["model"]] = (counts["total_params"], counts["activated_params"])
    columns = [
        (task, metric)
        for task in tasks
        for metric in metrics
        if any((task, "test", metric, "all", m) in values for m in (base, *variants))
    ]
    lines = [
        "| model | total params | activated params | "
        + " | ".join(f"{task} {metric} | Δ vs base" for task, metric in columns)
        + " |",
        "|---|---:|---:|" + "---:|---:|" * len(columns),
    ]
    for model in (base, *variants):
        total, activated = shape.get(model, (0, 0))
        cells = [f"{total:,}", f"{activated:,}"]
        for task, metric in columns:
            mine = values.get((task, "test", metric, "all", model), {})
            cells.append(stats.summary(list(mine.values())).text())
            if model == base:
                cells.append("(base)")
            else:
                reference = values.get((task, "test", metric, "all", base), {})
                cells.append(stats.paired_difference(mine, reference).text())
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines
