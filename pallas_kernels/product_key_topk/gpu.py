"""Registers the Pallas Triton selection kernels of `pallas_kernels.retrieval_topk.gpu` for
`product_key_topk` (q [T, D_k] → r = 1, w = [1]; stage 2 scores r_cand + q_cand)."""

from __future__ import annotations

from pallas_kernels.retrieval_topk.gpu import KERNELS
from umv2_jax.ops import product_key_topk as _op  # noqa: F401  (declares the op)
from umv2_jax.ops import registry
from umv2_jax.ops.selection import product_key_kernel_implementation

registry.register_implementation(
    "product_key_topk",
    "pallas",
    product_key_kernel_implementation(KERNELS),
    platforms=("cuda", "rocm"),
)
