"""The product-key memory baselines of SPEC §7, each a sparse layer of the shared backbone.

    config.sparse = "pkm" | "memory_plus" | "peer"   (fields: config.product_key)
    config.sparse = "ultramem"                        (fields: config.ultramem, UltraMem v1's own)
    y, aux = layer(u, context)          # u: [batch, seq, h] → y: [batch, seq, h]

Notation (per token, per head): x = u ∈ R^h, n sub-keys per side, D_k = key_dim, m = topk,
k = rc_topk (candidates per side), D_v = value_dim, H = heads.

**Product keys** (PKM, Memory+, PEER; Lample et al. 2019, eq. 2–4). The query q = W_q x ∈ R^{2·D_k} is
split into q_row, q_col (each RMS-normalized with a learnable gain when `query_norm`); the scores of
grid cell (i, j) are the *sum* of the half scores, s_ij = <q_row, K_row[i]> + <q_col, K_col[j]>. The k
best row and column keys are kept, the m best cells of the k × k grid are selected, and the weights are
a softmax over those m scores: w = softmax(s_I). Cell (i, j) reads row i·n + j of the value table.
`product_key_topk` does the selection (gradients reach the queries and the selected keys, not the
choice itself). Heads have their own queries (and keys, except PEER) and add their contributions.

- `pkm`:         y = Σ_h Σ_ℓ w_ℓ V[row_ℓ],                    V ∈ R^{n²×h} (per layer)
- `memory_plus`: y = W2((Σ_h Σ_ℓ w_ℓ V[row_ℓ]) ⊙ silu(W1 x)), V ∈ R^{n²×D_v} is ONE table shared by
                 every Memory+ layer (model-level, `SharedValues`); W1: h → D_v, W2: D_v → h.
                 `key_norm` adds the qk-norm (keys RMS-normalized on the fly).
- `peer`:        y = Σ_h Σ_ℓ w_ℓ σ(<U[row_ℓ], x>) V[row_ℓ],   U, V ∈ R^{n²×h}: n² single-neuron
                 experts; the product keys are shared by the heads (PEER §2), σ = `activation`.

**UltraMem v1** (`ultramem`, arXiv 2411.12364). The UltraMemV2 retrieval (`TuckerRetrieval`, TDQKR with
multi-core scoring, raw scores, no softmax) on a virtual grid of (E·n)² cells with E² = G =
`value_expand`, one query projection shared by the H heads (each head its own keys and cores), no
pre-values. A fixed random permutation π maps a cell to v = π(cell), virtual group g = v div n² and
physical row v mod n² (SPEC §2 step 6). The groups are kept side by side (SPEC §2 step 8):

    o_g = Σ_h Σ_{ℓ: g_ℓ = g} [s¹_ℓ V¹[row_ℓ]; …; s^C_ℓ V^C[row_ℓ]],   y = W_o [o_1; …; o_G],  W_o: G·D_v → h

Skip-layer wiring `skip_layers: "a:b/…"`: the layer sits in block b's slot and reads block a's
normalized input (`input_block = a`, served from `context.taps[a]`).

The weighted gather-sums are `umv2_jax.ops.value_bag` (values as its table, PEER's U as its pre-values,
the weights as one "core"); value tables are `ValueParam`s (the optimizer's values group).

**Under a mesh** (`umv2_jax.parallel.use_mesh`) every layer's value aggregation runs token-local
(`token_local_bag`): one `jax.shard_map` per layer call with the tokens (rows, weights, x) split over
the mesh's batch axes and the tables entering whole (P(), gathered once at entry when the rules shard
them). So no [T, H·m] row id is all-gathered across the batch axes and no [T·H·m, D_v] slot
gradient is all-reduced; the table gradient leaves the shard_map as one table-sized sum (the
transpose of the replicated input). The selection before it is token-local too
(`ops.product_key_topk.token_local`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from umv2_jax.config import ModelConfig, UltraMemConfig
from umv2_jax.models import init as init_lib
from umv2_jax.models.retrieval import RetrievalInit, TuckerRetrieval, rms_normalize
from umv2_jax.models.sparse import SparseBuilder, SparseContext, SparseOutput, register_sparse
from umv2_jax.models.transformer import dtype_of
from umv2_jax.models.ultramem_v2 import GridPermutation, map_virtual_rows
from umv2_jax.ops.product_key_topk import product_key_topk
from umv2_jax.ops.value_bag import value_bag


def token_local_bag(run, n_tokens: int, n_split: int):
    """`umv2_jax.parallel.mesh.token_local` for a layer's value_bag call: the first `n_split`
    arguments (rows, weights, …) are split over the batch axes, the tables enter replicated."""
    from umv2_jax.parallel.mesh import token_local  # lazy: parallel imports the config

    return token_local(run, n_tokens, n_split)


def sharded_rows_bag(layer, bag, rows, weights, x_p, tables):
    """`umv2_jax.parallel.exchange.rows_bag` with the layer's `table_exchange` settings: tables
    [n², D] rows-sharded on fsdp are gathered (window) or reached through their owners (exchange)."""
    from umv2_jax.parallel.exchange import rows_bag  # lazy, as token_local_bag

    return rows_bag(
        bag,
        rows,
        weights,
        x_p,
        tables,
        table_exchange=layer.table_exchange,
        capacity_factor=layer.exchange_capacity_factor,
    )


class ProductKeyRetrieval(nnx.Module):
    """Queries and product keys of H heads; `shared_keys` gives every head the same keys (PEER).

    Parameters: query W_q [h, H, 2, D_k]; query_gain γ_q [H, D_k] (when query_norm); keys
    [H or 1, 2, n, D_k]; key_gain γ_k [H or 1, D_k] (when key_norm).
    """

    def __init__(
        self,
        config: ModelConfig,
        rngs: nnx.Rngs,
        *,
        shared_keys: bool = False,
    ):
        pk = config.product_key
        h, heads, key_dim = config.d_model, pk.heads, pk.key_dim
        key_heads = 1 if shared_keys else heads
        self.heads, self.n_keys = heads, pk.n_keys
        self.rc_topk, self.topk = pk.resolved_rc_topk(), pk.topk
        self.eps = pk.norm_eps
        self.compute_dtype = dtype_of(config.compute_dtype)
        projection = init_lib.truncated_normal(init_lib.backbone_std(config))
        self.query = init_lib.make_param(
            rngs, projection, (h, heads, 2, key_dim), ("embed", None, None, None)
        )
        self.keys = init_lib.make_param(
            rngs,
            init_lib.truncated_normal(key_dim**-0.5),
            (key_heads, 2, pk.n_keys, key_dim),
            (None, None, None, None),
        )
        ones = nnx.initializers.ones
        self.query_gain = (
            init_lib.make_param(rngs, ones, (heads, key_dim), (None, None))
            if pk.query_norm
            else None
        )
        self.key_gain = (
            init_lib.make_param(rngs, ones, (key_heads, key_dim), (None, None))
            if pk.key_norm
            else None
        )

    def __call__(
        self, x: jax.Array, implementation: str | tuple[str, ...] = "auto"
    ) -> tuple[jax.Array, jax.Array]:
        """x: [T, h] → (rows [T, H·m] int32, softmax weights [T, H·m] fp32), head-major slots.

        implementation: of the selection op `umv2_jax.ops.product_key_topk`."""
        dtype = self.compute_dtype
        queries = jnp.einsum("th,hnsd->nstd", x.astype(dtype), self.query[...].astype(dtype))
        queries = queries.astype(jnp.float32)  # [H, 2, T, D_k]
        if self.query_gain is not None:
            queries = rms_normalize(queries, self.query_gain[...][:, None, None, :], self.eps)
        keys = self.keys[...].astype(jnp.float32)  # [H or 1, 2, n, D_k]
        if self.key_gain is not None:
            keys = rms_normalize(keys, self.key_gain[...][:, None, None, :], self.eps)
        keys = jnp.broadcast_to(keys, (self.heads, *keys.shape[1:]))

        def one_head(q, k):
            return product_key_topk(
                q[0],
                q[1],
                k[0],
                k[1],
                rc_topk=self.rc_topk,
                topk=self.topk,
                implementation=implementation,
            )

        rows, scores = jax.vmap(one_head)(queries, keys)  # [H, T, m]
        weights = jax.nn.softmax(scores, axis=-1)
        n_tokens = x.shape[0]
        return (
            rows.transpose(1, 0, 2).reshape(n_tokens, -1),
            weights.transpose(1, 0, 2).reshape(n_tokens, -1),
        )


class SharedValues(nnx.Module):
    """Memory+'s one value table V [n², D_v] shared by every Memory+ layer (context.shared)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        pk = config.product_key
        value_dim = pk.resolved_value_dim(config.d_model)
        self.values = init_lib.make_value_param(
            rngs,
            init_lib.truncated_normal(value_dim**-0.5),
            (pk.n_keys**2, value_dim),
            ("mem_rows", "mem_dim"),
        )


