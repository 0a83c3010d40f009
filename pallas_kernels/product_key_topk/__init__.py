"""`umv2_jax.ops.product_key_topk` kernels: the retrieval selection kernels in their rank-1 case
(r = 1, w = [1], stage 2 scoring the sum of the half scores); `gpu` registers the Triton ones."""
