"""Run metrics: one JSON object per line in WORKDIR/metrics.jsonl, TensorBoard when installed,
and the loss-curve plot written at the end of a run."""

from __future__ import annotations

import json
import math
import os
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsWriter:
    """Appends records to metrics.jsonl (a resumed run keeps appending to the same file)."""

    def __init__(self, workdir: str, tensorboard: bool = True, enabled: bool = True):
        """`enabled=False` (every process but the first of a multi-host run) writes nothing."""
        self.path = os.path.join(workdir, METRICS_FILE)
        self._handle = open(self.path, "a") if enabled else None
        self._tensorboard = None
        if tensorboard and enabled:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

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


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


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