class _ProductKeyLayer(nnx.Module):
    """What PKM, Memory+ and PEER share: retrieval, flattening and diagnostics."""

    def _setup(self, config: ModelConfig, block_index: int, rngs: nnx.Rngs, shared_keys: bool):
        del block_index  # layers of one kind are built alike (they stack for scan over layers)
        pk = config.product_key
        self.implementation = pk.implementation
        self.table_exchange = pk.table_exchange
        self.exchange_capacity_factor = pk.exchange_capacity_factor
        self.compute_dtype = dtype_of(config.compute_dtype)
        self.n_rows = pk.n_keys**2
        self.retrieval = ProductKeyRetrieval(config, rngs, shared_keys=shared_keys)

    def _finish(
        self,
        u: jax.Array,
        y: jax.Array,
        rows: jax.Array,
        weights: jax.Array,
        context: SparseContext,
    ) -> SparseOutput:
        """Reshapes y to u's shape and adds the diagnostics (no gradient)."""
        y = y.astype(self.compute_dtype)
        heads = self.retrieval.heads
        top1 = lax.stop_gradient(weights).reshape(weights.shape[0], heads, -1)[..., 0]
        metrics = {
            "top1_weight": jnp.mean(top1),
            "output_std": jnp.std(lax.stop_gradient(y).astype(jnp.float32)),
        }
        return _with_row_hits(
            SparseOutput(y=y.reshape(u.shape), metrics=metrics, addressable_rows=self.n_rows),
            rows,
            self.n_rows,
            context,
        )


