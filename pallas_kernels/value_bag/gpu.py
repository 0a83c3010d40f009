"""value_bag on GPU through Pallas Triton: forward, backward_slots and backward_tables kernels.

Registered as value_bag's "pallas" implementation on ("cuda", "rocm"); the custom VJP that stitches
the three passes together is `umv2_jax.ops.value_bag.custom_value_bag` (shared with the XLA path and
the TPU kernels). Shapes: T tokens, m slots, C cores, N table rows, D_v value dim (C | D_v, chunk
D_v / C per core), D_p pre-value dim, S = T·m slots.

    forward          grid over token blocks of BT tokens; a loop over the m slots gathers, per slot,
                     the BT pre-value rows (raw = <x_p, P[row]>, p = act(raw)) and the BT value rows
                     and accumulates o^c += p · s^c · V^c[row] in float32 registers. One pass over
                     the gathered rows: T·m·(D_v + D_p) table elements read, the floor.
    backward_slots   the same grid and loop: g^c = <V^c[row], d_o^c>, d_scores = p·g,
                     d_raw = act'(raw)·(Σ_c s^c g^c + d_p), d_x_p += d_raw · P[row].
    backward_tables  deterministic: a grid over blocks of BR table rows; row r's slots are the
                     contiguous run [start_r, start_r + count_r) of the sorted slots (counts by an
                     integer histogram, starts by a cumsum, both outside the kernel); a loop walks the
                     run in sorted order, so each row's sum has a fixed order, and each row of dV / dP
                     is written exactly once (rows nobody selected get zeros). No atomics.
                     table_reduction="atomic" instead runs a grid over blocks of sorted slots that
                     atomically adds each contribution into zeroed tables: faster with hot rows (no
                     serial walk of a long run) but the float sum order is not fixed, so it is
                     NOT deterministic run to run. Opt-in only.

Triton blocks need power-of-two shapes, so every feature dimension is cut into power-of-two pieces
(192 = 128 + 64, 768 = 512 + 256, 48 = 32 + 16): exact loads and stores, no masked columns and no
padding of the tables. Token and row blocks are padded (the outputs have ceil(T / BT)·BT rows and
are sliced outside). Rows are indexed as rows (Triton switches to 64-bit offsets for tables over
2³² bytes), never as flat int32 element offsets. A row id outside [0, N) is never dereferenced: it
reads as NaN (like the XLA path's `take(mode="fill", fill_value=nan)`), and the table gradient drops
it (like the XLA path's `mode="drop"`).

Block sizes and num_warps were chosen by reasoning (about 4096 float32 accumulators per program,
4 warps), not measured: no GPU was available when this was written. `token_chunk` (the XLA path's
memory bound) does not apply here: the kernels keep no gathered block beyond registers.

The exact erf is not lowered by Pallas Triton, so gelu uses the erfc Chebyshev fit of Numerical
Recipes (§6.2, fractional error < 1.2e-7 everywhere): within float32 rounding of the exact form.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from umv2_jax.ops import registry
from umv2_jax.ops.value_bag import ValueBagKernels, custom_value_bag

# Float32 accumulator elements per program (BT · max(D_v, D_p)); sets BT and BR. Not tuned.
_ACCUMULATOR_BUDGET = 4096
_MAX_BLOCK = 32
_NUM_WARPS = 4
# Sorted slots per program of the atomic table-gradient kernel.
_ATOMIC_SLOT_BLOCK = 16
# pallas_call(debug=...): prints each kernel's jaxpr and Triton module when lowered (tests read it).
DEBUG = False
TABLE_DTYPES = (jnp.float32, jnp.bfloat16)


# ---------------------------------------------------------------------------------------------------
# Static helpers.


def pieces(dim: int) -> tuple[tuple[int, int], ...]:
    """(start, size) power-of-two pieces covering [0, dim), largest first: 192 → (0,128),(128,64)."""
    out, start = [], 0
    for bit in reversed(range(dim.bit_length())):
        size = 1 << bit
        if dim & size:
            out.append((start, size))
            start += size
    return tuple(out)


def block_size(*dims: int, limit: int | None = None) -> int:
    """Power-of-two tokens (or rows) per program: about _ACCUMULATOR_BUDGET / max(dims), 1..32."""
    block = max(1, _ACCUMULATOR_BUDGET // max(1, *dims))
    block = min(1 << (block.bit_length() - 1), _MAX_BLOCK)
    if limit is not None:
        block = min(block, 1 << max(0, (limit - 1).bit_length()))
    return block


def _compiler_params():
    return plgpu.CompilerParams(num_warps=_NUM_WARPS, num_stages=1)


def _erf(x):
    """erf(x) from the Numerical Recipes erfc fit (fractional error < 1.2e-7), exp only."""
    z = jnp.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -1.26551223 + t * (
        1.00002368
        + t
        * (
            0.37409196
            + t
            * (
                0.09678418
                + t
                * (
                    -0.18628806
                    + t
                    * (
                        0.27886807
                        + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))
                    )
                )
            )
        )
    )
    erfc = t * jnp.exp(-z * z + poly)
    return jnp.where(x >= 0, 1.0 - erfc, erfc - 1.0)


_SQRT_HALF = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _act(raw, name):
    """p = act(raw): identity, or exact gelu x·Φ(x)."""
    if name == "identity":
        return raw
    return 0.5 * raw * (1.0 + _erf(raw * _SQRT_HALF))


def _act_grad(raw, name):
    """act'(raw): 1, or Φ(x) + x·φ(x) for gelu."""
    if name == "identity":
        return jnp.ones_like(raw)
    cdf = 0.5 * (1.0 + _erf(raw * _SQRT_HALF))
    return cdf + raw * _INV_SQRT_2PI * jnp.exp(-0.5 * raw * raw)


