"""data.mixture: per-document source draws that follow the weights, determinism, exact resume, a
zero-weight source never read, and the interleaved eval split."""

from __future__ import annotations

import json

import numpy as np
import pytest

from umv2_jax.data import pipeline

from .conftest import (
    BOS,
    EOS,
    PAD,
    assert_batches_equal,
    make_config,
    row_stream,
    split_documents,
    take,
    write_txt,
)

LENGTH = 6  # every document has 6 characters: a source's draws never change how many fit a row


@pytest.fixture
def three_sources(tmp_path):
    """Sources A, B, C of 20 documents each; each text starts with its source's letter."""
    return {
        letter: write_txt(
            tmp_path / letter, [f"{letter}{i:02d}" + "." * (LENGTH - 3) for i in range(20)]
        )
        for letter in "ABC"
    }


def mixture_config(sources, weights, batch_size=8, seq_len=63, **fields):
    mixture = [[sources[letter], weight] for letter, weight in weights.items()]
    return make_config(batch_size, source="mixture", mixture=mixture, seq_len=seq_len, **fields)


def source_letters(batches, rows):
    """The source letter of every document that starts in the rows' streams."""
    letters = []
    for row in range(rows):
        documents, _ = split_documents(row_stream(batches, row), BOS, EOS)
        letters += [chr(d[0]) for d in documents if d]
    return letters


def test_document_fractions_follow_the_weights(three_sources, read_log):
    weights = {"A": 3.0, "B": 1.0, "C": 0.0}
    config = mixture_config(three_sources, weights)
    batches = take(pipeline.make_train_iterator(config), 30)
    letters = source_letters(batches, 8)
    count = len(letters)
    assert count > 1500
    # Binomial: each document is A with probability 3/4, independently; 4 standard deviations.
    p = 0.75
    assert abs(letters.count("A") - p * count) <= 4 * np.sqrt(count * p * (1 - p))
    assert letters.count("C") == 0
    # The zero-weight source is never read (train and eval).
    pipeline.make_eval_batches(config, 50)
    assert {source for source, _, _ in read_log} == {three_sources["A"], three_sources["B"]}


def test_three_way_fractions(three_sources):
    weights = {"A": 0.5, "B": 0.3, "C": 0.2}
    batches = take(pipeline.make_train_iterator(mixture_config(three_sources, weights)), 30)
    letters = source_letters(batches, 8)
    count = len(letters)
    for letter, weight in weights.items():
        p = weight
        assert abs(letters.count(letter) - p * count) <= 4 * np.sqrt(count * p * (1 - p)), letter


def test_each_source_is_read_in_its_own_epoch_order(three_sources):
    # Within a row, a source's documents come in that source's shuffled order: across the rows
    # of the global batch, the first documents each row takes from A are distinct documents.
    config = mixture_config(three_sources, {"A": 1.0, "B": 1.0}, batch_size=4, seq_len=31)
    batches = take(pipeline.make_train_iterator(config), 40)
    documents = []
    for row in range(4):
        row_documents, _ = split_documents(row_stream(batches, row), BOS, EOS)
        documents.append([bytes(d).decode() for d in row_documents if len(d) == LENGTH])
    a_docs = [d for row in documents for d in row if d.startswith("A")]
    assert len(a_docs) >= 19  # A has 19 train documents (one held out)
    firsts = [[d for d in row if d.startswith("A")][:4] for row in documents]
    flat = [d for row in firsts for d in row]
    assert len(set(flat)) == len(flat)


def test_mixture_is_deterministic_and_seeded(three_sources):
    config = mixture_config(three_sources, {"A": 2.0, "B": 1.0}, batch_size=4, seq_len=32)
    first = take(pipeline.make_train_iterator(config), 5)
    assert_batches_equal(first, take(pipeline.make_train_iterator(config), 5))
    other = mixture_config(
        three_sources, {"A": 2.0, "B": 1.0}, batch_size=4, seq_len=32, shuffle_seed=1
    )
    second = take(pipeline.make_train_iterator(other), 5)
    assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, second))


@pytest.mark.parametrize("consumed", [0, 1, 2, 11])
def test_mixture_resumes_exactly(three_sources, consumed):
    config = mixture_config(three_sources, {"A": 2.0, "B": 1.0, "C": 0.5}, 4, seq_len=20)
    iterator = pipeline.make_train_iterator(config)
    take(iterator, consumed)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = take(iterator, 5)
    restored = pipeline.make_train_iterator(config)
    take(restored, 3)  # elsewhere: set_state overrides it
    restored.set_state(state)
    assert_batches_equal(take(restored, 5), expected)


def test_eval_interleaves_every_eval_document_of_each_source_once_in_order(three_sources):
    config = mixture_config(
        three_sources, {"A": 1.0, "B": 1.0, "C": 0.0}, 2, seq_len=16, eval_holdout=0.2
    )
    batches = pipeline.make_eval_batches(config, 100)
    assert_batches_equal(batches, pipeline.make_eval_batches(config, 100))
    # Eval rows follow each other in the stream, overlapping by one token.
    inputs = np.concatenate([b["inputs"][r] for b in batches for r in (0, 1)])
    inputs = inputs[inputs != PAD]
    documents = [bytes(d).decode() for d in split_documents(inputs, BOS, EOS)[0]]
    # Each source holds out documents 4, 9, 14, 19 (floor((i + 1)·0.2) > floor(i·0.2)).
    held = [f"{i:02d}..." for i in (4, 9, 14, 19)]
    assert sorted(documents) == sorted([f"A{h}" for h in held] + [f"B{h}" for h in held])
    for letter in "AB":
        assert [d for d in documents if d.startswith(letter)] == [f"{letter}{h}" for h in held]
    assert documents[:4] != [f"A{h}" for h in held]  # interleaved, not one source after another
