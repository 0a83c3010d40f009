"""The Task contract shared by every synthetic task, parameter checking and seeded streams.

    task = make_task("mqar", {"mix": [[64, 4], [128, 8]]})
    batch = task.batch(batch_size=8, seq_len=128, seed=0, index=3, split="train")
        inputs      int32[B, S]    token ids, all < task.vocab_size
        targets     int32[B, S]    the answer token at answer positions; 0 elsewhere
        loss_mask   float32[B, S]  1.0 exactly at answer positions, 0.0 elsewhere
        slice/NAME  int32[B, S]    a slice label at answer positions (task.slices()), -1 elsewhere
        aux/NAME    [B, S, ...]    extra per-position data a metric needs (e.g. aux/stale_value)

`batch` is a pure function of (parameters, batch_size, seq_len, seed, index, split): the same call
returns the same arrays. Each split draws from its own numpy stream, PCG64 seeded with
(seed, split number, index), so train and test examples are independent draws (and, where a task
has held-out content, such as the needle haystacks or novel classes, disjoint content).

A row may hold an example shorter than S; it is left-aligned and the tail is PAD with loss_mask
0. Under causal attention a left-aligned example never sees the padding, so this is the same as
training on the shorter sequence.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

import numpy as np

from umv2_jax.data.tokenizer import PAD
from umv2_jax.errors import ConfigError

# Each split reads its own seed stream: PCG64([seed, SPLIT_STREAMS[split], index]).
SPLIT_STREAMS = {"train": 0, "test": 1, "test_pool": 2, "test_icl": 3, "test_iwl": 4}


@dataclasses.dataclass(frozen=True)
class Task:
    """Base class: a frozen dataclass of documented parameters (subclasses add fields).

    Subclasses set `name`, `SLICES`, `SPLITS`, implement `_batch` and may extend `_check`.
    """

    name: ClassVar[str] = "task"
    SLICES: ClassVar[tuple[str, ...]] = ()
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "test")
    AUX: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        self._check()

    # -- public API ---------------------------------------------------------------------------

    def batch(
        self, batch_size: int, seq_len: int, *, seed: int, index: int, split: str = "train"
    ) -> dict[str, np.ndarray]:
        """One batch (see the module docstring for the keys, shapes and dtypes)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        if split not in self.SPLITS:
            raise ValueError(
                f"task {self.name} has no split {split!r}; splits: {', '.join(self.SPLITS)}"
            )
        self.check_seq_len(seq_len)
        rng = np.random.default_rng([int(seed) % 2**63, SPLIT_STREAMS[split], int(index)])
        return self._batch(rng, batch_size, seq_len, split, seed, index)

    def slices(self) -> tuple[str, ...]:
        """Names of the slice labels: batch keys are `slice/<name>`."""
        return self.SLICES

    def splits(self) -> tuple[str, ...]:
        return self.SPLITS

    @property
    def vocab_size(self) -> int:
        """The smallest `model.vocab_size` that holds every token this task emits."""
        return PAD + 1

    @property
    def pad_id(self) -> int:
        """The token filling row tails (loss_mask 0 there)."""
        return PAD

    def min_seq_len(self) -> int:
        """The shortest `data.seq_len` the task's parameters fit in."""
        return 1

    def check_seq_len(self, seq_len: int) -> None:
        """ConfigError (one line, with the fix) when the parameters do not fit `seq_len`."""
        need = self.min_seq_len()
        if seq_len < need:
            raise ConfigError(
                f"config 'data.seq_len': task {self.name} needs at least {need} positions with "
                f"these parameters, got {seq_len}; raise data.seq_len or shrink data.task"
            )

    def params(self) -> dict[str, Any]:
        """The parameters as plain data (lists for tuples), e.g. for results files."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.init}

    # -- subclass hooks -------------------------------------------------------------------------

    def _check(self) -> None:
        """Raises ConfigError for impossible parameter values (subclasses extend it)."""

    def _batch(
        self,
        rng: np.random.Generator,
        batch_size: int,
        seq_len: int,
        split: str,
        seed: int,
        index: int,
    ) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _fail(self, param: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"config 'data.task.{param}' (task {self.name}): {message}")


def from_params(cls: type[Task], params: dict[str, Any] | None) -> Task:
    """Builds task `cls` from plain data (YAML / `--set`), checking names and types."""
    params = dict(params or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in params.items():
        if key not in fields:
            allowed = ", ".join(sorted(fields)) or "none"
            raise ConfigError(
                f"config 'data.task.{key}': task {cls.name} has no parameter '{key}' "
                f"(parameters: {allowed})"
            )
        kwargs[key] = _coerce(hints[key], value, f"data.task.{key}", cls.name)
    return cls(**kwargs)


def empty_batch(batch_size: int, seq_len: int, pad_id: int, slices: tuple[str, ...]) -> dict:
    """All-PAD inputs, zero targets and mask, -1 slices: the arrays a task fills in."""
    batch = {
        "inputs": np.full((batch_size, seq_len), pad_id, np.int32),
        "targets": np.zeros((batch_size, seq_len), np.int32),
        "loss_mask": np.zeros((batch_size, seq_len), np.float32),
    }
    for name in slices:
        batch[f"slice/{name}"] = np.full((batch_size, seq_len), -1, np.int32)
    return batch


def sample_without_replacement(
    rng: np.random.Generator, population: int, count: int, rows: int
) -> np.ndarray:
    """int64[rows, count]: per row, `count` distinct values of range(population), uniformly."""
    if count > population:
        raise ValueError(f"cannot draw {count} distinct values from {population}")
    return np.argsort(rng.random((rows, population)), axis=1)[:, :count]


def weighted_without_replacement(
    rng: np.random.Generator, weights: np.ndarray, count: int, rows: int
) -> np.ndarray:
    """int64[rows, count]: per row, `count` distinct indices drawn successively with probability
    proportional to `weights` (the Gumbel top-k trick; the law of numpy's choice(replace=False,
    p=weights))."""
    keys = np.log(weights)[None, :] + rng.gumbel(size=(rows, len(weights)))
    return np.argsort(-keys, axis=1)[:, :count]


def _coerce(hint: Any, value: Any, key: str, task: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    where = f"config '{key}' (task {task})"
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]", task) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} items, got {value!r}")
        return tuple(
            _coerce(a, v, f"{key}[{i}]", task) for i, (a, v) in enumerate(zip(args, value))
        )
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not np.isfinite(value):
            raise ConfigError(f"{where}: {value} is not a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported task parameter type {hint} for {key}")


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value
