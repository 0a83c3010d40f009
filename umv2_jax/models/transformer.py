"""The decoder-only backbone of docs/model.md §1 in Flax NNX.

    x_mid  = x + Attn(RMSNorm_attn(x))
    u      = RMSNorm_ffn(x_mid)
    x_next = x_mid + FFN(u) + Sparse(u)

Dtype policy: parameters are stored in `param_dtype` (fp32 or bf16); matmuls run in `compute_dtype`
(bf16 or fp32); norms, softmax and logits are computed in fp32.

Logical axis names on parameters: `vocab`, `embed`, `heads`, `kv`, `mlp`, `norm`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from umv2_jax.config import ModelConfig
from umv2_jax.models import init as init_lib
from umv2_jax.models.kinds import get_sparse_builder
from umv2_jax.models.layers import SwiGLU, dtype_of  # noqa: F401 (dtype_of: re-exported)
from umv2_jax.models.sparse import SparseContext, SparseOutput
from umv2_jax.ops.attention import attention as attention_op


class RMSNorm(nnx.Module):
    """y = x / rms(x) · γ over the last axis, computed in fp32. x: [..., dim]."""

    def __init__(self, dim: int, eps: float, rngs: nnx.Rngs, axis_name: str = "norm"):
        del rngs
        self.eps = eps
        self.scale = nnx.Param(
            jnp.ones((dim,), jnp.float32), sharding_names=(axis_name,), eager_sharding=False
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...]).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (rotate-half form). x: [batch, seq, heads, head_dim]; positions: [batch, seq]."""
    head_dim = x.shape[-1]
    half = head_dim // 2
    frequencies = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * frequencies  # [batch, seq, half]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nnx.Module):
    """Causal multi-head attention with RoPE and optional QK-norm; no biases."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        h, n, d = config.d_model, config.num_heads, config.resolved_head_dim
        std = init_lib.truncated_normal(init_lib.backbone_std(config))
        out_std = init_lib.truncated_normal(init_lib.output_std(config))
        self.num_heads, self.head_dim = n, d
        self.rope_theta = config.rope_theta
        self.compute_dtype = dtype_of(config.compute_dtype)
        self.implementation, self.chunk = config.attention, config.attention_chunk
        self.query = init_lib.make_param(rngs, std, (h, n, d), ("embed", "heads", "kv"))
        self.key = init_lib.make_param(rngs, std, (h, n, d), ("embed", "heads", "kv"))
        self.value = init_lib.make_param(rngs, std, (h, n, d), ("embed", "heads", "kv"))
        self.out = init_lib.make_param(rngs, out_std, (n, d, h), ("heads", "kv", "embed"))
        if config.qk_norm:
            self.query_norm = RMSNorm(d, config.norm_eps, rngs, axis_name="kv")
            self.key_norm = RMSNorm(d, config.norm_eps, rngs, axis_name="kv")
        else:
            self.query_norm = None
            self.key_norm = None

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        cache: LayerCache | None = None,
        window: DecodeWindow | None = None,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, LayerCache]:
        """x: [batch, seq, embed], positions: [batch, seq] → [batch, seq, embed].

        Without a cache: `umv2_jax.ops.attention` (model.attention, model.attention_chunk), which
        computes `dot_product_attention(q, k, v, is_causal=True)` without the f32 score matrix;
        with segment_ids ([batch, seq] document ids of a packed row) a query attends only keys of
        its own document. A cached pass takes no segment ids.
        With `cache` (this layer's keys and values, [batch, cache_len, heads, head_dim] each) and
        `window` (where the new tokens go): the new keys and values are written at slots
        window.index … window.index + seq − 1, every query attends the cached slots s with
        window.start[b] <= s <= its own slot, and the result is (output, updated cache). Plain JAX:

            keys = lax.dynamic_update_slice_in_dim(cache.key, k, index, axis=1)
            mask[b, i, s] = start[b] <= s <= index + i
            out  = dot_product_attention(q, keys, values, mask=mask[:, None])
        """
        dtype = self.compute_dtype
        x = x.astype(dtype)
        q = jnp.einsum("bse,end->bsnd", x, self.query[...].astype(dtype))
        k = jnp.einsum("bse,end->bsnd", x, self.key[...].astype(dtype))
        v = jnp.einsum("bse,end->bsnd", x, self.value[...].astype(dtype))
        if self.query_norm is not None:
            q, k = self.query_norm(q), self.key_norm(k)
        q = rope(q, positions, self.rope_theta)
        k = rope(k, positions, self.rope_theta)
        if cache is None:  # memory-efficient: never f32 [batch, heads, seq, seq] (ops.attention)
            attended = attention_op(
                q,
                k,
                v,
                causal=True,
                implementation=self.implementation,
                chunk=self.chunk,
                segment_ids=segment_ids,
            )
            return jnp.einsum("bsnd,nde->bse", attended, self.out[...].astype(dtype))
        keys = jax.lax.dynamic_update_slice_in_dim(
            cache.key, k.astype(cache.key.dtype), window.index, axis=1
        )
        values = jax.lax.dynamic_update_slice_in_dim(
            cache.value, v.astype(cache.value.dtype), window.index, axis=1
        )
        slots = jnp.arange(keys.shape[1], dtype=jnp.int32)
        query_slots = window.index + jnp.arange(x.shape[1], dtype=jnp.int32)
        mask = (slots[None, None, :] <= query_slots[None, :, None]) & (
            slots[None, None, :] >= window.start[:, None, None]
        )  # [batch, seq, cache_len]
        attended = jax.nn.dot_product_attention(
            q, keys.astype(dtype), values.astype(dtype), mask=mask[:, None]
        )
        out = jnp.einsum("bsnd,nde->bse", attended, self.out[...].astype(dtype))
        return out, LayerCache(key=keys, value=values)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    """One attention layer's preallocated keys and values: [batch, cache_len, heads, head_dim] each
    ([layers, batch, …] for a scanned `BlockStack`), RoPE already applied to the keys.

    sparse: the block's sparse-layer decode state (a pytree from its builder's `init_state`, with
    a leading [layers] axis in a stack), or None for token-wise layers (every kind but Engram)."""

    key: jax.Array
    value: jax.Array
    sparse: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeWindow:
    """Where a cached forward pass writes: the same slots for every row (prompts are left-padded).

    index: int32 scalar, the slot of the pass's first token.
    start: int32 [batch], each row's first real slot; slots before it are padding, never attended.
    """

    index: jax.Array
    start: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """The whole model's cache for incremental decoding (built by `umv2_jax.inference.cache`).

    layers: one LayerCache per segment of the model's layout (`segment_layout`), in order.
    window: the slots the next pass writes (index) and each row's first real slot (start).
    """

    layers: tuple[LayerCache, ...]
    window: DecodeWindow


class Block(nnx.Module):
    """Pre-norm block: attention, then FFN ∥ sparse layer on the same normalized input.

    `self.sparse` is the slot a sparse layer plugs into (None for a dense block). The block holds no
    Python attribute that differs between layers, so identical blocks stack for scan over layers.
    """

    def __init__(
        self,
        config: ModelConfig,
        rngs: nnx.Rngs,
        sparse: nnx.Module | None = None,
        has_ffn: bool = True,
    ):
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps, rngs)
        self.attn = Attention(config, rngs)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps, rngs)
        self.ffn = SwiGLU(config, config.d_ff, rngs) if has_ffn and config.d_ff > 0 else None
        self.sparse = sparse

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        context: SparseContext,
        sparse_input: jax.Array | None = None,
        cache: LayerCache | None = None,
        window: DecodeWindow | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, SparseOutput | None, LayerCache | None]:
        """x: [batch, seq, embed] → (x_next, u, stats, cache).

        u: this block's normalized FFN input [batch, seq, embed] (an input tap for skip wiring).
        sparse_input: what the sparse layer reads instead of u (UltraMem v1's skip-layer wiring).
        stats: the sparse layer's output without `y` (losses, metrics, row hits), or None.
        cache, window: the attention's KV cache and where to write (see `Attention`); the updated
        cache is returned (None without one). The FFN is token-wise; a sparse layer that looks back
        over earlier tokens (Engram) reads and returns its state in `cache.sparse`.
        segment_ids: [batch, seq] document ids of packed rows for the attention and the sparse
        layer (not with a cache), or None.
        """
        sparse_state = cache.sparse if cache is not None else None
        if cache is None:
            attended = self.attn(self.attn_norm(x), positions, segment_ids=segment_ids)
        else:
            attended, cache = self.attn(self.attn_norm(x), positions, cache, window)
        x_mid = x + attended.astype(x.dtype)
        u = self.ffn_norm(x_mid)
        x_next = x_mid
        ffn_out = None
        if self.ffn is not None:
            ffn_out = self.ffn(u)
            x_next = x_next + ffn_out.astype(x.dtype)
        if self.sparse is None:
            return x_next, u, None, cache
        context = dataclasses.replace(
            context, segment_ids=segment_ids, state=sparse_state, window=window
        )
        out = self.sparse(u if sparse_input is None else sparse_input, context)
        x_next = x_next + out.y.astype(x.dtype)
        metrics = dict(out.metrics)
        if ffn_out is not None:  # docs/model.md §6: memory vs FFN output std, side by side
            metrics["ffn_output_std"] = jnp.std(jax.lax.stop_gradient(ffn_out).astype(jnp.float32))
        if cache is not None:
            cache = LayerCache(key=cache.key, value=cache.value, sparse=out.state)
        return x_next, u, dataclasses.replace(out, y=None, metrics=metrics, state=None), cache


class BlockStack(nnx.Module):
    """Identical blocks with every variable stacked along a leading `layers` axis, run by lax.scan.

    Built from already-initialized blocks (so a stacked model holds exactly the numbers the loop
    model would), their states stacked leaf by leaf; each variable's logical axes gain a leading
    "layers". `indices` are the blocks' positions in the model.
    """

    def __init__(self, blocks: list[Block], indices: tuple[int, ...]):
        graphdefs, states = zip(*(nnx.split(block) for block in blocks))
        if any(graphdef != graphdefs[0] for graphdef in graphdefs[1:]):
            raise ValueError(f"blocks {indices} differ in structure and cannot be stacked")
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
        self.layers = nnx.merge(graphdefs[0], stacked)
        for _, variable in nnx.iter_graph(self.layers):
            if isinstance(variable, nnx.Variable):
                axes = variable.get_metadata().get("out_sharding")
                if axes is not None:
                    variable.set_metadata(out_sharding=("layers", *axes))
        self.indices = tuple(indices)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        context: SparseContext,
        remat: str,
        cache: LayerCache | None = None,
        window: DecodeWindow | None = None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, SparseOutput | None] | tuple[jax.Array, SparseOutput | None, LayerCache]:
        """x: [batch, seq, embed] → (x after the last block, stats with a leading [layers] axis).

        positions, segment_ids: [batch, seq], the same for every layer (segment_ids may be None).

        With `cache` (a LayerCache with a leading [layers] axis) also the updated cache, third.
        Every layer sees the model's whole `context.shared`; a memory layer takes its own window of
        tables inside the body (see `_layer_shared` for why not per-layer scan inputs).
        """
        graphdef, state = nnx.split(self.layers)
        if cache is not None:

            def cached_body(carry, layer):
                layer_state, layer_cache = layer
                block = nnx.merge(graphdef, layer_state)
                x_next, _, stats, layer_cache = block(
                    carry, positions, context, cache=layer_cache, window=window
                )
                return x_next, (stats, layer_cache)

            x, (stats, cache) = jax.lax.scan(cached_body, x, (state, cache))
            return x, stats, cache

        def body(carry, layer_state):
            block = nnx.merge(graphdef, layer_state)
            x_next, _, stats, _ = block(carry, positions, context, segment_ids=segment_ids)
            return x_next, stats

        body = _rematerialize(body, remat, prevent_cse=False)
        return jax.lax.scan(body, x, state)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelAux:
    """Everything a forward pass reports besides the logits.

    losses:   {type: fp32 scalar} weighted auxiliary losses summed over layers (`lb`, `z`, …).
    metrics:  {"layer{i}/{name}": fp32 scalar} per-layer diagnostics, each layer's losses among them
              as "layer{i}/loss/{type}" (values only: the gradient flows through `losses`).
    row_hits: {block index: bool [rows]} rows each memory layer read (only with diagnostics).
    addressable: {block index: fp32 scalar} rows each of those layers can reach.
    row_counts: {block index: int32 [rows]} tokens that read each row (only with diagnostics and a
              `token_mask`; layers that count: UltraMemV2).
    cache:    the updated KVCache of a cached pass (`Transformer(..., cache=…)`), else None.
    """

    losses: dict[str, jax.Array]
    metrics: dict[str, jax.Array]
    row_hits: dict[int, jax.Array]
    addressable: dict[int, jax.Array]
    cache: KVCache | None = None
    row_counts: dict[int, jax.Array] = dataclasses.field(default_factory=dict)


class Transformer(nnx.Module):
    """Decoder-only LM. tokens: [batch, seq] int32 → logits [batch, seq, padded_vocab] fp32.

    With `config.scan_layers` the blocks are grouped as `segment_layout(config)` says: runs of
    identical blocks become one `BlockStack` each (one lax.scan), the rest stay single blocks.
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        sparse_blocks = set(config.sparse_layer_indices())
        builder = get_sparse_builder(config.sparse) if sparse_blocks else None
        scope = builder.init_scope if builder is not None else None
        with scope(config) if scope is not None else contextlib.nullcontext():
            self._build(config, rngs, builder, sparse_blocks)

    def _build(self, config: ModelConfig, rngs: nnx.Rngs, builder, sparse_blocks: set[int]) -> None:
        self.config = config
        h, vocab = config.d_model, config.padded_vocab_size
        self.compute_dtype = dtype_of(config.compute_dtype)
        self.remat = config.remat
        self.embed = init_lib.make_param(
            rngs,
            init_lib.truncated_normal(init_lib.backbone_std(config)),
            (vocab, h),
            ("vocab", "embed"),
        )
        if builder is not None and builder.build_shared is not None:
            self.shared = builder.build_shared(config, rngs)
        else:
            self.shared = None
        blocks = []
        for index in range(config.num_layers):
            sparse = builder.build_layer(config, index, rngs) if index in sparse_blocks else None
            has_ffn = not (sparse is not None and builder.replaces_ffn)
            blocks.append(Block(config, rngs, sparse=sparse, has_ffn=has_ffn))
        self.layout = segment_layout(config)
        self.sparse_sources = tuple(sorted(sparse_input_blocks(config).items()))
        self.blocks = nnx.List(
            [
                BlockStack([blocks[i] for i in indices], indices)
                if len(indices) > 1
                else blocks[indices[0]]
                for indices in self.layout
            ]
        )
        self.final_norm = RMSNorm(h, config.norm_eps, rngs)
        if config.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = init_lib.make_param(
                rngs,
                init_lib.truncated_normal(init_lib.backbone_std(config)),
                (h, vocab),
                ("embed", "vocab"),
            )
        # Created in fp32 (so `param_dtype` never changes the draw), then stored as configured.
        init_lib.store_params(self, config.param_dtype)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        *,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
        diagnostics: bool = False,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        segment_ids: jax.Array | None = None,
        token_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, ModelAux]:
        """tokens: [batch, seq] → (logits [batch, seq, padded_vocab] fp32, ModelAux).

        positions: int [batch, seq], each token's RoPE position (default 0 … seq − 1 per row).
        segment_ids: int [batch, seq] for packed rows: one id per document (1, 2, …; 0 marks
        padding), so every attention layer masks attention across documents; pass positions that
        restart at 0 with each document, and a document's logits are those of the document alone.
        None: one sequence per row, as before. Not with `cache`.

        return_hidden: return the final-normed hidden states [batch, seq, embed] fp32 instead of
        the logits (the loss applies `head_matrix()` in vocabulary chunks: ops.cross_entropy).

        diagnostics: also compute the evaluation-only statistics (memory row-hit masks).
        token_mask: with diagnostics, [batch, seq] 0/1 weights: memory layers also count, per row,
        the tokens (mask 1) that read it (`aux.row_counts`).
        cache: incremental decoding (`umv2_jax.inference`): the tokens are written at slots
        cache.window.index … + seq − 1 of every row and attend that row's cached slots from
        cache.window.start on; positions default to slot − start (each row counts from its first
        real token). `aux.cache` is the updated cache, its index advanced by seq.
        """
        if segment_ids is not None and cache is not None:
            raise ValueError("Transformer: segment_ids (packed documents) cannot go with a cache")
        if positions is None and cache is not None:
            slots = cache.window.index + jnp.arange(tokens.shape[1], dtype=jnp.int32)
            positions = jnp.maximum(slots[None, :] - cache.window.start[:, None], 0)
        elif positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.compute_dtype)
        context = SparseContext(
            shared=self.shared,
            deterministic=deterministic,
            dropout_rng=dropout_rng,
            diagnostics=diagnostics,
            token_mask=token_mask if diagnostics else None,
            token_ids=tokens,
        )
        aux = ModelAux(losses={}, metrics={}, row_hits={}, addressable={})
        sources = dict(self.sparse_sources)
        tapped = set(sources.values())
        taps: dict[int, jax.Array] = {}
        window = cache.window if cache is not None else None
        new_layers: list[LayerCache] = []
        for number, (segment, indices) in enumerate(zip(self.blocks, self.layout)):
            layer_cache = cache.layers[number] if cache is not None else None
            if isinstance(segment, BlockStack):
                if layer_cache is None:
                    x, stats = segment(x, positions, context, self.remat, segment_ids=segment_ids)
                else:
                    x, stats, layer_cache = segment(
                        x, positions, context, self.remat, layer_cache, window
                    )
                    new_layers.append(layer_cache)
                if stats is not None:
                    for position, index in enumerate(indices):
                        _record(aux, index, jax.tree.map(lambda v, p=position: v[p], stats))
                continue
            (index,) = indices
            source = sources.get(index, index)
            sparse_input = taps[source] if source != index else None
            shared = _layer_shared(self.shared, index)
            block_context = (
                context if shared is None else dataclasses.replace(context, shared=shared)
            )
            if layer_cache is None:
                x, u, stats, _ = _call_block(
                    segment, x, positions, block_context, sparse_input, self.remat, segment_ids
                )
            else:  # decoding: no backward pass, so no rematerialization
                x, u, stats, layer_cache = segment(
                    x, positions, block_context, sparse_input, cache=layer_cache, window=window
                )
                new_layers.append(layer_cache)
            if index in tapped:
                taps[index] = u
            if stats is not None:
                _record(aux, index, stats)
        x = self.final_norm(x).astype(jnp.float32)
        if cache is not None:
            advanced = DecodeWindow(index=window.index + tokens.shape[1], start=window.start)
            aux.cache = KVCache(layers=tuple(new_layers), window=advanced)
        if return_hidden:
            return x, aux
        head = self.head_matrix()
        logits = x.astype(self.compute_dtype) @ head.astype(self.compute_dtype)
        return logits.astype(jnp.float32), aux

    def head_matrix(self) -> jax.Array:
        """The LM head [embed, padded_vocab] as stored (param dtype): `embed.T` when tied.

        logits = (hidden.astype(compute_dtype) @ head.astype(compute_dtype)).astype(float32).
        """
        return self.embed[...].T if self.lm_head is None else self.lm_head[...]


