"""UltraMemV2's memory layer token-local under `shard_map`, tables split on `tensor` and `fsdp`.

    with parallel.use_mesh(mesh):
        out = layer(u, context)          # UltraMemV2.__call__ → token_local(...) → one shard_map

Under a mesh the whole layer (retrieval → row mapping → pre-scores → value aggregation → output
projection) runs inside ONE `jax.shard_map` on each device's own tokens: u [B, S, h] enters split over
the mesh's batch axes (`batch_axes(mesh)`: data, fsdp, expert), the small retrieval parameters and the
permutation enter replicated (P()). No retrieval score or row id is ever gathered across the batch
axes, and value_bag's token loop, sort and scatter run on the local tokens only. The table gradient
leaves the shard_map once per layer: the tables enter invariant over the batch axes (or split on
fsdp), so shard_map's transpose reduces the window-sized cotangent with one all-reduce (data, expert)
or one reduce-scatter (fsdp, the all-gather's transpose) per layer, not per token block.

Dimension-wise memory parallelism on `tensor` (t devices; the authors' and Meta's choice). The tables
enter as D slices (values [g, n², D_v/t], pre-values [g, n², D_p/t]), W_p as [h, D_p/t] and W_o as
[D_v/t, h]. Each tensor device

    (a) retrieves for 1/t of the local tokens, then all-gathers (tiled) the row ids [H, T, m] and
        core scores [H, T, m, C] across the tensor group (when t does not divide the local tokens,
        every tensor device retrieves all of them instead: same result, t× the retrieval work);
    (b) computes partial pre-score dots <x_p[slice], P[row][slice]>, `psum`s them over tensor and
        applies the activation;
    (c) aggregates its own D_v slice with value_bag; core-score chunk c covers D_v columns
        [c·D_v/C, (c+1)·D_v/C), so a device gets the C/t chunks its slice covers (t | C) or the one
        chunk its slice lies in (C | t);
    (d) y = o_slice @ W_o[slice], `psum` over tensor.

The split needs t | D_v, t | D_p and (C % t == 0 or t % C == 0) (`tensor_split`); otherwise the layer
runs with whole tables on every tensor device (XLA gathers the slices at the shard_map's entry) and
`umv2_jax.parallel.warnings` is where such a mesh is reported. Without a tensor split the fused
value_bag call (pre-values inside) is kept.

Rows on `fsdp` (`mem_rows`): two paths, chosen per layer by `umv2_jax.parallel.exchange.choose` from
the bytes each moves per device and step (printed at start-up; `model.memory.table_exchange: auto |
window | exchange` overrides it). The **window** path all-gathers the window's tables over fsdp
inside the shard_map and the transpose reduce-scatters the gradient: (f−1)/f·g·n²·(D_v + D_p)/t
table elements each way, whatever the tokens. The **exchange** path never gathers a table: the fsdp
group all-gathers its row ids, slot weights and x_p, each device aggregates its own row shard for all
the group's tokens (value_bag on local rows) and a reduce-scatter returns each device its tokens'
sums (`MemoryPlan.aggregate` → `exchange_bag`); the table gradient stays on its owner. It moves
(f−1)·T·(m·(4 + 8C) + 8·(D_p + D_v)/t) bytes (fp32), so it grows with tokens per device, not with the
table. (An earlier version of this text compared the window with shipping every slot's gathered
value row, T·m·(D_v + D_p) per device, and kept the gather; returning the owners' per-token partial
sums instead moves about m times less.)
At the 1B/7B shape (n² = 278 784, D_v 768, D_p 384, C = 2, m = 128, 4096 tokens per device, fp32
tables, fsdp 8): window 2.25 GB, exchange 0.34 GB per layer and step, so `auto` exchanges; at 64k
tokens per device or for the tests' 144-row tables it gathers. The exchange's cost is work on the
owners (f× the value_bag slots without a capacity, ≈ c× with `exchange_capacity_factor` c; see
`umv2_jax.parallel.exchange`). Tables whose n² rows fsdp does not divide are replicated over fsdp
(the window path without a gather); asking for the exchange path then is a ConfigError.

Measured for the window path, before the exchange path existed (XLA:CPU plan on 8 fake CPU devices,
not a TPU/GPU number; `python -m umv2_jax.aot --config configs/paper/ultramem_v2_1b7b.yaml --mesh
fsdp=8 --set model.remat=full`, now with `--set model.memory.table_exchange=window`, 4096 tokens per
device):
temporaries 10.8 GB per device at fsdp 8 (9.2 GB at fsdp 4 × tensor 2), against 58.5 GB (31.1 GB)
with the previous memory layer (whole-stack reads, no shard_map) and the rest of the tree unchanged.

Losses and metrics are global: the key-balance statistics f and p are averaged over the batch axes
before their product (`TuckerRetrieval(..., balance_axes=...)`), mean metrics are `pmean`'d and the
evaluation's row hits are OR-reduced (`pmax`) and its per-row counts summed over the batch axes
(`psum`). Both implementations (xla, pallas) run inside.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from umv2_jax.parallel import exchange as exchange_lib
from umv2_jax.parallel.mesh import batch_axes, batch_shards

P = PartitionSpec


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """The collectives that join one device's share of a memory layer to the others' (static).

    batch:           mesh axes over which devices hold different tokens (means, key balance, hits).
    tensor:          the axis the D dimensions are split on, or None (whole D on every device).
    tensor_size:     t.
    split_retrieval: each tensor device retrieves 1/t of the local tokens (then all-gathers).
    n_cores:         C (for `local_chunks`).
    rows_axis:       the axis the tables' rows are split on when the exchange path runs
                     (`umv2_jax.parallel.exchange`), else None (the window arrives whole).
    rows_shards:     its size f; rows_per_table: n²; exchange_slots: slots per token each owner
                     takes (0: all of them).
    The default (`LOCAL`) makes every method the identity: plain single-device code.
    """

    batch: tuple[str, ...] = ()
    tensor: str | None = None
    tensor_size: int = 1
    split_retrieval: bool = False
    n_cores: int = 1
    rows_axis: str | None = None
    rows_shards: int = 1
    rows_per_table: int = 0
    exchange_slots: int = 0

    def aggregate(
        self,
        bag: Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array],
        rows: jax.Array,
        core_scores: jax.Array,
        x_p: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """bag(rows [T, m], core_scores [T, m, C], x_p [T, D_p'] or None) → o [T, D] on this
        device's tables, or through the rows' owners (`exchange_bag`) when the rows are split.
        Returns (o, this owner's dropped-slot fraction of the group's slots, or None)."""
        if self.rows_axis is None:
            return bag(rows, core_scores, x_p), None
        out, dropped = exchange_lib.exchange_bag(
            bag,
            rows,
            core_scores,
            x_p,
            axis=self.rows_axis,
            shards=self.rows_shards,
            rows_per_table=self.rows_per_table,
            capacity=self.exchange_slots,
        )
        if dropped is None:
            return out, None
        # Per-owner share of the group's f·T·m slots; the mean over the mesh times f is the
        # group's fraction (every group has the same f owners).
        fraction = dropped / (rows.size * self.rows_shards)
        return out, self.mean_batch(fraction) * self.rows_shards

    @property
    def stat_axes(self) -> tuple[str, ...]:
        """Axes a global scalar statistic is averaged over (tensor too: its devices agree)."""
        return self.batch + ((self.tensor,) if self.tensor is not None else ())

    @property
    def balance_axes(self) -> tuple[str, ...]:
        """Axes over which the retrieval's tokens differ (the key-balance statistics' pmean)."""
        return self.batch + ((self.tensor,) if self.split_retrieval else ())

    def retrieval_tokens(self, x: jax.Array) -> jax.Array:
        """x [T, h] → the tokens this device retrieves for: [T/t, h] slice `axis_index(tensor)`."""
        if not self.split_retrieval:
            return x
        piece = x.shape[0] // self.tensor_size
        return lax.dynamic_slice_in_dim(x, lax.axis_index(self.tensor) * piece, piece, axis=0)

    def gather_tokens(self, a: jax.Array, axis: int) -> jax.Array:
        """The tensor group's retrieval results joined along the token `axis` (tiled all-gather)."""
        if not self.split_retrieval:
            return a
        return lax.all_gather(a, self.tensor, axis=axis, tiled=True)

    def local_chunks(self, core_scores: jax.Array) -> jax.Array:
        """[T, m, C] → the core scores of the chunks this device's D_v slice covers, [T, m, C']."""
        if self.tensor is None:
            return core_scores
        t, c = self.tensor_size, self.n_cores
        index = lax.axis_index(self.tensor)
        if c % t == 0:
            return lax.dynamic_slice_in_dim(core_scores, index * (c // t), c // t, axis=-1)
        return lax.dynamic_slice_in_dim(core_scores, index // (t // c), 1, axis=-1)

    def sum_tensor(self, a: jax.Array) -> jax.Array:
        """psum over tensor (a partial product of a D slice), or a."""
        return a if self.tensor is None else lax.psum(a, self.tensor)

    def mean_batch(self, a: jax.Array) -> jax.Array:
        """Global mean of a per-device mean over equally many tokens."""
        return lax.pmean(a, self.stat_axes) if self.stat_axes else a

    def sum_batch(self, counts: jax.Array) -> jax.Array:
        """Sum of per-device counts over the devices holding different tokens (`psum` over the
        batch axes; tensor devices share their tokens, so they are not added)."""
        return lax.psum(counts, self.batch) if self.batch else counts

    def any_batch(self, hits: jax.Array) -> jax.Array:
        """OR of a bool mask over every device (`pmax`)."""
        if not self.stat_axes:
            return hits
        return lax.pmax(hits.astype(jnp.int32), self.stat_axes).astype(jnp.bool_)


LOCAL = MemoryPlan()


def tensor_split(mesh: Mesh, value_dim: int, pre_value_dim: int, n_cores: int) -> bool:
    """Whether the memory layer splits D_v / D_p on `tensor` on this mesh (see the module text)."""
    t = mesh.shape.get("tensor", 1)
    if t <= 1:
        return False
    return value_dim % t == 0 and pre_value_dim % t == 0 and (n_cores % t == 0 or t % n_cores == 0)


def table_path(layer: Any, tables: Any, local_tokens: int, mesh: Mesh, split: bool):
    """(path, rows axis or None) for this layer on `mesh` (`umv2_jax.parallel.exchange.choose`).

    The rows are split on fsdp when fsdp divides each table's n² rows; otherwise the window path runs
    with the tables replicated over fsdp (ConfigError if the exchange path was asked for)."""
    f = mesh.shape.get("fsdp", 1)
    t = mesh.shape.get("tensor", 1) if split else 1
    traffic = exchange_lib.TableTraffic(
        window_rows=tables.values.shape[0] * tables.values.shape[1],
        rows_per_table=tables.values.shape[1],
        value_dim=layer.value_dim,
        pre_value_dim=layer.pre_value_dim,
        slots=layer.slots,
        n_cores=layer.n_cores,
        table_bytes=jnp.dtype(tables.values.dtype).itemsize,
    )
    if f <= 1:
        return "window", None
    if traffic.rows_per_table % f:
        exchange_lib.check_tables(traffic, f, layer.table_exchange, layer.exchange_capacity_factor)
        return "window", None
    cost = exchange_lib.choose(traffic, local_tokens, f, t, layer.table_exchange)
    exchange_lib.check_tables(traffic, f, cost.path, layer.exchange_capacity_factor)
    return cost.path, "fsdp"


def token_local(
    layer: Any,
    u: jax.Array,
    tables: Any,
    rank_one: tuple[jax.Array, jax.Array] | None,
    diagnostics: bool,
    mesh: Mesh,
    token_mask: jax.Array | None = None,
) -> Any:
    """`layer.core` on each device's own tokens in one shard_map → its LayerCore with y like u.

    u: [B, S, h] (B split over the batch axes); tables: the layer's window (a dataclass with
    values [g, n², D_v] and pre_values [g, n², D_p] or None). Returns None when u has no batch
    dimension the mesh's batch axes divide (the caller then runs plain code). The layer supplies
    `core`, `core_specs`, its dims, `slots`, `table_exchange` and `exchange_capacity_factor`.
    Plain-JAX equivalent: `layer.core(u.reshape(-1, h), tables, rank_one, diagnostics)`.
    """
    batch = batch_axes(mesh)
    if u.ndim < 2 or u.shape[0] % batch_shards(mesh):
        return None
    shards = batch_shards(mesh)
    local_tokens = (u.shape[0] // shards) * math.prod(u.shape[1:-1])
    split = tensor_split(mesh, layer.value_dim, layer.pre_value_dim, layer.n_cores)
    t = mesh.shape.get("tensor", 1)
    f = mesh.shape.get("fsdp", 1)
    path, rows_axis = table_path(layer, tables, local_tokens, mesh, split)
    exchange = path == "exchange"
    plan = MemoryPlan(
        batch=batch,
        tensor="tensor" if split else None,
        tensor_size=t if split else 1,
        split_retrieval=split and local_tokens % t == 0,
        n_cores=layer.n_cores,
        rows_axis=rows_axis if exchange else None,
        rows_shards=f if exchange else 1,
        rows_per_table=tables.values.shape[1],
        exchange_slots=exchange_lib.capacity_slots(layer.slots, f, layer.exchange_capacity_factor),
    )
    dim_axis = "tensor" if split else None
    table_spec = P(None, rows_axis, dim_axis)

    graphdef, state = nnx.split(layer)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    leaves = [leaf for _, leaf in flat]

    def leaf_spec(path) -> PartitionSpec:
        names = jax.tree_util.keystr(path)
        if split and "output_proj" in names:
            return P("tensor", None)
        if split and "pre_value_proj" in names:
            return P(None, "tensor")
        return P()

    leaf_specs = [leaf_spec(path) for path, _ in flat]
    h = u.shape[-1]
    batch_spec = P(batch if batch else None)

    def body(leaves, u, values, pre_values, rank_one, token_mask):
        layer = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
        if rows_axis is not None and not exchange:  # the window path: gather the rows
            values = lax.all_gather(values, rows_axis, axis=1, tiled=True)
            if pre_values is not None:
                pre_values = lax.all_gather(pre_values, rows_axis, axis=1, tiled=True)
        window = dataclasses.replace(tables, values=values, pre_values=pre_values)
        mask = None if token_mask is None else token_mask.reshape(-1)
        core = layer.core(u.reshape(-1, h), window, rank_one, diagnostics, plan, token_mask=mask)
        return dataclasses.replace(core, y=core.y.reshape(u.shape))

    dropped = exchange and 0 < plan.exchange_slots < layer.slots
    out_specs = layer.core_specs(batch_spec, diagnostics, token_mask is not None, dropped)
    pre_spec = None if tables.pre_values is None else table_spec
    rank_spec = None if rank_one is None else (P(), P())
    mask_spec = None if token_mask is None else batch_spec
    run = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(leaf_specs, batch_spec, table_spec, pre_spec, rank_spec, mask_spec),
        out_specs=out_specs,
        # The Pallas kernels' outputs carry no varying-axes type, so the vma check is off. Its
        # transpose convention is then what this module relies on: an output's cotangent is split
        # evenly over the axes its spec leaves out and an input's cotangent is psum'd over them, which
        # is exact here because every P() output is equal on all devices (see the tests).
        check_vma=False,
    )
    return run(leaves, u, tables.values, tables.pre_values, rank_one, token_mask)
