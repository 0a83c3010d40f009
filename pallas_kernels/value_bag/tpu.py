"""value_bag on TPU (Pallas Mosaic): gather kernels driven by row ids held in SMEM.

Registered as `registry.register_implementation("value_bag", "pallas", ..., platforms=("tpu",))`;
the op's custom VJP (`umv2_jax.ops.value_bag.custom_value_bag`) runs three passes:

    forward          (kernel)  out [T, D_v] values.dtype, raw [T, m] f32
    backward_slots   (kernel)  d_scores [T, m, C] f32, d_raw [T, m] f32, d_x_p [T, D_p] f32
    backward_tables  (kernel)  d_values [N, D_v] f32, d_pre_values [N, D_p] f32: each row's
                               contributions summed in the sorted `order`, each row written once
                               (see `_backward_tables`)

Plain-JAX equivalent of the forward (per token t; `^c` is the c-th of C chunks of D_v):

    raw[t, ℓ] = <x_p[t], pre_values[rows[t, ℓ]]>            (f32 accumulation; 0 without pre-values)
    p[t, ℓ]   = act(raw[t, ℓ])                               (1 without pre-values)
    out[t]^c  = Σ_ℓ p[t, ℓ] · core_scores[t, ℓ, c] · values[rows[t, ℓ]]^c

and of backward_slots, with g[t, ℓ, c] = <values[rows[t, ℓ]]^c, d_out[t]^c>:

    d_scores[t, ℓ, c] = p[t, ℓ] · g[t, ℓ, c]
    d_raw[t, ℓ]       = act'(raw[t, ℓ]) · (Σ_c core_scores[t, ℓ, c] · g[t, ℓ, c] + d_p[t, ℓ])
    d_x_p[t]          = Σ_ℓ d_raw[t, ℓ] · pre_values[rows[t, ℓ]]

Layout. Tokens are processed in blocks of `tb` (a multiple of 16, sized so the gathered rows of
one block, m·tb·(D_v + D_p) table elements, fit an 8 MiB VMEM budget); T is padded to a multiple
of tb with row 0 and zero scores, and cropped after. Per block the kernel gets its m·tb row ids in
SMEM (a blocked SMEM input, slot-major: id of (ℓ, t) at ℓ·tb + t), starts one row DMA per slot from
the tables, which stay in HBM (`memory_space=pl.ANY`, any size: DMAs address rows, never flat
int32 element offsets), into a [m, tb, D] VMEM scratch, waits for all of them, and then loops over
the m slots doing [tb, D] vector work with f32 accumulation. Every other block operand is laid out
slot-major ([blocks, m, tb, ...]) so each slot's data is one aligned [tb, ...] tile; D_v, D_p and
C are full-dim blocks, so 48, 192, 384 and 768 need no padding by the caller (Mosaic pads tiles).

Bad row ids: the DMA address is clamped to [0, N), so no id reads outside the tables; the slots of
out-of-range ids contribute NaN (as the XLA path's fill gather does) so the bug shows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from umv2_jax.ops import registry
from umv2_jax.ops import value_bag as value_bag_op

_GATHER_VMEM_BUDGET = 8 * 2**20  # bytes of gathered table rows per token block
_VMEM_LIMIT = 48 * 2**20  # scoped VMEM asked of Mosaic (the budget, its pipelined operands, temps)
_TOKEN_ALIGN = 16  # second-minor block dims: a bf16 tile holds 16 rows
_MAX_BLOCK = 256


def block_tokens(n_tokens: int, n_slots: int, row_bytes: int, token_chunk: int) -> int:
    """Tokens per block: a multiple of 16, at most token_chunk (rounded up), 256 and the budget."""
    by_budget = _GATHER_VMEM_BUDGET // max(1, n_slots * row_bytes)
    tb = min(_MAX_BLOCK, by_budget, max(token_chunk, _TOKEN_ALIGN), _round_up(n_tokens, 16))
    return max(_TOKEN_ALIGN, tb // _TOKEN_ALIGN * _TOKEN_ALIGN)


def _round_up(x: int, k: int) -> int:
    return -(-x // k) * k


def _interpret_arg(interpret):
    """pallas_call's interpret=: InterpretParams as given, a default one for True, else False."""
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret or False


