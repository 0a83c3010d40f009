"""Weighted gather-sum of memory values with PEER-style pre-values (docs/model.md §2, steps 7–8).

    value_bag(values, pre_values, rows, core_scores, x_p) → o [T, D_v]

    p[t, ℓ]  = act(<x_p[t], pre_values[rows[t, ℓ]]>)                 (1 without pre-values)
    o[t]^c   = Σ_ℓ p[t, ℓ] · core_scores[t, ℓ, c] · values[rows[t, ℓ]]^c

where `^c` is the c-th of C equal chunks of a D_v vector. Plain-JAX equivalent (the oracle):

    pre = act(jnp.einsum("tmd,td->tm", pre_values[rows], x_p))
    w = pre[..., None] * core_scores                                  # [T, m, C]
    o = jnp.einsum("tmc,tmcd->tcd", w, values[rows].reshape(T, m, C, D_v // C)).reshape(T, D_v)

The op is a `jax.custom_vjp` built for memory: tokens are processed in blocks of `token_chunk`, so the
only transient the size of the gathered values is one [token_chunk, m, D_v] block, forward and backward;
the residuals are the inputs themselves and the [T, m] pre-scores. Table gradients are deterministic:
the T·m selected rows are sorted once and each row's contributions are summed in that fixed order.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import checkify

from umv2_jax.ops import registry

PRE_SCORE_ACTIVATIONS = ("identity", "gelu")

_PRECISION = lax.Precision.HIGHEST

# How table gradients reduce the contributions of rows that repeat (see `_table_gradients`):
#   "sorted_scatter":   scatter-add in sorted order; sequential, hence deterministic, on CPU.
#   "segmented_scan":   a segmented prefix sum over the sorted slots followed by a scatter of unique,
#                       sorted indices (each row once per block); deterministic on every backend
#                       (GPU scatter-adds of colliding indices use atomics, whose order is not fixed).
#   "auto":             per lowering platform: "sorted_scatter" on CPU, "segmented_scan" elsewhere.
#   "atomic":           opt-in, NOT deterministic: the GPU kernel (pallas_kernels.value_bag.gpu)
#                       atomically adds each slot's contribution (float add order varies run to
#                       run); the XLA path runs a plain scatter-add (atomics on GPU). Kernels that
#                       have no atomic variant use their deterministic reduction.
TABLE_REDUCTIONS = ("auto", "sorted_scatter", "segmented_scan", "atomic")


def value_bag(
    values: jax.Array,
    pre_values: jax.Array | None,
    rows: jax.Array,
    core_scores: jax.Array,
    x_p: jax.Array | None,
    *,
    pre_score_act: str = "identity",
    implementation: registry.Implementation = "auto",
    return_pre_scores: bool = False,
    token_chunk: int = 256,
    table_reduction: str = "auto",
    check_rows: bool = False,
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """o^c = Σ_ℓ p_ℓ s^c_ℓ V^c[row_ℓ], p_ℓ = act(<x_p, P[row_ℓ]>); differentiable in every float input.

    values:      [N_rows, D_v]  value table (may be a pool of several layers' tables).
    pre_values:  [N_rows, D_p]  pre-value table, or None (then p_ℓ = 1 and x_p must be None).
    rows:        [T, m] int     physical row of each selected slot; rows may repeat anywhere.
    core_scores: [T, m, C]      per-slot per-core scores s^c_ℓ; D_v must be a multiple of C.
    x_p:         [T, D_p]       pre-value query W_p u, or None.
    pre_score_act: "identity" (paper, release) or "gelu" (exact, erf form).
    return_pre_scores: also return p [T, m] float32 (differentiable).
    token_chunk: tokens per block (static); bounds the transient gather at [token_chunk, m, D_v].
    table_reduction: see TABLE_REDUCTIONS.
    check_rows: add a `checkify.check` that every row id is in [0, N_rows); run the caller under
        `jax.experimental.checkify.checkify` to get the first bad id with its token and slot.
        Unchecked, an id outside [0, N_rows), negative or not, never reads or writes the tables
        (every implementation: xla and the GPU and TPU kernels): its slot gives NaN outputs and its
        table gradients are dropped (negative ids are not wrapped NumPy-style).
    implementation / interpret: see `umv2_jax.ops.registry` (the plain-JAX path is "xla").

    Returns o [T, D_v] in values.dtype (accumulated in float32), and p when asked.
    """
    _check_inputs(values, pre_values, rows, core_scores, x_p, pre_score_act, token_chunk)
    if check_rows:
        _check_row_ids(rows, values.shape[0])
    if table_reduction not in TABLE_REDUCTIONS:
        raise ValueError(
            f"unknown table_reduction {table_reduction!r}; choose one of {', '.join(TABLE_REDUCTIONS)}"
        )
    out, pre_scores = registry.call(
        "value_bag",
        values,
        pre_values,
        rows.astype(jnp.int32),
        core_scores,
        x_p,
        implementation=implementation,
        interpret=interpret,
        pre_score_act=pre_score_act,
        token_chunk=max(1, min(token_chunk, rows.shape[0])),
        table_reduction=table_reduction,
    )
    return (out, pre_scores) if return_pre_scores else out


def value_bag_reference(
    values: jax.Array,
    pre_values: jax.Array | None,
    rows: jax.Array,
    core_scores: jax.Array,
    x_p: jax.Array | None,
    *,
    pre_score_act: str = "identity",
    return_pre_scores: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The test oracle: one gather of every selected row and one einsum, differentiated by autodiff.

    Same contract as `value_bag`; keeps the whole [T, m, D_v] gather alive for its backward.
    """
    _check_inputs(values, pre_values, rows, core_scores, x_p, pre_score_act, 1)
    f32 = jnp.float32
    n_tokens, n_slots, n_cores = core_scores.shape
    if pre_values is None:
        pre_scores = jnp.ones((n_tokens, n_slots), f32)
    else:
        raw = jnp.einsum(
            "tmd,td->tm", _gather(pre_values, rows), x_p.astype(f32), precision=_PRECISION
        )
        pre_scores = _activation(pre_score_act)(raw)
    weights = pre_scores[..., None] * core_scores.astype(f32)
    gathered = _gather(values, rows).reshape(n_tokens, n_slots, n_cores, -1)
    out = jnp.einsum("tmc,tmcd->tcd", weights, gathered, precision=_PRECISION)
    out = out.reshape(n_tokens, values.shape[1]).astype(values.dtype)
    return (out, pre_scores) if return_pre_scores else out


# ---------------------------------------------------------------------------------------------------
# The custom VJP, shared by every implementation: the "xla" one below and the Pallas kernels.


@dataclasses.dataclass(frozen=True)
class ValueBagKernels:
    """The three passes of value_bag; `custom_value_bag` stitches them into one custom VJP.

    Every function takes keyword `options`: pre_score_act, token_chunk, table_reduction, interpret
    (use what you need, accept the rest). Shapes: T tokens, m slots, C cores, N table rows.

    forward(values, pre_values, rows, core_scores, x_p, **options)
        → out [T, D_v] values.dtype, raw [T, m] float32 (pre-scores before the activation; zeros
          without pre-values)
    backward_slots(values, pre_values, rows, core_scores, x_p, raw, d_out, d_pre_scores, **options)
        → d_scores [T, m, C] float32, d_raw [T, m] float32, d_x_p [T, D_p] float32
          (d_raw and d_x_p are None without pre-values; d_pre_scores [T, m] is the cotangent of p)
    backward_tables(order, sorted_rows, slot_weights, d_out, d_raw, x_p, *, n_rows, n_slots,
                    **options)
        → d_values [N, D_v] float32, d_pre_values [N, D_p] float32 (None without pre-values)
          order [T·m] int32: slot ids t·m + ℓ sorted by row (stable); sorted_rows [T·m] = the rows
          in that order; slot_weights [T·m, C] float32 = p_ℓ s^c_ℓ; d_raw [T·m] float32 or None.
          d_values[r]^c = Σ_{slots s with row r} slot_weights[s, c] · d_out[s // m]^c and
          d_pre_values[r] = Σ_{slots s with row r} d_raw[s] · x_p[s // m], each row's sum in
          `order` (deterministic).
    """

    forward: Callable[..., tuple[jax.Array, jax.Array]]
    backward_slots: Callable[..., tuple[jax.Array, jax.Array | None, jax.Array | None]]
    backward_tables: Callable[..., tuple[jax.Array, jax.Array | None]]


def custom_value_bag(
    kernels: ValueBagKernels, values, pre_values, rows, core_scores, x_p, **options
) -> tuple[jax.Array, jax.Array]:
    """value_bag's (out, p) through `kernels`, differentiable in every float input (one custom VJP).

    options: pre_score_act, token_chunk, table_reduction, interpret (static; passed to kernels).
    """
    return _value_bag(
        values, pre_values, rows, core_scores, x_p, kernels, tuple(sorted(options.items()))
    )


def _value_bag_xla(values, pre_values, rows, core_scores, x_p, **options):
    return custom_value_bag(XLA_KERNELS, values, pre_values, rows, core_scores, x_p, **options)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _value_bag(values, pre_values, rows, core_scores, x_p, kernels, options):
    out, raw = kernels.forward(values, pre_values, rows, core_scores, x_p, **dict(options))
    return out, _pre_scores(raw, pre_values, dict(options)["pre_score_act"])


def _value_bag_fwd(values, pre_values, rows, core_scores, x_p, kernels, options):
    out, raw = kernels.forward(values, pre_values, rows, core_scores, x_p, **dict(options))
    pre_scores = _pre_scores(raw, pre_values, dict(options)["pre_score_act"])
    # Residuals: the primal inputs (no copies) and the [T, m] raw pre-scores; no gathered rows.
    return (out, pre_scores), (values, pre_values, rows, core_scores, x_p, raw)


def _value_bag_bwd(kernels, options, residuals, cotangents):
    values, pre_values, rows, core_scores, x_p, raw = residuals
    d_out, d_pre_scores = map(jnp.asarray, cotangents)  # callers may pass numpy cotangents
    options = dict(options)
    n_tokens, n_slots, n_cores = core_scores.shape

    # Pass 1, over tokens: gradients of the scores, the pre-scores and x_p.
    d_scores, d_raw, d_x_p = kernels.backward_slots(
        values, pre_values, rows, core_scores, x_p, raw, d_out, d_pre_scores, **options
    )
    d_scores = d_scores.astype(core_scores.dtype)

    # Pass 2, over the slots in sorted row order: the table gradients.
    slot_weights = core_scores.astype(jnp.float32).reshape(-1, n_cores)
    slot_weights = slot_weights * _pre_scores(raw, pre_values, options["pre_score_act"]).reshape(
        -1, 1
    )
    # Ids outside [0, N) sort last as N, which every implementation's table pass drops.
    flat_rows = _past_table(rows.reshape(-1), values.shape[0])
    order = jnp.argsort(flat_rows, stable=True).astype(jnp.int32)
    d_values, d_pre_values = kernels.backward_tables(
        order,
        flat_rows[order],
        slot_weights,
        d_out,
        None if pre_values is None else d_raw.reshape(-1),
        x_p,
        n_rows=values.shape[0],
        n_slots=n_slots,
        **options,
    )
    d_values = d_values.astype(values.dtype)
    if pre_values is None:
        return d_values, None, None, d_scores, None
    return d_values, d_pre_values.astype(pre_values.dtype), None, d_scores, d_x_p.astype(x_p.dtype)


_value_bag.defvjp(_value_bag_fwd, _value_bag_bwd)


def _pre_scores(raw: jax.Array, pre_values, act_name: str) -> jax.Array:
    """p [T, m] float32 from the raw pre-scores: act(raw), or ones without pre-values."""
    if pre_values is None:
        return jnp.ones(raw.shape, jnp.float32)
    return _activation(act_name)(raw)


# ---------------------------------------------------------------------------------------------------
# The "xla" passes.


def _xla_forward(values, pre_values, rows, core_scores, x_p, *, pre_score_act, token_chunk, **_):
    out, raw, _ = _forward(values, pre_values, rows, core_scores, x_p, pre_score_act, token_chunk)
    return out, raw


def _xla_backward_slots(
    values,
    pre_values,
    rows,
    core_scores,
    x_p,
    raw,
    d_out,
    d_pre_scores,
    *,
    pre_score_act,
    token_chunk,
    **_,
):
    f32 = jnp.float32
    chunk = token_chunk
    n_tokens, n_slots, n_cores = core_scores.shape
    chunk_dim = values.shape[1] // n_cores
    act = _activation(pre_score_act)
    n_blocks = -(-n_tokens // chunk)

    def token_block(block):
        block_rows, scores, raw_b, d_out_b, d_pre_b, x_p_b = block
        gathered = _gather(values, block_rows).reshape(chunk, n_slots, n_cores, chunk_dim)
        # g[t, ℓ, c] = <V^c[row_ℓ], d_out^c[t]>
        g = jnp.einsum(
            "tmcd,tcd->tmc",
            gathered,
            d_out_b.astype(f32).reshape(chunk, n_cores, chunk_dim),
            precision=_PRECISION,
        )
        if pre_values is None:
            return g, None, None  # p = 1
        pre_scores, act_vjp = jax.vjp(act, raw_b)
        d_scores = pre_scores[..., None] * g
        d_pre = jnp.sum(scores.astype(f32) * g, axis=-1) + d_pre_b
        (d_raw,) = act_vjp(d_pre)
        d_x_p = jnp.einsum(
            "tm,tmd->td", d_raw, _gather(pre_values, block_rows), precision=_PRECISION
        )
        return d_scores, d_raw, d_x_p

    blocks = _to_blocks((rows, core_scores, raw, d_out, d_pre_scores, x_p), chunk, n_blocks)
    return _from_blocks(lax.map(token_block, blocks), n_tokens)


def _xla_backward_tables(
    order,
    sorted_rows,
    slot_weights,
    d_out,
    d_raw,
    x_p,
    *,
    n_rows,
    n_slots,
    token_chunk,
    table_reduction,
    **_,
):
    return _table_gradients(
        order,
        sorted_rows,
        slot_weights,
        d_out,
        d_raw,
        x_p,
        n_rows,
        n_slots,
        token_chunk * n_slots,
        table_reduction,
    )


XLA_KERNELS = ValueBagKernels(
    forward=_xla_forward, backward_slots=_xla_backward_slots, backward_tables=_xla_backward_tables
)


def _forward(values, pre_values, rows, core_scores, x_p, act_name, chunk):
    """Returns o [T, D_v] (values.dtype), raw pre-scores [T, m] and p [T, m] (float32)."""
    f32 = jnp.float32
    n_tokens, n_slots, n_cores = core_scores.shape
    chunk_dim = values.shape[1] // n_cores
    act = _activation(act_name)

    def token_block(block):
        block_rows, scores, x_p_b = block
        if pre_values is None:
            raw = jnp.zeros((chunk, n_slots), f32)
            pre_scores = jnp.ones((chunk, n_slots), f32)
        else:
            raw = jnp.einsum(
                "tmd,td->tm",
                _gather(pre_values, block_rows),
                x_p_b.astype(f32),
                precision=_PRECISION,
            )
            pre_scores = act(raw)
        weights = pre_scores[..., None] * scores.astype(f32)
        gathered = _gather(values, block_rows).reshape(chunk, n_slots, n_cores, chunk_dim)
        out = jnp.einsum("tmc,tmcd->tcd", weights, gathered, precision=_PRECISION)
        return out.reshape(chunk, values.shape[1]).astype(values.dtype), raw, pre_scores

    n_blocks = -(-n_tokens // chunk)
    blocks = _to_blocks((rows, core_scores, x_p), chunk, n_blocks)
    return _from_blocks(lax.map(token_block, blocks), n_tokens)


def _table_gradients(
    order, sorted_rows, slot_weights, d_out, d_raw, x_p, n_rows, n_slots, slot_chunk, reduction
):
    """d_values [N_rows, D_v] and d_pre_values [N_rows, D_p] (float32; d_pre_values None without).

    d_values[r]^c     = Σ_{(t, ℓ): rows[t, ℓ] = r} slot_weights[t·m + ℓ, c] · d_out[t]^c
    d_pre_values[r]   = Σ_{(t, ℓ): rows[t, ℓ] = r} d_raw[t·m + ℓ] · x_p[t]

    The T·m slots come sorted by row (`order`, stable, so ties keep token order); blocks of
    `slot_chunk` sorted slots add their contributions to the tables in that fixed order.
    """
    f32 = jnp.float32
    n_cores = slot_weights.shape[1]
    value_dim = d_out.shape[1]
    n_total = order.shape[0]
    n_blocks = -(-n_total // slot_chunk)
    pad = n_blocks * slot_chunk - n_total
    # Padding slots point past the table (their updates are dropped) and keep the order sorted.
    sorted_rows = jnp.concatenate([sorted_rows, jnp.full((pad,), n_rows, jnp.int32)])
    order = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)])
    valid = (jnp.arange(n_blocks * slot_chunk) < n_total).astype(f32)
    has_pre = d_raw is not None

    def slot_block(tables, block):
        block_order, block_rows, block_valid = block
        tokens = block_order // n_slots
        weights = slot_weights[block_order] * block_valid[:, None]  # [S, C]
        contribs = [
            (
                d_out[tokens].astype(f32).reshape(slot_chunk, n_cores, -1) * weights[..., None]
            ).reshape(slot_chunk, value_dim)
        ]
        if has_pre:
            contribs.append(x_p[tokens].astype(f32) * (d_raw[block_order] * block_valid)[:, None])
        return _accumulate(tables, block_rows, tuple(contribs), reduction), None

    tables = [jnp.zeros((n_rows, value_dim), f32)]
    if has_pre:
        tables.append(jnp.zeros((n_rows, x_p.shape[1]), f32))
    blocks = (
        order.reshape(n_blocks, slot_chunk),
        sorted_rows.reshape(n_blocks, slot_chunk),
        valid.reshape(n_blocks, slot_chunk),
    )
    tables, _ = lax.scan(slot_block, tuple(tables), blocks)
    return tables[0], (tables[1] if has_pre else None)


def _accumulate(tables, sorted_rows, contribs, reduction):
    """tables[i][sorted_rows[s]] += contribs[i][s] for every s, in a fixed order.

    sorted_rows: [S] ascending; rows ≥ the table length are dropped. contribs[i]: [S, D_i].
    "auto" picks per lowering platform (one traced program, the chosen branch lowered).
    """
    if reduction == "auto":
        return lax.platform_dependent(
            tables, sorted_rows, contribs, cpu=_sorted_scatter, default=_segmented_scan
        )
    if reduction in ("sorted_scatter", "atomic"):
        return _sorted_scatter(tables, sorted_rows, contribs)
    return _segmented_scan(tables, sorted_rows, contribs)


def _sorted_scatter(tables, sorted_rows, contribs):
    """A scatter-add in sorted order: sequential on CPU, hence deterministic there only."""
    return tuple(
        table.at[sorted_rows].add(contrib, indices_are_sorted=True, mode="drop")
        for table, contrib in zip(tables, contribs)
    )


def _segmented_scan(tables, sorted_rows, contribs):
    """Run sums by a segmented prefix sum, then one scatter of unique, sorted indices."""
    # Segmented inclusive prefix sum: a run of equal rows restarts the sum. The association tree of
    # `associative_scan` depends only on the length, so the result is bitwise reproducible.
    starts = jnp.concatenate([jnp.ones((1,), bool), sorted_rows[1:] != sorted_rows[:-1]])

    def combine(left, right):
        left_start, left_sums = left
        right_start, right_sums = right
        summed = tuple(
            jnp.where(right_start[..., None], b, a + b) for a, b in zip(left_sums, right_sums)
        )
        return left_start | right_start, summed

    _, run_sums = lax.associative_scan(combine, (starts, contribs))
    targets, end_slot = _run_targets(sorted_rows, tables[0].shape[0])
    return tuple(
        table.at[targets].add(
            jnp.take(run_sum, end_slot, axis=0),
            indices_are_sorted=True,
            unique_indices=True,
            mode="drop",
        )
        for table, run_sum in zip(tables, run_sums)
    )


def _run_targets(sorted_rows: jax.Array, n_rows: int) -> tuple[jax.Array, jax.Array]:
    """Where each run of equal rows writes its sum: targets [S] strictly ascending, end_slot [S].

    The last slot of each run holds the run's sum. Position p takes the p-th run (its row, from its
    end slot); positions past the last run take n_rows + p, past the table (dropped). Rows are
    distinct between runs and ascending, so the targets are unique and sorted by construction: the
    scatter needs no atomics and no two updates ever meet (its flags tell XLA so).
    """
    n_slots = sorted_rows.shape[0]
    ends = jnp.concatenate([sorted_rows[1:] != sorted_rows[:-1], jnp.ones((1,), bool)])
    runs_so_far = jnp.cumsum(ends.astype(jnp.int32))
    position = jnp.arange(n_slots, dtype=jnp.int32)
    end_slot = jnp.minimum(jnp.searchsorted(runs_so_far, position + 1, side="left"), n_slots - 1)
    targets = jnp.where(position < runs_so_far[-1], sorted_rows[end_slot], n_rows + position)
    return targets, end_slot


# ---------------------------------------------------------------------------------------------------
# Helpers.


def _check_row_ids(rows: jax.Array, n_rows: int) -> None:
    """checkify: the first row id outside [0, n_rows), with its token and slot."""
    bad = ((rows < 0) | (rows >= n_rows)).reshape(-1)
    first = jnp.argmax(bad)
    n_slots = rows.shape[1]
    checkify.check(
        ~jnp.any(bad),
        "value_bag: row id {row} at token {token}, slot {slot} is outside the table of "
        f"{n_rows} rows",
        row=rows.reshape(-1)[first],
        token=first // n_slots,
        slot=first % n_slots,
    )


def _past_table(rows: jax.Array, n_rows: int) -> jax.Array:
    """rows with every id outside [0, n_rows) (negative ones included) replaced by n_rows.

    jnp indexing follows NumPy and wraps negative ids (-3 would read and write row n_rows - 3), so
    bad ids are sent past the end of the table, where gathers fill NaN and scatters drop, the same
    as the Pallas kernels, which never dereference an id outside [0, n_rows).
    """
    return jnp.where((rows >= 0) & (rows < n_rows), rows, n_rows)


def _gather(table: jax.Array, rows: jax.Array) -> jax.Array:
    """table[rows] in float32. Rows outside [0, N) (negative too) read NaN, so an indexing bug
    cannot pass silently."""
    rows = _past_table(rows, table.shape[0])
    return jnp.take(table, rows, axis=0, mode="fill", fill_value=jnp.nan).astype(jnp.float32)


def _to_blocks(tree, chunk: int, n_blocks: int):
    """Pads axis 0 of every leaf to n_blocks·chunk (zeros; row 0 is a valid row) and splits it."""

    def split(x):
        pad = n_blocks * chunk - x.shape[0]
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(n_blocks, chunk, *x.shape[1:])

    return jax.tree.map(split, tree)


def _from_blocks(tree, n_tokens: int):
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[:n_tokens], tree)


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name == "identity":
        return lambda x: x
    return functools.partial(jax.nn.gelu, approximate=False)


