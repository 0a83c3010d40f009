"""Data sources: random access to the documents of one split of one source.

    split = open_split(data_config, "files:corpus/*.jsonl.gz", "train")
    len(split)          # documents in the split
    split[i]            # document i: str (text) or int32[n] (token ids of a pretokenized source)
    split.identity      # the pretokenizer's tokenizer identity (arrayrecord), else None

Sources (`data.source`, or each entry of `data.mixture`):
    shakespeare         the corpus embedded in the package (tfds, ArrayRecord)
    tfds:NAME           a tfds dataset prepared as ArrayRecord in `data.data_dir`; the feature
                        `data.text_key` holds text, or token ids (an integer tensor)
    files:GLOB          .txt (one document per file), .jsonl / .jsonl.gz (one per line, text in
                        `data.text_key`); indexed once when opened (offsets only, no text kept,
                        except .gz files, which are held decompressed: for corpora larger than
                        memory, pretokenize once into ArrayRecord shards)
    hf_disk:PATH        a Hugging Face `datasets` Dataset or DatasetDict saved with save_to_disk
    arrayrecord:GLOB    shards of token ids written by `python -m umv2_jax.data.pretokenize`
                        (`{split}-NNNNN-of-NNNNN.arrayrecord` beside a manifest.json)

Splits: a source with named splits (tfds, a DatasetDict, pretokenized splits) uses
`data.train_split` / `data.eval_split`; one without (files, a single Dataset, one pretokenized
split) holds out `data.eval_holdout` of its documents, evenly spaced (document i is held out when
floor((i + 1)·f) > floor(i·f)), at least one document for each side. A .txt document longer than
`data.max_document_chars` is cut on line boundaries into pieces counted as documents, so a few
large files still give every row of a batch its own text.

Every error a user can cause (an empty glob, a missing file, a jsonl line that is not JSON or lacks
the text key, a corrupt shard, a missing optional library) is a one-line DataError / ConfigError.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
import re
import zlib
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from umv2_jax import paths
from umv2_jax.config import DataConfig, source_kind
from umv2_jax.errors import ConfigError, DataError

# The embedded dataset ships inside the package (pyproject package-data): found through it, so a
# wheel installed anywhere reads it (`__package__` is "umv2_jax.data").
PREPARED_DIR = Path(str(resources.files(__package__) / "prepared"))
EMBEDDED_VERSION_DIR = PREPARED_DIR / "shakespeare" / "1.0.0"
MANIFEST = "manifest.json"
SHARD_PATTERN = re.compile(r"^(?P<split>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.arrayrecord$")
# Split name of a pretokenized source that had no splits (files, a single Dataset).
ALL_SPLIT = "all"


@dataclasses.dataclass(frozen=True)
class Split:
    """One split's documents, by index. `read(i)` gives text (str) or token ids (int32[n])."""

    label: str  # the source, for messages: "files:corpus/*.txt"
    name: str  # "train", "validation", "train (holdout 0.05)"
    length: int
    read: Callable[[int], str | np.ndarray]
    identity: dict | None = None  # tokenizer identity of pretokenized ids (manifest), else None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> str | np.ndarray:
        if not 0 <= index < self.length:
            raise IndexError(f"document {index} of {self.length}")
        return self.read(index)


def open_split(data: DataConfig, source: str, role: str) -> Split:
    """The `role` ('train' | 'eval') split of `source`; DataError / ConfigError with the fix."""
    kind = source_kind(source)
    split_name = data.train_split if role == "train" else data.eval_split
    key = "data.train_split" if role == "train" else "data.eval_split"
    if kind in ("shakespeare", "tfds"):
        return _tfds_split(data, source, split_name, key)
    if kind == "files":
        documents = _files_documents(data, source)
        return _holdout(documents, data.eval_holdout, role)
    if kind == "hf_disk":
        return _hf_disk_split(data, source, split_name, key, role)
    if kind == "arrayrecord":
        return _arrayrecord_split(data, source, split_name, key, role)
    raise ConfigError(f"config 'data.source': '{source}' is not a text source")


