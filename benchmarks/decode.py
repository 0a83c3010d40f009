"""Decode step latency and tokens/s of docs/evaluation.md's matched dense / MoE / UltraMemV2, ratios to dense.

    python benchmarks/decode.py [--family T|S] [--batch-sizes 1,8,64,512] [--prompt-len 32]
                                [--reps 20] [--json]

Each model is initialized from its configs/eval/<family>_<kind>.yaml (weights at init: latency does
not depend on training), a random prompt batch is prefilled into a KV cache of prompt_len + reps +
warmup slots, and the jitted cached decode step (`umv2_jax.inference.decode.Decoder.step`) is timed
one token per row per step, `block_until_ready` after each, median over `reps` after 3 warmup steps.
tokens/s = batch / median step time. Ratios are against dense at the same batch, measured in the same
process. The machine is printed: on a CPU host the numbers are CPU numbers and say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from umv2_jax.config import load_config  # noqa: E402
from umv2_jax.inference.decode import Decoder  # noqa: E402
from umv2_jax.models.transformer import Transformer  # noqa: E402

KINDS = ("dense", "moe", "umv2")
WARMUP = 3


def measure(kind: str, family: str, batch_sizes, prompt_len: int, reps: int) -> dict:
    config = load_config(os.path.join(REPO, "configs", "eval", f"{family.lower()}_{kind}.yaml"))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(config.model, nnx.Rngs(0))))
    state = jax.jit(lambda: nnx.split(Transformer(config.model, nnx.Rngs(0)))[1])()
    decoder = Decoder(nnx.merge(graphdef, state))
    rng = np.random.default_rng(0)
    result = {"name": config.name, "steps": {}}
    for batch in batch_sizes:
        prompt = rng.integers(0, config.model.vocab_size, (batch, prompt_len)).astype(np.int32)
        cache_len = prompt_len + WARMUP + reps
        logits, cache, _ = decoder.prefill(prompt, np.zeros((batch,), np.int32), cache_len)
        times = []
        for step in range(WARMUP + reps):
            token = np.asarray(np.argmax(logits, axis=-1), np.int32)
            began = time.perf_counter()
            logits, cache, _ = decoder.step(token, cache)
            jax.block_until_ready(logits)
            if step >= WARMUP:
                times.append(time.perf_counter() - began)
        median = float(np.median(times))
        result["steps"][batch] = {
            "median_ms": 1e3 * median,
            "min_ms": 1e3 * float(np.min(times)),
            "tokens_per_s": batch / median,
        }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("T", "S"), default="T")
    parser.add_argument("--batch-sizes", default="1,8,64,512")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    device = jax.devices()[0]
    machine = (
        f"{device.platform} ({device.device_kind}), {os.cpu_count()} cores, "
        f"python {platform.python_version()}; jax {jax.__version__}"
    )
    results = {
        kind: measure(kind, args.family, batch_sizes, args.prompt_len, args.reps) for kind in KINDS
    }
    for kind in KINDS:
        for batch in batch_sizes:
            row = results[kind]["steps"][batch]
            row["x_dense"] = row["median_ms"] / results["dense"]["steps"][batch]["median_ms"]
    if args.json:
        print(json.dumps({"machine": machine, "family": args.family, "results": results}))
        return 0
    print(
        f"Cached decode step, {args.family} family, prompt {args.prompt_len}; median of "
        f"{args.reps} after {WARMUP} warmup\nmachine: {machine}\n"
    )
    print("| model | batch | median ms | min ms | tokens/s | step × dense |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in KINDS:
        for batch in batch_sizes:
            row = results[kind]["steps"][batch]
            print(
                f"| {results[kind]['name']} | {batch} | {row['median_ms']:.2f} | "
                f"{row['min_ms']:.2f} | {row['tokens_per_s']:,.0f} | {row['x_dense']:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
