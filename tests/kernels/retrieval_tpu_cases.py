"""Shapes the TPU retrieval selection kernels must lower and compile at (no pytest here: the TPU
compile subprocess, `pallas_kernels.testing.compile_for_tpu_v5e`, imports this module).

    SHAPES: name → (T, n, D_k, r, k, m, C, heads); C 0 = product keys (r 1)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.retrieval_topk import tpu
from umv2_jax.ops.product_key_topk import product_key_topk
from umv2_jax.ops.retrieval_topk import retrieval_topk

# T = 16384 tokens (the benchmark's), except T_pad: a count that is not a multiple of the tile.
SHAPES = {
    "T": (16384, 68, 16, 2, 8, 8, 2, 1),  # docs/evaluation.md T-umv2
    "S": (16384, 146, 32, 2, 16, 16, 2, 1),  # docs/evaluation.md S-umv2
    "227M": (16384, 360, 192, 2, 32, 32, 2, 1),  # paper 227M
    "1B7B": (16384, 528, 512, 2, 128, 128, 2, 1),  # paper 1B / 7B
    "2.5B_top768": (16384, 964, 512, 2, 128, 768, 2, 1),  # rc_topk capped at 128 (docs/model.md §5)
    "2.5B_top256": (16384, 964, 512, 2, 128, 256, 2, 1),
    "ring16": (16384, 3856, 512, 2, 128, 128, 2, 1),  # ring:16 of n 964: n_eff 3856
    "memory_plus": (16384, 1138, 384, 1, 80, 80, 0, 2),  # Memory+ 227M, product keys, 2 heads
    "T_pad": (1000, 360, 192, 2, 32, 32, 2, 2),  # T not a multiple of 128, 2 heads
}
# The default suite lowers and compiles the kernels alone at these (a few seconds each); the whole
# forward + backward at every shape is a slow test (one to three minutes of XLA:TPU per shape).
DEFAULT_COMPILE = ("227M", "2.5B_top768", "ring16", "memory_plus")


def abstract_args(name: str):
    """The op's array arguments as ShapeDtypeStructs, with a leading heads axis (nothing allocated)."""
    n_tokens, n_keys, key_dim, rank, _, _, n_cores, heads = SHAPES[name]
    S = jax.ShapeDtypeStruct
    f32 = jnp.float32
    if n_cores == 0:
        query, key = S((heads, n_tokens, key_dim), f32), S((heads, n_keys, key_dim), f32)
        return (query, query, key, key)
    query, key = S((heads, n_tokens, rank, key_dim), f32), S((heads, n_keys, rank, key_dim), f32)
    return (
        query,
        query,
        key,
        key,
        S((heads, n_cores, rank, rank), f32),
        S((rank,), f32),
        S((rank,), f32),
    )


def train_step(name: str, implementation: str = "auto"):
    """fn(*abstract_args(name)) → (grid indices, gradients of a scalar of the selected scores)."""
    _, _, _, _, rc_topk, topk, n_cores, _ = SHAPES[name]
    if n_cores == 0:

        def forward(q_row, q_col, k_row, k_col):
            select = lambda *a: product_key_topk(  # noqa: E731
                *a, rc_topk=rc_topk, topk=topk, implementation=implementation
            )
            return jax.vmap(select)(q_row, q_col, k_row, k_col)

        n_diff = 4
    else:

        def forward(q_row, q_col, k_row, k_col, cores, u_star, t_star):
            select = lambda qr, qc, kr, kc, c: retrieval_topk(  # noqa: E731
                qr,
                qc,
                kr,
                kc,
                c,
                u_star,
                t_star,
                rc_topk=rc_topk,
                topk=topk,
                implementation=implementation,
            )
            return jax.vmap(select)(q_row, q_col, k_row, k_col, cores)

        n_diff = 5

    def step(*args):
        def loss(*diff):
            indices, scores = forward(*diff, *args[n_diff:])
            return jnp.sum(scores.astype(jnp.float32) ** 2), indices

        grads, indices = jax.grad(loss, argnums=tuple(range(n_diff)), has_aux=True)(*args[:n_diff])
        return indices, grads

    return step


def kernels(name: str):
    """(fn, args): stage 1 then stage 2 of one head, the kernels alone (no op, no gradient)."""
    n_tokens, n_keys, key_dim, rank, rc_topk, topk, n_cores, _ = SHAPES[name]
    rank = 1 if n_cores == 0 else rank
    S = jax.ShapeDtypeStruct
    f32 = jnp.float32
    query, key = S((n_tokens, rank, key_dim), f32), S((n_keys, rank, key_dim), f32)

    def select(q_row, q_col, k_row, k_col, w_row, w_col, core_sum, r_cand, q_cand):
        cand = tpu.stage1(q_row, q_col, k_row, k_col, w_row, w_col, rc_topk=rc_topk)
        best = tpu.stage2(r_cand, q_cand, None if n_cores == 0 else core_sum, topk=topk)
        return cand, best

    candidates = S((n_tokens, rank, rc_topk), f32)
    args = (query, query, key, key, S((rank,), f32), S((rank,), f32), S((rank, rank), f32),
            candidates, candidates)  # fmt: skip
    return select, args


def kernel_cases():
    """(name, fn, args) for `compile_for_tpu_v5e`: both kernels at the DEFAULT_COMPILE shapes."""
    return [(name, *kernels(name)) for name in DEFAULT_COMPILE]


def every_kernel_case():
    """(name, fn, args): both kernels alone at every shape (the numbers DEVELOPERS.md records)."""
    return [(name, *kernels(name)) for name in SHAPES]


def all_cases():
    """(name, fn, args): the op's forward and backward under "auto", heads vmapped, every shape."""
    return [(name, train_step(name), abstract_args(name)) for name in SHAPES]