def open_all_splits(data: DataConfig, source: str) -> dict[str, Split]:
    """Every split of `source` before any holdout: named splits, or {"all": every document}
    for sources without splits (what `pretokenize` writes, so the holdout is the same later)."""
    kind = source_kind(source)
    if kind in ("shakespeare", "tfds"):
        builder, _, _ = open_tfds_builder(data, source)
        return {
            name: _tfds_split(data, source, name, "data.source") for name in builder.info.splits
        }
    if kind == "files":
        documents = _files_documents(data, source)
        return {ALL_SPLIT: Split(documents.label, ALL_SPLIT, documents.length, documents.read)}
    if kind == "hf_disk":
        dataset = _load_from_disk(source.removeprefix("hf_disk:"))
        if hasattr(dataset, "keys"):
            return {
                name: _hf_split(dataset[name], data.text_key, _short(source), name)
                for name in dataset
            }
        return {ALL_SPLIT: _hf_split(dataset, data.text_key, _short(source), ALL_SPLIT)}
    raise ConfigError(
        f"'{source}' cannot be pretokenized (it is {'already token ids' if kind == 'arrayrecord' else 'not a text source'}); "
        "pass shakespeare, tfds:NAME, files:GLOB or hf_disk:PATH"
    )


def describe(data: DataConfig, source: str) -> str:
    """One line for the run summary: 'files:x/*.txt: 120 documents train / 6 validation'."""
    parts = []
    for role in ("train", "eval"):
        split = open_split(data, source, role)
        parts.append(f"{len(split):,} documents {split.name}")
    return f"{open_split(data, source, 'train').label}: {' / '.join(parts)}"


