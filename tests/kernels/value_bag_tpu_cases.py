"""Shapes the TPU value_bag kernels must lower and compile at (no pytest here: the TPU compile
subprocess, `pallas_kernels.testing.compile_for_tpu_v5e`, imports this module).

    SHAPES: name → (T, m, C, N_rows, D_v, D_p, dtype)

float32 and bfloat16 tables (bf16 needs an even row count; pallas_kernels/value_bag/tpu.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.value_bag import tpu

SHAPES = {
    # docs/evaluation.md S-umv2: n 146 (n² rows), m 16, D_v 48, D_p 16.
    "S": (2048, 16, 1, 146 * 146, 48, 16, jnp.float32),
    # Paper 227M: D_v = D_p = 192, m 32, one head; the stacked pool of 20 layers' tables.
    "227M_pool20": (4096, 32, 2, 20 * 256 * 256, 192, 192, jnp.float32),
    # Paper 1B/7B: D_v 768, D_p 384, m 128.
    "1B": (4096, 128, 1, 1024 * 1024, 768, 384, jnp.float32),
    # More than 2^31 table elements (3M × 768 ≈ 2.3e9): rows are addressed, never flat offsets.
    "over_2_31": (1024, 32, 1, 3 * 2**20, 768, 384, jnp.float32),
    # bfloat16 tables (read as uint32 row pairs through an in-kernel ref bitcast).
    "S_bf16": (2048, 16, 1, 146 * 146, 48, 16, jnp.bfloat16),
    "227M_pool20_bf16": (4096, 32, 2, 20 * 256 * 256, 192, 192, jnp.bfloat16),
}
# Tables are placed row-major (what a row gather needs): XLA:TPU's default layout for f32[N, 192]
# is column-major (less padding than 192 → 256 lanes), and then XLA, for its own gather as for the
# kernel, relayouts both tables on every call (2.6 GB of temps at 227M_pool20; DEVELOPERS.md).
ROW_MAJOR_TABLES = {"row_major": (0, 1)}


def abstract_args(name: str, pre: bool = True):
    """(values, pre_values, rows, core_scores, x_p) as ShapeDtypeStructs (nothing allocated)."""
    n_tokens, n_slots, n_cores, n_rows, value_dim, pre_dim, dtype = SHAPES[name]
    S = jax.ShapeDtypeStruct
    return (
        S((n_rows, value_dim), dtype),
        S((n_rows, pre_dim), dtype) if pre else None,
        S((n_tokens, n_slots), jnp.int32),
        S((n_tokens, n_slots, n_cores), jnp.float32),
        S((n_tokens, pre_dim), dtype) if pre else None,
    )


def forward(values, pre_values, rows, core_scores, x_p, act="gelu"):
    return tpu.value_bag_tpu(
        values,
        pre_values,
        rows,
        core_scores,
        x_p,
        pre_score_act=act,
        token_chunk=256,
        table_reduction="auto",
    )


def gradients(values, pre_values, rows, core_scores, x_p, act="gelu"):
    """Every float gradient of a scalar of (out, p): all three passes of the custom VJP."""

    def loss(values, pre_values, core_scores, x_p):
        out, p = forward(values, pre_values, rows, core_scores, x_p, act)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(p)

    return jax.grad(loss, argnums=(0, 1, 2, 3))(values, pre_values, core_scores, x_p)


def gradients_no_pre(values, rows, core_scores):
    def loss(values, core_scores):
        out, _ = forward(values, None, rows, core_scores, None, "identity")
        return jnp.sum(out.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1))(values, core_scores)


def default_compile_cases():
    """The default suite's compile: S f32 and bf16 gradients (all three kernels), > 2^31 forward."""
    keep = ("S/gradients", "S_bf16/gradients", "over_2_31/forward")
    return [case for case in compile_cases() if case[0] in keep]


def compile_cases():
    """[(name, fn, args)] for `compile_for_tpu_v5e`: forward and gradients at every shape (> 2^31:
    forward only; its dense f32 table gradients alone, 14 GB, exceed a v5e's 16 GB HBM)."""
    cases = []
    for name in SHAPES:
        args = abstract_args(name)
        cases.append((f"{name}/forward", forward, args, ROW_MAJOR_TABLES))
        if name != "over_2_31":
            cases.append((f"{name}/gradients", gradients, args, ROW_MAJOR_TABLES))
    values, _, rows, core_scores, _ = abstract_args("S", pre=False)
    no_pre = (values, rows, core_scores)
    cases.append(("S_no_pre/gradients", gradients_no_pre, no_pre, {"row_major": (0,)}))
    # The same program with XLA:TPU's default (column-major) table layout: the relayout copies.
    cases.append(("227M_pool20/forward_default_layout", forward, abstract_args("227M_pool20")))
    return cases


def small_cases():
    """One tiny f32 case (fast; a smoke test of the runner itself)."""
    S = jax.ShapeDtypeStruct
    args = (
        S((64, 48), jnp.float32),
        S((64, 16), jnp.float32),
        S((40, 3), jnp.int32),
        S((40, 3, 2), jnp.float32),
        S((40, 16), jnp.float32),
    )
    return [("tiny/gradients", gradients, args)]
