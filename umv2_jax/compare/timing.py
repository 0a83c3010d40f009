"""A suite's training time, extrapolated from measured steps.

    python -m umv2_jax.compare.timing --suite full --task mqar --steps 5
    python -m umv2_jax.compare --suite quick --estimate      # every task shape timed: estimate()

`estimate` times every (task, model) shape of a suite (sweep variants included) and adds the
probes, evaluation and one compilation per pair (run_seconds): the cost of a suite before running
it. The CLI below times one task shape only:

compiles each model of the suite for one of its tasks (its seq_len × batch_size), times `--steps`
train steps after the first (compilation excluded), and prints seconds per step per model and the
suite's training time extrapolated from them: for every (task, model, seed) run and the injection
runs, steps × (measured s/step) × (the run's tokens per step / the measured tokens per step).
This is linear in tokens: attention's quadratic part at other sequence lengths, compilation,
evaluation and decode measurement are not in it, so it is a floor on the real wall time, and it
says so in its output. The sweep's variants are counted at their base model's speed. Nothing is
written.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import jax

from umv2_jax.compare import runner
from umv2_jax.compare.run import run_config, select
from umv2_jax.compare.suites import SUITES
from umv2_jax.data.tasks import make_task


def _vocab(suite) -> int:
    vocab = max(make_task(t.task, t.params).vocab_size for t in suite.tasks)
    if suite.injection is not None:
        vocab = max(vocab, make_task("fact_base", suite.injection.params).vocab_size)
    return vocab


def time_steps(suite, task_name: str, steps: int, models=None) -> dict[str, tuple[float, float]]:
    """{model name: (mean seconds per train step after the first, seconds of the first step:
    compilation mostly)} on `task_name`'s shape; `models`: ModelSpecs (default the suite's)."""
    (spec,), _ = select(suite, [task_name], None)
    task = make_task(spec.task, spec.params)
    vocab = _vocab(suite)
    seconds = {}
    for model in models if models is not None else suite.models:
        config = run_config(
            model,
            seq_len=spec.seq_len,
            batch_size=spec.batch_size,
            steps=steps + 1,
            vocab_size=vocab,
        )
        programs = runner.Programs(config, config.model.vocab_size)
        params, rest = programs.init(0)
        state = programs.initial_state(params)
        batches = [
            runner.device_batch(task.batch(spec.batch_size, spec.seq_len, seed=0, index=i))
            for i in range(steps + 1)
        ]
        start = time.perf_counter()
        state, metrics = programs.train_step(state, rest, batches[0])  # compiles
        jax.block_until_ready(metrics)
        first = time.perf_counter() - start
        start = time.perf_counter()
        for batch in batches[1:]:
            state, metrics = programs.train_step(state, rest, batch)
        jax.block_until_ready(metrics)
        seconds[model.name] = ((time.perf_counter() - start) / steps, first)
        del state, params, rest, programs
    return seconds


def step_seconds(suite, task_name: str, steps: int) -> dict[str, float]:
    """{model name: mean seconds per train step of `task_name`'s shape, compilation excluded}."""
    return {name: value[0] for name, value in time_steps(suite, task_name, steps).items()}


# An evaluation batch (forward only) costs about a third of a train step (forward + backward).
EVAL_FRACTION = 1.0 / 3.0


def run_seconds(spec, seconds_per_step: float, first_step_s: float, seeds: int) -> float:
    """Estimated wall seconds of `seeds` runs of one model on `spec`: the train steps, the
    learning-curve probes and the final evaluation at EVAL_FRACTION of a step per batch, and one
    compilation (`first_step_s`: the seeds share it)."""
    task = make_task(spec.task, spec.params)
    evaluation = sum(
        task.test_batches(spec.batch_size)
        if hasattr(task, "test_batches") and split == "test"
        else spec.eval_batches
        for split in (make_task(spec.task, spec.test_params) if spec.test_params else task).splits()
        if split != "train"
    )
    probes = -(-spec.steps // spec.eval_every) * spec.probe_batches if spec.eval_every else 0
    per_seed = seconds_per_step * (spec.steps + EVAL_FRACTION * (evaluation + probes))
    return seeds * per_seed + first_step_s


def estimate(suite, tasks=None, seeds=None, steps: int = 3, echo=print) -> float:
    """Times `steps` train steps of every (task, model) shape of the suite (its sweep variants
    too), prints each pair's estimated wall time (run_seconds) and returns the total seconds
    (the injection runs: extrapolated linearly in tokens from the fact_base or first shape)."""
    chosen, seeds = select(suite, tasks, seeds)
    total, per_token = 0.0, {}
    for spec in chosen:
        measured = time_steps(suite, spec.name, steps, suite.models_for(spec.name))
        for name, (per_step, first) in measured.items():
            seconds = run_seconds(spec, per_step, first, seeds)
            total += seconds
            per_token.setdefault(name, per_step / (spec.seq_len * spec.batch_size))
            echo(
                f"  {spec.name:<16} {name:<16} {per_step:.3f} s/step, first step {first:.1f} s: "
                f"{seeds} seed(s) ≈ {seconds / 60:.1f} min"
            )
    injection = suite.injection
    if injection is not None:
        count = min(injection.seeds if injection.seeds is not None else seeds, seeds)
        for name, value in per_token.items():
            runs = injection.pretrain_steps + injection.finetune_steps * len(
                injection.modes.get(name, ())
            )
            seconds = count * runs * injection.seq_len * injection.batch_size * value
            total += seconds
            echo(f"  injection        {name:<16} ≈ {seconds / 60:.1f} min")
    return total


def extrapolate(suite, task_name: str, seconds: dict[str, float]) -> dict[str, float]:
    """{model name: training seconds of the whole suite for that model} (module docstring)."""
    measured = suite.task(task_name)
    per_token = {m: s / (measured.seq_len * measured.batch_size) for m, s in seconds.items()}
    total = dict.fromkeys(seconds, 0.0)
    base = suite.sweep.model if suite.sweep is not None else None
    for spec in suite.tasks:
        runs = suite.seeds * spec.steps * spec.seq_len * spec.batch_size
        for model in seconds:
            total[model] += runs * per_token[model]
            if model == base and spec.name in suite.sweep.tasks:  # its variants: at its speed
                total[model] += len(suite.sweep.variants) * runs * per_token[model]
    injection = suite.injection
    if injection is not None:
        seeds = injection.seeds if injection.seeds is not None else suite.seeds
        for model in seconds:
            steps = injection.pretrain_steps + injection.finetune_steps * len(
                injection.modes.get(model, ())
            )
            tokens = injection.seq_len * injection.batch_size
            total[model] += seeds * steps * tokens * per_token[model]
    return total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m umv2_jax.compare.timing")
    parser.add_argument("--suite", choices=sorted(SUITES), default="full")
    parser.add_argument("--task", default="mqar", help="the task whose shape is timed")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the compile")
    args = parser.parse_args(argv)
    if args.steps < 1:
        print(f"error: --steps {args.steps} must be >= 1", file=sys.stderr)
        return 2
    suite = SUITES[args.suite]
    seconds = step_seconds(suite, args.task, args.steps)
    spec = suite.task(args.task)
    device = jax.devices()[0]
    print(
        f"suite {suite.name}: {args.steps} timed steps at {spec.batch_size} × {spec.seq_len} "
        f"tokens ({args.task}) on {device.platform} ({device.device_kind})"
    )
    total = extrapolate(suite, args.task, seconds)
    for name, value in seconds.items():
        print(
            f"  {name}: {value:.3f} s/step; suite training, extrapolated: {total[name] / 3600:.2f} h"
        )
    print(
        f"  all models: {sum(total.values()) / 3600:.2f} h of training, extrapolated linearly in "
        "tokens from the timed shape (compilation, evaluation, decode measurement and attention's "
        "quadratic part at longer sequences not included: a floor)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
