"""Each text source on tiny files made here (files: .txt / .jsonl / .jsonl.gz, hf_disk: Dataset and
DatasetDict) and the evenly spaced holdout. tfds sources: test_data_pipeline.py; arrayrecord:
test_pretokenize.py."""

from __future__ import annotations

import numpy as np
import pytest

from umv2_jax.config import DataConfig
from umv2_jax.data import pipeline, sources

from .conftest import (
    BOS,
    EOS,
    PAD,
    held_out,
    make_config,
    reference_windows,
    take,
    write_jsonl,
    write_txt,
)


def all_documents(source: str, **fields) -> list:
    split = sources.open_all_splits(DataConfig(source=source, **fields), source)
    assert list(split) == ["all"]
    return [split["all"][i] for i in range(len(split["all"]))]


def split_documents(source: str, role: str, **fields) -> list:
    split = sources.open_split(DataConfig(source=source, **fields), source, role)
    return [split[i] for i in range(len(split))]


def eval_texts_through_pipeline(source: str, seq_len: int = 16, **fields) -> list[str]:
    """The eval split's documents, decoded from the eval batches (byte tokenizer)."""
    config = make_config(1, source=source, seq_len=seq_len, **fields)
    batches = pipeline.make_eval_batches(config, 10_000)
    inputs = np.concatenate([b["inputs"][0] for b in batches])
    stream = np.concatenate([inputs, batches[-1]["targets"][0][-1:]])
    stream = stream[stream != PAD].tolist()
    texts, current = [], None
    for token in stream:
        if token == BOS:
            current = []
        elif token == EOS:
            texts.append(bytes(current).decode("utf-8"))
        else:
            current.append(token)
    return texts


# --------------------------------------------------------------------------------------------------
# files:GLOB
# --------------------------------------------------------------------------------------------------


def test_txt_files_are_one_document_each_in_name_order(tmp_path):
    texts = ["first file\n", "Ça va? 東京\n\nline 3", "third"]
    source = write_txt(tmp_path / "t", texts)
    (tmp_path / "t" / "notes.md").write_text("not matched")
    assert all_documents(source) == texts
    # Held out: the middle one (3 × 0.05 holds out none, so document 3 // 2).
    assert held_out(3, 0.05) == [1]
    assert split_documents(source, "eval") == [texts[1]]
    assert split_documents(source, "train") == [texts[0], texts[2]]
    assert eval_texts_through_pipeline(source) == [texts[1]]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_long_txt_file_is_cut_on_line_boundaries(tmp_path, newline):
    lines = [f"line {i:02d} " + "é" * (i % 5) + "x" * (i % 7) for i in range(40)]
    lines.insert(17, "L" * 70)  # one line longer than a piece stays whole
    text = newline.join(lines) + newline + "tail without newline"
    source = write_txt(tmp_path / "long", [text, "short"])
    pieces = all_documents(source, max_document_chars=50)
    assert pieces[-1] == "short"
    pieces = pieces[:-1]
    assert len(pieces) > 10
    assert "".join(pieces) == text
    for piece in pieces[:-1]:
        assert piece.endswith(newline), repr(piece)
        assert len(piece) <= 50 or piece.count(newline) == 1, repr(piece)
    assert ("L" * 70 + newline) in pieces
    assert all_documents(source, max_document_chars=len(text)) == [text, "short"]


