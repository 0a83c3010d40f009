"""Expert-parallel MoE: each device routes its own tokens, exchanged over the `expert` axis.

    y, stats = routed_experts(x, router, gate, up, down, options)   # x, y: [B, S, h]; y in f32

Under `parallel.active_mesh()` (any mesh with more than one device) the routed part of the MoE layer
runs in `jax.shard_map` on each device's own tokens (the batch is split over data, fsdp AND expert);
without a mesh it is the plain single-device code. Per device, with T tokens, k = top_k, E experts,
e = mesh.shape["expert"], E_l = E / e experts per device:

    logits  = x @ router                                  # [T, E] fp32, HIGHEST
    w, c    = top_k(softmax(logits), k)                   # [T, k]
    dest    = c // E_l                                    # the device owning each chosen expert
    rows    = x[assignments sorted by expert]             # grouped by destination, then by expert
    recv    = exchange(rows)                              # over `expert`; rows from every source
    out     = SwiGLU experts of this device on recv       # moe_dispatch (grouped, block-padded)
    back    = exchange⁻¹(out)                             # results return to their tokens
    y       = Σ_j w_j · back[t, j]                        # then psum over `tensor` (see below)

Exchange (`MoEConfig.expert_parallel`):

- `ragged`: `jax.lax.ragged_all_to_all` (dropless). Each device sends exactly its rows; the receive
  buffer is static at the worst case e·T·min(k, E_l) rows (MaxText's choice), of which only the rows
  received are computed (the grouped matmul loops over used blocks). XLA:CPU has no
  ragged-all-to-all, so it exists on GPU / TPU only.
- `capacity`: a fixed buffer of C rows per (source, destination) pair through `jax.lax.all_to_all`
  ([e, C, h] each way); rows past C are dropped (contribute nothing) and counted in the metric
  `ep_dropped_fraction`. C = ceil(ep_capacity_factor · T·k / e), or with ep_capacity_factor 0 the
  worst case T·min(k, E_l) — then it is dropless.
- `auto`: ragged on GPU / TPU, capacity on CPU, chosen per lowering platform
  (`jax.lax.platform_dependent`): an AOT compile for TPU from a CPU host gets the ragged path.

Weights: gate / up [E, h, d_e] enter the shard_map as P(expert, None, tensor) and down [E, d_e, h]
as P(expert, tensor, None): the fsdp split of `embed` is all-gathered at the boundary (once per
layer per step, like any fsdp weight), the experts stay split over `expert` and the `mlp` dimension
stays split over `tensor` (Megatron style): each tensor device computes a partial down projection
of the same rows, the exchange carries partial sums, and the combined output y [T, h] (not the
[T·k, h] buffer) is psum'd over `tensor` once. A d_e that `tensor` does not divide is gathered
instead (tensor devices repeat the expert work). The router [h, E] is gathered whole (small).

Load-balancing statistics are global: the per-expert counts, the router probability sums,
logsumexp² and entropy sums are psum'd over the batch axes before the Switch product E·Σ f_e·p_e,
so the loss equals the single-device one.

Capacity (`MoEConfig.capacity_factor` > 0) cannot keep its single-device meaning (an expert keeps
its first ceil(cf·T_global·k/E) assignments in global token order) without a global ordering of
every device's tokens. Under a mesh it is per shard: each expert keeps at most ceil(cf·T·k/E) of
each device's T·k assignments, the first in that device's token order (so the global bound is the
same, and a batch whose shards are identical drops identically). `dropped_fraction` counts these
drops.

Inside the shard_map the grouped matmul is `xla` (block-padded loop) or `ragged_dot`: jax's megablox
kernel (`pallas`) cannot be traced under shard_map's varying-axes checks, so `auto` drops it there.
In the backward, the token gradient [T, h] (not an expert row buffer) is psum'd over `tensor`, and
each expert weight gradient is summed over the batch axes its weight is replicated on.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from umv2_jax.ops import moe_dispatch as dispatch_lib
from umv2_jax.ops.grouped_matmul import gather_rows
from umv2_jax.parallel.mesh import active_mesh, batch_axes, batch_shards

# The ragged exchange's collective; a name of this module so that tests on CPU (whose XLA has no
# ragged-all-to-all) can substitute an emulation with the same semantics.
ragged_all_to_all = jax.lax.ragged_all_to_all


@dataclasses.dataclass(frozen=True)
class RoutedOptions:
    """The MoE layer's static options (see MoEConfig)."""

    top_k: int
    renormalize: bool = False
    capacity_factor: float = 0.0
    expert_parallel: str = "auto"  # auto | ragged | capacity
    ep_capacity_factor: float = 0.0
    implementation: str | tuple = "auto"
    block_size: int = 64