def _expand(per_core, start, size, chunk_dim):
    """[B, size] weights of columns [start, start+size) from per-core [B] vectors (list over c)."""
    first, last = start // chunk_dim, (start + size - 1) // chunk_dim
    if first == last:
        return per_core[first][:, None]
    core_of_col = (start + jnp.arange(size)) // chunk_dim
    out = jnp.zeros((per_core[0].shape[0], size), jnp.float32)
    for c in range(first, last + 1):
        out = jnp.where(core_of_col[None, :] == c, per_core[c][:, None], out)
    return out


def _per_core_sums(prod, start, size, chunk_dim, n_cores):
    """{c: Σ over columns of core c in [start, start+size) of prod[:, col]} for the cores it spans."""
    first, last = start // chunk_dim, (start + size - 1) // chunk_dim
    if first == last:
        return {first: jnp.sum(prod, axis=1)}
    core_of_col = (start + jnp.arange(size)) // chunk_dim
    return {
        c: jnp.sum(jnp.where(core_of_col[None, :] == c, prod, 0.0), axis=1)
        for c in range(first, last + 1)
    }


def _gather_rows(table_ref, rows, n_rows, start, size):
    """table[rows, start:start+size] in float32; rows outside [0, n_rows) read NaN, never memory."""
    ok = (rows >= 0) & (rows < n_rows)
    safe = jnp.where(ok, rows, 0)
    block = table_ref[safe, pl.ds(start, size)].astype(jnp.float32)
    return jnp.where(ok[:, None], block, jnp.nan)


def _token_ids(block, n_tokens):
    t = pl.program_id(0) * block + jnp.arange(block)
    return t, jnp.minimum(t, n_tokens - 1)


def _maybe_poison(out_shapes, poison):
    """NaN-filled buffers aliased to the outputs (tests: unwritten elements stay NaN)."""
    if not poison:
        return (), {}
    from pallas_kernels.testing import poison as poisoned

    buffers = tuple(poisoned(s.shape, s.dtype) for s in out_shapes)
    return buffers, buffers


def _call(kernel, out_shapes, inputs, n_programs, *, interpret, poison, name):
    buffers, _ = _maybe_poison(out_shapes, poison)
    n_in = len(inputs)
    aliases = {n_in + i: i for i in range(len(buffers))}

    def body(*refs):
        # Poison buffers are aliased to the outputs and never read: drop their refs.
        kernel(*refs[:n_in], *refs[n_in + len(buffers) :])

    return pl.pallas_call(
        body,
        grid=(n_programs,),
        out_shape=tuple(out_shapes),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=_compiler_params(),
        name=name,
        debug=DEBUG,
    )(*inputs, *buffers)


# ---------------------------------------------------------------------------------------------------
# Forward.