def _act(name):
    if name == "identity":
        return lambda x: x, lambda x: jnp.ones_like(x)

    def gelu(x):
        return 0.5 * x * (1.0 + lax.erf(x * 0.7071067811865476))

    def gelu_grad(x):
        cdf = 0.5 * (1.0 + lax.erf(x * 0.7071067811865476))
        return cdf + x * 0.3989422804014327 * jnp.exp(-0.5 * x * x)

    return gelu, gelu_grad


class _Plan:
    """Static block layout of one call: T, m, C, tb, number of blocks, padded T."""

    def __init__(self, values, pre_values, rows, core_scores, token_chunk):
        self.n_tokens, self.n_slots, self.n_cores = core_scores.shape
        self.n_rows, self.value_dim = values.shape
        self.pre_dim = 0 if pre_values is None else pre_values.shape[1]
        # VMEM holds every gathered row as 32-bit words (f32, or uint32 pairs of bf16 rows).
        row_bytes = 4 * (self.value_dim + self.pre_dim)
        self.tb = block_tokens(self.n_tokens, self.n_slots, row_bytes, token_chunk)
        self.n_blocks = -(-self.n_tokens // self.tb)
        self.padded = self.n_blocks * self.tb

    def tokens(self, x):
        """[T, ...] → [T_pad, ...] (zeros)."""
        return jnp.pad(x, [(0, self.padded - self.n_tokens)] + [(0, 0)] * (x.ndim - 1))

    def slot_major(self, x):
        """[T, m, ...] → [blocks, m, tb, ...] (zero padded)."""
        x = self.tokens(x).reshape(self.n_blocks, self.tb, *x.shape[1:])
        return jnp.swapaxes(x, 1, 2)

    def token_major(self, x):
        """[blocks, m, tb, ...] → [T, m, ...]."""
        x = jnp.swapaxes(x, 1, 2).reshape(self.padded, *x.shape[1:2], *x.shape[3:])
        return x[: self.n_tokens]

    def slot_spec(self, *trailing):
        return pl.BlockSpec(
            (1, self.n_slots, self.tb, *trailing), lambda i, *_: (i, 0, 0) + (0,) * len(trailing)
        )

    def token_spec(self, dim):
        return pl.BlockSpec((self.tb, dim), lambda i, *_: (i, 0))

    def rows_smem(self, rows_blocks):
        """[blocks, m, tb] → [blocks, 1, m·tb]: 3-D so the SMEM block's last two dims are full."""
        return rows_blocks.reshape(self.n_blocks, 1, self.n_slots * self.tb)

    def rows_smem_spec(self):
        return pl.BlockSpec(
            (None, None, self.n_slots * self.tb), lambda i, *_: (i, 0, 0), memory_space=pltpu.SMEM
        )


def _check(values, pre_values, rows, core_scores, x_p, interpret=False):
    """Declines (NotImplementedError → the registry falls through to XLA) what this kernel lacks.

    Tables: float32, or bfloat16 with an even number of rows (read as uint32 row pairs, see
    `pack_pairs`); ≥ 2^31 rows exceed int32 row ids.
    """
    for name, table in (("values", values), ("pre_values", pre_values)):
        if table is None:
            continue
        if table.dtype not in (jnp.float32, jnp.bfloat16):
            raise NotImplementedError(
                f"TPU value_bag: {name} dtype {table.dtype} (float32 or bfloat16 only)"
            )
        if table.dtype == jnp.bfloat16 and table.shape[0] % 2:
            raise NotImplementedError(
                f"TPU value_bag: bfloat16 {name} has an odd number of rows ({table.shape[0]}); "
                "the kernel reads row pairs"
            )
    if values.shape[0] >= 2**31:
        raise NotImplementedError(f"TPU value_bag: {values.shape[0]} rows exceed int32 row ids")


def pack_pairs(table):
    """bfloat16 [N, D] → uint32 [N/2, D]: word (k, d) holds row 2k in its low and row 2k+1 in its
    high 16 bits, the bytes of XLA:TPU's packed bf16 tiling (T(16,128)(2,1): two consecutive rows
    per 32-bit word), i.e. what the compiled kernel's `ref.bitcast(jnp.uint32)` sees. Used only
    when interpreted: as an XLA op it is NOT free on TPU (a table-sized convert/shift/or, 3.2 GB of
    temps at the 227M pool, measured), so compiled the kernel bitcasts the ref instead.

        lax.bitcast_convert_type(table.reshape(N // 2, 2, D).swapaxes(1, 2), jnp.uint32)
    """
    if table.dtype != jnp.bfloat16:
        return table
    n_rows, dim = table.shape
    return lax.bitcast_convert_type(table.reshape(n_rows // 2, 2, dim).swapaxes(1, 2), jnp.uint32)


def _table_input(table, interpret):
    """What the kernel gets for a table: bf16 tables as uint32 pairs when interpreted.

    Compiled, the kernel bitcasts the bf16 HBM ref itself (`ref.bitcast(jnp.uint32)`, free: the
    same bytes); outside the kernel the same view costs XLA a table-sized convert (measured), and
    the TPU interpreter cannot DMA through a bitcast ref, so there `pack_pairs` builds it.
    """
    if interpret and table.dtype == jnp.bfloat16:
        return pack_pairs(table)
    return table


def _unpack_rows(buf_slot, rows_slot):
    """f32 [tb, D] rows from a gathered slot: f32 as is; uint32 pairs: the half row id % 2 picks.

    rows_slot: [tb, 1] int32 row ids (bf16 rounds to f32 exactly by appending 16 zero bits).
    """
    if buf_slot.dtype != jnp.uint32:
        return buf_slot.astype(jnp.float32)
    bits = jnp.where(rows_slot % 2 == 1, buf_slot & jnp.uint32(0xFFFF0000), buf_slot << 16)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _gather(rows_smem, table_hbm, buf, sem, n_rows, n_slots, tb, packed):
    """buf[ℓ, t] = table[clip(rows[ℓ·tb + t])] for the block: every row DMA in flight, then waited.

    packed (uint32 row pairs of a bf16 table): buf[ℓ, t] = table[clip(rows[ℓ·tb + t]) // 2].
    """

    if table_hbm.dtype == jnp.bfloat16:  # compiled: view the bf16 table as uint32 row pairs
        table_hbm = table_hbm.bitcast(jnp.uint32)

    def copy(j, row):
        return pltpu.make_async_copy(
            table_hbm.at[pl.ds(row, 1)], buf.at[_div(j, tb), pl.ds(j % tb, 1)], sem
        )

    def start(j, carry):
        row = jnp.clip(rows_smem[j], 0, n_rows - 1)
        copy(j, _div(row, 2) if packed else row).start()
        return carry

    def wait(j, carry):
        copy(j, 0).wait()
        return carry

    lax.fori_loop(0, n_slots * tb, start, 0)
    lax.fori_loop(0, n_slots * tb, wait, 0)


def _div(x, k: int):
    """x // k for traced int32 x ≥ 0 inside a kernel, as a truncating division.

    `//` on signed integers is a floor division, which JAX builds with `sign`; Mosaic lowers `sign`
    by asking the chip generation of the *default device*, so a kernel using it fails to
    cross-compile from a CPU host for a TPU target ("Unsupported TPU device kind: cpu") unless the
    caller sets `jax.default_device(tpu_device)`. Truncation equals floor for x ≥ 0.
    """
    return lax.div(x, jnp.asarray(k, x.dtype))


def _word(table):
    """The VMEM dtype of gathered rows: float32, or uint32 (a pair of bf16 rows)."""
    return jnp.uint32 if table.dtype == jnp.bfloat16 else table.dtype


def _slot_nan(rows_vmem, slot, n_rows):
    """[tb, 1] f32: 0 where the slot's row id is in range, NaN where not."""
    r = rows_vmem[0, slot][:, None]
    return jnp.where((r >= 0) & (r < n_rows), 0.0, jnp.nan).astype(jnp.float32)


def _core_of_lane(tb, value_dim, n_cores):
    return _div(lax.broadcasted_iota(jnp.int32, (tb, value_dim), 1), value_dim // n_cores)


# ---------------------------------------------------------------------------------------------------
# Forward.


def _forward_kernel(*refs, plan, has_pre, act_name):
    if has_pre:
        (rows_smem, rows_vmem, scores, x_p, values, pre_values, out, raw_out) = refs[:8]
        v_buf, p_buf, sem = refs[8:]
    else:
        (rows_smem, rows_vmem, scores, values, out, raw_out) = refs[:6]
        v_buf, sem = refs[6:]
    m, tb, n_cores, n_rows = plan.n_slots, plan.tb, plan.n_cores, plan.n_rows
    _gather(rows_smem, values, v_buf, sem.at[0], n_rows, m, tb, values.dtype != jnp.float32)
    if has_pre:
        packed = pre_values.dtype != jnp.float32
        _gather(rows_smem, pre_values, p_buf, sem.at[1], n_rows, m, tb, packed)
        x = x_p[...].astype(jnp.float32)
    act, _ = _act(act_name)
    lane_core = _core_of_lane(tb, plan.value_dim, n_cores)

    def slot(ell, acc):
        nan = _slot_nan(rows_vmem, ell, n_rows)
        row_ids = rows_vmem[0, ell][:, None]
        if has_pre:
            pre_rows = _unpack_rows(p_buf[ell], row_ids)
            raw = jnp.sum(pre_rows * x, axis=-1, keepdims=True) + nan
            raw_out[0, ell] = raw[:, 0]
            p = act(raw)
        else:
            raw_out[0, ell] = jnp.zeros((tb,), jnp.float32)
            p = 1.0 + nan
        weights = scores[0, ell].astype(jnp.float32) * p  # [tb, C]
        w_full = jnp.zeros((tb, plan.value_dim), jnp.float32)
        for c in range(n_cores):
            w_full = jnp.where(lane_core == c, weights[:, c : c + 1], w_full)
        return acc + w_full * _unpack_rows(v_buf[ell], row_ids)

    acc = lax.fori_loop(0, m, slot, jnp.zeros((tb, plan.value_dim), jnp.float32))
    out[...] = acc.astype(out.dtype)


def _forward(
    values, pre_values, rows, core_scores, x_p, *, pre_score_act, token_chunk, interpret, **_
):
    _check(values, pre_values, rows, core_scores, x_p, interpret)
    plan = _Plan(values, pre_values, rows, core_scores, token_chunk)
    has_pre = pre_values is not None
    rows_blocks = plan.slot_major(rows)  # [blocks, m, tb]
    inputs = [plan.rows_smem(rows_blocks), rows_blocks, plan.slot_major(core_scores)]
    in_specs = [plan.rows_smem_spec(), plan.slot_spec(), plan.slot_spec(plan.n_cores)]
    scratch = [pltpu.VMEM((plan.n_slots, plan.tb, plan.value_dim), _word(values))]
    if has_pre:
        inputs.append(plan.tokens(x_p))
        in_specs.append(plan.token_spec(plan.pre_dim))
    inputs.append(_table_input(values, interpret))
    in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
    if has_pre:
        inputs.append(_table_input(pre_values, interpret))
        in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
        scratch.append(pltpu.VMEM((plan.n_slots, plan.tb, plan.pre_dim), _word(pre_values)))
    scratch.append(pltpu.SemaphoreType.DMA((2,)))
    table_elems = plan.value_dim + plan.pre_dim
    out, raw = pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan, has_pre=has_pre, act_name=pre_score_act),
        grid=(plan.n_blocks,),
        in_specs=in_specs,
        out_specs=[plan.token_spec(plan.value_dim), plan.slot_spec()],
        out_shape=[
            jax.ShapeDtypeStruct((plan.padded, plan.value_dim), values.dtype),
            jax.ShapeDtypeStruct((plan.n_blocks, plan.n_slots, plan.tb), jnp.float32),
        ],
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",), vmem_limit_bytes=_VMEM_LIMIT
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * plan.padded * plan.n_slots * table_elems,
            transcendentals=plan.padded * plan.n_slots if pre_score_act == "gelu" else 0,
            bytes_accessed=plan.padded * plan.n_slots * table_elems * values.dtype.itemsize,
        ),
        interpret=_interpret_arg(interpret),
        name="value_bag_forward_tpu",
    )(*inputs)
    return out[: plan.n_tokens], plan.token_major(raw)


# ---------------------------------------------------------------------------------------------------
# Backward over the slots: d core_scores, d raw pre-scores, d x_p.


def _slots_kernel(*refs, plan, has_pre, act_name):
    if has_pre:
        (rows_smem, rows_vmem, scores, raw_in, d_pre_in, d_out, x_p, values, pre_values) = refs[:9]
        d_scores, d_raw, d_x_p, v_buf, p_buf, sem = refs[9:]
    else:
        (rows_smem, rows_vmem, d_out, values) = refs[:4]
        d_scores, v_buf, sem = refs[4:]
    m, tb, n_cores, n_rows = plan.n_slots, plan.tb, plan.n_cores, plan.n_rows
    _gather(rows_smem, values, v_buf, sem.at[0], n_rows, m, tb, values.dtype != jnp.float32)
    if has_pre:
        packed = pre_values.dtype != jnp.float32
        _gather(rows_smem, pre_values, p_buf, sem.at[1], n_rows, m, tb, packed)
    act, act_grad = _act(act_name)
    lane_core = _core_of_lane(tb, plan.value_dim, n_cores)
    core_col = lax.broadcasted_iota(jnp.int32, (tb, n_cores), 1)
    dout = d_out[...].astype(jnp.float32)

    def slot(ell, acc):
        nan = _slot_nan(rows_vmem, ell, n_rows)
        row_ids = rows_vmem[0, ell][:, None]
        prod = _unpack_rows(v_buf[ell], row_ids) * dout  # [tb, D_v]
        g = jnp.zeros((tb, n_cores), jnp.float32)
        for c in range(n_cores):
            g_c = jnp.sum(jnp.where(lane_core == c, prod, 0.0), axis=-1, keepdims=True)
            g = jnp.where(core_col == c, g_c, g)
        g = g + nan
        if not has_pre:
            d_scores[0, ell] = g
            return acc
        raw = raw_in[0, ell][:, None]
        d_scores[0, ell] = act(raw) * g
        d_pre = jnp.sum(scores[0, ell].astype(jnp.float32) * g, axis=-1, keepdims=True)
        d_r = act_grad(raw) * (d_pre + d_pre_in[0, ell][:, None])  # [tb, 1]
        d_raw[0, ell] = d_r[:, 0]
        return acc + d_r * _unpack_rows(p_buf[ell], row_ids)

    acc = lax.fori_loop(0, m, slot, jnp.zeros((tb, max(plan.pre_dim, 1)), jnp.float32))
    if has_pre:
        d_x_p[...] = acc


def _backward_slots(
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
    interpret,
    **_,
):
    _check(values, pre_values, rows, core_scores, x_p, interpret)
    plan = _Plan(values, pre_values, rows, core_scores, token_chunk)
    has_pre = pre_values is not None
    rows_blocks = plan.slot_major(rows)
    f32 = jnp.float32
    if has_pre:
        inputs = [
            plan.rows_smem(rows_blocks),
            rows_blocks,
            plan.slot_major(core_scores),
            plan.slot_major(raw),
            plan.slot_major(d_pre_scores.astype(f32)),
            plan.tokens(d_out),
            plan.tokens(x_p),
            _table_input(values, interpret),
            _table_input(pre_values, interpret),
        ]
        in_specs = [
            plan.rows_smem_spec(),
            plan.slot_spec(),
            plan.slot_spec(plan.n_cores),
            plan.slot_spec(),
            plan.slot_spec(),
            plan.token_spec(plan.value_dim),
            plan.token_spec(plan.pre_dim),
            pl.BlockSpec(memory_space=pl.ANY),
            pl.BlockSpec(memory_space=pl.ANY),
        ]
        out_specs = [plan.slot_spec(plan.n_cores), plan.slot_spec(), plan.token_spec(plan.pre_dim)]
        out_shape = [
            jax.ShapeDtypeStruct((plan.n_blocks, plan.n_slots, plan.tb, plan.n_cores), f32),
            jax.ShapeDtypeStruct((plan.n_blocks, plan.n_slots, plan.tb), f32),
            jax.ShapeDtypeStruct((plan.padded, plan.pre_dim), f32),
        ]
        scratch = [
            pltpu.VMEM((plan.n_slots, plan.tb, plan.value_dim), _word(values)),
            pltpu.VMEM((plan.n_slots, plan.tb, plan.pre_dim), _word(pre_values)),
        ]
    else:
        inputs = [
            plan.rows_smem(rows_blocks),
            rows_blocks,
            plan.tokens(d_out),
            _table_input(values, interpret),
        ]
        in_specs = [
            plan.rows_smem_spec(),
            plan.slot_spec(),
            plan.token_spec(plan.value_dim),
            pl.BlockSpec(memory_space=pl.ANY),
        ]
        out_specs = [plan.slot_spec(plan.n_cores)]
        out_shape = [
            jax.ShapeDtypeStruct((plan.n_blocks, plan.n_slots, plan.tb, plan.n_cores), f32)
        ]
        scratch = [pltpu.VMEM((plan.n_slots, plan.tb, plan.value_dim), _word(values))]
    scratch.append(pltpu.SemaphoreType.DMA((2,)))
    table_elems = plan.value_dim + plan.pre_dim
    results = pl.pallas_call(
        functools.partial(_slots_kernel, plan=plan, has_pre=has_pre, act_name=pre_score_act),
        grid=(plan.n_blocks,),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",), vmem_limit_bytes=_VMEM_LIMIT
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * plan.padded * plan.n_slots * table_elems,
            transcendentals=2 * plan.padded * plan.n_slots if pre_score_act == "gelu" else 0,
            bytes_accessed=plan.padded * plan.n_slots * table_elems * values.dtype.itemsize,
        ),
        interpret=_interpret_arg(interpret),
        name="value_bag_backward_slots_tpu",
    )(*inputs)
    d_scores = plan.token_major(results[0])
    if not has_pre:
        return d_scores, None, None
    return d_scores, plan.token_major(results[1]), results[2][: plan.n_tokens]


