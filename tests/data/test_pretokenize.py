"""Pretokenized shards (python -m umv2_jax.data.pretokenize): the same batches as tokenizing on the
fly, manifest counts equal to independent counts, corrupt or mismatched shards refused, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from umv2_jax.data import pipeline, sources
from umv2_jax.data.pretokenize import pretokenize
from umv2_jax.data.tokenizers import SHAKESPEARE_BPE
from umv2_jax.errors import ConfigError, DataError

from .conftest import SPM, assert_batches_equal, make_config, replace_data, take, write_jsonl

QUIET = {"workers": 1, "progress": False}


def corpus_texts(count: int = 40) -> list[str]:
    rng = np.random.default_rng(1)
    words = ["thou", "art", "Ünïcode", "東京", "to be", "or not", "the", "king", "—", "'tis"]
    return [
        f"doc {i}: " + " ".join(rng.choice(words, size=int(rng.integers(0, 30))))
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def jsonl_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jsonl")
    texts = corpus_texts()
    write_jsonl(folder / "a.jsonl", [{"text": t} for t in texts[:25]])
    write_jsonl(folder / "b.jsonl", [{"text": t} for t in texts[25:]])
    return f"files:{folder}/*.jsonl", texts


def sentencepiece_counts(texts: list[str]) -> int:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=SHAKESPEARE_BPE)
    return sum(len(ids) for ids in processor.encode(texts))


def read_shard(path) -> list[np.ndarray]:
    from array_record.python import array_record_module

    reader = array_record_module.ArrayRecordReader(os.fspath(path))
    try:
        return [np.frombuffer(r, np.uint16) for r in reader.read_all()]
    finally:
        reader.close()


@pytest.fixture(scope="module")
def bytes_shards(jsonl_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bytes") / "tok"
    manifest = pretokenize(jsonl_corpus[0], "bytes", str(out), shard_documents=15, **QUIET)
    return out, manifest


@pytest.fixture(scope="module")
def spm_shards(jsonl_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("spm") / "tok"
    manifest = pretokenize(jsonl_corpus[0], SPM, str(out), shard_documents=15, **QUIET)
    return out, manifest


@pytest.mark.parametrize("tokenizer", ["bytes", SPM])
def test_pretokenized_files_give_the_same_batches_as_on_the_fly(
    jsonl_corpus, bytes_shards, spm_shards, tokenizer
):
    source, texts = jsonl_corpus
    out, manifest = bytes_shards if tokenizer == "bytes" else spm_shards
    # Manifest counts, counted here another way.
    info = manifest["splits"]["all"]
    assert list(manifest["splits"]) == ["all"]
    assert info["documents"] == len(texts)
    assert info["text_bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    if tokenizer == "bytes":
        assert info["tokens"] == info["text_bytes"]
    else:
        assert info["tokens"] == sentencepiece_counts(texts)
    assert [s["documents"] for s in info["shards"]] == [15, 15, 10]
    shards = [read_shard(out / s["file"]) for s in info["shards"]]
    assert [len(s) for s in shards] == [15, 15, 10]
    assert sum(s["tokens"] for s in info["shards"]) == info["tokens"]
    assert sum(sum(r.size for r in s) for s in shards) == info["tokens"]
    assert sorted(os.listdir(out)) == sorted(
        ["manifest.json", *(s["file"] for s in info["shards"])]
    )
    assert json.loads((out / "manifest.json").read_text()) == manifest

    on_the_fly = make_config(3, source=source, tokenizer=tokenizer, seq_len=24, eval_holdout=0.2)
    from_shards = replace_data(on_the_fly, source=f"arrayrecord:{out}/*")
    assert_batches_equal(
        take(pipeline.make_train_iterator(from_shards), 6),
        take(pipeline.make_train_iterator(on_the_fly), 6),
    )
    assert_batches_equal(
        pipeline.make_eval_batches(from_shards, 50), pipeline.make_eval_batches(on_the_fly, 50)
    )


@pytest.fixture(scope="module")
def shakespeare_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shk") / "tok"
    manifest = pretokenize("shakespeare", SPM, str(out), shard_documents=500, **QUIET)
    return out, manifest


def test_pretokenized_shakespeare_matches_on_the_fly_and_its_counts(shakespeare_shards):
    out, manifest = shakespeare_shards
    builder = tfds.builder_from_directory(str(sources.EMBEDDED_VERSION_DIR))
    for split in ("train", "validation"):
        records = builder.as_data_source(split=split)
        info = manifest["splits"][split]
        assert info["documents"] == len(records)
        assert info["text_bytes"] == sum(len(records[i]["text"]) for i in range(len(records)))
        assert [s["documents"] for s in info["shards"]] == [
            min(500, len(records) - start) for start in range(0, len(records), 500)
        ]
        files = sorted(p for p in os.listdir(out) if p.startswith(split + "-"))
        assert files == [s["file"] for s in info["shards"]]
    assert manifest["tokenizer"]["file"] == "shakespeare_bpe2048.model"
    assert manifest["dtype"] == "uint16"
    # Tokens: the validation split counted with sentencepiece itself.
    validation = builder.as_data_source(split="validation")
    texts = [validation[i]["text"].decode("utf-8") for i in range(len(validation))]
    assert manifest["splits"]["validation"]["tokens"] == sentencepiece_counts(texts)

    on_the_fly = make_config(4, source="shakespeare", tokenizer=SPM, seq_len=64)
    from_shards = replace_data(on_the_fly, source=f"arrayrecord:{out}/*")
    assert_batches_equal(
        take(pipeline.make_train_iterator(from_shards), 3),
        take(pipeline.make_train_iterator(on_the_fly), 3),
    )
    assert_batches_equal(
        pipeline.make_eval_batches(from_shards, 2), pipeline.make_eval_batches(on_the_fly, 2)
    )


# --------------------------------------------------------------------------------------------------
# Shards that cannot be trusted
# --------------------------------------------------------------------------------------------------


def copy_of(shards, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(shards[0], target)
    return target


def assert_one_line_error(error_type, config, *fragments, steps: int = 0):
    with pytest.raises(error_type) as caught:
        iterator = pipeline.make_train_iterator(config)
        take(iterator, steps)
        pipeline.make_eval_batches(config, 100)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def shard_config(folder, **fields):
    fields.setdefault("tokenizer", "bytes")
    return make_config(3, source=f"arrayrecord:{folder}/*", seq_len=24, **fields)


@pytest.mark.parametrize("keep", [0, 1 / 3, 0.99])
def test_a_truncated_shard_is_refused_naming_it(bytes_shards, tmp_path, keep):
    folder = copy_of(bytes_shards, tmp_path)
    shard = folder / "all-00001-of-00003.arrayrecord"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: int(len(raw) * keep)])
    assert_one_line_error(DataError, shard_config(folder), str(shard), "pretokenize")


def test_a_shard_with_flipped_bytes_is_refused_naming_it(bytes_shards, tmp_path):
    folder = copy_of(bytes_shards, tmp_path)
    shard = folder / "all-00001-of-00003.arrayrecord"
    raw = bytearray(shard.read_bytes())
    for index in range(100, 400):  # inside the records
        raw[index] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert_one_line_error(DataError, shard_config(folder), str(shard), "corrupt", steps=200)


def test_a_manifest_whose_counts_disagree_is_refused(bytes_shards, tmp_path):
    folder = copy_of(bytes_shards, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"]["all"]["shards"][2]["documents"] = 11
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(
        DataError, shard_config(folder), "all-00002-of-00003.arrayrecord", "11", "pretokenize"
    )


def test_a_manifest_without_its_tokenizer_is_refused(bytes_shards, tmp_path):
    folder = copy_of(bytes_shards, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["tokenizer"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(DataError, shard_config(folder), "manifest.json", "not a pretokenize")


def test_a_missing_shard_or_manifest_is_refused(bytes_shards, tmp_path):
    folder = copy_of(bytes_shards, tmp_path)
    (folder / "all-00001-of-00003.arrayrecord").unlink()
    assert_one_line_error(DataError, shard_config(folder), "2 of its 3 shards")
    (folder / "manifest.json").unlink()
    assert_one_line_error(DataError, shard_config(folder), "manifest.json", "pretokenize")


def test_shards_from_another_tokenizer_are_refused(bytes_shards, tmp_path):
    folder = copy_of(bytes_shards, tmp_path)
    assert_one_line_error(
        DataError, shard_config(folder, tokenizer=SPM), "bytes", "data.tokenizer", "pretokenize"
    )


def test_shards_rewritten_in_the_same_process_are_read_anew(bytes_shards, spm_shards, tmp_path):
    folder = copy_of(bytes_shards, tmp_path)
    next(pipeline.make_train_iterator(shard_config(folder)))
    shutil.rmtree(folder)
    shutil.copytree(spm_shards[0], folder, copy_function=shutil.copy)  # as pretokenize --overwrite
    batch = next(pipeline.make_train_iterator(shard_config(folder, tokenizer=SPM)))
    assert batch["inputs"].max() >= 259  # subword ids, not bytes
    assert_one_line_error(DataError, shard_config(folder), "data.tokenizer")


# --------------------------------------------------------------------------------------------------
# pretokenize's own errors: nothing half-written
# --------------------------------------------------------------------------------------------------


def test_an_existing_output_folder_is_kept_unless_overwrite(jsonl_corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError) as caught:
        pretokenize(jsonl_corpus[0], "bytes", str(out), **QUIET)
    assert "--out" in str(caught.value) and "--overwrite" in str(caught.value)
    assert os.listdir(out) == ["keep.txt"]
    pretokenize(jsonl_corpus[0], "bytes", str(out), overwrite=True, **QUIET)
    assert "keep.txt" not in os.listdir(out) and "manifest.json" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no partial folder left


@pytest.mark.parametrize("out", ["gs://bucket/tok", "foo://x/tok"])
def test_a_cloud_output_is_refused_without_a_local_folder_named_after_it(
    jsonl_corpus, tmp_path, monkeypatch, out
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        pretokenize(jsonl_corpus[0], "bytes", out, **QUIET)
    assert "--out" in str(caught.value) and "\n" not in str(caught.value)
    assert os.listdir(tmp_path) == []


def test_a_failed_pretokenize_leaves_no_output(tmp_path):
    write_jsonl(tmp_path / "src" / "a.jsonl", [{"text": "fine"}, "{not json", {"text": "x"}])
    with pytest.raises(DataError, match=r"a.jsonl, line 2"):
        pretokenize(f"files:{tmp_path}/src/*.jsonl", "bytes", str(tmp_path / "out"), **QUIET)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_a_failure_in_the_workers_leaves_no_output(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": [[1, 2], [3]]}).save_to_disk(tmp_path / "ids")
    with pytest.raises(ConfigError, match="token ids already"):
        pretokenize(f"hf_disk:{tmp_path}/ids", "bytes", str(tmp_path / "out"), **QUIET)
    assert sorted(os.listdir(tmp_path)) == ["ids"]


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "umv2_jax.data.pretokenize", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_cli_end_to_end(jsonl_corpus, tmp_path):
    source, texts = jsonl_corpus
    out = tmp_path / "cli"
    result = run_cli(
        "--source", source, "--tokenizer", "bytes", "--out", str(out), "--workers", "1", "--quiet"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    total = sum(len(t.encode("utf-8")) for t in texts)
    assert f"all: {len(texts):,} documents, {total:,} tokens, {total:,} bytes of text" in (
        result.stdout
    )
    assert f"data.source=arrayrecord:{out}/*" in result.stdout
    assert json.loads((out / "manifest.json").read_text())["splits"]["all"]["documents"] == 40

    bad = run_cli("--source", f"files:{tmp_path}/none/*.jsonl", "--tokenizer", "bytes", "--out", str(tmp_path / "bad"), "--quiet")  # fmt: skip
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert "matches no file" in lines[0]
    assert not (tmp_path / "bad").exists()
