"""Retrieval rows of the kernel benchmark: the Pallas selection kernels vs the XLA path.

    python -m benchmarks.retrieval_kernels [--json] [--tokens 16384]

On a GPU: per shape (the 227M paper config and 2.5B-top768, T = 16384), the forward time of
`retrieval_topk` with implementation "xla" and "pallas" (median of timed runs after a warm-up),
peak device memory from XLA's memory analysis of the compiled program (arguments + outputs +
temporaries), and the ratios xla / pallas. On CPU no kernel compiles: the kernels run in the
Pallas interpreter at small shapes and are checked against the XLA path (indices equal, scores
within fp32 tolerance); no speed is measured and the output says so.

`benchmarks/kernels.py` (value_bag rows) may call `retrieval_rows()` for its retrieval section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.retrieval_topk import gpu
from umv2_jax.ops.retrieval_topk import retrieval_topk
from umv2_jax.ops.selection import retrieval_kernel_implementation

# name: (r, D_k, n keys per side, rc_topk k, topk m, cores C)
GPU_SHAPES = {
    "227M": (2, 192, 360, 32, 32, 1),
    "2.5B_top768": (2, 192, 360, 128, 768, 1),
}
CPU_SHAPES = {
    "small": (2, 48, 100, 12, 20, 2),
    "small_top_k2": (2, 16, 40, 8, 64, 1),
}


def _inputs(n_tokens, rank, key_dim, n_keys, n_cores, seed=0):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True))

    u = normal(rank)
    return (
        normal(n_tokens, rank, key_dim),
        normal(n_tokens, rank, key_dim),
        normal(n_keys, rank, key_dim),
        normal(n_keys, rank, key_dim),
        jnp.asarray(rng.standard_normal((n_cores, rank, rank)).astype(np.float32)),
        u,
        u,
    )


def _compiled(implementation, args, k, m, interpret=False):
    def fn(*arrays):
        return retrieval_topk(
            *arrays, rc_topk=k, topk=m, implementation=implementation, interpret=interpret
        )

    return jax.jit(fn).lower(*args).compile()


def _peak_bytes(compiled) -> int | None:
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    return int(
        memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    )


def _time(compiled, args, repeats=20) -> float:
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def retrieval_rows(n_tokens: int = 16384) -> list[dict]:
    """One row per shape; on CPU correctness only (interpreter, small shapes, no timing)."""
    platform = jax.default_backend()
    rows = []
    if platform in ("gpu", "cuda", "rocm"):
        for name, (rank, key_dim, n_keys, k, m, n_cores) in GPU_SHAPES.items():
            args = _inputs(n_tokens, rank, key_dim, n_keys, n_cores)
            xla, pallas = _compiled("xla", args, k, m), _compiled("pallas", args, k, m)
            row = {"shape": name, "tokens": n_tokens, "platform": platform, "k": k, "m": m}
            row["xla_s"], row["pallas_s"] = _time(xla, args), _time(pallas, args)
            row["xla_peak_bytes"], row["pallas_peak_bytes"] = _peak_bytes(xla), _peak_bytes(pallas)
            row["speedup"] = row["xla_s"] / row["pallas_s"]
            if row["xla_peak_bytes"] and row["pallas_peak_bytes"]:
                row["memory_ratio"] = row["xla_peak_bytes"] / row["pallas_peak_bytes"]
            got, want = pallas(*args), xla(*args)
            row["indices_equal_fraction"] = float(jnp.mean(got[0] == want[0]))
            rows.append(row)
        return rows
    for name, (rank, key_dim, n_keys, k, m, n_cores) in CPU_SHAPES.items():
        args = _inputs(37, rank, key_dim, n_keys, n_cores)
        want = _compiled("xla", args, k, m)(*args)
        # The Triton kernels themselves ("pallas" + interpret would prefer the TPU ones).
        triton = jax.jit(
            retrieval_kernel_implementation(gpu.KERNELS),
            static_argnames=("rc_topk", "topk", "interpret"),
        )
        got = triton(*args, rc_topk=k, topk=m, interpret=True)
        rows.append(
            {
                "shape": name,
                "tokens": 37,
                "platform": platform,
                "kernels": "triton (interpreter)",
                "indices_equal": bool(jnp.all(got[0] == want[0])),
                "max_score_error": float(jnp.max(jnp.abs(got[1] - want[1]))),
                "speed": "not measured: no GPU (CPU runs the kernels in the Pallas interpreter)",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per row")
    parser.add_argument("--tokens", type=int, default=16384)
    options = parser.parse_args()
    for row in retrieval_rows(options.tokens):
        print(json.dumps(row) if options.json else "  ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
