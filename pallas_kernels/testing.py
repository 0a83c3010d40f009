"""Helpers shared by every kernel's tests: poisoned outputs, strict TPU interpretation, lowering for
another platform from this host, and a real Mosaic compile for a TPU v5e from a CPU-only machine.

    poison(shape, dtype)                      NaN-filled array (int: the dtype's minimum)
    assert_written(x, name)                   fails if any element of x is still NaN
    tolerance(dtype)                          {"rtol", "atol"} per dtype for kernel-vs-reference
    tpu_interpret_params(**overrides)         pltpu.InterpretParams(detect_races=True,
                                              out_of_bounds_reads="raise", uninitialized_memory="nan")
    lower_for(fn, args, platform)             text of jax.jit(fn).trace(*args).lower(
                                              lowering_platforms=(platform,))
    tpu_python()                              a Python with libtpu importable, or None
    compile_for_tpu_v5e("module:function")    compiles every case the function returns with Mosaic
                                              and XLA:TPU for a v5e topology, in a subprocess;
                                              returns {case: {"ok", "compile_s", "tpu_custom_calls",
                                              "argument_bytes", "output_bytes", "temp_bytes",
                                              "generated_code_bytes", "error"}}

Poisoning: `uninitialized_memory="nan"` makes the TPU interpreter fill fresh output buffers with NaN,
so an element the kernel never writes fails `assert_written`. Where a kernel must be poisoned
explicitly (the GPU interpreter, or a real device), pass `poison(out.shape, out.dtype)` as an extra
input aliased to the output (`pl.pallas_call(..., input_output_aliases={k: 0})`): the buffer starts
NaN and only the kernel's writes replace it.

The compile runner needs libtpu (`pip install -e '.[test]'` on linux x86_64 installs it, or point
UMV2_TPU_PYTHON at a venv that has it). Cases are built by a
function `cases() -> [(name, fn, args)]` or `(name, fn, args, {"row_major": (0, 1)})`, args a tuple
of `jax.ShapeDtypeStruct` pytrees without a sharding (the runner places them on one v5e device; the
positions in row_major get an explicit row-major layout instead of XLA:TPU's default, which for
e.g. f32[N, 192] is column-major, see DEVELOPERS.md); several cases share one subprocess, so a test
module pays libtpu's start-up once.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from umv2_jax.ops import registry

_REPO_ROOT = Path(__file__).resolve().parent.parent
_RESULT_PREFIX = "UMV2_TPU_COMPILE_RESULT "
# What libtpu needs to build a v5e topology on a host without a TPU (no metadata server is asked).
TPU_COMPILE_ENV = {
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_SKIP_MDS_QUERY": "1",
}
V5E_TOPOLOGY = "v5e:2x2"


def poison(shape: Sequence[int], dtype: Any) -> jax.Array:
    """A NaN-filled array of `shape` (the dtype's minimum for integer dtypes)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.full(tuple(shape), jnp.nan, dtype)
    return jnp.full(tuple(shape), jnp.iinfo(dtype).min, dtype)


def assert_written(x: jax.Array, name: str = "output") -> None:
    """Raises AssertionError naming how many and which elements of `x` are NaN (never written)."""
    values = np.asarray(jnp.asarray(x, jnp.float32))
    bad = np.argwhere(np.isnan(values))
    if bad.size:
        raise AssertionError(
            f"{name}: {len(bad)} of {values.size} elements are NaN (unwritten or read out of "
            f"bounds); first at {tuple(int(i) for i in bad[0])}"
        )


def tolerance(dtype: Any) -> dict[str, float]:
    """Kernel-vs-reference tolerances: float32 tables accumulate in float32 in a different order than
    the reference's HIGHEST-precision einsum (1e-5 relative); bfloat16 outputs are rounded once to 8
    mantissa bits (2^-8 ≈ 4e-3 relative, 1e-2 leaves room for a different summation order)."""
    if jnp.dtype(dtype) == jnp.bfloat16:
        return {"rtol": 1e-2, "atol": 1e-2}
    return {"rtol": 1e-5, "atol": 1e-5}


def tpu_interpret_params(**overrides: Any):
    """The strict TPU interpreter: races detected, out-of-bounds reads raise, fresh buffers NaN.

    Slow (a vector clock per buffer access): use it on tiny shapes only.
    """
    from jax.experimental.pallas import tpu as pltpu

    options = {"detect_races": True, "out_of_bounds_reads": "raise", "uninitialized_memory": "nan"}
    return pltpu.InterpretParams(**{**options, **overrides})


def races_detected() -> bool:
    """Whether the last run under `tpu_interpret_params()` saw a data race."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call

    races = interpret_pallas_call.races
    return bool(races is not None and races.races_found)


def lower_for(fn: Callable[..., Any], args: Sequence[Any], platform: str) -> str:
    """StableHLO text of `fn(*args)` lowered for `platform` ("cpu", "cuda", "rocm", "tpu") here.

    args may be `jax.ShapeDtypeStruct`s: lowering allocates nothing, so tables of any size work.
    The ops registry traces `platform`'s branches (`registry.lowering_platforms`).
    """
    with registry.lowering_platforms(platform):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def tpu_python() -> str | None:
    """A Python interpreter that can import libtpu: UMV2_TPU_PYTHON, else this one if it can."""
    explicit = os.environ.get("UMV2_TPU_PYTHON")
    if explicit:
        return explicit
    if importlib.util.find_spec("libtpu") is not None:
        return sys.executable
    return None


def compile_for_tpu_v5e(cases: str, *, timeout: float = 1200.0) -> dict[str, dict[str, Any]]:
    """Compiles the cases of `cases` ("package.module:function") for one TPU v5e device.

    Runs `python -m pallas_kernels.testing <cases>` under `tpu_python()` with TPU_COMPILE_ENV and
    this repository first on PYTHONPATH. A case that fails to lower or compile has ok False and the
    error's text; the call itself raises RuntimeError only when the subprocess fails as a whole,
    and FileNotFoundError when no Python with libtpu exists (tests skip on that).
    """
    python = tpu_python()
    if python is None:
        raise FileNotFoundError(
            "no Python with libtpu: pip install -e '.[test]' (linux x86_64) or set UMV2_TPU_PYTHON"
        )
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env.update(TPU_COMPILE_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(_REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    process = subprocess.run(
        [python, "-m", "pallas_kernels.testing", cases],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(_REPO_ROOT),
    )
    results = {}
    for line in process.stdout.splitlines():
        if line.startswith(_RESULT_PREFIX):
            result = json.loads(line[len(_RESULT_PREFIX) :])
            results[result.pop("name")] = result
    if process.returncode != 0:
        raise RuntimeError(
            f"TPU compile subprocess for {cases} exited {process.returncode}:\n"
            f"{process.stderr[-4000:]}"
        )
    return results


def _compile_cases(cases: str) -> None:
    """Subprocess side of `compile_for_tpu_v5e`: prints one result line per case."""
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding

    module_name, function_name = cases.split(":")
    build = getattr(importlib.import_module(module_name), function_name)
    device = topologies.get_topology_desc(V5E_TOPOLOGY, platform="tpu").devices[0]
    sharding = SingleDeviceSharding(device)

    def place(x, row_major=False):
        if row_major:  # the layout a row gather needs, not XLA:TPU's padding-minimising default
            from jax.experimental.layout import Format, Layout

            layout = Layout(major_to_minor=tuple(range(len(x.shape))))
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=Format(layout, sharding))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    with registry.lowering_platforms("tpu"):  # the ops registry traces its TPU branches
        _compile_each(build(), device, place)


def _compile_each(cases, device, place) -> None:
    for name, fn, args, *extra in cases:
        row_major = set(extra[0].get("row_major", ())) if extra else set()
        result: dict[str, Any] = {
            "name": name,
            "device_kind": device.device_kind,
            # The default device stays this host's CPU, as in a user's own AOT script: the kernels
            # must not need `jax.default_device(tpu_device)` (Mosaic asks the default device for the
            # chip when lowering some ops, e.g. `sign`, hence integer `//`).
            "default_platform": jax.devices()[0].platform,
            "ok": False,
        }
        start = time.perf_counter()
        try:
            placed = tuple(
                jax.tree.map(functools.partial(place, row_major=i in row_major), a)
                for i, a in enumerate(args)
            )
            lowered = jax.jit(fn).trace(*placed).lower()
            result["tpu_custom_calls"] = lowered.as_text().count("tpu_custom_call")
            memory = lowered.compile().memory_analysis()
            result.update(
                ok=True,
                argument_bytes=int(memory.argument_size_in_bytes),
                output_bytes=int(memory.output_size_in_bytes),
                temp_bytes=int(memory.temp_size_in_bytes),
                generated_code_bytes=int(memory.generated_code_size_in_bytes),
            )
        except Exception as error:  # noqa: BLE001 - reported per case to the parent
            result["error"] = f"{type(error).__name__}: {error}"[:3000]
        result["compile_s"] = round(time.perf_counter() - start, 2)
        print(_RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    _compile_cases(sys.argv[1])
