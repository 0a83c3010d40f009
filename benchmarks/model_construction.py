"""Time building a config's model: eagerly (`Transformer(config, nnx.Rngs(seed))`) vs `build_model`.

    python benchmarks/model_construction.py configs/tiny_umv2.yaml eager
    python benchmarks/model_construction.py configs/tiny_umv2.yaml fast

Run the two modes back to back in fresh processes (each pays its own compiles); prints one line.
"""

import sys
import time

import jax
from flax import nnx

from umv2_jax.config import load_config
from umv2_jax.models.build import build_model
from umv2_jax.models.transformer import Transformer


def main() -> None:
    config = load_config(sys.argv[1])
    mode = sys.argv[2] if len(sys.argv) > 2 else "fast"
    start = time.perf_counter()
    if mode == "eager":
        model = Transformer(config.model, nnx.Rngs(config.train.seed))
    else:
        model = build_model(config)
    jax.block_until_ready(nnx.state(model))
    print(f"{sys.argv[1]} {mode}: built in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
