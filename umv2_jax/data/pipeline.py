"""Input pipelines: documents → tokens → packed windows with document boundaries → batches.

    iterator = make_train_iterator(config, process_index, process_count)
    batch = next(iterator)              # one host's share of the global batch, numpy:
        inputs       int32[B_host, S]   B_host = train.batch_size // process_count, S = data.seq_len
        targets      int32[B_host, S]   the window shifted by one: targets[:, t] == inputs[:, t + 1]
        loss_mask    float32[B_host, S] 1.0 on targets that count: the next token of the same
                                        document (not the BOS after a document's EOS), not PAD
        segment_ids  int32[B_host, S]   with data.document_mask: 1, 2, … per document in the row,
                                        0 on padding; attention stays inside a segment
        positions    int32[B_host, S]   with data.document_mask: position in the segment (RoPE
                                        restarts at every document and at the window's start)
        target_bytes float32[B_host, S] (evaluation batches) UTF-8 bytes each counted target covers
    state = iterator.get_state()        # JSON-serializable; iterator.set_state(state) resumes exactly
    eval_batches = make_eval_batches(config, num_batches)   # same list every call

Sources and splits: umv2_jax.data.sources (`data.source`, or `data.mixture: [[SOURCE, WEIGHT], …]`).
Tokenizers: umv2_jax.data.tokenizers (`data.tokenizer`: bytes | sentencepiece:PATH | hf:PATH).
Pretokenized sources (arrayrecord shards, tfds / hf datasets of ids) must come from the run's
tokenizer (their manifest says which) and are packed exactly like text tokenized on the fly.

Packing: each document becomes [BOS, tokens…, EOS]; documents are concatenated and cut into
windows of S + 1 tokens with stride S (inputs = window[:-1], targets = window[1:]).

Training rows. Row r of the global batch (r < B = train.batch_size) is its own packed stream: the
documents at positions r, r + B, r + 2B, … of the source's infinite document sequence (epoch e is
a permutation of the split seeded by (data.shuffle_seed, source, e)). With a mixture, each
document a row reads comes from source k with probability w_k / Σw (a draw seeded by the row and
the draw's number), and is that source's next document for the row. So a batch mixes B documents,
the global batch does not depend on the process count, a process reads only the documents of the
rows its devices hold, and the iterator state is a few integers per row (draws, per-source counts,
offset in the current document), stored by global row so a checkpoint restores onto any process
count. Weights are per document (the grain/MaxText convention), not per token.

Evaluation reads the eval split(s) in order (a mixture interleaves its sources' eval documents
with a fixed-seed weighted draw), pads the last window with PAD (segment 0, loss_mask 0) and fills
a last partial batch with all-PAD rows, so shapes never change.

`task:NAME` sources generate their own batches (umv2_jax.data.tasks.stream): inputs, targets and
loss_mask (1 at answer positions only), no segments.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from umv2_jax.config import Config, DataConfig
from umv2_jax.data import sources as sources_lib
from umv2_jax.data.sources import EMBEDDED_VERSION_DIR  # noqa: F401  (re-exported)
from umv2_jax.errors import ConfigError, DataError

STATE_FORMAT = "rows-v1"
# Eval mixtures interleave their sources with draws from this seed (independent of training).
EVAL_MIX_SEED = 0x5EED


def make_train_iterator(config: Config, process_index: int = 0, process_count: int = 1):
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
    data = config.data
    if not 0 <= data.shuffle_seed < 2**32:
        raise ConfigError(f"config 'data.shuffle_seed': {data.shuffle_seed} is not in [0, 2**32)")
    documents = _open_documents(config, "train")
    per_host = global_batch // process_count
    rows = range(process_index * per_host, (process_index + 1) * per_host)
    return TrainIterator(documents, data, global_batch, rows)


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
    documents = _open_documents(config, "eval")
    cursor = _EvalCursor(documents)
    packer = _Packer(cursor, data.seq_len + 1, documents.pad_id)
    table = documents.tokenizer.token_byte_lengths()
    batches = []
    for _ in range(num_batches):
        rows = []
        for _ in range(global_batch):
            window = packer.next_window(pad_final=True)
            if window is None:
                break
            rows.append(window)
        if not rows:
            break
        while len(rows) < global_batch:
            rows.append(_pad_window(data.seq_len + 1, documents.pad_id))
        batch = _batch(rows, data.masks_documents)
        batch["target_bytes"] = _target_bytes(batch, table)
        batches.append(_host_share(batch, process_index, process_count))
    return batches


def describe_source(config: Config) -> str:
    """One line for the run summary, e.g. `shakespeare (embedded): 1,115 documents train / …`."""
    data = config.data
    if data.task_name is not None:
        task = _make_task(data)
        return f"task {task.name} (generated), parameters {task.params()}"
    parts = []
    for source, weight in data.sources:
        line = sources_lib.describe(data, source)
        parts.append(line if len(data.sources) == 1 else f"{weight:g} × {line}")
    tokenizer = run_tokenizer(config)
    masked = "documents masked" if data.masks_documents else "documents not masked"
    return (
        f"{'; '.join(parts)}; tokenizer {tokenizer.kind} (vocab {tokenizer.vocab_size:,}); {masked}"
    )


@functools.lru_cache(maxsize=8)
def _load_tokenizer(spec: str, bos: str | None, eos: str | None, pad: str | None):
    from umv2_jax.data import tokenizers

    return tokenizers.load_tokenizer(spec, bos=bos, eos=eos, pad=pad)


def run_tokenizer(config: Config):
    """The run's tokenizer (`data.tokenizer`, with `data.{bos,eos,pad}_token`), loaded once."""
    data = config.data
    return _load_tokenizer(data.tokenizer, data.bos_token, data.eos_token, data.pad_token)


