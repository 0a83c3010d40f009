"""results.json, results.md and the plots of a results directory, rebuilt from its run files.

results.json: {"suite", "machine", "matches": {task: accounting match rows}, "models": {name:
accounting + mean wall time}, "records": [{task, model, seed, metric, slice, split, value}],
"runs": [{task, model, seed, wall_s, train_s, first_step_s, curve}], "decode": {...},
"injection": [...]}.
results.md: per task, mean ± sd over seeds of each metric slice per model (paired seeds) with
the UltraMemV2 model's paired differences (compare.tables), learning speed where the task has
curves, the density sweep's table, the accounting (activated / total params, FLOPs per token,
decode bytes) and wall times. Records derived from curves and the accounting (knowledge bits
per parameter and per GFLOP, bits/byte at equal FLOPs: compare.curves) join the runs' own.
Reads only the result files (compare.files); never imports the runner.
"""

from __future__ import annotations

import glob
import math
import os
from typing import Any

import numpy as np

from umv2_jax.compare import curve_plots, curves, tables
from umv2_jax.compare.files import load_json, write_json, write_text

# Metrics shown in results.md (every record is in results.json).
TABLE_METRICS = (
    "exact_match",
    "answer_exact_match",
    "stale_answer_rate",
    "knowledge_bits",
    "knowledge_bits_per_param",
    "knowledge_bits_per_gflop",
    "bits_per_byte",
    "bits_per_byte_at_equal_flops",
    "normalized_mse",
    "ols_normalized_mse",
    "ridge_normalized_mse",
    "answer_loss",
)


def collect(out: str, suite, matches: dict[str, Any], machine: dict[str, Any]) -> dict[str, Any]:
    runs = [load_json(path) for path in sorted(glob.glob(os.path.join(out, "runs", "*.json")))]
    decode = {
        data["model"]: data
        for data in (load_json(p) for p in sorted(glob.glob(os.path.join(out, "decode", "*.json"))))
    }
    injection = [load_json(p) for p in sorted(glob.glob(os.path.join(out, "injection", "*.json")))]
    records, models = [], {}
    for run in runs:
        for record in run["records"]:
            records.append(
                {"task": run["task"], "model": run["model"], "seed": run["seed"], **record}
            )
        entry = models.setdefault(
            run["model"], {"kind": run["kind"], "accounting": {}, "wall_s": []}
        )
        entry["accounting"][run["task"]] = run["accounting"]
        entry["wall_s"].append(run["wall_s"])
    records += curves.derived_records(runs, {m.name for m in suite.models})
    return {
        "suite": suite.fingerprint(),
        "machine": machine,
        "matches": matches,
        "models": models,
        "records": records,
        "runs": [
            {
                k: run[k]
                for k in (
                    "task",
                    "model",
                    "seed",
                    "wall_s",
                    "train_s",
                    "first_step_s",
                    "steps",
                    "curve",
                    "accounting",
                    "batch_digest",
                    "init_digest",
                    "sweep",
                )
                if k in run
            }
            for run in runs
        ],
        "decode": decode,
        "injection": injection,
    }


