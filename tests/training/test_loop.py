"""The training loop end to end on the embedded corpus: learning, exact resume, signals, divergence.

Checkpoint recovery: test_checkpoint.py; the step: test_step.py; generation: tests/test_generate.py.
"""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umv2_jax.generate import load_run
from umv2_jax.models.transformer import segment_layout
from umv2_jax.training import loop
from umv2_jax.training.checkpoint import Checkpointer

from .conftest import SPARSE

QUIET = {"progress": False, "echo": lambda line: None}


def _params(workdir):
    return load_run(workdir)[2]


def test_loss_decreases(tmp_path, tiny_config):
    config = tiny_config(
        "train.steps=60", "train.eval_every=60", "checkpoint.every=60", "train.learning_rate=1e-2"
    )
    result = loop.train(config, str(tmp_path), **QUIET)
    first, last = result.losses[0], float(np.mean(result.losses[-5:]))
    # Byte-level start: ln(384) ≈ 5.95 nats. 60 steps reach the unigram level (≈ 3.3) and below.
    assert first > 5.0
    assert last < 3.4, result.losses
    assert result.eval["eval_loss"] < 3.5
    assert result.eval["eval_bpb"] == pytest.approx(result.eval["eval_loss"] / np.log(2), rel=0.1)


@pytest.mark.parametrize("sparse", ["dense", "umv2", "moe", "umv2_scanned_remat"])
def test_resume_is_exact(tmp_path, tiny_config, sparse):
    if sparse == "umv2_scanned_remat":
        extra = [*SPARSE["umv2"], "model.scan_layers=true", "model.remat=full"]
    else:
        extra = SPARSE[sparse]
    config = tiny_config("train.micro_batches=2", *extra)
    straight = loop.train(config, str(tmp_path / "straight"), **QUIET)
    first = loop.train(config, str(tmp_path / "split"), stop_after=4, **QUIET)
    second = loop.train(config, str(tmp_path / "split"), **QUIET)
    assert first.step == 4 and second.step == 8
    assert first.losses + second.losses == straight.losses
    for a, b in zip(
        jax.tree.leaves(_params(tmp_path / "straight")),
        jax.tree.leaves(_params(tmp_path / "split")),
    ):
        np.testing.assert_array_equal(a, b)


def test_default_config_trains_and_its_loss_decreases(tmp_path):
    from umv2_jax.config import load_config
    from umv2_jax.training.cli import default_config_path

    config = load_config(
        default_config_path(),
        ["train.steps=12", "train.eval_every=12", "train.eval_batches=1", "checkpoint.every=12"],
    )
    assert config.model.sparse == "ultramem_v2"
    result = loop.train(config, str(tmp_path), **QUIET)
    # From ln(384) ≈ 5.95 nats; 12 warm-up-free steps at lr 3e-3 reach ≈ 3.2 on this corpus.
    assert result.losses[0] > 5.5
    assert float(np.mean(result.losses[-3:])) < result.losses[0] - 1.5, result.losses
    diagnostics = [key for key in result.eval if key.endswith("rows_hit_fraction_window")]
    assert len(diagnostics) == 4 and all(0 < result.eval[key] <= 1 for key in diagnostics)


def test_finished_run_resumes_instead_of_restarting(tmp_path, tiny_config):
    config = tiny_config()
    loop.train(config, str(tmp_path), **QUIET)
    again = loop.train(config, str(tmp_path), **QUIET)
    assert again.losses == [] and again.step == 8


def test_sigterm_finishes_the_step_saves_and_returns(tmp_path, tiny_config, monkeypatch):
    make_iterator = loop.pipeline.make_train_iterator

    class SignalAfterThree:
        def __init__(self, inner):
            self.inner, self.count = inner, 0

        def __next__(self):
            self.count += 1
            if self.count == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return next(self.inner)

        def get_state(self):
            return self.inner.get_state()

        def set_state(self, state):
            self.inner.set_state(state)

    monkeypatch.setattr(
        loop.pipeline,
        "make_train_iterator",
        lambda *a, **k: SignalAfterThree(make_iterator(*a, **k)),
    )
    result = loop.train(tiny_config("checkpoint.every=100"), str(tmp_path), **QUIET)
    assert result.preempted and result.step == 3
    assert Checkpointer(str(tmp_path), tiny_config().checkpoint).steps() == [3]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_config, monkeypatch
):
    real = loop.make_train_step

    def poisoned(*args, **kwargs):
        step_fn = real(*args, **kwargs)

        def wrapped(state, rest, batch):
            new_state, metrics = step_fn(state, rest, batch)
            metrics["loss"] = jnp.where(state["step"] >= 4, jnp.nan, metrics["loss"])
            return new_state, metrics

        return wrapped

    monkeypatch.setattr(loop, "make_train_step", poisoned)
    with pytest.raises(loop.TrainingDiverged, match="at step 5.*last good checkpoint is step 4"):
        loop.train(tiny_config(), str(tmp_path), **QUIET)
    assert Checkpointer(str(tmp_path), tiny_config().checkpoint).steps() == [2, 4]


@pytest.mark.parametrize("sparse", ["umv2", "moe"])
def test_scanned_model_trains_like_the_loop_model(tmp_path, tiny_config, sparse):
    """Through the whole loop (optimizer groups, shardings, checkpoints, eval): the same run.

    The first step's loss is the same number (same init, same data); later steps differ by float
    rounding only, since scan and loop sum the blocks' gradients in different orders and Adam's
    normalized first updates amplify last-bit differences of tiny gradients (the model-level
    gradients agree within 2e-5: tests/models/test_scan.py).
    """
    loop_config = tiny_config(*SPARSE[sparse])
    scan_config = tiny_config(*SPARSE[sparse], "model.scan_layers=true")
    assert segment_layout(loop_config.model) == ((0,), (1,))
    assert segment_layout(scan_config.model) == ((0, 1),)
    loop_run = loop.train(loop_config, str(tmp_path / "loop"), **QUIET)
    scan_run = loop.train(scan_config, str(tmp_path / "scan"), **QUIET)
    np.testing.assert_allclose(scan_run.losses[0], loop_run.losses[0], rtol=1e-6)
    np.testing.assert_allclose(scan_run.losses, loop_run.losses, rtol=1e-3)
    np.testing.assert_allclose(scan_run.eval["eval_loss"], loop_run.eval["eval_loss"], rtol=1e-3)


def test_an_attention_path_that_cannot_mask_documents_says_so_at_start_up():
    from umv2_jax.config import load_config
    from umv2_jax.training.loop import document_mask_note

    assert document_mask_note(load_config(None)) is None  # auto masks on every platform
    note = document_mask_note(load_config(None, ["model.attention=cudnn"]))
    assert "cannot mask packed documents" in note and "chunked" in note
    off = load_config(None, ["model.attention=cudnn", "data.document_mask=false"])
    assert document_mask_note(off) is None
    task = load_config(None, ["model.attention=cudnn", "data.source=task:mqar", "data.seq_len=256"])
    assert document_mask_note(task) is None  # task rows are not packed documents
