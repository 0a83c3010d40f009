"""Time of grouped_matmul's implementations against the block-padded loop (`xla`), same process.

    python benchmarks/grouped_matmul.py                       # the S-moe expert matmul shape
    python benchmarks/grouped_matmul.py --rows 8192 --reps 5

Each implementation that runs here (xla, ragged_dot; pallas only in the interpreter, so not timed)
is jitted, run once, then timed: the best of `--reps` calls, forward and forward + backward (w.r.t.
lhs and rhs). Prints seconds and the ratio over `xla` measured in this run, so machine load hits
every row alike. Default shape: M = 4096·8 rows (T = 4096 tokens, top-8), K = 128, N = 64, G = 64
groups of ≈512 rows.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from umv2_jax.ops.grouped_matmul import grouped_matmul


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096 * 8)
    parser.add_argument("--in-dim", type=int, default=128)
    parser.add_argument("--out-dim", type=int, default=64)
    parser.add_argument("--groups", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--implementations", nargs="+", default=["xla", "ragged_dot"])
    args = parser.parse_args()

    keys = jax.random.split(jax.random.key(0), 3)
    lhs = jax.random.normal(keys[0], (args.rows, args.in_dim), jnp.float32)
    rhs = jax.random.normal(keys[1], (args.groups, args.in_dim, args.out_dim), jnp.float32)
    group_ids = jnp.sort(jax.random.randint(keys[2], (args.rows,), 0, args.groups))
    group_sizes = jnp.bincount(group_ids, length=args.groups).astype(jnp.int32)

    results = {}
    for name in args.implementations:
        results[name] = _time(name, lhs, rhs, group_sizes, args.block_size, args.reps)
    base = results.get("xla")
    print(
        f"grouped_matmul M={args.rows} K={args.in_dim} N={args.out_dim} G={args.groups} "
        f"block={args.block_size} ({jax.default_backend()}, best of {args.reps})"
    )
    print(
        f"{'implementation':<16}{'forward s':>12}{'fwd+bwd s':>12}{'fwd ×xla':>10}{'f+b ×xla':>10}"
    )
    for name, (forward, both) in results.items():
        ratios = (forward / base[0], both / base[1]) if base else (float("nan"),) * 2
        print(f"{name:<16}{forward:>12.4f}{both:>12.4f}{ratios[0]:>10.2f}{ratios[1]:>10.2f}")


def _time(name, lhs, rhs, group_sizes, block_size, reps) -> tuple[float, float]:
    def forward(a, b):
        return grouped_matmul(a, b, group_sizes, implementation=name, block_size=block_size)

    def loss(a, b):
        return jnp.sum(forward(a, b) ** 2)

    timings = []
    for fn in (jax.jit(forward), jax.jit(jax.grad(loss, (0, 1)))):
        jax.block_until_ready(fn(lhs, rhs))
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            jax.block_until_ready(fn(lhs, rhs))
            best = min(best, time.perf_counter() - start)
        timings.append(best)
    return timings[0], timings[1]


if __name__ == "__main__":
    main()