def sparse_input_blocks(config: ModelConfig) -> dict[int, int]:
    """{block: block whose normalized input its sparse layer reads} where that is another block
    (UltraMem v1's skip-layer wiring); empty for every other model."""
    if config.sparse != "ultramem":
        return {}
    return {target: source for source, target in config.ultramem.skip_layers if source != target}


def segment_layout(config: ModelConfig) -> tuple[tuple[int, ...], ...]:
    """How the blocks are grouped: a tuple of segments, each a tuple of consecutive block indices.

    Without scan every block is its own segment. With scan, maximal runs of blocks that are built
    alike (same sparse slot, same FFN, no skip wiring into or out of them) form one segment each;
    a run of one stays a single block.
    """
    blocks = range(config.num_layers)
    if not config.resolved_scan_layers:
        return tuple((index,) for index in blocks)
    sparse_blocks = set(config.sparse_layer_indices())
    replaces_ffn = bool(sparse_blocks) and get_sparse_builder(config.sparse).replaces_ffn
    sources = sparse_input_blocks(config)
    wired = set(sources) | set(sources.values())

    def signature(index: int):
        if index in wired:
            return ("wired", index)  # never equal to a neighbour's: stays a single block
        has_sparse = index in sparse_blocks
        return (has_sparse, not (has_sparse and replaces_ffn))

    segments: list[list[int]] = []
    for index in blocks:
        if segments and signature(segments[-1][-1]) == signature(index):
            segments[-1].append(index)
        else:
            segments.append([index])
    return tuple(tuple(segment) for segment in segments)


