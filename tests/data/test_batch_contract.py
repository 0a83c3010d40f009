"""The batch contract on tiny files, checked against packing written out by hand (conftest's
reference_windows): [BOS, ids…, EOS] per document, windows of S+1 with stride S, segments,
positions, loss masks; per-row document order; evaluation padding."""

from __future__ import annotations

import numpy as np
import pytest

from umv2_jax.data import pipeline

from .conftest import (
    BOS,
    EOS,
    PAD,
    held_out,
    make_config,
    reference_windows,
    replace_data,
    row_stream,
    split_documents,
    take,
    text_of,
    write_txt,
)

SEQ = 8
TEXTS = [
    "a",
    "hello world",
    "Zz",
    "the quick brown fox jumps",
    "é ü 東京",  # multi-byte UTF-8
    "x\ny\n",
    "0123456789abcdefghij",
    "to be or not",
    "mm",
    "last one here",
    "k",
    "twelve chars",
]
HOLDOUT = 0.2  # documents 4 and 9 are held out


@pytest.fixture
def corpus(tmp_path):
    source = write_txt(tmp_path / "corpus", TEXTS)
    held = held_out(len(TEXTS), HOLDOUT)
    assert held == [4, 9]
    train = [t for i, t in enumerate(TEXTS) if i not in held]
    evals = [TEXTS[i] for i in held]
    return source, train, evals


def ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def test_train_batches_have_the_contract_keys_shapes_and_dtypes(corpus):
    source, _, _ = corpus
    batch = next(pipeline.make_train_iterator(make_config(3, source=source, seq_len=SEQ)))
    dtypes = {
        "inputs": np.int32,
        "targets": np.int32,
        "loss_mask": np.float32,
        "segment_ids": np.int32,
        "positions": np.int32,
    }
    assert set(batch) == set(dtypes)
    for key, dtype in dtypes.items():
        assert batch[key].shape == (3, SEQ) and batch[key].dtype == dtype, key
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_each_training_row_packs_its_documents_by_hand(corpus, rows):
    source, train, _ = corpus
    config = make_config(rows, source=source, seq_len=SEQ, eval_holdout=HOLDOUT, shuffle_seed=5)
    batches = take(pipeline.make_train_iterator(config), 45)
    per_row = []
    for row in range(rows):
        stream = row_stream(batches, row)
        documents, last_complete = split_documents(stream, BOS, EOS)
        complete = documents if last_complete else documents[:-1]
        assert all(text_of(d) in train for d in complete)
        per_row.append([text_of(d) for d in complete])
        expected = reference_windows(complete, SEQ, BOS, EOS, PAD, pad_final=False)
        assert len(expected) >= len(batches) - 4
        for step, window in enumerate(expected):
            for key, value in window.items():
                np.testing.assert_array_equal(
                    batches[step][key][row], value, err_msg=f"{key} row {row} step {step}"
                )
    # Row r reads the documents at positions r, r + B, r + 2B, … of the document sequence, whose
    # epochs are permutations of the train split (different ones).
    length = min(len(documents) for documents in per_row)
    sequence = [per_row[j % rows][j // rows] for j in range(length * rows)]
    count = len(train)
    assert len(sequence) >= 2 * count
    epochs = [sequence[e * count : (e + 1) * count] for e in range(2)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(train)
    assert epochs[0] != epochs[1]
    assert epochs[0] != train  # shuffled


def test_segments_positions_and_loss_mask_on_a_hand_written_row(tmp_path):
    # Documents "ab" and "c": stream [B a b E B c E B a b E …] (one row, both documents each epoch).
    source = write_txt(tmp_path / "c", ["ab", "c", "held"])
    config = make_config(1, source=source, seq_len=5, eval_holdout=0.34)  # "held" (index 2) out
    assert held_out(3, 0.34) == [2]
    batch = next(pipeline.make_train_iterator(config))
    first = [int(t) for t in batch["inputs"][0]] + [int(batch["targets"][0][-1])]
    a, b, c = ord("a"), ord("b"), ord("c")
    assert first in ([BOS, a, b, EOS, BOS, c], [BOS, c, EOS, BOS, a, b])
    if first[1] == a:
        segments, positions, mask = [1, 1, 1, 1, 2], [0, 1, 2, 3, 0], [1, 1, 1, 0, 1]
    else:
        segments, positions, mask = [1, 1, 1, 2, 2], [0, 1, 2, 0, 1], [1, 1, 0, 1, 1]
    assert batch["segment_ids"][0].tolist() == segments
    assert batch["positions"][0].tolist() == positions
    assert batch["loss_mask"][0].tolist() == mask


def test_without_document_mask_there_are_no_segments_and_every_target_counts(corpus):
    source, _, _ = corpus
    config = make_config(2, source=source, seq_len=SEQ, document_mask=True)
    masked = take(pipeline.make_train_iterator(config), 6)
    plain_config = replace_data(config, document_mask=False)
    plain = take(pipeline.make_train_iterator(plain_config), 6)
    for with_mask, without in zip(masked, plain):
        assert set(without) == {"inputs", "targets", "loss_mask"}
        np.testing.assert_array_equal(without["inputs"], with_mask["inputs"])
        np.testing.assert_array_equal(without["targets"], with_mask["targets"])
        np.testing.assert_array_equal(without["loss_mask"], 1.0)
    assert any((b["loss_mask"] == 0).any() for b in masked)  # EOS→BOS masked when masking
    evals = pipeline.make_eval_batches(plain_config, 4)
    for batch in evals:
        assert "segment_ids" not in batch and "positions" not in batch
        np.testing.assert_array_equal(batch["loss_mask"], batch["targets"] != PAD)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_eval_batches_are_the_eval_split_packed_in_order_with_padding(corpus, batch_size):
    source, _, evals = corpus
    config = make_config(batch_size, source=source, seq_len=SEQ, eval_holdout=HOLDOUT)
    batches = pipeline.make_eval_batches(config, 100)
    expected = reference_windows([ids(t) for t in evals], SEQ, BOS, EOS, PAD, pad_final=True)
    assert len(batches) == -(-len(expected) // batch_size)  # the split ran out before 100
    pad_row = {
        "inputs": np.full(SEQ, PAD),
        "targets": np.full(SEQ, PAD),
        "loss_mask": np.zeros(SEQ),
        "segment_ids": np.zeros(SEQ),
        "positions": np.zeros(SEQ),
    }
    expected += [pad_row] * (len(batches) * batch_size - len(expected))
    for index, batch in enumerate(batches):
        assert set(batch) == {*pad_row, "target_bytes"}
        assert batch["inputs"].shape == (batch_size, SEQ)
        for row in range(batch_size):
            for key, value in expected[index * batch_size + row].items():
                np.testing.assert_array_equal(batch[key][row], value, err_msg=f"{key} {index}")
    # Every eval token is a counted target exactly once; PAD never.
    mask = np.concatenate([b["loss_mask"].ravel() for b in batches])
    assert mask.sum() == sum(len(ids(t)) + 2 for t in evals) - len(evals)
    # The same list on every call; fewer batches asked, a prefix of it.
    again = pipeline.make_eval_batches(config, 2)
    for first, second in zip(batches, again):
        for key in first:
            np.testing.assert_array_equal(first[key], second[key])
    assert len(again) == min(2, len(batches))