def holdout_mask(count: int, fraction: float) -> np.ndarray:
    """bool[count]: True for the held-out (evaluation) documents, evenly spaced, >= 1 per side."""
    if count < 2:
        raise ValueError("needs at least 2 documents")
    index = np.arange(count)
    held = np.floor((index + 1) * fraction) > np.floor(index * fraction)
    if not held.any():
        held[count // 2] = True
    if held.all():
        held[0] = False
    return held


# --------------------------------------------------------------------------------------------------
# tfds (and the embedded corpus)
# --------------------------------------------------------------------------------------------------


def _tfds_split(data: DataConfig, source: str, split: str, key: str) -> Split:
    builder, text_key, label = open_tfds_builder(data, source)
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
    feature = builder.info.features[text_key]
    holds_ids = np.issubdtype(np.dtype(getattr(feature, "np_dtype", np.object_)), np.integer)

    def read(index: int) -> str | np.ndarray:
        value = records[index][text_key]
        if holds_ids:
            return np.asarray(value, np.int32).reshape(-1)
        if isinstance(value, np.ndarray) and value.shape == ():
            value = value.item()
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        if isinstance(value, str):
            return value
        raise DataError(
            f"feature '{text_key}' of {label} holds {type(value).__name__}, neither text nor "
            "token ids; set data.text_key"
        )

    return Split(label=label, name=split, length=len(records), read=read)


def open_tfds_builder(data: DataConfig, source: str) -> tuple[Any, str, str]:
    """(tfds builder, text feature, label) of `shakespeare` or `tfds:NAME`, DataError otherwise."""
    import tensorflow_datasets as tfds

    if source == "shakespeare":
        directory = EMBEDDED_VERSION_DIR
        if not (directory / "dataset_info.json").is_file():
            raise DataError(
                f"the embedded Shakespeare dataset is missing from {directory}; reinstall "
                "umv2-jax or rebuild it with `python -m umv2_jax.data.build_shakespeare`"
            )
        return _builder_from_directory(str(directory)), "text", "shakespeare (embedded)"
    name = source.removeprefix("tfds:")
    label = source
    where = f"data_dir '{data.data_dir}'" if data.data_dir else "tfds's default data_dir"
    data_dir = None
    if data.data_dir is not None:
        data_dir = os.fspath(paths.to_path(data.data_dir, "data.data_dir"))
        if not paths.to_path(data.data_dir, "data.data_dir").is_dir():
            raise DataError(
                f"data.data_dir '{data.data_dir}' does not exist; point it at the tfds data_dir "
                f"holding '{name}'"
            )
    try:
        builder = _tfds_builder(name, data_dir)
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
    import tensorflow_datasets as tfds

    return tfds.builder_from_directory(path)


@functools.lru_cache(maxsize=8)
def _tfds_builder(name: str, data_dir: str | None) -> Any:
    import tensorflow_datasets as tfds

    return tfds.builder(name, data_dir=data_dir)


# --------------------------------------------------------------------------------------------------
# files:GLOB
# --------------------------------------------------------------------------------------------------

_FILE_KINDS = (".txt", ".jsonl", ".jsonl.gz")


@dataclasses.dataclass(frozen=True)
class _Documents:
    """Every document of a split-less source, before the holdout."""

    label: str
    length: int
    read: Callable[[int], str | np.ndarray]
    identity: dict | None = None


def _files_documents(data: DataConfig, source: str) -> _Documents:
    pattern = source.removeprefix("files:")
    files = paths.glob(pattern, "data.source")
    return _index_files(
        pattern,
        _stamps(files),
        data.text_key,
        data.max_document_chars,
        data.skip_bad_records,
    )


def _stamps(files) -> tuple:
    """(path, size, mtime) of each local file (just the path for URIs): the caches of indexed
    files and of pretokenized shards are keyed by it, so a file rewritten in the same process (a
    notebook) is indexed again instead of read at stale offsets."""
    stamps = []
    for path in files:
        text = os.fspath(path)
        if paths.scheme(text) is None:
            try:
                info = os.stat(text)
            except OSError:
                stamps.append((text, -1, -1))
                continue
            stamps.append((text, info.st_size, info.st_mtime_ns))
        else:
            stamps.append((text, None, None))
    return tuple(stamps)


@functools.lru_cache(maxsize=16)
def _index_files(
    pattern: str, stamps: tuple, text_key: str, max_chars: int, skip_bad: bool
) -> _Documents:
    label = f"files:{pattern}"
    files = [paths.to_path(stamp[0], "data.source") for stamp in stamps]
    if not files:
        raise DataError(
            f"{label} matches no file; fix the pattern (e.g. files:corpus/*.txt, "
            "files:corpus/**/*.jsonl.gz)"
        )
    for path in files:
        if not str(path).endswith(_FILE_KINDS):
            raise DataError(
                f"{label}: {path} is not a .txt, .jsonl or .jsonl.gz file; narrow the pattern "
                "to those"
            )
    # One row per document: (file number, byte offset, byte length) into the file's bytes.
    rows: list[tuple[int, int, int]] = []
    held: dict[int, bytes] = {}  # decompressed .gz files
    skipped = 0
    for number, path in enumerate(files):
        raw = _read_bytes(path, label)
        if str(path).endswith(".gz"):
            try:
                raw = gzip.decompress(raw)
            except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError
                raise DataError(
                    f"{path} is not a valid gzip file ({_first_line(error)}); fix or remove it"
                ) from None
            held[number] = raw
        if str(path).endswith(".txt"):
            rows.extend(
                (number, start, length) for start, length in _text_pieces(raw, max_chars, path)
            )
            continue
        offset = 0
        for line_number, line in enumerate(raw.split(b"\n"), start=1):
            start, offset = offset, offset + len(line) + 1
            if not line.strip():
                continue
            problem = _jsonl_problem(line, text_key)
            if problem is not None:
                if skip_bad:
                    skipped += 1
                    continue
                raise DataError(
                    f"{path}, line {line_number}: {problem}; fix the line, set data.text_key, or "
                    "set data.skip_bad_records=true to skip such lines"
                )
            rows.append((number, start, len(line)))
    if skipped:
        import logging

        logging.getLogger("umv2_jax").warning("%s: skipped %d bad jsonl line(s)", label, skipped)
    if not rows:
        raise DataError(f"{label} holds no document (all files are empty); point it at text")
    table = np.asarray(rows, np.int64)
    names = [str(path) for path in files]

    def read(index: int) -> str:
        number, start, length = (int(v) for v in table[index])
        blob = held.get(number)
        if blob is not None:
            piece = blob[start : start + length]
        else:
            with paths.to_path(names[number], "data.source").open("rb") as handle:
                handle.seek(start)
                piece = handle.read(length)
        if names[number].endswith(".txt"):
            return piece.decode("utf-8", errors="replace")
        return json.loads(piece)[text_key]

    return _Documents(label=label, length=len(rows), read=read)


def _read_bytes(path, label: str) -> bytes:
    try:
        return path.read_bytes()
    except (PermissionError, IsADirectoryError, FileNotFoundError, OSError) as error:
        raise DataError(
            f"{label}: cannot read {path} ({type(error).__name__}); fix its permissions or the pattern"
        ) from None


def _jsonl_problem(line: bytes, text_key: str) -> str | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "not valid JSON"
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if text_key not in record:
        return f"no key '{text_key}' (keys: {', '.join(list(record)[:8])})"
    if not isinstance(record[text_key], str):
        return f"'{text_key}' holds {type(record[text_key]).__name__}, not text"
    return None


def _text_pieces(raw: bytes, max_chars: int, path) -> list[tuple[int, int]]:
    """(byte offset, byte length) pieces of a .txt file: whole if short, else cut after newlines
    into pieces of at most `max_chars` characters (a longer single line stays whole).

    Lines are cut from the raw bytes (so offsets stay exact when the file is not valid UTF-8 and
    a replacement character stands for bytes of another length); characters are counted per line
    as read decodes them."""
    if not raw:
        return []
    if len(raw.decode("utf-8", errors="replace")) <= max_chars:
        return [(0, len(raw))]
    pieces, offset = [], 0
    length = current = 0  # bytes and characters in the current piece
    for line in raw.splitlines(keepends=True):
        chars = len(line.decode("utf-8", errors="replace"))
        if length and current + chars > max_chars:
            pieces.append((offset, length))
            offset += length
            length = current = 0
        length += len(line)
        current += chars
    if length:
        pieces.append((offset, length))
    return pieces


def _holdout(documents: _Documents, fraction: float, role: str) -> Split:
    if documents.length < 2:
        raise DataError(
            f"{documents.label} holds {documents.length} document; holding one out for "
            "evaluation needs at least 2 (add files, or split the text into several)"
        )
    held = holdout_mask(documents.length, fraction)
    chosen = np.flatnonzero(held if role == "eval" else ~held)
    name = f"{'validation' if role == 'eval' else 'train'} (holdout {fraction:g})"
    return Split(
        label=documents.label,
        name=name,
        length=len(chosen),
        read=lambda index: documents.read(int(chosen[index])),
        identity=documents.identity,
    )


# --------------------------------------------------------------------------------------------------
# hf_disk:PATH
# --------------------------------------------------------------------------------------------------


def _hf_disk_split(data: DataConfig, source: str, split: str, key: str, role: str) -> Split:
    dataset = _load_from_disk(source.removeprefix("hf_disk:"))
    label = _short(source)
    if hasattr(dataset, "keys"):  # a DatasetDict
        if split not in dataset:
            raise DataError(
                f"{label} has no split '{split}' (splits: {', '.join(dataset)}); set {key}"
            )
        return _hf_split(dataset[split], data.text_key, label, split)
    documents = _hf_documents(dataset, data.text_key, label)
    return _holdout(documents, data.eval_holdout, role)


def _load_from_disk(path: str) -> Any:
    location = paths.to_path(path, "data.source")
    if not location.exists():
        raise DataError(
            f"hf_disk:{path} does not exist; save the dataset there with save_to_disk or fix data.source"
        )
    # Keyed by the saved files too: a dataset saved again at the same path in this process is
    # loaded again (the cached one memory-maps arrow files that were overwritten).
    files = []
    if paths.scheme(path) is None:
        for folder, _, names in os.walk(os.fspath(location)):
            files += [os.path.join(folder, name) for name in sorted(names)]
    return _load_from_disk_cached(path, _stamps(sorted(files)))


@functools.lru_cache(maxsize=8)
def _load_from_disk_cached(path: str, stamps: tuple) -> Any:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "config 'data.source': hf_disk: needs the Hugging Face datasets library; "
            "pip install 'umv2-jax[hf]' (or pip install datasets)"
        ) from None
    location = paths.to_path(path, "data.source")
    try:
        return datasets.load_from_disk(os.fspath(location))
    except Exception as error:
        raise DataError(
            f"hf_disk:{path} is not a dataset saved with save_to_disk ({_first_line(error)}); "
            "fix data.source"
        ) from None


