"""Building a config's model fast: its whole initialisation as one compiled program.

    model = build_model(config)            # a Config (seed: config.train.seed) or a ModelConfig
    logits, aux = model(tokens)            # tokens int32 [batch, seq] → logits [batch, seq, vocab]

`Transformer(config, nnx.Rngs(seed))` run eagerly dispatches every initializer op by op (the tiny
config: ~94 separate XLA compiles, the `paper` init calibration among them). `build_model` traces the
same constructor twice, once for shapes (`nnx.eval_shape`, nothing computed) and once inside one
`jax.jit` that returns the state, calibration included (`memory_init.calibration_scope`), and
merges the two: the same RNG streams as `Transformer(config, nnx.Rngs(seed))`, one compile.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from umv2_jax.config import Config, ModelConfig
from umv2_jax.models import memory_init
from umv2_jax.models.transformer import Transformer

_CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def compile_once(jitted: Any, *args: Any) -> Any:
    """`jitted` lowered for `args` and compiled for a program that runs once (an initialisation).

    Its compile is most of its cost: on CPU, XLA's backend optimisation level 1 compiles it 1.5x
    faster with bit-identical parameters (`python benchmarks/model_construction.py CONFIG levels`:
    default config 5.34 vs 3.60 s, tiny_umv2 3.42 vs 2.26 s, 2-core VM, load 1.5; bit-identical
    also with the same command on configs/eval/{t_umv2,t_moe,t_engram,t_dense,s_umv2}.yaml and on
    tiny_umv2 with `--set model.sparse=` pkm, peer, memory_plus, ultramem, moe, engram and
    `model.memory.init=release`); level 0 changes the bits. Accelerators compile with their defaults. Used by
    `build_model`, the trainer's `state.build` and the comparison runner.
    """
    options = _CPU_INIT_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None
    return jitted.lower(*args).compile(compiler_options=options)


def build_model(config: Config | ModelConfig, seed: int | None = None) -> Transformer:
    """The initialised `Transformer` of `config`, built by one compiled program.

    config: a `Config` (its `model`; the seed defaults to `config.train.seed`, the seed training
        initialises with) or a `ModelConfig` (the seed defaults to 0).
    seed:   the `nnx.Rngs` seed: the parameters equal `Transformer(model, nnx.Rngs(seed))`'s.
    Returns a model on the default device: tokens int32 [batch, seq] → (logits fp32
    [batch, seq, padded_vocab], ModelAux). A `paper` memory init logs its calibration.
    """
    model = config.model if isinstance(config, Config) else config
    if seed is None:
        seed = config.train.seed if isinstance(config, Config) else 0

    def construct() -> Transformer:
        return Transformer(model, nnx.Rngs(seed))

    graphdef, _ = nnx.split(nnx.eval_shape(construct))
    state = compile_once(jax.jit(lambda: nnx.split(construct())[1]))()
    built = nnx.merge(graphdef, state)
    shared = getattr(built, "shared", None)
    record = getattr(shared, "calibration", None)
    if record is not None:
        result = memory_init.Calibration(
            gain=float(record.gain[...]),
            raw_mean_score=float(record.raw_mean_score[...]),
            mean_score=float(record.mean_score[...]),
            sigma_s=float(record.sigma_s[...]),
            value_std=float(record.value_std[...]),
            tokens=int(record.tokens[...]),
        )
        memory_init.check_calibration(result.raw_mean_score)
        memory_init.log_calibration(result)
    return built