def forward(
    values, pre_values, rows, core_scores, x_p, *, pre_score_act, interpret=False, poison=False, **_
):
    """out [T, D_v] values.dtype, raw [T, m] float32 (zeros without pre-values).

    values [N, D_v], pre_values [N, D_p] or None, rows [T, m] int32, core_scores [T, m, C],
    x_p [T, D_p] or None. Plain JAX:

        raw = jnp.einsum("tmd,td->tm", pre_values[rows], x_p)          # float32
        w = act(raw)[..., None] * core_scores                           # [T, m, C]
        out = jnp.einsum("tmc,tmcd->tcd", w, values[rows].reshape(T, m, C, D_v // C))
    """
    n_tokens, n_slots, n_cores = core_scores.shape
    n_rows, value_dim = values.shape
    has_pre = pre_values is not None
    pre_dim = pre_values.shape[1] if has_pre else 1
    chunk_dim = value_dim // n_cores
    bt = block_size(value_dim, pre_dim, limit=n_tokens)
    n_blocks = pl.cdiv(n_tokens, bt)
    padded = n_blocks * bt

    def kernel(*refs):
        if has_pre:
            rows_ref, scores_ref, values_ref, x_p_ref, pre_ref, out_ref, raw_ref = refs
        else:
            rows_ref, scores_ref, values_ref, out_ref = refs
        t, t_safe = _token_ids(bt, n_tokens)
        if has_pre:
            x = [x_p_ref[t_safe, pl.ds(s, z)].astype(jnp.float32) for s, z in pieces(pre_dim)]

        def slot(ell, accs):
            row = rows_ref[t_safe, ell]
            if has_pre:
                raw = sum(
                    jnp.sum(_gather_rows(pre_ref, row, n_rows, s, z) * xi, axis=1)
                    for (s, z), xi in zip(pieces(pre_dim), x)
                )
                raw_ref[t, ell] = raw
                p = _act(raw, pre_score_act)
            w = []
            for c in range(n_cores):
                s_c = scores_ref[t_safe, ell, c].astype(jnp.float32)
                w.append(p * s_c if has_pre else s_c)
            return tuple(
                acc + _gather_rows(values_ref, row, n_rows, s, z) * _expand(w, s, z, chunk_dim)
                for acc, (s, z) in zip(accs, pieces(value_dim))
            )

        init = tuple(jnp.zeros((bt, z), jnp.float32) for _, z in pieces(value_dim))
        accs = jax.lax.fori_loop(0, n_slots, slot, init)
        for acc, (s, z) in zip(accs, pieces(value_dim)):
            out_ref[t, pl.ds(s, z)] = acc.astype(out_ref.dtype)

    out_shapes = [jax.ShapeDtypeStruct((padded, value_dim), values.dtype)]
    inputs = [rows, core_scores, values]
    if has_pre:
        out_shapes.append(jax.ShapeDtypeStruct((padded, n_slots), jnp.float32))
        inputs += [x_p, pre_values]
    results = _call(
        kernel,
        out_shapes,
        inputs,
        n_blocks,
        interpret=interpret,
        poison=poison,
        name="value_bag_forward",
    )
    out = results[0][:n_tokens]
    raw = results[1][:n_tokens] if has_pre else jnp.zeros((n_tokens, n_slots), jnp.float32)
    return out, raw


# ---------------------------------------------------------------------------------------------------
# Backward, pass 1: per token.


