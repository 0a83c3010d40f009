"""The training loop: build, restore, train with periodic eval and checkpoints, report.

    result = train(config, workdir="runs/default")

One step is `jax.jit(train_step)` with explicit in/out shardings on the config's mesh and the train
state donated. A run resumes from the latest checkpoint in its work directory (model, optimizer,
step and data-iterator position), so N + N steps with a restart equal 2N steps straight.
SIGTERM (preemptible TPU VMs send it) and SIGINT (Ctrl-C) finish the current step, save it and
return normally, in any phase (`signals`: start-up raises `signals.StopRequested` instead).
A non-finite loss stops the run with `TrainingDiverged`, keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Protocol

import jax
import numpy as np
from tqdm import tqdm

from umv2_jax import hardware, parallel, paths
from umv2_jax.config import Config
from umv2_jax.data import pipeline, run_tokenizer
from umv2_jax.errors import ConfigError, WriteError
from umv2_jax.ops import attention as attention_ops
from umv2_jax.parallel import distributed
from umv2_jax.parallel import exchange as table_exchange
from umv2_jax.parallel import warnings as mesh_warnings
from umv2_jax.training import checkpoint as checkpoint_lib
from umv2_jax.training import finetune, preflight, rundir, signals, throughput, warmstart
from umv2_jax.training import metrics as metrics_lib
from umv2_jax.training.optimizer import learning_rate_schedule
from umv2_jax.training.profiling import StepProfiler
from umv2_jax.training.state import Setup, abstract_like, build, to_step_layout
from umv2_jax.training.step import make_eval_step, make_train_step, summarize_eval
from umv2_jax.training.wandb_sink import WandbSink, check_available

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
    eval_step: int | None = None  # the step `eval` measured (None: no evaluation in this run)
    stop_signal: int | None = None  # SIGTERM / SIGINT that stopped the run (see signals.py)
    # `throughput.StepClock.summary()` plus tokens_per_s and mfu at the median step time
    timing: dict = dataclasses.field(default_factory=dict)


def train(
    config: Config,
    workdir: str,
    *,
    resume: bool = True,
    overwrite_other_model: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    account: Callable[[Config], ModelCounts] | None = None,
) -> RunResult:
    """Trains `config` in `workdir` until `config.train.steps` (or `stop_after`, for tests).

    `account` (e.g. `umv2_jax.eval.accounting.account`, which `train.py` passes) adds the
    paper-convention parameter counts and FLOPs to the run summary; the loop itself knows only
    the parameters it built. It is passed in because evaluation sits above training.
    The work directory is locked for the run and describes itself (`rundir`: run.json, checks
    that a resume never mixes two runs); `overwrite_other_model` lets `resume=False` delete a
    run of another model there.
    """
    primary = jax.process_index() == 0
    if paths.scheme(workdir) is not None:
        raise ConfigError(
            f"--workdir {workdir}: remote work directories are not supported (the run directory "
            "needs a file lock and atomic renames); train in a local or mounted folder (e.g. a "
            "gcsfuse mount) instead"
        )
    mesh = parallel.make_mesh(config.mesh)  # ConfigError before anything is written
    try:
        with (
            # Everything traced in the run sees the mesh (token-local ops run under shard_map).
            parallel.use_mesh(mesh),
            signals.handling(),  # SIGTERM / SIGINT: stop at the next safe point (signals.py)
            rundir.RunDir(os.path.abspath(workdir), primary=primary, echo=echo) as run,
        ):
            result = _train(
                config, run, resume, overwrite_other_model, stop_after, progress, echo, account
            )
            run.ended(result.step, result.preempted, config.train.steps)
    except WriteError as error:  # metrics, TensorBoard, plot, manifest: the same one line
        raise rundir.write_failed(error, os.path.abspath(workdir)) from None
    return result


def _train(
    config: Config,
    run: rundir.RunDir,
    resume: bool,
    overwrite_other_model: bool,
    stop_after: int | None,
    progress: bool,
    echo: Callable[[str], None],
    account: Callable[[Config], ModelCounts] | None,
) -> RunResult:
    workdir = run.workdir
    total_steps = config.train.steps
    last_step = min(stop_after, total_steps) if stop_after is not None else total_steps
    mesh = parallel.make_mesh(config.mesh)  # ConfigError before anything is written
    config.check_mesh_fits_model(mesh.shape["expert"], mesh.shape["tensor"])
    table_lines = table_exchange.startup_lines(config, mesh)  # ConfigError: tables vs the mesh
    process_index, process_count = jax.process_index(), jax.process_count()
    primary = process_index == 0  # the one process that writes files and talks to the terminal
    if not primary:
        echo = lambda line: None  # noqa: E731
    if config.train.batch_size % _data_parallel(mesh):
        from umv2_jax.errors import ConfigError

        raise ConfigError(
            f"config 'train.batch_size': {config.train.batch_size} is not divisible by the "
            f"{_data_parallel(mesh)} batch shards of mesh {dict(mesh.shape)} "
            f"({process_count} process(es)); make it a multiple of {_data_parallel(mesh)}"
        )
    # This process feeds the rows its own devices hold: block `share` of `shares` of each batch
    # (processes whose devices hold the same rows, e.g. `tensor` across hosts, read the same data).
    share, shares = distributed.batch_share(mesh)
    preflight.check(config, workdir, mesh, resume)  # workdir, memory, disk: before building
    # Warm start and row finetuning read their inputs now: a bad one is one line, nothing written.
    resuming = resume and bool(rundir.checkpoint_steps(workdir))
    init_source = None if resuming else warmstart.resolve(config)
    row_mask = finetune.row_mask_from_config(config)
    vocab_warning = pipeline.check_vocab(config)  # ConfigError if the tokenizer's ids do not fit
    profile_steps = config.train.profile_steps()  # ConfigError if outside 1 … train.steps
    check_available(config.train.wandb_project)  # ConfigError if wandb is asked for, not installed
    if resume and config.data.task_name is None:
        run_tokenizer.check(workdir, pipeline.run_tokenizer(config))  # before anything is written
    has_run = run.open(config, resume=resume, overwrite_other_model=overwrite_other_model)
    train_iterator = pipeline.make_train_iterator(config, share, shares)
    eval_batches = pipeline.make_eval_batches(config, config.train.eval_batches, share, shares)
    signals.raise_if_requested(workdir, _latest(workdir))  # start-up: StopRequested, no deletes
    if not resume:
        run.clear()  # prints each path it deletes

    signals.set_phase("start-up: building the model")
    setup = build(config, mesh, row_mask=row_mask)
    signals.raise_if_requested(workdir, _latest(workdir))  # a resume stays at its latest step
    checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
    state, rest, start_step = setup.state, setup.rest, 0
    if init_source is not None and not (has_run and checkpointer.steps()):
        state, rest = warmstart.initial_state(config, setup, init_source)
        state = to_step_layout(state, setup.step_shardings)
        echo(f"Initialized from {init_source} (fresh optimizer, step 0)")
    if has_run and checkpointer.steps():
        start_step, state, rest, data_state = checkpointer.restore_latest(
            abstract_like(setup.state, setup.state_shardings),
            abstract_like(setup.rest, setup.rest_shardings),
        )
        train_iterator.set_state(data_state)
        state = to_step_layout(state, setup.step_shardings)  # row-major tables (parallel.layouts)
        echo(f"Resumed from step {start_step} in {checkpointer.directory}")
        signals.raise_if_requested(workdir, start_step)
    if primary:
        checkpoint_lib.write_config(workdir, config)
        if config.data.task_name is None:
            run_tokenizer.save(workdir, pipeline.run_tokenizer(config))
    run.started(config, start_step)  # the manifest, run.json
    # Opened before the summary, whose last line means "the first step starts now" (TensorBoard's
    # writer takes a moment to import and open).
    wandb = WandbSink.open(config, workdir, start_step, config.to_dict()) if primary else None
    writer = metrics_lib.MetricsWriter(
        workdir, enabled=primary, start_step=start_step, extra_sink=wandb
    )
    counts = account(config) if account else None
    _print_summary(config, setup, workdir, echo, counts)
    # MFU's numerator and denominator (throughput.py): None on CPU / without the accounting.
    chip = hardware.chip_for_device(jax.devices()[0])
    flops_per_token = counts.training_flops_per_token if counts is not None else None
    for line in mesh_warnings.mesh_warnings(config, mesh, setup.parts.params_template):
        echo(f"warning: {line}")  # what an axis of the mesh replicates (parallel/warnings.py)
    for line in table_lines:
        echo(
            line
        )  # window gather or row-id exchange, with both paths' bytes (parallel/exchange.py)
    if vocab_warning:
        echo(f"warning: {vocab_warning}")
    note = document_mask_note(config)
    if note:
        echo(f"note: {note}")

    batch_sharding = parallel.batch_sharding(mesh)
    train_step = jax.jit(
        make_train_step(
            setup.parts, setup.optimizer, config.train.micro_batches, config.train.seed
        ),
        in_shardings=(setup.step_shardings, setup.rest_shardings, batch_sharding),
        out_shardings=(setup.step_shardings, parallel.replicated(mesh)),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(
        make_eval_step(setup.parts),
        in_shardings=(setup.step_shardings["params"], setup.rest_shardings, batch_sharding),
        out_shardings=parallel.replicated(mesh),
    )

    def to_global(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {
            key: jax.make_array_from_process_local_data(batch_sharding, value)
            for key, value in batch.items()
        }

    def evaluate(params, step: int) -> dict[str, float]:
        """The eval metrics at `step` (with `eval_time_s`, its wall time, compile included); {}
        if a stop signal arrives (checked between batches). Left out of the step time."""
        started = time.perf_counter()
        try:
            signals.set_phase(f"evaluation at step {step}")
            say(f"step {step}: evaluating on {len(eval_batches)} batch(es)")
            sums = []
            for batch in eval_batches:
                sums.append(jax.device_get(eval_step(params, rest, to_global(batch))))
                if signals.requested():
                    return {}
            signals.set_phase(f"the end of the evaluation at step {step}")
            result = summarize_eval(sums)
            check_eval(step, result)
            result["eval_time_s"] = time.perf_counter() - started
            return result
        finally:
            clock.eval_s += time.perf_counter() - started
            clock.restart()

    def check_eval(step: int, result: dict[str, float]) -> None:
        """A non-finite evaluation loss stops the run like a non-finite training loss (exit 1,
        run.json "diverged"), after recording it; the checkpoints saved so far are kept."""
        loss = result["eval_loss"]
        if np.isfinite(loss):
            return
        writer.write(step, result)
        run.diverged(step, during="evaluation")
        earlier = [s for s in saved_steps if s < step]
        held = f" (checkpoint {step} holds the weights it evaluated)" if step in saved_steps else ""
        raise TrainingDiverged(
            f"evaluation loss became {loss} at step {step}{held}"
            + (f", the training loss was {losses[-1]:.4f}" if losses else "")
            + "; stopped. "
            + rundir.divergence_advice(
                earlier[-1] if earlier else None,
                checkpointer.directory,
                min(config.checkpoint.every, last_step),
            )
        )

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
    last_good = start_step or None  # None: no checkpoint yet
    saved_steps = [start_step] if start_step else []  # the weights at these steps are on disk
    clock = throughput.StepClock()  # step time without compiles, evaluations and saves
    compiled_at: dict[int, float] = {}  # step -> seconds of the compile (and the step) it ran
    profiler = StepProfiler(profile_steps, os.path.join(workdir, "profile"), start_step, say)
    devices = jax.local_devices()

    def flush_metrics() -> None:
        """Fetches pending step metrics, checks them, writes them; raises on a non-finite loss.
        Every record of the window carries the window's step time, tokens/s and MFU."""
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        speed = throughput.throughput_fields(
            clock.close(), tokens_per_step, flops_per_token, chip, mesh.size
        )
        memory = throughput.memory_fields(devices)
        for (step, _), values in zip(pending, fetched):
            loss = float(values["loss"])
            if not np.isfinite(loss):
                pending.clear()
                run.diverged(step)
                raise TrainingDiverged(
                    f"loss became {loss} at step {step}; stopped. "
                    + rundir.divergence_advice(
                        last_good, checkpointer.directory, min(config.checkpoint.every, last_step)
                    )
                )
            losses.append(loss)
            record = {k: float(v) for k, v in values.items()}
            record["learning_rate"] = float(schedule(step - 1))  # optax counts from 0
            record.update(speed)
            record.update(memory)
            if step in compiled_at:
                record["compile_s"] = compiled_at.pop(step)
            writer.write(step, record)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", **throughput.console(speed), refresh=False)
        pending.clear()

    def save(step: int) -> None:
        nonlocal last_good
        flush_metrics()
        signals.set_phase(f"saving step {step}")
        say(f"step {step}: saving checkpoint")
        started = time.perf_counter()
        checkpointer.save(step, state, rest, train_iterator.get_state(), config, force=True)
        clock.save_s += time.perf_counter() - started  # the blocking part of a save
        clock.restart()
        last_good = step
        saved_steps.append(step)
        run.saved(step)

    step = start_step
    evaluated_at = None
    try:
        try:
            # Signals are read at safe points only: between steps, between eval batches, after a
            # save. A stop saves the last completed step (before the evaluation at that step, so a
            # run stopped during its final evaluation is complete on disk) and returns.
            while step < last_step and not signals.requested():
                signals.set_phase(f"step {step + 1}")
                batch = to_global(next(train_iterator))
                cached = _cache_size(train_step)
                profiler.before_step(step + 1)
                clock.step_started()
                state, step_metrics = train_step(state, rest, batch)
                step += 1
                done = functools.partial(jax.block_until_ready, step_metrics)
                first = step == start_step + 1
                grew = _cache_size(train_step) != cached if cached >= 0 else first
                compiled = clock.step_finished(grew, done)
                if compiled is not None:
                    compiled_at[step] = compiled
                profiler.after_step(step, done)
                pending.append((step, step_metrics))
                bar.update(1)
                at_end = step == last_step
                if step % config.train.log_every == 0 or at_end:
                    flush_metrics()
                if step % config.checkpoint.every == 0 or at_end or signals.requested():
                    save(step)
                if signals.requested():
                    break
                if step % config.train.eval_every == 0 or step == total_steps:
                    flush_metrics()
                    result = evaluate(state["params"], step)
                    if result:
                        eval_result, evaluated_at = result, step
                        writer.write(step, eval_result)
                        say(
                            f"step {step}: eval loss {eval_result['eval_loss']:.4f}, "
                            f"bits/byte {eval_result['eval_bpb']:.4f}"
                        )
            if signals.requested() and step > start_step and last_good != step:
                save(step)  # the signal arrived during an evaluation between checkpoints
            signals.set_phase(f"waiting for the checkpoint of step {step} to be written")
        finally:
            profiler.close()
            bar.close()
            checkpointer.close()  # waits for an asynchronous save: never exit while one runs
        stop_signal = signals.requested()
        if stop_signal is not None:
            say(_stop_line(stop_signal, start_step, step, checkpointer.directory))
        elif not eval_result:  # a finished run, resumed: evaluate what it holds
            eval_result = evaluate(state["params"], step)
            evaluated_at = step if eval_result else None
            stop_signal = signals.requested()
            if eval_result and not _has_eval_record(workdir, step):
                # e.g. the first run was stopped during its final evaluation: record it now
                writer.write(step, eval_result)
    finally:
        writer.close()
    plot = metrics_lib.plot_loss(workdir) if primary else None
    timing = clock.summary()
    timing.update(
        throughput.throughput_fields(
            timing["median_step_time_s"], tokens_per_step, flops_per_token, chip, mesh.size
        )
    )
    if step > start_step:
        echo(_timing_line(timing))
    return RunResult(
        workdir=workdir,
        step=step,
        eval=eval_result,
        checkpoint_dir=checkpointer.directory,
        metrics_path=writer.path,
        plot_path=plot,
        preempted=stop_signal is not None,
        losses=losses,
        eval_step=evaluated_at,
        stop_signal=stop_signal,
        timing=timing,
    )


