"""Registers the Mosaic TPU selection kernels of `pallas_kernels.retrieval_topk.tpu` for
`product_key_topk`: its rank-1 case (q [T, D_k] → r = 1, w = [1]; stage 2 scores the sum of the
half scores r_cand + q_cand, core_sum None)."""

from __future__ import annotations

from pallas_kernels.retrieval_topk.tpu import KERNELS
from umv2_jax.ops import product_key_topk as _declares_op  # noqa: F401  (declares the op)
from umv2_jax.ops import registry
from umv2_jax.ops.selection import product_key_kernel_implementation

registry.register_implementation(
    "product_key_topk",
    "pallas",
    product_key_kernel_implementation(KERNELS),
    platforms=("tpu",),
)
