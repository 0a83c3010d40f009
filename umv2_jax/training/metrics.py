"""Run metrics: one JSON object per line in WORKDIR/metrics.jsonl, TensorBoard when installed,
and the loss-curve plot written at the end of a run.

A resumed run first truncates metrics.jsonl to the step it restored (records of steps it will redo
are dropped, and so is a line cut short by a crash) and tells TensorBoard to purge the events after
that step, so every step has one record.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

log = logging.getLogger("umv2_jax")

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsWriter:
    """Appends records to metrics.jsonl (a resumed run keeps appending to the same file)."""

    def __init__(
        self,
        workdir: str,
        tensorboard: bool = True,
        enabled: bool = True,
        start_step: int | None = None,
    ):
        """`enabled=False` (every process but the first of a multi-host run) writes nothing.
        `start_step`: the step the run starts from; later records are dropped first (`truncate`)."""
        self.path = os.path.join(workdir, METRICS_FILE)
        if enabled and start_step is not None:
            truncate(workdir, start_step)
        self._handle = open(self.path, "a") if enabled else None
        self._tensorboard = None
        if tensorboard and enabled:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                self._tensorboard = SummaryWriter(
                    os.path.join(workdir, "tensorboard"),
                    purge_step=start_step + 1 if start_step else None,  # hides the redone steps
                )

    def write(self, step: int, record: dict[str, Any]) -> None:
        if self._handle is None:
            return
        clean = {key: _plain(value) for key, value in record.items()}
        self._handle.write(json.dumps({"step": step, **clean}) + "\n")
        self._handle.flush()
        if self._tensorboard is not None:
            for key, value in clean.items():
                if isinstance(value, int | float):
                    self._tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _plain(value: Any) -> Any:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return value
    return value if math.isfinite(value) else str(value)


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of metrics.jsonl (a line cut short by a crash is skipped)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path, errors="replace") as handle:
        records = (_parse(line) for line in handle if line.strip())
        return [record for record in records if record is not None]


def truncate(workdir: str, step: int) -> int:
    """Drops the records of steps after `step` (and unreadable lines) from metrics.jsonl, by
    rewriting it atomically; returns how many lines it dropped."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        return 0
    with open(path, errors="replace") as handle:
        lines = [line for line in handle if line.strip()]
    kept = []
    for line in lines:
        record = _parse(line)
        if record is not None and not (
            isinstance(record.get("step"), int) and record["step"] > step
        ):
            kept.append(line if line.endswith("\n") else line + "\n")
    dropped = len(lines) - len(kept)
    if dropped:
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as handle:
            handle.writelines(kept)
        os.replace(tmp, path)
        log.info(
            "%s: dropped %d record(s) after step %d (that run's redone steps)", path, dropped, step
        )
    return dropped


def plot_loss(workdir: str) -> str | None:
    """Writes WORKDIR/loss.png (train loss and eval loss vs step); returns its path."""
    records = read_metrics(workdir)
    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), float)]
    evals = [(r["step"], r["eval_loss"]) for r in records if isinstance(r.get("eval_loss"), float)]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    if train:
        axis.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        axis.plot(*zip(*evals), "o-", label="eval loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats / token)")
    axis.grid(alpha=0.3)
    axis.legend()
    path = os.path.join(workdir, PLOT_FILE)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
