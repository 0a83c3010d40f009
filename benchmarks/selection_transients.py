"""Compiled temporaries of the XLA selection ops, one pass over the tokens vs token chunks.

    python benchmarks/selection_transients.py [--tokens 4096] [--platform cpu|tpu] [--json]

Per device and per head, forward + backward (the gradient of a weighted sum of the scores), at the
1B/7B UltraMemV2 retrieval shape (n 528 keys per side, D_k 512, Tucker rank 2, 2 cores, rc_topk
128, topk 128) and the same widths for product keys (Memory+/PKM). Compiled from abstract shapes
(`jit(...).trace(...).lower().compile().memory_analysis()`) for XLA:CPU, or with `--platform tpu`
for one TPU v5e device of a `v5e:2x2` topology from this host (needs libtpu; no TPU is used): the
compiler's memory plan, nothing allocated and nothing timed. "one pass" is the op before token chunking (all T tokens in one
[T, k, k] grid); "chunked" is the default (`umv2_jax.ops.selection.TRANSIENT_BYTES`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if "tpu" in sys.argv:
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
else:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from umv2_jax.ops import product_key_topk as pk_module  # noqa: E402
from umv2_jax.ops import registry  # noqa: E402
from umv2_jax.ops import retrieval_topk as retrieval_module  # noqa: E402

N_KEYS, KEY_DIM, RANK, CORES, RC_TOPK, TOPK = 528, 512, 2, 2, 128, 128


def _shape(shape, sharding=None):
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)


def _retrieval(tokens: int, chunk: int | None, sharding=None):
    def value(q_row, q_col, k_row, k_col, cores, u, t):
        _, scores = retrieval_module._retrieval_topk_xla(
            q_row, q_col, k_row, k_col, cores, u, t, rc_topk=RC_TOPK, topk=TOPK, token_chunk=chunk
        )
        return jnp.sum(scores)

    q = _shape((tokens, RANK, KEY_DIM), sharding)
    k = _shape((N_KEYS, RANK, KEY_DIM), sharding)
    shapes = (q, q, k, k, _shape((CORES, RANK, RANK), sharding))
    shapes += (_shape((RANK,), sharding),) * 2
    return jax.jit(jax.grad(value, argnums=(0, 1, 2, 3, 4))), shapes


def _product_key(tokens: int, chunk: int | None, sharding=None):
    def value(q_row, q_col, k_row, k_col):
        _, scores = pk_module._product_key_topk_xla(
            q_row, q_col, k_row, k_col, rc_topk=RC_TOPK, topk=TOPK, token_chunk=chunk
        )
        return jnp.sum(scores)

    q = _shape((tokens, KEY_DIM), sharding)
    k = _shape((N_KEYS, KEY_DIM), sharding)
    return jax.jit(jax.grad(value, argnums=(0, 1, 2, 3))), (q, q, k, k)


def measure(tokens: int, platform: str = "cpu") -> dict:
    sharding = None
    if platform == "tpu":
        from jax.experimental import topologies
        from jax.sharding import SingleDeviceSharding

        device = topologies.get_topology_desc("v5e:2x2", platform="tpu").devices[0]
        sharding = SingleDeviceSharding(device)
    result = {}
    with registry.lowering_platforms(platform):  # the ops trace the target platform's branches
        for name, make in (("retrieval_topk", _retrieval), ("product_key_topk", _product_key)):
            for label, chunk in (("one_pass", tokens), ("chunked", None)):
                fn, shapes = make(tokens, chunk, sharding)
                memory = fn.trace(*shapes).lower().compile().memory_analysis()
                result[f"{name}/{label}"] = memory.temp_size_in_bytes
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--platform", choices=("cpu", "tpu"), default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.tokens, args.platform)
    if args.json:
        print(json.dumps({"tokens": args.tokens, "platform": args.platform, "temp_bytes": result}))
        return
    print(
        f"{args.platform}: T={args.tokens}, n={N_KEYS}, D_k={KEY_DIM}, r={RANK}, C={CORES}, k={RC_TOPK}, m={TOPK}"
    )
    for key, value in result.items():
        print(f"{key:32s} temporaries {value / 2**20:9.1f} MiB")


if __name__ == "__main__":
    main()
