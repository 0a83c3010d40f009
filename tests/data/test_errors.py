"""Bad input: each a one-line DataError / ConfigError naming the file or key and the fix, with nothing
written. (Pretokenized shards and the pretokenize command: test_pretokenize.py; tfds sources:
test_data_pipeline.py.)"""

from __future__ import annotations

import logging
import os

import pytest
from etils import epath

from umv2_jax.config import DataConfig, load_config
from umv2_jax.data import pipeline, sources
from umv2_jax.errors import ConfigError, DataError, UserError

from .conftest import SPM, make_config, write_jsonl, write_txt


def one_line_error(error_type, call, *fragments) -> str:
    with pytest.raises(error_type) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def train(source, **fields):
    return lambda: pipeline.make_train_iterator(make_config(2, source=source, **fields))


def test_empty_glob(tmp_path):
    (tmp_path / "x.txt").write_text("not matched")
    one_line_error(DataError, train(f"files:{tmp_path}/*.jsonl"), f"{tmp_path}/*.jsonl", "pattern")
    one_line_error(DataError, train(f"files:{tmp_path}/nowhere/**/*.txt"), "matches no file")


def test_a_file_of_another_kind(tmp_path):
    (tmp_path / "a.csv").write_text("a,b")
    one_line_error(DataError, train(f"files:{tmp_path}/*"), "a.csv", ".txt, .jsonl or .jsonl.gz")


def test_only_empty_files(tmp_path):
    (tmp_path / "a.txt").write_text("")
    write_jsonl(tmp_path / "b.jsonl", [""])
    one_line_error(DataError, train(f"files:{tmp_path}/*"), "holds no document")


