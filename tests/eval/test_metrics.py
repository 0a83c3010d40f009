"""Task metrics on hand-made predictions whose scores are known by counting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from umv2_jax.eval import metrics


def _batch():
    # Two rows, answers at (0,1) (0,2) (0,5) and (1,3) (1,4); slices pairs and length.
    mask = np.zeros((2, 6), np.float32)
    mask[0, [1, 2, 5]] = 1
    mask[1, [3, 4]] = 1
    targets = np.zeros((2, 6), np.int32)
    targets[0, [1, 2, 5]] = [10, 11, 12]
    targets[1, [3, 4]] = [20, 21]
    pairs = np.where(mask > 0, np.array([[4], [8]]), -1).astype(np.int32)
    length = np.where(mask > 0, 64, -1).astype(np.int32)
    return {"targets": targets, "loss_mask": mask, "slice/pairs": pairs, "slice/length": length}


def test_exact_match_counts_per_slice_and_grid():
    batch = _batch()
    predictions = batch["targets"].copy()
    predictions[0, 2] = 99  # one wrong answer in row 0
    predictions[1, 0] = 7  # a wrong token outside the answers does not count
    counts = metrics.exact_match(predictions, batch)
    assert counts["all"] == (4, 5)
    assert counts["pairs=4"] == (2, 3) and counts["pairs=8"] == (2, 2)
    assert counts["length=64"] == (4, 5)
    grid = metrics.exact_match(predictions, batch, by=("pairs", "length"))
    assert grid == {"all": (4, 5), "pairs=4,length=64": (2, 3), "pairs=8,length=64": (2, 2)}
    merged = metrics.merge_counts(counts, counts)
    assert merged["pairs=4"] == (4, 6)
    assert metrics.accuracy(merged)["all"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="no slice"):
        metrics.exact_match(predictions, batch, by=("depth",))


def test_sequence_exact_match_needs_every_token():
    batch = _batch()  # runs: row 0 → [1, 2] and [5]; row 1 → [3, 4]
    predictions = batch["targets"].copy()
    predictions[0, 2] = 99
    counts = metrics.sequence_exact_match(predictions, batch)
    assert counts["all"] == (2, 3)
    assert counts["pairs=4"] == (1, 2) and counts["pairs=8"] == (1, 1)
    grouped = dict(batch, **{"aux/answer": np.where(batch["loss_mask"] > 0, 0, -1)})
    assert metrics.sequence_exact_match(predictions, grouped)["all"] == (1, 2)  # one per row


def test_stale_answer_rate_and_icl_iwl():
    targets = np.array([[5, 6, 7, 8]])
    batch = {
        "targets": targets,
        "loss_mask": np.ones((1, 4), np.float32),
        "aux/stale_value": np.array([[-1, 3, 4, 9]]),
        "slice/kind": np.array([[0, 0, 1, 1]]),
    }
    predictions = np.array([[5, 3, 7, 1]])  # answer 2 is the stale value, answer 4 is neither
    assert metrics.stale_answer_rate(predictions, batch) == (1, 3)
    assert metrics.icl_iwl_accuracy(predictions, batch) == {"icl": (1, 2), "iwl": (1, 2)}


def test_answer_positions_gather_only_labelled_logits():
    batch = _batch()
    positions, valid = metrics.answer_positions(batch)
    assert positions.tolist() == [[1, 2, 5], [3, 4, 0]]
    assert valid.tolist() == [[True, True, True], [True, True, False]]
    logits = np.random.default_rng(0).standard_normal((2, 6, 5))
    gathered = metrics.gather_positions(logits, positions)
    assert np.array_equal(gathered[1, 1], logits[1, 4])
    import jax.numpy as jnp

    assert np.allclose(
        np.asarray(metrics.gather_positions(jnp.asarray(logits), positions)), gathered
    )
    with pytest.raises(ValueError, match="max_answers"):
        metrics.answer_positions(batch, max_answers=2)


def test_cross_entropy_bits_and_knowledge_bits():
    logits = np.log(np.array([[0.5, 0.25, 0.25, 1e-30], [0.25, 0.25, 0.25, 0.25]]))
    bits = metrics.cross_entropy_bits(logits, np.array([0, 2]))
    assert np.allclose(bits, [1.0, 2.0])
    # restricted to tokens [1, 3): renormalized over two tokens → 1 bit each
    assert np.allclose(metrics.cross_entropy_bits(logits, np.array([1, 2]), (1, 3)), [1.0, 1.0])
    # 512 objects: 9 bits per fact at most; a fact worse than uniform counts 0, not negative
    assert metrics.knowledge_bits(np.array([0.0, 8.0, 12.0])) == pytest.approx(9 + 1 + 0)
    assert metrics.knowledge_bits(np.array([1.0]), num_objects=4) == pytest.approx(1.0)


def test_normalized_mse_and_least_squares_references():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 11, 5))
    w = rng.standard_normal((200, 5))
    y = np.einsum("bkd,bd->bk", x, w)
    ols = metrics.ols_reference(x, y)
    assert np.allclose(ols[:, 0], 0)
    # noiseless: OLS is exact once 5 points pin w down, and not before
    assert np.allclose(ols[:, 6:], y[:, 6:], atol=1e-8)
    assert np.abs(ols[:, 3] - y[:, 3]).mean() > 0.1
    nmse = metrics.normalized_mse(ols, y, y_variance=5.0)
    assert nmse[0] == pytest.approx((y[:, 0] ** 2).mean() / 5.0)
    assert nmse[-1] < 1e-12
    # ridge with a huge λ predicts ~0; with a small λ it matches OLS when k > d
    assert np.abs(metrics.ridge_reference(x, y, 1e9)).max() < 1e-3
    assert np.allclose(metrics.ridge_reference(x, y, 1e-9)[:, 7:], y[:, 7:], atol=1e-4)
    # one point, hand-computed: w = x·y / (x·x + λ)
    x1, y1 = np.array([[[1.0, 0.0], [2.0, 3.0]]]), np.array([[2.0, 0.0]])
    assert metrics.ridge_reference(x1, y1, 1.0)[0, 1] == pytest.approx(2.0 * 2.0 / 2.0)
    assert math.isnan(metrics.accuracy({"x": (0, 0)})["x"])
