"""Decode memory access, measured: bytes read per decode step from the rows actually selected.

    python -m umv2_jax.eval.decode_access --family T [--train-steps 0] [--out DIR]
        # T (or S) dense / moe / engram / umv2 of docs/evaluation.md on Shakespeare validation text: DIR/decode_access.json
        # and DIR/decode_access.png (measured bytes beside the accounting module's uniform curve)

Python API (what the comparison runner calls):

    records = measure_decode_access(model, tokens, batch_sizes=(1, 8, 64, 512), prompt_len=16, steps=8)
    summary = summarize(model.config, records)            # {batch: {"sparse_bytes": …, …}}
    curve   = uniform_routing_curve(model.config, (1, 8, 64, 512))  # {batch: bytes}, accounting's

`tokens`: int32 [rows, prompt_len + steps] evaluation data (text windows or a task batch; rows >=
the largest batch). For each batch size B the first B rows are prefilled with their first
`prompt_len` tokens, then decoded `steps` steps teacher-forced (step t feeds each row's real token
prompt_len + t, so the routing sees evaluation data, not the model's own samples). Each step counts,
per sparse layer, the distinct value rows (memory layers) or distinct experts (MoE) the step's B
tokens selected (`Decoder.step(..., diagnostics=True)`, from the layers' row-hit masks). One record
per (batch, step, layer):

    {"batch", "step", "layer" (block index), "unit" ("rows" | "experts"), "distinct",
     "addressable", "unit_bytes", "bytes" = distinct · unit_bytes, "tokens" (distinct input tokens),
     "prefetchable" (the rows depend only on the step's token ids, known before the step: Engram)}

Bytes per step (`summarize`), with N bytes per number (2 for bf16 compute, 4 for fp32):

    weights   = (dense + sparse-dense parameters + LM head V·h) · N     read in full every step
    embedding = distinct input tokens · h · N
    sparse    = Σ_layers distinct · unit width · N   (MoE expert: 3·h·d_e; memory row: D_v + D_p, …)
    kv_cache  = B · filled slots · 2 · L · heads · head_dim · N           (same for every family)

`sparse` is the selected units only. What the sparse layers read in all, `sparse_layers`, adds their
dense parts, read in full every step (`sparse_dense`: the MoE router; the memory layer's keys, query,
pre-value and output projections, cores and gains), which `weights` already counts:

    sparse_dense  = sparse-dense parameters · N
    sparse_layers = sparse + sparse_dense

`weights + embedding + sparse` is what the accounting module's uniform-routing curve models (it leaves
the KV cache out, and counts min(B, V) embedding rows); `total` adds the KV cache. The parameter
counts and unit widths come from `umv2_jax.eval.accounting`, so the two curves differ only in the
distinct counts: measured here, expected under uniform routing there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from umv2_jax.config import ModelConfig
from umv2_jax.eval import accounting

DECODE_BATCHES = accounting.DECODE_BATCHES
FAMILY_MODELS = ("dense", "moe", "engram", "umv2")  # the last is the table's reference


def distinct_per_step(selected: np.ndarray) -> np.ndarray:
    """selected: int [steps, batch, slots] ids chosen at each step → int64 [steps] distinct ids per
    step (the union over the batch's tokens and their slots). Plain numpy: len(np.unique(step))."""
    selected = np.asarray(selected)
    if selected.ndim != 3:
        raise ValueError(f"selected must be [steps, batch, slots], got shape {selected.shape}")
    return np.asarray([np.unique(step).size for step in selected], np.int64)


def unit_numbers(config: ModelConfig) -> tuple[str, int]:
    """("experts" | "rows", numbers read per selected unit) of the model's sparse layers."""
    if config.sparse == "moe":
        return "experts", 3 * config.d_model * config.moe.expert_d_ff
    if config.sparse in accounting.MEMORY_KINDS:
        return "rows", accounting._memory_rows_and_width(config)[1]
    return "none", 0


def bytes_per_number(config: ModelConfig) -> int:
    return 2 if config.compute_dtype == "bfloat16" else 4


def measure_decode_access(
    model,
    tokens: np.ndarray,
    batch_sizes: Sequence[int] = DECODE_BATCHES,
    prompt_len: int = 16,
    steps: int = 8,
) -> list[dict[str, Any]]:
    """Per-(batch, step, layer) records of the rows / experts actually selected (module docstring).

    model: a Transformer; tokens: int [rows, >= prompt_len + steps] evaluation data.
    """
    from umv2_jax.inference.decode import Decoder

    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] < prompt_len + steps:
        raise ValueError(
            f"tokens {tokens.shape} must be [rows, >= prompt_len + steps = {prompt_len + steps}]"
        )
    if max(batch_sizes) > tokens.shape[0]:
        raise ValueError(
            f"the largest batch {max(batch_sizes)} needs that many token rows, got "
            f"{tokens.shape[0]}; pass more evaluation rows or smaller batch_sizes"
        )
    config = model.config
    unit, width = unit_numbers(config)
    size = bytes_per_number(config)
    decoder = Decoder(model)
    records: list[dict[str, Any]] = []
    for batch in batch_sizes:
        rows = tokens[:batch]
        start = np.zeros((batch,), np.int32)
        _, cache, _ = decoder.prefill(rows[:, :prompt_len], start, prompt_len + steps)
        for step in range(steps):
            fed = rows[:, prompt_len + step]  # written at slot prompt_len + step
            _, cache, counts = decoder.step(fed, cache, diagnostics=True)
            distinct_tokens = int(np.unique(fed).size)
            for layer, count in sorted(counts.items()):
                count = int(count)
                records.append(
                    {
                        "batch": int(batch),
                        "step": step,
                        "layer": int(layer),
                        "unit": unit,
                        "distinct": count,
                        "addressable": _addressable(config, unit),
                        "unit_bytes": width * size,
                        "bytes": count * width * size,
                        "tokens": distinct_tokens,
                        "filled": prompt_len + step + 1,
                        "prefetchable": config.sparse in accounting.PREFETCHABLE_KINDS,
                    }
                )
            if not counts:  # a dense model: still record the step's tokens (embedding rows)
                records.append(
                    {
                        "batch": int(batch),
                        "step": step,
                        "layer": -1,
                        "unit": "none",
                        "distinct": 0,
                        "addressable": 0,
                        "unit_bytes": 0,
                        "bytes": 0,
                        "tokens": distinct_tokens,
                        "filled": prompt_len + step + 1,
                    }
                )
    return records


