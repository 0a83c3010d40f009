"""Learning-curve plots of a comparison (matplotlib, Agg): mean over seeds, shaded min–max.

    curve_<task>.png      held-out exact match (or bits/byte for LM) vs step, per model
    lm_bits_per_byte.png  held-out bits/byte vs training FLOPs and vs wall-clock (LM tasks)
    density.png           the density sweep: each sweep metric per model variant, mean ± sd

Reads only the `runs` and `records` of results.json (compare.report.collect).
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import numpy as np

from umv2_jax.compare import curves


def _metric(runs: list[dict[str, Any]]) -> str | None:
    for key in ("test/exact_match", "test/bits_per_byte"):
        if any(curves.points(run["curve"], key)[0] for run in runs):
            return key
    return None


def _bands(runs, key: str, axis: str) -> dict[str, tuple[np.ndarray, ...]]:
    """{model: (x mean, y mean, y min, y max)} over seeds at each probed step."""
    grouped: dict[str, dict[int, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for run in runs:
        steps, ys = curves.points(run["curve"], key)
        xs, _ = curves.points(run["curve"], key, axis)
        for step, x, y in zip(steps, xs, ys):
            grouped[run["model"]][step].append((x, y))
    bands = {}
    for model, by_step in grouped.items():
        steps = sorted(by_step)
        pairs = [np.array(by_step[s]) for s in steps]
        bands[model] = (
            np.array([p[:, 0].mean() for p in pairs]),
            np.array([p[:, 1].mean() for p in pairs]),
            np.array([p[:, 1].min() for p in pairs]),
            np.array([p[:, 1].max() for p in pairs]),
        )
    return bands


def _draw(ax, bands) -> None:
    for model, (x, mean, low, high) in sorted(bands.items()):
        (line,) = ax.plot(x, mean, label=model)
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)


def plots(results: dict[str, Any], directory: str) -> list[str]:
    """Writes the plots above into `directory`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    runs = results["runs"]
    for task in sorted({run["task"] for run in runs}):
        mine = [run for run in runs if run["task"] == task]
        key = _metric(mine)
        if key is None:
            continue
        figure, ax = plt.subplots(figsize=(6, 4))
        _draw(ax, _bands(mine, key, "step"))
        ax.set_xlabel("training step")
        ax.set_ylabel(f"held-out {key[5:]}")
        ax.set_title(f"{task}: mean over seeds, shaded min–max")
        ax.legend(fontsize=7)
        figure.tight_layout()
        path = os.path.join(directory, f"curve_{task}.png")
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    lm = [run for run in runs if curves.points(run["curve"], "test/bits_per_byte")[0]]
    if lm:
        figure, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, axis, label in (
            (axes[0], "flops", "training FLOPs (accounting)"),
            (axes[1], "wall_s", "training wall-clock s"),
        ):
            _draw(ax, _bands(lm, "test/bits_per_byte", axis))
            ax.set_xlabel(label)
            ax.set_ylabel("held-out bits/byte")
            ax.legend(fontsize=7)
        axes[0].set_title("LM: bits/byte vs compute (mean, min–max over seeds)")
        axes[1].set_title("LM: bits/byte vs wall-clock")
        figure.tight_layout()
        path = os.path.join(directory, "lm_bits_per_byte.png")
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    sweep = results["suite"].get("sweep")
    if sweep:
        models = [sweep["model"], *(f"{sweep['model']}.{label}" for label, _ in sweep["variants"])]
        columns = []
        for task in sweep["tasks"]:
            for metric in ("exact_match", "bits_per_byte"):
                values = {
                    m: [
                        r["value"]
                        for r in results["records"]
                        if (r["task"], r["metric"], r["slice"], r["split"], r["model"])
                        == (task, metric, "all", "test", m)
                    ]
                    for m in models
                }
                if any(values.values()):
                    columns.append((task, metric, values))
        if columns:
            figure, axes = plt.subplots(
                1, len(columns), figsize=(5 * len(columns), 4), squeeze=False
            )
            for ax, (task, metric, values) in zip(axes[0], columns):
                means = [np.mean(values[m]) if values[m] else np.nan for m in models]
                sds = [np.std(values[m], ddof=1) if len(values[m]) > 1 else 0.0 for m in models]
                ax.bar(np.arange(len(models)), means, yerr=sds)
                ax.set_xticks(np.arange(len(models)), models, rotation=30, fontsize=7)
                ax.set_title(f"{task}: {metric} (mean ± sd)")
            figure.tight_layout()
            path = os.path.join(directory, "density.png")
            figure.savefig(path, dpi=90)
            plt.close(figure)
            written.append(path)
    return written
