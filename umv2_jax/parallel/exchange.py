"""Memory tables row-sharded on `fsdp`: the window all-gather or the row-id exchange, by bytes moved.

    path = choose(TableTraffic(...), tokens=T, fsdp=f, requested="auto")   # "window" | "exchange"
    o = exchange_bag(aggregate, rows, scores, x_p, axis="fsdp", shards=f,   # inside a shard_map
                     rows_per_table=n², capacity=0)

A memory layer's window of tables is [g, n², D] with the n² rows of each table split in f contiguous
blocks over the f devices of `fsdp` (device j owns rows [j·n²/f, (j+1)·n²/f) of every table of the
window). Two ways to aggregate a device's T tokens × m slots (m = heads·topk) against them:

**window** (`umv2_jax.parallel.memory`, the simple FSDP choice): all-gather the window's rows over
fsdp, aggregate locally, and reduce-scatter the table gradient (the gather's transpose). Per device and
layer each way: (f−1)/f · g·n² · (D_v + D_p)/t table elements (t = the tensor split), independent of T.

**exchange** (`exchange_bag`): within the fsdp group, all-gather every device's row ids [T, m] int32,
slot weights [T, m, C] and pre-value query x_p [T, D_p/t] (tiled: [f·T, ·]); each owner keeps the slots
whose rows it owns (the others get weight 0 and a valid local row), rebases their ids to its shard
(local id = table·n²/f + row mod n²/f) and runs `value_bag` with its own rows for all the group's
tokens: partial outputs [f·T, D_v/t]; one `psum_scatter` returns each device the sum for its own T
tokens. Backward mirrors it: the psum_scatter's transpose all-gathers d_out [f·T, D_v/t], value_bag's
backward gives the table gradient of the owner's own rows locally (deterministic, no table-sized
collective over fsdp), and the all-gathers' transposes reduce-scatter d_scores and d_x_p to the
tokens' devices. Per device and layer (f−1)·T elements of
    forward:  m (row ids) + m·C (weights) + D_p/t (x_p) + D_v/t (partial sums)
    backward: m·C (d weights) + D_p/t (d x_p) + D_v/t (d out)
grows with T and not with the table, so it wins for big tables (`choose` compares both, × the element
bytes: 4 for ids and fp32 activations, the table dtype for the window).

Owner work. Without a capacity (`model.memory.exchange_capacity_factor: 0`, the default, lossless)
each owner runs value_bag over the group's f·T tokens × m slots, of which ~1/f are its own (the rest
read local row 0 with weight 0): f× the slots of the window path's call (the value_bag work per layer,
T·m row reads of D_v + D_p, grows f×; its bytes on the interconnect do not). With a factor c > 0 each
owner compacts a token's own slots into a buffer of ceil(c·m/f) slots (a stable sort per token, own
slots first): ≈ c× the window path's work. A token with more own slots on one owner than the buffer
holds loses the rest (counted: the layer's `exchange_dropped_fraction` metric); a buffer
below the m/f slots an owner gets on average is refused at start-up (`check_tables`).

The cost model's numbers (arithmetic from the formulas above, checked in
tests/parallel/test_exchange.py; bytes per device per layer per step, fp32, 4096 tokens per device):
1B/7B (n² = 278 784, D_v 768, D_p 384, C 2, m = 128) at fsdp 8: window 2.25 GB, exchange 0.34 GB →
exchange (at 64k tokens per device the window wins again); a 2.5B/120B-shaped layer (n² = 1792²,
D_v 1024, D_p 512, m = 256) at fsdp 64: window 38.8 GB, exchange 4.5 GB → exchange; the tests'
144-row tables: window. Printed at start-up by the training loop and `python -m umv2_jax.aot`
(`startup_lines`). Product-key layers (pkm, memory_plus, peer: `rows_bag`) follow the same rule with
`model.product_key.table_exchange` / `exchange_capacity_factor` (their dropped slots are not
reported). The retrieval stage needs no exchange: its keys are KB-sized and replicated, each device
retrieves for its own tokens, and only the resulting row ids travel.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from umv2_jax.errors import ConfigError

PATHS = ("auto", "window", "exchange")
_ID_BYTES = 4  # int32 row ids
_ACT_BYTES = 4  # fp32 slot weights, x_p, partial sums and their cotangents


@dataclasses.dataclass(frozen=True)
class TableTraffic:
    """What the cost model needs of one memory layer (static).

    window_rows: g·n² rows of the layer's window; rows_per_table: n²; value_dim / pre_value_dim:
    D_v, D_p (whole; the tensor split divides them); slots: m = heads·topk per token; n_cores: C;
    table_bytes: bytes of one table element (4 for fp32 tables, 2 for bf16).
    """

    window_rows: int
    rows_per_table: int
    value_dim: int
    pre_value_dim: int
    slots: int
    n_cores: int
    table_bytes: int = 4


@dataclasses.dataclass(frozen=True)
class ExchangeCost:
    """Bytes one device moves per layer per step (forward + backward) on each path, and the choice."""

    window_bytes: int
    exchange_bytes: int
    path: str  # "window" | "exchange"
    reason: str  # "cost model" | "set by model.memory.table_exchange" | "fsdp = 1"


def path_bytes(traffic: TableTraffic, tokens: int, fsdp: int, tensor: int = 1) -> tuple[int, int]:
    """(window, exchange) bytes per device per layer, forward + backward (the module text).

    tokens: T, the tokens of one device (one micro-batch); fsdp: f; tensor: t (the D split).
    """
    if fsdp <= 1:
        return 0, 0
    d_v, d_p = traffic.value_dim // tensor, traffic.pre_value_dim // tensor
    rows_received = traffic.window_rows * (fsdp - 1) // fsdp
    window = 2 * rows_received * (d_v + d_p) * traffic.table_bytes
    m, c = traffic.slots, traffic.n_cores
    forward = m * _ID_BYTES + (m * c + d_p + d_v) * _ACT_BYTES
    backward = (m * c + d_p + d_v) * _ACT_BYTES
    exchange = (fsdp - 1) * tokens * (forward + backward)
    return window, exchange


def choose(
    traffic: TableTraffic, tokens: int, fsdp: int, tensor: int = 1, requested: str = "auto"
) -> ExchangeCost:
    """The path for this layer: `requested` unless "auto", then the one moving fewer bytes."""
    if requested not in PATHS:
        raise ConfigError(
            f"config 'model.memory.table_exchange': {requested!r} is not one of {', '.join(PATHS)}"
        )
    window, exchange = path_bytes(traffic, tokens, fsdp, tensor)
    if fsdp <= 1:
        return ExchangeCost(window, exchange, "window", "fsdp = 1")
    if requested != "auto":
        return ExchangeCost(window, exchange, requested, "set by model.memory.table_exchange")
    path = "exchange" if exchange < window else "window"
    return ExchangeCost(window, exchange, path, "cost model")


def capacity_slots(slots: int, fsdp: int, factor: float) -> int:
    """Slots per token each owner takes: ceil(factor·slots/fsdp), at most `slots`; 0 → `slots`."""
    if factor <= 0:
        return slots
    return min(slots, math.ceil(factor * slots / fsdp - 1e-9))


def check_tables(
    traffic: TableTraffic, fsdp: int, path: str, capacity_factor: float, where: str = "mesh.fsdp"
) -> None:
    """ConfigError (one line: the sizes and the key to change) when `path` cannot run on `fsdp`."""
    if fsdp <= 1 or path != "exchange":
        return
    n2 = traffic.rows_per_table
    if n2 % fsdp:
        raise ConfigError(
            f"config '{where}': {fsdp} does not divide the {n2} rows of each memory table "
            f"(model.memory.n_keys²), so the exchange path cannot shard them; use an fsdp size "
            f"dividing {n2}, another model.memory.n_keys, or model.memory.table_exchange=window"
        )
    buffer = capacity_slots(traffic.slots, fsdp, capacity_factor)
    average = traffic.slots / fsdp
    if buffer < average:
        raise ConfigError(
            f"config 'model.memory.exchange_capacity_factor': {capacity_factor} gives each owner "
            f"an exchange buffer of {buffer} slot(s) per token, below the {average:g} slots "
            f"({traffic.slots} slots / fsdp {fsdp}) it receives on average, so it would overflow; "
            "raise it to at least 1 (2 keeps drops rare) or use 0 (lossless)"
        )


def exchange_bag(
    aggregate: Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array],
    rows: jax.Array,
    core_scores: jax.Array,
    x_p: jax.Array | None,
    *,
    axis: str,
    shards: int,
    rows_per_table: int,
    capacity: int = 0,
) -> tuple[jax.Array, jax.Array | None]:
    """This device's tokens aggregated by the rows' owners over `axis` (inside a shard_map).

    aggregate(local_rows [f·T, m'] int32, core_scores [f·T, m', C] f32, x_p [f·T, D_p'] or None)
        → o [f·T, D] f32: the weighted sum over this device's row shard (value_bag).
    rows: [T, m] int32 rows of the window [g·n²]; core_scores: [T, m, C]; x_p: [T, D_p'] or None.
    capacity: slots per token this owner takes (0 or ≥ m: all, masked).
    Returns (o [T, D] f32, dropped slots of the group's tokens on this owner (f32 scalar) or None).
    Plain-JAX equivalent (one device): aggregate(rows, core_scores, x_p) on the whole window.
    """
    tokens, slots = rows.shape
    share = rows_per_table // shards
    all_rows = lax.all_gather(rows, axis, axis=0, tiled=True)  # [f·T, m]
    all_scores = lax.all_gather(core_scores, axis, axis=0, tiled=True)  # [f·T, m, C]
    all_x_p = None if x_p is None else lax.all_gather(x_p, axis, axis=0, tiled=True)
    in_table = all_rows % rows_per_table
    owner = in_table // share
    local = (all_rows // rows_per_table) * share + in_table % share
    mine = owner == lax.axis_index(axis)
    dropped = None
    if 0 < capacity < slots:
        # Own slots first (stable: slot order kept), then the first `capacity` of them.
        order = jnp.argsort(jnp.where(mine, 0, 1), axis=1, stable=True)[:, :capacity]
        dropped = jnp.sum(jnp.maximum(jnp.sum(mine, axis=1) - capacity, 0)).astype(jnp.float32)
        local = jnp.take_along_axis(local, order, axis=1)
        mine = jnp.take_along_axis(mine, order, axis=1)
        all_scores = jnp.take_along_axis(all_scores, order[..., None], axis=1)
    local = jnp.where(mine, local, 0)
    all_scores = jnp.where(mine[..., None], all_scores, 0).astype(all_scores.dtype)
    partial = aggregate(local.astype(jnp.int32), all_scores, all_x_p)  # [f·T, D]
    return lax.psum_scatter(partial, axis, scatter_dimension=0, tiled=True), dropped


def traffic_of(memory, table_bytes: int) -> TableTraffic:
    """TableTraffic of an UltraMemV2 layer from its `MemoryConfig`."""
    rows = memory.n_keys**2
    return TableTraffic(
        window_rows=memory.value_share.window * rows,
        rows_per_table=rows,
        value_dim=memory.value_dim,
        pre_value_dim=memory.pre_value_dim,
        slots=memory.heads * memory.topk,
        n_cores=memory.n_cores,
        table_bytes=table_bytes,
    )


def startup_lines(config, mesh) -> list[str]:
    """What the training loop and the AOT tool print for an UltraMemV2 model on `mesh`: both paths'
    bytes and the choice (plus ConfigError when the chosen path cannot run; see `check_tables`)."""
    from umv2_jax.parallel.mesh import batch_shards

    model = config.model
    fsdp = mesh.shape.get("fsdp", 1)
    if model.sparse != "ultramem_v2" or fsdp <= 1:
        return []
    memory = model.memory
    traffic = traffic_of(memory, 2 if model.param_dtype == "bfloat16" else 4)
    tokens = (
        config.train.batch_size // max(config.train.micro_batches, 1) // batch_shards(mesh)
    ) * config.data.seq_len
    tensor = mesh.shape.get("tensor", 1)
    split = tensor if memory.value_dim % tensor == 0 and memory.pre_value_dim % tensor == 0 else 1
    if traffic.rows_per_table % fsdp:
        check_tables(traffic, fsdp, memory.table_exchange, memory.exchange_capacity_factor)
        return [
            f"memory tables: fsdp {fsdp} does not divide the {traffic.rows_per_table} rows of a "
            "table, so they are replicated over 'fsdp' (window path, no gather)"
        ]
    cost = choose(traffic, tokens, fsdp, split, memory.table_exchange)
    check_tables(traffic, fsdp, cost.path, memory.exchange_capacity_factor)
    buffer = capacity_slots(traffic.slots, fsdp, memory.exchange_capacity_factor)
    work = (
        f"{fsdp}× (lossless)"
        if buffer >= traffic.slots
        else f"{buffer * fsdp / traffic.slots:.2g}×"
    )
    return [
        f"memory tables: {cost.path} path ({cost.reason}); per device and layer per step, window "
        f"all-gather {_size(cost.window_bytes)} vs exchange {_size(cost.exchange_bytes)} at "
        f"{tokens} tokens per device (fsdp {fsdp}, tensor {split}); exchange owner work {work} the "
        "window path's value_bag slots (model.memory.table_exchange / exchange_capacity_factor)"
    ]


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def rows_bag(
    bag: Callable[..., jax.Array],
    rows: jax.Array,
    weights: jax.Array,
    x_p: jax.Array | None,
    tables: tuple[jax.Array, ...],
    *,
    table_exchange: str = "auto",
    capacity_factor: float = 0.0,
) -> jax.Array:
    """A product-key layer's value_bag on every device's own tokens, window or exchange path.

    bag(rows [T, m] int32, weights [T, m] f32, x_p [T, D_p] or None, *tables) → o [T, D];
    tables: [n², D_i] each, rows-sharded on `fsdp` by the rules (`mem_rows`).
    Under `use_mesh`: the window path is `umv2_jax.parallel.mesh.token_local` (tables enter whole:
    gathered at entry); the exchange path runs one shard_map with the tables entering as their row
    shards [n²/f, D_i] and `exchange_bag` between them (the tensor axis, if any, repeats the work).
    Plain-JAX equivalent: `bag(rows, weights, x_p, *tables)`.
    """
    from umv2_jax.parallel.mesh import active_mesh, batch_axes, batch_shards, token_local

    mesh = active_mesh()
    n_tokens, slots = rows.shape
    split = (rows, weights) + (() if x_p is None else (x_p,))

    def plain(rows, weights, *rest):
        x = rest[0] if x_p is not None else None
        return bag(rows, weights, x, *rest[len(rest) - len(tables) :])

    if mesh is None:
        return plain(*split, *tables)
    fsdp = mesh.shape.get("fsdp", 1)
    n2 = tables[0].shape[0]
    traffic = TableTraffic(
        window_rows=n2,
        rows_per_table=n2,
        value_dim=tables[0].shape[1],
        pre_value_dim=sum(t.shape[1] for t in tables[1:]),
        slots=slots,
        n_cores=1,
        table_bytes=jnp.dtype(tables[0].dtype).itemsize,
    )
    shards = batch_shards(mesh)
    path = "window"
    if fsdp > 1 and n_tokens % shards == 0:
        if n2 % fsdp:
            check_tables(traffic, fsdp, table_exchange, capacity_factor)
        else:
            path = choose(traffic, n_tokens // shards, fsdp, 1, table_exchange).path
            check_tables(traffic, fsdp, path, capacity_factor)
    if path == "window":
        return token_local(plain, n_tokens, len(split))(*split, *tables)

    P = jax.sharding.PartitionSpec
    axes = batch_axes(mesh)
    capacity = capacity_slots(slots, fsdp, capacity_factor)

    def body(rows, weights, *rest):
        x = rest[0] if x_p is not None else None
        local_tables = rest[len(rest) - len(tables) :]

        def aggregate(local_rows, scores, x_all):
            return bag(local_rows, scores[..., 0], x_all, *local_tables).astype(jnp.float32)

        out, _ = exchange_bag(
            aggregate,
            rows,
            weights[..., None],
            x,
            axis="fsdp",
            shards=fsdp,
            rows_per_table=n2,
            capacity=capacity,
        )
        return out

    tokens = P(axes)
    run = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tokens,) * len(split) + (P("fsdp", None),) * len(tables),
        out_specs=tokens,
        check_vma=False,  # Pallas outputs carry no varying-axes type (see parallel/memory.py)
    )
    return run(*split, *tables).astype(tables[0].dtype)
