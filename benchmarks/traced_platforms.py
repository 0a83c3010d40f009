"""Tracing the host's platform only vs every platform: one training step traced, lowered, compiled.

    python benchmarks/traced_platforms.py [configs/default.yaml] [--repeats 3] [--set key=value ...]

In one process, alternating, `--repeats` times each: the training step of the config (one device,
its own batch size) traced with every platform's op branches (`registry.lowering_platforms("all")`:
what every trace did before the registry traced the host's platform only) and with the host's
only (the default), then lowered and compiled for the host. JAX's caches are cleared before each
(the persistent compilation cache is not used). Prints the median seconds of each part and the
ratio of the totals, all / host.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from umv2_jax import parallel
from umv2_jax.config import load_config
from umv2_jax.ops import registry
from umv2_jax.training import state as state_lib
from umv2_jax.training.cli import default_config_path
from umv2_jax.training.step import make_train_step


def time_step(config, traced: tuple[str, ...]) -> dict[str, float]:
    """Seconds to trace, lower and compile `config`'s training step, tracing `traced` platforms."""
    jax.clear_caches()
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
    batch, seq = config.train.batch_size, config.data.seq_len
    with registry.lowering_platforms(*traced), parallel.use_mesh(mesh):
        layout = state_lib.plan(config, mesh)
        tokens = parallel.batch_sharding(mesh)
        spec = lambda dtype: jax.ShapeDtypeStruct((batch, seq), dtype, sharding=tokens)  # noqa: E731
        abstract = {"inputs": spec(jnp.int32), "targets": spec(jnp.int32)}
        abstract["loss_mask"] = spec(jnp.float32)
        if config.data.masks_documents:
            abstract["segment_ids"] = spec(jnp.int32)
            abstract["positions"] = spec(jnp.int32)
        step = jax.jit(
            make_train_step(
                layout.parts, layout.optimizer, config.train.micro_batches, config.train.seed
            )
        )
        start = time.perf_counter()
        traced_step = step.trace(layout.state, layout.rest, abstract)
        trace_s = time.perf_counter() - start
        start = time.perf_counter()
        lowered = traced_step.lower()
        lower_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - start
    return {"trace": trace_s, "lower": lower_s, "compile": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", nargs="*", default=[], dest="overrides")
    args = parser.parse_args()
    jax.config.update("jax_enable_compilation_cache", False)
    path = args.config or default_config_path()
    config = load_config(path, args.overrides)
    host = registry.traced_platforms()
    runs: dict[str, list[dict[str, float]]] = {"all": [], "host": []}
    for _ in range(args.repeats):
        for mode in runs:
            runs[mode].append(time_step(config, ("all",) if mode == "all" else host))
    median = {
        mode: {part: statistics.median(r[part] for r in rows) for part in rows[0]}
        for mode, rows in runs.items()
    }
    for mode, parts in median.items():
        total = sum(parts.values())
        detail = ", ".join(f"{part} {seconds:.2f} s" for part, seconds in parts.items())
        print(
            f"{mode:>4} ({'every platform' if mode == 'all' else ', '.join(host)}): {detail}; "
            f"total {total:.2f} s"
        )
    ratio = sum(median["all"].values()) / sum(median["host"].values())
    print(
        f"{path}: median of {args.repeats}, jax {jax.__version__} on {jax.default_backend()}: "
        f"all / host = {ratio:.2f}x"
    )


if __name__ == "__main__":
    main()