# stats (all global over the batch): counts int32 [E] the router's choices (before any drop);
# prob_sum f32 [E] Σ_t probs; lse_sq_sum, entropy_sum f32 []; kept f32 [] assignments kept by
# capacity_factor; ep_dropped f32 [] assignments the capacity exchange dropped; tokens: python int.
Stats = dict


def routed_experts(
    x: jax.Array,
    router: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    options: RoutedOptions,
    dispatch: Callable = dispatch_lib.moe_dispatch,
) -> tuple[jax.Array, Stats]:
    """x: [B, S, h] (compute dtype), router [h, E], gate / up [E, h, d_e], down [E, d_e, h]
    → (y [B, S, h] fp32: Σ_j w_j · expert_j(x), stats of the whole batch).

    dispatch: the grouped-experts op, with `moe_dispatch`'s signature (tests pass an interpreted
    one).

    Token-local under `shard_map` when a mesh is active and splits the batch evenly; otherwise the
    plain code on the whole batch (single device, or a batch the mesh cannot split, e.g. decode).
    """
    mesh = active_mesh()
    batch = x.shape[0]
    if mesh is None or batch % batch_shards(mesh):
        y, stats = _shard(
            x, router, gate, up, down, options, dispatch, experts_axis=1, tensor_split=False
        )
        return y, {**stats, "tokens": x.shape[0] * x.shape[1]}
    axes = batch_axes(mesh)
    expert_shards = mesh.shape["expert"]
    tensor = mesh.shape["tensor"]
    tensor_split = tensor > 1 and gate.shape[2] % tensor == 0
    ex = "expert" if expert_shards > 1 else None
    tn = "tensor" if tensor_split else None
    tokens = P(axes if axes else None)

    inner_dispatch = _without_pallas(dispatch, options.implementation)

    def body(x, router, gate, up, down):
        y, stats = _shard(
            x,
            router,
            gate,
            up,
            down,
            options,
            inner_dispatch,
            experts_axis=expert_shards,
            tensor_split=tensor_split,
        )
        if axes:
            stats = {name: jax.lax.psum(value, axes) for name, value in stats.items()}
        return y, stats

    stat_specs = {name: P() for name in ("counts", "prob_sum", "lse_sq_sum", "entropy_sum")}
    stat_specs.update(kept=P(), ep_dropped=P())
    y, stats = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(tokens, P(), P(ex, None, tn), P(ex, None, tn), P(ex, tn, None)),
        out_specs=(tokens, stat_specs),
    )(x, router, gate, up, down)
    return y, {**stats, "tokens": x.shape[0] * x.shape[1]}


