"""The model of a config with abstract (shape-only) parameters, cheaply: for accounting, preflight
checks and ahead-of-time compiles, which need shapes and logical axes but never the numbers."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from umv2_jax.config import ModelConfig
from umv2_jax.models.transformer import Transformer


def abstract_model(model: ModelConfig) -> nnx.Module:
    """The Transformer of `model` with abstract (shape-only) parameters; nothing is allocated.

    The UltraMemV2 `paper` init runs a Monte-Carlo calibration while building; shapes do not depend
    on the init scheme, so the memory is built with `release` constants here.
    """
    if model.sparse == "ultramem_v2" and model.memory.init == "paper":
        model = dataclasses.replace(model, memory=dataclasses.replace(model.memory, init="release"))
    return nnx.eval_shape(lambda: Transformer(model, _ShapeOnlyRngs()))


class _ShapeOnlyRngs:
    """Stands in for `nnx.Rngs` when only shapes are wanted: every stream draws the same key.

    `nnx.Rngs` counts its draws in a Variable, and under a trace every count update costs ~10 ms of
    JAX bookkeeping: seconds for a 20-layer model. Shapes do not depend on the keys.
    """

    def __getattr__(self, stream: str):
        if stream.startswith("__"):
            raise AttributeError(stream)
        return lambda: jax.random.key(0)
