"""Pallas kernels, one package per op of `umv2_jax.ops`: `pallas_kernels.<op>.gpu` (Pallas Triton)
and `pallas_kernels.<op>.tpu` (Pallas Mosaic TPU).

A kernel module registers itself when imported, which `umv2_jax.ops.registry` does the first time
the op is used:

    registry.register_implementation("<op>", "pallas", kernel, platforms=("tpu",))

`kernel(*arrays, interpret=False, **options)` has the op's signature (see the op's docstring) and
raises NotImplementedError at trace time for shapes it does not support (the registry then falls
through to the next implementation). Kernels are pure functions of arrays and static shapes; their
custom VJPs live in `umv2_jax.ops`.
"""
