"""A suite's training time, extrapolated from measured steps of one task shape.

    python -m umv2_jax.compare.timing --suite full --task mqar --steps 5

compiles each model of the suite for one of its tasks (its seq_len × batch_size), times `--steps`
train steps after the first (compilation excluded), and prints seconds per step per model and the
suite's training time extrapolated from them: for every (task, model, seed) run and the injection
runs, steps × (measured s/step) × (the run's tokens per step / the measured tokens per step).
This is linear in tokens: attention's quadratic part at other sequence lengths, compilation,
evaluation and decode measurement are not in it, so it is a floor on the real wall time, and it
says so in its output. Nothing is written.
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


def step_seconds(suite, task_name: str, steps: int) -> dict[str, float]:
    """{model name: mean seconds per train step of `task_name`'s shape, compilation excluded}."""
    (spec,), _ = select(suite, [task_name], None)
    task = make_task(spec.task, spec.params)
    vocab = max(make_task(t.task, t.params).vocab_size for t in suite.tasks)
    if suite.injection is not None:
        vocab = max(vocab, make_task("fact_base", suite.injection.params).vocab_size)
    seconds = {}
    for model in suite.models:
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
        state, metrics = programs.train_step(state, rest, batches[0])  # compiles
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for batch in batches[1:]:
            state, metrics = programs.train_step(state, rest, batch)
        jax.block_until_ready(metrics)
        seconds[model.name] = (time.perf_counter() - start) / steps
        del state, params, rest, programs
    return seconds


def extrapolate(suite, task_name: str, seconds: dict[str, float]) -> dict[str, float]:
    """{model name: training seconds of the whole suite for that model} (module docstring)."""
    measured = suite.task(task_name)
    per_token = {m: s / (measured.seq_len * measured.batch_size) for m, s in seconds.items()}
    total = dict.fromkeys(seconds, 0.0)
    for spec in suite.tasks:
        for model in seconds:
            total[model] += (
                suite.seeds * spec.steps * spec.seq_len * spec.batch_size * per_token[model]
            )
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
