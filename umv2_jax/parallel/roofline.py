"""Roofline step-time estimate of a compiled step on a named chip, from its per-step costs.

    cost = hlo.step_cost(compiled.as_text())          # per device, loop bodies × their trips
    estimate = roofline(cost, hardware.chip("v5p"), model_flops=6.1e13)
    estimate.seconds, estimate.bound                   # max of the three terms, and which one

Three lower bounds on one step's time on one chip, each its work over the chip's peak rate
(`umv2_jax.hardware`, datasheet numbers):

    compute      FLOPs / peak bf16 FLOP/s; FLOPs = max(the HLO's dot and convolution FLOPs, the
                 accounting's model FLOPs for the chip's tokens), because the HLO count cannot see
                 inside custom calls (Pallas kernels) and the model count ignores recomputation
    memory       HBM bytes / HBM bandwidth (operand + result bytes of every unfused instruction)
    collectives  collective bytes / ICI (or NVLink) bandwidth in one direction, every kind summed

`seconds` is the largest (perfect overlap of the other two behind it) and `bound` names it;
`serial_seconds` is the sum (no overlap). Peaks are never reached, so both are optimistic: a real
step is slower, and a compute-bound estimate at peak is the MFU-100% time.
"""

from __future__ import annotations

import dataclasses

from umv2_jax.hardware import Chip
from umv2_jax.parallel.hlo import StepCost

TERMS = ("compute", "memory", "collectives")


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Seconds per step of each term on `chip`, their max (`seconds`, `bound`) and sum."""

    chip: str
    flops: float  # what the compute term used (per chip)
    hbm_bytes: float
    collective_bytes: float
    terms: dict[str, float]  # TERMS → seconds

    @property
    def seconds(self) -> float:
        return max(self.terms.values())

    @property
    def bound(self) -> str:
        return max(TERMS, key=lambda term: self.terms[term])

    @property
    def serial_seconds(self) -> float:
        return sum(self.terms.values())

    def as_dict(self) -> dict:
        return {
            "chip": self.chip,
            "flops": self.flops,
            "hbm_bytes": self.hbm_bytes,
            "collective_bytes": self.collective_bytes,
            "terms_s": dict(self.terms),
            "seconds": self.seconds,
            "serial_seconds": self.serial_seconds,
            "bound": self.bound,
        }


def roofline(cost: StepCost, chip: Chip, *, model_flops: float = 0.0) -> Roofline:
    """The three terms of `cost` (one device's step) on `chip`; model_flops: the accounting's
    training FLOPs for the tokens one chip processes per step (0 to use the HLO count alone)."""
    flops = max(cost.flops, model_flops)
    collective = float(sum(cost.collective_bytes.values()))
    terms = {
        "compute": flops / chip.peak_bf16_flops,
        "memory": cost.hbm_bytes / chip.hbm_bytes_per_s,
        "collectives": collective / chip.ici_bytes_per_s,
    }
    return Roofline(chip.name, flops, cost.hbm_bytes, collective, terms)