def check_vocab(config: Config) -> str | None:
    """ConfigError when `model.vocab_size` cannot hold the tokenizer's ids; returns a warning line
    when it is much larger (rows of the embedding that no token uses), else None."""
    if config.data.task_name is not None:
        return None
    tokenizer = run_tokenizer(config)
    vocab = config.model.vocab_size
    if vocab < tokenizer.vocab_size:
        raise ConfigError(
            f"config 'model.vocab_size': {vocab} is smaller than the vocabulary of tokenizer "
            f"{config.data.tokenizer} ({tokenizer.vocab_size}); set model.vocab_size="
            f"{tokenizer.vocab_size} or more"
        )
    padded = config.model.padded_vocab_size
    if padded - tokenizer.vocab_size >= 128:
        return (
            f"model.vocab_size {vocab} is larger than tokenizer {config.data.tokenizer}'s "
            f"{tokenizer.vocab_size} ids: {padded - tokenizer.vocab_size:,} embedding rows are never "
            f"used; set model.vocab_size={tokenizer.vocab_size} unless that is intended"
        )
    return None


# --------------------------------------------------------------------------------------------------
# Documents of a run: its sources, tokenized
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _RunDocuments:
    """The run's sources for one role, each document as [BOS, tokens…, EOS] int32."""

    splits: tuple[sources_lib.Split, ...]
    weights: np.ndarray  # float64[K], summing to 1
    tokenizer: Any
    seed: int
    vocab_limit: int  # ids must be below this (the model's vocabulary)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    def tokens(self, source: int, index: int) -> np.ndarray:
        split = self.splits[source]
        document = split[index]
        if isinstance(document, str):
            body = self.tokenizer.encode(document)
        else:
            body = np.asarray(document, np.int32)
            if body.size and (body.min() < 0 or body.max() >= self.vocab_limit):
                raise DataError(
                    f"{split.label}: document {index} holds token id {int(body.max())} outside "
                    f"[0, {self.vocab_limit}); the ids do not come from tokenizer "
                    f"{self.tokenizer.spec}: pretokenize with it or fix data.tokenizer"
                )
        tokens = np.empty(body.size + 2, np.int32)
        tokens[0], tokens[-1] = self.tokenizer.bos_id, self.tokenizer.eos_id
        tokens[1:-1] = body
        return tokens


def _open_documents(config: Config, role: str) -> _RunDocuments:
    data = config.data
    tokenizer = run_tokenizer(config)
    splits = []
    for source, _ in data.sources:
        split = sources_lib.open_split(data, source, role)
        if len(split) == 0:
            raise DataError(
                f"{split.label} split '{split.name}' holds no document; use a larger dataset"
            )
        if split.identity is not None:
            _check_pretokenized(split, tokenizer)
        splits.append(split)
    weights = np.asarray([weight for _, weight in data.sources], np.float64)
    if not (np.isfinite(weights).all() and (weights >= 0).all() and weights.sum() > 0):
        raise ConfigError(
            f"config 'data.mixture': weights {weights.tolist()} must be finite, >= 0 and not all "
            "0; give each source a weight >= 0 and at least one a positive weight"
        )
    return _RunDocuments(
        splits=tuple(splits),
        weights=weights / weights.sum(),
        tokenizer=tokenizer,
        seed=data.shuffle_seed,
        vocab_limit=min(config.model.vocab_size, max(tokenizer.vocab_size, 1)),
    )