def test_a_long_txt_file_with_invalid_utf8_is_cut_without_losing_text(tmp_path):
    # Latin-1 bytes in a .txt file: decoded with replacement characters, and the pieces must still
    # be the file's text, in order, with nothing lost or repeated.
    folder = tmp_path / "latin"
    folder.mkdir()
    raw = b"".join(f"caf\xe9 {i:02d} na\xefve\n".encode("latin-1") for i in range(30))
    (folder / "a.txt").write_bytes(raw)
    (folder / "b.txt").write_bytes(b"ok")
    pieces = all_documents(f"files:{folder}/*.txt", max_document_chars=40)
    assert "".join(pieces[:-1]) == raw.decode("utf-8", errors="replace")
    assert pieces[-1] == "ok"
    assert len(pieces) == 16  # two lines (of 15 characters) per piece
    for piece in pieces[:-1]:
        assert piece.endswith("ve\n") and piece.startswith("caf"), repr(piece)


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_lines_are_documents_with_the_text_key(tmp_path, gz):
    name = "a.jsonl.gz" if gz else "a.jsonl"
    records = [
        {"body": "one", "id": 1},
        {"body": "two\nlines — ü", "id": 2},
        "",  # blank lines are skipped
        {"body": "", "other": "x"},  # an empty text is a document
        {"body": "東京 " * 20, "id": 4},
    ]
    write_jsonl(tmp_path / "j" / name, records, gz=gz)
    write_jsonl(tmp_path / "j" / ("b" + name[1:]), [{"body": "second file"}], gz=gz)
    source = f"files:{tmp_path}/j/*.jsonl{'.gz' if gz else ''}"
    expected = ["one", "two\nlines — ü", "", "東京 " * 20, "second file"]
    assert all_documents(source, text_key="body") == expected
    held = held_out(5, 0.3)
    assert split_documents(source, "eval", text_key="body", eval_holdout=0.3) == [
        expected[i] for i in held
    ]
    assert eval_texts_through_pipeline(source, text_key="body", eval_holdout=0.3) == [
        expected[i] for i in held
    ]


def test_a_glob_mixing_txt_and_jsonl_reads_both(tmp_path):
    folder = tmp_path / "m"
    write_jsonl(folder / "b.jsonl", [{"text": "from jsonl 1"}, {"text": "from jsonl 2"}])
    (folder / "a.txt").write_text("from txt")
    assert all_documents(f"files:{folder}/*") == ["from txt", "from jsonl 1", "from jsonl 2"]


def test_a_recursive_glob_reads_nested_folders_in_path_order(tmp_path):
    (tmp_path / "r" / "b" / "c").mkdir(parents=True)
    (tmp_path / "r" / "z.txt").write_text("top")
    (tmp_path / "r" / "b" / "x.txt").write_text("middle")
    (tmp_path / "r" / "b" / "c" / "y.txt").write_text("deep")
    assert all_documents(f"files:{tmp_path}/r/**/*.txt") == ["deep", "middle", "top"]


# --------------------------------------------------------------------------------------------------
# hf_disk:PATH
# --------------------------------------------------------------------------------------------------


def test_hf_disk_dataset_is_held_out_like_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [f"hf document {i} " + "z" * i for i in range(10)]
    datasets.Dataset.from_dict({"content": texts, "n": list(range(10))}).save_to_disk(
        tmp_path / "ds"
    )
    source = f"hf_disk:{tmp_path}/ds"
    assert all_documents(source, text_key="content") == texts
    held = held_out(10, 0.3)
    assert held == [3, 6, 9]
    fields = {"text_key": "content", "eval_holdout": 0.3}
    assert split_documents(source, "eval", **fields) == [texts[i] for i in held]
    assert split_documents(source, "train", **fields) == [
        t for i, t in enumerate(texts) if i not in held
    ]
    assert eval_texts_through_pipeline(source, **fields) == [texts[i] for i in held]


def test_hf_disk_dataset_dict_uses_its_named_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = [f"train {i}" for i in range(5)]
    dev = ["dev zero", "dev one"]
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": train}),
            "dev": datasets.Dataset.from_dict({"text": dev}),
        }
    ).save_to_disk(tmp_path / "dd")
    source = f"hf_disk:{tmp_path}/dd"
    assert split_documents(source, "train") == train
    assert split_documents(source, "eval", eval_split="dev") == dev
    assert eval_texts_through_pipeline(source, eval_split="dev") == dev
    splits = sources.open_all_splits(DataConfig(source=source), source)
    assert sorted(splits) == ["dev", "train"]
    # Training reads only the train split.
    config = make_config(1, source=source, seq_len=64, eval_split="dev")
    row = next(pipeline.make_train_iterator(config))["inputs"][0]
    text = bytes(t for t in row.tolist() if t < 256).decode()
    assert "train" in text and "dev" not in text


