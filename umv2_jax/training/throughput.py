"""Step time, tokens/s, MFU and device memory for the trainer's metrics and console line.

    clock = StepClock()                 # the loop's timer; compile, eval and saves are left out
    fields = throughput_fields(step_time_s=0.25, tokens_per_step=65536,
                               training_flops_per_token=1.2e9, chip=hardware.chip("h100"),
                               num_devices=8)
    # {"step_time_s": 0.25, "tokens_per_s": 262144.0, "mfu": 0.0397...}

MFU (model FLOPs utilization) = tokens/s × training FLOPs per token / (devices × peak bf16 FLOP/s),
with training FLOPs per token from `umv2_jax.eval.accounting` (3 × the forward's matmul FLOPs: the
paper convention, no recompute from `model.remat` counted) and the chip's datasheet peak from
`umv2_jax.hardware`. On CPU, or a chip not in that table, MFU is None ("n/a" on the console).
"""

from __future__ import annotations

import math
import time
from typing import Any

from umv2_jax.hardware import Chip


def mfu(
    tokens_per_s: float, training_flops_per_token: float | None, chip: Chip | None, num_devices: int
) -> float | None:
    """The fraction of `num_devices` × `chip`'s peak bf16 FLOP/s that the run's model FLOPs use;
    None without a chip (CPU) or without FLOPs per token."""
    if chip is None or not training_flops_per_token or num_devices < 1:
        return None
    return tokens_per_s * training_flops_per_token / (num_devices * chip.peak_bf16_flops)


def throughput_fields(
    step_time_s: float | None,
    tokens_per_step: int,
    training_flops_per_token: float | None,
    chip: Chip | None,
    num_devices: int,
) -> dict[str, float | None]:
    """metrics.jsonl's `step_time_s` (seconds per step), `tokens_per_s` and `mfu` (None: n/a).
    `step_time_s` None (a window with only compiling steps) gives None everywhere."""
    if step_time_s is None or step_time_s <= 0:
        return {"step_time_s": None, "tokens_per_s": None, "mfu": None}
    rate = tokens_per_step / step_time_s
    return {
        "step_time_s": step_time_s,
        "tokens_per_s": rate,
        "mfu": mfu(rate, training_flops_per_token, chip, num_devices),
    }


def memory_fields(devices) -> dict[str, Any]:
    """Device memory from `Device.memory_stats()`: the most any local device has in use and its
    peak (bytes), and the per-device list; None where the backend reports nothing (CPU)."""
    in_use, peak = [], []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if not stats or "bytes_in_use" not in stats:
            return {
                "memory_bytes_in_use": None,
                "memory_peak_bytes": None,
                "memory_bytes_in_use_per_device": None,
            }
        in_use.append(int(stats["bytes_in_use"]))
        peak.append(int(stats.get("peak_bytes_in_use", stats["bytes_in_use"])))
    if not in_use:
        return {
            "memory_bytes_in_use": None,
            "memory_peak_bytes": None,
            "memory_bytes_in_use_per_device": None,
        }
    return {
        "memory_bytes_in_use": max(in_use),
        "memory_peak_bytes": max(peak),
        "memory_bytes_in_use_per_device": in_use,
    }


def console(fields: dict[str, Any]) -> dict[str, str]:
    """The progress bar's step time / tok/s / MFU ("n/a" where a field is None)."""
    step, rate, used = fields.get("step_time_s"), fields.get("tokens_per_s"), fields.get("mfu")
    return {
        "step": "n/a" if step is None else f"{step:.3g}s",
        "tok_s": "n/a" if rate is None else f"{rate:,.0f}",
        "mfu": "n/a" if used is None else f"{100 * used:.1f}%",
    }


class StepClock:
    """Wall time of training steps only: a window opens after the last thing that was not a step
    (start-up, a flush of metrics, an evaluation, a save) and closes when the loop fetches the
    window's metrics (which waits for the device). Steps that compiled (the first step; a
    recompile) are timed on their own, to completion, and left out of the window.

    The loop calls `restart()` after anything that is not a step, `step_started()` /
    `step_finished(compiled, wait)` around each dispatch, and `close()` at a flush.
    """

    def __init__(self, now=time.perf_counter):
        self._now = now
        self.compile_s: list[float] = []  # per compiling step: compile + that step, to completion
        self.step_times: list[float] = []  # per closed window: seconds per step
        self.eval_s = 0.0
        self.save_s = 0.0
        self.restart()

    def restart(self) -> None:
        """Opens a new, empty window now."""
        self._start, self._steps, self._dispatched = self._now(), 0, None

    def step_started(self) -> None:
        self._dispatched = self._now()

    def step_finished(self, compiled: bool, wait) -> float | None:
        """Counts the step in the window, or, if it `compiled`, calls `wait()` (blocks until the
        step is done), records its seconds as compile time and reopens the window; returns them."""
        if not compiled:
            self._steps += 1
            return None
        wait()
        seconds = self._now() - (self._dispatched if self._dispatched is not None else self._start)
        self.compile_s.append(seconds)
        self.restart()
        return seconds

    def close(self) -> float | None:
        """Seconds per step of the window (None if it has no step), and a new window."""
        steps, elapsed = self._steps, self._now() - self._start
        self.restart()
        if steps == 0:
            return None
        self.step_times.append(elapsed / steps)
        return elapsed / steps

    def summary(self) -> dict[str, float | None]:
        """The run's median step time, total compile / eval / save seconds."""
        times = sorted(self.step_times)
        median = times[len(times) // 2] if times else None
        return {
            "median_step_time_s": median,
            "compile_s": math.fsum(self.compile_s),
            "eval_s": self.eval_s,
            "save_s": self.save_s,
        }
