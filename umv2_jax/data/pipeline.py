"""grain input pipelines: tfds text split → (shuffle, repeat) → byte tokens → packed windows → batches.

    iterator = make_train_iterator(config, jax.process_index(), jax.process_count())
    batch = next(iterator)              # one host's share of the global batch, numpy:
        inputs     int32[B_host, S]     B_host = train.batch_size // process_count, S = data.seq_len
        targets    int32[B_host, S]     the window shifted by one: targets[:, t] == inputs[:, t + 1]
        loss_mask  float32[B_host, S]   1.0 on real targets, 0.0 where the target is PAD
    state = iterator.get_state()        # JSON-serializable; iterator.set_state(state) resumes exactly
    eval_batches = make_eval_batches(config, num_batches)   # same list every call

Sources (`data.source`): `shakespeare` reads the dataset committed in `umv2_jax/data/prepared/`
(no network, no TensorFlow); `tfds:NAME` reads any tfds text dataset prepared as ArrayRecord in
`data.data_dir` (`NAME` may be `name/config:version`), text in feature `data.text_key`;
`task:NAME` generates batches of a synthetic task (umv2_jax.data.tasks, parameters `data.task`)
with the same three arrays, loss_mask 1 only at answer positions: training batch i is the task's
train batch i (seed `data.shuffle_seed`, iterator state = the batch index), evaluation its
test batches 0 … n-1; slice labels stay on the host (umv2_jax.data.tasks.stream).

Packing: each record becomes [BOS, utf-8 bytes...]; the records are concatenated into one stream
and cut into windows of S + 1 tokens with stride S (inputs = window[:-1], targets = window[1:]), so
every stream token after the first is a target exactly once and no compute is spent on padding.
Training shuffles records (seeded by `data.shuffle_seed`, reshuffled each epoch), repeats them
forever, and shuffles the packed windows in buffers of TRAIN_WINDOW_SHUFFLE so that a batch mixes
passages of many works. Evaluation reads the eval split in order, pads the last window with PAD
and fills a last partial batch with all-PAD rows (loss_mask 0), so shapes never change.

Multi-host: every process builds the same global batch and keeps rows
[process_index * B_host, (process_index + 1) * B_host), so the global batch does not depend on the
number of processes. (Each host tokenizes the whole stream; at byte level that is cheap.) The loop
passes the block of rows the process's devices hold (`parallel.distributed.batch_share(mesh)`) as
(process_index, process_count): processes whose devices hold the same rows pass the same block.

Reading uses `tfds.builder_from_directory(...).as_data_source(...)` / `tfds.builder(...)`, which
work without TensorFlow for ArrayRecord datasets in tensorflow-datasets 4.9.10.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from umv2_jax.config import Config, DataConfig
from umv2_jax.data import shakespeare
from umv2_jax.data.tokenizer import BOS, PAD
from umv2_jax.errors import ConfigError, DataError

EMBEDDED_DIR = Path(__file__).resolve().parent / "prepared" / "shakespeare"
EMBEDDED_VERSION_DIR = EMBEDDED_DIR / shakespeare.DATASET_VERSION

# Training windows are shuffled in buffers of this many (at S=128: 64K tokens, ~17 records).
TRAIN_WINDOW_SHUFFLE = 512
# Two reader threads suit the 2-core default machine; records are a few KB, a batch needs few.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)


def make_train_iterator(
    config: Config, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
    """Infinite iterator of this host's training batches (see the module docstring for shapes).

    `get_state()` returns a JSON-serializable dict; `set_state(state)` on a fresh iterator built
    from the same config makes its next batch identical to the one the saved iterator would give.
    """
    global_batch = _global_batch(config, process_index, process_count)
    if config.data.task_name is not None:
        return _task_stream().TaskBatchIterator(
            _make_task(config.data),
            global_batch,
            config.data.seq_len,
            config.data.shuffle_seed,
            process_index,
            process_count,
        )
    # Packed windows follow each other through a record; shuffling them in a buffer puts passages
    # of many works into each batch instead of one contiguous stretch of text.
    windows = ShuffleBufferIterDataset(
        make_train_windows(config, process_count),
        buffer_size=TRAIN_WINDOW_SHUFFLE,
        seed=config.data.shuffle_seed,
    )
    batches = windows.batch(global_batch, drop_remainder=True).map(
        functools.partial(_host_share, process_index=process_index, process_count=process_count)
    )
    return iter(batches)


def make_train_windows(config: Config, process_count: int = 1) -> grain.IterDataset:
    """The packed training stream before window shuffling and batching: int32[S + 1] windows.

    Records are shuffled with `data.shuffle_seed` (differently each epoch) and repeated forever;
    consecutive windows are consecutive pieces of the stream. Checks that the split can fill a
    global batch (DataError otherwise).
    """
    data = config.data
    global_batch = _global_batch(config, 0, process_count)
    if not 0 <= data.shuffle_seed < 2**32:
        raise ConfigError(f"config 'data.shuffle_seed': {data.shuffle_seed} is not in [0, 2**32)")
    split = _open_split(data, data.train_split, "data.train_split")
    _check_fills_a_batch(split, global_batch, data.seq_len)
    records = grain.MapDataset.source(split.records).shuffle(seed=data.shuffle_seed).repeat()
    return PackedWindowsIterDataset(
        records.map(split.tokenize).to_iter_dataset(_READ_OPTIONS), data.seq_len + 1
    )


def make_eval_batches(
    config: Config, num_batches: int, process_index: int = 0, process_count: int = 1
) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` batches of the eval split, in order: the same list on every call.

    Returns fewer than `num_batches` when the split runs out; the last batch may end in PAD rows.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    data = config.data
    global_batch = _global_batch(config, process_index, process_count)
    if data.task_name is not None:  # the task's test split, from the same seed's test stream
        return _task_stream().task_eval_batches(
            _make_task(data),
            global_batch,
            data.seq_len,
            data.shuffle_seed,
            num_batches,
            process_index,
            process_count,
        )
    split = _open_split(data, data.eval_split, "data.eval_split")
    _check_fills_a_batch(split, global_batch, data.seq_len)
    records = grain.MapDataset.source(split.records).map(split.tokenize)
    windows = iter(
        PackedWindowsIterDataset(
            records.to_iter_dataset(_READ_OPTIONS), data.seq_len + 1, pad_final=True
        )
    )
    batches = []
    for _ in range(num_batches):
        rows = [window for _, window in zip(range(global_batch), windows)]
        if not rows:
            break
        rows += [np.full(data.seq_len + 1, PAD, np.int32)] * (global_batch - len(rows))
        batches.append(_host_share(np.stack(rows), process_index, process_count))
    return batches


def describe_source(config: Config) -> str:
    """One line for the run summary, e.g. `shakespeare (embedded): 4.57 MB train / ...`."""
    data = config.data
    if data.task_name is not None:
        task = _make_task(data)
        return f"task {task.name} (generated), parameters {task.params()}"
    builder, _, label = _open_builder(data)
    parts = []
    for split_name in (data.train_split, data.eval_split):
        try:
            info = builder.info.splits[split_name]
            parts.append(
                f"{info.num_bytes / 1e6:.2f} MB {split_name} ({info.num_examples} records)"
            )
        except (KeyError, ValueError):
            parts.append(f"no split '{split_name}'")
    return f"{label}: {' / '.join(parts)}"


class PackedWindowsIterDataset(grain.IterDataset):
    """Concatenates int32 token arrays and cuts the stream into windows (int32[window_length]).

    Windows overlap by one token (stride window_length - 1), the shape next-token prediction needs.
    At the end of a finite stream the remainder is dropped, or with `pad_final` padded with PAD
    (when it holds at least two tokens, i.e. at least one target).
    """

    def __init__(self, parent: grain.IterDataset, window_length: int, pad_final: bool = False):
        super().__init__(parent)
        if window_length < 2:
            raise ValueError(f"window_length must be >= 2, got {window_length}")
        self._window_length = window_length
        self._pad_final = pad_final

    def __iter__(self) -> grain.DatasetIterator:
        return _PackedWindowsIterator(self._parent.__iter__(), self._window_length, self._pad_final)

    def __str__(self) -> str:
        return f"PackedWindowsIterDataset(window_length={self._window_length})"


class _PackedWindowsIterator(grain.DatasetIterator):
    """State = where the next window starts: the parent's state before the document holding that
    token, and the token's offset in the document. Restoring re-reads that document and skips the
    offset, so no token buffer needs to be saved and the state stays a few integers."""

    def __init__(self, parent: grain.DatasetIterator, window_length: int, pad_final: bool):
        super().__init__(parent)
        self._window_length = window_length
        self._pad_final = pad_final
        # (parent state before the document, its tokens); the next window starts in the first one.
        self._documents: collections.deque[tuple[Any, np.ndarray]] = collections.deque()
        self._offset = 0  # start of the next window in documents[0] (or in the next one read)
        self._buffered = 0  # tokens available from the start of the next window on

    def __next__(self) -> np.ndarray:
        length = self._window_length
        while self._buffered < length:
            state = copy.deepcopy(self._parent.get_state())
            try:
                tokens = next(self._parent)
            except StopIteration:
                break
            first = not self._documents
            self._documents.append((state, tokens))
            self._buffered += len(tokens) - (self._offset if first else 0)
        if self._buffered < length:
            remaining = self._buffered
            window = self._take(remaining) if remaining else None
            self._documents.clear()
            self._offset = self._buffered = 0
            if not self._pad_final or remaining < 2:
                raise StopIteration
            return np.concatenate([window, np.full(length - remaining, PAD, np.int32)])
        window = self._take(length)
        self._advance(length - 1)
        return window

    def get_state(self) -> dict[str, Any]:
        parent = self._documents[0][0] if self._documents else self._parent.get_state()
        return {
            "parent": copy.deepcopy(parent),
            "offset": int(self._offset),
            "window_length": self._window_length,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("window_length") != self._window_length:
            raise DataError(
                f"the data iterator state was saved with seq_len={state.get('window_length', 1) - 1}"
                f" but data.seq_len={self._window_length - 1}; resume with the original seq_len"
            )
        self._parent.set_state(state["parent"])
        self._documents.clear()
        self._offset = int(state["offset"])
        self._buffered = 0

    def _take(self, count: int) -> np.ndarray:
        pieces, start, needed = [], self._offset, count
        for _, tokens in self._documents:
            piece = tokens[start : start + needed]
            pieces.append(piece)
            needed -= len(piece)
            start = 0
            if not needed:
                break
        return np.concatenate(pieces).astype(np.int32, copy=False)

    def _advance(self, count: int) -> None:
        self._offset += count
        self._buffered -= count
        while self._offset >= len(self._documents[0][1]):
            self._offset -= len(self._documents.popleft()[1])


class ShuffleBufferIterDataset(grain.IterDataset):
    """Reads `buffer_size` elements at a time and yields each buffer in a seeded random order.

    Buffer k is permuted by numpy's PCG64 seeded with (seed, k). (grain's WindowShuffleIterDataset
    does the same job but spends ~0.2 ms per element in index_shuffle, 5 ms per default batch.)
    """

    def __init__(self, parent: grain.IterDataset, buffer_size: int, seed: int):
        super().__init__(parent)
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        self._buffer_size = buffer_size
        self._seed = seed

    def __iter__(self) -> grain.DatasetIterator:
        return _ShuffleBufferIterator(self._parent.__iter__(), self._buffer_size, self._seed)

    def __str__(self) -> str:
        return f"ShuffleBufferIterDataset(buffer_size={self._buffer_size})"


class _ShuffleBufferIterator(grain.DatasetIterator):
    """State = the parent's state at the start of the current buffer, the buffer's index and how
    many of its elements were returned; restoring re-reads that buffer and skips them."""

    def __init__(self, parent: grain.DatasetIterator, buffer_size: int, seed: int):
        super().__init__(parent)
        self._buffer_size = buffer_size
        self._seed = seed
        self._start_state = copy.deepcopy(self._parent.get_state())
        self._buffer_index = 0
        self._position = 0
        self._buffer: list | None = None  # the current buffer in output order; None = not read

    def __next__(self):
        if self._buffer is None:
            self._read_buffer()
        if self._position == len(self._buffer):
            if len(self._buffer) < self._buffer_size:
                raise StopIteration  # the parent ran out while filling this buffer
            self._start_state = copy.deepcopy(self._parent.get_state())
            self._buffer_index += 1
            self._position = 0
            self._read_buffer()
            if not self._buffer:
                raise StopIteration
        element = self._buffer[self._position]
        self._position += 1
        return element

    def get_state(self) -> dict[str, Any]:
        if self._buffer is not None and self._position == self._buffer_size:
            # A used-up buffer: the equivalent state "start of the next one" restores for free.
            return {
                "parent": copy.deepcopy(self._parent.get_state()),
                "buffer_index": self._buffer_index + 1,
                "position": 0,
            }
        return {
            "parent": copy.deepcopy(self._start_state),
            "buffer_index": self._buffer_index,
            "position": self._position,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._start_state = copy.deepcopy(state["parent"])
        self._buffer_index = int(state["buffer_index"])
        self._position = int(state["position"])
        self._buffer = None

    def _read_buffer(self) -> None:
        elements = [element for _, element in zip(range(self._buffer_size), self._parent)]
        order = np.random.default_rng([self._seed, self._buffer_index]).permutation(len(elements))
        self._buffer = [elements[index] for index in order]


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Split:
    records: Sequence[dict[str, Any]]  # random access: len() and [index] → feature dict
    text_key: str
    label: str  # for messages: "shakespeare (embedded)" or "tfds:NAME"
    name: str

    def text_bytes(self, record: dict[str, Any]) -> bytes:
        value = record[self.text_key]
        if isinstance(value, np.ndarray) and value.shape == ():
            value = value.item()
        if isinstance(value, str):
            return value.encode("utf-8")
        if isinstance(value, bytes):
            return value
        raise DataError(
            f"feature '{self.text_key}' of {self.label} holds {type(value).__name__}, not text; "
            "set data.text_key to a Text feature"
        )

    def tokenize(self, record: dict[str, Any]) -> np.ndarray:
        """[BOS, utf-8 bytes of the text...] as int32."""
        body = self.text_bytes(record)
        tokens = np.empty(len(body) + 1, np.int32)
        tokens[0] = BOS
        tokens[1:] = np.frombuffer(body, np.uint8)
        return tokens


def _open_split(data: DataConfig, split: str, key: str) -> _Split:
    builder, text_key, label = _open_builder(data)
    available = list(builder.info.splits)
    if split.split("[")[0] not in available:
        raise DataError(
            f"{label} has no split '{split}' (splits: {', '.join(available)}); set {key}"
        )
    try:
        records = builder.as_data_source(split=split)
    except Exception as error:  # tfds raises assorted types for malformed split specs
        raise DataError(
            f"{label}: cannot read split '{split}' ({_first_line(error)}); fix {key}"
        ) from None
    return _Split(records=records, text_key=text_key, label=label, name=split)


def _open_builder(data: DataConfig) -> tuple[Any, str, str]:
    """(tfds builder, text feature, label); DataError with the fix when it cannot be opened."""
    if data.source == "shakespeare":
        if not (EMBEDDED_VERSION_DIR / "dataset_info.json").is_file():
            raise DataError(
                f"the embedded Shakespeare dataset is missing from {EMBEDDED_VERSION_DIR}; "
                "reinstall umv2-jax or rebuild it with `python -m umv2_jax.data.build_shakespeare`"
            )
        return _builder_from_directory(str(EMBEDDED_VERSION_DIR)), "text", "shakespeare (embedded)"
    name = data.source.removeprefix("tfds:")
    label = data.source
    where = f"data_dir '{data.data_dir}'" if data.data_dir else "tfds's default data_dir"
    if data.data_dir is not None and not os.path.isdir(data.data_dir):
        raise DataError(
            f"data.data_dir '{data.data_dir}' does not exist; point it at the tfds data_dir "
            f"holding '{name}'"
        )
    try:
        builder = _tfds_builder(name, data.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(
            f"tfds dataset '{name}' is not found in {where}; prepare it there as array_record "
            "or fix data.source / data.data_dir"
        ) from None
    except Exception as error:  # bad names, bad configs or versions
        raise DataError(
            f"cannot open {label} in {where} ({_first_line(error)}); fix data.source"
        ) from None
    if not builder.is_prepared():
        raise DataError(
            f"tfds dataset '{name}' is not prepared in {where}; run its "
            "download_and_prepare(file_format='array_record') there or fix data.data_dir"
        )
    formats = {f.value for f in builder.info.available_file_formats()}
    if not formats & {"array_record"}:
        raise DataError(
            f"{label} in {where} is stored as {', '.join(sorted(formats)) or 'unknown'}; grain "
            "needs random access, so prepare it again with file_format='array_record'"
        )
    features = builder.info.features
    if features is None or data.text_key not in features:
        names = ", ".join(features.keys()) if features is not None else "none"
        raise DataError(
            f"{label} has no feature '{data.text_key}' (features: {names}); set data.text_key"
        )
    return builder, data.text_key, label


@functools.lru_cache(maxsize=8)
def _builder_from_directory(path: str) -> Any:
    return tfds.builder_from_directory(path)


@functools.lru_cache(maxsize=8)
def _tfds_builder(name: str, data_dir: str | None) -> Any:
    return tfds.builder(name, data_dir=data_dir)


def _check_fills_a_batch(split: _Split, global_batch: int, seq_len: int) -> None:
    """DataError unless the split holds at least one global batch of tokens (B·S + 1).

    Reads records only until that many tokens are seen, so a large dataset costs a few records.
    """
    needed = global_batch * seq_len + 1
    total = 0
    for index in range(len(split.records)):
        total += len(split.text_bytes(split.records[index])) + 1
        if total >= needed:
            return
    raise DataError(
        f"{split.label} split '{split.name}' holds {total} tokens, fewer than one batch needs "
        f"({global_batch}×{seq_len}+1 = {needed}); lower train.batch_size or data.seq_len, or "
        "use a larger dataset"
    )


def _global_batch(config: Config, process_index: int, process_count: int) -> int:
    batch_size = config.train.batch_size
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    if batch_size % process_count:
        raise ConfigError(
            f"config 'train.batch_size': {batch_size} is not divisible by the {process_count} "
            "processes; make it a multiple of the process count"
        )
    return batch_size


def _host_share(
    windows: np.ndarray, process_index: int, process_count: int
) -> dict[str, np.ndarray]:
    """windows: int32[B_global, S + 1] → this host's rows as inputs / targets / loss_mask."""
    per_host = windows.shape[0] // process_count
    rows = windows[process_index * per_host : (process_index + 1) * per_host]
    targets = np.ascontiguousarray(rows[:, 1:])
    return {
        "inputs": np.ascontiguousarray(rows[:, :-1]),
        "targets": targets,
        "loss_mask": (targets != PAD).astype(np.float32),
    }


def _make_task(data: DataConfig):
    from umv2_jax.data.tasks import make_task

    return make_task(data.task_name, data.task_params())


def _task_stream():
    """umv2_jax.data.tasks.stream: task:NAME sources (batches from the generator, no files)."""
    from umv2_jax.data.tasks import stream

    return stream


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]