def summarize(config: ModelConfig, records: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """{batch: mean bytes per decode step over the measured steps}: weights, embedding, sparse (the
    selected units), sparse_dense and sparse_layers (everything the sparse layers read: sparse +
    sparse_dense), kv_cache, measured (= weights + embedding + sparse, comparable to the uniform
    curve), total, per-layer mean distinct units ("distinct_by_layer"), and whether the sparse
    rows are known from the token ids before the step ("prefetchable": Engram)."""
    from umv2_jax.inference.cache import cache_bytes

    counts = accounting.parameter_counts(config)
    size = bytes_per_number(config)
    head = config.padded_vocab_size * config.d_model
    weights = float((counts["dense"] + counts["sparse_dense"] + head) * size)
    sparse_dense = float(counts["sparse_dense"] * size)  # part of `weights`
    summary: dict[int, dict[str, Any]] = {}
    for batch in sorted({r["batch"] for r in records}):
        mine = [r for r in records if r["batch"] == batch]
        steps = sorted({r["step"] for r in mine})
        sparse, embedding, kv = [], [], []
        for step in steps:
            at = [r for r in mine if r["step"] == step]
            sparse.append(sum(r["bytes"] for r in at))
            embedding.append(at[0]["tokens"] * config.d_model * size)
            kv.append(cache_bytes(config, batch, at[0]["filled"]))
        layers = sorted({r["layer"] for r in mine if r["layer"] >= 0})
        by_layer = {
            str(layer): float(np.mean([r["distinct"] for r in mine if r["layer"] == layer]))
            for layer in layers
        }
        measured = weights + float(np.mean(embedding)) + float(np.mean(sparse))
        summary[batch] = {
            "weights": weights,
            "embedding": float(np.mean(embedding)),
            "sparse": float(np.mean(sparse)),
            "sparse_dense": sparse_dense,
            "sparse_layers": float(np.mean(sparse)) + sparse_dense,
            "kv_cache": float(np.mean(kv)),
            "measured": measured,
            "total": measured + float(np.mean(kv)),
            "distinct_by_layer": by_layer,
            "addressable": float(mine[0]["addressable"]),
            "prefetchable": config.sparse in accounting.PREFETCHABLE_KINDS,
        }
    return summary


def uniform_routing_curve(
    config: ModelConfig, batch_sizes: Sequence[int] = DECODE_BATCHES, bound: bool = False
) -> dict[int, float]:
    """{batch: bytes per decode step} expected under uniform routing (accounting.account; with
    `bound`, docs/model.md §8's min(B·k, E) / min(B·H·m, R) bound). Weights only, no KV cache."""
    result = accounting.account(
        config,
        seq_len=config.max_seq_len,
        bytes_per_number=bytes_per_number(config),
        batch_sizes=tuple(batch_sizes),
    )
    return dict(result.decode_bytes_bound if bound else result.decode_bytes)


def uniform_sparse_curve(
    config: ModelConfig, batch_sizes: Sequence[int] = DECODE_BATCHES
) -> dict[int, float]:
    """The sparse-table part of `uniform_routing_curve`: {batch: bytes} (its expected distinct
    units times their width), for plotting beside the measured sparse bytes."""
    expected = uniform_routing_curve(config, batch_sizes)
    counts = accounting.parameter_counts(config)
    size = bytes_per_number(config)
    h = config.d_model
    fixed = counts["dense"] + counts["sparse_dense"] + config.padded_vocab_size * h
    return {
        b: expected[b] - (fixed + min(b, config.padded_vocab_size) * h) * size for b in batch_sizes
    }


def _addressable(config: ModelConfig, unit: str) -> int:
    if unit == "experts":
        return config.moe.num_experts
    if unit == "rows":
        return accounting._memory_rows_and_width(config)[0]
    return 0


# --------------------------------------------------------------------------------------------------
# Entry point: the matched family on Shakespeare validation text
# --------------------------------------------------------------------------------------------------


def evaluation_rows(config, rows: int, length: int) -> np.ndarray:
    """int32 [rows, length] consecutive windows of the config's eval split (Shakespeare validation
    for the eval configs)."""
    import dataclasses

    from umv2_jax.data.pipeline import make_eval_batches

    data = dataclasses.replace(config.data, seq_len=length - 1)
    train = dataclasses.replace(config.train, batch_size=rows)
    batch = make_eval_batches(dataclasses.replace(config, data=data, train=train), 1)[0]
    inputs = batch["inputs"] if isinstance(batch, dict) else batch
    return np.concatenate([inputs, batch["targets"][:, -1:]], axis=1).astype(np.int32)


def plot(results: dict[str, dict[str, Any]], path: str, title: str) -> None:
    """results: {model name: {"summary": summarize(...), "uniform_sparse": {...},
    "uniform": {...}}} → a two-panel PNG: sparse-table bytes and weight bytes per step vs batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, (name, result) in enumerate(results.items()):
        color = f"C{index}"
        batches = sorted(int(b) for b in result["summary"])
        summary = {int(b): v for b, v in result["summary"].items()}
        uniform_sparse = {int(b): v for b, v in result["uniform_sparse"].items()}
        uniform = {int(b): v for b, v in result["uniform"].items()}
        if any(summary[b]["sparse"] > 0 for b in batches):
            left.plot(
                batches,
                [summary[b]["sparse"] for b in batches],
                "o-",
                color=color,
                label=f"{name} measured",
            )
            left.plot(
                batches,
                [uniform_sparse[b] for b in batches],
                "--",
                color=color,
                label=f"{name} uniform routing",
            )
        right.plot(
            batches,
            [summary[b]["measured"] for b in batches],
            "o-",
            color=color,
            label=f"{name} measured",
        )
        right.plot(
            batches, [uniform[b] for b in batches], "--", color=color, label=f"{name} uniform"
        )
        right.plot(
            batches,
            [summary[b]["total"] for b in batches],
            ":",
            color=color,
            label=f"{name} + KV cache",
        )
    for axis, label in ((left, "sparse-table bytes / step"), (right, "bytes read / step")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("decode batch (sequences)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    left.set_title("experts / value rows actually selected")
    right.set_title("weights + embedding + sparse (dotted: + KV cache)")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m umv2_jax.eval.decode_access",
        description="Measured decode bytes per step of docs/evaluation.md's matched models (PNG + JSON).",
    )
    parser.add_argument("--family", choices=("T", "S"), default="T")
    parser.add_argument("--batch-sizes", default="1,8,64,512")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--train-steps",
        type=int,
        default=0,
        help="train each model this many steps on its config's data first (0: at init)",
    )
    parser.add_argument("--out", default="decode_access")
    args = parser.parse_args(argv)
    import time

    import jax

    from umv2_jax.config import load_config
    from umv2_jax.errors import UserError

    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    os.makedirs(args.out, exist_ok=True)
    results: dict[str, Any] = {}
    tokens = None
    try:
        for kind in FAMILY_MODELS:
            path = f"eval/{args.family.lower()}_{kind}"  # a packaged config's name
            config = load_config(path)
            began = time.perf_counter()
            model = _trained_or_init(config, args.train_steps, args.out)
            if tokens is None:
                tokens = evaluation_rows(config, max(batch_sizes), args.prompt_len + args.steps)
            records = measure_decode_access(model, tokens, batch_sizes, args.prompt_len, args.steps)
            results[config.name] = {
                "summary": {str(b): v for b, v in summarize(config.model, records).items()},
                "uniform": {
                    str(b): v for b, v in uniform_routing_curve(config.model, batch_sizes).items()
                },
                "uniform_sparse": {
                    str(b): v for b, v in uniform_sparse_curve(config.model, batch_sizes).items()
                },
                "records": records,
                "seconds": time.perf_counter() - began,
            }
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    state = "at init" if args.train_steps == 0 else f"after {args.train_steps} training steps"
    meta = {
        "family": args.family,
        "state": state,
        "data": "Shakespeare validation text (eval split), teacher-forced",
        "prompt_len": args.prompt_len,
        "steps": args.steps,
        "platform": jax.devices()[0].platform,
    }
    with open(os.path.join(args.out, "decode_access.json"), "w") as handle:
        json.dump({"meta": meta, "models": results}, handle, indent=1)
    plot(
        results,
        os.path.join(args.out, "decode_access.png"),
        f"{args.family} family, {state}; {meta['data']}; {meta['platform']}",
    )
    print(table(results))
    return 0


def table(results: dict[str, Any]) -> str:
    """Markdown: per model and batch the measured sparse bytes, uniform sparse bytes, measured
    weights+embedding+sparse, KV cache, and each model's measured bytes over the memory model's."""
    names = list(results)
    lines = [
        "| model | batch | distinct/layer | sparse measured | sparse uniform | weights+sparse | "
        "KV cache | × " + names[-1] + " | prefetchable |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    reference = results[names[-1]]["summary"]
    for name in names:
        for batch, row in results[name]["summary"].items():
            distinct = ", ".join(f"{v:.1f}" for v in row["distinct_by_layer"].values()) or "–"
            lines.append(
                f"| {name} | {batch} | {distinct} | {accounting._human(row['sparse'], 'B')} | "
                f"{accounting._human(results[name]['uniform_sparse'][batch], 'B')} | "
                f"{accounting._human(row['measured'], 'B')} | "
                f"{accounting._human(row['kv_cache'], 'B')} | "
                f"{row['measured'] / reference[batch]['measured']:.2f} | "
                f"{'yes' if row.get('prefetchable') else 'no'} |"
            )
    return "\n".join(lines)


def _trained_or_init(config, train_steps: int, out: str):
    """The config's model at init (seeded by train.seed), or after `train_steps` steps of its
    own training recipe (a run directory under `out`)."""
    import dataclasses

    from flax import nnx

    from umv2_jax.models.transformer import Transformer

    if train_steps <= 0:
        return Transformer(config.model, nnx.Rngs(config.train.seed))
    from umv2_jax.generate import load_run
    from umv2_jax.training import loop

    train = dataclasses.replace(config.train, steps=train_steps, eval_every=train_steps)
    checkpoint = dataclasses.replace(config.checkpoint, every=train_steps)
    config = dataclasses.replace(config, train=train, checkpoint=checkpoint)
    workdir = os.path.join(out, f"run-{config.name}-{train_steps}")
    loop.train(config, workdir, progress=False, echo=lambda line: None)
    loaded, parts, params, rest, _ = load_run(workdir)
    return parts.build(params, rest)


if __name__ == "__main__":
    sys.exit(main())
