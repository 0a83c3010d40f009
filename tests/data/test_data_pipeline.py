"""Data package: embedded Shakespeare dataset, grain pipelines, tfds:NAME, errors (the tokenizer:
test_tokenizer.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from umv2_jax.config import Config, DataConfig, TrainConfig
from umv2_jax.data import pipeline, shakespeare, tokenizer
from umv2_jax.errors import ConfigError, DataError

SEQ_LEN = 32
BATCH = 4


def make_config(**data_fields) -> Config:
    batch_size = data_fields.pop("batch_size", BATCH)
    data_fields.setdefault("seq_len", SEQ_LEN)
    return Config(data=DataConfig(**data_fields), train=TrainConfig(batch_size=batch_size))


def take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def records_of(split: str, data_dir: str | None = None, name: str | None = None) -> list[dict]:
    if name is None:
        builder = tfds.builder_from_directory(str(pipeline.EMBEDDED_VERSION_DIR))
    else:
        builder = tfds.builder(name, data_dir=data_dir)
    source = builder.as_data_source(split=split)
    return [source[i] for i in range(len(source))]


def reference_stream(texts: list[bytes]) -> np.ndarray:
    """The packed stream written out by hand: BOS before every document, bytes as ids."""
    stream = []
    for text in texts:
        stream.append(tokenizer.BOS)
        stream.extend(text)
    return np.array(stream, np.int32)


# --------------------------------------------------------------------------------------------------
# Builder helpers
# --------------------------------------------------------------------------------------------------


def test_strip_gutenberg_boilerplate_keeps_only_the_work():
    raw = (
        "The Project Gutenberg EBook of Hamlet\r\nLicense blah\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n"
        "HAMLET\r\n\r\nBer.\r\nWho's there?\r\n\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nMore license\r\n"
    )
    assert shakespeare.strip_gutenberg_boilerplate(raw) == "HAMLET\n\nBer.\nWho's there?\n"
    old_style = "header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*\nBody.\nEnd of the Project Gutenberg Etext of X\n"
    assert shakespeare.strip_gutenberg_boilerplate(old_style) == "Body.\n"
    assert shakespeare.strip_gutenberg_boilerplate("No markers.\n") == "No markers.\n"


def test_split_into_chunks_keeps_paragraphs_whole_and_in_order():
    paragraphs = [f"Speaker{i}.\n" + "word " * (3 + 7 * i % 20) for i in range(30)]
    paragraphs = [p.rstrip() for p in paragraphs]
    text = "\n\n \n".join(paragraphs)  # a blank line holding a space still separates paragraphs
    chunks = shakespeare.split_into_chunks(text, 200)
    assert all(len(chunk) <= 200 for chunk in chunks)
    assert [p for chunk in chunks for p in chunk.split("\n\n")] == paragraphs
    # A paragraph longer than a chunk is cut on line boundaries.
    long = "\n".join(f"line {i:03d} of a long speech" for i in range(40))
    pieces = shakespeare.split_into_chunks(long, 200)
    assert len(pieces) > 1 and all(len(piece) <= 200 for piece in pieces)
    assert "\n".join(pieces) == long


# --------------------------------------------------------------------------------------------------
# The embedded dataset
# --------------------------------------------------------------------------------------------------


def test_embedded_dataset_reads_without_tensorflow_or_network():
    # A fresh interpreter where `import tensorflow` fails and sockets cannot connect.
    code = textwrap.dedent(
        """
        import importlib.abc, importlib.util, socket, sys

        class HideTensorFlow(importlib.abc.MetaPathFinder):  # as if it were not installed
            def __init__(self, finder):
                self.finder = finder
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "tensorflow" or not hasattr(self.finder, "find_spec"):
                    return None
                return self.finder.find_spec(name, path, target)

        sys.meta_path[:] = [HideTensorFlow(finder) for finder in sys.meta_path]
        def refuse(*args, **kwargs):
            raise OSError("network disabled in this test")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from umv2_jax.config import Config, DataConfig, TrainConfig
        from umv2_jax.data import describe_source, make_eval_batches, make_train_iterator
        config = Config(data=DataConfig(seq_len=64), train=TrainConfig(batch_size=2))
        batch = next(make_train_iterator(config))
        evals = make_eval_batches(config, 2)
        print(describe_source(config))
        print(batch["inputs"].shape, len(evals))
        print(sorted(name for name in sys.modules if name.split(".")[0] == "tensorflow"))
        print(importlib.util.find_spec("tensorflow"))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("shakespeare (embedded): 4.57 MB train (1178 records) / 0.55 MB")
    assert lines[1] == "(2, 64) 2"
    assert lines[2] == "[]"
    assert lines[3] == "None"  # the blocker worked