def backward_slots(
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
    interpret=False,
    poison=False,
    **_,
):
    """d_scores [T, m, C], d_raw [T, m], d_x_p [T, D_p] (float32; the last two None without pre).

    Plain JAX (g[t, ℓ, c] = <V^c[rows[t, ℓ]], d_out^c[t]>, p = act(raw)):

        g = jnp.einsum("tmcd,tcd->tmc", values[rows].reshape(T, m, C, -1), d_out.reshape(T, C, -1))
        d_scores = p[..., None] * g
        d_raw = act'(raw) * (jnp.sum(core_scores * g, -1) + d_pre_scores)
        d_x_p = jnp.einsum("tm,tmd->td", d_raw, pre_values[rows])
    """
    n_tokens, n_slots, n_cores = core_scores.shape
    n_rows, value_dim = values.shape
    has_pre = pre_values is not None
    pre_dim = pre_values.shape[1] if has_pre else 1
    chunk_dim = value_dim // n_cores
    bt = block_size(value_dim, pre_dim, limit=n_tokens)
    n_blocks = pl.cdiv(n_tokens, bt)
    padded = n_blocks * bt

    def kernel(*refs):
        if has_pre:
            (rows_ref, scores_ref, values_ref, d_out_ref, raw_ref, d_pre_ref, pre_ref,
             d_scores_ref, d_raw_ref, d_x_p_ref) = refs  # fmt: skip
        else:
            rows_ref, scores_ref, values_ref, d_out_ref, d_scores_ref = refs
        t, t_safe = _token_ids(bt, n_tokens)
        d_o = [d_out_ref[t_safe, pl.ds(s, z)].astype(jnp.float32) for s, z in pieces(value_dim)]

        def slot(ell, accs):
            row = rows_ref[t_safe, ell]
            g = [jnp.zeros((bt,), jnp.float32) for _ in range(n_cores)]
            for (s, z), d_oi in zip(pieces(value_dim), d_o):
                prod = _gather_rows(values_ref, row, n_rows, s, z) * d_oi
                for c, part in _per_core_sums(prod, s, z, chunk_dim, n_cores).items():
                    g[c] = g[c] + part
            if not has_pre:
                for c in range(n_cores):
                    d_scores_ref[t, ell, c] = g[c]
                return accs
            raw_t = raw_ref[t_safe, ell]
            p = _act(raw_t, pre_score_act)
            d_p = d_pre_ref[t_safe, ell]
            for c in range(n_cores):
                d_scores_ref[t, ell, c] = p * g[c]
                d_p = d_p + scores_ref[t_safe, ell, c].astype(jnp.float32) * g[c]
            d_raw = _act_grad(raw_t, pre_score_act) * d_p
            d_raw_ref[t, ell] = d_raw
            return tuple(
                acc + d_raw[:, None] * _gather_rows(pre_ref, row, n_rows, s, z)
                for acc, (s, z) in zip(accs, pieces(pre_dim))
            )

        init = tuple(jnp.zeros((bt, z), jnp.float32) for _, z in pieces(pre_dim)) if has_pre else ()
        accs = jax.lax.fori_loop(0, n_slots, slot, init)
        for acc, (s, z) in zip(accs, pieces(pre_dim) if has_pre else ()):
            d_x_p_ref[t, pl.ds(s, z)] = acc

    f32 = jnp.float32
    out_shapes = [jax.ShapeDtypeStruct((padded, n_slots, n_cores), f32)]
    inputs = [rows, core_scores, values, d_out]
    if has_pre:
        out_shapes += [
            jax.ShapeDtypeStruct((padded, n_slots), f32),
            jax.ShapeDtypeStruct((padded, pre_dim), f32),
        ]
        inputs += [raw, d_pre_scores.astype(f32), pre_values]
    results = _call(
        kernel,
        out_shapes,
        inputs,
        n_blocks,
        interpret=interpret,
        poison=poison,
        name="value_bag_backward_slots",
    )
    d_scores = results[0][:n_tokens]
    if not has_pre:
        return d_scores, None, None
    return d_scores, results[1][:n_tokens], results[2][:n_tokens]


# ---------------------------------------------------------------------------------------------------
# Backward, pass 2: per table row.


def run_starts(sorted_rows, n_rows):
    """start [N], count [N] int32: row r's slots are sorted positions [start_r, start_r + count_r).

    An integer histogram (exact, so deterministic whatever the scatter order) and an exclusive
    cumsum; slots with rows outside [0, N) are dropped. Plain JAX: count = bincount(sorted_rows, N).
    """
    # Negative ids would wrap (jnp indexing): send them past the table, where "drop" drops them.
    in_table = jnp.where(sorted_rows >= 0, sorted_rows, n_rows)
    count = jnp.zeros((n_rows,), jnp.int32).at[in_table].add(1, mode="drop")
    start = jnp.cumsum(count) - count
    # Slots with negative rows sort first: every run starts after them.
    start = start + jnp.sum(sorted_rows < 0).astype(jnp.int32)
    return start.astype(jnp.int32), count


