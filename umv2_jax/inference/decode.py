"""Prefill and incremental decoding with a preallocated KV cache, for every model family.

    decoder = Decoder(model)                                   # any Transformer (dense, moe, memory)
    tokens, start = left_pad([[1, 5, 7], [1, 9]], pad_id)      # [2, 3] int32, start [1, 0] … [0, 1]
    logits, cache, _ = decoder.prefill(tokens, start, cache_len=64)   # logits [2, vocab] fp32
    logits, cache, _ = decoder.step(next_tokens, cache)        # next_tokens [2] → logits [2, vocab]

    new_ids = generate(model, prompts, max_new_tokens=32, cache_len=64, temperature=0.8, seed=0)

Prompts are left-padded (see `umv2_jax.inference.cache`): after prefill every row's last prompt
token sits in slot P − 1 and each step writes one slot for all rows. Both functions are jitted with
static shapes (one compile per batch size, prompt length and cache length); the model is split once
into its graph definition and state. Equivalent to the full recomputation

    logits = model(sequence_so_far)[0][:, -1]

per row (the tests check every step's logits and the greedy tokens), except for an MoE with
`capacity_factor > 0`, whose dropping depends on which tokens share a pass.

`step(..., diagnostics=True)` also returns {block: distinct rows (experts for an MoE) the step's
tokens selected}: what `umv2_jax.eval.decode_access` counts.

A prompt longer than the cache (or prompt + new tokens that overflow it) is a `ConfigError`: one line
naming the lengths and the fix.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from umv2_jax.errors import ConfigError
from umv2_jax.inference import sampling
from umv2_jax.inference.cache import cache_len_of, init_cache
from umv2_jax.models.transformer import KVCache


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [batch, longest], start int32 [batch]): each prompt right-aligned after
    `pad_id`s; start[b] = longest − len(prompts[b]) is row b's first real slot."""
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    longest = max(len(prompt) for prompt in prompts)
    tokens = np.full((len(prompts), longest), pad_id, np.int32)
    start = np.zeros((len(prompts),), np.int32)
    for row, prompt in enumerate(prompts):
        start[row] = longest - len(prompt)
        tokens[row, start[row] :] = np.asarray(prompt, np.int32)
    return tokens, start


def check_fits(prompt_len: int, cache_len: int, max_new_tokens: int = 1) -> None:
    """ConfigError unless a prompt of `prompt_len` and `max_new_tokens` new tokens fit the cache
    (the last new token is never written: prompt_len + max_new_tokens − 1 slots)."""
    if prompt_len > cache_len:
        raise ConfigError(
            f"the prompt is {prompt_len} tokens but the KV cache holds {cache_len}; raise the "
            f"cache length (--cache-len / cache_len) to at least {prompt_len} or shorten the prompt"
        )
    needed = prompt_len + max_new_tokens - 1
    if needed > cache_len:
        raise ConfigError(
            f"a {prompt_len}-token prompt plus {max_new_tokens} new tokens needs {needed} cache "
            f"slots but the KV cache holds {cache_len}; raise the cache length (--cache-len / "
            f"cache_len) to {needed} or ask for at most {cache_len - prompt_len + 1} new tokens"
        )


class Decoder:
    """Jitted prefill and decode step for one model (its state is read once, at construction).

    vocab_size: logits are returned for the first `vocab_size` ids (default: config.vocab_size,
    the padded columns dropped).
    """

    def __init__(self, model: nnx.Module, vocab_size: int | None = None):
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self.vocab_size = vocab_size or self.config.vocab_size

    def prefill(
        self, tokens, start, cache_len: int, diagnostics: bool = False
    ) -> tuple[jax.Array, KVCache, dict[int, jax.Array]]:
        """tokens: int32 [batch, P] left-padded, start: int32 [batch] → (logits of the token after
        each prompt fp32 [batch, vocab], the cache with P slots written, distinct-row counts)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        check_fits(tokens.shape[1], cache_len)
        return _prefill(
            self.graphdef,
            self.state,
            tokens,
            jnp.asarray(start, jnp.int32),
            cache_len=cache_len,
            vocab=self.vocab_size,
            diagnostics=diagnostics,
        )

    def step(
        self, tokens, cache: KVCache, diagnostics: bool = False
    ) -> tuple[jax.Array, KVCache, dict[int, jax.Array]]:
        """tokens: int32 [batch], one per row → (next logits fp32 [batch, vocab], the cache one slot
        further, {block: int32 distinct rows / experts selected} with diagnostics, else {}).

        The caller keeps the window inside the cache (`check_fits`): a write past the last slot
        would be clamped by `dynamic_update_slice` and overwrite it.
        """
        return _step(
            self.graphdef,
            self.state,
            jnp.asarray(tokens, jnp.int32),
            cache,
            vocab=self.vocab_size,
            diagnostics=diagnostics,
        )


def generate(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    cache_len: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    pad_id: int = 0,
    decoder: Decoder | None = None,
) -> list[list[int]]:
    """The new ids after each prompt (batched, left-padded), each cut before its first `eos_id`.

    Greedy at temperature 0, else sampled (top-k then top-p on logits / temperature) with
    `jax.random.key(seed)`, split once per step. ConfigError when the prompts and max_new_tokens
    do not fit `cache_len`.
    """
    sampling.check_sampling(temperature, top_k, top_p)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} must be at least 1")
    tokens, start = left_pad(prompts, pad_id)
    check_fits(tokens.shape[1], cache_len, max_new_tokens)
    decoder = decoder or Decoder(model)
    key = jax.random.key(seed)
    logits, cache, _ = decoder.prefill(tokens, start, cache_len)
    generated = []
    for step in range(max_new_tokens):
        key, sample_key = jax.random.split(key)
        token = sampling.sample(logits, sample_key, temperature, top_k, top_p)
        generated.append(np.asarray(token))
        if eos_id is not None and np.all(np.any(np.stack(generated) == eos_id, axis=0)):
            break
        if step + 1 < max_new_tokens:
            logits, cache, _ = decoder.step(token, cache)
    table = np.stack(generated, axis=1)  # [batch, steps]
    out = []
    for row in table.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "vocab", "diagnostics"))
def _prefill(graphdef, state, tokens, start, *, cache_len, vocab, diagnostics):
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.config, tokens.shape[0], cache_len, start)
    logits, aux = model(tokens, cache=cache, diagnostics=diagnostics)
    return logits[:, -1, :vocab], aux.cache, _distinct(aux)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "vocab", "diagnostics"), donate_argnames=("cache",)
)
def _step(graphdef, state, tokens, cache, *, vocab, diagnostics):
    model = nnx.merge(graphdef, state)
    logits, aux = model(tokens[:, None], cache=cache, diagnostics=diagnostics)
    return logits[:, 0, :vocab], aux.cache, _distinct(aux)


def _distinct(aux) -> dict[int, jax.Array]:
    return {block: jnp.sum(hits, dtype=jnp.int32) for block, hits in aux.row_hits.items()}


__all__ = ["Decoder", "cache_len_of", "check_fits", "generate", "left_pad"]
