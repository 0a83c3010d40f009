"""Pallas kernels of `umv2_jax.ops.value_bag`: `gpu` (Pallas Triton) and `tpu` (Pallas Mosaic TPU).

Each module builds the three passes of `umv2_jax.ops.value_bag.ValueBagKernels` (forward,
backward_slots, backward_tables) and registers

    fn(values, pre_values, rows, core_scores, x_p, *, pre_score_act, token_chunk, table_reduction,
       interpret) -> custom_value_bag(ITS_KERNELS, ...)

as the op's "pallas" implementation for its platforms when imported (the registry imports both the
first time the op is used). The custom VJP stays in `umv2_jax.ops.value_bag`.
"""