def test_a_single_document_cannot_be_split_into_train_and_eval(tmp_path):
    source = write_txt(tmp_path / "one", ["only one"])
    one_line_error(DataError, train(source), "1 document", "at least 2")


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"body": "no text key"}', "no key 'text' (keys: body)"),
        ('["a", "list"]', "not an object"),
        ('{"text": 12}', "'text' holds int"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_a_bad_jsonl_line_names_file_and_line(tmp_path, line, problem, gz):
    name = "a.jsonl.gz" if gz else "a.jsonl"
    path = write_jsonl(tmp_path / name, [{"text": "fine"}, "", {"text": "also fine"}, line], gz=gz)
    one_line_error(
        DataError,
        train(f"files:{tmp_path}/*.jsonl*"),
        f"{path}, line 4",
        problem,
        "data.skip_bad_records=true",
    )


def test_skip_bad_records_skips_and_counts_them(tmp_path, caplog):
    write_jsonl(
        tmp_path / "a.jsonl",
        [{"text": "one"}, "{not json", {"other": 1}, {"text": "two"}, "[1, 2]", {"text": "3"}],
    )
    source = f"files:{tmp_path}/*.jsonl"
    with caplog.at_level(logging.WARNING, logger="umv2_jax"):
        split = sources.open_all_splits(DataConfig(source=source, skip_bad_records=True), source)
    assert [split["all"][i] for i in range(len(split["all"]))] == ["one", "two", "3"]
    assert "skipped 3 bad jsonl line(s)" in caplog.text


def test_an_unreadable_file(tmp_path, monkeypatch):
    source = write_txt(tmp_path / "t", ["a", "b"])
    original = epath.Path.read_bytes

    def refuse(self):
        if self.name == "doc0001.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self)

    monkeypatch.setattr(type(epath.Path(tmp_path)), "read_bytes", refuse)
    one_line_error(DataError, train(source), "doc0001.txt", "PermissionError", "permissions")


def test_a_corrupt_gzip_file(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00 definitely not gzip")
    one_line_error(DataError, train(f"files:{tmp_path}/*.jsonl.gz"), "a.jsonl.gz", "gzip")


# --------------------------------------------------------------------------------------------------
# Mixtures
# --------------------------------------------------------------------------------------------------


def test_mixture_weights_negative_or_summing_to_zero(tmp_path):
    a = write_txt(tmp_path / "a", ["x", "y"])
    b = write_txt(tmp_path / "b", ["z", "w"])
    one_line_error(
        ConfigError,
        lambda: load_config(None, [f"data.mixture=[[{a}, -1], [{b}, 1]]"]),
        "data.mixture[0]",
        ">= 0",
    )
    one_line_error(
        ConfigError,
        lambda: load_config(None, [f"data.mixture=[[{a}, 0], [{b}, 0]]"]),
        "data.mixture",
        "sum to 0",
    )
    # The pipeline refuses them too when handed an unvalidated config.
    for weights in ((-1.0, 1.0), (0.0, 0.0)):
        mixture = ((a, weights[0]), (b, weights[1]))
        one_line_error(ConfigError, train("mixture", mixture=mixture), "data.mixture")


def test_a_mixture_entry_that_is_not_a_source():
    one_line_error(
        ConfigError,
        lambda: load_config(None, ["data.mixture=[[task:mqar, 1]]"]),
        "data.mixture[0]",
        "not a text source",
    )


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    ["files:foo://bucket/*.txt", "hf_disk:foo://bucket/ds", "arrayrecord:foo://b/*"],
)
def test_an_unknown_scheme(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    one_line_error(ConfigError, train(source), "foo://", "data.source", "local path")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "source",
    ["files:gs://bucket/corpus/*.jsonl", "hf_disk:gs://bucket/ds", "arrayrecord:gs://b/x/*"],
)
def test_gs_without_gcsfs(tmp_path, monkeypatch, source):
    pytest.importorskip("etils.epath")
    try:
        import gcsfs  # noqa: F401

        pytest.skip("gcsfs is installed")
    except ImportError:
        pass
    monkeypatch.chdir(tmp_path)
    one_line_error(ConfigError, train(source), "gcsfs", "data.source")
    assert os.listdir(tmp_path) == []  # no local folder named gs:


def test_gs_data_dir_without_gcsfs(tmp_path, monkeypatch):
    try:
        import gcsfs  # noqa: F401

        pytest.skip("gcsfs is installed")
    except ImportError:
        pass
    monkeypatch.chdir(tmp_path)
    one_line_error(
        ConfigError, train("tfds:some_dataset", data_dir="gs://bucket/tfds"), "data.data_dir"
    )
    assert os.listdir(tmp_path) == []


def test_hf_disk_path_that_does_not_exist(tmp_path):
    one_line_error(DataError, train(f"hf_disk:{tmp_path}/none"), "does not exist", "save_to_disk")


def test_hf_disk_path_that_is_not_a_dataset(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "junk.txt").write_text("x")
    one_line_error(DataError, train(f"hf_disk:{tmp_path}/ds"), "save_to_disk", "data.source")


def test_hf_disk_missing_column_or_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["a", "b"]})}).save_to_disk(
        tmp_path / "dd"
    )
    source = f"hf_disk:{tmp_path}/dd"
    one_line_error(DataError, train(source), "no column 'text'", "body", "data.text_key")
    one_line_error(
        DataError,
        lambda: pipeline.make_eval_batches(make_config(2, source=source, text_key="body"), 1),
        "no split 'validation'",
        "data.eval_split",
    )


# --------------------------------------------------------------------------------------------------
# The model's vocabulary
# --------------------------------------------------------------------------------------------------


def test_vocab_size_smaller_than_the_tokenizer():
    config = make_config(2, tokenizer=SPM, vocab_size=1000)
    one_line_error(ConfigError, lambda: pipeline.check_vocab(config), "model.vocab_size", "2048")
    assert pipeline.check_vocab(make_config(2, tokenizer=SPM, vocab_size=2048)) is None
    warning = pipeline.check_vocab(make_config(2, tokenizer=SPM, vocab_size=4096))
    assert warning is not None and "model.vocab_size=2048" in warning
    one_line_error(
        ConfigError,
        lambda: pipeline.check_vocab(make_config(2, vocab_size=258)),
        "model.vocab_size",
        "259",
    )


def test_errors_are_user_errors():
    assert issubclass(DataError, UserError) and issubclass(ConfigError, UserError)