def test_embedded_dataset_has_both_splits_with_whole_works_held_out():
    train = records_of("train")
    validation = records_of("validation")
    assert (len(train), len(validation)) == (1178, 141)
    train_titles = {r["title"].decode() for r in train}
    validation_titles = {r["title"].decode() for r in validation}
    assert validation_titles == {"Hamlet", "King Henry V", "The Tempest", "Twelfth Night"}
    assert len(train_titles) == 38 and not train_titles & validation_titles
    train_text = b"\n".join(r["text"] for r in train)
    validation_text = b"\n".join(r["text"] for r in validation)
    for line in (
        b"To be, or not to be",  # Hamlet
        b"Once more unto the breach",  # Henry V
        b"We are such stuff",  # The Tempest
        b"If music be the food of love",  # Twelfth Night
    ):
        assert line in validation_text and line not in train_text
    assert b"Now is the winter of our discontent" in train_text  # Richard III
    assert b"Shall I compare thee to a summer's day" in train_text  # Sonnet 18
    # Folio near-duplicates are skipped: the Macbeth witches' line appears exactly once.
    assert train_text.count(b"Fair is foul, and foul is fair") == 1
    assert len(train_text) > 4_400_000 and len(validation_text) > 500_000
    assert max(len(r["text"]) for r in train) <= shakespeare.CHUNK_CHARS


def test_pipeline_and_builder_agree_on_the_embedded_location():
    assert pipeline.EMBEDDED_VERSION_DIR.name == shakespeare.DATASET_VERSION
    assert (pipeline.EMBEDDED_VERSION_DIR / "dataset_info.json").is_file()


# --------------------------------------------------------------------------------------------------
# Training batches
# --------------------------------------------------------------------------------------------------