def _hf_documents(dataset: Any, text_key: str, label: str) -> _Documents:
    split = _hf_split(dataset, text_key, label, "all")
    return _Documents(label=label, length=split.length, read=split.read)


def _hf_split(dataset: Any, text_key: str, label: str, name: str) -> Split:
    if text_key not in dataset.column_names:
        raise DataError(
            f"{label} has no column '{text_key}' (columns: {', '.join(dataset.column_names)}); "
            "set data.text_key"
        )
    column = dataset.with_format("numpy" if _holds_ids(dataset, text_key) else None)

    def read(index: int) -> str | np.ndarray:
        value = column[index][text_key]
        if isinstance(value, str):
            return value
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        array = np.asarray(value)
        if np.issubdtype(array.dtype, np.integer):
            return array.astype(np.int32).reshape(-1)
        raise DataError(
            f"column '{text_key}' of {label} holds {type(value).__name__}, neither text nor token ids"
        )

    return Split(label=label, name=name, length=len(dataset), read=read)


def _holds_ids(dataset: Any, text_key: str) -> bool:
    feature = dataset.features[text_key]
    inner = getattr(feature, "feature", None)
    dtype = getattr(inner, "dtype", None) or getattr(feature, "dtype", "")
    return "int" in str(dtype)


# --------------------------------------------------------------------------------------------------
# arrayrecord:GLOB (pretokenized)
# --------------------------------------------------------------------------------------------------


