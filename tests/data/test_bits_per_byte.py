"""target_bytes of evaluation batches: the UTF-8 bytes each counted target covers, so that
bits/byte = Σ loss / (ln 2 · Σ target_bytes) is tokenizer-independent."""

from __future__ import annotations

import numpy as np
import pytest

from umv2_jax.data import pipeline

from .conftest import SPM, held_out, make_config, write_jsonl, write_txt

TEXTS = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer\nThe slings and arrows of outrageous fortune,",
    "Ünïcödé — 東京 and emoji 🎭 are bytes too",
    "",
    "  leading spaces and trailing   ",
    "Line one\n\nLine three\n",
    "ALL CAPS WORDS 12345 67890",
    "Or to take arms against a sea of troubles",
]


@pytest.fixture
def jsonl_source(tmp_path):
    write_jsonl(tmp_path / "c" / "a.jsonl", [{"text": t} for t in TEXTS])
    return f"files:{tmp_path}/c/*.jsonl"


def test_byte_tokenizer_target_bytes_count_each_byte_target_once(jsonl_source):
    config = make_config(2, source=jsonl_source, seq_len=16, eval_holdout=0.5)
    batches = pipeline.make_eval_batches(config, 100)
    for batch in batches:
        expected = batch["loss_mask"] * (batch["targets"] < 256)
        np.testing.assert_array_equal(batch["target_bytes"], expected)
        assert batch["target_bytes"].dtype == np.float32
    total = sum(b["target_bytes"].sum() for b in batches)
    assert total == sum(len(TEXTS[i].encode("utf-8")) for i in held_out(len(TEXTS), 0.5))


def test_byte_tokenizer_target_bytes_on_shakespeare():
    config = make_config(4, seq_len=64)
    for batch in pipeline.make_eval_batches(config, 2):
        expected = batch["loss_mask"] * (batch["targets"] < 256)
        np.testing.assert_array_equal(batch["target_bytes"], expected)


@pytest.mark.parametrize("seq_len", [5, 32])
def test_sentencepiece_target_bytes_sum_to_the_text_bytes(jsonl_source, seq_len):
    config = make_config(3, source=jsonl_source, tokenizer=SPM, seq_len=seq_len, eval_holdout=0.5)
    batches = pipeline.make_eval_batches(config, 1000)
    held = [TEXTS[i] for i in held_out(len(TEXTS), 0.5)]
    assert sum(float(b["target_bytes"].sum()) for b in batches) == sum(
        len(t.encode("utf-8")) for t in held
    )
    for batch in batches:
        assert (batch["target_bytes"][batch["loss_mask"] == 0] == 0).all()
        special = np.isin(batch["targets"], [1, 2, 3])  # BOS, EOS, PAD of the shipped model
        assert (batch["target_bytes"][special] == 0).all()


def test_sentencepiece_target_bytes_over_txt_files(tmp_path):
    texts = ["First file.\nSecond line — ü\n", "Second file, short.", "third\tfile\n\n"] * 2
    source = write_txt(tmp_path / "t", texts)
    config = make_config(1, source=source, tokenizer=SPM, seq_len=8, eval_holdout=0.5)
    batches = pipeline.make_eval_batches(config, 1000)
    held = [texts[i] for i in held_out(len(texts), 0.5)]
    assert sum(float(b["target_bytes"].sum()) for b in batches) == sum(
        len(t.encode("utf-8")) for t in held
    )