def _check_pretokenized(split: sources_lib.Split, tokenizer) -> None:
    saved, current = split.identity, tokenizer.identity()
    keys = ("kind", "sha256", "vocab_size", "bos_id", "eos_id", "pad_id")
    if any(saved.get(key) != current.get(key) for key in keys):
        raise DataError(
            f"{split.label} was pretokenized with {saved.get('kind')} tokenizer "
            f"{saved.get('file') or ''} (sha256 {str(saved.get('sha256'))[:12]}, vocab "
            f"{saved.get('vocab_size')}) but data.tokenizer is {tokenizer.spec} (sha256 "
            f"{str(current.get('sha256'))[:12]}, vocab {current.get('vocab_size')}); set "
            "data.tokenizer to the manifest's tokenizer or pretokenize again"
        )


# --------------------------------------------------------------------------------------------------
# Cursors: which document comes next
# --------------------------------------------------------------------------------------------------


class _RowCursor:
    """The documents of training row `row` of `rows`: draw n picks a source (mixtures) and takes
    that source's next document for the row. State: draws made and per-source counts before the
    current document."""

    def __init__(self, documents: _RunDocuments, row: int, rows: int):
        self._documents = documents
        self._row, self._rows = row, rows
        self.draws = 0
        self.counts = [0] * len(documents.splits)
        self._current: tuple[int, np.ndarray] | None = None

    def current(self) -> np.ndarray:
        if self._current is None:
            source = self._source(self.draws)
            position = self._row + self._rows * self.counts[source]
            self._current = (source, self._documents.tokens(source, self._index(source, position)))
        return self._current[1]

    def advance(self) -> None:
        source = self._current[0] if self._current is not None else self._source(self.draws)
        self.counts[source] += 1
        self.draws += 1
        self._current = None

    def get_state(self) -> dict[str, Any]:
        return {"draws": self.draws, "counts": list(self.counts)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.draws = int(state["draws"])
        self.counts = [int(c) for c in state["counts"]]
        self._current = None

    def _source(self, draw: int) -> int:
        weights = self._documents.weights
        if len(weights) == 1:
            return 0
        rng = np.random.default_rng([self._documents.seed, 1, self._row, draw])
        return int(rng.choice(len(weights), p=weights))

    def _index(self, source: int, position: int) -> int:
        count = len(self._documents.splits[source])
        epoch, index = divmod(position, count)
        return int(_permutation(self._documents.seed, source, epoch, count)[index])


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, source: int, epoch: int, count: int) -> np.ndarray:
    """Epoch `epoch`'s order of a source's `count` documents (PCG64 seeded by seed, source, epoch)."""
    order = np.random.default_rng([seed, 0, source, epoch]).permutation(count)
    return order.astype(np.int64 if count >= 2**31 else np.int32)


class _EvalCursor:
    """The eval documents in order; a mixture interleaves its sources by a fixed-seed draw."""

    def __init__(self, documents: _RunDocuments):
        self._documents = documents
        self._next = [0] * len(documents.splits)
        self._rng = np.random.default_rng(EVAL_MIX_SEED)
        self._current: np.ndarray | None = None
        self._source: int | None = None

    def current(self) -> np.ndarray | None:
        if self._current is None:
            left = [
                k for k, split in enumerate(self._documents.splits) if self._next[k] < len(split)
            ]
            if not left:
                return None
            weights = self._documents.weights[left]
            if weights.sum() <= 0:
                return None
            self._source = left[int(self._rng.choice(len(left), p=weights / weights.sum()))]
            self._current = self._documents.tokens(self._source, self._next[self._source])
        return self._current

    def advance(self) -> None:
        self._next[self._source] += 1
        self._current = None


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Window:
    """One packed window of S + 1 tokens: ids, segment (1, 2, … per document; 0 = PAD) and the
    position of each token in its segment."""

    tokens: np.ndarray
    segments: np.ndarray
    positions: np.ndarray


class _Packer:
    """Cuts a cursor's documents into windows of `length` tokens with stride length - 1."""

    def __init__(self, cursor, length: int, pad_id: int):
        self.cursor = cursor
        self.offset = 0  # start of the next window in the cursor's current document
        self._length = length
        self._pad_id = pad_id

    def next_window(self, pad_final: bool = False) -> Window | None:
        need, pieces, segments, positions = self._length, [], [], []
        while need:
            document = self.cursor.current()
            if document is None:  # a finite stream ran out
                taken = self._length - need
                if not pad_final or taken < 2:
                    return None
                pieces.append(np.full(need, self._pad_id, np.int32))
                segments.append(np.zeros(need, np.int32))
                positions.append(np.zeros(need, np.int32))
                self.offset = 0
                break
            piece = document[self.offset : self.offset + need]
            pieces.append(piece)
            segments.append(np.full(len(piece), len(segments) + 1, np.int32))
            positions.append(np.arange(len(piece), dtype=np.int32))
            need -= len(piece)
            self.offset += len(piece)
            if need:
                self.cursor.advance()
                self.offset = 0
        # Stride length - 1: the window's last token starts the next window.
        if self.cursor.current() is not None and self.offset > 0:
            self.offset -= 1
        return Window(np.concatenate(pieces), np.concatenate(segments), np.concatenate(positions))


