"""Learning-curve probes of short comparison runs: test metrics at chosen steps of one training run.

    cache = ProgramCache()
    curve = learning_curve(cache, ModelSpec("T-umv2", "configs/eval/t_umv2.yaml"), Probe(...), 0)

One run trains `probe.steps` steps of the suite's runner (`runner.train`, paired batches: batch i
of seed k is `task.batch(B, S, seed=k, index=i)` for every model) and evaluates the task's test
split(s) at each step of `probe.eval_at` (`runner.evaluate`; `eval_batches` test batches in between,
the whole test set at the last step). Used to size the quick suite (results/sizing/) and by the
diagnosis (umv2_jax.compare.diagnose). The learning-rate schedule is the config's over
`probe.steps` (the same schedule a suite run of that length gets).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from umv2_jax.compare import runner
from umv2_jax.compare.run import run_config
from umv2_jax.compare.suites import ModelSpec
from umv2_jax.data.tasks import make_task
from umv2_jax.eval import accounting

# The one number per task that a curve follows (metric, slice): higher is better except MSE.
HEADLINE = {
    "mqar": ("exact_match", "all"),
    "fact_base": ("exact_match", "all"),
    "overwrite": ("exact_match", "all"),
    "icl_regression": ("normalized_mse", "all"),
}
# Also kept at each evaluation (when the task reports them).
EXTRA = (
    ("knowledge_bits", "all"),
    ("stale_answer_rate", "all"),
    ("answer_loss", "all"),
    ("ridge_normalized_mse", "all"),
)


@dataclasses.dataclass(frozen=True)
class Probe:
    """One task at one size: task name, its parameters, [B, S] batches, steps, eval points."""

    task: str
    params: dict[str, Any]
    seq_len: int
    batch_size: int
    steps: int
    eval_at: tuple[int, ...]
    eval_batches: int = 4
    learning_rate: float | None = None

    def label(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.task}[{params}] B{self.batch_size} S{self.seq_len} {self.steps} steps"


def _test_batches(task, probe: Probe, seed: int, full: bool) -> dict[str, list[dict]]:
    out = {}
    for split in [s for s in task.splits() if s != "train"]:
        count = probe.eval_batches
        if full and hasattr(task, "test_batches") and split == "test":
            count = task.test_batches(probe.batch_size)  # every fact once
        elif hasattr(task, "test_batches") and split == "test":
            count = min(count, task.test_batches(probe.batch_size))
        out[split] = [
            task.batch(probe.batch_size, probe.seq_len, seed=seed, index=i, split=split)
            for i in range(count)
        ]
    return out


def _pick(records: list[dict]) -> dict[str, float]:
    """{split/metric/slice: value} for the headline, EXTRA and health/* records."""
    keep = {}
    for r in records:
        key = (r["metric"], r["slice"])
        if key in HEADLINE.values() or key in EXTRA or r["metric"].startswith("health/"):
            keep[f"{r['split']}/{r['metric']}/{r['slice']}"] = r["value"]
    return keep


def learning_curve(
    cache: runner.ProgramCache,
    model: ModelSpec,
    probe: Probe,
    seed: int,
    *,
    extra: tuple[str, ...] = (),
    vocab_size: int | None = None,
    keep_params: bool = False,
    on_eval: Any = None,
) -> dict[str, Any]:
    """Trains `model` on `probe` with `seed`; the test metrics at each `probe.eval_at` step.

    extra: more dotted config overrides (ablations). Returns plain data: {"model", "probe",
    "seed", "overrides", "evals": [{"step", "train_s", metrics...}], "curve" (train loss every 10
    steps), "step_s" (median train seconds per step after the first), "first_step_s",
    "accounting"} and, with keep_params, "params"/"rest" (the trained arrays).
    """
    task = make_task(probe.task, probe.params)
    task.check_seq_len(probe.seq_len)
    vocab = vocab_size or task.vocab_size
    config = run_config(
        model,
        seq_len=probe.seq_len,
        batch_size=probe.batch_size,
        steps=probe.steps,
        vocab_size=vocab,
        lr=probe.learning_rate,
        extra=extra,
    )
    programs = cache.get(config)
    counts = accounting.account(config)
    params, rest = programs.init(seed)
    state = programs.initial_state(params)
    evals, curve, done, train_s, first_s = [], [], 0, 0.0, 0.0
    points = sorted({p for p in probe.eval_at if 0 < p <= probe.steps} | {probe.steps})
    for point in points:
        state, part, seconds, first = runner.train(
            programs,
            state,
            rest,
            lambda index: task.batch(probe.batch_size, probe.seq_len, seed=seed, index=index),
            point - done,
            log_every=10,
            flops_per_token=counts.training_flops_per_token,
            start_step=done,
        )
        if done == 0:
            first_s = first
        curve += part
        train_s += seconds
        done = point
        start = time.perf_counter()
        records = []
        for split, batches in _test_batches(task, probe, seed, point == probe.steps).items():
            records += runner.evaluate(programs, state["params"], rest, task, batches, split)
        entry = {"step": point, "train_s": train_s, **_pick(records)}
        if on_eval is not None:
            entry |= on_eval(programs, state, rest, task, point, point == probe.steps)
        entry["eval_s"] = time.perf_counter() - start
        evals.append(entry)
    steps_after_first = max(probe.steps - 1, 1)
    out = {
        "model": model.name,
        "probe": dataclasses.asdict(probe) | {"label": probe.label()},
        "seed": seed,
        "overrides": list(model.overrides) + list(extra),
        "evals": evals,
        "curve": curve,
        "step_s": (train_s - first_s) / steps_after_first,
        "first_step_s": first_s,
        "accounting": {
            "total_params": counts.total_params,
            "training_flops_per_token": counts.training_flops_per_token,
        },
    }
    if keep_params:
        out["params"], out["rest"] = state["params"], rest
    return out


def steps_to(evals: list[dict], key: str, level: float) -> int | None:
    """The first evaluated step whose `key` reaches `level` (None: never)."""
    return next((e["step"] for e in evals if e.get(key, float("-inf")) >= level), None)
