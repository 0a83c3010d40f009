"""Running a suite into a results directory: resumable, one file per finished run.

    DIR/suite.json                       the suite's fingerprint (a DIR of another suite is refused)
    DIR/runs/<task>__<model>__seed<k>.json   one finished run: curve (with held-out probes every
                                         TaskSpec.eval_every steps), metric records, wall time,
                                         batch and init digests (seed pairing); sweep variants
                                         are models <base>.<label>
    DIR/decode/<model>.json              measured decode bytes per batch: the seed-0 model trained
                                         on the suite's decode_task (else the first task)
    DIR/injection/<model>__seed<k>.json  continual fact injection curves (umv2_jax.eval.injection)
    DIR/results.json, DIR/results.md, DIR/plots/*.png    rebuilt from the files above at the end

A run file is written atomically (temporary file, then rename) only when the run has finished, so
an interrupted suite resumes by skipping every run that has a file. Decode bytes are measured right
after the seed-0 run of the decode task, on its trained weights (which are not saved), and written
before that run's file: a run file without its model's decode file is run again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from umv2_jax.compare import cost, report, runner
from umv2_jax.compare.files import decode_path, injection_path, run_path, write_json
from umv2_jax.compare.suites import ModelSpec, Suite, TaskSpec
from umv2_jax.config import Config, load_config
from umv2_jax.data.tasks import TASKS, make_task
from umv2_jax.errors import ConfigError, UserError
from umv2_jax.eval import accounting

DECODE_PROMPT, DECODE_STEPS = 8, 4
# Held-out metrics recorded on the learning curves (TaskSpec.eval_every), slice "all".
PROBE_METRICS = ("exact_match", "answer_loss", "bits_per_byte")
__all__ = ["decode_path", "injection_path", "run_path", "run_suite", "select"]


class ResultsDirError(UserError):
    """--out holds something other than this suite's results."""


def select(suite: Suite, tasks: Sequence[str] | None, seeds: int | None) -> tuple[list, int]:
    """(the suite's TaskSpecs named by `tasks`, in the suite's order; the number of seeds).
    ConfigError for an unknown name or a bad seed count."""
    names = [task.name for task in suite.tasks]
    chosen = list(names) if not tasks else list(tasks)
    unknown = [name for name in chosen if name not in names]
    if unknown:
        registered = [name for name in unknown if name in TASKS]
        hint = (
            f"; {', '.join(registered)} is a task but not in suite {suite.name}"
            if registered
            else ""
        )
        raise ConfigError(
            f"--tasks: unknown task {', '.join(unknown)} for suite {suite.name}{hint}; "
            f"choose from {', '.join(names)}"
        )
    if suite.sweep is not None:
        missing = [name for name in suite.sweep.tasks if name not in names]
        if missing or suite.sweep.model not in [model.name for model in suite.models]:
            raise ConfigError(
                f"suite {suite.name}: its sweep names task(s) {', '.join(missing) or '-'} or "
                f"model {suite.sweep.model} that the suite does not have; fix SweepSpec"
            )
    seeds = suite.seeds if seeds is None else seeds
    if seeds < 1:
        raise ConfigError(f"--seeds: {seeds} is not a positive number of seeds; pass e.g. 3")
    return [suite.task(name) for name in names if name in chosen], seeds


def check_out_dir(out: str, suite: Suite) -> None:
    """ResultsDirError when `out` exists and is not empty and does not hold this suite's results
    with the same settings. Reads only; writes nothing."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise ResultsDirError(f"--out {out} is a file, not a directory; pass a new directory")
    marker = os.path.join(out, "suite.json")
    if not os.path.exists(marker):
        if os.listdir(out):
            raise ResultsDirError(
                f"--out {out} is not empty and holds no suite.json (not a comparison's results); "
                "pass a new or empty directory"
            )
        return
    try:
        with open(marker) as handle:
            saved = json.load(handle)
    except (OSError, json.JSONDecodeError):
        raise ResultsDirError(
            f"--out {out}: suite.json is unreadable; pass a new directory"
        ) from None
    if saved.get("name") != suite.name:
        raise ResultsDirError(
            f"--out {out} holds results of suite '{saved.get('name')}', not '{suite.name}'; "
            f"pass another --out (e.g. results/{suite.name})"
        )
    if saved != suite.fingerprint():
        raise ResultsDirError(
            f"--out {out} holds results of suite '{suite.name}' with other settings (an older "
            "version of the suite); pass a new --out or delete that directory"
        )


def run_config(
    model: ModelSpec,
    *,
    seq_len: int,
    batch_size: int,
    steps: int,
    vocab_size: int,
    lr=None,
    extra: Sequence[str] = (),
) -> Config:
    """The model's config for one task: its file, the suite's overrides and the task's shapes."""
    path = model.config  # a file, or a packaged config's name ("eval/t_umv2"): load_config finds it
    overrides = [
        *model.overrides,
        f"data.seq_len={seq_len}",
        f"train.batch_size={batch_size}",
        f"train.steps={steps}",
        f"model.vocab_size={vocab_size}",
        "train.eval_every=1000000",
        *([f"train.learning_rate={lr}"] if lr is not None else []),
        *extra,
    ]
    return load_config(path, overrides)


