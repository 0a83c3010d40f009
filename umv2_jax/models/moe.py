"""OLMoE-style mixture of experts replacing the FFN (SPEC §7).

    y, aux = MoE(config, rngs)(u, context)      # u: [batch, seq, embed] → y: [batch, seq, embed]

Per token `x` (T = batch·seq tokens, E experts, k = top_k):

    probs   = softmax(x @ W_r)                         # fp32 router, W_r: [embed, E]
    w, e    = top_k(probs)                             # not renormalized unless `renormalize`
    y       = Σ_j w_j · W_down[e_j]( silu(W_gate[e_j] x) * (W_up[e_j] x) )   (+ shared expert)

Dispatch is dropless: the T·k (token, slot) assignments are stably sorted by expert, the expert
SwiGLUs run as grouped matmuls over the sorted rows (`umv2_jax.ops.grouped_matmul`), and the results
are un-sorted with the inverse permutation and combined with the router weights. Rows move by gathers
whose gradients are gathers through the inverse map; with `block_padded` tokens are gathered straight
into the block-padded buffer and both expert matmuls run there. With
`capacity_factor > 0` each expert keeps at most `ceil(cf·T·k/E)` assignments, the first ones in token
order; the rest are dropped (contribute nothing) and reported as `dropped_fraction`.

Aux (see `umv2_jax.models.sparse`): `loss/lb` = lb_loss · E·Σ_e f_e·p_e (Switch form; f_e = share of the
T·k assignments routed to e, p_e = mean router probability), `loss/z` = z_loss · mean(logsumexp(logits)²),
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
from umv2_jax.models.sparse import SparseBuilder, SparseContext, register_sparse
from umv2_jax.models.transformer import SwiGLU, dtype_of
from umv2_jax.ops.grouped_matmul import (
    BlockLayout,
    block_layout,
    block_padded_matmul,
    gather_rows,
    grouped_matmul,
    resolve_implementation,
)


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

    def __call__(
        self, u: jax.Array, context: SparseContext | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """u: [batch, seq, embed] → (y [batch, seq, embed] in compute dtype, aux {name: scalar})."""
        del context  # the MoE reads nothing but its input
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
        expert_of = chosen.reshape(tokens * k)
        counts = jnp.zeros((experts,), jnp.int32).at[expert_of].add(1)
        if self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * tokens * k / experts)
            kept = _rank_within_expert(expert_of, counts) < capacity
            group_sizes = jnp.minimum(counts, capacity)
            # Dropped assignments sort after every expert's rows, past sum(group_sizes): the grouped
            # matmul gives them zeros.
            sort_key = jnp.where(kept, expert_of, experts)
        else:
            kept = None
            group_sizes = counts
            sort_key = expert_of
        order = _stable_argsort(sort_key, experts + 1)  # sorted position → assignment
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))
        expert_out = self._dispatch_experts_combine(x.astype(dtype), order, inverse, group_sizes)
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

        aux = self._losses(logits, probs, counts, tokens * k)
        if kept is not None:
            aux["dropped_fraction"] = jax.lax.stop_gradient(
                1.0 - jnp.mean(kept.astype(jnp.float32))
            )
        return y, aux

    def _dispatch_experts_combine(
        self, x: jax.Array, order: jax.Array, inverse: jax.Array, group_sizes: jax.Array
    ) -> jax.Array:
        """x: [T, embed]; order / inverse: sorted position ↔ assignment [T·k]; group_sizes: [E]
        → each assignment's expert output [T·k, embed] (zeros past sum(group_sizes)).

        Rows move by gathers whose gradients are gathers through the inverse map (no scatter-add).
        With `block_padded`, tokens go straight into the block-padded buffer and both expert matmuls
        run in it: one gather in, one gather out."""
        tokens, k = x.shape[0], self.top_k
        assignments = tokens * k
        everything = jnp.ones((assignments,), bool)
        padded = self.implementation in ("auto", "block_padded")
        if not (padded and resolve_implementation(self.implementation) == "block_padded"):
            rows = gather_rows(
                x, order // k, everything, inverse.reshape(tokens, k), everything.reshape(tokens, k)
            )
            sorted_out = self._experts(rows, group_sizes)
            return gather_rows(sorted_out, inverse, everything, order, everything)
        layout = block_layout(group_sizes, assignments, self.block_size)
        slot_assignment = order[layout.slot_row]  # [P]
        assignment_slot = layout.row_slot[inverse]  # [T·k]
        assignment_valid = layout.row_valid[inverse]
        buffer = gather_rows(
            x,
            slot_assignment // k,
            layout.slot_valid,
            assignment_slot.reshape(tokens, k),
            assignment_valid.reshape(tokens, k),
        )
        out = self._experts(buffer, group_sizes, layout)
        return gather_rows(
            out, assignment_slot, assignment_valid, slot_assignment, layout.slot_valid
        )

    def _experts(
        self, rows: jax.Array, group_sizes: jax.Array, layout: BlockLayout | None = None
    ) -> jax.Array:
        """rows: [M, embed] sorted by expert (or in `layout`), group_sizes: [E] → SwiGLU of each
        row's expert [M, embed]."""
        dtype = self.compute_dtype
        d_e = self.expert_d_ff
        # Gate and up share one grouped matmul (one dispatch plan, one pass over the rows).
        gate_up = jnp.concatenate([self.gate[...], self.up[...]], axis=-1).astype(dtype)
        down = self.down[...].astype(dtype)
        if layout is not None:
            projected = block_padded_matmul(rows, gate_up, layout)
            hidden = jax.nn.silu(projected[:, :d_e]) * projected[:, d_e:]
            return block_padded_matmul(hidden, down, layout)
        options = dict(implementation=self.implementation, block_size=self.block_size)
        projected = grouped_matmul(rows, gate_up, group_sizes, **options)
        hidden = jax.nn.silu(projected[:, :d_e]) * projected[:, d_e:]
        return grouped_matmul(hidden, down, group_sizes, **options)

    def _losses(
        self, logits: jax.Array, probs: jax.Array, counts: jax.Array, assignments: int
    ) -> dict[str, jax.Array]:
        """Weighted auxiliary losses and routing diagnostics, all fp32 scalars."""
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
        return {
            "loss/lb": self.lb_weight * load_balance,
            "loss/z": self.z_weight * z,
            **{name: jax.lax.stop_gradient(value) for name, value in metrics.items()},
        }


def _rank_within_expert(expert_of: jax.Array, counts: jax.Array) -> jax.Array:
    """For each assignment, how many earlier assignments (in token order) chose the same expert."""
    order = _stable_argsort(expert_of, counts.shape[0])
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(expert_of.size, dtype=jnp.int32) - starts[expert_of[order]]
    return jnp.zeros_like(rank_sorted).at[order].set(rank_sorted)


def _stable_argsort(keys: jax.Array, num_keys: int) -> jax.Array:
    """jnp.argsort(keys, stable=True) for int keys in [0, num_keys): one sort of packed int32 keys
    (key · n + position, all distinct) when they fit, several times faster on CPU than sorting
    (key, position) pairs."""
    size = keys.shape[0]
    if num_keys * size >= 2**31:
        return jnp.argsort(keys, stable=True)
    position = jnp.arange(size, dtype=jnp.int32)
    return jax.lax.sort(keys.astype(jnp.int32) * size + position) % size


def _build_layer(config: ModelConfig, block_index: int, rngs: nnx.Rngs) -> MoE:
    del block_index
    return MoE(config, rngs)


register_sparse("moe", SparseBuilder(build_layer=_build_layer, replaces_ffn=True))
