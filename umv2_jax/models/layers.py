"""Building blocks shared by the backbone and the sparse layers: the dtype names and the SwiGLU FFN.

Kept apart from `umv2_jax.models.transformer` so that a sparse layer (MoE's experts, the
product-key layers) can use them without importing the backbone that builds it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from umv2_jax.config import ModelConfig
from umv2_jax.models import init as init_lib


def dtype_of(name: str) -> jnp.dtype:
    """The jnp dtype a config's dtype field names ("float32" or "bfloat16")."""
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


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
