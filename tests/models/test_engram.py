"""Engram (umv2_jax.models.engram) against a per-token reference written from the paper's equations
(arXiv 2601.07372: multiplicative-XOR n-gram hashes into prime-sized tables, the context-aware gate,
the dilated causal depthwise convolution), in plain Python / numpy, one token at a time."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from umv2_jax.config import load_config
from umv2_jax.errors import ConfigError
from umv2_jax.models.engram import NO_TOKEN, Engram, hash_multipliers, table_primes
from umv2_jax.models.sparse import SparseContext

H = 16
SETTINGS = [
    "model.d_model=16",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.d_ff=32",
    "model.vocab_size=50",
    "model.sparse=engram",
    "model.engram.max_ngram=3",
    "model.engram.heads=2",
    "model.engram.embed_dim=8",
    "model.engram.table_size=13",
    "model.engram.kernel_size=3",
]


def _layer(extra=(), block=1) -> tuple[Engram, object]:
    config = load_config(None, SETTINGS + list(extra)).model
    layer = Engram(config, block, nnx.Rngs(0))
    # Norm gains away from 1 and a visible convolution, so every term of the equations matters.
    rng = np.random.default_rng(5)
    for name in ("key_norm", "query_norm", "conv_norm"):
        getattr(layer, name).set_value(jnp.asarray(rng.uniform(0.5, 1.5, H), jnp.float32))
    layer.conv.set_value(jnp.asarray(rng.normal(0, 0.5, layer.conv.shape), jnp.float32))
    return layer, config


def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x) + eps) * scale


def _reference(layer: Engram, config, ids, u, segments=None) -> np.ndarray:
    """One row: ids int [S], u [S, h] → y [S, h], token by token from the equations."""
    engram = config.engram
    table = np.asarray(layer.table[...], np.float64)
    w_key, w_value = (
        np.asarray(layer.key[...], np.float64),
        np.asarray(layer.value[...], np.float64),
    )
    g_key, g_query = np.asarray(layer.key_norm[...]), np.asarray(layer.query_norm[...])
    g_conv, conv = np.asarray(layer.conv_norm[...]), np.asarray(layer.conv[...], np.float64)
    multipliers = [int(m) for m in np.asarray(layer.multipliers[...])]
    primes = table_primes(engram)
    eps, heads, dilation = engram.norm_eps, engram.heads, engram.resolved_dilation()
    seq = len(ids)

    def token(t, s):  # the id at s as position t sees it (⊥ before the start / another document)
        if s < 0 or (segments is not None and segments[s] != segments[t]):
            return NO_TOKEN
        return int(ids[s])

    gated = np.zeros((seq, H))
    for t in range(seq):
        parts, offset = [], 0
        for n in range(2, engram.max_ngram + 1):
            mix = 0
            for k in range(n):
                mix ^= (token(t, t - k) * multipliers[k]) % 2**32
            for j in range(heads):
                prime = primes[(n - 2) * heads + j]
                row = sum(primes[: (n - 2) * heads + j]) + mix % prime
                parts.append(table[row])
                offset += prime
        e = np.concatenate(parts)
        key, value = e @ w_key, e @ w_value
        z = np.dot(_rms(key, g_key, eps), _rms(u[t], g_query, eps)) / math.sqrt(H)
        alpha = 1.0 / (1.0 + np.exp(-np.sign(z) * np.sqrt(max(abs(z), 1e-6))))
        gated[t] = alpha * value
    normed = np.stack([_rms(gated[t], g_conv, eps) for t in range(seq)])
    y = np.zeros((seq, H))
    for t in range(seq):
        total = np.zeros(H)
        for i in range(engram.kernel_size):
            s = t - i * dilation
            if s >= 0 and (segments is None or segments[s] == segments[t]):
                total += conv[i] * normed[s]
        y[t] = gated[t] + total / (1.0 + np.exp(-total))
    return y


def _inputs(batch=2, seq=11, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 50, (batch, seq)).astype(np.int32)
    ids[:, 3] = ids[:, 0]  # repeated n-grams read the same rows
    ids[:, 4] = ids[:, 1]
    u = rng.normal(0, 1, (batch, seq, H)).astype(np.float32)
    return ids, u


def test_the_layer_matches_the_per_token_reference():
    layer, config = _layer()
    ids, u = _inputs()
    out = layer(jnp.asarray(u), SparseContext(token_ids=jnp.asarray(ids), diagnostics=True))
    for row in range(ids.shape[0]):
        reference = _reference(layer, config, ids[row], u[row])
        np.testing.assert_allclose(np.asarray(out.y[row]), reference, rtol=2e-5, atol=2e-5)
    assert out.addressable_rows == sum(table_primes(config.engram)) == int(layer.table.shape[0])
    assert 0.0 < float(out.metrics["engram_gate_mean"]) < 1.0
    # Row hits: exactly the rows the hashes address (max_ngram − 1 orders × heads per token).
    rows = np.asarray(
        layer.addresses(layer._lagged_ids(SparseContext(token_ids=jnp.asarray(ids)), *ids.shape)[0])
    )
    assert set(np.flatnonzero(np.asarray(out.row_hits))) == set(rows.ravel().tolist())


def test_packed_documents_hash_and_convolve_within_their_document():
    layer, config = _layer()
    ids, u = _inputs(batch=1, seq=12, seed=3)
    segments = np.array([[1] * 5 + [2] * 7], np.int32)
    context = SparseContext(token_ids=jnp.asarray(ids), segment_ids=jnp.asarray(segments))
    out = np.asarray(layer(jnp.asarray(u), context).y[0])
    reference = _reference(layer, config, ids[0], u[0], segments[0])
    np.testing.assert_allclose(out, reference, rtol=2e-5, atol=2e-5)
    # The second document alone gives the same outputs.
    alone = layer(jnp.asarray(u[:, 5:]), SparseContext(token_ids=jnp.asarray(ids[:, 5:])))
    np.testing.assert_allclose(out[5:], np.asarray(alone.y[0]), rtol=2e-5, atol=2e-5)


def test_tables_are_distinct_primes_and_blocks_hash_differently():
    _, config = _layer()
    primes = table_primes(config.engram)
    assert len(primes) == 2 * 2 and len(set(primes)) == 4
    assert all(p >= 13 and all(p % d for d in range(2, p)) for p in primes)
    first, second = hash_multipliers(config.engram, 0), hash_multipliers(config.engram, 1)
    assert np.all(first % 2 == 1) and not np.array_equal(first, second)


def test_the_table_gradient_is_nonzero_only_on_the_rows_read():
    layer, _ = _layer()
    ids, u = _inputs(batch=1, seq=6)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params):
        module = nnx.merge(graphdef, params, rest)
        return jnp.sum(module(jnp.asarray(u), SparseContext(token_ids=jnp.asarray(ids))).y ** 2)

    grads = jax.grad(loss)(params)
    touched = np.flatnonzero(np.abs(np.asarray(grads["table"][...])).sum(-1))
    rows = layer.addresses(layer._lagged_ids(SparseContext(token_ids=jnp.asarray(ids)), 1, 6)[0])
    assert set(touched.tolist()) == set(np.asarray(rows).ravel().tolist())


@pytest.mark.parametrize(
    "setting, key",
    [
        ("model.engram.embed_dim=9", "model.engram.embed_dim"),
        ("model.engram.max_ngram=1", "model.engram.max_ngram"),
        ("model.engram.table_size=1", "model.engram.table_size"),
    ],
)
def test_bad_engram_settings_are_one_line_config_errors(setting, key):
    with pytest.raises(ConfigError) as error:
        load_config(None, [*SETTINGS, setting])
    assert key in str(error.value) and "\n" not in str(error.value)