def test_train_batches_have_the_contract_shapes_and_shifted_targets():
    batch = next(pipeline.make_train_iterator(make_config()))
    assert set(batch) == {"inputs", "targets", "loss_mask"}
    for key, dtype in (("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32)):
        assert batch[key].shape == (BATCH, SEQ_LEN) and batch[key].dtype == dtype, key
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    assert batch["inputs"].max() < tokenizer.VOCAB_SIZE and batch["inputs"].min() >= 0
    np.testing.assert_array_equal(batch["loss_mask"], 1.0)  # training never pads


def test_one_training_epoch_reads_every_train_record_once_in_shuffled_order():
    texts = [r["text"] for r in records_of("train")]
    stream_length = sum(len(t) + 1 for t in texts)
    config = make_config(seq_len=512, batch_size=32, shuffle_seed=3)
    windows = iter(pipeline.make_train_windows(config))
    rows = []
    while len(rows) * 512 < stream_length + 20_000:  # one epoch and part of the next
        window = next(windows)
        if rows:  # consecutive windows overlap by one token: the stride is seq_len
            assert window[0] == rows[-1][-1]
        rows.append(window)
    stream = np.concatenate([row[:-1] for row in rows])
    starts = np.flatnonzero(stream == tokenizer.BOS)
    documents = [
        stream[begin + 1 : end].astype(np.uint8).tobytes()
        for begin, end in zip(starts[: len(texts)], starts[1 : len(texts) + 1])
    ]
    assert starts[0] == 0
    assert sorted(documents) == sorted(texts)  # each record exactly once in the first epoch
    assert documents != texts  # ... and not in stored order
    # The second epoch is shuffled differently from the first.
    second = stream[starts[len(texts)] + 1 : starts[len(texts) + 1]].astype(np.uint8).tobytes()
    assert second in texts and second != documents[0]


def test_batches_are_the_packed_windows_shuffled_within_a_buffer():
    config = make_config(batch_size=8)
    buffer = pipeline.TRAIN_WINDOW_SHUFFLE
    windows = iter(pipeline.make_train_windows(config))
    stream_windows = [next(windows) for _ in range(buffer)]
    batches = take(pipeline.make_train_iterator(config), buffer // 8)
    rows = [
        np.concatenate([inputs, targets[-1:]])
        for batch in batches
        for inputs, targets in zip(batch["inputs"], batch["targets"])
    ]
    as_set = lambda arrays: sorted(array.tobytes() for array in arrays)
    assert as_set(rows) == as_set(stream_windows)  # the same windows ...
    in_order = sum(np.array_equal(a, b) for a, b in zip(rows, stream_windows))
    assert in_order < buffer // 10  # ... in another order
    # Rows of one batch are rarely neighbours in the stream.
    neighbours = sum(
        (batch["targets"][:-1, -1] == batch["inputs"][1:, 0]).sum() for batch in batches
    )
    assert neighbours < 0.2 * len(rows)


def test_shuffle_is_seeded():
    first = take(pipeline.make_train_iterator(make_config(shuffle_seed=7)), 3)
    again = take(pipeline.make_train_iterator(make_config(shuffle_seed=7)), 3)
    other = take(pipeline.make_train_iterator(make_config(shuffle_seed=8)), 3)
    assert_batches_equal(first, again)
    assert not np.array_equal(first[0]["inputs"], other[0]["inputs"])


@pytest.mark.parametrize("consumed", [0, 1, 9, 64, 70])  # 64 × 8 = one shuffle buffer
def test_iterator_state_round_trip_resumes_exactly(consumed):
    config = make_config(seq_len=200, batch_size=8)
    iterator = pipeline.make_train_iterator(config)
    take(iterator, consumed)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = take(iterator, 6)
    restored = pipeline.make_train_iterator(config)
    take(restored, 3)  # a different position, overwritten by set_state
    restored.set_state(state)
    assert_batches_equal(take(restored, 6), expected)


def test_state_from_another_seq_len_is_refused():
    state = pipeline.make_train_iterator(make_config(seq_len=16)).get_state()
    with pytest.raises(DataError, match="seq_len=16 but data.seq_len=32"):
        pipeline.make_train_iterator(make_config(seq_len=32)).set_state(state)


def test_per_host_batches_split_the_same_global_batch():
    config = make_config(batch_size=6)
    whole = take(pipeline.make_train_iterator(config), 3)
    hosts = [take(pipeline.make_train_iterator(config, p, 3), 3) for p in range(3)]
    for step in range(3):
        for key in ("inputs", "targets", "loss_mask"):
            assert hosts[0][step][key].shape[0] == 2
            joined = np.concatenate([host[step][key] for host in hosts])
            np.testing.assert_array_equal(joined, whole[step][key])
    evals = [pipeline.make_eval_batches(config, 2, p, 2) for p in range(2)]
    whole_eval = pipeline.make_eval_batches(config, 2)
    for step in range(2):
        joined = np.concatenate([evals[0][step]["inputs"], evals[1][step]["inputs"]])
        np.testing.assert_array_equal(joined, whole_eval[step]["inputs"])


def test_batch_size_must_divide_among_processes():
    with pytest.raises(ConfigError, match="train.batch_size"):
        pipeline.make_train_iterator(make_config(batch_size=5), 0, 2)


# --------------------------------------------------------------------------------------------------
# Evaluation batches
# --------------------------------------------------------------------------------------------------


def test_eval_batches_are_the_validation_stream_in_order_and_repeatable():
    config = make_config()
    batches = pipeline.make_eval_batches(config, 3)
    assert_batches_equal(batches, pipeline.make_eval_batches(config, 3))
    stream = reference_stream([r["text"] for r in records_of("validation")])
    for index, batch in enumerate(batches):
        for row in range(BATCH):
            start = (index * BATCH + row) * SEQ_LEN
            np.testing.assert_array_equal(batch["inputs"][row], stream[start : start + SEQ_LEN])
            np.testing.assert_array_equal(
                batch["targets"][row], stream[start + 1 : start + SEQ_LEN + 1]
            )
    assert tokenizer.decode(batches[0]["inputs"][0]).startswith("HAMLET, PRINCE OF DENMARK")


# --------------------------------------------------------------------------------------------------
# The packer on its own
# --------------------------------------------------------------------------------------------------


def packed(documents: list[list[int]], window_length: int, pad_final: bool):
    source = grain.MapDataset.source([np.array(d, np.int32) for d in documents])
    return pipeline.PackedWindowsIterDataset(
        source.to_iter_dataset(), window_length, pad_final=pad_final
    )


def test_packer_cuts_overlapping_windows_and_pads_the_end():
    documents = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]  # stream 1..11
    assert [w.tolist() for w in packed(documents, 4, pad_final=False)] == [
        [1, 2, 3, 4],
        [4, 5, 6, 7],
        [7, 8, 9, 10],
    ]
    padded = [w.tolist() for w in packed(documents, 4, pad_final=True)]
    assert padded[-1] == [10, 11, tokenizer.PAD, tokenizer.PAD]
    assert len(padded) == 4


def test_packer_state_restores_at_every_position():
    rng = np.random.default_rng(0)
    documents = [list(rng.integers(0, 256, size=n)) for n in (1, 7, 2, 13, 1, 5, 9, 3)]
    dataset = packed(documents, 5, pad_final=True)
    expected = [w.tolist() for w in dataset]
    for position in range(len(expected) + 1):
        iterator = iter(dataset)
        take(iterator, position)
        state = json.loads(json.dumps(iterator.get_state()))
        fresh = iter(dataset)
        fresh.set_state(state)
        assert [w.tolist() for w in fresh] == expected[position:], position


def shuffled(count: int, buffer_size: int, seed: int = 0):
    source = grain.MapDataset.range(count)
    return pipeline.ShuffleBufferIterDataset(source.to_iter_dataset(), buffer_size, seed)


def test_shuffle_buffer_permutes_within_each_buffer():
    values = list(shuffled(23, 5))
    assert len(values) == 23
    for start in range(0, 23, 5):  # buffer k holds exactly the elements 5k..5k+4
        assert sorted(values[start : start + 5]) == list(range(start, min(start + 5, 23)))
    assert values != list(range(23))
    assert values == list(shuffled(23, 5)) and values != list(shuffled(23, 5, seed=1))


def test_shuffle_buffer_state_restores_at_every_position():
    dataset = shuffled(23, 5)
    expected = list(dataset)
    for position in range(len(expected) + 1):
        iterator = iter(dataset)
        take(iterator, position)
        state = json.loads(json.dumps(iterator.get_state()))
        fresh = iter(dataset)
        fresh.set_state(state)
        assert list(fresh) == expected[position:], position


# --------------------------------------------------------------------------------------------------
# tfds:NAME with a dataset built here
# --------------------------------------------------------------------------------------------------

TINY_NAME = "umv2_test_tiny_text"


class Umv2TestTinyText(tfds.core.GeneratorBasedBuilder):
    """A tiny text dataset; the text lives in feature `body` (not `text`)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"body": tfds.features.Text(), "number": tfds.features.Scalar(np.int32)}
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(range(60)),
            "validation": self._generate_examples(range(1000, 1006)),
            "tiny": self._generate_examples(range(1)),
        }

    def _generate_examples(self, numbers):
        for number in numbers:
            body = f"Record {number}: " + " ".join(f"w{(number * 7 + k) % 97}" for k in range(12))
            yield f"{number:05d}", {"body": body, "number": number}


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    Umv2TestTinyText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return str(data_dir)


def tiny_config(data_dir: str, **fields) -> Config:
    fields.setdefault("seq_len", 16)
    return make_config(source=f"tfds:{TINY_NAME}", data_dir=data_dir, text_key="body", **fields)


def test_tfds_source_trains_and_evaluates_from_a_local_build(tiny_data_dir):
    config = tiny_config(tiny_data_dir)
    assert pipeline.describe_source(config).startswith(f"tfds:{TINY_NAME}: ")
    texts = [r["body"] for r in records_of("train", tiny_data_dir, TINY_NAME)]
    batch = next(pipeline.make_train_iterator(config))
    assert batch["inputs"].shape == (BATCH, 16)
    for row in batch["inputs"]:
        # Between BOS tokens a row is a contiguous piece of one record.
        pieces = np.split(row, np.flatnonzero(row == tokenizer.BOS))
        for piece in pieces:
            piece = piece[piece != tokenizer.BOS].astype(np.uint8).tobytes()
            assert any(piece in text for text in texts), piece

    validation = [r["body"] for r in records_of("validation", tiny_data_dir, TINY_NAME)]
    stream = reference_stream(validation)
    windows = -(-(len(stream) - 1) // 16)  # the last one padded
    evals = pipeline.make_eval_batches(config, 100)
    assert len(evals) == -(-windows // BATCH)  # ran out before 100 batches
    inputs = np.concatenate([b["inputs"] for b in evals]).reshape(-1)
    mask = np.concatenate([b["loss_mask"] for b in evals]).reshape(-1)
    np.testing.assert_array_equal(inputs[: len(stream) - 1], stream[:-1])
    assert (inputs[len(stream) :] == tokenizer.PAD).all()
    assert mask.sum() == len(stream) - 1  # every real target counted once, padding never


def test_tfds_source_is_named_by_data_config_only(tiny_data_dir):
    # Same dataset through the `name:version` form.
    config = tiny_config(tiny_data_dir)
    versioned = dataclasses.replace(
        config, data=dataclasses.replace(config.data, source=f"tfds:{TINY_NAME}:1.0.0")
    )
    assert_batches_equal(
        take(pipeline.make_train_iterator(config), 2),
        take(pipeline.make_train_iterator(versioned), 2),
    )


# --------------------------------------------------------------------------------------------------
# User errors
# --------------------------------------------------------------------------------------------------


def assert_data_error(config: Config, *fragments: str) -> None:
    with pytest.raises(DataError) as caught:
        pipeline.make_train_iterator(config)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_error_wrong_data_dir(tmp_path):
    assert_data_error(tiny_config(str(tmp_path / "nope")), "data.data_dir", "does not exist")


def test_error_unknown_dataset(tiny_data_dir):
    config = tiny_config(tiny_data_dir)
    config = dataclasses.replace(
        config, data=dataclasses.replace(config.data, source="tfds:no_such_dataset_umv2")
    )
    assert_data_error(config, "'no_such_dataset_umv2' is not found", "data.source")


def test_error_dataset_not_prepared_in_data_dir(tmp_path):
    assert_data_error(tiny_config(str(tmp_path)), "not prepared", "data.data_dir")


def test_error_missing_split(tiny_data_dir):
    assert_data_error(
        tiny_config(tiny_data_dir, train_split="test"), "no split 'test'", "data.train_split"
    )
    with pytest.raises(DataError, match="data.eval_split"):
        pipeline.make_eval_batches(make_config(eval_split="test"), 1)


def test_error_missing_text_key(tiny_data_dir):
    config = tiny_config(tiny_data_dir)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, text_key="text"))
    assert_data_error(config, "no feature 'text'", "body, number", "data.text_key")


def test_error_text_key_that_is_not_text(tiny_data_dir):
    config = tiny_config(tiny_data_dir)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, text_key="number"))
    assert_data_error(config, "not text", "data.text_key")


def test_error_split_too_small_for_one_batch(tiny_data_dir):
    assert_data_error(
        tiny_config(tiny_data_dir, train_split="tiny"),
        "fewer than one batch needs (4×16+1 = 65)",
        "train.batch_size",
    )
