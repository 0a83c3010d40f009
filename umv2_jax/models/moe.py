"""OLMoE-style mixture of experts replacing the FFN (docs/model.md §7).

    out = MoE(config, rngs)(u, context)      # u: [batch, seq, embed] → out.y: [batch, seq, embed]

Per token `x` (T = batch·seq tokens, E experts, k = top_k):

    probs   = softmax(x @ W_r)                         # fp32 router, W_r: [embed, E]
    w, e    = top_k(probs)                             # not renormalized unless `renormalize`
    y       = Σ_j w_j · W_down[e_j]( silu(W_gate[e_j] x) * (W_up[e_j] x) )   (+ shared expert)

The layer is router → dispatch → combine (`umv2_jax.parallel.experts.routed_experts`). The dispatch
is the op `umv2_jax.ops.moe_dispatch` (stable sort of the T·k (token, slot) assignments by expert,
grouped SwiGLU experts, unsort; it picks its implementation per platform); the layer weighs the k
outputs by the router. Dispatch is dropless; with `capacity_factor > 0` each expert keeps at most
`ceil(cf·T·k/E)` assignments, the first ones in token order; the rest are dropped (contribute
nothing) and reported as `dropped_fraction`. Under a mesh the layer is token-local and expert-
parallel (tokens exchanged over `expert`, see `umv2_jax.parallel.experts`); there T is a device's
tokens (capacity is per shard) and a capacity-bounded exchange reports its drops as
`ep_dropped_fraction`.

Output (`umv2_jax.models.sparse.SparseOutput`): losses `lb` = lb_loss · E·Σ_e f_e·p_e (Switch form;
f_e = share of the T·k assignments routed to e, p_e = mean router probability) and
`z` = z_loss · mean(logsumexp(logits)²),
and the metrics `tokens_per_expert_cv`, `router_entropy`, `max_expert_fraction` (and
`dropped_fraction` in capacity mode). f_e counts the router's choices before any capacity drop.

Logical axes: router ("embed", "experts"); experts ("experts", "embed", "mlp") and
("experts", "mlp", "embed").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from umv2_jax.config import ModelConfig
from umv2_jax.models import init as init_lib
from umv2_jax.models.layers import SwiGLU, dtype_of
from umv2_jax.models.sparse import SparseBuilder, SparseContext, SparseOutput, register_sparse
from umv2_jax.ops.moe_dispatch import moe_dispatch
from umv2_jax.parallel import experts as experts_lib
from umv2_jax.parallel import mesh as parallel_mesh


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
        self.expert_parallel = moe.expert_parallel
        self.ep_capacity_factor = moe.ep_capacity_factor
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

        Under a mesh (`parallel.active_mesh()`) the routed experts run token-local and
        expert-parallel (`umv2_jax.parallel.experts`); statistics are those of the whole batch
        either way.
        With `context.diagnostics`, `row_hits` is bool [experts]: the experts this pass routed any
        token to (an expert is a row of the expert table; decode memory access counts them).
        """
        batch, seq, h = u.shape
        dtype = self.compute_dtype
        options = experts_lib.RoutedOptions(
            top_k=self.top_k,
            renormalize=self.renormalize,
            capacity_factor=self.capacity_factor,
            expert_parallel=self.expert_parallel,
            ep_capacity_factor=self.ep_capacity_factor,
            implementation=self.implementation,
            block_size=self.block_size,
        )
        y, stats = experts_lib.routed_experts(
            u.astype(dtype),
            self.router[...],
            self.gate[...],
            self.up[...],
            self.down[...],
            options,
            dispatch=moe_dispatch,  # looked up per call: tests swap in an interpreted kernel
        )
        if self.shared_expert is not None:
            y = y + self.shared_expert(u.reshape(batch * seq, h)).astype(jnp.float32).reshape(
                y.shape
            )
        y = y.astype(dtype)

        losses, metrics = self._losses(stats)
        out = SparseOutput(y=y, losses=losses, metrics=metrics, addressable_rows=self.num_experts)
        if context is not None and context.diagnostics:
            out.row_hits = stats["counts"] > 0
        return out

    def _losses(
        self, stats: experts_lib.Stats
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """(weighted auxiliary losses by type, routing diagnostics), all fp32 scalars, from the
        whole batch's routing statistics (`parallel.experts.routed_experts`)."""
        experts, tokens = self.num_experts, stats["tokens"]
        assignments = tokens * self.top_k
        count_f = stats["counts"].astype(jnp.float32)
        routed_share = count_f / assignments  # f_e (no gradient: a count)
        mean_prob = stats["prob_sum"] / tokens  # p_e
        load_balance = experts * jnp.sum(routed_share * mean_prob)
        z = stats["lse_sq_sum"] / tokens
        metrics = {
            "tokens_per_expert_cv": jnp.std(count_f) / jnp.maximum(jnp.mean(count_f), 1e-9),
            "router_entropy": stats["entropy_sum"] / tokens,
            "max_expert_fraction": jnp.max(routed_share),
        }
        if self.capacity_factor > 0:
            metrics["dropped_fraction"] = 1.0 - stats["kept"] / assignments
        mesh = parallel_mesh.active_mesh()
        if mesh is not None and mesh.shape["expert"] > 1:
            metrics["ep_dropped_fraction"] = stats["ep_dropped"] / assignments
        losses = {"lb": self.lb_weight * load_balance, "z": self.z_weight * z}
        return losses, {name: jax.lax.stop_gradient(value) for name, value in metrics.items()}


def _build_layer(config: ModelConfig, block_index: int, rngs: nnx.Rngs) -> MoE:
    del block_index
    return MoE(config, rngs)


register_sparse("moe", SparseBuilder(build_layer=_build_layer, replaces_ffn=True))