# ---------------------------------------------------------------------------------------------------
# Backward over the tables: d_values, d_pre_values, deterministic (each row summed in `order`).

_SLOT_BLOCK = 256  # sorted slots per grid step


def _tables_kernel(*refs, n_rows, n_slots_total, sb, n_cores, value_dim, has_pre):
    if has_pre:
        (tokens, rows, weights, d_raw, d_out, x_p, _, _, d_values, d_pre) = refs[:10]
        o_buf, x_buf, acc_v, acc_p, current, sem = refs[10:]
    else:
        (tokens, rows, weights, d_out, _, d_values) = refs[:6]
        o_buf, acc_v, current, sem = refs[6:]
    block = pl.program_id(0)
    n_valid = jnp.minimum(sb, n_slots_total - block * sb)

    @pl.when(block == 0)
    def _():
        current[0] = -1
        acc_v[...] = jnp.zeros_like(acc_v)
        if has_pre:
            acc_p[...] = jnp.zeros_like(acc_p)

    # Gather the block's d_out (and x_p) rows by token: every DMA in flight, then waited.
    def copy(src, dst, j, token):
        return pltpu.make_async_copy(src.at[pl.ds(token, 1)], dst.at[pl.ds(j, 1)], sem.at[0])

    def start(j, carry):
        copy(d_out, o_buf, j, tokens[j]).start()
        if has_pre:
            copy(x_p, x_buf, j, tokens[j]).start()
        return carry

    def wait(j, carry):
        copy(d_out, o_buf, j, 0).wait()
        if has_pre:
            copy(x_p, x_buf, j, 0).wait()
        return carry

    lax.fori_loop(0, n_valid, start, 0)
    lax.fori_loop(0, n_valid, wait, 0)

    def flush():
        """Writes the finished run's sum to its row (once), if the row is inside the table."""
        row = current[0]

        @pl.when((row >= 0) & (row < n_rows))
        def _():
            out = pltpu.make_async_copy(acc_v, d_values.at[pl.ds(row, 1)], sem.at[1])
            out.start()
            if has_pre:
                out_p = pltpu.make_async_copy(acc_p, d_pre.at[pl.ds(row, 1)], sem.at[1])
                out_p.start()
                out_p.wait()
            out.wait()

    lane_core = _div(lax.broadcasted_iota(jnp.int32, (1, value_dim), 1), value_dim // n_cores)

    def slot(j, carry):
        row = rows[j]

        @pl.when(row != current[0])
        def _():
            flush()
            current[0] = row
            acc_v[...] = jnp.zeros_like(acc_v)
            if has_pre:
                acc_p[...] = jnp.zeros_like(acc_p)

        w_full = jnp.zeros((1, value_dim), jnp.float32)
        for c in range(n_cores):
            w_full = jnp.where(lane_core == c, weights[j * n_cores + c], w_full)
        acc_v[...] += w_full * o_buf[pl.ds(j, 1)]
        if has_pre:
            acc_p[...] += d_raw[j] * x_buf[pl.ds(j, 1)]
        return carry

    lax.fori_loop(0, n_valid, slot, 0)

    @pl.when(block == pl.num_programs(0) - 1)
    def _():
        flush()


def _backward_tables(
    order, sorted_rows, slot_weights, d_out, d_raw, x_p, *, n_rows, n_slots, interpret, **_
):
    """d_values [N, D_v] f32 and d_pre_values [N, D_p] f32 (None without pre-values).

    Plain-JAX equivalent (each row's sum taken in `order`, so the result is bitwise reproducible):

        tokens = order // n_slots
        d_values = zeros([N, D_v]).at[sorted_rows].add(
            (slot_weights[order][:, :, None] * d_out[tokens].reshape(-1, C, D_v // C)).reshape(-1, D_v))
        d_pre_values = zeros([N, D_p]).at[sorted_rows].add(d_raw[order][:, None] * x_p[tokens])

    A sequential grid ("arbitrary") over blocks of 256 sorted slots: per block the slots' token ids,
    rows, weights and d_raw sit in SMEM, the d_out (x_p) rows are gathered by DMA into VMEM; the
    slots are then added one by one into a [1, D] VMEM accumulator that is carried across blocks, and
    when the row changes the finished sum is DMA'd to its row of the output, which is therefore
    written exactly once (untouched rows keep the zeros the output is aliased to). Rows outside
    [0, N) are never written (their contributions are dropped, as the XLA path's mode="drop").
    """
    f32 = jnp.float32
    has_pre = d_raw is not None
    n_total = order.shape[0]
    n_tokens, value_dim = d_out.shape
    n_cores = slot_weights.shape[1]
    sb = min(_SLOT_BLOCK, _round_up(n_total, 8))
    n_blocks = -(-n_total // sb)
    pad = n_blocks * sb - n_total

    def smem_blocks(x):  # [S·k] → [blocks, 1, sb·k]
        x = jnp.pad(x, (0, pad * (x.shape[0] // n_total)))
        return x.reshape(n_blocks, 1, -1)

    def smem_spec(width):
        return pl.BlockSpec((None, None, width), lambda i: (i, 0, 0), memory_space=pltpu.SMEM)

    tokens = (order // n_slots).astype(jnp.int32)
    weights = slot_weights.astype(f32)[order].reshape(-1)
    inputs = [smem_blocks(tokens), smem_blocks(sorted_rows.astype(jnp.int32)), smem_blocks(weights)]
    in_specs = [smem_spec(sb), smem_spec(sb), smem_spec(sb * n_cores)]
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    outs = [jnp.zeros((n_rows, value_dim), f32)]
    if has_pre:
        inputs.append(smem_blocks(d_raw.astype(f32)[order]))
        in_specs.append(smem_spec(sb))
        inputs += [d_out.astype(f32), x_p.astype(f32)]
        outs.append(jnp.zeros((n_rows, x_p.shape[1]), f32))
    else:
        inputs.append(d_out.astype(f32))
    in_specs += [any_spec] * (len(inputs) - len(in_specs))
    first_out = len(inputs)
    inputs += outs
    in_specs += [any_spec] * len(outs)
    scratch = [pltpu.VMEM((sb, value_dim), f32)]
    if has_pre:
        scratch.append(pltpu.VMEM((sb, x_p.shape[1]), f32))
    scratch.append(pltpu.VMEM((1, value_dim), f32))
    if has_pre:
        scratch.append(pltpu.VMEM((1, x_p.shape[1]), f32))
    scratch += [pltpu.SMEM((1,), jnp.int32), pltpu.SemaphoreType.DMA((2,))]
    width = value_dim + (x_p.shape[1] if has_pre else 0)
    results = pl.pallas_call(
        functools.partial(
            _tables_kernel,
            n_rows=n_rows,
            n_slots_total=n_total,
            sb=sb,
            n_cores=n_cores,
            value_dim=value_dim,
            has_pre=has_pre,
        ),
        grid=(n_blocks,),
        in_specs=in_specs,
        out_specs=[any_spec] * len(outs),
        out_shape=[jax.ShapeDtypeStruct(o.shape, f32) for o in outs],
        input_output_aliases={first_out + k: k for k in range(len(outs))},
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("arbitrary",), vmem_limit_bytes=_VMEM_LIMIT
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * n_total * width, transcendentals=0, bytes_accessed=2 * n_total * width * 4
        ),
        interpret=_interpret_arg(interpret),
        name="value_bag_backward_tables_tpu",
    )(*inputs)
    return results[0], (results[1] if has_pre else None)


TPU_KERNELS = value_bag_op.ValueBagKernels(
    forward=_forward,
    backward_slots=_backward_slots,
    backward_tables=_backward_tables,
)


def value_bag_tpu(
    values,
    pre_values,
    rows,
    core_scores,
    x_p,
    *,
    pre_score_act,
    token_chunk,
    table_reduction,
    interpret=False,
):
    """value_bag's (out [T, D_v], p [T, m] f32) through the TPU kernels (see the module docstring).

    Raises NotImplementedError at trace time for what it declines (tables neither f32 nor bf16,
    bf16 tables with an odd row count, ≥ 2^31 rows).
    """
    _check(values, pre_values, rows, core_scores, x_p, interpret)
    if table_reduction == "auto":
        table_reduction = "segmented_scan"  # deterministic on TPU; sorted_scatter is CPU-only
    return value_bag_op.custom_value_bag(
        TPU_KERNELS,
        values,
        pre_values,
        rows,
        core_scores,
        x_p,
        pre_score_act=pre_score_act,
        token_chunk=token_chunk,
        table_reduction=table_reduction,
        interpret=interpret,
    )


registry.register_implementation("value_bag", "pallas", value_bag_tpu, platforms=("tpu",))