class PKM(_ProductKeyLayer):
    """Lample's product-key memory: y = Σ_h Σ_ℓ softmax(s)_ℓ V[row_ℓ], V: [n², h] (per layer)."""

    def __init__(self, config: ModelConfig, block_index: int, rngs: nnx.Rngs):
        self._setup(config, block_index, rngs, shared_keys=False)
        h = config.d_model
        self.values = init_lib.make_value_param(
            rngs, init_lib.truncated_normal(h**-0.5), (self.n_rows, h), ("mem_rows", "mem_dim")
        )

    def __call__(self, u: jax.Array, context: SparseContext) -> SparseOutput:
        """u: [..., h] → SparseOutput (y [..., h])."""
        x = u.reshape(-1, u.shape[-1])
        rows, weights = self.retrieval(x, implementation=self.implementation)

        def bag(rows, weights, _, values):
            return value_bag(
                values, None, rows, weights[..., None], None, implementation=self.implementation
            )

        y = sharded_rows_bag(self, bag, rows, weights, None, (self.values[...],))
        return self._finish(u, y, rows, weights, context)


class MemoryPlus(_ProductKeyLayer):
    """Memory+: y = W2((Σ_h Σ_ℓ softmax(s)_ℓ V[row_ℓ]) ⊙ silu(W1 u)), V shared by the Memory+ layers."""

    def __init__(self, config: ModelConfig, block_index: int, rngs: nnx.Rngs):
        self._setup(config, block_index, rngs, shared_keys=False)
        h = config.d_model
        value_dim = config.product_key.resolved_value_dim(h)
        self.gate_proj = init_lib.make_param(
            rngs,
            init_lib.truncated_normal(init_lib.backbone_std(config)),
            (h, value_dim),
            ("embed", "mem_dim"),
        )
        self.output_proj = init_lib.make_param(
            rngs,
            init_lib.truncated_normal(init_lib.output_std(config)),
            (value_dim, h),
            ("mem_dim", "embed"),
        )

    def __call__(self, u: jax.Array, context: SparseContext) -> SparseOutput:
        """u: [..., h] → SparseOutput (y [..., h]). context.shared: the model's `SharedValues`."""
        if not isinstance(context.shared, SharedValues):
            raise TypeError("MemoryPlus needs context.shared to be the model's SharedValues")
        dtype = self.compute_dtype
        x = u.reshape(-1, u.shape[-1])
        rows, weights = self.retrieval(x, implementation=self.implementation)

        def bag(rows, weights, _, values):
            return value_bag(
                values, None, rows, weights[..., None], None, implementation=self.implementation
            )

        o = sharded_rows_bag(self, bag, rows, weights, None, (context.shared.values[...],))
        gate = jax.nn.silu(x.astype(dtype) @ self.gate_proj[...].astype(dtype))
        y = (o.astype(dtype) * gate) @ self.output_proj[...].astype(dtype)
        return self._finish(u, y, rows, weights, context)


