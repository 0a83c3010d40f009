"""Choosing the implementation of a hot op: plain JAX ("xla") or a Pallas kernel ("pallas").

Every op in `umv2_jax.ops` takes `implementation: str = "auto"` and calls
`resolve_implementation(implementation, "<op name>")` once, at trace time:

    "xla"     the plain-JAX path (the reference every kernel is tested against; the CPU default)
    "pallas"  the kernel in `pallas_kernels.<op name>`; a ValueError when that package is absent
    "auto"    "pallas" on GPU/TPU when the op's kernel package exists, otherwise "xla"

Models never branch on hardware (ARCHITECTURE.md, contracts): they pass the config's choice through.
"""

from __future__ import annotations

import importlib.util

import jax

IMPLEMENTATIONS = ("auto", "xla", "pallas")

# Platforms ("jax.default_backend()") on which "auto" prefers a Pallas kernel.
_KERNEL_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")


def resolve_implementation(name: str, op_name: str) -> str:
    """Returns "xla" or "pallas" for `name` in IMPLEMENTATIONS; raises ValueError otherwise.

    A kernel counts as present when the package `pallas_kernels.<op_name>` can be found. Until it
    lands, "auto" falls back to "xla" everywhere and an explicit "pallas" is an error.
    """
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown implementation {name!r} for {op_name}; choose one of {', '.join(IMPLEMENTATIONS)}"
        )
    if name == "xla":
        return "xla"
    available = pallas_kernel_available(op_name)
    if name == "pallas":
        if not available:
            raise ValueError(
                f"implementation='pallas' needs the Pallas kernels (pallas_kernels.{op_name}), "
                "which have not landed yet; use 'xla' or 'auto'"
            )
        return "pallas"
    if available and jax.default_backend() in _KERNEL_PLATFORMS:
        return "pallas"
    return "xla"


def pallas_kernel_available(op_name: str) -> bool:
    """True when the package `pallas_kernels.<op_name>` exists (it is not imported here)."""
    try:
        return importlib.util.find_spec(f"pallas_kernels.{op_name}") is not None
    except (ImportError, ValueError):
        return False
