"""Command line of the trainer: `python train.py [--config PATH] [--set k=v ...] [--workdir DIR]
[--steps N] [--no-resume]`.

User mistakes (a bad config key or value, a missing file, an incompatible checkpoint) print one line
and exit with status 2; nothing is written before the config, data and work directory are checked.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from umv2_jax.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_config_path() -> str:
    for candidate in (Path("configs/default.yaml"), REPO_ROOT / "configs" / "default.yaml"):
        if candidate.is_file():
            return str(candidate)
    return "configs/default.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train an UltraMemV2 / MoE / dense transformer (resumes from WORKDIR).",
    )
    parser.add_argument(
        "--config", default=None, help="YAML config (default: configs/default.yaml)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set model.num_layers=4 (repeatable)",
    )
    parser.add_argument("--workdir", default=None, help="run directory (default: runs/<name>)")
    parser.add_argument("--steps", type=int, default=None, help="train.steps override")
    parser.add_argument(
        "--no-resume", action="store_true", help="start over, deleting WORKDIR's checkpoints"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax").setLevel(logging.ERROR)  # "Unable to initialize backend 'tpu'" noise
    try:
        from umv2_jax.config import load_config

        overrides = list(args.overrides)
        if args.steps is not None:
            overrides.append(f"train.steps={args.steps}")
        config = load_config(args.config or default_config_path(), overrides)
        workdir = args.workdir or os.path.join("runs", config.name)
        from umv2_jax.eval.accounting import account
        from umv2_jax.training.loop import TrainingDiverged, train

        try:
            result = train(
                config,
                workdir,
                resume=not args.no_resume,
                progress=not args.quiet,
                account=account,  # the summary's paper-convention numbers
            )
        except TrainingDiverged as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    evaluation = result.eval
    print(
        f"\nfinal validation (step {result.step}): loss {evaluation['eval_loss']:.4f} nats/token, "
        f"{evaluation['eval_bpb']:.4f} bits/byte"
    )
    print(f"checkpoints  {result.checkpoint_dir}")
    print(f"metrics      {result.metrics_path}")
    if result.plot_path:
        print(f"loss plot    {result.plot_path}")
    print(f"sample with  python -m umv2_jax.generate --workdir {result.workdir} --prompt 'ROMEO:'")
    return 0
