"""Data package: the embedded Shakespeare dataset and its builder, the shakespeare source end to end,
tfds:NAME sources (text and token ids) from a dataset built here, and their errors.

The batch contract on tiny files: test_batch_contract.py; other sources: test_sources.py; mixtures,
state, processes, pretokenizing, bits/byte, bad input: the other files here."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from umv2_jax.data import pipeline, shakespeare
from umv2_jax.data import tokenizer as byte_tokenizer
from umv2_jax.errors import DataError

from .conftest import (
    BOS,
    EOS,
    PAD,
    assert_batches_equal,
    make_config,
    reference_windows,
    replace_data,
    row_stream,
    split_documents,
    take,
)

SEQ_LEN = 32
BATCH = 4


def records_of(split: str, data_dir: str | None = None, name: str | None = None) -> list[dict]:
    if name is None:
        builder = tfds.builder_from_directory(str(pipeline.EMBEDDED_VERSION_DIR))
    else:
        builder = tfds.builder(name, data_dir=data_dir)
    source = builder.as_data_source(split=split)
    return [source[i] for i in range(len(source))]


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
    assert lines[0].startswith(
        "shakespeare (embedded): 1,178 documents train / 141 documents validation; "
        "tokenizer bytes (vocab 259); documents masked"
    ), lines[0]
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
# The shakespeare source end to end
# --------------------------------------------------------------------------------------------------


def test_shakespeare_train_batches_follow_the_contract():
    config = make_config(BATCH, seq_len=SEQ_LEN)
    batches = take(pipeline.make_train_iterator(config), 3)
    texts = {r["text"] for r in records_of("train")}
    for batch in batches:
        assert set(batch) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
        for key in batch:
            assert batch[key].shape == (BATCH, SEQ_LEN), key
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        assert 0 <= batch["inputs"].min() and batch["inputs"].max() < byte_tokenizer.VOCAB_SIZE
        assert (batch["inputs"] != PAD).all()  # training never pads
    for row in range(BATCH):
        documents, _ = split_documents(row_stream(batches, row), BOS, EOS)
        # Each row starts a document of the train split (records are chunks of whole works).
        first = bytes(documents[0])
        assert any(text.startswith(first) for text in texts)


def test_shakespeare_shuffle_is_seeded():
    first = take(pipeline.make_train_iterator(make_config(BATCH, shuffle_seed=7)), 2)
    again = take(pipeline.make_train_iterator(make_config(BATCH, shuffle_seed=7)), 2)
    other = take(pipeline.make_train_iterator(make_config(BATCH, shuffle_seed=8)), 2)
    assert_batches_equal(first, again)
    assert not np.array_equal(first[0]["inputs"], other[0]["inputs"])


def test_shakespeare_eval_batches_are_the_validation_split_in_order():
    config = make_config(BATCH, seq_len=SEQ_LEN)
    batches = pipeline.make_eval_batches(config, 3)
    documents = [list(r["text"]) for r in records_of("validation")[:3]]
    expected = reference_windows(documents, SEQ_LEN, BOS, EOS, PAD, pad_final=False)
    for index, batch in enumerate(batches):
        for row in range(BATCH):
            for key, value in expected[index * BATCH + row].items():
                np.testing.assert_array_equal(batch[key][row], value, err_msg=key)
    assert byte_tokenizer.decode(batches[0]["inputs"][0]).startswith("HAMLET, PRINCE OF DENMARK")


# --------------------------------------------------------------------------------------------------
# tfds:NAME with a dataset built here
# --------------------------------------------------------------------------------------------------

TINY_NAME = "umv2_test_tiny_text"


def tiny_ids(number: int) -> list[int]:
    return [(number * 7 + k) % 256 for k in range(number % 5 + 1)]


class Umv2TestTinyText(tfds.core.GeneratorBasedBuilder):
    """A tiny dataset: text in feature `body` (not `text`), token ids in `ids` (a Tensor) and `seq`
    (a Sequence)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "body": tfds.features.Text(),
                    "number": tfds.features.Scalar(np.int32),
                    "ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                    "seq": tfds.features.Sequence(np.int32),
                }
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
            ids = tiny_ids(number)
            yield (
                f"{number:05d}",
                {"body": body, "number": number, "ids": np.asarray(ids, np.int32), "seq": ids},
            )


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    Umv2TestTinyText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return str(data_dir)


def tiny_config(data_dir: str, **fields):
    fields.setdefault("seq_len", 16)
    fields.setdefault("text_key", "body")
    return make_config(BATCH, source=f"tfds:{TINY_NAME}", data_dir=data_dir, **fields)