def _arrayrecord_split(data: DataConfig, source: str, split: str, key: str, role: str) -> Split:
    shards = open_pretokenized(source.removeprefix("arrayrecord:"))
    label = _short(source)
    splits = shards["splits"]
    if list(splits) == [ALL_SPLIT]:
        documents = _shard_documents(shards, ALL_SPLIT, label)
        return _holdout(documents, data.eval_holdout, role)
    if split not in splits:
        raise DataError(f"{label} has no split '{split}' (splits: {', '.join(splits)}); set {key}")
    documents = _shard_documents(shards, split, label)
    return Split(
        label=label,
        name=split,
        length=documents.length,
        read=documents.read,
        identity=documents.identity,
    )


def open_pretokenized(pattern: str) -> dict:
    """{"manifest": dict, "splits": {name: [path, ...]}, "identity": dict} of pretokenized shards.

    Checks the manifest beside the shards and every shard's record count against it (a truncated
    or corrupt shard is a DataError naming the file). Cached until a matched file changes."""
    matched = paths.glob(pattern, "data.source")
    manifests = {os.path.join(os.fspath(p.parent), MANIFEST) for p in matched}
    return _open_pretokenized(pattern, _stamps(matched) + _stamps(sorted(manifests)))


@functools.lru_cache(maxsize=8)
def _open_pretokenized(pattern: str, stamps: tuple) -> dict:
    label = f"arrayrecord:{pattern}"
    matched = [paths.to_path(stamp[0], "data.source") for stamp in stamps]
    files = [p for p in matched if SHARD_PATTERN.match(p.name)]
    if not files:
        raise DataError(
            f"{label} matches no shard ({{split}}-NNNNN-of-NNNNN.arrayrecord); write shards with "
            "python -m umv2_jax.data.pretokenize or fix the pattern"
        )
    directories = {str(p.parent) for p in files}
    if len(directories) > 1:
        raise DataError(
            f"{label} matches shards in {len(directories)} folders; point it at one pretokenized folder"
        )
    manifest_path = files[0].parent / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        declared = manifest["splits"]
        if not isinstance(manifest["tokenizer"], dict):  # the ids cannot be checked without it
            raise TypeError("tokenizer")
    except FileNotFoundError:
        raise DataError(
            f"{label}: no {MANIFEST} beside the shards in {files[0].parent}; rewrite them with python -m umv2_jax.data.pretokenize"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DataError(
            f"{label}: {manifest_path} is not a pretokenize manifest; rewrite the shards"
        ) from None
    splits: dict[str, list] = {}
    for path in files:
        match = SHARD_PATTERN.match(path.name)
        splits.setdefault(match["split"], []).append(path)
    for name, shard_paths in splits.items():
        info = declared.get(name)
        if info is None:
            raise DataError(
                f"{label}: split '{name}' is not in {manifest_path}; rewrite the shards"
            )
        expected = info["shards"]
        if len(shard_paths) != len(expected):
            raise DataError(
                f"{label}: split '{name}' has {len(shard_paths)} of its {len(expected)} shards; "
                "the pattern must match all of them (e.g. DIR/*)"
            )
        for path, shard in zip(shard_paths, expected):
            count = _record_count(path)
            if count != shard["documents"]:
                raise DataError(
                    f"{path} holds {count} records but the manifest says {shard['documents']}; "
                    "the shard is truncated or was replaced: write it again with pretokenize"
                )
    return {"manifest": manifest, "splits": splits, "identity": manifest.get("tokenizer")}


def _record_count(path) -> int:
    from array_record.python import array_record_module

    try:
        reader = array_record_module.ArrayRecordReader(os.fspath(path))
        try:
            return reader.num_records()
        finally:
            reader.close()
    except Exception as error:
        raise DataError(
            f"{path} is not a readable ArrayRecord shard ({_first_line(error)}); it is corrupt "
            "or truncated: write it again with python -m umv2_jax.data.pretokenize"
        ) from None


def _shard_documents(shards: dict, split: str, label: str) -> _Documents:
    import grain

    paths_of_split = [os.fspath(p) for p in shards["splits"][split]]
    source = grain.sources.ArrayRecordDataSource(paths_of_split)
    dtype = np.dtype(shards["manifest"].get("dtype", "int32"))
    # First document of each shard (the manifest's counts, checked by open_pretokenized).
    declared = shards["manifest"]["splits"][split]["shards"]
    starts = np.cumsum([0] + [int(shard["documents"]) for shard in declared])

    def read(index: int) -> np.ndarray:
        try:
            record = source[index]
        except Exception as error:
            shard = int(np.searchsorted(starts, index, side="right")) - 1
            path = paths_of_split[min(max(shard, 0), len(paths_of_split) - 1)]
            raise DataError(
                f"{path}: record {index - starts[shard]} cannot be read ({_first_line(error)}); "
                "the shard is corrupt: write it again with python -m umv2_jax.data.pretokenize"
            ) from None
        return np.frombuffer(record, dtype).astype(np.int32)

    return _Documents(label=label, length=len(source), read=read, identity=shards["identity"])


def _short(source: str) -> str:
    return source if len(source) <= 120 else source[:117] + "..."


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]
