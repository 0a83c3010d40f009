"""The backbone (docs/model.md §1) against plain numpy references."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from umv2_jax.config import ModelConfig
from umv2_jax.models import transformer as tf
from umv2_jax.models.init import backbone_std, output_std

SMALL = ModelConfig(d_model=32, num_layers=2, num_heads=4, d_ff=64, vocab_size=50)


def _np(x):
    return np.asarray(x, np.float64)


def test_rmsnorm_matches_numpy():
    norm = tf.RMSNorm(8, 1e-6, nnx.Rngs(0))
    norm.scale[...] = jnp.arange(1.0, 9.0)
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    expected = (
        x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * np.arange(1, 9)
    )
    np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def score(pq, pk):
        rq = tf.rope(q, jnp.array([[pq]]), 10000.0)
        rk = tf.rope(k, jnp.array([[pk]]), 10000.0)
        return float(jnp.sum(rq * rk))

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
    assert score(0, 0) == pytest.approx(float(jnp.sum(q * k)), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)


def test_attention_matches_naive_causal_softmax():
    config = dataclasses.replace(SMALL, qk_norm=True)
    attention = tf.Attention(config, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 7, 32))
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    got = _np(attention(x, positions))

    def head_norm(v, scale):
        return v / np.sqrt((v**2).mean(-1, keepdims=True) + config.norm_eps) * scale

    q = np.einsum("bse,end->bsnd", _np(x), _np(attention.query[...]))
    k = np.einsum("bse,end->bsnd", _np(x), _np(attention.key[...]))
    v = np.einsum("bse,end->bsnd", _np(x), _np(attention.value[...]))
    q = _np(
        tf.rope(
            jnp.asarray(head_norm(q, _np(attention.query_norm.scale[...])), jnp.float32),
            positions,
            1e4,
        )
    )
    k = _np(
        tf.rope(
            jnp.asarray(head_norm(k, _np(attention.key_norm.scale[...])), jnp.float32),
            positions,
            1e4,
        )
    )
    logits = np.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(q.shape[-1])
    logits = np.where(np.tril(np.ones((7, 7), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("bnqk,bknd->bqnd", weights, v)
    expected = np.einsum("bsnd,nde->bse", attended, _np(attention.out[...]))
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5)


def test_swiglu_matches_numpy():
    ffn = tf.SwiGLU(SMALL, 64, nnx.Rngs(0))
    u = np.random.default_rng(2).normal(size=(5, 32))
    gate, up, down = _np(ffn.gate[...]), _np(ffn.up[...]), _np(ffn.down[...])
    silu = lambda z: z / (1 + np.exp(-z))
    expected = (silu(u @ gate) * (u @ up)) @ down
    np.testing.assert_allclose(ffn(jnp.asarray(u, jnp.float32)), expected, rtol=1e-4, atol=1e-6)


def test_causal_model_ignores_future_tokens():
    model = tf.Transformer(SMALL, nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (1, 12), 0, 50)
    changed = tokens.at[0, 8].set((tokens[0, 8] + 1) % 50)
    a, _ = model(tokens)
    b, _ = model(changed)
    np.testing.assert_array_equal(a[0, :8], b[0, :8])
    assert not np.allclose(a[0, 8:], b[0, 8:])


def test_vocabulary_padding_and_tied_embeddings():
    tied = tf.Transformer(SMALL, nnx.Rngs(0))
    untied = tf.Transformer(dataclasses.replace(SMALL, tie_embeddings=False), nnx.Rngs(0))
    assert tied.embed[...].shape == (128, 32)
    assert tf.count_params(untied) - tf.count_params(tied) == 128 * 32
    logits, _ = tied(jnp.zeros((1, 3), jnp.int32))
    assert logits.shape == (1, 3, 128) and logits.dtype == jnp.float32


def test_every_parameter_has_logical_axes():
    model = tf.Transformer(
        dataclasses.replace(SMALL, qk_norm=True, tie_embeddings=False), nnx.Rngs(0)
    )
    state = nnx.state(model, nnx.Param)
    for path, variable in nnx.to_flat_state(state):
        axes = variable.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == variable[...].ndim, path


def test_paper_init_stds():
    config = ModelConfig(d_model=256, num_layers=4, num_heads=4, d_ff=1024)
    model = tf.Transformer(config, nnx.Rngs(0))
    block = model.blocks[0]
    assert float(jnp.std(block.ffn.gate[...])) == pytest.approx(backbone_std(config), rel=0.02)
    assert float(jnp.std(block.ffn.down[...])) == pytest.approx(output_std(config), rel=0.02)
    assert float(jnp.std(block.attn.out[...])) == pytest.approx(output_std(config), rel=0.03)
    assert output_std(config) == pytest.approx(math.sqrt(2 / (5 * 256)) / math.sqrt(8))
    assert float(jnp.max(jnp.abs(block.ffn.gate[...]))) <= 3.0 * backbone_std(config) * 1.02


def test_bfloat16_compute_keeps_fp32_parameters():
    model = tf.Transformer(dataclasses.replace(SMALL, compute_dtype="bfloat16"), nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 50)
    logits, _ = model(tokens)
    reference, _ = tf.Transformer(SMALL, nnx.Rngs(0))(tokens)
    assert logits.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
    np.testing.assert_allclose(logits, reference, atol=0.05)
