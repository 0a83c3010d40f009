"""The training loop: build, restore, train with periodic eval and checkpoints, report.

    result = train(config, workdir="runs/default")

One step is `jax.jit(train_step)` with explicit in/out shardings on the config's mesh and the train
state donated. A run resumes from the latest checkpoint in its work directory (model, optimizer,
step and data-iterator position), so N + N steps with a restart equal 2N steps straight.
SIGTERM (preemptible TPU VMs send it) finishes the current step, saves and returns normally.
A non-finite loss stops the run with `TrainingDiverged`, keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import Protocol

import jax
import numpy as np
from tqdm import tqdm

from umv2_jax import parallel
from umv2_jax.config import Config
from umv2_jax.data import pipeline
from umv2_jax.training import checkpoint as checkpoint_lib
from umv2_jax.training import metrics as metrics_lib
from umv2_jax.training.optimizer import learning_rate_schedule
from umv2_jax.training.state import Setup, abstract_like, build
from umv2_jax.training.step import make_eval_step, make_train_step, summarize_eval

log = logging.getLogger("umv2_jax")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class ModelCounts(Protocol):
    """Paper-convention numbers of a config for the run summary (`eval.accounting.Accounting`)."""

    activated_params: int
    total_params: int
    flops_per_token: float
    training_flops_per_token: float


@dataclasses.dataclass
class RunResult:
    workdir: str
    step: int
    eval: dict[str, float]
    checkpoint_dir: str
    metrics_path: str
    plot_path: str | None
    preempted: bool = False
    losses: list[float] = dataclasses.field(default_factory=list)


def train(
    config: Config,
    workdir: str,
    *,
    resume: bool = True,
    stop_after: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    account: Callable[[Config], ModelCounts] | None = None,
) -> RunResult:
    """Trains `config` in `workdir` until `config.train.steps` (or `stop_after`, for tests).

    `account` (e.g. `umv2_jax.eval.accounting.account`, which `train.py` passes) adds the
    paper-convention parameter counts and FLOPs to the run summary; the loop itself knows only
    the parameters it built. It is passed in because evaluation sits above training.
    """
    workdir = os.path.abspath(workdir)
    total_steps = config.train.steps
    last_step = min(stop_after, total_steps) if stop_after is not None else total_steps
    mesh = parallel.make_mesh(config.mesh)  # ConfigError before anything is written
    config.check_mesh_fits_model(mesh.shape["expert"])
    process_index, process_count = jax.process_index(), jax.process_count()
    primary = process_index == 0  # the one process that writes files and talks to the terminal
    if not primary:
        echo = lambda line: None  # noqa: E731
    if config.train.batch_size % (process_count * _data_parallel(mesh)):
        from umv2_jax.errors import ConfigError

        raise ConfigError(
            f"config 'train.batch_size': {config.train.batch_size} is not divisible by the "
            f"data-parallel size {_data_parallel(mesh)} × processes {process_count}"
        )
    has_run = resume and checkpoint_lib.check_compatible(workdir, config)
    train_iterator = pipeline.make_train_iterator(config, process_index, process_count)
    eval_batches = pipeline.make_eval_batches(
        config, config.train.eval_batches, process_index, process_count
    )
    if not resume and primary:
        _clear_run(workdir, echo)

    setup = build(config, mesh)
    checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
    state, rest, start_step = setup.state, setup.rest, 0
    if has_run and checkpointer.steps():
        start_step, state, rest, data_state = checkpointer.restore_latest(
            abstract_like(setup.state, setup.state_shardings),
            abstract_like(setup.rest, setup.rest_shardings),
        )
        train_iterator.set_state(data_state)
        echo(f"Resumed from step {start_step} in {checkpointer.directory}")
    if primary:
        checkpoint_lib.write_config(workdir, config)
    _print_summary(config, setup, workdir, echo, account(config) if account else None)

    batch_sharding = parallel.batch_sharding(mesh)
    train_step = jax.jit(
        make_train_step(
            setup.parts, setup.optimizer, config.train.micro_batches, config.train.seed
        ),
        in_shardings=(setup.state_shardings, setup.rest_shardings, batch_sharding),
        out_shardings=(setup.state_shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        make_eval_step(setup.parts),
        in_shardings=(setup.state_shardings["params"], setup.rest_shardings, batch_sharding),
        out_shardings=parallel.replicated(mesh),
    )

    def to_global(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {
            key: jax.make_array_from_process_local_data(batch_sharding, value)
            for key, value in batch.items()
        }

    def evaluate(params) -> dict[str, float]:
        sums = [jax.device_get(eval_step(params, rest, to_global(b))) for b in eval_batches]
        return summarize_eval(sums)

    writer = metrics_lib.MetricsWriter(workdir, enabled=primary)
    stop_requested = {"signal": None}

    def on_sigterm(signum, frame):
        stop_requested["signal"] = signum

    previous_handler = _install_handler(on_sigterm)
    schedule = learning_rate_schedule(config)
    tokens_per_step = config.train.batch_size * config.data.seq_len
    bar = tqdm(
        total=last_step,
        initial=start_step,
        desc="train",
        unit="step",
        disable=not (progress and primary),
        mininterval=1.0,
        file=sys.stderr,
        dynamic_ncols=True,
    )

    def say(line: str) -> None:
        if primary:
            bar.write(line)  # above the progress bar, not through it

    pending: list[tuple[int, dict]] = []
    losses: list[float] = []
    eval_result: dict[str, float] = {}
    last_good = start_step
    window_start, window_steps = time.perf_counter(), 0

    def flush_metrics() -> None:
        """Fetches pending step metrics, checks them, writes them; raises on a non-finite loss."""
        nonlocal window_start, window_steps
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        elapsed = time.perf_counter() - window_start
        rate = tokens_per_step * window_steps / max(elapsed, 1e-9)
        for (step, _), values in zip(pending, fetched):
            loss = float(values["loss"])
            if not np.isfinite(loss):
                pending.clear()
                raise TrainingDiverged(
                    f"loss became {loss} at step {step}; stopped. The last good checkpoint is "
                    f"step {last_good} in {checkpointer.directory}; lower train.learning_rate "
                    "or raise train.warmup_fraction and resume"
                )
            losses.append(loss)
            record = {k: float(v) for k, v in values.items()}
            record["learning_rate"] = float(schedule(step - 1))  # optax counts from 0
            record["tokens_per_s"] = rate
            writer.write(step, record)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
        pending.clear()
        window_start, window_steps = time.perf_counter(), 0

    step = start_step
    preempted = False
    try:
        while step < last_step:
            batch = to_global(next(train_iterator))
            state, step_metrics = train_step(state, rest, batch)
            step += 1
            window_steps += 1
            pending.append((step, step_metrics))
            bar.update(1)
            preempted = stop_requested["signal"] is not None
            at_end = step == last_step
            if step % config.train.log_every == 0 or at_end or preempted:
                flush_metrics()
            if step % config.train.eval_every == 0 or step == total_steps:
                flush_metrics()
                eval_result = evaluate(state["params"])
                writer.write(step, eval_result)
                say(
                    f"step {step}: eval loss {eval_result['eval_loss']:.4f}, "
                    f"bits/byte {eval_result['eval_bpb']:.4f}"
                )
            if step % config.checkpoint.every == 0 or at_end or preempted:
                flush_metrics()
                checkpointer.save(step, state, rest, train_iterator.get_state(), config, force=True)
                last_good = step
            if preempted:
                say(f"SIGTERM received: saved step {step}, exiting")
                break
    finally:
        bar.close()
        _restore_handler(previous_handler)
        checkpointer.close()
        writer.close()
    if not eval_result:
        eval_result = evaluate(state["params"])
    plot = metrics_lib.plot_loss(workdir) if primary else None
    return RunResult(
        workdir=workdir,
        step=step,
        eval=eval_result,
        checkpoint_dir=checkpointer.directory,
        metrics_path=writer.path,
        plot_path=plot,
        preempted=preempted,
        losses=losses,
    )


def _data_parallel(mesh: jax.sharding.Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def _clear_run(workdir: str, echo: Callable[[str], None]) -> None:
    """--no-resume: remove the previous run's checkpoints and metrics from `workdir`."""
    removed = []
    for name in ("checkpoints", metrics_lib.METRICS_FILE, metrics_lib.PLOT_FILE, "tensorboard"):
        path = os.path.join(workdir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(name)
        elif os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    if removed:
        echo(f"--no-resume: removed {', '.join(removed)} from {workdir}")


def _install_handler(handler):
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. a notebook worker): no preemption handling
        return None


