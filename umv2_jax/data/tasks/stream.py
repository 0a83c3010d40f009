"""The trainer's view of a task source (`data.source: task:NAME`): host batches, resumable.

    iterator = TaskBatchIterator(task, global_batch=16, seq_len=128, seed=0, process_index=0,
                                 process_count=1)
    batch = next(iterator)   # {"inputs", "targets", "loss_mask"}: this host's rows only
    iterator.get_state()     # {"task": "mqar", "index": 7, "seq_len": 128}: set_state resumes

Batch i of the training stream is `task.batch(global_batch, seq_len, seed=seed, index=i,
split="train")`; each process keeps rows [p·B_host, (p+1)·B_host), so the global batch does not
depend on the process count. Only the three arrays the training step consumes are kept (slice and
aux labels never reach the device); `task_eval_batches` gives the same for the test split, with
the labels kept under `full=True` for host-side metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from umv2_jax.data.tasks.base import Task
from umv2_jax.errors import DataError

DEVICE_KEYS = ("inputs", "targets", "loss_mask")


class TaskBatchIterator:
    """Infinite iterator of one host's training batches of a task; the state is the batch index."""

    def __init__(
        self,
        task: Task,
        global_batch: int,
        seq_len: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        task.check_seq_len(seq_len)
        self._task = task
        self._global_batch = global_batch
        self._seq_len = seq_len
        self._seed = seed
        self._process_index = process_index
        self._process_count = process_count
        self._index = 0

    def __iter__(self) -> TaskBatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._task.batch(
            self._global_batch, self._seq_len, seed=self._seed, index=self._index, split="train"
        )
        self._index += 1
        return host_share(batch, self._process_index, self._process_count)

    def get_state(self) -> dict[str, Any]:
        return {"task": self._task.name, "index": self._index, "seq_len": self._seq_len}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("task") != self._task.name or state.get("seq_len") != self._seq_len:
            raise DataError(
                f"the data iterator state was saved for task {state.get('task')} at seq_len "
                f"{state.get('seq_len')}, but the config has task {self._task.name} at seq_len "
                f"{self._seq_len}; resume with the original data settings"
            )
        self._index = int(state["index"])


def task_eval_batches(
    task: Task,
    global_batch: int,
    seq_len: int,
    seed: int,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
    split: str | None = None,
    full: bool = False,
) -> list[dict[str, np.ndarray]]:
    """Batches 0 … num_batches-1 of the task's test split (its first non-train split)."""
    split = split or next(s for s in task.splits() if s != "train")
    batches = []
    for index in range(num_batches):
        batch = task.batch(global_batch, seq_len, seed=seed, index=index, split=split)
        batches.append(host_share(batch, process_index, process_count, full=full))
    return batches


def host_share(
    batch: dict[str, np.ndarray], process_index: int, process_count: int, full: bool = False
) -> dict[str, np.ndarray]:
    """This host's rows; only DEVICE_KEYS unless `full`."""
    per_host = batch["inputs"].shape[0] // process_count
    rows = slice(process_index * per_host, (process_index + 1) * per_host)
    keys = batch if full else DEVICE_KEYS
    return {key: np.ascontiguousarray(batch[key][rows]) for key in keys}