def check_matches(suite: Suite, configs: dict[str, Config]) -> dict[str, Any]:
    """docs/evaluation.md's 3% matches of the suite's models (dense, moe, umv2, and engram when present, by
    kind), from the accounting.
    Returns {"rows": [...], "ok": bool, "table": markdown}."""
    by_kind = {config.model.sparse: config for config in configs.values()}
    if not {"none", "moe", "ultramem_v2"} <= set(by_kind):
        return {"rows": [], "ok": False, "table": "(no dense / moe / umv2 triple to match)"}
    moe, dense = accounting.account(by_kind["moe"]), accounting.account(by_kind["none"])
    rows = accounting.match_rows(moe, accounting.account(by_kind["ultramem_v2"]), dense)
    if "engram" in by_kind:  # the Engram baseline is matched to the MoE (and dense) the same way
        engram = accounting.match_rows(moe, accounting.account(by_kind["engram"]), dense)
        rows += [row for row in engram if row.a_name != dense.name or row.b_name != moe.name]
    return {
        "rows": [
            {
                "quantity": r.quantity,
                "model": r.a_name,
                "value": r.a,
                "reference": r.b_name,
                "reference_value": r.b,
                "difference": r.difference,
                "ok": r.ok(),
            }
            for r in rows
        ],
        "ok": all(r.ok() for r in rows),
        "table": accounting.match_table(rows),
    }