def _restore_handler(previous) -> None:
    if previous is not None:
        try:
            signal.signal(signal.SIGTERM, previous)
        except ValueError:
            pass


def _print_summary(
    config: Config, setup: Setup, workdir: str, echo, counts: ModelCounts | None
) -> None:
    model = config.model
    devices = jax.devices()
    mesh_shape = ", ".join(f"{k}={v}" for k, v in setup.mesh.shape.items())
    sparse = model.sparse if model.sparse != "none" else "dense"
    params = f"params    {setup.param_count:,} in all"
    lines = [
        f"run       {config.name}  ({sparse}, {model.num_layers} layers, d_model {model.d_model},"
        f" {model.compute_dtype} compute)",
    ]
    if counts is None:
        lines.append(params)
    else:
        lines += [
            f"{params}; {counts.activated_params:,} activated,"
            f" {counts.total_params:,} total (paper convention)",
            f"flops     {counts.flops_per_token / 1e6:.2f}M per token forward,"
            f" {counts.training_flops_per_token / 1e6:.2f}M training",
        ]
    lines += [
        f"devices   {len(devices)} × {devices[0].platform} ({devices[0].device_kind}),"
        f" {jax.process_count()} process(es); mesh {mesh_shape}",
        f"data      {pipeline.describe_source(config)}; seq {config.data.seq_len},"
        f" batch {config.train.batch_size} × {config.train.micro_batches} micro-batch(es)",
        f"train     {config.train.steps} steps, lr {config.train.learning_rate:g},"
        f" eval every {config.train.eval_every}, checkpoint every {config.checkpoint.every}",
        f"workdir   {workdir}",
    ]
    echo("\n".join(lines))
