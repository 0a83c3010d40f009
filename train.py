"""Trains a model: `python train.py [--config PATH] [--set k=v ...] [--workdir DIR] [--steps N]
[--no-resume] [--coordinator HOST:PORT --num-processes N --process-id I | --distributed]`.
See README.md (multi-host launches: its "Multi-host" section); the logic lives in
umv2_jax.training (the command line in umv2_jax.training.cli)."""

import sys

from umv2_jax.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