def _cache_size(jitted) -> int:
    """How many executables `jitted` holds (it grew: that call compiled); -1 if unknown, which
    counts only the first step as compiling."""
    size = getattr(jitted, "_cache_size", None)
    return size() if size is not None else -1


def _timing_line(timing: dict) -> str:
    """The run's throughput line, e.g. "throughput: 0.21 s/step (median), 78,000 tok/s, MFU 41.2%;
    compile 35.1 s, evaluation 4.0 s, checkpoint saves 1.2 s (left out of the step time)"."""
    shown = throughput.console(timing)
    step = timing["step_time_s"]
    return (
        f"throughput: {'n/a' if step is None else f'{step:.3g}'} s/step (median), "
        f"{shown['tok_s']} tok/s, MFU {shown['mfu']}; compile {timing['compile_s']:.1f} s, "
        f"evaluation {timing['eval_s']:.1f} s, checkpoint saves {timing['save_s']:.1f} s "
        "(left out of the step time)"
    )


def _latest(workdir: str) -> int:
    """The step of the latest checkpoint in `workdir` (0: none), for a stop line at start-up."""
    steps = rundir.checkpoint_steps(workdir)
    return steps[-1] if steps else 0


def _has_eval_record(workdir: str, step: int) -> bool:
    records = metrics_lib.read_metrics(workdir)
    return any(r.get("step") == step and "eval_loss" in r for r in records)


def document_mask_note(config: Config) -> str | None:
    """The start-up line for an attention path that cannot apply `data.document_mask`, else None."""
    if config.data.masks_documents and not attention_ops.masks_documents(config.model.attention):
        return (
            f"attention '{config.model.attention}' cannot mask packed documents; batches with "
            "document ids run the chunked attention path instead (model.attention=auto chooses "
            "per platform; data.document_mask=false attends across documents)"
        )
    return None


def _data_parallel(mesh: jax.sharding.Mesh) -> int:
    return parallel.batch_shards(mesh)


def _stop_line(signum: int, start_step: int, step: int, directory: str) -> str:
    """What a stop did, e.g. "SIGTERM received during evaluation at step 4: saved step 4 …"."""
    where = f"{signals.name(signum)} received during {signals.phase_at_signal()}"
    if step == start_step:
        kept = f"step {step} is saved" if step else "nothing was trained"
        return f"{where}: stopped before training a step ({kept}), exiting"
    return f"{where}: saved step {step} in {directory}, exiting"


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