class PEER(_ProductKeyLayer):
    """PEER: y = Σ_h Σ_ℓ softmax(s)_ℓ σ(<U[row_ℓ], u>) V[row_ℓ]; n² experts, keys shared by heads."""

    def __init__(self, config: ModelConfig, block_index: int, rngs: nnx.Rngs):
        self._setup(config, block_index, rngs, shared_keys=True)
        h = config.d_model
        self.activation = config.product_key.activation
        axes = ("mem_rows", "mem_dim")
        # Each expert is a one-neuron SwiGLU-free FFN: U is its up row, V its down row (backbone init).
        self.expert_up = init_lib.make_value_param(
            rngs, init_lib.truncated_normal(init_lib.backbone_std(config)), (self.n_rows, h), axes
        )
        self.expert_down = init_lib.make_value_param(
            rngs, init_lib.truncated_normal(init_lib.output_std(config)), (self.n_rows, h), axes
        )

    def __call__(self, u: jax.Array, context: SparseContext) -> SparseOutput:
        """u: [..., h] → SparseOutput (y [..., h])."""
        x = u.reshape(-1, u.shape[-1])
        rows, weights = self.retrieval(x, implementation=self.implementation)

        def bag(rows, weights, x, down, up):
            return value_bag(
                down,
                up,
                rows,
                weights[..., None],
                x,
                pre_score_act=self.activation,
                implementation=self.implementation,
            )

        tables = (self.expert_down[...], self.expert_up[...])
        y = sharded_rows_bag(self, bag, rows, weights, x.astype(jnp.float32), tables)
        return self._finish(u, y, rows, weights, context)