def backward_tables(
    order,
    sorted_rows,
    slot_weights,
    d_out,
    d_raw,
    x_p,
    *,
    n_rows,
    n_slots,
    table_reduction="auto",
    interpret=False,
    poison=False,
    **_,
):
    """d_values [N, D_v], d_pre_values [N, D_p] float32 (None without pre-values).

    order [S] int32 (slots t·m + ℓ sorted by row, stable), sorted_rows [S], slot_weights [S, C]
    (p·s), d_out [T, D_v], d_raw [S] or None, x_p [T, D_p] or None. Plain JAX:

        tokens = order // n_slots
        d_values = zeros([N, D_v]).at[sorted_rows].add(
            (slot_weights[order][:, :, None] * d_out[tokens].reshape(S, C, -1)).reshape(S, -1))
        d_pre_values = zeros([N, D_p]).at[sorted_rows].add(d_raw[order][:, None] * x_p[tokens])

    with each row's additions in sorted order (deterministic); "atomic": any order.
    """
    if table_reduction == "atomic":
        return _backward_tables_atomic(
            order, sorted_rows, slot_weights, d_out, d_raw, x_p, n_rows=n_rows,
            n_slots=n_slots, interpret=interpret,
        )  # fmt: skip
    n_total, n_cores = slot_weights.shape
    value_dim = d_out.shape[1]
    chunk_dim = value_dim // n_cores
    has_pre = d_raw is not None
    pre_dim = x_p.shape[1] if has_pre else 1
    br = block_size(value_dim, pre_dim, limit=n_rows)
    n_blocks = pl.cdiv(n_rows, br)
    padded = n_blocks * br
    start, count = run_starts(sorted_rows, n_rows)

    def kernel(*refs):
        if has_pre:
            (start_ref, count_ref, order_ref, weights_ref, d_out_ref, d_raw_ref, x_p_ref,
             d_values_ref, d_pre_ref) = refs  # fmt: skip
        else:
            start_ref, count_ref, order_ref, weights_ref, d_out_ref, d_values_ref = refs
        r, r_safe = _token_ids(br, n_rows)
        first = start_ref[r_safe]
        count = jnp.where(r < n_rows, count_ref[r_safe], 0)
        longest = jnp.max(count)

        def step(k, accs):
            ok = k < count
            slot = jnp.where(ok, first + k, 0)
            sorted_slot = order_ref[slot]
            token = sorted_slot // n_slots
            w = [jnp.where(ok, weights_ref[sorted_slot, c], 0.0) for c in range(n_cores)]
            out = [
                acc + jnp.where(ok[:, None], d_out_ref[token, pl.ds(s, z)].astype(jnp.float32)
                                * _expand(w, s, z, chunk_dim), 0.0)
                for acc, (s, z) in zip(accs[0], pieces(value_dim))
            ]  # fmt: skip
            if not has_pre:
                return (tuple(out), ())
            d_r = jnp.where(ok, d_raw_ref[sorted_slot], 0.0)
            pre = [
                acc + jnp.where(ok[:, None], d_r[:, None]
                                * x_p_ref[token, pl.ds(s, z)].astype(jnp.float32), 0.0)
                for acc, (s, z) in zip(accs[1], pieces(pre_dim))
            ]  # fmt: skip
            return (tuple(out), tuple(pre))

        init = (
            tuple(jnp.zeros((br, z), jnp.float32) for _, z in pieces(value_dim)),
            tuple(jnp.zeros((br, z), jnp.float32) for _, z in pieces(pre_dim)) if has_pre else (),
        )
        accs = jax.lax.fori_loop(0, longest, step, init)
        for acc, (s, z) in zip(accs[0], pieces(value_dim)):
            d_values_ref[r, pl.ds(s, z)] = acc
        for acc, (s, z) in zip(accs[1], pieces(pre_dim) if has_pre else ()):
            d_pre_ref[r, pl.ds(s, z)] = acc

    f32 = jnp.float32
    out_shapes = [jax.ShapeDtypeStruct((padded, value_dim), f32)]
    inputs = [start, count, order, slot_weights, d_out]
    if has_pre:
        out_shapes.append(jax.ShapeDtypeStruct((padded, pre_dim), f32))
        inputs += [d_raw, x_p]
    del n_total
    results = _call(
        kernel,
        out_shapes,
        inputs,
        n_blocks,
        interpret=interpret,
        poison=poison,
        name="value_bag_backward_tables",
    )
    d_values = results[0][:n_rows]
    return d_values, (results[1][:n_rows] if has_pre else None)


