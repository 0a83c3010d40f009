"""The UltraMemV2 memory layer (SPEC §2–§6) and its model-level value tables (SPEC §3).

    tables = MemoryTables(model_config, rngs)              # built once per model: context.shared
    layer = UltraMemV2(model_config, block_index, rngs)    # one per memory block
    y, aux = layer(u, SparseContext(shared=tables))        # u: [batch, seq, h] → y: [batch, seq, h]

One head, two cores, in the SPEC's notation:

    y = W_o · Σ_ℓ p_ℓ · [ s¹_ℓ · V¹[row_ℓ] ; s²_ℓ · V²[row_ℓ] ],   p_ℓ = act(<W_p u, P[row_ℓ]>)

Selection (`TuckerRetrieval` → `umv2_jax.ops.retrieval_topk`) gives grid cells I_row·N + I_col of a
virtual N × N grid (N = key_expand·n_eff). A fixed random permutation π of the grid decorrelates grid
position from value row: v = π(cell); the virtual group is v div R and the row inside the layer's window
of tables is v mod R, with R = g·n² the window's rows (R = n² without sharing, as in SPEC step 6).
The authors' release splits by n_eff² instead (SPEC §9.7): the two agree unless key_expand > 1 and
g·n² is not a square, a combination the release-compatible config (`per_rank_query: false`) refuses
at validation; with per-rank queries this project's split by g·n² is used. The
weighted gather-sum over V and P is `umv2_jax.ops.value_bag`. Heads add their contributions: their
selections are concatenated along the slot axis and read by one value_bag call.

Value tables are stacked over the memory layers, `[L, n², ·]`, and live at model level (`MemoryTables`,
registered as this kind's `build_shared`). Each layer reads only its own window of tables
(`TableWindow`, `[g, n², ·]`, row `v mod R` with R = g·n²), so the table cotangent value_bag returns is
window-sized (`[g·n², ·]`), never the dense `[L·n², ·]` of the whole stack. A single block gets its
window as a static slice (`MemoryTables.layer_view`); the layers of a scanned `BlockStack` take theirs
in the scan body by their `window` array (`table_window`), whose transpose adds the window gradient
into the scan's constant-cotangent accumulator in place. Measured on XLA:CPU (`tests/parallel/
test_memory.py`; L = 2, 4, 8 layers of 4096 × 24 fp32 rows): this plans 3.6–3.8 windows of
temporaries whatever L, while stacked views as scan inputs (xs, gradients as stacked ys) planned one
more stack-sized buffer (5.5, 7.6, 11.8 windows), so the accumulator is kept for every g.

Under a mesh (`umv2_jax.parallel.active_mesh()`), the layer's whole computation runs token-local
inside one `shard_map` (`umv2_jax.parallel.memory`): each device retrieves and aggregates its own
tokens, tables are split along D on `tensor` and along rows on `fsdp`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from umv2_jax.config import ModelConfig
from umv2_jax.models import init as init_lib
from umv2_jax.models.memory_init import calibrate, memory_initializers
from umv2_jax.models.retrieval import TuckerRetrieval
from umv2_jax.models.sparse import SparseBuilder, SparseContext, SparseOutput, register_sparse
from umv2_jax.ops.value_bag import value_bag
from umv2_jax.parallel import memory as memory_parallel
from umv2_jax.parallel.mesh import active_mesh

TOPOLOGIES = ("none", "ring", "noring", "block")


class GridPermutation(nnx.Variable):
    """The fixed permutation π of a layer's virtual grid, int32 [N²]. Not trainable; saved with the
    checkpoint so that a checkpoint describes which value row every grid cell reads."""


class LayerIndex(nnx.Variable):
    """The block a layer sits in, int32 scalar (folded into its dropout key). Not trainable."""


class WindowTables(nnx.Variable):
    """Indices of the value tables a layer's window covers, int32 [g], in row order (SPEC §3)."""


