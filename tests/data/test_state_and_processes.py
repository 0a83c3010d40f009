"""Per-process shards of the global batch (1, 2, 3 processes) and the iterator state: JSON, exact
resume, a state saved by 2 processes restored on 1 and on 3, states that do not fit refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from umv2_jax.config import DataConfig
from umv2_jax.data import pipeline, sources
from umv2_jax.errors import DataError
from umv2_jax.training import checkpoint

from .conftest import (
    BOS,
    EOS,
    assert_batches_equal,
    make_config,
    row_stream,
    split_documents,
    take,
    write_txt,
)

BATCH = 6
STEPS = 4


@pytest.fixture
def corpus(tmp_path):
    texts = [f"d{i:03d} " + "ab" * (i % 7) for i in range(60)]
    return write_txt(tmp_path / "c", texts)


def config_of(source, **fields):
    fields.setdefault("seq_len", 16)
    return make_config(BATCH, source=source, **fields)


def documents_of_rows(batches, rows) -> set[str]:
    """The documents seen whole in the rows' streams."""
    found = set()
    for row in rows:
        documents, complete = split_documents(row_stream(batches, row), BOS, EOS)
        found |= {bytes(d).decode() for d in (documents if complete else documents[:-1])}
    return found


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_processes_split_the_global_batch_and_read_only_their_rows(corpus, processes, read_log):
    config = config_of(corpus)
    whole = take(pipeline.make_train_iterator(config), STEPS + 3)
    split = sources.open_split(DataConfig(source=corpus), corpus, "train")
    texts = [split[i] for i in range(len(split))]
    read_log.clear()
    per_process = []
    reads = []
    for index in range(processes):
        per_process.append(take(pipeline.make_train_iterator(config, index, processes), STEPS))
        reads.append({texts[i] for _, _, i in read_log})
        read_log.clear()
    share = BATCH // processes
    for step in range(STEPS):
        for key in whole[step]:
            assert per_process[0][step][key].shape[0] == share
            joined = np.concatenate([batches[step][key] for batches in per_process])
            np.testing.assert_array_equal(joined, whole[step][key], err_msg=key)
    for index in range(processes):
        own = range(index * share, (index + 1) * share)
        others = [row for row in range(BATCH) if row not in own]
        # Every document of its rows, perhaps the next one of a row (read ahead), no other.
        assert documents_of_rows(whole[:STEPS], own) <= reads[index]
        assert len(reads[index]) <= len(documents_of_rows(whole[:STEPS], own)) + 2 * share
        assert reads[index] <= documents_of_rows(whole, own)
        assert not reads[index] & documents_of_rows(whole, others)


def test_eval_batches_are_split_among_processes(corpus):
    config = config_of(corpus, eval_holdout=0.3)
    whole = pipeline.make_eval_batches(config, 3)
    for processes in (2, 3):
        parts = [pipeline.make_eval_batches(config, 3, p, processes) for p in range(processes)]
        for step, batch in enumerate(whole):
            for key in batch:
                joined = np.concatenate([part[step][key] for part in parts])
                np.testing.assert_array_equal(joined, batch[key], err_msg=key)


def test_batch_size_must_divide_among_processes(corpus):
    from umv2_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="train.batch_size"):
        pipeline.make_train_iterator(make_config(5, source=corpus), 0, 2)


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("consumed", [0, 1, 2, 9, 25])
def test_state_is_json_and_resumes_exactly(corpus, consumed):
    config = config_of(corpus)
    iterator = pipeline.make_train_iterator(config)
    take(iterator, consumed)
    state = iterator.get_state()
    state = json.loads(json.dumps(state))  # plain JSON types only
    expected = take(iterator, 4)
    restored = pipeline.make_train_iterator(config)
    take(restored, 2)
    restored.set_state(state)
    assert_batches_equal(take(restored, 4), expected)


def merged_state(states: list[dict]) -> dict:
    """What a checkpoint written by len(states) processes gives a run with another count."""
    saved = {"format": checkpoint.DATA_FORMAT, "processes": json.loads(json.dumps(states))}
    return checkpoint._own_data_state(saved, "step_dir")


@pytest.mark.parametrize(("consumed", "mixed"), [(1, False), (3, False), (2, True)])
def test_a_state_saved_by_two_processes_restores_on_one_and_on_three(
    corpus, tmp_path, consumed, mixed
):
    config = config_of(corpus)
    if mixed:
        other = write_txt(tmp_path / "other", [f"other {i}" for i in range(9)])
        config = config_of("mixture", mixture=((corpus, 2.0), (other, 1.0)))
    whole = pipeline.make_train_iterator(config)
    take(whole, consumed)
    expected = take(whole, 3)
    saving = [pipeline.make_train_iterator(config, p, 2) for p in range(2)]
    for iterator in saving:
        take(iterator, consumed)
    state = merged_state([iterator.get_state() for iterator in saving])

    one = pipeline.make_train_iterator(config)
    one.set_state(state)
    assert_batches_equal(take(one, 3), expected)

    three = [pipeline.make_train_iterator(config, p, 3) for p in range(3)]
    for iterator in three:
        iterator.set_state(state)
    batches = [take(iterator, 3) for iterator in three]
    for step in range(3):
        for key in expected[step]:
            joined = np.concatenate([b[step][key] for b in batches])
            np.testing.assert_array_equal(joined, expected[step][key], err_msg=key)

    # And back: three processes' states restore on two.
    state = merged_state([iterator.get_state() for iterator in three])
    two = [pipeline.make_train_iterator(config, p, 2) for p in range(2)]
    for iterator in two:
        iterator.set_state(state)
    reference = take(whole, 2)
    for step in range(2):
        joined = np.concatenate([take(iterator, 1)[0]["inputs"] for iterator in two])
        np.testing.assert_array_equal(joined, reference[step]["inputs"])


def assert_refused(config, state, *fragments):
    with pytest.raises(DataError) as caught:
        pipeline.make_train_iterator(config).set_state(state)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_a_state_from_another_seq_len_is_refused(corpus):
    iterator = pipeline.make_train_iterator(config_of(corpus, seq_len=12))
    next(iterator)
    assert_refused(config_of(corpus), iterator.get_state(), "seq_len=12", "data.seq_len=16")


@pytest.mark.parametrize("saved_batch", [4, 12])
def test_a_state_from_another_batch_size_is_refused(corpus, saved_batch):
    iterator = pipeline.make_train_iterator(make_config(saved_batch, source=corpus, seq_len=16))
    next(iterator)
    assert_refused(config_of(corpus), iterator.get_state(), "batch", "train.batch_size")


@pytest.mark.parametrize(
    "state",
    [
        {"next_index": 12, "shuffle_buffer": [1, 2]},  # before per-row packing
        {"format": "rows-v0", "rows": {}},
        "not a dict",
    ],
)
def test_a_state_of_an_old_format_is_refused(corpus, state):
    assert_refused(config_of(corpus), state, "older", "--no-resume")