class SharedQueryRetrieval(TuckerRetrieval):
    """UltraMemV2's TDQKR with ONE query projection W_q [h, 1, 2, r, D_k] read by every head (v1).

    Each head keeps its own keys, cores and q/k gains; only `queries` differs from the parent.
    """

    def __init__(self, v1: UltraMemConfig, d_model: int, init: RetrievalInit, rngs, dtype):
        super().__init__(
            d_model,
            v1.keys_per_side(),
            init,
            rngs,
            heads=v1.heads,
            key_dim=v1.key_dim,
            tucker_rank=v1.tucker_rank,
            n_cores=v1.n_cores,
            rc_topk=v1.resolved_rc_topk(),
            topk=v1.topk,
            norm_eps=v1.norm_eps,
            per_rank_query=True,
            compute_dtype=dtype,
        )
        self.query = init_lib.make_param(
            rngs,
            init.query,
            (d_model, 1, 2, v1.tucker_rank, v1.key_dim),
            ("embed", None, None, None, None),
        )

    def queries(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [T, h] → normalized (q_row, q_col), each [H, T, r, D_k] fp32; one projection, H gains."""
        dtype = self.compute_dtype
        projected = jnp.einsum(
            "th,hsad->stad", x.astype(dtype), self.query[...][:, 0].astype(dtype)
        )
        gain = self.query_gain[...][:, None, None, None, :]  # [H, 1, 1, 1, D_k]
        normalized = rms_normalize(projected[None], gain, self.eps)  # [H, 2, T, r, D_k]
        return normalized[:, 0], normalized[:, 1]


class UltraMemV1(nnx.Module):
    """UltraMem v1 (see the module docstring). Values V [n², D_v] per layer; W_o [G·D_v, h]."""

    def __init__(self, config: ModelConfig, block_index: int, rngs: nnx.Rngs):
        v1 = config.ultramem
        h = config.d_model
        del block_index  # the Transformer wires skip-layer inputs; layers are built alike
        self.groups = v1.value_expand
        self.rows_per_table = v1.n_keys**2
        self.value_dim = v1.resolved_value_dim(h)
        self.implementation = v1.implementation
        self.compute_dtype = dtype_of(config.compute_dtype)
        keys_per_side = v1.keys_per_side()
        projection = init_lib.truncated_normal(init_lib.backbone_std(config))
        init = RetrievalInit(
            query=projection,
            keys=init_lib.truncated_normal(v1.key_dim**-0.5),
            cores=nnx.initializers.uniform(1.0),
            gain=v1.key_dim ** (-1.0 / 3.0),  # UltraMem v1's q/k norm gain D_k^-1/3
        )
        self.retrieval = SharedQueryRetrieval(v1, h, init, rngs, self.compute_dtype)
        self.values = init_lib.make_value_param(
            rngs,
            init_lib.truncated_normal(0.02),
            (self.rows_per_table, self.value_dim),
            ("mem_rows", "mem_dim"),
        )
        self.output_proj = init_lib.make_param(
            rngs,
            init_lib.truncated_normal((self.groups * self.value_dim) ** -0.5),
            (self.groups * self.value_dim, h),
            ("mem_dim", "embed"),
        )
        self.permutation = GridPermutation(
            jax.random.permutation(rngs.params(), keys_per_side**2).astype(jnp.int32)
        )

    def __call__(self, u: jax.Array, context: SparseContext) -> SparseOutput:
        """u: [..., h] (the normalized input the skip wiring names) → SparseOutput (y [..., h])."""
        x = u.reshape(-1, u.shape[-1])
        n_tokens = x.shape[0]
        result = self.retrieval(x, implementation=self.implementation)
        virtual = jnp.take(self.permutation[...], result.grid_indices, axis=0)  # [H, T, m]
        rows, _, groups = map_virtual_rows(virtual, self.rows_per_table, (0,))
        heads, _, topk = rows.shape
        rows = rows.transpose(1, 0, 2).reshape(n_tokens, heads * topk)
        groups = groups.transpose(1, 0, 2).reshape(n_tokens, heads * topk)
        scores = result.core_scores.transpose(1, 0, 2, 3).reshape(n_tokens, heads * topk, -1)

        # Keep the G groups side by side: one value_bag over G copies of the tokens, each copy seeing
        # only its group's slots (the others weigh 0). Token-local under a mesh: the copies are
        # made of each device's own tokens.
        def bag(rows, groups, scores, values):
            n_local = rows.shape[0]
            in_group = groups[None] == jnp.arange(self.groups)[:, None, None]  # [G, T, H·m]
            masked = jnp.where(in_group[..., None], scores[None], 0.0)
            o = value_bag(
                values,
                None,
                jnp.tile(rows, (self.groups, 1)),
                masked.reshape(self.groups * n_local, heads * topk, -1),
                None,
                implementation=self.implementation,
            )
            return o.reshape(self.groups, n_local, self.value_dim).transpose(1, 0, 2)

        o = token_local_bag(bag, n_tokens, 3)(rows, groups, scores, self.values[...])
        dtype = self.compute_dtype
        y = o.reshape(n_tokens, -1).astype(dtype) @ self.output_proj[...].astype(dtype)
        total = jnp.sum(lax.stop_gradient(result.core_scores), axis=-1)
        metrics = {
            "top1_score": jnp.mean(total[:, :, 0]),
            "output_std": jnp.std(lax.stop_gradient(y).astype(jnp.float32)),
        }
        out = SparseOutput(
            y=y.reshape(u.shape), metrics=metrics, addressable_rows=self.rows_per_table
        )
        return _with_row_hits(out, rows, self.rows_per_table, context)


def _with_row_hits(
    out: SparseOutput, rows: jax.Array, n_rows: int, context: SparseContext
) -> SparseOutput:
    """Adds the row-hit mask and fraction (evaluation diagnostics) when the context asks for them."""
    if context.diagnostics:
        hit = jnp.zeros((n_rows,), jnp.bool_).at[rows.reshape(-1)].set(True)
        out.row_hits = hit
        out.metrics["rows_hit_fraction"] = jnp.sum(hit, dtype=jnp.float32) / n_rows
    return out


def _builder(cls, build_shared=None) -> SparseBuilder:
    return SparseBuilder(build_layer=cls, build_shared=build_shared)


register_sparse("pkm", _builder(PKM))
register_sparse("memory_plus", _builder(MemoryPlus, SharedValues))
register_sparse("peer", _builder(PEER))
register_sparse("ultramem", _builder(UltraMemV1))

__all__ = [
    "PEER",
    "PKM",
    "MemoryPlus",
    "ProductKeyRetrieval",
    "SharedQueryRetrieval",
    "SharedValues",
    "UltraMemV1",
    "product_key_topk",
    "token_local_bag",
]
