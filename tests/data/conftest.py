"""Helpers of the data tests: configs, tiny corpora written in the test, a reference packer written
from the batch contract (umv2_jax.data.pipeline's docstring) and a recorder of document reads."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from umv2_jax.config import Config, DataConfig, ModelConfig, TrainConfig
from umv2_jax.data import sources
from umv2_jax.data import tokenizer as byte_tokenizer

BOS, EOS, PAD = byte_tokenizer.BOS, byte_tokenizer.EOS, byte_tokenizer.PAD
SPM = "sentencepiece:shakespeare_bpe2048"


def make_config(batch_size: int = 4, vocab_size: int | None = None, **data_fields) -> Config:
    """A Config for the pipeline (not validated: error tests validate through load_config)."""
    data_fields.setdefault("seq_len", 16)
    if vocab_size is None:
        vocab_size = 2048 if data_fields.get("tokenizer", "bytes") != "bytes" else 259
    return Config(
        model=ModelConfig(vocab_size=vocab_size),
        data=DataConfig(**data_fields),
        train=TrainConfig(batch_size=batch_size),
    )


def replace_data(config: Config, **fields) -> Config:
    return dataclasses.replace(config, data=dataclasses.replace(config.data, **fields))


def take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# --------------------------------------------------------------------------------------------------
# Tiny corpora
# --------------------------------------------------------------------------------------------------


def write_txt(folder: Path, texts: list[str], prefix: str = "doc") -> str:
    """One .txt per text (names sort in the given order); returns the `files:` source."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, text in enumerate(texts):
        (folder / f"{prefix}{index:04d}.txt").write_text(text, encoding="utf-8")
    return f"files:{folder}/*.txt"


def write_jsonl(path: Path, records: list, gz: bool = False) -> Path:
    """Records (dicts, or raw strings written as they are) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    raw = ("\n".join(lines) + "\n").encode("utf-8")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def short_texts(count: int, tag: str = "d", length: int | None = None) -> list[str]:
    """Distinct texts: 'd000 w17 w3 …' (equal lengths when `length` is given)."""
    rng = np.random.default_rng(count)
    texts = []
    for index in range(count):
        words = " ".join(f"w{v}" for v in rng.integers(0, 50, size=int(rng.integers(1, 6))))
        text = f"{tag}{index:03d} {words}"
        if length is not None:
            text = (text + " " + "x" * length)[:length]
        texts.append(text)
    return texts


def held_out(count: int, fraction: float) -> list[int]:
    """The held-out document numbers, from the rule written in sources' docstring."""
    import math

    held = [i for i in range(count) if math.floor((i + 1) * fraction) > math.floor(i * fraction)]
    if not held:
        held = [count // 2]
    return held


# --------------------------------------------------------------------------------------------------
# The batch contract, by hand
# --------------------------------------------------------------------------------------------------


def reference_windows(
    documents: list[list[int]], seq_len: int, bos: int, eos: int, pad: int, pad_final: bool
) -> list[dict[str, np.ndarray]]:
    """Rows packed by the contract: each document is [BOS, ids…, EOS]; the stream is cut into
    windows of S+1 tokens with stride S; segment 1, 2, … per document in the window, positions
    from 0 at each document start and at the window start; loss_mask 0 where the target starts
    another document (EOS→BOS) and on PAD. Without pad_final, only full windows."""
    tokens, owner, position = [], [], []
    for number, ids in enumerate(documents):
        whole = [bos, *ids, eos]
        tokens += whole
        owner += [number] * len(whole)
        position += list(range(len(whole)))
    rows = []
    start = 0
    while start + 1 < len(tokens):
        stop = start + seq_len + 1
        if stop > len(tokens) and not pad_final:
            break
        window = tokens[start:stop]
        docs = owner[start:stop]
        pos = [
            position[i] - (position[start] if owner[i] == owner[start] else 0)
            for i in range(start, min(stop, len(tokens)))
        ]
        labels = {d: k + 1 for k, d in enumerate(dict.fromkeys(docs))}
        segment = [labels[d] for d in docs]
        missing = seq_len + 1 - len(window)
        window += [pad] * missing
        segment += [0] * missing
        pos += [0] * missing
        window, segment, pos = (np.asarray(v, np.int32) for v in (window, segment, pos))
        mask = (segment[1:] == segment[:-1]) & (segment[1:] > 0)
        rows.append(
            {
                "inputs": window[:-1],
                "targets": window[1:],
                "loss_mask": mask.astype(np.float32),
                "segment_ids": segment[:-1],
                "positions": pos[:-1],
            }
        )
        start += seq_len
    return rows


def row_stream(batches: list[dict], row: int) -> np.ndarray:
    """The token stream a training row walked: window k = stream[kS : kS + S + 1]."""
    inputs = np.concatenate([batch["inputs"][row] for batch in batches])
    return np.concatenate([inputs, batches[-1]["targets"][row][-1:]])


def split_documents(stream: np.ndarray, bos: int, eos: int) -> tuple[list[list[int]], bool]:
    """The documents of a stream that starts with BOS: ([ids…] per document, last one complete)."""
    assert stream[0] == bos, stream[:8]
    documents, current, complete = [], None, False
    for token in stream.tolist():
        if token == bos:
            assert current is None, "BOS inside a document"
            current, complete = [], False
        elif token == eos:
            assert current is not None, "EOS outside a document"
            documents.append(current)
            current, complete = None, True
        else:
            current.append(token)
    if current is not None:
        documents.append(current)
        complete = False
    return documents, complete


def text_of(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8")


# --------------------------------------------------------------------------------------------------
# Which documents the pipeline reads
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def read_log(monkeypatch):
    """Records every document read through sources.open_split: list of (source, role, index)."""
    log: list[tuple[str, str, int]] = []
    original = sources.open_split

    def recording(data, source, role):
        split = original(data, source, role)

        def read(index, _read=split.read):
            log.append((source, role, index))
            return _read(index)

        return dataclasses.replace(split, read=read)

    monkeypatch.setattr(sources, "open_split", recording)
    return log
