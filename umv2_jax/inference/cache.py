"""The preallocated KV cache of incremental decoding, as an explicit pytree.

    cache = init_cache(config, batch=8, cache_len=256, start=start)   # a transformer.KVCache
    logits, aux = model(tokens, cache=cache)      # writes slots 0 … seq−1; aux.cache is the new one

Layout: one `LayerCache` (key, value) per segment of the model's layout (`segment_layout`): a single
block holds [batch, cache_len, heads, head_dim] arrays, a scanned `BlockStack` of L blocks holds
[L, batch, cache_len, heads, head_dim]. Keys are stored after RoPE. The arrays are in the model's
compute dtype. Memory and MoE layers are token-wise and have no cache; a sparse layer that looks back
over earlier tokens (Engram: its last n−1 token ids and convolution inputs) keeps its builder's
`init_state` in `LayerCache.sparse` (stacked over the layers of a scanned segment).

Prompts of different lengths are LEFT-padded: every row writes the same slot at each step (one
`dynamic_update_slice`, no scatter), and `window.start[b]` marks row b's first real slot; attention
never reads slots before it, and positions count from it, so a padded row computes what the same row
alone would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from umv2_jax.config import ModelConfig
from umv2_jax.models.kinds import get_sparse_builder
from umv2_jax.models.transformer import (
    DecodeWindow,
    KVCache,
    LayerCache,
    dtype_of,
    segment_layout,
)


def init_cache(
    config: ModelConfig, batch: int, cache_len: int, start: jax.Array | None = None
) -> KVCache:
    """A zero KV cache for `batch` rows of `cache_len` slots, window at slot 0.

    start: int32 [batch] first real slot per row (default: zeros, no padding).
    """
    if batch < 1 or cache_len < 1:
        raise ValueError(f"batch {batch} and cache_len {cache_len} must be at least 1")
    heads, head_dim = config.num_heads, config.resolved_head_dim
    dtype = dtype_of(config.compute_dtype)
    sparse_blocks = set(config.sparse_layer_indices())
    builder = get_sparse_builder(config.sparse) if sparse_blocks else None
    layers = []
    for indices in segment_layout(config):
        shape = (batch, cache_len, heads, head_dim)
        state = None
        if builder is not None and builder.init_state is not None and indices[0] in sparse_blocks:
            state = builder.init_state(config, batch)  # a segment's blocks are built alike
        if len(indices) > 1:
            shape = (len(indices), *shape)
            if state is not None:
                state = _stacked(state, len(indices))
        layers.append(
            LayerCache(key=jnp.zeros(shape, dtype), value=jnp.zeros(shape, dtype), sparse=state)
        )
    if start is None:
        start = jnp.zeros((batch,), jnp.int32)
    window = DecodeWindow(index=jnp.zeros((), jnp.int32), start=jnp.asarray(start, jnp.int32))
    return KVCache(layers=tuple(layers), window=window)


def _stacked(state, copies: int):
    """`copies` of a layer's decode state along a new leading [layers] axis."""
    return jax.tree.map(lambda leaf: jnp.stack([leaf] * copies), state)


def cache_len_of(cache: KVCache) -> int:
    """The number of slots per row (static)."""
    return int(cache.layers[0].key.shape[-3])


def cache_bytes(config: ModelConfig, batch: int, filled: int) -> int:
    """Bytes of keys and values held for `filled` slots of `batch` rows over all layers: what one
    decode step reads from the cache. 2 (key, value) · L · batch · filled · heads · head_dim · size."""
    size = jnp.dtype(dtype_of(config.compute_dtype)).itemsize
    per_slot = 2 * config.num_layers * config.num_heads * config.resolved_head_dim
    return int(per_slot * batch * filled * size)