def _without_pallas(dispatch: Callable, implementation) -> Callable:
    """`dispatch` for use inside the shard_map: without the Pallas (megablox) grouped matmul, whose
    pallas_call cannot be traced under `shard_map(check_vma=True)` (its outputs carry no
    varying-axes type); "auto" becomes ragged_dot / xla on GPU / TPU (per lowering platform) and
    xla (auto's CPU choice) on CPU."""
    if implementation == "pallas":
        raise ValueError(
            "model.moe.implementation='pallas' cannot run under a mesh (the megablox kernel cannot "
            "be traced inside shard_map); use auto, ragged_dot or xla"
        )
    if isinstance(implementation, tuple):
        chosen = tuple(name for name in implementation if name != "pallas") or ("xla",)
        return functools.partial(_with_implementation, dispatch, chosen)
    if implementation != "auto":
        return dispatch

    def auto(*args, **kwargs):
        del kwargs["implementation"]
        arrays, valid = args, kwargs.pop("valid", None)
        extra = () if valid is None else (valid,)

        def run(chosen):
            def branch(*a):
                more = {} if valid is None else {"valid": a[-1]}
                inputs = a[:-1] if valid is not None else a
                return tuple(dispatch(*inputs, implementation=chosen, **more, **kwargs))

            return branch

        return jax.lax.platform_dependent(
            *arrays, *extra, cpu=run("xla"), default=run(("ragged_dot", "xla"))
        )

    return auto


def _varying_axes(value: jax.Array) -> frozenset:
    manual = getattr(jax.typeof(value), "manual_axis_type", None)
    return frozenset(getattr(manual, "varying", ()))


def _vary(value: jax.Array, *references: jax.Array) -> jax.Array:
    """`value` typed as varying over every manual axis its references vary over (shard_map's
    check_vma): branches of platform_dependent must agree, and ragged_all_to_all's result takes
    the type of its `output` argument, which must carry the operand's (a partial sum over tensor
    typed as tensor-invariant would be psum'd wrong)."""
    axes = frozenset().union(*(_varying_axes(r) for r in references)) - _varying_axes(value)
    return jax.lax.pcast(value, tuple(sorted(axes)), to="varying") if axes else value


def _with_implementation(dispatch, chosen, *args, **kwargs):
    kwargs["implementation"] = chosen
    return dispatch(*args, **kwargs)


def _shard(x, router, gate, up, down, options, dispatch_fn, *, experts_axis, tensor_split):
    """One device's tokens: x [b, s, h] → (y [b, s, h] fp32, this shard's stat sums)."""
    b, s, h = x.shape
    tokens, k = b * s, options.top_k
    experts = router.shape[1]
    flat = x.reshape(tokens, h)
    logits = jnp.dot(
        flat.astype(jnp.float32),
        router.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )  # [T, E]
    probs = jax.nn.softmax(logits, axis=-1)
    weights, chosen = jax.lax.top_k(probs, k)  # [T, k]
    if options.renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    expert_of = chosen.reshape(tokens * k)
    counts = jnp.zeros((experts,), jnp.int32).at[expert_of].add(1)
    capacity = None
    if options.capacity_factor > 0:
        capacity = math.ceil(options.capacity_factor * tokens * k / experts)
    gate, up, down = (w.astype(flat.dtype) for w in (gate, up, down))
    dispatch = dict(implementation=options.implementation, block_size=options.block_size)
    rows = flat
    if tensor_split:
        # Typed tensor-varying here (the experts' rows differ per mlp slice downstream), so that
        # the backward psums the [T, h] token gradient over `tensor`, not an expert row buffer.
        rows = jax.lax.pcast(flat, ("tensor",), to="varying")

    if experts_axis == 1:
        out, kept = dispatch_fn(rows, chosen, gate, up, down, capacity=capacity, **dispatch)
        exchanged = kept
    else:
        if capacity is None:
            kept = jnp.ones((tokens, k), bool)
        else:
            kept = dispatch_lib._rank_within_expert(expert_of, counts).reshape(tokens, k) < capacity
        args = (rows, chosen, kept, gate, up, down)
        static = dict(
            experts=experts,
            shards=experts_axis,
            capacity=capacity,
            options=options,
            dispatch_fn=dispatch_fn,
            **dispatch,
        )
        if options.expert_parallel == "capacity":
            out, exchanged = _capacity_exchange(*args, **static)
        elif options.expert_parallel == "ragged":
            out, exchanged = _ragged_exchange(*args, **static)
        else:
            out, exchanged = jax.lax.platform_dependent(
                *args,
                cpu=lambda *a: _capacity_exchange(*a, **static),
                default=lambda *a: _ragged_exchange(*a, **static),
            )
    combine = jnp.where(exchanged, weights, 0.0)
    # As a contraction over the k slots: several times faster on CPU than multiply-then-sum.
    y = jnp.einsum(
        "tkh,tk->th",
        out.astype(jnp.float32).reshape(tokens, k, h),
        combine,
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
    if tensor_split:
        y = jax.lax.psum(y, "tensor")  # partial down projections over the mlp split
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
    stats = {
        "counts": counts,
        "prob_sum": jnp.sum(probs, axis=0),
        "lse_sq_sum": jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1))),
        "entropy_sum": jnp.sum(entropy),
        "kept": jnp.sum(kept.astype(jnp.float32)),
        "ep_dropped": jnp.sum((kept & ~exchanged).astype(jnp.float32)),
    }
    return y.reshape(b, s, h), stats


