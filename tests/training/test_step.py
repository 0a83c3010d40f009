"""The train and eval steps: the update is AdamW on globally clipped gradients; eval summaries."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from umv2_jax.training.state import build
from umv2_jax.training.step import make_train_step

from .conftest import TINY


def _reference_adamw(config, params, grads, moments, count):
    """One AdamW step in float64 numpy on gradients clipped to global norm `train.grad_clip`.

    docs/model.md §5: clip first, then Adam moments, bias correction, decoupled weight decay on every
    parameter with two or more dimensions, all scaled by the cosine schedule's LR (no warmup here).
    """
    train = config.train
    norm = math.sqrt(sum(float(np.sum(np.square(g))) for g in grads.values()))
    scale = min(1.0, train.grad_clip / norm)
    lr = train.learning_rate * (
        train.min_lr_ratio
        + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * count / train.steps))
    )
    t = count + 1
    new_params, new_moments = {}, {}
    for name, p in params.items():
        g = scale * grads[name]
        m, v = moments.get(name, (np.zeros_like(p), np.zeros_like(p)))
        m = train.b1 * m + (1 - train.b1) * g
        v = train.b2 * v + (1 - train.b2) * g * g
        m_hat, v_hat = m / (1 - train.b1**t), v / (1 - train.b2**t)
        decay = train.weight_decay * p if p.ndim >= 2 else 0.0
        new_params[name] = p - lr * (m_hat / (np.sqrt(v_hat) + train.eps) + decay)
        new_moments[name] = (m, v)
    return new_params, new_moments, norm


def _flat(tree):
    return {
        jax.tree_util.keystr(path): np.asarray(leaf, np.float64)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def test_train_step_is_adamw_on_globally_clipped_gradients():
    from umv2_jax.config import load_config

    config = load_config(
        None,
        TINY
        + [
            "train.steps=100",
            "train.warmup_fraction=0",
            "train.learning_rate=1e-2",
            "train.grad_clip=0.05",  # far below the gradient norm (≈ 1 at init): it binds
            "train.micro_batches=1",
        ],
    )
    setup = build(config)
    step_fn = jax.jit(make_train_step(setup.parts, setup.optimizer, 1, config.train.seed))
    parts, rest = setup.parts, setup.rest

    def loss(params, batch):
        logits = parts.build(params, rest)(batch["inputs"])[0].astype(jnp.float32)
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return jnp.sum(per_token * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

    grad_fn = jax.jit(jax.grad(loss))
    rng = np.random.default_rng(0)
    state, moments = setup.state, {}
    norms = []
    for count in range(3):
        tokens = rng.integers(0, 256, (config.train.batch_size, config.data.seq_len + 1))
        batch = {
            "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
            "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "loss_mask": jnp.ones((config.train.batch_size, config.data.seq_len), jnp.float32),
        }
        before = _flat(state["params"])
        grads = _flat(grad_fn(state["params"], batch))
        expected, moments, norm = _reference_adamw(config, before, grads, moments, count)
        state, metrics = step_fn(state, rest, batch)
        norms.append(norm)
        assert norm > 10 * config.train.grad_clip
        assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-4)
        after = _flat(state["params"])
        assert after.keys() == expected.keys()
        for name in expected:
            np.testing.assert_allclose(
                after[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name
            )
    # Differing norms make the clipped and unclipped Adam moments differ (Adam alone is scale-free).
    assert max(norms) > 1.05 * min(norms), norms


def test_eval_reports_rows_hit_over_the_whole_eval_window():
    from umv2_jax.training.step import summarize_eval

    def batch(hit_rows):
        mask = np.zeros(10, bool)
        mask[hit_rows] = True
        return {
            "loss_sum": 2.0,
            "tokens": 4.0,
            "byte_loss_sum": 2.0,
            "bytes": 4.0,
            "aux": {"layer0/rows_hit_fraction": mask.sum() / 8},
            "row_hits": {0: mask},
            "addressable": {0: 8.0},
        }

    summary = summarize_eval([batch([0, 1, 2]), batch([2, 3]), batch([7])])
    assert summary["eval/layer0/rows_hit_fraction"] == pytest.approx((3 / 8 + 2 / 8 + 1 / 8) / 3)
    assert summary["eval/layer0/rows_hit_fraction_window"] == pytest.approx(5 / 8)
    assert summary["eval_loss"] == pytest.approx(0.5)
    assert set(summary) == {
        "eval_loss",
        "eval_bpb",
        "eval/layer0/rows_hit_fraction",
        "eval/layer0/rows_hit_fraction_window",
    }


# Packed rows of 32 tokens: (document lengths; 0 = one padding token) per row.
PACKED_ROWS = ([12, 20], [32], [20, 12], [12, 16, 0, 0, 0, 0])


def _packed_batch(seed: int = 0):
    """A packed batch and its documents: ({"inputs", "targets", "loss_mask", "segment_ids",
    "positions"} [4, 32], [(inputs, targets) of each document, int32 [length]])."""
    rng = np.random.default_rng(seed)
    rows = {key: [] for key in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
    documents = []
    for lengths in PACKED_ROWS:
        row = {key: [] for key in rows}
        for number, length in enumerate(lengths, start=1):
            if length == 0:  # padding: no document, no loss
                for key in row:
                    row[key].append(np.zeros(1))
                continue
            tokens = rng.integers(0, 256, length + 1)
            documents.append((tokens[:-1], tokens[1:]))
            row["inputs"].append(tokens[:-1])
            row["targets"].append(tokens[1:])
            row["loss_mask"].append(np.ones(length))
            row["segment_ids"].append(np.full(length, number))
            row["positions"].append(np.arange(length))
        for key in rows:
            rows[key].append(np.concatenate(row[key]))
    batch = {
        key: jnp.asarray(np.stack(value), jnp.float32 if key == "loss_mask" else jnp.int32)
        for key, value in rows.items()
    }
    return batch, documents


def _packed_setup(*overrides):
    from umv2_jax.config import load_config

    # attention_chunk 8 < seq 32: the chunked path on CPU, documents crossing its blocks.
    return build(load_config(None, TINY + ["model.attention_chunk=8", *overrides]))


@pytest.mark.parametrize("sparse", ["dense", "umv2"])
def test_steps_on_packed_rows_equal_the_documents_one_by_one(sparse):
    """The train step's lm_loss and the eval step's sums on a packed batch equal the token-weighted
    losses of its documents run through the model one at a time."""
    from umv2_jax.training.step import make_eval_step, token_losses

    from .conftest import SPARSE

    setup = _packed_setup(*SPARSE[sparse])
    batch, documents = _packed_batch()
    params, rest = setup.state["params"], setup.rest
    train_step = jax.jit(make_train_step(setup.parts, setup.optimizer, 1, 0))
    eval_step = jax.jit(make_eval_step(setup.parts))
    _, metrics = train_step(setup.state, rest, batch)
    sums = eval_step(params, rest, batch)

    @jax.jit
    def document_loss(params, inputs, targets):
        logits = setup.parts.build(params, rest)(inputs[None])[0]
        return jnp.sum(token_losses(logits, targets[None]))

    total = sum(float(document_loss(params, *map(jnp.asarray, doc))) for doc in documents)
    tokens = sum(len(inputs) for inputs, _ in documents)
    assert float(sums["tokens"]) == tokens == float(jnp.sum(batch["loss_mask"]))
    np.testing.assert_allclose(float(sums["loss_sum"]), total, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["lm_loss"]), total / tokens, rtol=1e-5)
    # The same rows read as one sequence each: a different loss (the check can fail).
    unpacked = {key: batch[key] for key in ("inputs", "targets", "loss_mask")}
    assert abs(float(eval_step(params, rest, unpacked)["loss_sum"]) - total) > 1e-4 * total


def test_micro_batches_split_the_document_ids_with_the_rows():
    setup = _packed_setup()
    batch, _ = _packed_batch(seed=1)
    results = []
    for micro_batches in (1, 2):
        step = jax.jit(make_train_step(setup.parts, setup.optimizer, micro_batches, 0))
        results.append(step(setup.state, setup.rest, batch))
    (one_state, one), (two_state, two) = results
    for name in ("lm_loss", "grad_norm"):
        np.testing.assert_allclose(float(two[name]), float(one[name]), rtol=1e-5, err_msg=name)
    for got, want in zip(
        jax.tree.leaves(two_state["params"]), jax.tree.leaves(one_state["params"])
    ):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)  # Adam: ~lr·sign(g)


def test_document_kwargs_are_the_batch_keys_it_has():
    from umv2_jax.training.step import document_kwargs

    ids, positions = jnp.ones((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32)
    plain = {"inputs": ids, "targets": ids, "loss_mask": jnp.ones((1, 2))}
    assert document_kwargs(plain) == {}
    packed = document_kwargs({**plain, "segment_ids": ids, "positions": positions})
    assert packed.keys() == {"segment_ids", "positions"}
    assert packed["segment_ids"] is ids and packed["positions"] is positions
