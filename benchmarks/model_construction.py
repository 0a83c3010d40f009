"""Time building a config's model: eagerly (`Transformer(config, nnx.Rngs(seed))`) vs `build_model`,
and the initialisation program's compile at XLA's default vs backend optimisation level 1.

    python benchmarks/model_construction.py configs/tiny_umv2.yaml eager
    python benchmarks/model_construction.py configs/tiny_umv2.yaml fast
    python benchmarks/model_construction.py configs/default.yaml levels [--repeats 3]
    python benchmarks/model_construction.py configs/tiny_umv2.yaml levels --set model.sparse=pkm

Run `eager` and `fast` back to back in fresh processes (each pays its own compiles); each prints one
line. `levels` compiles the initialisation program (`models.build.compile_once`'s, as the trainer
builds it) alternately with the default options and at level 1 in one process (the persistent
compilation cache off), checks that both give bit-identical parameters, and prints the median
compile times and their ratio.
"""

import argparse
import statistics
import time

import jax
import numpy as np
from flax import nnx

from umv2_jax.config import load_config
from umv2_jax.models.build import _CPU_INIT_COMPILER_OPTIONS, build_model
from umv2_jax.models.transformer import Transformer
from umv2_jax.training.state import ModelParts


def compare_levels(config, repeats: int) -> None:
    seed = config.train.seed

    def initialize():
        _, params, rest = ModelParts.split(Transformer(config.model, nnx.Rngs(seed)))
        return params, rest

    seconds: dict[str, list[float]] = {"default": [], "level 1": []}
    outputs = {}
    for _ in range(repeats):
        for name, options in (("default", None), ("level 1", _CPU_INIT_COMPILER_OPTIONS)):
            jax.clear_caches()  # JAX keeps compiled programs in memory too
            lowered = jax.jit(initialize).lower()
            start = time.perf_counter()
            compiled = lowered.compile(compiler_options=options)
            seconds[name].append(time.perf_counter() - start)
            outputs[name] = jax.tree.leaves(compiled())
    identical = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(outputs["default"], outputs["level 1"], strict=True)
    )
    median = {name: statistics.median(times) for name, times in seconds.items()}
    print(
        f"init compile, median of {repeats} ({jax.default_backend()}): default "
        f"{median['default']:.2f} s, level 1 {median['level 1']:.2f} s, default / level 1 = "
        f"{median['default'] / median['level 1']:.2f}x; parameters "
        f"{'bit-identical' if identical else 'DIFFERENT'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("mode", nargs="?", default="fast", choices=("fast", "eager", "levels"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    if args.mode == "levels":
        jax.config.update("jax_enable_compilation_cache", False)
        compare_levels(config, args.repeats)
        return
    start = time.perf_counter()
    if args.mode == "eager":
        model = Transformer(config.model, nnx.Rngs(config.train.seed))
    else:
        model = build_model(config)
    jax.block_until_ready(nnx.state(model))
    print(f"{args.config} {args.mode}: built in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