def write(out: str, results: dict[str, Any]) -> None:
    write_json(os.path.join(out, "results.json"), results)
    write_text(os.path.join(out, "results.md"), markdown(results))
    plot_dir = os.path.join(out, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    plots(results, plot_dir)


SWEEP_METRICS = ("exact_match", "knowledge_bits", "bits_per_byte")


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def markdown(results: dict[str, Any]) -> str:
    suite = results["suite"]
    models = [m["name"] for m in suite["models"] if m["name"] in results["models"]]
    machine = results["machine"]
    lines = [
        f"# Comparison: suite `{suite['name']}`",
        "",
        f"{suite['description']}. Machine: {machine['cpu_count']} × {machine['processor']} "
        f"({machine['device_kind']}), jax {machine['jax']}. Mean ± sd over seeds (paired: the "
        "same seeds, data and test sets for every model). Metrics at answer positions only.",
        "",
    ]
    lines += _accounting_table(results, models)
    reference = next((m for m in models if results["models"][m]["kind"] == "ultramem_v2"), None)
    if reference is not None and len(models) > 1:
        lines += ["", tables.MARK_NOTE + f" Reference: {reference}."]
    values = tables.by_seed(results["records"])
    for task in [t["name"] for t in suite["tasks"]]:
        keys = sorted(
            {k[1:4] for k in values if k[0] == task and k[2] in TABLE_METRICS and k[4] in models},
            key=lambda k: (k[0], TABLE_METRICS.index(k[1]), _slice_order(k[2])),
        )
        if not keys:
            continue
        match = results["matches"].get(task, {})
        lines += ["", f"## {task}", ""]
        if match.get("rows"):
            verdict = "confirmed" if match["ok"] else "NOT confirmed"
            lines += [f"Accounting matches within 3%: {verdict}.", ""]
        lines += tables.metric_table(values, task, models, reference, keys)
        speed = tables.speed_table(results["runs"], task, models, reference)
        if speed:
            lines += ["", "Learning speed (held-out exact match on the probe batches):", ""]
            lines += speed
    sweep = suite.get("sweep")
    if sweep:
        variants = [f"{sweep['model']}.{label}" for label, _ in sweep["variants"]]
        lines += [
            "",
            "## Activation density vs table size",
            "",
            f"{sweep['model']} and its variants ({', '.join(label for label, _ in sweep['variants'])}"
            "), paired seeds; Δ: the variant minus the base, mean [95% t-interval], `*` where the "
            "interval excludes 0.",
            "",
        ]
        lines += tables.sweep_table(
            values, results["runs"], sweep["model"], variants, sweep["tasks"], SWEEP_METRICS
        )
    if results["injection"]:
        lines += ["", "## Continual fact injection (A, then B)", ""]
        lines += [
            "| model | mode | seed | rows trained | step | A retention | B recall |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for item in results["injection"]:
            for mode, data in item["modes"].items():
                last = data["curve"][-1]
                rows = data["rows_trained"] if data["rows_trained"] is not None else "–"
                lines.append(
                    f"| {item['model']} | {mode} | {item['seed']} | {rows} | {last['step']} | "
                    f"{last['recall_a']:.3f} | {last['recall_b']:.3f} |"
                )
        lines += [
            "",
            "Before finetuning: A recall "
            + ", ".join(
                f"{i['model']} {i['pretrain']['recall_a']:.3f}" for i in results["injection"]
            )
            + ".",
        ]
    lines += ["", "Plots: plots/*.png. Raw records: results.json.", ""]
    return "\n".join(lines)


def _accounting_table(results, models) -> list[str]:
    lines = [
        "| model | activated params | total params | FLOPs/token (fwd) | decode bytes B=1 | "
        "B=8 | B=64 | B=512 | mean wall s/run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in models:
        entry = results["models"][name]
        counts = next(iter(entry["accounting"].values()))  # the first task's (vocab differs)
        decode = results["decode"].get(name, {})
        measured = decode.get("measured", {})
        cells = []
        for batch in ("1", "8", "64", "512"):
            if batch in measured:
                cells.append(f"{measured[batch] / 1e6:.2f} MB")
            else:
                cells.append(f"{counts['decode_bytes'][batch] / 1e6:.2f} MB (uniform)")
        lines.append(
            f"| {name} | {counts['activated_params']:,} | {counts['total_params']:,} | "
            f"{counts['flops_per_token'] / 1e6:.3f}M | "
            + " | ".join(cells)
            + f" | {np.mean(entry['wall_s']):.1f} |"
        )
    notes = sorted({d["note"] for d in results["decode"].values() if d.get("note")})
    where = "; ".join(notes) if notes else "no measured decode bytes in this directory"
    lines += [
        "",
        "Parameters and FLOPs from umv2_jax.eval.accounting for the first task's vocabulary; "
        "decode bytes per step (weights + embedding rows + the sparse units read; KV cache not "
        "counted) measured with umv2_jax.eval.decode_access where shown (" + where + "), else "
        "the uniform-routing expectation.",
    ]
    sparse_rows = [
        (name, _sparse_layer_bytes(results, name))
        for name in models
        if results["decode"].get(name, {}).get("sparse")
    ]
    if sparse_rows:
        batches = sorted({b for _, s in sparse_rows for b in s}, key=int)
        lines += [
            "",
            "Sparse-layer bytes per decode step: everything the sparse layers read, i.e. the "
            "expert or value rows actually selected (measured as above) plus the layers' dense "
            "parts read in full every step (the MoE router; the memory layer's keys, projections "
            "and cores):",
            "",
            "| model | " + " | ".join(f"B={b}" for b in batches) + " |",
            "|---|" + "---:|" * len(batches),
        ]
        for name, sparse in sparse_rows:
            cells = [f"{sparse[b] / 1e6:.3f} MB" if b in sparse else "–" for b in batches]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _sparse_layer_bytes(results: dict[str, Any], name: str) -> dict[str, float]:
    """{batch: bytes the sparse layers read per decode step}: the decode record's `sparse_layers`,
    or, for records measured before it existed, its selected units (`sparse`) plus the sparse-dense
    parameters from the model's accounting."""
    decode = results["decode"][name]
    if "sparse_layers" in decode:
        return decode["sparse_layers"]
    counts = next(iter(results["models"][name]["accounting"].values()))
    dense = counts["sparse_dense_params"] * counts["bytes_per_number"]
    return {batch: value + dense for batch, value in decode["sparse"].items()}


def _slice_order(name: str):
    if name == "all":
        return (0, "", 0.0)
    key, _, value = name.partition("=")
    try:
        return (1, key, float(value))
    except ValueError:
        return (1, key, 0.0)


def plots(results: dict[str, Any], directory: str) -> list[str]:
    """loss_vs_flops.png, loss_vs_wall.png, accuracy_<task>.png, decode_bytes.png,
    injection.png (where there are injection results). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = curve_plots.plots(results, directory)
    tasks = sorted({run["task"] for run in results["runs"]})
    for axis, filename in (("flops", "loss_vs_flops.png"), ("wall_s", "loss_vs_wall.png")):
        figure, axes = plt.subplots(
            1, max(len(tasks), 1), figsize=(5 * max(len(tasks), 1), 4), squeeze=False
        )
        for ax, task in zip(axes[0], tasks):
            for run in results["runs"]:
                if run["task"] != task or not run["curve"]:
                    continue
                xs = [point[axis] for point in run["curve"]]
                ys = [point["lm_loss"] for point in run["curve"]]
                ax.plot(xs, ys, label=f"{run['model']} s{run['seed']}", alpha=0.8)
            ax.set_title(task)
            ax.set_xlabel("training FLOPs" if axis == "flops" else "wall-clock s")
            ax.set_ylabel("train loss (answer tokens)")
            if axis == "flops":
                ax.set_xscale("log")
            ax.legend(fontsize=6)
        figure.tight_layout()
        path = os.path.join(directory, filename)
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    for task in tasks:
        records = [
            r
            for r in results["records"]
            if r["task"] == task and r["metric"] == "exact_match" and r["split"] == "test"
        ]
        slices = sorted({r["slice"] for r in records}, key=_slice_order)
        models = sorted({r["model"] for r in records})
        figure, ax = plt.subplots(figsize=(max(6, 0.6 * len(slices) * len(models)), 4))
        width = 0.8 / max(len(models), 1)
        for position, model in enumerate(models):
            means, sds = [], []
            for slice_name in slices:
                values = [
                    r["value"] for r in records if r["model"] == model and r["slice"] == slice_name
                ]
                means.append(np.nanmean(values) if values else np.nan)
                sds.append(np.nanstd(values) if len(values) > 1 else 0.0)
            ax.bar(np.arange(len(slices)) + position * width, means, width, yerr=sds, label=model)
        ax.set_xticks(np.arange(len(slices)) + 0.4 - width / 2, slices, rotation=45, fontsize=7)
        ax.set_ylabel("exact match (test)")
        ax.set_title(f"{task}: accuracy per slice")
        ax.legend(fontsize=7)
        figure.tight_layout()
        path = os.path.join(directory, f"accuracy_{task}.png")
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    figure, ax = plt.subplots(figsize=(6, 4))
    decode = dict(results["decode"])
    for model, entry in results["models"].items():  # no measurement: the uniform curve alone
        if model not in decode:
            counts = next(iter(entry["accounting"].values()))
            decode[model] = {"uniform": counts["decode_bytes"]}
    for model, data in sorted(decode.items()):
        for key, style in (("measured", "-o"), ("uniform", "--")):
            points = sorted((int(b), v) for b, v in data.get(key, {}).items())
            if points:
                ax.plot(*zip(*points), style, label=f"{model} {key}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("decode batch")
    ax.set_ylabel("bytes read per decode step")
    ax.legend(fontsize=7)
    figure.tight_layout()
    path = os.path.join(directory, "decode_bytes.png")
    figure.savefig(path, dpi=90)
    plt.close(figure)
    written.append(path)
    if results["injection"]:
        figure, axes = plt.subplots(1, 2, figsize=(11, 4))
        for item in results["injection"]:
            for mode, data in item["modes"].items():
                steps = [p["step"] for p in data["curve"]]
                label = f"{item['model']} {mode} s{item['seed']}"
                axes[0].plot(steps, [p["recall_b"] for p in data["curve"]], label=label)
                axes[1].plot(steps, [p["recall_a"] for p in data["curve"]], label=label)
        axes[0].set_title("B recall while finetuning on B")
        axes[1].set_title("A retention while finetuning on B")
        for ax in axes:
            ax.set_xlabel("finetuning step")
            ax.set_ylabel("exact match")
            ax.legend(fontsize=7)
        figure.tight_layout()
        path = os.path.join(directory, "injection.png")
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    return written
