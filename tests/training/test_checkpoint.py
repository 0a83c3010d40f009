"""Checkpoints through the loop: a corrupt latest step falls back to the one before, all corrupt is
an error, and a checkpoint of another config is refused before anything is written."""

import pytest

from umv2_jax.errors import CheckpointError
from umv2_jax.training import loop

QUIET = {"progress": False, "echo": lambda line: None}


def test_corrupt_latest_checkpoint_falls_back_and_says_so(tmp_path, tiny_config, caplog):
    config = tiny_config()
    loop.train(config, str(tmp_path), stop_after=6, **QUIET)
    latest = tmp_path / "checkpoints" / "6" / "state"
    files = [p for p in latest.rglob("*") if p.is_file() and p.stat().st_size > 100]
    for path in files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with caplog.at_level("WARNING", logger="umv2_jax"):
        result = loop.train(config, str(tmp_path), **QUIET)
    assert "checkpoint at step 6" in caplog.text and "unreadable" in caplog.text
    assert "resumed from step 4" in caplog.text
    assert result.step == 8 and len(result.losses) == 4


def test_every_checkpoint_corrupt_is_an_error(tmp_path, tiny_config):
    config = tiny_config("checkpoint.keep=1")
    loop.train(config, str(tmp_path), stop_after=2, **QUIET)
    for path in (tmp_path / "checkpoints").rglob("*"):
        if path.is_file() and "state" in path.parts and path.stat().st_size > 100:
            path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable"):
        loop.train(config, str(tmp_path), **QUIET)


def test_incompatible_checkpoint_is_refused_without_writing(tmp_path, tiny_config):
    loop.train(tiny_config(), str(tmp_path), stop_after=2, **QUIET)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    with pytest.raises(
        CheckpointError, match=r"different config \(model.d_model: saved 32, now 48\)"
    ):
        loop.train(tiny_config("model.d_model=48"), str(tmp_path), **QUIET)
    assert sorted((str(p), p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before
