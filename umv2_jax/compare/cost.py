"""What a suite costs before it runs: training FLOPs from the accounting, and their time on a GPU.

    flops = suite_flops(suite, tasks, seeds, configs)   # {(task, model): training FLOPs, all seeds}
    print(flops_line(flops))                            # one line: total, hours on one H100

A run's training FLOPs are steps × batch × seq_len × the accounting's training FLOPs per token
(3 × forward: umv2_jax.eval.accounting), summed over seeds. The GPU time is an estimate, not a
measurement: per run, the larger of FLOPs / (H100 dense bf16 peak × ASSUMED_MFU) and
steps × ASSUMED_STEP_FLOOR_S (a small model's step is bound by dispatch and kernel launches, not
FLOPs). Both are assumptions, stated wherever the estimate is printed; evaluation, probes,
compilation and the injection runs are not counted. For a CPU, time a few steps instead
(`python -m umv2_jax.compare --suite quick --estimate`, umv2_jax.compare.timing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from umv2_jax import hardware
from umv2_jax.eval import accounting

ASSUMED_MFU = 0.10  # of the H100's dense bf16 peak: an assumption for models this small
ASSUMED_STEP_FLOOR_S = 0.005  # per train step on a GPU (dispatch + launches): an assumption
CHIP = "h100"


def suite_flops(suite, tasks: Sequence, seeds: int, configs: Mapping) -> dict[tuple, float]:
    """{(task name, model name): training FLOPs of that pair's `seeds` runs}; `configs` maps
    (task name, model name) to the run's Config, `tasks` are the chosen TaskSpecs."""
    flops = {}
    for spec in tasks:
        tokens = spec.steps * spec.batch_size * spec.seq_len
        for model in suite.models_for(spec.name):
            per_token = accounting.account(configs[spec.name, model.name]).training_flops_per_token
            flops[spec.name, model.name] = seeds * tokens * per_token
    return flops


def gpu_seconds(flops: float, steps: int, chip: str = CHIP) -> float:
    """Estimated seconds on one `chip` for `steps` train steps doing `flops` FLOPs (module doc)."""
    peak = hardware.chip(chip).peak_bf16_flops
    return max(flops / (peak * ASSUMED_MFU), steps * ASSUMED_STEP_FLOOR_S)


def suite_gpu_seconds(suite, tasks: Sequence, seeds: int, flops: Mapping) -> float:
    steps = {spec.name: spec.steps * seeds for spec in tasks}
    return sum(gpu_seconds(value, steps[task]) for (task, _), value in flops.items())


def flops_line(flops: Mapping, seconds: float | None = None) -> str:
    total = sum(flops.values())
    where = f"; on one H100, estimated: {seconds / 3600:.2f} h" if seconds is not None else ""
    return (
        f"training: {len(flops)} (task, model) pairs, {total:.3g} FLOPs in total (accounting){where}"
        f" (assumed {ASSUMED_MFU:.0%} MFU of {hardware.chip(CHIP).peak_bf16_flops / 1e12:.0f} "
        f"TFLOP/s bf16, at least {ASSUMED_STEP_FLOOR_S * 1e3:.0f} ms a step; evaluation, "
        "compilation and injection not counted)"
    )
