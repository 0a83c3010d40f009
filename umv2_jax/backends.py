"""Quiet CPU start-up: on a Linux host with no accelerator, JAX is told to use only its CPU backend.

With libtpu installed (the `test` and `tpu` extras) or a CUDA plugin (`gpu`), JAX tries every
installed backend at its first `jax.devices()`; on a machine without that hardware the attempt can
print the plugin's initialisation errors (libtpu's metadata queries, "Unable to initialize backend")
before falling back to the CPU. `umv2_jax/__init__.py` calls `pin_cpu_without_accelerators()`
before anything imports JAX's backends, so importing the package on a CPU machine is silent
whatever extras are installed.

The choice, made once per process and only when nobody chose a platform already:
    - JAX_PLATFORMS set (or `jax_platforms` configured): left alone, the user decided.
    - UMV2_KEEP_PLATFORMS=1: left alone (opt out).
    - not Linux: left alone (no device nodes to read; macOS's Metal plugin has none).
    - an accelerator present: /dev/accel* or /dev/vfio (TPU VMs), /dev/nvidia* (CUDA), /dev/kfd
      (ROCm), or a TPU environment variable (TPU_NAME, TPU_ACCELERATOR_TYPE, TPU_WORKER_ID, …,
      which TPU VMs, launchers and compile-only libtpu setups set): left alone.
    - otherwise: jax_platforms = "cpu" (through JAX_PLATFORMS before JAX is imported, so child
      processes of this one, on the same host, start quietly too; through jax.config if JAX was
      imported but has not started a backend). libtpu can still describe a TPU topology for
      ahead-of-time compiles (`python -m umv2_jax.aot --topology ...`): that path does not need
      a TPU backend.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterable, Mapping

# Variables that mean "a TPU is meant to be used here", set on TPU VMs, by launchers, or by a
# compile-only libtpu setup (umv2_jax.aot.TPU_COMPILE_ENV, pallas_kernels.testing.TPU_COMPILE_ENV).
# Not TPU_SKIP_MDS_QUERY: JAX itself sets it at import on a host without TPU chips.
TPU_ENV = (
    "TPU_NAME",
    "TPU_ACCELERATOR_TYPE",
    "TPU_WORKER_ID",
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_BOUNDS",
    "TPU_CHIPS_PER_PROCESS_BOUNDS",
    "CLOUD_TPU_TASK_ID",
)
# Device nodes of accelerators JAX can drive.
DEVICE_PATTERNS = ("/dev/accel*", "/dev/vfio/*", "/dev/nvidia*", "/dev/kfd")
OPT_OUT = "UMV2_KEEP_PLATFORMS"


def only_cpu(environ: Mapping[str, str], device_nodes: Iterable[str], platform: str) -> bool:
    """Whether this host should run JAX on its CPU backend alone (module docstring's rules).

    environ: the process environment; device_nodes: the paths matching DEVICE_PATTERNS;
    platform: `sys.platform`."""
    if environ.get("JAX_PLATFORMS") or environ.get(OPT_OUT, "") not in ("", "0"):
        return False
    if not platform.startswith("linux"):
        return False
    if any(environ.get(name) for name in TPU_ENV):
        return False
    return not any(True for _ in device_nodes)


def device_nodes() -> list[str]:
    """The accelerator device nodes of this host (paths matching DEVICE_PATTERNS)."""
    return [path for pattern in DEVICE_PATTERNS for path in glob.glob(pattern)]


def pin_cpu_without_accelerators() -> str | None:
    """Apply the choice to this process; "cpu" when it pinned JAX to the CPU, else None."""
    if not only_cpu(os.environ, device_nodes(), sys.platform):
        return None
    jax = sys.modules.get("jax")
    if jax is None:
        os.environ["JAX_PLATFORMS"] = "cpu"
        return "cpu"
    from jax._src import xla_bridge  # already imported: no extra cost

    if jax.config.jax_platforms or xla_bridge.backends_are_initialized():
        return None  # chosen in code, or too late to choose: leave it
    jax.config.update("jax_platforms", "cpu")
    return "cpu"
