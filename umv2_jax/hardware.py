"""Published peaks of the accelerators this project plans for: FLOPs, HBM, bandwidths.

    chip = hardware.chip("v5p")                   # by short name
    chip = hardware.chip_for_device(jax.devices()[0])   # by the device's `device_kind`; None on CPU
    mfu = flops_per_s / chip.peak_bf16_flops

These are vendor datasheet numbers (dense bf16 matmul, no sparsity), used for MFU in the trainer and
for the roofline step-time estimate of `umv2_jax.aot`. They are peaks, not measurements: a roofline
built on them is a lower bound on step time. `ici_bytes_per_s` is the per-chip interconnect
bandwidth in one direction (TPU ICI; NVLink for GPUs), the denominator of a collective-bytes bound.

Sources (checked 2026-12):
- TPU v4, v5e, v5p, v6e: Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4,
  /v5e, /v5p, /v6e): bf16 peak TFLOPs, HBM capacity and bandwidth, ICI bandwidth per chip
  (Gbps / 8; the pages give the bidirectional total, halved here for one direction).
- A100, H100, H200, B200: NVIDIA datasheets (SXM parts): dense BF16 Tensor Core TFLOPs, HBM capacity
  and bandwidth, NVLink bandwidth per GPU (bidirectional total, halved here).
"""

from __future__ import annotations

import dataclasses

_T = 1e12
_G = 1e9


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator's peaks. Bytes and FLOPs are per chip (per GPU), per second where a rate."""

    name: str
    peak_bf16_flops: float  # dense bf16 matmul FLOP/s
    hbm_bytes: float  # HBM capacity
    hbm_bytes_per_s: float  # HBM bandwidth
    ici_bytes_per_s: float  # interconnect, one direction (ICI or NVLink)
    kind: str  # "tpu" or "gpu"


CHIPS: dict[str, Chip] = {
    chip.name: chip
    for chip in (
        Chip("v4", 275 * _T, 32 * _G, 1200 * _G, 2400 / 8 / 2 * _G, "tpu"),
        Chip("v5e", 197 * _T, 16 * _G, 819 * _G, 1600 / 8 / 2 * _G, "tpu"),
        Chip("v5p", 459 * _T, 95 * _G, 2765 * _G, 4800 / 8 / 2 * _G, "tpu"),
        Chip("v6e", 918 * _T, 32 * _G, 1640 * _G, 3584 / 8 / 2 * _G, "tpu"),
        Chip("a100", 312 * _T, 80 * _G, 2039 * _G, 600 / 2 * _G, "gpu"),
        Chip("h100", 989 * _T, 80 * _G, 3350 * _G, 900 / 2 * _G, "gpu"),
        Chip("h200", 989 * _T, 141 * _G, 4800 * _G, 900 / 2 * _G, "gpu"),
        Chip("b200", 2250 * _T, 180 * _G, 8000 * _G, 1800 / 2 * _G, "gpu"),
    )
}

# `jax.Device.device_kind` substrings → chip name (most specific first).
_DEVICE_KINDS = (
    ("h200", "h200"),
    ("h100", "h100"),
    ("a100", "a100"),
    ("b200", "b200"),
    ("tpu v5 lite", "v5e"),
    ("tpu v5e", "v5e"),
    ("tpu v5p", "v5p"),
    ("tpu v5", "v5p"),
    ("tpu v6 lite", "v6e"),
    ("tpu v6e", "v6e"),
    ("tpu v4", "v4"),
)


def chip(name: str) -> Chip:
    """The chip called `name` (case-insensitive: v4, v5e, v5p, v6e, a100, h100, h200, b200)."""
    key = name.strip().lower()
    if key not in CHIPS:
        raise KeyError(f"unknown chip {name!r}; known: {', '.join(sorted(CHIPS))}")
    return CHIPS[key]


def chip_for_kind(device_kind: str) -> Chip | None:
    """The chip whose `device_kind` string this is, or None (CPU, or a kind not in the table)."""
    text = device_kind.lower()
    for needle, name in _DEVICE_KINDS:
        if needle in text:
            return CHIPS[name]
    return None


def chip_for_device(device) -> Chip | None:
    """The chip of a `jax.Device`, or None where its peaks are unknown (CPU: MFU is n/a)."""
    if getattr(device, "platform", "cpu") == "cpu":
        return None
    return chip_for_kind(getattr(device, "device_kind", ""))