class CalibrationValue(nnx.Variable):
    """A scalar of the `paper` init calibration (not trainable; saved with the checkpoint)."""


class CalibrationRecord(nnx.Module):
    """The Monte-Carlo calibration of SPEC §4 as model state: gain, mean score, σ_s, value std."""

    def __init__(self, config: ModelConfig):
        result = calibrate(config)
        self.gain = CalibrationValue(jnp.float32(result.gain))
        self.raw_mean_score = CalibrationValue(jnp.float32(result.raw_mean_score))
        self.mean_score = CalibrationValue(jnp.float32(result.mean_score))
        self.sigma_s = CalibrationValue(jnp.float32(result.sigma_s))
        self.value_std = CalibrationValue(jnp.float32(result.value_std))
        self.tokens = CalibrationValue(jnp.int32(result.tokens))


def value_share_window(topology: str, g: int, layer: int, num_layers: int) -> list[int]:
    """Indices of the value tables memory layer `layer` addresses (SPEC §3), in row order.

    none:      [layer]                               (g must be 1)
    ring:g     {layer, …, layer+g-1} mod num_layers   (wraps around)
    noring:g   the same window slid back inside the network at its end: start = min(layer, L-g)
    block:g    the block of g layers containing `layer`; when g does not divide L the last block is
               slid back inside too (start = min(g·(layer div g), L-g)), so every window has g tables

    `num_layers` counts the memory layers. The config checks the user's values (`ValueShare`,
    `MemoryConfig.validate`); a ValueError here is a caller's bug.
    """
    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown sharing topology {topology!r}; allowed: {TOPOLOGIES}")
    if not 1 <= g <= num_layers:
        raise ValueError(f"window {g} must be in [1, {num_layers}] (the number of memory layers)")
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} out of range [0, {num_layers})")
    if topology == "none":
        if g != 1:
            raise ValueError(f"topology 'none' has window 1, got {g}")
        return [layer]
    if topology == "ring":
        return [(layer + offset) % num_layers for offset in range(g)]
    if topology == "noring":
        start = min(layer, num_layers - g)
    else:
        start = min(g * (layer // g), num_layers - g)
    return list(range(start, start + g))


def map_virtual_rows(
    virtual: jax.Array, rows_per_table: int, window: tuple[int, ...] | list[int]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Virtual slot v → (flat row in the stacked tables, row inside the window, virtual group).

    virtual: int32 [...] in [0, N²). With R = len(window)·n² rows in the window:
    group = v div R, window_row = v mod R, and the flat row in the `[L·n², ·]` view of the stacked
    tables is window[window_row div n²]·n² + window_row mod n², which never leaves the window.
    """
    window_rows = len(window) * rows_per_table
    group = virtual // window_rows
    window_row = virtual % window_rows
    tables = jnp.asarray(window, jnp.int32)[window_row // rows_per_table]
    flat = tables * rows_per_table + window_row % rows_per_table
    return flat.astype(jnp.int32), window_row.astype(jnp.int32), group.astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TableWindow:
    """The value tables one memory layer addresses (its window, SPEC §3), in row order.

    values:     [g, n², D_v] (a leading [layers] axis when handed to a scanned `BlockStack`)
    pre_values: [g, n², D_p] or None
    Row r of the window, r in [0, g·n²), is values.reshape(-1, D_v)[r].
    """

    values: jax.Array
    pre_values: jax.Array | None = None


class MemoryTables(nnx.Module):
    """Value and pre-value tables of every memory layer, stacked: V [L, n², D_v], P [L, n², D_p].

    L counts the memory layers (`config.sparse_layer_indices()`). Both are `ValueParam`s with logical
    axes ("layers", "mem_rows", "mem_dim"); P is None when pre_value_dim = 0. Under `init: paper` the
    calibration that set their std is kept as state (`self.calibration`).
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        memory = config.memory
        num_tables = len(config.sparse_layer_indices())
        rows = memory.n_keys**2  # the config keeps num_tables·rows and the window in range
        init = memory_initializers(config)
        axes = ("layers", "mem_rows", "mem_dim")
        self.values = init_lib.make_value_param(
            rngs, init.values, (num_tables, rows, memory.value_dim), axes
        )
        if memory.pre_value_dim > 0:
            self.pre_values = init_lib.make_value_param(
                rngs, init.pre_values, (num_tables, rows, memory.pre_value_dim), axes
            )
        else:
            self.pre_values = None
        self.calibration = CalibrationRecord(config) if memory.init == "paper" else None
        # Static: {block index: its window's table indices}, for `layer_views` (same for all steps).
        topology, window = memory.value_share.topology, memory.value_share.window
        memory_layers = config.sparse_layer_indices()
        self.layer_windows = tuple(
            (block, tuple(value_share_window(topology, window, i, len(memory_layers))))
            for i, block in enumerate(memory_layers)
        )

    def layer_views(self, blocks: tuple[int, ...]) -> TableWindow:
        """The windows of the memory layers in `blocks` (model block indices), stacked: values
        [len(blocks), g, n², D_v] (pre_values likewise). Plain JAX: `values[windows]` with the static
        [len(blocks), g] table indices; a contiguous run (g = 1, the 1B/7B case) is a static slice,
        so its cotangent is the stack's own gradient, not a scatter."""
        windows = dict(self.layer_windows)
        indices = np.asarray([windows[block] for block in blocks], np.int32)  # [n, g]
        take = lambda table: _take_tables(table, indices)  # noqa: E731
        pre = None if self.pre_values is None else take(self.pre_values[...])
        return TableWindow(values=take(self.values[...]), pre_values=pre)

    def layer_view(self, block: int) -> TableWindow:
        """`layer_views((block,))` without the leading axis: values [g, n², D_v]."""
        return jax.tree.map(lambda t: t[0], self.layer_views((block,)))


def _take_tables(table: jax.Array, indices: np.ndarray) -> jax.Array:
    """table [L, n², D] at static table indices [n, g] → [n, g, n², D] (a slice when contiguous)."""
    flat = indices.reshape(-1)
    if np.array_equal(flat, np.arange(flat[0], flat[0] + flat.size)):
        taken = jax.lax.slice_in_dim(table, int(flat[0]), int(flat[0]) + flat.size, axis=0)
    else:
        taken = jnp.take(table, jnp.asarray(flat), axis=0)
    return taken.reshape(*indices.shape, *table.shape[1:])


class UltraMemV2(nnx.Module):
    """One UltraMemV2 layer (SPEC §2). Reads its value tables from `context.shared` (MemoryTables).

    Parameters: `retrieval` (W_q, γ_q, γ_k, keys, cores per head), W_p `pre_value_proj` [h, D_p],
    W_o `output_proj` [D_v, h]; state: `permutation` π (int32 [N²], not trainable).
    """

    def __init__(self, config: ModelConfig, block_index: int, rngs: nnx.Rngs):
        memory = config.memory
        memory_layers = config.sparse_layer_indices()
        h = config.d_model
        layer_index = memory_layers.index(block_index)
        topology, window = memory.value_share.topology, memory.value_share.window
        # Arrays, not Python attributes: they differ between layers, and layers stack for scan.
        self.block_index = LayerIndex(jnp.int32(block_index))
        self.window = WindowTables(
            jnp.asarray(
                value_share_window(topology, window, layer_index, len(memory_layers)), jnp.int32
            )
        )
        self.window_size = window  # g, the same for every layer
        self.rows_per_table = memory.n_keys**2
        self.keys_per_side = memory.key_expand * memory.effective_keys()
        self.value_dim, self.pre_value_dim = memory.value_dim, memory.pre_value_dim
        self.n_cores = memory.n_cores
        self.pre_score_act = memory.pre_score_act
        self.dropout_rate = memory.dropout
        self.implementation = memory.implementation
        self.slots = memory.heads * memory.topk  # m: slots per token, all heads
        # Rows on fsdp: window gather or row-id exchange (umv2_jax.parallel.exchange).
        self.table_exchange = memory.table_exchange
        self.exchange_capacity_factor = memory.exchange_capacity_factor
        self.tucker_penalty, self.tucker_tau = memory.tucker_penalty, memory.tucker_tau
        self.key_balance = memory.key_balance
        self.compute_dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[
            config.compute_dtype
        ]
        init = memory_initializers(config)
        self.retrieval = TuckerRetrieval.from_memory(
            memory, h, self.keys_per_side, init.retrieval, rngs, self.compute_dtype
        )
        if memory.pre_value_dim > 0:
            self.pre_value_proj = init_lib.make_param(
                rngs, init.pre_value_proj, (h, memory.pre_value_dim), ("embed", "mem_dim")
            )
        else:
            self.pre_value_proj = None
        self.output_proj = init_lib.make_param(
            rngs, init.output_proj, (memory.value_dim, h), ("mem_dim", "embed")
        )
        grid_cells = self.keys_per_side**2
        self.permutation = GridPermutation(
            jax.random.permutation(rngs.params(), grid_cells).astype(jnp.int32)
        )

    def __call__(
        self,
        u: jax.Array,
        context: SparseContext,
        *,
        rank_one: tuple[jax.Array, jax.Array] | None = None,
    ) -> SparseOutput:
        """u: [..., h] (normally [batch, seq, h]) → SparseOutput (y [..., h] in compute dtype).

        context.shared: this layer's `TableWindow` (what the Transformer hands it) or the model's
        whole `MemoryTables` (the layer then takes its window by its `window` array).
        rank_one: optional (u* [H, r], t* [H, r]) replacing the SVD's (release-compatibility tests).
        Under `umv2_jax.parallel.use_mesh` with more than one device the layer runs token-local
        (`umv2_jax.parallel.memory.token_local`); the result equals the plain path's.
        """
        tables = self.table_window(context.shared)
        leading, h = u.shape[:-1], u.shape[-1]
        mesh = active_mesh()
        core = None
        mask = context.token_mask if context.diagnostics else None
        if mask is not None:
            mask = jnp.broadcast_to(jnp.asarray(mask, jnp.int32), leading)
        if mesh is not None:
            core = memory_parallel.token_local(
                self, u, tables, rank_one, context.diagnostics, mesh, token_mask=mask
            )
        if core is None:  # no mesh, or a shape the mesh cannot split: plain code
            flat_mask = None if mask is None else mask.reshape(-1)
            core = self.core(
                u.reshape(-1, h), tables, rank_one, context.diagnostics, token_mask=flat_mask
            )
        dtype = self.compute_dtype
        y = core.y.reshape(-1, h)
        if self.dropout_rate > 0 and not context.deterministic:
            if context.dropout_rng is None:
                raise ValueError("dropout needs context.dropout_rng when deterministic is False")
            key = jax.random.fold_in(context.dropout_rng, self.block_index[...])
            keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, y.shape)
            y = jnp.where(keep, y / (1.0 - self.dropout_rate), 0).astype(dtype)
        out = SparseOutput(
            y=y.reshape(*leading, h),
            losses=self._losses(core),
            metrics=self._metrics(core, y),
            addressable_rows=self.addressable_rows(),
        )
        if context.diagnostics:
            out.row_hits = core.row_hits
            out.row_counts = core.row_counts
            out.metrics["rows_hit_fraction"] = (
                jnp.sum(core.row_hits, dtype=jnp.float32) / self.addressable_rows()
            )
        return out

    def table_window(self, shared) -> TableWindow:
        """context.shared → this layer's TableWindow ([g, n², D] tables)."""
        if isinstance(shared, TableWindow):
            return shared
        if not isinstance(shared, MemoryTables):
            raise TypeError(
                "UltraMemV2 needs context.shared to be its TableWindow or the model's MemoryTables"
            )
        window = self.window[...]
        pre = None if shared.pre_values is None else jnp.take(shared.pre_values[...], window, 0)
        return TableWindow(values=jnp.take(shared.values[...], window, axis=0), pre_values=pre)

    def core(
        self,
        x: jax.Array,
        tables: TableWindow,
        rank_one: tuple[jax.Array, jax.Array] | None,
        diagnostics: bool,
        plan: memory_parallel.MemoryPlan = memory_parallel.LOCAL,
        token_mask: jax.Array | None = None,
    ) -> LayerCore:
        """SPEC steps 1–9 on tokens x [T, h] with the window's tables → LayerCore (y [T, h]).

        `plan` says which collectives join this device's share to the others' inside a shard_map
        (`umv2_jax.parallel.memory`); the default `LOCAL` is plain single-device code. Under a
        tensor split, tables, W_p and W_o arrive as this device's D slices. With diagnostics and
        `token_mask` (int [T], this device's tokens) the result also counts, per window row, the
        tokens with mask 1 whose selection (any head, any of the top-m slots) includes the row.
        """
        result = self.retrieval(
            plan.retrieval_tokens(x),
            implementation=self.implementation,
            key_balance=self.key_balance > 0,
            rank_one=rank_one,
            balance_axes=plan.balance_axes,
        )
        grid = plan.gather_tokens(result.grid_indices, axis=1)  # [H, T, m]
        core_scores = plan.gather_tokens(result.core_scores, axis=1)  # [H, T, m, C]
        _, window_rows, _ = self.physical_rows(grid)
        values = tables.values.reshape(-1, tables.values.shape[-1])  # [g·n², D_v(/t)]
        pre_values = tables.pre_values
        if pre_values is not None:
            pre_values = pre_values.reshape(-1, pre_values.shape[-1])
        o, dropped = self._bag(x, window_rows, core_scores, values, pre_values, plan)
        dtype = self.compute_dtype
        y = plan.sum_tensor(o.astype(dtype) @ self.output_proj[...].astype(dtype))
        stop = jax.lax.stop_gradient
        total = jnp.sum(stop(core_scores), axis=-1)  # [H, T, m]
        row_hits = None
        if diagnostics:
            hit = jnp.zeros((self.window_size * self.rows_per_table,), jnp.bool_)
            row_hits = plan.any_batch(hit.at[window_rows.reshape(-1)].set(True))
        row_counts = None
        if diagnostics and token_mask is not None:
            counts = row_token_counts(window_rows, token_mask, hit.shape[0])
            row_counts = plan.sum_batch(counts)
        return LayerCore(
            y=y,
            singular_values=result.singular_values,
            key_balance=result.key_balance,
            top1_score=plan.mean_batch(jnp.mean(total[:, :, 0])),
            topm_score=plan.mean_batch(jnp.mean(total)),
            row_hits=row_hits,
            row_counts=row_counts,
            exchange_dropped=dropped,
        )

    def core_specs(self, batch_spec, diagnostics: bool, counts: bool, dropped: bool) -> LayerCore:
        """`core`'s out_specs under `umv2_jax.parallel.memory.token_local`: y split like the tokens,
        every statistic replicated; `dropped`: the exchange buffers can drop slots (a metric)."""
        P = jax.sharding.PartitionSpec
        return LayerCore(
            y=batch_spec,
            singular_values=P(),
            key_balance=P() if self.key_balance > 0 else None,
            top1_score=P(),
            topm_score=P(),
            row_hits=P() if diagnostics else None,
            row_counts=P() if diagnostics and counts else None,
            exchange_dropped=P() if dropped else None,
        )

    def physical_rows(self, grid_indices: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Grid cells [...] → (flat rows into the stacked tables, rows in the window, virtual groups).

        v = π(cell) (SPEC step 6), then `map_virtual_rows`. All three are int32 of the input's shape.
        """
        virtual = jnp.take(self.permutation[...], grid_indices, axis=0)
        return map_virtual_rows(virtual, self.rows_per_table, self.window[...])

    def aggregate(
        self, x: jax.Array, rows: jax.Array, core_scores: jax.Array, tables: MemoryTables
    ) -> jax.Array:
        """SPEC steps 7–8 for every head: o = Σ_heads Σ_ℓ p_ℓ·[s^c_ℓ·V^c[row_ℓ]]_c.

        x: [T, h]; rows: int32 [H, T, m] flat rows of the stacked tables (`physical_rows`'s first);
        core_scores: [H, T, m, C]. Returns o: [T, D_v] fp32. Value chunk c is V[:, c·D_v/C : …].
        """
        values = tables.values[...]
        pre_values = None if tables.pre_values is None else tables.pre_values[...]
        values = values.reshape(-1, values.shape[-1])  # [L·n², D_v]: a free view, no copy
        if pre_values is not None:
            pre_values = pre_values.reshape(-1, pre_values.shape[-1])
        return self._bag(x, rows, core_scores, values, pre_values, memory_parallel.LOCAL)[0]

    def _bag(self, x, rows, core_scores, values, pre_values, plan):
        """value_bag over [H, T, m] rows → (o [T, D_v(/t)] fp32, dropped-slot fraction or None).

        values [R, D_v(/t)]: the window, or this device's row shard of it when the rows' owners
        aggregate (`plan.rows_axis`, `umv2_jax.parallel.exchange`); `plan.aggregate` routes it.
        """
        heads, tokens, topk = rows.shape
        slots = heads * topk
        rows = rows.transpose(1, 0, 2).reshape(tokens, slots)
        core_scores = core_scores.transpose(1, 0, 2, 3).reshape(tokens, slots, self.n_cores)
        core_scores = core_scores.astype(jnp.float32)
        dtype = self.compute_dtype
        if pre_values is not None:
            x_p = (x.astype(dtype) @ self.pre_value_proj[...].astype(dtype)).astype(jnp.float32)
        else:
            x_p = None

        def bag(rows, core_scores, x_p):
            return self._aggregate(rows, core_scores, x_p, values, pre_values, plan)

        return plan.aggregate(bag, rows, core_scores, x_p)

    def _aggregate(self, rows, core_scores, x_p, values, pre_values, plan) -> jax.Array:
        """value_bag of rows [T, m] of `values` [R, D_v(/t)] → o [T, D_v(/t)] fp32.

        Without a tensor split: one fused value_bag call (pre-values inside). With one
        (`plan.tensor`): this device's D_p slice gives partial pre-scores, summed over tensor, then
        the activation; value_bag then aggregates this device's D_v slice with pre-scores folded
        into the core scores of the chunks the slice covers (`plan.local_chunks`).
        """
        if plan.tensor is None:
            out = value_bag(
                values,
                pre_values,
                rows,
                core_scores,
                x_p,
                pre_score_act=self.pre_score_act,
                implementation=self.implementation,
            )
            return out.astype(jnp.float32)
        core_scores = plan.local_chunks(core_scores)  # [T, slots, C_local]
        if pre_values is not None:
            partial = pre_score_dots(pre_values, rows, x_p)  # [T, slots]
            raw = plan.sum_tensor(partial)
            if self.pre_score_act == "gelu":
                raw = jax.nn.gelu(raw, approximate=False)
            core_scores = core_scores * raw[..., None]
        out = value_bag(values, None, rows, core_scores, None, implementation=self.implementation)
        return out.astype(jnp.float32)

    def addressable_rows(self) -> int:
        """Distinct rows this layer can reach: min(window rows g·n², virtual grid cells N²)."""
        return min(self.window_size * self.rows_per_table, self.keys_per_side**2)

    def _losses(self, result: LayerCore) -> dict[str, jax.Array]:
        """Weighted auxiliary losses (fp32 scalars) by type."""
        losses: dict[str, jax.Array] = {}
        rank = result.singular_values.shape[-1]
        if self.tucker_penalty > 0:
            # α/(r−1)·Σ_{i≥2} relu(λ_i − τ)²: keeps Σ_c C^c near rank 1 so stage 1 stays faithful
            # (mean over heads). With r = 1 the core sum is rank 1 by construction: the term is 0.
            excess = jax.nn.relu(result.singular_values[:, 1:] - self.tucker_tau)
            per_head = jnp.sum(excess * excess, axis=-1) / max(rank - 1, 1)
            losses["tucker_penalty"] = self.tucker_penalty * jnp.mean(per_head)
        if self.key_balance > 0:
            losses["key_balance"] = self.key_balance * result.key_balance
        return losses

    def _metrics(self, result: LayerCore, y: jax.Array) -> dict[str, jax.Array]:
        """SPEC §6 diagnostics that cost nothing next to the layer (no gradient)."""
        stop = jax.lax.stop_gradient
        rank = result.singular_values.shape[-1]
        first = stop(result.singular_values[0])
        metrics = {
            "top1_score": result.top1_score,
            "topm_score": result.topm_score,
            "output_std": jnp.std(stop(y).astype(jnp.float32)),
            "lambda1": first[0],
            "lambda2": first[1] if rank > 1 else jnp.zeros((), jnp.float32),
        }
        if result.exchange_dropped is not None:
            metrics["exchange_dropped_fraction"] = result.exchange_dropped
        return metrics


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCore:
    """What `UltraMemV2.core` returns (global statistics already reduced over the mesh).

    y: [T, h] compute dtype; singular_values: [H, r] fp32; key_balance: fp32 scalar or None;
    top1_score, topm_score: fp32 means over every token; row_hits: bool [g·n²] or None;
    row_counts: int32 [g·n²] tokens that read each window row, or None;
    exchange_dropped: fp32 fraction of slots the exchange buffers dropped, or None.
    """

    y: jax.Array
    singular_values: jax.Array
    key_balance: jax.Array | None
    top1_score: jax.Array
    topm_score: jax.Array
    row_hits: jax.Array | None = None
    row_counts: jax.Array | None = None
    exchange_dropped: jax.Array | None = None


def row_token_counts(rows: jax.Array, token_mask: jax.Array, size: int) -> jax.Array:
    """int32 [size]: for each row, the number of tokens t with token_mask[t] = 1 among whose
    selected rows (rows [H, T, m], any head and slot) it is; a row two heads of one token pick
    counts once. Plain numpy: `sum(mask[t] * (r in set(rows[:, t].ravel())) for t)`."""
    heads, tokens, topk = rows.shape
    per_token = jnp.sort(rows.transpose(1, 0, 2).reshape(tokens, heads * topk), axis=1)
    first = jnp.concatenate(
        [jnp.ones((tokens, 1), jnp.bool_), per_token[:, 1:] != per_token[:, :-1]], axis=1
    )
    weights = first.astype(jnp.int32) * token_mask.astype(jnp.int32)[:, None]
    return jnp.zeros((size,), jnp.int32).at[per_token.reshape(-1)].add(weights.reshape(-1))


def pre_score_dots(pre_values: jax.Array, rows: jax.Array, x_p: jax.Array) -> jax.Array:
    """Raw pre-scores <x_p[t], P[rows[t, ℓ]]> (before the activation), fp32 [T, m].

    pre_values [R, D_p'], rows int [T, m], x_p [T, D_p'] (D_p' = a tensor device's slice). Plain JAX:
    `jnp.einsum("tmd,td->tm", pre_values[rows], x_p)`; the gather is [T, m, D_p'] (small next to
    the values' [T, m, D_v]).
    """
    gathered = jnp.take(pre_values, rows, axis=0).astype(jnp.float32)
    return jnp.einsum("tmd,td->tm", gathered, x_p, precision=jax.lax.Precision.HIGHEST)


register_sparse("ultramem_v2", SparseBuilder(build_layer=UltraMemV2, build_shared=MemoryTables))
