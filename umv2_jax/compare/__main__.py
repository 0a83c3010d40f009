"""python -m umv2_jax.compare --suite quick|density|full|micro [--tasks ...] [--seeds N] [--out DIR]
[--estimate]"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from umv2_jax.errors import UserError


def main(argv: Sequence[str] | None = None) -> int:
    from umv2_jax.compare.suites import SUITES

    parser = argparse.ArgumentParser(
        prog="python -m umv2_jax.compare",
        description="Train and compare matched dense / MoE / UltraMemV2 models on the eval tasks.",
    )
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--tasks", nargs="+", default=None, help="a subset of the suite's tasks")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per (task, model)")
    parser.add_argument("--out", default=None, help="results directory (default results/SUITE)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="time a few steps of every (task, model) shape, print the suite's estimated wall "
        "time, and run nothing",
    )
    args = parser.parse_args(argv)
    from umv2_jax.compare.run import run_suite

    out = args.out or f"results/{args.suite}"
    if args.estimate:
        return _estimate(SUITES[args.suite], args.tasks, args.seeds)
    try:
        run_suite(
            SUITES[args.suite],
            out,
            tasks=args.tasks,
            seeds=args.seeds,
            progress=not args.no_progress,
        )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:  # Ctrl-C: every finished run is on disk, each in its own file
        print(
            f"\ninterrupted: {_finished_runs(out)} finished run(s) are kept in {out}; run the same "
            "command to continue (finished runs are skipped)",
            file=sys.stderr,
        )
        return 130
    return 0


def _estimate(suite, tasks, seeds) -> int:
    import time

    from umv2_jax.compare import timing

    try:
        start = time.perf_counter()
        print(f"suite {suite.name}: timing 3 steps of every (task, model) shape")
        total = timing.estimate(suite, tasks, seeds, steps=3)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"estimated wall time: {total / 60:.1f} min (measured in {time.perf_counter() - start:.0f}"
        f" s at load average {load:.2f}; decode-bytes measurement not counted)"
    )
    return 0


def _finished_runs(out: str) -> int:
    runs = os.path.join(out, "runs")
    try:
        return sum(name.endswith(".json") for name in os.listdir(runs))
    except OSError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