def test_tfds_source_trains_and_evaluates_from_a_local_build(tiny_data_dir):
    config = tiny_config(tiny_data_dir)
    assert pipeline.describe_source(config).startswith(
        f"tfds:{TINY_NAME}: 60 documents train / 6 documents validation"
    )
    texts = [r["body"] for r in records_of("train", tiny_data_dir, TINY_NAME)]
    batches = take(pipeline.make_train_iterator(config), 8)
    for row in range(BATCH):
        documents, complete = split_documents(row_stream(batches, row), BOS, EOS)
        for document in documents if complete else documents[:-1]:
            assert bytes(document) in texts

    validation = [list(r["body"]) for r in records_of("validation", tiny_data_dir, TINY_NAME)]
    expected = reference_windows(validation, 16, BOS, EOS, PAD, pad_final=True)
    evals = pipeline.make_eval_batches(config, 100)
    assert len(evals) == -(-len(expected) // BATCH)  # ran out before 100 batches
    rows = [{key: batch[key][row] for key in batch} for batch in evals for row in range(BATCH)]
    for row, window in zip(rows, expected):
        for key, value in window.items():
            np.testing.assert_array_equal(row[key], value, err_msg=key)
    for row in rows[len(expected) :]:
        assert (row["inputs"] == PAD).all() and (row["loss_mask"] == 0).all()


def test_tfds_source_is_named_by_data_config_only(tiny_data_dir):
    # Same dataset through the `name:version` form.
    config = tiny_config(tiny_data_dir)
    versioned = replace_data(config, source=f"tfds:{TINY_NAME}:1.0.0")
    assert_batches_equal(
        take(pipeline.make_train_iterator(config), 2),
        take(pipeline.make_train_iterator(versioned), 2),
    )


@pytest.mark.parametrize("feature", ["ids", "seq"])
def test_tfds_token_ids_arrive_unchanged_between_bos_and_eos(tiny_data_dir, feature):
    config = tiny_config(tiny_data_dir, text_key=feature, seq_len=8)
    evals = pipeline.make_eval_batches(config, 100)
    # Eval rows follow each other in the stream: window k's targets are stream[kS + 1 : kS + S + 1].
    targets = np.concatenate([b["targets"][r] for b in evals for r in range(BATCH)])
    stream = np.concatenate([evals[0]["inputs"][0][:1], targets[targets != PAD]])
    documents, complete = split_documents(stream, BOS, EOS)
    assert complete
    assert documents == [tiny_ids(n) for n in range(1000, 1006)]
    train = {tuple(tiny_ids(n)) for n in range(60)}
    batches = take(pipeline.make_train_iterator(config), 6)
    for row in range(BATCH):
        found, complete = split_documents(row_stream(batches, row), BOS, EOS)
        for document in found if complete else found[:-1]:
            assert tuple(document) in train


def test_tfds_token_ids_outside_the_vocabulary_are_refused(tiny_data_dir):
    config = tiny_config(tiny_data_dir, text_key="number")  # numbers up to 1005 as one id each
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=259))
    with pytest.raises(DataError) as caught:
        pipeline.make_eval_batches(config, 10)
    assert "outside [0, 259)" in str(caught.value) and "data.tokenizer" in str(caught.value)


def test_a_one_record_split_still_trains(tiny_data_dir):
    config = tiny_config(tiny_data_dir, train_split="tiny")
    batches = take(pipeline.make_train_iterator(config), 3)
    assert all(b["inputs"].shape == (BATCH, 16) for b in batches)


# --------------------------------------------------------------------------------------------------
# tfds errors
# --------------------------------------------------------------------------------------------------


def assert_data_error(config, *fragments: str) -> None:
    with pytest.raises(DataError) as caught:
        pipeline.make_train_iterator(config)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_error_wrong_data_dir(tmp_path):
    assert_data_error(tiny_config(str(tmp_path / "nope")), "data.data_dir", "does not exist")


def test_error_unknown_dataset(tiny_data_dir):
    config = replace_data(tiny_config(tiny_data_dir), source="tfds:no_such_dataset_umv2")
    assert_data_error(config, "'no_such_dataset_umv2' is not found", "data.source")


def test_error_dataset_not_prepared_in_data_dir(tmp_path):
    assert_data_error(tiny_config(str(tmp_path)), "not prepared", "data.data_dir")


def test_error_missing_split(tiny_data_dir):
    assert_data_error(
        tiny_config(tiny_data_dir, train_split="test"), "no split 'test'", "data.train_split"
    )
    with pytest.raises(DataError, match="data.eval_split"):
        pipeline.make_eval_batches(make_config(BATCH, eval_split="test"), 1)


def test_error_missing_text_key(tiny_data_dir):
    config = tiny_config(tiny_data_dir, text_key="text")
    assert_data_error(config, "no feature 'text'", "body, number", "data.text_key")
