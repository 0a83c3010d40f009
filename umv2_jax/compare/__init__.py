"""The comparison runner: matched dense / MoE / UltraMemV2 models on every task, paired seeds.

    python -m umv2_jax.compare --suite quick [--tasks mqar fact_base] [--seeds 3] [--out DIR]

trains the suite's models (docs/evaluation.md: the T family for `quick`, S for `full`) on each of its tasks,
evaluates them, runs the continual fact injection experiment, and writes DIR (default
results/<suite>): results.md (mean ± sd per task slice, with the accounting), results.json (every
record {task, model, seed, metric, slice, split, value}, each model's accounting and wall time)
and plots/*.png (loss vs FLOPs and vs wall-clock, accuracy per slice, decode bytes vs batch,
injection curves). A tqdm bar shows the ETA over all remaining steps. Finished runs are files
(DIR/runs/…), so running the same command again resumes: finished runs are skipped.

Refused with one line and exit status 2, before anything is written: an unknown task, a DIR that
holds another suite's results (or this suite's with other settings), models whose accounting does
not confirm docs/evaluation.md's 3% matches.

`python -m umv2_jax.compare.timing --suite full` times a few steps of each model and extrapolates
the suite's training time from them (umv2_jax.compare.timing).

Python: `run_suite(SUITES["quick"], "results/quick")`; a Suite is plain data
(umv2_jax.compare.suites), so tests run a micro suite of tiny models the same way.
"""

from umv2_jax.compare.run import run_suite
from umv2_jax.compare.suites import SUITES, InjectionSpec, ModelSpec, Suite, TaskSpec

__all__ = ["SUITES", "InjectionSpec", "ModelSpec", "Suite", "TaskSpec", "run_suite"]
