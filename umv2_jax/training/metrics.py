"""Run metrics: one JSON object per line in WORKDIR/metrics.jsonl, TensorBoard when installed,
and the loss-curve plot written at the end of a run.

A resumed run first truncates metrics.jsonl to the step it restored (records of steps it will redo
are dropped, and so is a line cut short by a crash) and tells TensorBoard to purge the events after
that step, so every step has one record.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

from umv2_jax.errors import WriteError

log = logging.getLogger("umv2_jax")

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    """Appends records to metrics.jsonl (a resumed run keeps appending to the same file).

    Every write happens in the calling thread and a failed one (a full disk) raises
    `errors.WriteError` naming the file, at once: TensorBoard events are written synchronously
    (`_TensorBoard`), never by a background thread that could die and leave the run blocked.
    """

    def __init__(
        self,
        workdir: str,
        tensorboard: bool = True,
        enabled: bool = True,
        start_step: int | None = None,
        extra_sink: Any = None,
    ):
        """`enabled=False` (every process but the first of a multi-host run) writes nothing.
        `start_step`: the step the run starts from; later records are dropped first (`truncate`).
        `extra_sink`: another scalar sink with `add_scalars(step, values)` and `close()` (the
        optional `wandb_sink.WandbSink`); it gets the numbers of every record."""
        self.path = os.path.join(workdir, METRICS_FILE)
        self._handle = None
        self._tensorboard = None
        self._extra = extra_sink if enabled else None
        self._failed = False
        if not enabled:
            return
        if start_step is not None:
            truncate(workdir, start_step)
        with _writing(self.path):
            self._handle = open(self.path, "a")
        if tensorboard and _tensorboard_available():
            self._tensorboard = _TensorBoard(
                os.path.join(workdir, TENSORBOARD_DIR),
                purge_step=start_step + 1 if start_step else None,  # hides the redone steps
            )

    def write(self, step: int, record: dict[str, Any]) -> None:
        if self._handle is None:
            return
        clean = {key: _plain(value) for key, value in record.items()}
        try:
            with _writing(self.path):
                self._handle.write(json.dumps({"step": step, **clean}) + "\n")
                self._handle.flush()
            scalars = {k: v for k, v in clean.items() if isinstance(v, int | float)}
            if self._tensorboard is not None:
                self._tensorboard.add_scalars(step, scalars)
            if self._extra is not None:
                self._extra.add_scalars(step, scalars)
        except WriteError:
            self._failed = True
            raise

    def close(self) -> None:
        """Closes the files; after a failed write it drops what cannot be written (no second
        error: the first one is the run's)."""
        for closer in (self._handle, self._tensorboard):
            if closer is None:
                continue
            try:
                with _writing(self.path if closer is self._handle else TENSORBOARD_DIR):
                    closer.close()
            except WriteError:
                if not self._failed:
                    self._failed = True
                    raise
        self._handle = self._tensorboard = None
        if self._extra is not None:
            extra, self._extra = self._extra, None
            extra.close()


class _TensorBoard:
    """TensorBoard scalars written in the caller's thread (tensorboardX's `SummaryWriter` hands
    them to a thread that dies on a write error, after which adding events blocks forever)."""

    def __init__(self, logdir: str, purge_step: int | None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog
        from tensorboardX.summary import scalar

        self._event, self._scalar = Event, scalar
        with _writing(logdir):
            os.makedirs(logdir, exist_ok=True)
            self._events = EventsWriter(os.path.join(logdir, "events"))
            self.path = self._events._file_name
        if purge_step is not None:  # TensorBoard hides the events from purge_step on
            self._write(Event(step=purge_step, file_version="brain.Event:2"))
            self._write(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self._flush()

    def add_scalars(self, step: int, values: dict[str, float]) -> None:
        now = time.time()
        for key, value in values.items():
            self._write(self._event(wall_time=now, step=step, summary=self._scalar(key, value)))
        self._flush()

    def close(self) -> None:
        with _writing(self.path):
            self._events.close()

    def _write(self, event) -> None:
        with _writing(self.path):
            self._events.write_event(event)

    def _flush(self) -> None:
        with _writing(self.path):
            self._events.flush()


def _tensorboard_available() -> bool:
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _writing(path: str) -> Iterator[None]:
    """Turns an OSError while writing `path` into `WriteError` (one line, exit 2)."""
    try:
        yield
    except OSError as error:
        raise WriteError(path, error) from None


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
        try:
            with _writing(path):
                with open(tmp, "w") as handle:
                    handle.writelines(kept)
                os.replace(tmp, path)
        finally:
            _remove(tmp)
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
    try:
        with _writing(path):
            figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)
    return path


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
