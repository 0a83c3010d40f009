"""The UltraMemV2 memory layer (SPEC §2–§6) and its model-level value tables (SPEC §3).

    tables = MemoryTables(model_config, rngs)              # built once per model: context.shared
    layer = UltraMemV2(model_config, block_index, rngs)    # one per memory block
    y, aux = layer(u, SparseContext(shared=tables))        # u: [batch, seq, h] → y: [batch, seq, h]

One head, two cores, in the SPEC's notation:

    y = W_o · Σ_ℓ p_ℓ · [ s¹_ℓ · V¹[row_ℓ] ; s²_ℓ · V²[row_ℓ] ],   p_ℓ = act(<W_p u, P[row_ℓ]>)

Selection (`TuckerRetrieval` → `umv2_jax.ops.retrieval_topk`) gives grid cells I_row·N + I_col of a
virtual N × N grid (N = key_expand·n_eff). A fixed random permutation π of the grid decorrelates grid
position from value row: v = π(cell); the virtual group is v div R and the row inside the layer's window
of tables is v mod R, with R = g·n² the window's rows (R = n² without sharing, as in SPEC step 6). The
weighted gather-sum over V and P is `umv2_jax.ops.value_bag`. Heads add their contributions: their
selections are concatenated along the slot axis and read by one value_bag call.

Value tables are stacked over the memory layers, `[L, n², ·]`, and live at model level (`MemoryTables`,
registered as this kind's `build_shared`); every layer reads the whole stack flattened to `[L·n², ·]`
and offsets its rows into its window, so no table is copied per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from umv2_jax.config import ModelConfig
from umv2_jax.models import init as init_lib
from umv2_jax.models.memory_init import calibrate, memory_initializers
from umv2_jax.models.retrieval import TuckerRetrieval
from umv2_jax.models.sparse import SparseBuilder, SparseContext, SparseOutput, register_sparse
from umv2_jax.ops.value_bag import value_bag

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

        rank_one: optional (u* [H, r], t* [H, r]) replacing the SVD's (release-compatibility tests).
        """
        tables = context.shared
        if not isinstance(tables, MemoryTables):
            raise TypeError("UltraMemV2 needs context.shared to be the model's MemoryTables")
        leading, h = u.shape[:-1], u.shape[-1]
        x = u.reshape(-1, h)
        result = self.retrieval(
            x,
            implementation=self.implementation,
            key_balance=self.key_balance > 0,
            rank_one=rank_one,
        )
        rows, window_rows, _ = self.physical_rows(result.grid_indices)  # [H, T, m]
        o = self.aggregate(x, rows, result.core_scores, tables)  # [T, D_v] fp32
        dtype = self.compute_dtype
        y = o.astype(dtype) @ self.output_proj[...].astype(dtype)
        if self.dropout_rate > 0 and not context.deterministic:
            if context.dropout_rng is None:
                raise ValueError("dropout needs context.dropout_rng when deterministic is False")
            key = jax.random.fold_in(context.dropout_rng, self.block_index[...])
            keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, y.shape)
            y = jnp.where(keep, y / (1.0 - self.dropout_rate), 0).astype(dtype)
        out = SparseOutput(
            y=y.reshape(*leading, h),
            losses=self._losses(result),
            metrics=self._metrics(result, y),
            addressable_rows=self.addressable_rows(),
        )
        if context.diagnostics:
            window_size = self.window_size * self.rows_per_table
            hit = jnp.zeros((window_size,), jnp.bool_).at[window_rows.reshape(-1)].set(True)
            out.row_hits = hit
            out.metrics["rows_hit_fraction"] = (
                jnp.sum(hit, dtype=jnp.float32) / self.addressable_rows()
            )
        return out

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

        x: [T, h]; rows: int32 [H, T, m] flat rows of the stacked tables; core_scores: [H, T, m, C].
        Returns o: [T, D_v] fp32. Value chunk c is V[:, c·D_v/C : (c+1)·D_v/C].
        """
        heads, tokens, topk = rows.shape
        slots = heads * topk
        rows = rows.transpose(1, 0, 2).reshape(tokens, slots)
        core_scores = core_scores.transpose(1, 0, 2, 3).reshape(tokens, slots, self.n_cores)
        values = tables.values[...]
        values = values.reshape(-1, values.shape[-1])  # [L·n², D_v]: a free view, no copy
        if self.pre_value_proj is not None:
            pre_values = tables.pre_values[...]
            pre_values = pre_values.reshape(-1, pre_values.shape[-1])
            dtype = self.compute_dtype
            x_p = (x.astype(dtype) @ self.pre_value_proj[...].astype(dtype)).astype(jnp.float32)
        else:
            pre_values, x_p = None, None
        out = value_bag(
            values,
            pre_values,
            rows,
            core_scores.astype(jnp.float32),
            x_p,
            pre_score_act=self.pre_score_act,
            implementation=self.implementation,
        )
        return out.astype(jnp.float32)

    def addressable_rows(self) -> int:
        """Distinct rows this layer can reach: min(window rows g·n², virtual grid cells N²)."""
        return min(self.window_size * self.rows_per_table, self.keys_per_side**2)

    def _losses(self, result) -> dict[str, jax.Array]:
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

    def _metrics(self, result, y: jax.Array) -> dict[str, jax.Array]:
        """SPEC §6 diagnostics that cost nothing next to the layer (no gradient)."""
        stop = jax.lax.stop_gradient
        rank = result.singular_values.shape[-1]
        total = jnp.sum(stop(result.core_scores), axis=-1)  # [H, T, m]
        first = stop(result.singular_values[0])
        return {
            "top1_score": jnp.mean(total[:, :, 0]),
            "topm_score": jnp.mean(total),
            "output_std": jnp.std(stop(y).astype(jnp.float32)),
            "lambda1": first[0],
            "lambda2": first[1] if rank > 1 else jnp.zeros((), jnp.float32),
        }


register_sparse("ultramem_v2", SparseBuilder(build_layer=UltraMemV2, build_shared=MemoryTables))