def _check_inputs(values, pre_values, rows, core_scores, x_p, pre_score_act, token_chunk) -> None:
    if pre_score_act not in PRE_SCORE_ACTIVATIONS:
        raise ValueError(
            f"unknown pre_score_act {pre_score_act!r}; choose one of {', '.join(PRE_SCORE_ACTIVATIONS)}"
        )
    if values.ndim != 2:
        raise ValueError(f"values must be [N_rows, D_v]; got {values.shape}")
    if rows.ndim != 2 or not jnp.issubdtype(rows.dtype, jnp.integer):
        raise ValueError(f"rows must be an integer [T, m] array; got {rows.dtype} {rows.shape}")
    if values.shape[0] > jnp.iinfo(jnp.int32).max:
        raise ValueError(
            f"values has {values.shape[0]} rows; row ids are int32, so a table holds at most "
            f"{jnp.iinfo(jnp.int32).max} rows (split it into several tables)"
        )
    if core_scores.ndim != 3 or core_scores.shape[:2] != rows.shape:
        raise ValueError(
            f"core_scores must be [T, m, C] with [T, m] = {rows.shape}; got {core_scores.shape}"
        )
    n_cores = core_scores.shape[2]
    if values.shape[1] % n_cores != 0:
        raise ValueError(
            f"value_dim {values.shape[1]} is not divisible by the number of cores {n_cores}"
        )
    if (pre_values is None) != (x_p is None):
        raise ValueError("pre_values and x_p must be given together (or both be None)")
    if pre_values is not None:
        if pre_values.ndim != 2 or pre_values.shape[0] != values.shape[0]:
            raise ValueError(
                f"pre_values must be [N_rows={values.shape[0]}, D_p]; got {pre_values.shape}"
            )
        if x_p.shape != (rows.shape[0], pre_values.shape[1]):
            raise ValueError(
                f"x_p must be [T={rows.shape[0]}, D_p={pre_values.shape[1]}]; got {x_p.shape}"
            )
    if token_chunk < 1:
        raise ValueError(f"token_chunk must be positive; got {token_chunk}")


registry.declare_op("value_bag", _value_bag_xla)
