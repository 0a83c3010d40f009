"""Command line of the trainer: `python train.py [--config PATH] [--set k=v ...] [--workdir DIR]
[--steps N] [--profile START:STOP] [--wandb PROJECT] [--no-resume [--overwrite-other-model]] [--coordinator HOST:PORT --num-processes N
--process-id I | --distributed]`.

Multi-process runs (one process per host, or per GPU) join through `jax.distributed` before JAX
touches a device: from the flags, from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
inside a multi-task `srun` step, or with `--distributed` by JAX's cluster detection (Cloud TPU).
See umv2_jax.parallel.distributed.

User mistakes (a bad config key or value, a missing file, an incompatible checkpoint, a work
directory in use by another process or holding pieces of a run that do not fit together) print one
line and exit with status 2; nothing is written before the config, data and work directory are
checked.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys

from umv2_jax.errors import UserError
from umv2_jax.training import signals


def default_config_path() -> str:
    """configs/default.yaml of the working directory when there is one, else the packaged one."""
    from umv2_jax.config import resolve_config_path

    return resolve_config_path("configs/default.yaml")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train an UltraMemV2 / MoE / dense transformer (resumes from WORKDIR).",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="YAML config file, or a packaged config's name such as tiny_umv2 or "
        "paper/ultramem_v2_227m (default: configs/default.yaml)",
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
        "--init-from",
        default=None,
        metavar="RUN[:STEP] | hf:DIR",
        help="start a new run from these parameters with a fresh optimizer (train.init_from; "
        "see umv2_jax.training.warmstart)",
    )
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="start over, deleting WORKDIR's previous run (each deleted path is printed)",
    )
    parser.add_argument(
        "--overwrite-other-model",
        action="store_true",
        help="with --no-resume: also delete a previous run of a different model in WORKDIR",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--profile",
        default=None,
        metavar="START:STOP",
        help="write a jax.profiler trace of steps START … STOP (1-based, inclusive) under "
        "WORKDIR/profile/ for TensorBoard / Perfetto (train.profile)",
    )
    parser.add_argument(
        "--wandb",
        default=None,
        metavar="PROJECT",
        help="also log the metrics to this Weights & Biases project (train.wandb_project; "
        "WANDB_MODE=offline logs locally; needs the wandb extra)",
    )
    launch = parser.add_argument_group(
        "multi-process runs (see README 'Multi-host'; default: the environment, else one process)"
    )
    launch.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="process 0's address and a free port, the same on every process "
        "(else JAX_COORDINATOR_ADDRESS)",
    )
    launch.add_argument(
        "--num-processes", type=int, default=None, help="processes in the run (JAX_NUM_PROCESSES)"
    )
    launch.add_argument(
        "--process-id", type=int, default=None, help="this process, 0 … N-1 (JAX_PROCESS_ID)"
    )
    launch.add_argument(
        "--local-device-ids",
        default=None,
        metavar="0,1,...",
        help="the local GPUs this process uses (JAX_LOCAL_DEVICE_IDS; default all)",
    )
    launch.add_argument(
        "--distributed",
        action="store_true",
        help="let JAX detect the cluster (Cloud TPU VM slices, SLURM, Open MPI, Kubernetes)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    with signals.handling():  # from here on SIGTERM / Ctrl-C stop at a safe point: exit 0 / 130
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.overwrite_other_model and not args.no_resume:
        print("error: --overwrite-other-model only goes with --no-resume", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax").setLevel(logging.ERROR)  # "Unable to initialize backend 'tpu'" noise
    try:
        from umv2_jax.parallel import distributed

        # Before anything touches a JAX backend: join the other processes, if there are any.
        distributed.initialize(
            distributed.resolve(
                args.coordinator,
                args.num_processes,
                args.process_id,
                args.local_device_ids,
                detect=args.distributed,
            )
        )
        import umv2_jax.data.tasks  # noqa: F401 (registers the task checks load_config runs)
        from umv2_jax.config import load_config

        overrides = list(args.overrides)
        if args.steps is not None:
            overrides.append(f"train.steps={args.steps}")
        if args.init_from is not None:
            overrides.append(f"train.init_from={args.init_from}")
        if args.profile is not None:
            overrides.append(f"train.profile={json.dumps(args.profile)}")  # text, not YAML
        if args.wandb is not None:
            overrides.append(f"train.wandb_project={args.wandb}")
        config = load_config(args.config or default_config_path(), overrides)
        workdir = args.workdir or os.path.join("runs", config.name)
        from umv2_jax.eval.accounting import account
        from umv2_jax.training.loop import TrainingDiverged, train

        try:
            result = train(
                config,
                workdir,
                resume=not args.no_resume,
                overwrite_other_model=args.overwrite_other_model,
                progress=not args.quiet,
                account=account,  # the summary's paper-convention numbers
            )
        except TrainingDiverged as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except signals.StopRequested as stop:  # during start-up: nothing trained
        print(stop, file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # before the handlers were installed
        print("interrupted", file=sys.stderr)
        return 130
    import jax

    if jax.process_index() != 0:  # process 0 reports for the run; the others end quietly
        return signals.exit_code(result.stop_signal) if result.preempted else 0
    evaluation = result.eval
    if evaluation:  # labelled with the step it measured; none if a stop cut the evaluation short
        print(
            f"\n{'last' if result.preempted else 'final'} validation (step {result.eval_step}): "
            f"loss {evaluation['eval_loss']:.4f} nats/token, {evaluation['eval_bpb']:.4f} bits/byte"
        )
    print(f"checkpoints  {result.checkpoint_dir}")
    print(f"metrics      {result.metrics_path}")
    if result.plot_path:
        print(f"loss plot    {result.plot_path}")
    workdir = shlex.quote(result.workdir)  # a command to paste into a shell
    print(f"sample with  python -m umv2_jax.generate --workdir {workdir} --prompt 'ROMEO:'")
    if result.preempted:
        print(
            f"stopped      by {signals.name(result.stop_signal)} at step {result.step}; "
            "run the same command to resume"
        )
        return signals.exit_code(result.stop_signal)
    return 0
