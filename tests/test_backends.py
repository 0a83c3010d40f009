"""Quiet CPU start-up (umv2_jax/backends.py): the decision, and a fresh interpreter's stderr."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from umv2_jax import backends

REPO = Path(__file__).resolve().parents[1]
# What an accelerator plugin's start-up prints when it finds no hardware.
NOISE = re.compile(r"libtpu|\bTPU\b|tpu backend|CUDA|cuda|Unable to initialize backend", re.I)


@pytest.mark.parametrize(
    "environ, nodes, platform, expected",
    [
        ({}, [], "linux", True),  # a plain CPU host
        ({"JAX_PLATFORMS": "cuda"}, [], "linux", False),  # the user chose
        ({"UMV2_KEEP_PLATFORMS": "1"}, [], "linux", False),  # opted out
        ({"UMV2_KEEP_PLATFORMS": "0"}, [], "linux", True),
        ({}, ["/dev/accel0"], "linux", False),  # TPU VM
        ({}, ["/dev/vfio/0"], "linux", False),  # TPU v5e/v6e
        ({}, ["/dev/nvidia0", "/dev/nvidiactl"], "linux", False),  # CUDA
        ({}, ["/dev/kfd"], "linux", False),  # ROCm
        ({"TPU_ACCELERATOR_TYPE": "v5litepod-4"}, [], "linux", False),  # compile-only libtpu
        ({"TPU_NAME": "my-tpu"}, [], "linux", False),
        ({"TPU_SKIP_MDS_QUERY": "1"}, [], "linux", True),  # set by JAX itself on CPU hosts
        ({}, [], "darwin", False),  # Metal has no device node to read
    ],
)
def test_only_cpu(environ, nodes, platform, expected):
    assert backends.only_cpu(environ, nodes, platform) is expected


def test_the_device_patterns_cover_the_nodes_the_decision_knows():
    assert {"/dev/accel*", "/dev/vfio/*", "/dev/nvidia*", "/dev/kfd"} == set(
        backends.DEVICE_PATTERNS
    )


PROGRAM = """
import json, sys
if sys.argv[1] == "jax_first":
    import jax
import umv2_jax
import jax
devices = jax.devices()
print(json.dumps({"backend": jax.default_backend(), "platforms": jax.config.jax_platforms}))
"""


def _plain_shell_env() -> dict:
    """This process's environment as a user's shell would have it: no platform choice, no TPU
    variables, the repository importable."""
    drop = {"JAX_PLATFORMS", "XLA_FLAGS", backends.OPT_OUT, *backends.TPU_ENV, "TPU_SKIP_MDS_QUERY"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(REPO)
    return env


@pytest.mark.parametrize("order", ["umv2_jax_first", "jax_first"])
def test_a_cpu_host_starts_without_plugin_noise(order, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-c", PROGRAM, order],
        capture_output=True,
        text=True,
        timeout=300,
        env=_plain_shell_env(),
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    noise = [line for line in completed.stderr.splitlines() if NOISE.search(line)]
    assert noise == []
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    if not backends.device_nodes():  # this host has no accelerator: JAX was pinned to its CPU
        assert report == {"backend": "cpu", "platforms": "cpu"}
    else:  # an accelerator host: left to JAX
        assert report["platforms"] in (None, "")