def convert_block_tree(
    blocks: dict, source_layout: tuple[tuple[int, ...], ...], target_layout
) -> dict:
    """Regroups the `blocks` subtree of a pure-dict state (parameters, optimizer moments, the rest)
    from one segment layout to another, e.g. a loop checkpoint's params to a scanned model's.

    blocks: {segment: tree} as `nnx.State.to_pure_dict()` gives it (a stacked segment's tree is
    {"layers": tree with a leading [layers] axis}; segments without state may be absent). Returns the
    same numbers regrouped.
    """
    per_block: dict[int, Any] = {}
    for segment, indices in enumerate(source_layout):
        if segment not in blocks:  # e.g. dense blocks in a tree of non-trainable state
            continue
        tree = blocks[segment]
        if len(indices) == 1:
            per_block[indices[0]] = tree
            continue
        for position, index in enumerate(indices):
            per_block[index] = jax.tree.map(lambda v, p=position: v[p], tree["layers"])
    converted = {}
    for segment, indices in enumerate(target_layout):
        if any(index not in per_block for index in indices):
            continue
        if len(indices) == 1:
            converted[segment] = per_block[indices[0]]
        else:
            trees = [per_block[index] for index in indices]
            converted[segment] = {"layers": jax.tree.map(lambda *v: jnp.stack(v), *trees)}
    return converted