class _Sorted:
    """A shard's assignments sorted by expert (router drops last), grouped by destination device.

    order [T·k]: sorted position → assignment; inverse: assignment → sorted position;
    sorted_local [T·k]: each sorted row's expert on its device (−1 for dropped rows);
    dest_counts / dest_start [e]: rows to each destination and where they start in sorted order.
    """

    def __init__(self, chosen, kept, experts, shards):
        per_device = experts // shards
        expert_of = jnp.where(kept, chosen, experts).reshape(-1)  # router drops: key `experts`
        size = expert_of.shape[0]
        self.order = dispatch_lib._stable_argsort(expert_of, experts + 1)
        position = jnp.arange(size, dtype=jnp.int32)
        self.inverse = jnp.zeros_like(self.order).at[self.order].set(position)
        sorted_expert = expert_of[self.order]
        self.sorted_kept = sorted_expert < experts
        self.sorted_local = jnp.where(self.sorted_kept, sorted_expert % per_device, -1)
        self.sorted_dest = jnp.minimum(sorted_expert // per_device, shards)  # `shards`: dropped
        self.dest_counts = jnp.zeros((shards + 1,), jnp.int32).at[self.sorted_dest].add(1)[:shards]
        self.dest_start = jnp.cumsum(self.dest_counts) - self.dest_counts
        self.position = position


def _worst_case_rows(tokens, k, per_device, capacity):
    """Most rows one source can send one destination: each token picks an expert at most once."""
    rows = tokens * min(k, per_device)
    if capacity is not None:
        rows = min(rows, per_device * capacity)
    return max(rows, 1)


def _capacity_exchange(
    x, chosen, kept, gate, up, down, *, experts, shards, capacity, options, dispatch_fn, **dispatch
):
    """all_to_all of a [e, C, h] buffer each way. → (out [T, k, h], exchanged [T, k] bool)."""
    tokens, k = chosen.shape
    h = x.shape[1]
    per_device = experts // shards
    worst = _worst_case_rows(tokens, k, per_device, capacity)
    rows = worst
    if options.ep_capacity_factor > 0:
        rows = min(worst, max(1, math.ceil(options.ep_capacity_factor * tokens * k / shards)))
    plan = _Sorted(chosen, kept, experts, shards)
    dest_start = jnp.concatenate([plan.dest_start, jnp.zeros((1,), jnp.int32)])
    rank = plan.position - dest_start[plan.sorted_dest]
    sorted_ok = plan.sorted_kept & (rank < rows)
    sorted_slot = jnp.where(sorted_ok, plan.sorted_dest * rows + rank, 0)
    assignment_slot = sorted_slot[plan.inverse]  # [T·k]
    assignment_ok = sorted_ok[plan.inverse]
    # Slot d·C + r of the send buffer holds the r-th row for destination d, if there is one.
    slot = jnp.arange(shards * rows, dtype=jnp.int32)
    slot_dest, slot_rank = slot // rows, slot % rows
    slot_ok = slot_rank < jnp.minimum(plan.dest_counts[slot_dest], rows)
    slot_position = jnp.where(slot_ok, plan.dest_start[slot_dest] + slot_rank, 0)
    slot_assignment = plan.order[slot_position]
    send = gather_rows(
        x,
        slot_assignment // k,
        slot_ok,
        assignment_slot.reshape(tokens, k),
        assignment_ok.reshape(tokens, k),
    )  # [e·C, h]
    send_ids = jnp.where(slot_ok, plan.sorted_local[slot_position], -1)

    def exchange(a):
        shaped = a.reshape(shards, rows, *a.shape[1:])
        return jax.lax.all_to_all(shaped, "expert", 0, 0).reshape(a.shape)

    received, received_ids = exchange(send), exchange(send_ids)
    out, _ = dispatch_fn(
        received,
        jnp.maximum(received_ids, 0)[:, None],
        gate,
        up,
        down,
        valid=(received_ids >= 0)[:, None],
        **dispatch,
    )
    back = exchange(out.reshape(shards * rows, h))
    result = gather_rows(back, assignment_slot, assignment_ok, slot_assignment, slot_ok)
    result = _vary(result.reshape(tokens, k, h), x, gate, down)
    return result, _vary(assignment_ok.reshape(tokens, k), chosen)


def _ragged_exchange(
    x, chosen, kept, gate, up, down, *, experts, shards, capacity, options, dispatch_fn, **dispatch
):
    """ragged_all_to_all each way (dropless). → (out [T, k, h], exchanged [T, k] bool = kept)."""
    del options
    tokens, k = chosen.shape
    h = x.shape[1]
    per_device = experts // shards
    plan = _Sorted(chosen, kept, experts, shards)
    everything = jnp.ones((tokens * k,), bool)
    rows = gather_rows(
        x,
        plan.order // k,
        everything,
        plan.inverse.reshape(tokens, k),
        everything.reshape(tokens, k),
    )  # [T·k, h] in sorted order; router drops at the end are never sent
    # counts[s, d]: rows source s sends destination d, known to every device of the expert group.
    counts = jax.lax.all_gather(plan.dest_counts, "expert")  # [e, e]
    me = jax.lax.axis_index("expert")
    recv_sizes = counts[:, me]
    output_offsets = (jnp.cumsum(counts, axis=0) - counts)[me]  # my chunk in each receiver
    buffer_rows = shards * _worst_case_rows(tokens, k, per_device, capacity)

    def send(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
        output = _vary(output, operand, input_offsets, output_offsets)
        return ragged_all_to_all(
            operand,
            output,
            input_offsets,
            send_sizes,
            output_offsets,
            recv_sizes,
            axis_name="expert",
        )

    received = send(
        rows,
        jnp.zeros((buffer_rows, h), x.dtype),
        plan.dest_start,
        plan.dest_counts,
        output_offsets,
        recv_sizes,
    )
    received_ids = send(
        plan.sorted_local,
        jnp.full((buffer_rows,), -1, jnp.int32),
        plan.dest_start,
        plan.dest_counts,
        output_offsets,
        recv_sizes,
    )
    out, _ = dispatch_fn(
        received,
        jnp.maximum(received_ids, 0)[:, None],
        gate,
        up,
        down,
        valid=(received_ids >= 0)[:, None],
        **dispatch,
    )
    out = out.reshape(buffer_rows, h)
    recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes
    back_offsets = (jnp.cumsum(counts, axis=1) - counts)[:, me]  # my rows in each source's order
    back = send(
        out,
        jnp.zeros((tokens * k, h), out.dtype),
        recv_offsets,
        recv_sizes,
        back_offsets,
        plan.dest_counts,
    )
    kept_flat = kept.reshape(-1)
    result = gather_rows(back, plan.inverse, kept_flat, plan.order, plan.sorted_kept)
    return _vary(result.reshape(tokens, k, h), x, gate, down), _vary(kept, chosen)
