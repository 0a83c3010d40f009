"""Sparse memory finetuning's row choice: TF-IDF against the base run's usage, and its inputs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umv2_jax.errors import ConfigError
from umv2_jax.eval import injection
from umv2_jax.training import finetune

from .conftest import SPARSE


def test_tfidf_scores_equal_the_formula_computed_by_hand():
    base = np.array([[8, 0, 2, 1]])  # of 9 base positions
    new = np.array([[3, 2, 0, 1]])  # 6 hits in all on the new data
    # tf = [3/6, 2/6, 0, 1/6]; idf = log(10 / (c + 1)) = [log 10/9, log 10, log 10/3, log 5]
    want = [0.5 * math.log(10 / 9), (2 / 6) * math.log(10), 0.0, (1 / 6) * math.log(5)]
    np.testing.assert_allclose(finetune.tfidf_scores(base, 9, new, 4)[0], want, rtol=1e-12)
    # 0.0527, 0.7675, 0, 0.2682: row 1 (new, never in base) first, then row 3, then row 0.
    mask = finetune.select_rows(base, 9, new, 4, count=2)
    np.testing.assert_array_equal(mask, [[False, True, False, True]])
    mask = finetune.select_rows(base, 9, new, 4, count=4)  # row 2: the new data never reads it
    np.testing.assert_array_equal(mask, [[True, True, False, True]])


def test_ties_go_to_more_new_hits_then_the_lower_row_and_layers_choose_separately():
    base = np.array([[0, 0, 0], [1, 1, 0]])
    new = np.array([[1, 1, 2], [0, 5, 5]])
    mask = finetune.select_rows(base, 1, new, 3, count=2)
    # layer 0: row 2 scores highest, rows 0 and 1 tie → row 0; layer 1: row 2 (base never) first.
    np.testing.assert_array_equal(mask, [[True, False, True], [False, True, True]])
    mask = finetune.select_rows(base, 1, new, 3, count=1)
    np.testing.assert_array_equal(mask, [[False, False, True], [False, False, True]])


def test_a_row_every_base_position_reads_scores_zero():
    scores = finetune.tfidf_scores(np.array([[5, 0]]), 5, np.array([[4, 1]]), 5)
    assert scores[0, 0] == pytest.approx(math.log(6 / 6)) == 0.0
    assert scores[0, 1] > 0


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros((1, 2)), 1, np.zeros((1, 3)), 1, 1), r"\[L, rows\]"),
        ((np.zeros((1, 2)), 0, np.zeros((1, 2)), 1, 1), "token totals"),
        ((np.full((1, 2), 3), 2, np.zeros((1, 2)), 1, 1), r"\[0, tokens\]"),
        ((np.zeros((1, 2)), 1, np.zeros((1, 2)), 1, 0), "count"),
    ],
)
def test_bad_inputs_raise(args, match):
    with pytest.raises(ValueError, match=match):
        finetune.select_rows(*args)


def test_the_injection_experiment_selects_rows_through_the_same_function():
    # The comparison runner's `rows` mode calls finetune.select_rows on finetune.count_row_usage.
    import inspect

    source = inspect.getsource(injection._specific_rows)
    assert "finetune.select_rows" in source and "finetune.count_row_usage" in source
    assert not hasattr(injection, "select_specific_rows")


def _rows_config(tiny_config, *extra):
    return tiny_config(*SPARSE["umv2"], "train.trainable=rows", *extra)


def test_rows_without_usage_counts_is_one_line_naming_the_keys(tiny_config):
    config = _rows_config(tiny_config)
    with pytest.raises(ConfigError) as error:
        finetune.row_mask_from_config(config)
    message = str(error.value)
    assert "\n" not in message
    assert "train.rows_usage_base" in message and "train.rows_usage_new" in message


def test_row_mask_from_usage_files(tiny_config, tmp_path):
    rows = 12**2
    rng = np.random.default_rng(0)
    base = rng.integers(0, 5, size=(2, rows))
    new = rng.integers(0, 5, size=(2, rows))
    finetune.write_row_usage(tmp_path / "base.npz", base, 10, "base", 8)
    finetune.write_row_usage(tmp_path / "new.npz", new, 10, "base", 8)
    config = _rows_config(
        tiny_config,
        f"train.rows_usage_base={tmp_path / 'base.npz'}",
        f"train.rows_usage_new={tmp_path / 'new.npz'}",
        "train.rows_count=7",
    )
    mask = finetune.row_mask_from_config(config)
    np.testing.assert_array_equal(mask, finetune.select_rows(base, 10, new, 10, 7))
    assert mask.sum(axis=1).tolist() == [7, 7]
    # Counts of another model's tables: one line naming the key and both shapes.
    finetune.write_row_usage(tmp_path / "other.npz", base[:, :100], 10, "other", 8)
    bad = _rows_config(
        tiny_config,
        f"train.rows_usage_base={tmp_path / 'other.npz'}",
        f"train.rows_usage_new={tmp_path / 'new.npz'}",
    )
    with pytest.raises(ConfigError, match=r"train.rows_usage_base.*\(2, 100\).*\[2, 144\]"):
        finetune.row_mask_from_config(bad)
    missing = _rows_config(
        tiny_config,
        f"train.rows_usage_base={tmp_path / 'absent.npz'}",
        f"train.rows_usage_new={tmp_path / 'new.npz'}",
    )
    with pytest.raises(ConfigError, match="train.rows_usage_base.*does not exist"):
        finetune.row_mask_from_config(missing)


def test_count_row_usage_counts_positions_and_agrees_with_the_models_row_hits(tiny_config):
    from umv2_jax.training.state import build

    config = tiny_config(*SPARSE["umv2"])
    setup = build(config)
    params, rest = setup.state["params"], setup.rest
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 256, size=(2, config.data.seq_len), dtype=np.int32)
    loss_mask = np.ones(inputs.shape, np.float32)
    loss_mask[1, 5:] = 0  # 32 + 5 counted positions
    counts, tokens = finetune.count_row_usage(
        setup.parts, params, rest, [{"inputs": inputs, "loss_mask": loss_mask}]
    )
    assert tokens == config.data.seq_len + 5
    assert counts.shape == (2, 12**2) and counts.dtype == np.int64
    assert counts.max() <= tokens
    # Every position reads at most heads·topk distinct rows, at least one.
    per_layer = counts.sum(axis=1)
    assert np.all(per_layer >= tokens) and np.all(per_layer <= tokens * 4)
    # The rows hit anywhere are the ones the model's own diagnostics report (all positions on).
    full, _ = finetune.count_row_usage(
        setup.parts, params, rest, [{"inputs": inputs, "loss_mask": np.ones_like(loss_mask)}]
    )
    model = setup.parts.build(params, rest)
    _, aux = model(jnp.asarray(inputs), diagnostics=True)
    for position, block in enumerate(config.model.sparse_layer_indices()):
        hits = np.asarray(jax.device_get(aux.row_hits[block]))
        np.testing.assert_array_equal(full[position] > 0, hits, err_msg=f"block {block}")