def _backward_tables_atomic(
    order, sorted_rows, slot_weights, d_out, d_raw, x_p, *, n_rows, n_slots, interpret
):
    """backward_tables by atomic adds into zeroed tables: NOT deterministic (float add order).

    A grid over blocks of sorted slots; each program walks its slots and atomically adds each
    slot's [D_v] (and [D_p]) contribution into its row. Rows outside [0, N) are skipped.
    """
    n_total, n_cores = slot_weights.shape
    value_dim = d_out.shape[1]
    chunk_dim = value_dim // n_cores
    has_pre = d_raw is not None
    pre_dim = x_p.shape[1] if has_pre else 1
    bs = _ATOMIC_SLOT_BLOCK
    n_blocks = pl.cdiv(n_total, bs)

    def kernel(*refs):
        if has_pre:
            (rows_ref, order_ref, weights_ref, d_out_ref, d_raw_ref, x_p_ref, _, _,
             d_values_ref, d_pre_ref) = refs  # fmt: skip
        else:
            rows_ref, order_ref, weights_ref, d_out_ref, _, d_values_ref = refs

        first = pl.program_id(0) * bs

        def slot(j, carry):
            i = jnp.minimum(first + j, n_total - 1)
            row = rows_ref[i]
            # The clamped tail repeats slot n_total - 1: only the program owning it adds it.
            owner = first + j < n_total

            @pl.when(owner & (row >= 0) & (row < n_rows))
            def _():
                sorted_slot = order_ref[i]
                token = sorted_slot // n_slots
                w = [weights_ref[sorted_slot, c] for c in range(n_cores)]
                for s, z in pieces(value_dim):
                    core_of_col = (s + jnp.arange(z)) // chunk_dim
                    weight = jnp.zeros((z,), jnp.float32)
                    for c in range(s // chunk_dim, (s + z - 1) // chunk_dim + 1):
                        weight = jnp.where(core_of_col == c, w[c], weight)
                    contrib = d_out_ref[token, pl.ds(s, z)].astype(jnp.float32) * weight
                    plgpu.atomic_add(d_values_ref, (row, pl.ds(s, z)), contrib)
                if has_pre:
                    d_r = d_raw_ref[sorted_slot]
                    for s, z in pieces(pre_dim):
                        contrib = d_r * x_p_ref[token, pl.ds(s, z)].astype(jnp.float32)
                        plgpu.atomic_add(d_pre_ref, (row, pl.ds(s, z)), contrib)

            return carry

        jax.lax.fori_loop(0, bs, slot, 0)

    f32 = jnp.float32
    out_shapes = [jax.ShapeDtypeStruct((n_rows, value_dim), f32)]
    inputs = [sorted_rows, order, slot_weights, d_out]
    zeros = [jnp.zeros((n_rows, value_dim), f32)]
    if has_pre:
        out_shapes.append(jax.ShapeDtypeStruct((n_rows, pre_dim), f32))
        inputs += [d_raw, x_p]
        zeros.append(jnp.zeros((n_rows, pre_dim), f32))
    n_in = len(inputs)
    results = pl.pallas_call(
        kernel,
        grid=(n_blocks,),
        out_shape=tuple(out_shapes),
        input_output_aliases={n_in + k: k for k in range(len(zeros))},
        interpret=interpret,
        compiler_params=_compiler_params(),
        name="value_bag_backward_tables_atomic",
        debug=DEBUG,
    )(*inputs, *zeros)
    return results[0], (results[1] if has_pre else None)


# ---------------------------------------------------------------------------------------------------
# Registration.

GPU_KERNELS = ValueBagKernels(
    forward=forward, backward_slots=backward_slots, backward_tables=backward_tables
)


def value_bag_gpu(values, pre_values, rows, core_scores, x_p, *, interpret=False, **options):
    """value_bag's (out [T, D_v], p [T, m]) through the Triton kernels (see `value_bag`).

    Declines (NotImplementedError, the registry falls through to XLA) tables that are not float32
    or bfloat16. Shapes were checked by `value_bag` already.
    """
    for name, table in (("values", values), ("pre_values", pre_values)):
        if table is not None and table.dtype not in TABLE_DTYPES:
            raise NotImplementedError(f"value_bag gpu kernel: {name} dtype {table.dtype}")
    return custom_value_bag(
        GPU_KERNELS, values, pre_values, rows, core_scores, x_p, interpret=interpret, **options
    )


registry.register_implementation("value_bag", "pallas", value_bag_gpu, platforms=("cuda", "rocm"))