def run_suite(
    suite: Suite,
    out: str,
    *,
    tasks: Sequence[str] | None = None,
    seeds: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs what is missing in `out`, then writes results.json, results.md and the plots.

    Everything that can be refused (unknown task, a foreign --out, failed matches) is refused
    before anything is written. The suite's training FLOPs and their time on one H100 at
    cost.ASSUMED_MFU are echoed first (umv2_jax.compare.cost).
    """
    chosen, seeds = select(suite, tasks, seeds)
    check_out_dir(out, suite)
    task_objects = {spec.name: make_task(spec.task, spec.params) for spec in chosen}
    for spec in chosen:
        task_objects[spec.name].check_seq_len(spec.seq_len)
    # One vocabulary for the whole suite (the largest task's): tasks of one shape then share one
    # compilation per model; every model of a task sees the same vocabulary either way.
    vocab_size = max(task.vocab_size for task in task_objects.values())
    if suite.injection is not None:
        vocab_size = max(vocab_size, make_task("fact_base", suite.injection.params).vocab_size)
    configs = {
        (spec.name, model.name): run_config(
            model,
            seq_len=spec.seq_len,
            batch_size=spec.batch_size,
            steps=spec.steps,
            vocab_size=vocab_size,
            lr=spec.learning_rate,
        )
        for spec in chosen
        for model in suite.models_for(spec.name)
    }
    matches = {}
    for spec in chosen:
        match = check_matches(suite, {m.name: configs[spec.name, m.name] for m in suite.models})
        if suite.check_match and not match["ok"]:
            raise ConfigError(
                f"suite {suite.name}, task {spec.name}: the models are not matched within 3% "
                f"(python -m umv2_jax.eval.accounting --match ...); fix the configs first"
            )
        matches[spec.name] = match

    flops = cost.suite_flops(suite, chosen, seeds, configs)
    echo(cost.flops_line(flops, cost.suite_gpu_seconds(suite, chosen, seeds, flops)))
    for sub in ("runs", "decode", "injection"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    write_json(os.path.join(out, "suite.json"), suite.fingerprint())

    decode_spec = decode_task(suite, chosen)

    def measures_decode(spec: TaskSpec, model: ModelSpec, seed: int) -> bool:
        """Seed 0 of the decode task measures decode bytes on its trained weights."""
        return (
            spec is decode_spec
            and seed == 0
            and model in suite.models
            and not os.path.exists(decode_path(out, model.name))
        )

    everything = [
        (spec, model, seed)
        for spec in chosen
        for model in suite.models_for(spec.name)
        for seed in range(seeds)
    ]
    jobs = [
        (spec, model, seed)
        for spec, model, seed in everything
        if not os.path.exists(run_path(out, spec.name, model.name, seed))
        or measures_decode(spec, model, seed)
    ]
    skipped = len(everything) - len(jobs)
    injection_jobs = _injection_jobs(suite, out, seeds) if suite.injection else []
    total = sum(spec.steps for spec, _, _ in jobs) + sum(
        suite.injection.pretrain_steps
        + suite.injection.finetune_steps * len(suite.injection.modes.get(model.name, ()))
        for model, _ in injection_jobs
    )
    if skipped:
        echo(f"{skipped} finished run(s) in {out} skipped")
    bar = tqdm(
        total=total,
        desc=f"suite {suite.name}",
        unit="step",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    programs = runner.ProgramCache()
    try:
        for spec, model, seed in jobs:
            bar.set_postfix_str(f"{spec.name} {model.name} seed {seed}", refresh=False)
            config = configs[spec.name, model.name]
            task = task_objects[spec.name]
            model_programs = programs.get(config)
            record, params, rest = _one_run(
                model_programs, config, spec, task, model, seed, suite, bar.update
            )
            if measures_decode(spec, model, seed):
                # Written before the run file: a run file whose decode file is missing is rerun.
                bar.set_postfix_str(f"decode bytes {model.name}", refresh=False)
                write_json(
                    decode_path(out, model.name),
                    _decode_bytes(
                        model_programs, params, rest, spec, task, model, suite.decode_batches
                    ),
                )
            del params, rest
            write_json(run_path(out, spec.name, model.name, seed), record)
        if injection_jobs:
            from umv2_jax.eval import injection

            for model, seed in injection_jobs:
                bar.set_postfix_str(f"injection {model.name} seed {seed}", refresh=False)
                result = injection.run(
                    lambda model=model, **kw: run_config(model, vocab_size=vocab_size, **kw),
                    suite.injection,
                    model_name=model.name,
                    seed=seed,
                    on_step=bar.update,
                    programs=programs,
                )
                write_json(injection_path(out, model.name, seed), result)
    finally:
        bar.close()
    results = report.collect(out, suite, matches, machine())
    report.write(out, results)
    echo(f"wrote {os.path.join(out, 'results.md')}, results.json and plots/")
    return results


def params_digest(params: dict) -> str:
    """sha1 of every parameter's bytes in tree order: equal exactly when the weights are equal."""
    import jax

    digest = hashlib.sha1()
    for leaf in jax.tree_util.tree_leaves(jax.device_get(params)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def _one_run(programs, config, spec: TaskSpec, task, model, seed, suite, on_step):
    start = time.perf_counter()
    params, rest = programs.init(seed)
    init_digest = params_digest(params)
    state = programs.initial_state(params)
    counts = accounting.account(config)
    test_task = make_task(spec.task, spec.test_params) if spec.test_params else task
    probe_batches = [
        test_task.batch(spec.batch_size, spec.seq_len, seed=seed, index=i, split="test")
        for i in range(spec.probe_batches if spec.eval_every > 0 else 0)
    ]

    def probe(params) -> dict[str, float]:
        records = runner.evaluate(programs, params, rest, test_task, probe_batches, "test")
        return {
            r["metric"]: r["value"]
            for r in records
            if r["slice"] == "all" and r["metric"] in PROBE_METRICS
        }

    batch_digest = hashlib.sha1()
    state, curve, train_s, first_s = runner.train(
        programs,
        state,
        rest,
        lambda index: task.batch(spec.batch_size, spec.seq_len, seed=seed, index=index),
        spec.steps,
        log_every=suite.log_every,
        flops_per_token=counts.training_flops_per_token,
        on_step=on_step,
        probe=probe if probe_batches else None,
        probe_every=spec.eval_every,
        digest=batch_digest,
    )
    records = []
    for split in [s for s in test_task.splits() if s != "train"]:
        count = spec.eval_batches
        if hasattr(test_task, "test_batches") and split == "test":
            count = test_task.test_batches(spec.batch_size)  # every fact once
        batches = [
            test_task.batch(spec.batch_size, spec.seq_len, seed=seed, index=i, split=split)
            for i in range(count)
        ]
        records += runner.evaluate(programs, state["params"], rest, test_task, batches, split)
    record = {
        "task": spec.name,
        "task_name": spec.task,
        "task_params": task.params(),
        "model": model.name,
        "kind": config.model.sparse,
        "seed": seed,
        "steps": spec.steps,
        "batch_size": spec.batch_size,
        "seq_len": spec.seq_len,
        "curve": curve,
        "records": records,
        "wall_s": time.perf_counter() - start,
        "train_s": train_s,
        "first_step_s": first_s,
        "accounting": counts.to_json(),
        # Seed pairing, checkable from the files: every model of a seed reads the same batches
        # (batch_digest), every seed starts from different weights (init_digest).
        "batch_digest": batch_digest.hexdigest(),
        "init_digest": init_digest,
        "sweep": model not in suite.models,
    }
    return record, state["params"], rest


def decode_task(suite: Suite, chosen: Sequence[TaskSpec]) -> TaskSpec | None:
    """The task whose seed-0 trained models are measured for decode bytes: the suite's
    `decode_task` when chosen, else the first chosen task; None when nothing is measured."""
    if not suite.decode_batches or not chosen:
        return None
    return next((spec for spec in chosen if spec.name == suite.decode_task), chosen[0])


def _decode_bytes(
    programs,
    params: dict,
    rest: dict,
    spec: TaskSpec,
    task,
    model: ModelSpec,
    batch_sizes: Sequence[int],
) -> dict[str, Any]:
    """Measured bytes per decode step (umv2_jax.eval.decode_access) of the model trained on `spec`
    (seed 0; `params`, `rest` its trained weights), beside the uniform-routing curve, on the
    first DECODE_PROMPT + DECODE_STEPS tokens of the task's train-split batches spec.steps,
    spec.steps + 1, … (data the model never trained on). Batches: 1, 8, 64 and 512 where 64
    such batches have that many rows."""
    from umv2_jax.eval import decode_access

    config = programs.config
    model_module = programs.parts.build(params, rest)
    # Train-split batches after the last trained step: never trained on, and distinct rows for
    # every task (fact_base's test split is every fact once, only num_facts / 16 distinct rows,
    # so its B = 512 would repeat 32 rows).
    rows, index = [], spec.steps
    while sum(len(r) for r in rows) < max(batch_sizes) and index < spec.steps + 64:
        batch = task.batch(spec.batch_size, spec.seq_len, seed=0, index=index, split="train")
        rows.append(batch["inputs"][:, : DECODE_PROMPT + DECODE_STEPS])
        index += 1
    tokens = np.concatenate(rows)
    sizes = tuple(b for b in batch_sizes if b <= tokens.shape[0])
    records = decode_access.measure_decode_access(
        model_module, tokens, sizes, prompt_len=DECODE_PROMPT, steps=DECODE_STEPS
    )
    summary = decode_access.summarize(config.model, records)
    uniform = decode_access.uniform_routing_curve(config.model, sizes)
    return {
        "model": model.name,
        "measured": {str(b): v["measured"] for b, v in summary.items()},
        "sparse": {str(b): v["sparse"] for b, v in summary.items()},
        "sparse_layers": {str(b): v["sparse_layers"] for b, v in summary.items()},
        "uniform": {str(b): v for b, v in uniform.items()},
        "task": spec.name,
        "seed": 0,
        "trained_steps": spec.steps,
        "distinct_rows": int(len(np.unique(tokens, axis=0))),
        "note": f"routing of the seed-0 model trained {spec.steps} steps on {spec.name}, "
        f"on {spec.name} train-split batches after step {spec.steps} (never trained on)",
    }


def _injection_jobs(suite: Suite, out: str, seeds: int) -> list[tuple[ModelSpec, int]]:
    spec = suite.injection
    count = spec.seeds if spec.seeds is not None else seeds
    return [
        (model, seed)
        for model in suite.models
        if spec.modes.get(model.name)
        for seed in range(min(count, seeds))
        if not os.path.exists(injection_path(out, model.name, seed))
    ]


def machine() -> dict[str, Any]:
    import jax

    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }
