"""Pallas kernels against the XLA path, measured in one run on one device.

    python benchmarks/kernels.py            # a table
    python benchmarks/kernels.py --json     # one JSON object

Retrieval selection: the rows of `benchmarks/retrieval_kernels.py` (time, XLA's peak memory and
the ratios at the 227M and 2.5B-top768 shapes, T = 16384), printed after the value_bag rows.

value_bag: per shape, forward (out, p) and forward + backward (every gradient) with
implementation="pallas" and "xla": median time, bytes moved, achieved bandwidth, the pallas / xla
speed ratio, and a device-to-device copy of the value table's bytes measured in the same run (the
bandwidth the forward is judged against).

Bytes moved, forward (the floor): the T·m gathered rows of both tables, T·m·(D_v + D_p) table
elements, plus reading rows, core scores and x_p and writing o and p:
    bytes = T·m·(D_v + D_p)·itemsize(table) + T·m·(4 + 4·C) + T·D_p·itemsize + T·D_v·itemsize + 4·T·m
The forward + backward floor counts the forward once more (backward_slots gathers both tables
again) plus writing the float32 table gradients of the rows touched, ≤ T·m·(D_v + D_p)·4.

On a CPU host no kernel compiles: the script runs the kernels in the Pallas interpreter at small
shapes, checks them against the XLA path, and prints that it measured no speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.retrieval_kernels import retrieval_rows  # noqa: E402
from umv2_jax.ops.value_bag import value_bag  # noqa: E402

# name: (T, m, C, N rows, D_v, D_p, table dtype)
GPU_SHAPES = {
    "227M T16384": (16384, 32, 2, 20 * 360**2, 192, 192, jnp.bfloat16),
    "S T4096": (4096, 16, 2, 4 * 146**2, 48, 16, jnp.bfloat16),
    "1B7B T4096": (4096, 128, 2, 16 * 528**2, 768, 384, jnp.bfloat16),
}
CPU_SHAPES = {
    "tiny f32": (37, 5, 2, 30, 24, 8, jnp.float32),
    "tiny bf16 D_v 48": (19, 4, 2, 40, 48, 16, jnp.bfloat16),
}


def _inputs(shape, seed=0):
    tokens, slots, n_cores, n_rows, value_dim, pre_dim, dtype = shape
    key = jax.random.split(jax.random.key(seed), 5)
    return (
        jax.random.normal(key[0], (n_rows, value_dim), dtype),
        jax.random.normal(key[1], (n_rows, pre_dim), dtype),
        jax.random.randint(key[2], (tokens, slots), 0, n_rows, jnp.int32),
        jax.random.normal(key[3], (tokens, slots, n_cores), jnp.float32),
        jax.random.normal(key[4], (tokens, pre_dim), dtype),
    )


def _gpu_kernels_interpreted(values, pre_values, rows, core_scores, x_p, **options):
    """The Triton kernels themselves in the interpreter (the registry's CPU "pallas" prefers TPU's)."""
    from pallas_kernels.value_bag import gpu

    del options
    return gpu.value_bag_gpu(
        values, pre_values, rows, core_scores, x_p, pre_score_act="identity", token_chunk=256,
        table_reduction="auto", interpret=True,
    )  # fmt: skip


def _forward(implementation, interpret=False):
    def f(values, pre_values, rows, core_scores, x_p):
        if implementation == "gpu-interpret":
            return _gpu_kernels_interpreted(values, pre_values, rows, core_scores, x_p)
        return value_bag(
            values, pre_values, rows, core_scores, x_p, pre_score_act="identity",
            implementation=implementation, interpret=interpret, return_pre_scores=True,
        )  # fmt: skip

    return jax.jit(f)


def _forward_backward(implementation, interpret=False):
    forward = _forward(implementation, interpret)

    def f(values, pre_values, rows, core_scores, x_p):
        def loss(values, pre_values, core_scores, x_p):
            out, p = forward(values, pre_values, rows, core_scores, x_p)
            return jnp.sum(out.astype(jnp.float32)) + jnp.sum(p)

        return jax.grad(loss, argnums=(0, 1, 2, 3))(values, pre_values, core_scores, x_p)

    return jax.jit(f)


def _time(fn, args, reps):
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_bytes(shape) -> int:
    tokens, slots, n_cores, _, value_dim, pre_dim, dtype = shape
    item = jnp.dtype(dtype).itemsize
    return (
        tokens * slots * (value_dim + pre_dim) * item
        + tokens * slots * (4 + 4 * n_cores)
        + tokens * (pre_dim + value_dim) * item
        + 4 * tokens * slots
    )


def value_bag_on_device(reps: int) -> list[dict]:
    """Times every GPU shape with pallas and xla (call only with a GPU)."""
    rows = []
    for name, shape in GPU_SHAPES.items():
        args = _inputs(shape)
        copy = jax.jit(lambda v: v + 0)  # one read and one write of the value table
        copy_s = _time(copy, (args[0],), reps)
        copy_bw = 2 * args[0].size * args[0].dtype.itemsize / copy_s
        fwd_bytes = forward_bytes(shape)
        row = {"shape": name, "copy_GBps": copy_bw / 1e9}
        for kind, build, n_bytes in (
            ("forward", _forward, fwd_bytes),
            ("forward+backward", _forward_backward, 2 * fwd_bytes),
        ):
            for impl in ("pallas", "xla"):
                seconds = _time(build(impl), args, reps)
                row[f"{kind}/{impl}_ms"] = seconds * 1e3
                row[f"{kind}/{impl}_GBps"] = n_bytes / seconds / 1e9
            row[f"{kind}/xla_over_pallas"] = row[f"{kind}/xla_ms"] / row[f"{kind}/pallas_ms"]
        row["forward/pallas_fraction_of_copy_bw"] = row["forward/pallas_GBps"] / row["copy_GBps"]
        rows.append(row)
    return rows


def value_bag_interpret_check() -> list[dict]:
    """CPU: the kernels in the interpreter vs the XLA path at small shapes (no timing)."""
    rows = []
    for name, shape in CPU_SHAPES.items():
        args = _inputs(shape)
        row = {"shape": name}
        for kind, build in (("forward", _forward), ("forward+backward", _forward_backward)):
            want = build("xla")(*args)
            for label, impl in (("gpu", "gpu-interpret"), ("registry_pallas", "pallas")):
                got = build(impl, interpret=True)(*args)
                err = max(
                    float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
                    / max(1.0, float(jnp.max(jnp.abs(w.astype(jnp.float32)))))
                    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))
                )
                row[f"{kind}/{label}_max_scaled_error"] = err
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    report = {
        "device": f"{device.platform} ({device.device_kind})",
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }
    on_gpu = device.platform == "gpu"
    if on_gpu:
        report["value_bag"] = value_bag_on_device(args.reps)
    else:
        report["value_bag_interpret"] = value_bag_interpret_check()
        report["note"] = (
            f"no speed measured on {device.platform}: the Pallas kernels do not compile here; "
            "interpret-mode correctness against the XLA path only"
        )
    # Retrieval selection (benchmarks/retrieval_kernels.py): timed with peak memory on a GPU,
    # interpreter correctness on a CPU.
    report["retrieval"] = retrieval_rows()
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"machine: {report['device']}; jax {report['jax']}; {report['date']}")
    for row in report.get("value_bag", report.get("value_bag_interpret", [])):
        print(
            " | ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{v}" for k, v in row.items())
        )
    for row in report["retrieval"]:
        print("retrieval | " + " | ".join(f"{k}: {v}" for k, v in row.items()))
    if "note" in report:
        print(report["note"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
