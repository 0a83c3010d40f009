"""Evaluate a trained run's checkpoint: `python -m umv2_jax.evaluate --workdir RUN`.

    python -m umv2_jax.evaluate --workdir runs/tiny                       # the trainer's eval data
    python -m umv2_jax.evaluate --workdir runs/tiny --step 50 --source files:held_out/*.txt --json
    python -m umv2_jax.evaluate --workdir runs/tiny --source task:mqar --max-tokens 65536
    python -m umv2_jax.evaluate --workdir runs/tiny --mesh data=2 --row-usage usage.npz
    python -m umv2_jax.evaluate --workdir runs/tiny --lm-eval my_task --limit 50   # needs [eval]

Reports the loss per token (nats), bits per byte and perplexity (exp of the loss) on any source the
trainer reads, computed exactly as the trainer's own evaluation does (`training.step.make_eval_step`
and `summarize_eval` on `data.pipeline.make_eval_batches` of the run's config): on the run's own
eval data, at the step the trainer evaluated, the numbers are the `eval_loss` / `eval_bpb` of its
metrics.jsonl. `--source`, `--split` and `--tokenizer` override `data.source`, `data.eval_split`
and `data.tokenizer` of the run's config (the model is the run's); the tokenizer must be the run's
own (WORKDIR/tokenizer/identity.json): another one is a one-line error, since the model's ids would
mean other strings. `--max-tokens N` reads ceil(N / (batch · seq_len)) batches (default: the
trainer's `train.eval_batches`). `task:NAME` sources also report the task's metrics (exact match
per slice, answer loss, … as `umv2_jax.compare` computes them).

Memory layers report per-layer diagnostics on that data: the fraction of their addressable rows hit
anywhere in the evaluated window and the means of their score statistics (top-1 and top-m scores,
output std, the Tucker core's singular values).

`--row-usage OUT.npz` writes the per-row hit counts of the memory layers on the evaluated data
(UltraMemV2 only), what the TF-IDF row selection of sparse memory fine-tuning
(`train.trainable: rows`) reads. Format (numpy .npz, `np.load(OUT)`):

    counts       int64 [L, n²]  counts[l, r]: how many evaluated positions (loss_mask 1) selected
                                value row r of table l (any head, any of the top-m slots; a row
                                selected twice by one position counts once). L = the number of
                                memory layers (tables, `MemoryTables.values` [L, n², D_v]); with
                                value sharing a layer's hits land in the tables of its window.
    tokens       int64 scalar   the number of evaluated positions counted
    config_name  str scalar     the run's `name`
    step         int64 scalar   the checkpoint's step
    source       str scalar     the data source evaluated;  split  str scalar: its split
    blocks       int64 [L]      the model block of each memory layer

Restores parameters only (`training.restore.load_params`: never optimizer state), on every local
device by default (`--mesh data=2,tensor=…` to lay the model out like the trainer, `data` over the
batch; one process: multi-host evaluation is not supported). Read-only on the run directory: nothing is written there (a read-only directory works),
and `--row-usage` may not point into it. Bad input is one line on stderr and exit status 2 with
nothing written: a directory without a run or checkpoints, a step that does not exist, an unknown
source, a tokenizer other than the run's, `--lm-eval` without the `lm-eval` package.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

import numpy as np

from umv2_jax.errors import CheckpointError, ConfigError, DataError, UserError

ROW_USAGE_KEYS = ("counts", "tokens", "config_name", "step", "source", "split", "blocks")


# --------------------------------------------------------------------------------------------------
# Configuration of an evaluation
# --------------------------------------------------------------------------------------------------


def eval_config(
    workdir: str,
    *,
    source: str | None = None,
    split: str | None = None,
    tokenizer: str | None = None,
    mesh: dict[str, int] | None = None,
):
    """(config, tokenizer or None) of the run with the data overrides applied and checked.

    The model part is the run's; the tokenizer is the run's own copy (WORKDIR/tokenizer/), or
    `tokenizer` when it is the same one (DataError otherwise). None for task sources (bytes).
    """
    from umv2_jax.config import apply_overrides, config_from_dict
    from umv2_jax.data import run_tokenizer, tokenizers
    from umv2_jax.training.restore import read_run_config

    data = read_run_config(workdir)
    run_config = config_from_dict(json.loads(json.dumps(data)))
    overrides = []
    if source is not None:
        overrides += [f"data.source={source}", "data.mixture=[]"]
    if split is not None:
        overrides.append(f"data.eval_split={split}")
    for axis, size in (mesh or {}).items():
        overrides.append(f"mesh.{axis}={size}")
    apply_overrides(data, overrides)
    if source is not None:
        data["data"]["source"] = source  # verbatim: YAML would read some paths as other types
    config = config_from_dict(data)
    if config.data.task_name is not None:
        if run_config.data.task_name is None and run_config.data.tokenizer != "bytes":
            raise ConfigError(
                f"--source {source}: task sources are byte-level, but the run was trained with "
                f"tokenizer {run_config.data.tokenizer}; evaluate it on a text source"
            )
        return config, None
    if run_config.data.task_name is not None:
        run_tok = tokenizers.byte_tokenizer()
    else:
        run_tok = run_tokenizer.load(workdir, run_config)
    chosen = run_tok
    if tokenizer is not None:
        d = config.data
        chosen = tokenizers.load_tokenizer(
            tokenizer, bos=d.bos_token, eos=d.eos_token, pad=d.pad_token
        )
        keys = ("kind", "sha256", "vocab_size", "bos_id", "eos_id", "pad_id")
        saved, given = run_tok.identity(), chosen.identity()
        different = [key for key in keys if saved.get(key) != given.get(key)]
        if different:
            raise DataError(
                f"--tokenizer {tokenizer} is not the tokenizer the run was trained with ("
                + ", ".join(
                    f"{key} {_short(given, key)} vs {_short(saved, key)}" for key in different
                )
                + f"); leave out --tokenizer: the run's copy in {workdir}/tokenizer/ is used"
            )
    data["data"]["tokenizer"] = chosen.spec
    return config_from_dict(data), chosen


def _short(identity: dict, key: str) -> str:
    value = identity.get(key)
    return f"{value[:12]}…" if key == "sha256" and isinstance(value, str) else str(value)


def parse_mesh(text: str) -> dict[str, int]:
    """`--mesh data=2,tensor=1` → {axis: size} (ConfigError for a malformed one)."""
    from umv2_jax.aot import parse_mesh as parse

    return parse(text)


# --------------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------------


def eval_batches(config, max_tokens: int | None = None) -> list[dict[str, np.ndarray]]:
    """The batches the trainer evaluates on (its `train.eval_batches`, or enough for
    `max_tokens`); task sources keep their slice labels (for the task metrics)."""
    from umv2_jax.data import pipeline

    per_batch = config.train.batch_size * config.data.seq_len
    count = config.train.eval_batches
    if max_tokens is not None:
        count = max(1, math.ceil(max_tokens / per_batch))
    if config.data.task_name is not None:
        from umv2_jax.data.tasks import stream

        return stream.task_eval_batches(
            pipeline._make_task(config.data),
            config.train.batch_size,
            config.data.seq_len,
            config.data.shuffle_seed,
            count,
            full=True,
        )
    return pipeline.make_eval_batches(config, count)


def evaluate(
    config,
    parts,
    params,
    rest,
    batches: list[dict[str, np.ndarray]],
    mesh=None,
    row_usage: bool = False,
) -> dict[str, Any]:
    """{"metrics": summarize_eval's dict (eval_loss, eval_bpb, eval/…), "tokens", "bytes",
    "perplexity", "row_counts": {block: int64 [window rows]} (with row_usage)} over `batches`."""
    import jax

    from umv2_jax import parallel
    from umv2_jax.data.tasks.stream import DEVICE_KEYS
    from umv2_jax.training.step import make_eval_step, summarize_eval

    mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
    sharding = parallel.batch_sharding(mesh)
    keys = DEVICE_KEYS + ("target_bytes",)
    with parallel.use_mesh(mesh):
        step = jax.jit(make_eval_step(parts, row_counts=row_usage))
        sums, counts = [], {}
        for batch in batches:
            device_batch = {k: jax.device_put(batch[k], sharding) for k in keys if k in batch}
            out = jax.device_get(step(params, rest, device_batch))
            for block, value in out.pop("row_counts", {}).items():
                counts[block] = counts.get(block, 0) + np.asarray(value, np.int64)
            sums.append(out)
    metrics = summarize_eval(sums)
    tokens = sum(float(s["tokens"]) for s in sums)
    return {
        "metrics": metrics,
        "tokens": int(tokens),
        "bytes": int(sum(float(s["bytes"]) for s in sums)),
        "perplexity": math.exp(min(metrics["eval_loss"], 700.0)),
        "row_counts": counts,
    }


def task_metrics(config, params, rest, batches) -> dict[str, float]:
    """{"<metric>/<slice>": value} of a `task:` source, computed as `umv2_jax.compare` does."""
    from umv2_jax.compare import runner
    from umv2_jax.data import pipeline

    task = pipeline._make_task(config.data)
    programs = runner.Programs(config, config.model.vocab_size)
    records = runner.evaluate(programs, params, rest, task, batches, "test")
    return {
        f"{r['metric']}/{r['slice']}": r["value"]
        for r in records
        if not r["metric"].startswith("health/")
    }


def table_counts(config, window_counts: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(int64 [L, n²] counts per value table and row, int64 [L] block of each memory layer) from
    each layer's counts over its window's rows ([g·n²]: row j of table window[j // n²])."""
    from umv2_jax.models.ultramem_v2 import value_share_window

    model = config.model
    blocks = list(config.model.sparse_layer_indices())
    rows = model.memory.n_keys**2
    share = model.memory.value_share
    counts = np.zeros((len(blocks), rows), np.int64)
    for layer, block in enumerate(blocks):
        if block not in window_counts:
            continue
        window = value_share_window(share.topology, share.window, layer, len(blocks))
        per_table = np.asarray(window_counts[block], np.int64).reshape(len(window), rows)
        for position, table in enumerate(window):
            counts[table] += per_table[position]
    return counts, np.asarray(blocks, np.int64)