def _layer_shared(shared: Any, block: int) -> Any:
    """What the sparse layer of a single (unscanned) block reads as `context.shared`, or None for
    the model's whole shared module. A shared module with `layer_view` (UltraMemV2's
    `MemoryTables`) hands the layer only its own window of tables, a static slice, so the layer's
    table gradient is window-sized. A BlockStack's layers instead take their window inside the scan
    body from the whole stack (their `window` array; the transpose adds the window-sized gradient
    into the scan's constant-cotangent accumulator in place): on XLA:CPU that plans ~1 stack of
    temporaries less than per-layer views as scan inputs (xs), whose stacked gradient (ys) is one
    more stack-sized buffer (measured: `umv2_jax.models.ultramem_v2`)."""
    if shared is None or not hasattr(shared, "layer_view"):
        return None
    if block not in dict(shared.layer_windows):
        return None  # a block without a memory layer
    return shared.layer_view(block)


def _call_block(block, x, positions, context, sparse_input, remat: str, segment_ids=None):
    """One block, rematerialized as `remat` says ("none": a plain call)."""
    if remat == "none":
        return block(x, positions, context, sparse_input, segment_ids=segment_ids)
    graphdef, state = nnx.split(block)

    def run(state, x, sparse_input):
        return nnx.merge(graphdef, state)(
            x, positions, context, sparse_input, segment_ids=segment_ids
        )

    return _rematerialize(run, remat)(state, x, sparse_input)


