"""KV-cache decoding (umv2_jax.inference.decode): prefill + cached steps give the logits of a full
forward pass over each row's sequence so far, for every model family, with left-padded prompts of
unequal length and with scan over layers. The oracle is the uncached model on one unpadded row."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from umv2_jax.config import load_config
from umv2_jax.errors import ConfigError
from umv2_jax.inference.cache import init_cache
from umv2_jax.inference.decode import Decoder, generate, left_pad
from umv2_jax.models.transformer import Transformer

VOCAB = 64
PAD = 0
BASE = [
    "model.d_model=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.d_ff=48",
    f"model.vocab_size={VOCAB}",
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
ENGRAM = [
    "model.sparse=engram",
    "model.engram.heads=2",
    "model.engram.embed_dim=8",
    "model.engram.table_size=17",
    "model.engram.kernel_size=3",
    "model.engram.dilation=2",
]
FAMILIES = {
    "dense": ["model.scan_layers=false"],
    "moe": [
        "model.scan_layers=false",
        "model.sparse=moe",
        "model.d_ff=0",
        "model.moe.num_experts=4",
        "model.moe.top_k=2",
        "model.moe.expert_d_ff=16",
    ],
    "umv2": ["model.scan_layers=false", *UMV2],
    "pkm": [
        "model.scan_layers=false",
        "model.sparse=pkm",
        "model.product_key.n_keys=6",
        "model.product_key.key_dim=8",
        "model.product_key.topk=4",
        "model.product_key.heads=2",
    ],
    "umv2_scanned": ["model.scan_layers=true", *UMV2],
    # Engram keeps state across steps (its last n−1 ids, its convolution's last (K−1)·δ inputs):
    # one block with it (loop), and both blocks stacked for scan (the state gets a layers axis).
    "engram": ["model.scan_layers=false", *ENGRAM, "model.sparse_layers=[1]"],
    "engram_scanned": ["model.scan_layers=true", *ENGRAM],
}
PROMPTS = [[1, 17, 33, 9, 41], [1, 22], [1, 5, 60, 12, 7, 30, 2]]  # unequal lengths
NEW_TOKENS = 4
CACHE_LEN = 13  # one cache length for every test: one compile of each step per model


@functools.cache
def _built(family: str) -> tuple[Transformer, Decoder]:
    """(model, decoder) of a family, initialized by one jitted program (eager init is slow)."""
    config = load_config(None, BASE + FAMILIES[family]).model
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(1))))
    state = jax.jit(lambda: nnx.split(Transformer(config, nnx.Rngs(1)))[1])()
    model = nnx.merge(graphdef, state)
    return model, Decoder(model)


def _full_logits(model, sequences):
    """fp32 [rows, longest, VOCAB] logits of the uncached model (the reference), each row alone:
    rows are RIGHT-padded, which causal attention keeps from reaching any real position."""
    longest = max(len(sequence) for sequence in sequences)
    tokens = np.full((len(sequences), longest), PAD, np.int32)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence)] = sequence
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0])(state, tokens)
    return np.asarray(logits[..., :VOCAB])


# The loop-over-layers UltraMemV2 model is slow-marked: the scanned one runs the same memory layer
# under the cache by default, and dense, MoE and PKM cover the loop path.
CASES = [
    pytest.param(family, marks=pytest.mark.slow) if family in ("umv2", "engram_scanned") else family
    for family in FAMILIES
]


@pytest.mark.parametrize("family", CASES)
def test_cached_decoding_equals_full_recomputation(family):
    model, decoder = _built(family)
    if family == "umv2_scanned":
        assert len(model.layout) == 1 and len(model.layout[0]) == 2  # one stack of both blocks
    tokens, start = left_pad(PROMPTS, PAD)
    logits, cache, _ = decoder.prefill(tokens, start, cache_len=CACHE_LEN)
    step_logits, chosen = [np.asarray(logits)], []
    for step in range(NEW_TOKENS):
        token = np.asarray(jnp.argmax(logits, axis=-1), np.int32)
        chosen.append(token)
        if step + 1 < NEW_TOKENS:
            logits, cache, _ = decoder.step(token, cache)
            step_logits.append(np.asarray(logits))
    step_logits, chosen = np.stack(step_logits, 1), np.stack(chosen, 1)  # [B, steps, V], [B, steps]
    sequences = [prompt + chosen[row, :-1].tolist() for row, prompt in enumerate(PROMPTS)]
    full = _full_logits(model, sequences)
    for row, prompt in enumerate(PROMPTS):
        reference = full[row, len(prompt) - 1 : len(sequences[row])]  # [steps, V]
        np.testing.assert_allclose(step_logits[row], reference, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(reference.argmax(-1), chosen[row])  # greedy agrees
    # `generate` is the same loop: the same greedy tokens.
    new = generate(model, PROMPTS, NEW_TOKENS, CACHE_LEN, decoder=decoder)
    assert new == chosen.tolist()


def test_the_scanned_cache_has_a_leading_layers_axis():
    config = load_config(None, BASE + FAMILIES["umv2_scanned"]).model
    cache = init_cache(config, batch=3, cache_len=9)
    assert [layer.key.shape for layer in cache.layers] == [(2, 3, 9, 2, 16)]
    loop = load_config(None, BASE + FAMILIES["umv2"]).model
    assert [layer.key.shape for layer in init_cache(loop, 3, 9).layers] == [(3, 9, 2, 16)] * 2


def test_the_engram_state_is_cached_per_layer_and_stacked_under_scan():
    # (the scanned Engram decode is slow-marked; its cache layout is checked here without compiling)
    config = load_config(None, BASE + FAMILIES["engram_scanned"]).model
    (layer,) = init_cache(config, batch=3, cache_len=9).layers
    assert layer.sparse["ids"].shape == (2, 3, 2) and layer.sparse["ids"].dtype == jnp.uint32
    assert layer.sparse["conv"].shape == (2, 3, (3 - 1) * 2, 32)  # (K − 1)·δ inputs per row
    loop = load_config(None, BASE + FAMILIES["engram"]).model
    dense, engram = init_cache(loop, 3, 9).layers
    assert dense.sparse is None and engram.sparse["conv"].shape == (3, 4, 32)


def test_left_padding_puts_every_prompt_last():
    tokens, start = left_pad([[1, 2, 3], [4]], pad_id=9)
    np.testing.assert_array_equal(tokens, [[1, 2, 3], [9, 9, 4]])
    np.testing.assert_array_equal(start, [0, 2])


def test_a_prompt_longer_than_the_cache_is_a_one_line_config_error():
    model, decoder = _built("dense")
    tokens, start = left_pad(PROMPTS, PAD)
    with pytest.raises(
        ConfigError, match=r"the prompt is 7 tokens but the KV cache holds 6; raise"
    ):
        decoder.prefill(tokens, start, cache_len=6)
    with pytest.raises(
        ConfigError, match=r"needs 10 cache slots but the KV cache holds 9"
    ) as error:
        generate(model, PROMPTS, 4, 9, decoder=decoder)
    assert "\n" not in str(error.value)


def test_seeded_sampling_is_deterministic_and_the_seed_matters():
    model, decoder = _built("dense")
    options = dict(temperature=1.5, top_k=0, top_p=1.0, decoder=decoder)
    first = generate(model, PROMPTS, 6, CACHE_LEN, seed=3, **options)
    assert generate(model, PROMPTS, 6, CACHE_LEN, seed=3, **options) == first
    assert generate(model, PROMPTS, 6, CACHE_LEN, seed=4, **options) != first


def test_decode_stops_each_row_at_eos():
    model, decoder = _built("dense")
    greedy = generate(model, PROMPTS, 4, CACHE_LEN, decoder=decoder)
    eos = greedy[0][1]  # pretend row 0's second token is EOS
    cut = generate(model, PROMPTS, 4, CACHE_LEN, eos_id=eos, decoder=decoder)
    for full, short in zip(greedy, cut):
        expected = full[: full.index(eos)] if eos in full else full
        assert short == expected


def test_step_reports_the_distinct_rows_and_experts_selected():
    """The diagnostics count of a step equals the distinct ids the layer's own selection gives."""
    model, decoder = _built("moe")
    tokens, start = left_pad(PROMPTS, PAD)
    _, cache, _ = decoder.prefill(tokens, start, cache_len=CACHE_LEN)
    fed = np.asarray([3, 3, 50], np.int32)
    _, _, counts = decoder.step(fed, cache, diagnostics=True)
    assert sorted(counts) == [0, 1]
    # Reference for block 0: route the block's normalized FFN input of each row by hand.
    block = model.blocks[0]
    sequences = [p + [int(t)] for p, t in zip(PROMPTS, fed)]
    chosen = set()
    for sequence in sequences:
        x = jnp.take(model.embed[...], jnp.asarray([sequence]), axis=0)
        x_mid = x + block.attn(block.attn_norm(x), jnp.arange(len(sequence))[None])
        u = block.ffn_norm(x_mid)[0, -1]
        router = u @ block.sparse.router[...]
        chosen |= set(np.asarray(jax.lax.top_k(router, 2)[1]).tolist())
    assert int(counts[0]) == len(chosen)
