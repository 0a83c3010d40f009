"""Compile time of the S-umv2 training step against depth, with and without scan over layers.

    python benchmarks/compile_time.py                    # table: 4, 16, 32 blocks
    python benchmarks/compile_time.py --blocks 4 32 --json

For each depth the real training step (`umv2_jax.training.step.make_train_step`: forward, backward,
AdamW update) of configs/eval/s_umv2.yaml is traced, lowered and compiled for abstract inputs
(`jax.ShapeDtypeStruct`, nothing is allocated), once with `model.scan_layers=false` (a Python loop:
one copy of the block per layer in the program) and once with `model.scan_layers=true` (one
`lax.scan` over the stacked blocks). Printed: seconds to trace + lower, to compile, and the total as
a ratio against the 4-block build of the same mode, measured in this process. The issue's target:
32 blocks compile within 1.5× of 4 blocks when scanned.

On a checkout without `model.scan_layers` (before scan over layers landed) only the loop is measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import jax
import numpy as np
from flax import nnx

from umv2_jax.config import load_config
from umv2_jax.errors import ConfigError
from umv2_jax.models.transformer import Transformer
from umv2_jax.training.optimizer import make_optimizer, parameter_labels

try:  # the module that holds ModelParts moved once; support both layouts for before/after runs
    from umv2_jax.training.state import ModelParts
except ImportError:  # pragma: no cover - older checkouts
    from umv2_jax.training.step import ModelParts
from umv2_jax.training.step import make_train_step

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "eval", "s_umv2.yaml")


def measure(blocks: int, scan: bool | None) -> dict[str, float]:
    """Seconds to trace + lower and to compile the S-umv2 train step with `blocks` blocks."""
    overrides = [f"model.num_layers={blocks}"]
    if scan is not None:
        overrides.append(f"model.scan_layers={str(scan).lower()}")
    config = load_config(CONFIG, overrides)
    abstract = nnx.eval_shape(lambda: Transformer(config.model, nnx.Rngs(0)))
    parts, params, rest = ModelParts.split(abstract)
    optimizer = make_optimizer(config, parameter_labels(nnx.state(abstract, nnx.Param)))
    opt_state = jax.eval_shape(optimizer.init, params)
    shape = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    state = {
        "params": shape(params),
        "opt_state": opt_state,
        "step": jax.ShapeDtypeStruct((), np.int32),
    }
    batch_shape = (config.train.batch_size, config.data.seq_len)
    batch = {
        "inputs": jax.ShapeDtypeStruct(batch_shape, np.int32),
        "targets": jax.ShapeDtypeStruct(batch_shape, np.int32),
        "loss_mask": jax.ShapeDtypeStruct(batch_shape, np.float32),
    }
    step = jax.jit(
        make_train_step(parts, optimizer, config.train.micro_batches, config.train.seed),
        donate_argnums=(0,),
    )
    start = time.perf_counter()
    lowered = step.trace(state, shape(rest), batch).lower()
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {"lower_s": lowered_at - start, "compile_s": done - lowered_at, "total_s": done - start}


def scan_supported() -> bool:
    try:
        load_config(None, ["model.scan_layers=true"])
    except ConfigError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)  # measure real compiles
    modes = [("loop", False), ("scan", True)] if scan_supported() else [("loop", None)]
    results: dict[str, dict[int, dict[str, float]]] = {}
    for label, scan in modes:
        results[label] = {blocks: measure(blocks, scan) for blocks in args.blocks}
    base = args.blocks[0]
    if args.json:
        summary = {
            label: {
                str(blocks): {**r, "over_base": r["total_s"] / rows[base]["total_s"]}
                for blocks, r in rows.items()
            }
            for label, rows in results.items()
        }
        print(json.dumps({"base_blocks": base, "results": summary}))
        return 0
    print(f"S-umv2 train step: trace + lower + compile, abstract inputs; ratio vs {base} blocks")
    print(
        f"machine: {jax.default_backend()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}; jax {jax.__version__}; {datetime.date.today()}"
    )
    print()
    print("| mode | blocks | lower s | compile s | total s | × base |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, rows in results.items():
        for blocks, r in rows.items():
            ratio = r["total_s"] / rows[base]["total_s"]
            print(
                f"| {label} | {blocks} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | "
                f"{r['total_s']:.1f} | {ratio:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
