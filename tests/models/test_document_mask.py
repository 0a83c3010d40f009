"""Packed rows: with segment_ids and positions that restart per document, a document's logits are
those of the document alone, whatever precedes it in the row — dense and UltraMemV2 models, loop
and scanned, remat'ed or not. Without segment_ids the model is what it was.

The oracle is the same model (same seed) run on each document by itself, positions 0 … len − 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from umv2_jax.config import load_config
from umv2_jax.models.transformer import Transformer

BASE = [
    "model.d_model=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.d_ff=48",
    "model.vocab_size=64",
    "model.attention_chunk=8",  # seq 24 > chunk: the chunked path on CPU, docB starts mid-block
]
UMV2 = [
    "model.sparse=ultramem_v2",
    "model.memory.n_keys=6",
    "model.memory.key_dim=8",
    "model.memory.rc_topk=4",
    "model.memory.topk=4",
    "model.memory.value_dim=8",
    "model.memory.pre_value_dim=4",
    "model.memory.calibration_tokens=32",
]
KINDS = {"dense": [], "umv2": UMV2}
LENGTH_A, LENGTH_B = 11, 13


def _model(kind: str, scan: bool, *extra: str) -> Transformer:
    config = load_config(None, BASE + KINDS[kind] + [f"model.scan_layers={scan}", *extra]).model
    return Transformer(config, nnx.Rngs(3))


def _packed(doc_a, doc_b):
    """tokens, positions, segment_ids [rows, LENGTH_A + LENGTH_B] of the rows [doc_a | doc_b]."""
    tokens = jnp.concatenate([doc_a, doc_b], axis=1)
    rows = tokens.shape[0]
    positions = jnp.concatenate([jnp.arange(LENGTH_A), jnp.arange(LENGTH_B)])
    segment_ids = jnp.asarray([1] * LENGTH_A + [2] * LENGTH_B, jnp.int32)
    return tokens, *(jnp.broadcast_to(x, (rows, x.shape[0])) for x in (positions, segment_ids))


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_documents_logits_do_not_depend_on_an_earlier_document(kind, scan):
    model = _model(kind, scan)
    rng = np.random.default_rng(1)
    doc_a = jnp.asarray(rng.integers(0, 64, (2, LENGTH_A)), jnp.int32)
    doc_b = jnp.asarray(rng.integers(0, 64, (2, LENGTH_B)), jnp.int32)
    other_a = jnp.asarray(rng.integers(0, 64, (2, LENGTH_A)), jnp.int32)
    forward = nnx.jit(lambda model, tokens, **kw: model(tokens, **kw)[0])

    tokens, positions, segment_ids = _packed(doc_a, doc_b)
    packed = forward(model, tokens, positions=positions, segment_ids=segment_ids)
    alone_b = forward(model, doc_b)
    np.testing.assert_allclose(packed[:, LENGTH_A:], alone_b, rtol=2e-5, atol=2e-5)

    tokens, positions, segment_ids = _packed(other_a, doc_b)
    replaced = forward(model, tokens, positions=positions, segment_ids=segment_ids)
    np.testing.assert_allclose(replaced[:, LENGTH_A:], packed[:, LENGTH_A:], rtol=2e-5, atol=2e-5)
    assert float(jnp.max(jnp.abs(replaced[:, :LENGTH_A] - packed[:, :LENGTH_A]))) > 1e-2

    # The check has teeth: without the document mask docB does see docA.
    unmasked = forward(model, tokens, positions=positions)
    assert float(jnp.max(jnp.abs(unmasked[:, LENGTH_A:] - alone_b))) > 1e-3


@pytest.mark.parametrize("scan, remat", [(False, "full"), (True, "save_dots")])
def test_rematerialized_blocks_mask_documents_too(scan, remat):
    """Gradients under remat (a loop of checkpointed blocks; a checkpointed scan body): those of
    docB's packed logits equal those of docB alone."""
    rng = np.random.default_rng(2)
    doc_a = jnp.asarray(rng.integers(0, 64, (2, LENGTH_A)), jnp.int32)
    doc_b = jnp.asarray(rng.integers(0, 64, (2, LENGTH_B)), jnp.int32)
    tokens, positions, segment_ids = _packed(doc_a, doc_b)
    model = _model("umv2", scan, f"model.remat={remat}")

    def of_b(model, tokens, positions, segment_ids):
        logits = model(tokens, positions=positions, segment_ids=segment_ids)[0]
        return jnp.sum(logits[:, -LENGTH_B:, :64] ** 2)

    @nnx.jit
    def gradients(model):
        packed = nnx.grad(of_b)(model, tokens, positions, segment_ids)
        alone = nnx.grad(of_b)(model, doc_b, None, None)
        return nnx.state(packed, nnx.Param), nnx.state(alone, nnx.Param)

    packed, alone = gradients(model)
    for got, want in zip(jax.tree.leaves(packed), jax.tree.leaves(alone)):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_one_document_per_row_is_the_model_without_segment_ids(kind, scan):
    model = _model(kind, scan)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 64, (2, 24)), jnp.int32)
    forward = nnx.jit(lambda model, tokens, **kw: model(tokens, **kw)[0])
    before = forward(model, tokens)
    assert np.array_equal(before, forward(model, tokens, positions=None, segment_ids=None))
    whole = forward(
        model,
        tokens,
        positions=jnp.broadcast_to(jnp.arange(24), (2, 24)),
        segment_ids=jnp.ones((2, 24), jnp.int32),
    )
    np.testing.assert_allclose(whole, before, rtol=1e-5, atol=1e-5)


def test_segment_ids_with_a_kv_cache_are_an_error():
    from umv2_jax.inference.cache import init_cache

    model = _model("dense", False)
    tokens = jnp.zeros((1, 4), jnp.int32)
    cache = init_cache(model.config, batch=1, cache_len=8)
    with pytest.raises(ValueError, match="segment_ids"):
        model(tokens, cache=cache, segment_ids=jnp.ones((1, 4), jnp.int32))


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_positions_reach_rope_in_every_block(scan):
    """RoPE sees only relative positions, so a constant shift changes nothing (to rounding) while
    stretched positions change the logits — in loop and scanned blocks alike. (With documents
    masked apart, positions restarting per document or not give the same logits for this reason;
    the data restarts them so that each document starts at the positions training saw.)"""
    model = _model("dense", scan)
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 64, (2, 24)), jnp.int32)
    forward = nnx.jit(lambda model, tokens, positions: model(tokens, positions=positions)[0])
    base = jnp.broadcast_to(jnp.arange(24), (2, 24))
    default = forward(model, tokens, base)
    np.testing.assert_allclose(forward(model, tokens, base + 5), default, rtol=1e-4, atol=1e-4)
    assert float(jnp.max(jnp.abs(forward(model, tokens, 3 * base) - default))) > 1e-3