def test_hf_disk_dataset_of_token_ids_arrives_unchanged(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [[5, 6, 7], [200, 1], [9] * 11, [42]]
    datasets.Dataset.from_dict({"ids": rows}).save_to_disk(tmp_path / "ids")
    source = f"hf_disk:{tmp_path}/ids"
    documents = all_documents(source, text_key="ids")
    assert [d.tolist() for d in documents] == rows
    assert all(d.dtype == np.int32 for d in documents)
    config = make_config(1, source=source, seq_len=4, text_key="ids", eval_holdout=0.25)
    evals = pipeline.make_eval_batches(config, 10)
    held = [rows[i] for i in held_out(4, 0.25)]
    expected = reference_windows(held, 4, BOS, EOS, PAD, pad_final=True)
    assert len(evals) == len(expected)
    for batch, window in zip(evals, expected):
        np.testing.assert_array_equal(batch["inputs"][0], window["inputs"])


# --------------------------------------------------------------------------------------------------
# The holdout
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "fraction", "expected"),
    [(10, 0.3, [3, 6, 9]), (8, 0.25, [3, 7]), (3, 0.05, [1]), (2, 0.99, [1]), (20, 0.1, [9, 19])],
)
def test_holdout_is_evenly_spaced(count, fraction, expected):
    mask = sources.holdout_mask(count, fraction)
    assert np.flatnonzero(mask).tolist() == expected


@pytest.mark.parametrize("count", [2, 3, 7, 50, 101])
@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.3, 0.5, 0.9, 0.99])
def test_holdout_is_disjoint_complete_and_leaves_both_sides_a_document(count, fraction):
    held = np.flatnonzero(sources.holdout_mask(count, fraction))
    assert 1 <= len(held) <= count - 1
    if count * fraction >= 1:
        assert len(held) == int(np.floor(count * fraction))
    # Evenly spaced: gaps between held-out documents differ by at most one.
    if len(held) > 1 and count * fraction >= 2:
        gaps = np.diff(held)
        assert gaps.max() - gaps.min() <= 1


def test_holdout_splits_of_a_source_are_disjoint_and_complete(tmp_path):
    texts = [f"doc {i}" for i in range(23)]
    source = write_txt(tmp_path / "h", texts)
    train = split_documents(source, "train", eval_holdout=0.2)
    evals = split_documents(source, "eval", eval_holdout=0.2)
    assert sorted(train + evals) == sorted(texts)
    assert not set(train) & set(evals)
    assert evals == [texts[i] for i in held_out(23, 0.2)]


def test_training_never_reads_a_held_out_document(tmp_path, read_log):
    texts = [f"doc {i}" for i in range(10)]
    source = write_txt(tmp_path / "h", texts)
    config = make_config(2, source=source, seq_len=8, eval_holdout=0.3)
    batches = take(pipeline.make_train_iterator(config), 30)
    seen = {bytes(t for t in b["inputs"].ravel().tolist() if t < 256) for b in batches}
    joined = b"".join(seen).decode()
    for index in held_out(10, 0.3):
        assert f"doc {index}" not in joined
    assert {role for _, role, _ in read_log} == {"train"}


# --------------------------------------------------------------------------------------------------
# Files that change between two runs in one process (a notebook)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.txt"])
def test_a_file_rewritten_between_two_opens_is_read_anew(tmp_path, name):
    folder = tmp_path / "n"
    gz = name.endswith(".gz")

    def write(texts):
        if name.endswith(".txt"):
            folder.mkdir(exist_ok=True)
            (folder / name).write_text(texts[0])
            (folder / "b.txt").write_text(texts[1])
        else:
            write_jsonl(folder / name, [{"text": t} for t in texts], gz=gz)

    pattern = f"files:{folder}/*"
    write(["first version, long enough", "second document"])
    assert all_documents(pattern) == ["first version, long enough", "second document"]
    write(["v2", "now the second document is longer"])
    assert all_documents(pattern) == ["v2", "now the second document is longer"]


def test_a_dataset_saved_again_at_the_same_path_is_read_anew(tmp_path):
    datasets = pytest.importorskip("datasets")
    source = f"hf_disk:{tmp_path}/ds"
    datasets.Dataset.from_dict({"text": ["one", "two", "three"]}).save_to_disk(tmp_path / "ds")
    assert all_documents(source) == ["one", "two", "three"]
    datasets.Dataset.from_dict({"text": ["uno", "dos"]}).save_to_disk(tmp_path / "ds")
    assert all_documents(source) == ["uno", "dos"]
