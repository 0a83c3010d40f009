"""The comparison runner: matched dense / MoE / UltraMemV2 models on every task, paired seeds.

    python -m umv2_jax.compare --suite quick [--tasks mqar fact_base] [--seeds 3] [--out DIR]
    python -m umv2_jax.compare --suite quick --estimate     # time every shape, print the cost

trains the suite's models (docs/evaluation.md: the T family for `quick`, S for `full`; `density`: T-umv2's
topk / table-size sweep; `micro`: tiny shapes for the tests) on each of its tasks, evaluates them,
runs the continual fact injection experiment, and writes DIR (default results/<suite>):
results.md (mean ± sd per task slice, the paired difference of UltraMemV2 and each other model
with its 95% t-interval, learning speed, the density sweep, the accounting), results.json (every
record {task, model, seed, metric, slice, split, value}, each run's curve, accounting and wall
time) and plots/*.png (learning curves shaded over seeds, LM bits/byte vs FLOPs and wall-clock,
loss vs FLOPs and vs wall-clock, accuracy per slice, decode bytes vs batch, the density sweep,
injection curves). A tqdm bar shows the ETA over all remaining steps. Finished runs are files
(DIR/runs/…), so running the same command again resumes: finished runs are skipped.

Refused with one line and exit status 2, before anything is written: an unknown task, a DIR that
holds another suite's results (or this suite's with other settings), models whose accounting does
not confirm docs/evaluation.md's 3% matches.

Modules: suites (plain data), run (the resumable loop), runner (one model's jitted programs,
training, evaluation), files (result paths, JSON), report / tables / curves / curve_plots (read
only the result files), stats (mean ± sd, paired t-intervals), cost and timing (estimates).

Python: `run_suite(SUITES["quick"], "results/quick")`; a Suite is plain data
(umv2_jax.compare.suites), so tests run the micro suite of tiny models the same way.
"""

from umv2_jax.compare.run import run_suite
from umv2_jax.compare.suites import (
    SUITES,
    InjectionSpec,
    ModelSpec,
    Suite,
    SweepSpec,
    TaskSpec,
)

__all__ = [
    "SUITES",
    "InjectionSpec",
    "ModelSpec",
    "Suite",
    "SweepSpec",
    "TaskSpec",
    "run_suite",
]
