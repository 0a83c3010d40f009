"""Shared test helpers: where the release reference cases live (`load_release_case`), and a fresh
interpreter run that reads back a JSON line (`run_fresh`: multi-device and libtpu programs).

The cases live in the repository (`tests/release_cases/`, docs/model.md §9.7; 440 kB);
UMV2_RELEASE_FIXTURES points elsewhere. A missing case skips its tests outside CI and fails them under
CI (`CI` set), so the release-compatibility tests can never pass by being skipped.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

RELEASE_FIXTURES = Path(
    os.environ.get("UMV2_RELEASE_FIXTURES") or Path(__file__).resolve().parent / "release_cases"
)


def load_release_case(name: str):
    """The arrays of `<name>.npz` (e.g. "small_sn"), or skip (fail under CI) when it is absent."""
    path = RELEASE_FIXTURES / f"{name}.npz"
    if not path.exists():
        message = f"release fixture {path} not found (set UMV2_RELEASE_FIXTURES to its folder)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return np.load(path)


def run_fresh(
    program: str,
    *args: str,
    env: dict[str, str] | None = None,
    python: str | None = None,
    timeout: float = 600,
    stderr_tail: int = 3000,
) -> dict:
    """Run `python -c program *args` in a fresh interpreter and return its last stdout line as JSON.

    For what the suite's own process cannot do: fake CPU devices (the program sets
    `jax.config.update("jax_num_cpu_devices", N)` before JAX starts its backend), a TPU topology
    through libtpu, or a process that must start clean. `env` defaults to this process's with
    `JAX_PLATFORMS=cpu`; pass one to choose (e.g. without JAX_PLATFORMS / XLA_FLAGS for libtpu).
    A nonzero exit fails the test with the last `stderr_tail` characters of stderr.
    """
    completed = subprocess.run(
        [python or sys.executable, "-c", program, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"} if env is None else env,
    )
    assert completed.returncode == 0, completed.stderr[-stderr_tail:]
    return json.loads(completed.stdout.strip().splitlines()[-1])