def _pad_window(length: int, pad_id: int) -> Window:
    zeros = np.zeros(length, np.int32)
    return Window(np.full(length, pad_id, np.int32), zeros, zeros.copy())


def _batch(windows: Sequence[Window], masks_documents: bool) -> dict[str, np.ndarray]:
    """Windows (S + 1 tokens each) → inputs / targets / loss_mask [/ segment_ids / positions]."""
    tokens = np.stack([w.tokens for w in windows])
    segments = np.stack([w.segments for w in windows])
    batch = {
        "inputs": np.ascontiguousarray(tokens[:, :-1]),
        "targets": np.ascontiguousarray(tokens[:, 1:]),
    }
    real = segments[:, 1:] > 0
    if masks_documents:
        same = segments[:, 1:] == segments[:, :-1]
        batch["loss_mask"] = (real & same).astype(np.float32)
        batch["segment_ids"] = np.ascontiguousarray(segments[:, :-1])
        batch["positions"] = np.ascontiguousarray(np.stack([w.positions for w in windows])[:, :-1])
    else:
        batch["loss_mask"] = real.astype(np.float32)
    return batch


def _target_bytes(batch: dict[str, np.ndarray], table: np.ndarray) -> np.ndarray:
    """float32[B, S]: UTF-8 bytes covered by each counted target (0 for specials and PAD)."""
    targets = np.clip(batch["targets"], 0, len(table) - 1)
    covered = np.where(batch["targets"] < len(table), table[targets], 0)
    return (covered * batch["loss_mask"]).astype(np.float32)


class TrainIterator:
    """This host's rows of every training batch (module docstring). Not thread-safe."""

    def __init__(self, documents: _RunDocuments, data: DataConfig, rows: int, own_rows: range):
        self._data = data
        self._rows = rows  # the global batch: row r reads documents r, r + rows, …
        self._own_rows = own_rows
        self._packers = {
            row: _Packer(_RowCursor(documents, row, rows), data.seq_len + 1, documents.pad_id)
            for row in own_rows
        }

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        windows = [self._packers[row].next_window() for row in self._own_rows]
        return _batch(windows, self._data.masks_documents)

    def get_state(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "seq_len": self._data.seq_len,
            "batch_size": self._rows,
            "rows": {
                str(row): {**packer.cursor.get_state(), "offset": packer.offset}
                for row, packer in self._packers.items()
            },
        }

    def set_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError(
                "the checkpoint's data iterator state comes from an older umv2-jax input pipeline "
                "(before per-row packing); resume it with that version, or start over with "
                "--no-resume"
            )
        if state["seq_len"] != self._data.seq_len:
            raise DataError(
                f"the data iterator state was saved with seq_len={state['seq_len']} but "
                f"data.seq_len={self._data.seq_len}; resume with the original seq_len"
            )
        saved_rows = state.get("batch_size", self._rows)
        if saved_rows != self._rows:
            raise DataError(
                f"the data iterator state was saved with train.batch_size={saved_rows} but "
                f"train.batch_size={self._rows}: each batch row reads its own documents, so the "
                "position does not carry over; resume with the original batch size"
            )
        rows = state["rows"]
        missing = [row for row in self._own_rows if str(row) not in rows]
        if missing:
            raise DataError(
                f"the data iterator state holds no position for batch rows {missing[:4]}…: it was "
                "saved with another train.batch_size; resume with the original batch size"
            )
        for row, packer in self._packers.items():
            entry = rows[str(row)]
            packer.cursor.set_state(entry)
            packer.offset = int(entry["offset"])


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


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
    batch: dict[str, np.ndarray], process_index: int, process_count: int
) -> dict[str, np.ndarray]:
    """This host's block of rows of every array of a global batch."""
    per_host = batch["inputs"].shape[0] // process_count
    rows = slice(process_index * per_host, (process_index + 1) * per_host)
    return {key: np.ascontiguousarray(value[rows]) for key, value in batch.items()}


def _make_task(data: DataConfig):
    from umv2_jax.data.tasks import make_task

    return make_task(data.task_name, data.task_params())


def _task_stream():
    """umv2_jax.data.tasks.stream: task:NAME sources (batches from the generator, no files)."""
    from umv2_jax.data.tasks import stream

    return stream