def _rematerialize(fn, remat: str, prevent_cse: bool = True):
    """fn under jax.checkpoint with the policy `remat` names (model.remat)."""
    if remat == "none":
        return fn
    policy = None if remat == "full" else jax.checkpoint_policies.dots_saveable
    return jax.checkpoint(fn, policy=policy, prevent_cse=prevent_cse)


def _record(aux: ModelAux, index: int, stats: SparseOutput) -> None:
    for name, value in stats.losses.items():
        total = aux.losses.get(name, jnp.zeros((), jnp.float32))
        aux.losses[name] = total + value.astype(jnp.float32)
        # Each layer's share stays visible in the logs, as a metric (no gradient).
        aux.metrics[f"layer{index}/loss/{name}"] = jax.lax.stop_gradient(value).astype(jnp.float32)
    for name, value in stats.metrics.items():
        aux.metrics[f"layer{index}/{name}"] = jnp.asarray(value, jnp.float32)
    if stats.row_hits is not None:
        aux.row_hits[index] = stats.row_hits
        aux.addressable[index] = jnp.asarray(stats.addressable_rows, jnp.float32)
    if stats.row_counts is not None:
        aux.row_counts[index] = stats.row_counts


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameter scalars."""
    state = nnx.state(model, nnx.Param)
    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(state))
