"""Forward + backward time and peak memory of one sparse block against the dense FFN it replaces.

    python benchmarks/layer_step.py                 # table
    python benchmarks/layer_step.py --json          # one JSON object: umv2_over_dense,
                                                    # moe_over_dense, umv2_over_moe, peaks in bytes

The blocks are the FFN slot of the S-size models of docs/evaluation.md (d = 128), fed the same normalized input
u: [tokens, d] and differentiated w.r.t. every parameter and u, as in a training step:

    dense   SwiGLU 512
    moe     64 experts × SwiGLU 64, top-8, dropless (replaces the FFN)
    umv2    SwiGLU 416 + UltraMemV2 (n 146, D_k 32, r 2, C 2, k = m = 16, D_v 48, D_p 16, 1 head),
            reading a stack of 4 layers' value tables as a model's layer 0 does
    umv2_diagnostics  the same with `SparseContext(diagnostics=True)`: the per-row hit scatter and
            rows-hit fraction that every training step computed before they became eval-only

Each step returns the block's metrics (and hit masks) beside the gradients, as a training step
returns them for logging, so work on them is timed, not dead code.

Time is the median over `--reps` timed steps after `--warmup` untimed ones, the blocks interleaved so
that load on the machine hits both alike. Peak memory is XLA's compiled memory analysis of the step
(arguments + outputs + temporaries − aliased). The umv2 row also reports whether the backward keeps any
residual shaped like the gathered values [T, m, D_v] (the value_bag op must not).

Add a block by adding a builder to BLOCKS: `builder(tokens) -> Block`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from umv2_jax.config import MemoryConfig, ModelConfig, MoEConfig
from umv2_jax.models.moe import MoE
from umv2_jax.models.sparse import SparseContext
from umv2_jax.models.transformer import SwiGLU
from umv2_jax.models.ultramem_v2 import MemoryTables, UltraMemV2

D_MODEL = 128


@dataclasses.dataclass
class Block:
    """One block under test.

    params: the trainable parameters (a pytree); apply(params, u [T, d]) → y [T, d].
    gathered: gathered(params, u) → the table rows the block reads for u, e.g. [T, m, D_v]; a backward
              residual equal to one of them (in any row-major reshape) means gathered rows were saved.
    """

    name: str
    description: str
    params: Any
    apply: Callable[[Any, jax.Array], jax.Array]
    gathered: Callable[[Any, jax.Array], list[jax.Array]] | None = None


def small_config(d_ff: int, **memory: Any) -> ModelConfig:
    """The S-size backbone of docs/evaluation.md with a given FFN width and memory fields."""
    return ModelConfig(
        d_model=D_MODEL,
        num_layers=4,
        num_heads=4,
        d_ff=d_ff,
        sparse="ultramem_v2" if memory else "none",
        memory=MemoryConfig(**memory) if memory else MemoryConfig(),
    )


def build_dense(tokens: int) -> Block:
    config = small_config(512)
    graphdef, params = _init(lambda: SwiGLU(config, 512, nnx.Rngs(0)))
    return Block(
        name="dense",
        description="SwiGLU 512",
        params=params,
        apply=lambda p, u: nnx.merge(graphdef, p)(u),
    )


def build_umv2(tokens: int, diagnostics: bool = False) -> Block:
    memory = dict(
        n_keys=146,
        key_dim=32,
        tucker_rank=2,
        n_cores=2,
        rc_topk=16,
        topk=16,
        heads=1,
        value_dim=48,
        pre_value_dim=16,
        init="paper",
    )
    config = small_config(416, **memory)
    config.validate()

    def make():
        rngs = nnx.Rngs(0)
        return SwiGLU(config, 416, rngs), UltraMemV2(config, 0, rngs), MemoryTables(config, rngs)

    graphdef, params, rest = _init(make, split_params=True)

    def apply(p, u):
        ffn, layer, tables = nnx.merge(graphdef, p, rest)
        out = layer(u, SparseContext(shared=tables, diagnostics=diagnostics))
        # The step returns the layer's metrics (and hit masks) as a training step logs them.
        return ffn(u) + out.y, {"metrics": out.metrics, "row_hits": out.row_hits}

    def gathered(p, u):
        _, layer, tables = nnx.merge(graphdef, p, rest)
        result = layer.retrieval(u, implementation=config.memory.implementation)
        rows, _, _ = layer.physical_rows(result.grid_indices)  # [H, T, m]
        rows = rows.transpose(1, 0, 2).reshape(u.shape[0], -1)
        return [
            table[...].reshape(-1, table.shape[-1])[rows]
            for table in (tables.values, tables.pre_values)
        ]

    return Block(
        name="umv2_diagnostics" if diagnostics else "umv2",
        description="SwiGLU 416 + UltraMemV2 n 146, D_k 32, r 2, m 16, D_v 48, D_p 16 (4 tables)"
        + (", with the eval-only row-hit diagnostics" if diagnostics else ""),
        params=params,
        apply=apply,
        gathered=gathered,
    )


def build_moe(tokens: int) -> Block:
    """S-moe: 64 experts × SwiGLU 64, top-8, dropless, replacing the FFN (block_padded on CPU)."""
    config = dataclasses.replace(
        small_config(0),
        sparse="moe",
        moe=MoEConfig(num_experts=64, top_k=8, expert_d_ff=64),
    )
    config.validate()
    graphdef, params = _init(lambda: MoE(config, nnx.Rngs(0)))

    def apply(p, u):
        out = nnx.merge(graphdef, p)(u[None], SparseContext())
        return out.y[0] + sum(out.losses.values())

    return Block(
        name="moe",
        description=f"64 experts × SwiGLU 64, top-8 ({config.moe.implementation}: "
        f"{_moe_implementation(config)}, block {config.moe.block_size})",
        params=params,
        apply=apply,
    )


def _moe_implementation(config: ModelConfig) -> str:
    """What the MoE dispatch op runs first on the platform this benchmark runs on."""
    from umv2_jax.ops import registry

    platform = {"gpu": "cuda"}.get(jax.devices()[0].platform, jax.devices()[0].platform)
    return registry.resolve("moe_dispatch", config.moe.implementation)[platform][0]


# Builders by name; the first is the baseline every ratio is taken against.
BLOCKS: dict[str, Callable[[int], Block]] = {
    "dense": build_dense,
    "moe": build_moe,
    "umv2": build_umv2,
    # What every training step computed before the row-hit scatter became evaluation-only.
    "umv2_diagnostics": functools.partial(build_umv2, diagnostics=True),
}


def measure(blocks: list[Block], tokens: int, warmup: int, reps: int) -> dict[str, dict[str, Any]]:
    """Median step time (s), peak and temp bytes, and gathered residuals of every block."""
    rng = np.random.default_rng(0)
    u = jnp.asarray(rng.standard_normal((tokens, D_MODEL)), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal((tokens, D_MODEL)), jnp.float32)
    steps, results = {}, {}
    for block in blocks:

        def loss(params, u, block=block):
            y, extras = _with_extras(block.apply(params, u))
            return jnp.sum(y * cotangent), extras

        step = jax.grad(loss, argnums=(0, 1), has_aux=True)
        compiled = jax.jit(step).lower(block.params, u).compile()
        analysis = compiled.memory_analysis()
        peak = (
            analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes
            - analysis.alias_size_in_bytes
        )
        steps[block.name] = compiled
        results[block.name] = {
            "description": block.description,
            "params": int(sum(x.size for x in jax.tree_util.tree_leaves(block.params))),
            "peak_bytes": int(peak),
            "temp_bytes": int(analysis.temp_size_in_bytes),
            "gathered_residuals": _gathered_residuals(loss, block, u),
            "times": [],
        }
    for _ in range(warmup):
        for block in blocks:
            jax.block_until_ready(steps[block.name](block.params, u))
    for _ in range(reps):
        for block in blocks:
            start = time.perf_counter()
            jax.block_until_ready(steps[block.name](block.params, u))
            results[block.name]["times"].append(time.perf_counter() - start)
    for result in results.values():
        result["median_s"] = statistics.median(result["times"])
        result["min_s"] = min(result["times"])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument(
        "--blocks", default=",".join(BLOCKS), help="comma-separated, baseline first"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    names = args.blocks.split(",")
    unknown = [n for n in names if n not in BLOCKS]
    if unknown:
        parser.error(f"unknown block(s) {unknown}; available: {', '.join(BLOCKS)}")
    blocks = [BLOCKS[name](args.tokens) for name in names]
    results = measure(blocks, args.tokens, args.warmup, args.reps)
    baseline = results[names[0]]
    summary: dict[str, Any] = {
        "tokens": args.tokens,
        "reps": args.reps,
        "machine": _machine(),
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "baseline": names[0],
    }
    for name, result in results.items():
        summary[f"{name}_median_s"] = result["median_s"]
        summary[f"{name}_peak_bytes"] = result["peak_bytes"]
        summary[f"{name}_temp_bytes"] = result["temp_bytes"]
        summary[f"{name}_params"] = result["params"]
        summary[f"{name}_gathered_residuals"] = result["gathered_residuals"]
        if name != names[0]:
            summary[f"{name}_over_{names[0]}"] = result["median_s"] / baseline["median_s"]
    if "umv2" in results and "moe" in results:
        summary["umv2_over_moe"] = results["umv2"]["median_s"] / results["moe"]["median_s"]
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"Sparse-block step (forward + backward), {args.tokens} tokens, d = {D_MODEL}; "
        f"median of {args.reps} after {args.warmup} warmup"
    )
    print(f"machine: {summary['machine']}; jax {jax.__version__}; {summary['date']}")
    print()
    print("| block | what | params | median ms | min ms | × dense | peak MiB | temp MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, result in results.items():
        print(
            f"| {name} | {result['description']} | {result['params']:,} | "
            f"{1e3 * result['median_s']:.1f} | {1e3 * result['min_s']:.1f} | "
            f"{result['median_s'] / baseline['median_s']:.2f} | "
            f"{result['peak_bytes'] / 2**20:.1f} | {result['temp_bytes'] / 2**20:.1f} |"
        )
    print()
    for name, result in results.items():
        if blocks[names.index(name)].gathered is not None:
            residuals = result["gathered_residuals"]
            print(f"{name}: gathered-values residuals in the backward: {residuals or 'none'}")
    return 0


def _init(make: Callable[[], Any], split_params: bool = False):
    """Builds modules in one compiled program; returns (graphdef, params[, rest])."""
    abstract = nnx.eval_shape(make)
    if split_params:
        graphdef, _, _ = nnx.split(abstract, nnx.Param, ...)
        params, rest = jax.jit(lambda: nnx.split(make(), nnx.Param, ...)[1:])()
        return graphdef, params, rest
    graphdef, _ = nnx.split(abstract)
    return graphdef, jax.jit(lambda: nnx.split(make())[1])()


def _with_extras(out) -> tuple[jax.Array, Any]:
    """A block's apply returns y or (y, extras): the step returns the extras, as a train step does."""
    return out if isinstance(out, tuple) else (out, {})


def _gathered_residuals(loss, block: Block, u) -> list[list[int]]:
    """Shapes of backward residuals that hold gathered table rows (should be empty)."""
    if block.gathered is None:
        return []
    # jax.vjp's function is a pytree whose leaves are the residuals the backward will read.
    backward = jax.jit(lambda params, u: jax.vjp(loss, params, u, has_aux=True)[1])(block.params, u)
    gathered = [np.asarray(g) for g in jax.jit(block.gathered)(block.params, u)]
    found = []
    for leaf in jax.tree_util.tree_leaves(backward):
        if not hasattr(leaf, "shape") or not jnp.issubdtype(leaf.dtype, jnp.floating):
            continue
        for rows in gathered:
            if leaf.size == rows.size and np.allclose(np.asarray(leaf).reshape(rows.shape), rows):
                found.append(list(leaf.shape))
    return found


def _machine() -> str:
    cores = os.cpu_count()
    device = jax.devices()[0]
    kind = device.device_kind if device.platform != "cpu" else platform.processor() or "cpu"
    return f"{device.platform} ({kind}), {cores} cores, python {sys.version.split()[0]}"


if __name__ == "__main__":
    sys.exit(main())
