"""Selection kernels of `umv2_jax.ops.retrieval_topk` (stage 1 score + select, stage 2 grid +
select): `gpu` (Pallas Triton), `tpu` (Pallas Mosaic TPU). Both follow
`umv2_jax.ops.selection.SelectionKernels`; `product_key_topk` reuses them as its rank-1 case."""
