"""OLMoE-style mixture of experts replacing the FFN (SPEC §7).

    out = MoE(config, rngs)(u, context)      # u: [batch, seq, embed] → out.y: [batch, seq, embed]

Per token `x` (T = batch·seq tokens, E experts, k = top_k):

    probs   = softmax(x @ W_r)                         # fp32 router, W_r: [embed, E]
    w, e    = top_k(probs)                             # not renormalized unless `renormalize`
    y       = Σ_j w_j · W_down[e_j]( silu(W_gate[e_j] x) * (W_up[e_j] x) )   (+ shared expert)

The layer is router → dispatch → combine. The dispatch is the op `umv2_jax.ops.moe_dispatch` (stable
sort of the T·k (token, slot) assignments by expert, grouped SwiGLU experts, unsort; it picks its
implementation per platform); the layer weighs the k outputs by the router. Dispatch is dropless; with
`capacity_factor > 0` each expert keeps at most `ceil(cf·T·k/E)` assignments, the first ones in token
order; the rest are dropped (contribute nothing) and reported as `dropped_fraction`.

Output (`umv2_jax.models.sparse.SparseOutput`): losses `lb` = lb_loss · E·Σ_e f_e·p_e (Switch form;
f_e = share of the T·k assignments routed to e, p_e = mean router probability) and
`z` = z_loss · mean(logsumexp(logits)²),
and the metrics `tokens_per_expert_cv`, `router_entropy`, `max_expert_fraction` (and
`dropped_fraction` in capacity mode). f_e counts the router's choices before any capacity drop.

Logical axes: router ("embed", "experts"); experts ("experts", "embed", "mlp") and
("experts", "mlp", "embed").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from umv2_jax.config import ModelConfig
from umv2_jax.models import init as init_lib
from umv2_jax.models.sparse import SparseBuilder, SparseContext, SparseOutput, register_sparse
from umv2_jax.models.transformer import SwiGLU, dtype_of
from umv2_jax.ops.moe_dispatch import moe_dispatch


class MoE(nnx.Module):
    """Top-k routed SwiGLU experts with dropless (or capacity-limited) grouped-matmul dispatch."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        moe = config.moe
        h, experts, d_e = config.d_model, moe.num_experts, moe.expert_d_ff
        std = init_lib.truncated_normal(init_lib.backbone_std(config))
        out_std = init_lib.truncated_normal(init_lib.output_std(config))
        self.num_experts = experts
        self.expert_d_ff = d_e
        self.top_k = moe.top_k
        self.renormalize = moe.renormalize
        self.capacity_factor = moe.capacity_factor
        self.lb_weight = moe.lb_loss
        self.z_weight = moe.z_loss
        self.implementation = moe.implementation
        self.block_size = moe.block_size
        self.compute_dtype = dtype_of(config.compute_dtype)
        self.router = init_lib.make_param(rngs, std, (h, experts), ("embed", "experts"))
        self.gate = init_lib.make_param(rngs, std, (experts, h, d_e), ("experts", "embed", "mlp"))
        self.up = init_lib.make_param(rngs, std, (experts, h, d_e), ("experts", "embed", "mlp"))
        self.down = init_lib.make_param(
            rngs, out_std, (experts, d_e, h), ("experts", "mlp", "embed")
        )
        if moe.shared_expert_d_ff > 0:
            self.shared_expert = SwiGLU(config, moe.shared_expert_d_ff, rngs)
        else:
            self.shared_expert = None

    def __call__(self, u: jax.Array, context: SparseContext | None = None) -> SparseOutput:
        """u: [batch, seq, embed] → SparseOutput (y [batch, seq, embed] in compute dtype).

        With `context.diagnostics`, `row_hits` is bool [experts]: the experts this pass routed any
        token to (an expert is a row of the expert table; decode memory access counts them).
        """
        batch, seq, h = u.shape
        tokens, k, experts = batch * seq, self.top_k, self.num_experts
        dtype = self.compute_dtype
        x = u.reshape(tokens, h)

        # Router in fp32 at full precision: the top-k choice is sensitive to rounding.
        logits = jnp.dot(
            x.astype(jnp.float32),
            self.router[...].astype(jnp.float32),
            precision=jax.lax.Precision.HIGHEST,
        )  # [T, E]
        probs = jax.nn.softmax(logits, axis=-1)
        weights, chosen = jax.lax.top_k(probs, k)  # [T, k]
        if self.renormalize:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)

        # Assignment a = t·k + j is (token t, slot j); flat order is token order.
        counts = jnp.zeros((experts,), jnp.int32).at[chosen.reshape(tokens * k)].add(1)
        capacity = None
        if self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * tokens * k / experts)
        expert_out, kept = self._dispatch_experts_combine(x.astype(dtype), chosen, capacity)
        kept = kept.reshape(tokens * k) if capacity is not None else None
        combine = weights.reshape(tokens * k)
        if kept is not None:
            combine = jnp.where(kept, combine, 0.0)
        # As a contraction over the k slots: several times faster on CPU than multiply-then-sum.
        y = jnp.einsum(
            "tkh,tk->th",
            expert_out.astype(jnp.float32).reshape(tokens, k, h),
            combine.reshape(tokens, k),
            precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )
        if self.shared_expert is not None:
            y = y + self.shared_expert(x).astype(jnp.float32)
        y = y.astype(dtype).reshape(batch, seq, h)

        losses, metrics = self._losses(logits, probs, counts, tokens * k)
        if kept is not None:
            metrics["dropped_fraction"] = jax.lax.stop_gradient(
                1.0 - jnp.mean(kept.astype(jnp.float32))
            )
        out = SparseOutput(y=y, losses=losses, metrics=metrics, addressable_rows=experts)
        if context is not None and context.diagnostics:
            out.row_hits = counts > 0
        return out

    def _dispatch_experts_combine(
        self, x: jax.Array, chosen: jax.Array, capacity: int | None
    ) -> tuple[jax.Array, jax.Array]:
        """x: [T, embed], chosen: [T, k] experts → (each assignment's expert output [T, k, embed],
        kept [T, k]); the `moe_dispatch` op picks its implementation."""
        return moe_dispatch(
            x,
            chosen,
            self.gate[...],
            self.up[...],
            self.down[...],
            capacity=capacity,
            implementation=self.implementation,
            block_size=self.block_size,
        )

    def _losses(
        self, logits: jax.Array, probs: jax.Array, counts: jax.Array, assignments: int
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """(weighted auxiliary losses by type, routing diagnostics), all fp32 scalars."""
        experts = self.num_experts
        routed_share = counts.astype(jnp.float32) / assignments  # f_e (no gradient: a count)
        mean_prob = jnp.mean(probs, axis=0)  # p_e
        load_balance = experts * jnp.sum(routed_share * mean_prob)
        z = jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
        count_f = counts.astype(jnp.float32)
        entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
        metrics = {
            "tokens_per_expert_cv": jnp.std(count_f) / jnp.maximum(jnp.mean(count_f), 1e-9),
            "router_entropy": jnp.mean(entropy),
            "max_expert_fraction": jnp.max(routed_share),
        }
        losses = {"lb": self.lb_weight * load_balance, "z": self.z_weight * z}
        return losses, {name: jax.lax.stop_gradient(value) for name, value in metrics.items()}


def _build_layer(config: ModelConfig, block_index: int, rngs: nnx.Rngs) -> MoE:
    del block_index
    return MoE(config, rngs)


register_sparse("moe", SparseBuilder(build_layer=_build_layer, replaces_ffn=True))
