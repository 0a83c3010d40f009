"""The decoder-only backbone of SPEC §1 in Flax NNX.

    x_mid  = x + Attn(RMSNorm_attn(x))
    u      = RMSNorm_ffn(x_mid)
    x_next = x_mid + FFN(u) + Sparse(u)

Dtype policy: parameters are stored in `param_dtype` (fp32); matmuls run in `compute_dtype`
(bf16 or fp32); norms, softmax and logits are computed in fp32.

Logical axis names on parameters: `vocab`, `embed`, `heads`, `kv`, `mlp`, `norm`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from umv2_jax.config import ModelConfig
from umv2_jax.models import init as init_lib
from umv2_jax.models.sparse import SparseContext, get_sparse_builder


def dtype_of(name: str) -> jnp.dtype:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


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

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x: [batch, seq, embed], positions: [batch, seq] → [batch, seq, embed]."""
        dtype = self.compute_dtype
        x = x.astype(dtype)
        q = jnp.einsum("bse,end->bsnd", x, self.query[...].astype(dtype))
        k = jnp.einsum("bse,end->bsnd", x, self.key[...].astype(dtype))
        v = jnp.einsum("bse,end->bsnd", x, self.value[...].astype(dtype))
        if self.query_norm is not None:
            q, k = self.query_norm(q), self.key_norm(k)
        q = rope(q, positions, self.rope_theta)
        k = rope(k, positions, self.rope_theta)
        attended = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return jnp.einsum("bsnd,nde->bse", attended, self.out[...].astype(dtype))


class SwiGLU(nnx.Module):
    """W_down(silu(W_gate u) * (W_up u)), inner width `d_ff`; no biases."""

    def __init__(self, config: ModelConfig, d_ff: int, rngs: nnx.Rngs):
        h = config.d_model
        std = init_lib.truncated_normal(init_lib.backbone_std(config))
        out_std = init_lib.truncated_normal(init_lib.output_std(config))
        self.compute_dtype = dtype_of(config.compute_dtype)
        self.gate = init_lib.make_param(rngs, std, (h, d_ff), ("embed", "mlp"))
        self.up = init_lib.make_param(rngs, std, (h, d_ff), ("embed", "mlp"))
        self.down = init_lib.make_param(rngs, out_std, (d_ff, h), ("mlp", "embed"))

    def __call__(self, u: jax.Array) -> jax.Array:
        """u: [..., embed] → [..., embed]."""
        dtype = self.compute_dtype
        u = u.astype(dtype)
        hidden = jax.nn.silu(u @ self.gate[...].astype(dtype)) * (u @ self.up[...].astype(dtype))
        return hidden @ self.down[...].astype(dtype)


class Block(nnx.Module):
    """Pre-norm block: attention, then FFN ∥ sparse layer on the same normalized input.

    `self.sparse` is the slot a sparse layer plugs into (None for a dense block). It reads the
    normalized input of block `self.sparse.input_block` (its own block unless wired otherwise).
    """

    def __init__(
        self,
        config: ModelConfig,
        index: int,
        rngs: nnx.Rngs,
        sparse: nnx.Module | None = None,
        has_ffn: bool = True,
    ):
        self.index = index
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps, rngs)
        self.attn = Attention(config, rngs)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps, rngs)
        self.ffn = SwiGLU(config, config.d_ff, rngs) if has_ffn and config.d_ff > 0 else None
        self.sparse = sparse

    def __call__(
        self, x: jax.Array, positions: jax.Array, context: SparseContext
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x: [batch, seq, embed] → (x_next, aux)."""
        x_mid = x + self.attn(self.attn_norm(x), positions).astype(x.dtype)
        u = self.ffn_norm(x_mid)
        context.taps[self.index] = u
        x_next = x_mid
        ffn_out = None
        if self.ffn is not None:
            ffn_out = self.ffn(u)
            x_next = x_next + ffn_out.astype(x.dtype)
        aux: dict[str, jax.Array] = {}
        if self.sparse is not None:
            source = getattr(self.sparse, "input_block", self.index)
            y, aux = self.sparse(context.taps[source], context)
            x_next = x_next + y.astype(x.dtype)
            if ffn_out is not None:  # SPEC §6: memory vs FFN output std, side by side
                aux = {**aux, "ffn_output_std": jnp.std(ffn_out.astype(jnp.float32))}
        return x_next, aux


class Transformer(nnx.Module):
    """Decoder-only LM. tokens: [batch, seq] int32 → logits [batch, seq, padded_vocab] fp32."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        h, vocab = config.d_model, config.padded_vocab_size
        self.compute_dtype = dtype_of(config.compute_dtype)
        self.embed = init_lib.make_param(
            rngs,
            init_lib.truncated_normal(init_lib.backbone_std(config)),
            (vocab, h),
            ("vocab", "embed"),
        )
        sparse_blocks = set(config.sparse_layer_indices())
        builder = get_sparse_builder(config.sparse) if sparse_blocks else None
        if builder is not None and builder.build_shared is not None:
            self.shared = builder.build_shared(config, rngs)
        else:
            self.shared = None
        blocks = []
        for index in range(config.num_layers):
            sparse = builder.build_layer(config, index, rngs) if index in sparse_blocks else None
            has_ffn = not (sparse is not None and builder.replaces_ffn)
            blocks.append(Block(config, index, rngs, sparse=sparse, has_ffn=has_ffn))
        self.blocks = nnx.List(blocks)
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

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        *,
        deterministic: bool = True,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """tokens: [batch, seq] → (logits [batch, seq, padded_vocab] fp32, aux {name: scalar})."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.compute_dtype)
        context = SparseContext(
            shared=self.shared, deterministic=deterministic, dropout_rng=dropout_rng
        )
        aux: dict[str, jax.Array] = {}
        for block in self.blocks:
            x, block_aux = block(x, positions, context)
            aux.update({f"layer{block.index}/{name}": value for name, value in block_aux.items()})
        x = self.final_norm(x).astype(jnp.float32)
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        logits = x.astype(self.compute_dtype) @ head.astype(self.compute_dtype)
        return logits.astype(jnp.float32), aux


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameter scalars."""
    state = nnx.state(model, nnx.Param)
    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(state))
