"""`auto` picks the Pallas kernel per lowering platform: the MoE dispatch's train-step gradient at
the OLMoE-227M layer shape (4096 tokens, h 768, 64 experts of 384, top-8, bf16), lowered and
compiled by Mosaic for a TPU v5e topology from a CPU host, and the same traced program lowered for
CPU. Needs `pip install -e '.[tpu]'` (libtpu); no TPU is used.

    python benchmarks/tpu_lowering.py

Prints how many Pallas TPU kernels (`tpu_custom_call`: megablox gmm / tgmm) each lowering holds,
the compile time and XLA:TPU's memory plan.
"""

import os
import time

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# The ops registry traces the TPU branches (the host is a CPU) and the CPU ones (lowered below).
os.environ.setdefault("UMV2_LOWERING_PLATFORMS", "cpu,tpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from umv2_jax.ops.moe_dispatch import moe_dispatch  # noqa: E402

topo = topologies.get_topology_desc("v5e:2x2", platform="tpu")
dev = topo.devices[0]
s = SingleDeviceSharding(dev)
T, h, E, de, k = 4096, 768, 64, 384, 8  # OLMoE-227M MoE layer, one device's 4096 tokens
S = lambda shape, dt=jnp.float32: jax.ShapeDtypeStruct(shape, dt, sharding=s)
args = (
    S((T, h), jnp.bfloat16),
    S((T, k), jnp.int32),
    S((E, h, de), jnp.bfloat16),
    S((E, h, de), jnp.bfloat16),
    S((E, de, h), jnp.bfloat16),
)


def step(x, ids, gate, up, down):
    def loss(x, gate, up, down):
        return jnp.sum(moe_dispatch(x, ids, gate, up, down).out.astype(jnp.float32) ** 2)

    return jax.grad(loss, argnums=(0, 1, 2, 3))(x, gate, up, down)


start = time.perf_counter()
lowered = jax.jit(step).trace(*args).lower()
text = lowered.as_text()
print(
    "tpu_custom_call in lowered (megablox kernel):",
    text.count("tpu_custom_call"),
    "ragged_dot:",
    text.count("ragged_dot"),
)
compiled = lowered.compile()
m = compiled.memory_analysis()
print(
    f"compiled for {dev.device_kind} in {time.perf_counter() - start:.1f}s; args {m.argument_size_in_bytes / 2**20:.1f} MiB temps {m.temp_size_in_bytes / 2**20:.1f} MiB"
)
# the same traced program lowered for cpu has no kernel
cpu_text = (
    jax.jit(step)
    .trace(*[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args])
    .lower(lowering_platforms=("cpu",))
    .as_text()
)
print("cpu lowering tpu_custom_call:", cpu_text.count("tpu_custom_call"))
