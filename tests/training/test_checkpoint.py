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


def test_block_layout_is_part_of_a_runs_identity_and_remat_is_not(tmp_path, tiny_config):
    """A loop checkpoint is not resumed by a scanned model (its tree differs); remat may change."""
    import json

    from umv2_jax.training.checkpoint import check_compatible

    config = tiny_config()  # 2 blocks: `scan_layers: auto` is the loop
    loop.train(config, str(tmp_path), stop_after=2, **QUIET)
    with pytest.raises(CheckpointError, match="model.scan_layers: saved False, now True"):
        check_compatible(str(tmp_path), tiny_config("model.scan_layers=true"))
    assert check_compatible(str(tmp_path), tiny_config("model.scan_layers=false"))
    assert check_compatible(str(tmp_path), tiny_config("model.remat=full"))
    # A run saved before the layout fields existed was a loop, and still resumes as one.
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    del saved["model"]["scan_layers"], saved["model"]["remat"]
    path.write_text(json.dumps(saved))
    assert check_compatible(str(tmp_path), config)
    result = loop.train(tiny_config("model.remat=full"), str(tmp_path), stop_after=4, **QUIET)
    assert result.step == 4
