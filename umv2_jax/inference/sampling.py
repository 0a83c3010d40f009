"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

    tokens = sample(logits, key, temperature=0.8, top_k=40, top_p=0.95)   # int32 [batch]

logits: fp32 [..., vocab] (only the real vocabulary: slice off the padded columns first). The
filters return logits with the dropped entries set to -inf, so they compose. Equivalent plain JAX:

    top_k:  cutoff = lax.top_k(logits, k)[0][..., -1:];  where(logits < cutoff, -inf, logits)
    top_p:  keep the most likely tokens while the mass ranked above each is < p (the top one always)
    sample: argmax(logits) if temperature == 0 else
            random.categorical(key, top_p(top_k(logits / temperature)))   (`sampling_logits`)

Sampling is deterministic for a given key; every row draws independently.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """ValueError naming the bad argument (temperature finite >= 0, top_k >= 0, 0 < top_p <= 1)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature {temperature} must be a finite number >= 0 (0 = greedy)")
    if top_k < 0:
        raise ValueError(f"top_k {top_k} must be >= 0 (0 = no top-k filter)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p {top_p} must be in (0, 1] (1 = no nucleus filter)")


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """logits [..., vocab] with everything below the k-th largest of each row set to -inf
    (ties at the cutoff are kept). k = 0 or k >= vocab: unchanged."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    cutoff = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    """logits [..., vocab] outside each row's smallest most-likely set of total probability >= p
    set to -inf. The most likely token always stays; p = 1: unchanged."""
    if p >= 1:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    probabilities = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    before = jnp.cumsum(probabilities, axis=-1) - probabilities  # mass ranked above each token
    keep_sorted = before < p
    inverse = jnp.argsort(order, axis=-1)
    keep = jnp.take_along_axis(keep_sorted, inverse, axis=-1)
    return jnp.where(keep, logits, -jnp.inf)


def sample(
    logits: jax.Array,
    key: jax.Array | None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> jax.Array:
    """int32 [...] next tokens from logits [..., vocab]; temperature 0 = greedy (key unused)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if key is None:
        raise ValueError("sampling with temperature > 0 needs a PRNG key")
    filtered = sampling_logits(logits, temperature, top_k, top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def sampling_logits(
    logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """The logits `sample` draws from (temperature > 0): the temperature first, then top-k, then
    top-p on the distribution top-k left, so top-p's set depends on the temperature."""
    return top_p_mask(top_k_mask(logits / temperature, top_k), top_p)