def write_row_usage(path: str, counts, blocks, tokens: int, config, step: int) -> None:
    """The --row-usage file (format: the module docstring), written atomically."""
    temporary = path + ".tmp.npz"
    np.savez(
        temporary,
        counts=np.asarray(counts, np.int64),
        tokens=np.int64(tokens),
        config_name=np.asarray(config.name),
        step=np.int64(step),
        source=np.asarray(config.data.source),
        split=np.asarray(config.data.eval_split),
        blocks=np.asarray(blocks, np.int64),
    )
    os.replace(temporary, path)


def memory_report(metrics: dict[str, float]) -> dict[int, dict[str, float]]:
    """{block: {statistic: value}} of the memory layers' eval/layer{i}/… entries."""
    layers: dict[int, dict[str, float]] = {}
    for key, value in metrics.items():
        if not key.startswith("eval/layer"):
            continue
        head, _, name = key[len("eval/layer") :].partition("/")
        if head.isdigit():
            layers.setdefault(int(head), {})[name] = value
    return dict(sorted(layers.items()))


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error form: one line on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive count; pass 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m umv2_jax.evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", required=True, help="a run directory written by train.py")
    parser.add_argument("--step", type=_non_negative, default=None, help="default: the newest")
    parser.add_argument("--source", default=None, help="data.source override (default: the run's)")
    parser.add_argument("--split", default=None, help="data.eval_split override")
    parser.add_argument(
        "--tokenizer", default=None, help="data.tokenizer (must be the run's own tokenizer)"
    )
    parser.add_argument(
        "--max-tokens", type=_positive, default=None, help="default: train.eval_batches batches"
    )
    parser.add_argument("--mesh", default=None, help="e.g. data=2 (default: data over all devices)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--row-usage", default=None, metavar="OUT.npz", help="write per-row hit counts"
    )
    parser.add_argument(
        "--lm-eval",
        default=None,
        metavar="TASKS",
        help="comma-separated lm-eval-harness tasks (or task YAML paths); needs umv2-jax[eval]",
    )
    parser.add_argument("--limit", type=_positive, default=None, help="lm-eval: examples per task")
    parser.add_argument(
        "--batch-size", type=_positive, default=8, help="lm-eval: requests per batch"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


def _main(args: argparse.Namespace) -> int:
    workdir = os.path.abspath(args.workdir)
    if args.lm_eval is not None:
        from umv2_jax.eval.harness import require_lm_eval

        require_lm_eval()  # before anything is loaded
    if args.row_usage is not None:
        _check_output(args.row_usage, workdir)
    mesh_sizes = parse_mesh(args.mesh) if args.mesh is not None else None
    from umv2_jax.training.restore import read_run_config, saved_steps

    read_run_config(workdir)  # a run at all
    steps = saved_steps(workdir)
    if args.step is not None and args.step not in steps:
        raise CheckpointError(
            f"{workdir} has no checkpoint at step {args.step}; saved steps: "
            f"{', '.join(map(str, steps))}"
        )
    config, tokenizer = eval_config(
        workdir,
        source=args.source,
        split=args.split,
        tokenizer=args.tokenizer,
        mesh=mesh_sizes,
    )
    import jax

    from umv2_jax import parallel

    if jax.process_count() > 1:
        raise ConfigError(
            "evaluate runs in one process (its batches are host arrays of the global batch); "
            "run it on one host, with --mesh over that host's devices"
        )
    mesh = parallel.make_mesh(config.mesh)  # ConfigError for a mesh this machine cannot build
    shards = parallel.batch_shards(mesh)
    if config.train.batch_size % shards:
        raise ConfigError(
            f"the run's train.batch_size {config.train.batch_size} does not split over the "
            f"{shards} batch shards of --mesh {dict(mesh.shape)}; pick a mesh whose data axes "
            f"divide {config.train.batch_size}"
        )
    if args.row_usage is not None and config.model.sparse != "ultramem_v2":
        raise ConfigError(
            f"--row-usage counts UltraMemV2 value rows, but the run's model.sparse is "
            f"'{config.model.sparse}'; leave out --row-usage"
        )
    if args.lm_eval is None:
        batches = eval_batches(config, args.max_tokens)  # DataError for a bad source / split
        if not batches:
            raise ConfigError(f"--source {config.data.source} has no eval documents")
    from umv2_jax.training.restore import load_params

    config, parts, params, rest, step = load_params(workdir, args.step, mesh, config=config)
    if args.lm_eval is not None:
        return _run_lm_eval(args, config, parts, params, rest, step, tokenizer)
    result = evaluate(config, parts, params, rest, batches, mesh, args.row_usage is not None)
    report = _report(config, step, batches, result)
    if config.data.task_name is not None:
        report["task"] = task_metrics(config, params, rest, batches)
    if args.row_usage is not None:
        counts, blocks = table_counts(config, result["row_counts"])
        write_row_usage(args.row_usage, counts, blocks, result["tokens"], config, step)
        report["row_usage"] = {"path": args.row_usage, "tokens": result["tokens"]}
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        _print_report(report)
    return 0


def _check_output(path: str, workdir: str) -> None:
    target = os.path.abspath(path)
    if os.path.commonpath([target, workdir]) == workdir:
        raise ConfigError(
            f"--row-usage {path} is inside the run directory {workdir}, which evaluation never "
            "writes to; pass a path outside it"
        )
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise ConfigError(f"--row-usage {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--row-usage {path}: folder {parent} is not writable")


def _report(config, step: int, batches, result: dict[str, Any]) -> dict[str, Any]:
    metrics = result["metrics"]
    return {
        "config_name": config.name,
        "step": step,
        "source": config.data.source,
        "split": config.data.eval_split if config.data.task_name is None else "test",
        "batches": len(batches),
        "tokens": result["tokens"],
        "bytes": result["bytes"],
        "loss": metrics["eval_loss"],
        "bits_per_byte": metrics["eval_bpb"],
        "perplexity": result["perplexity"],
        "memory": {str(block): stats for block, stats in memory_report(metrics).items()},
        "metrics": metrics,
    }


def _print_report(report: dict[str, Any]) -> None:
    print(
        f"[{report['config_name']}, step {report['step']}] {report['source']} "
        f"({report['split']}): {report['batches']} batch(es), {report['tokens']:,} tokens, "
        f"{report['bytes']:,} bytes"
    )
    print(
        f"loss {report['loss']:.4f} nats/token   bits/byte {report['bits_per_byte']:.4f}   "
        f"perplexity {report['perplexity']:.3f}"
    )
    for block, stats in report["memory"].items():
        shown = ", ".join(
            f"{name} {value:.4g}"
            for name, value in sorted(stats.items())
            if not name.startswith("loss/")
        )
        print(f"layer {block}: {shown}")
    for name, value in sorted(report.get("task", {}).items()):
        print(f"task {name}: {value:.4f}")
    if "row_usage" in report:
        usage = report["row_usage"]
        print(f"row usage of {usage['tokens']:,} tokens written to {usage['path']}")


def _run_lm_eval(args, config, parts, params, rest, step, tokenizer) -> int:
    from umv2_jax.eval import harness

    if tokenizer is None:
        from umv2_jax.data import tokenizers

        tokenizer = tokenizers.byte_tokenizer()
    model = harness.UMV2LM(
        config, parts, params, rest, tokenizer=tokenizer, batch_size=args.batch_size
    )
    results = harness.run_tasks(model, args.lm_eval.split(","), limit=args.limit)
    report = {"config_name": config.name, "step": step, "lm_eval": results}
    if args.json:
        print(json.dumps(report, sort_keys=True, default=str))
    else:
        print(f"[{config.name}, step {step}] lm-eval")
        for task, values in sorted(results.items()):
            shown = ", ".join(
                f"{name} {value:.4f}"
                for name, value in sorted(values.items())
                if isinstance(value, int | float)
            )
            print(f"{task}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
