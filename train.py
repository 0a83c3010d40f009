"""Trains a model: `python train.py [--config PATH] [--set k=v ...] [--workdir DIR] [--steps N]
[--no-resume]`. See README.md; the logic lives in umv2_jax.training."""

import sys

from umv2_jax.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
