"""The comparison suites: which models, which tasks, how long, how many seeds.

    suite = SUITES["quick"]            # T family (docs/evaluation.md), minutes on a 2-core CPU
    suite = SUITES["density"]          # T-umv2's topk / table-size sweep (fact_base, LM)
    suite = SUITES["full"]             # S family + its density sweep, sized for one GPU

A suite is plain data; its `fingerprint()` is written to DIR/suite.json so that a results directory
is only ever resumed by the same suite with the same settings. Every model of a suite is trained on
every task with the same seeds (seed k: the same initialization seed, the same training batches
and the same test batches for every model: paired seeds).
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Packaged config names (`umv2_jax.config.load_config` finds them in the installed package; in a
# clone they are the files configs/eval/*.yaml).
T_FAMILY = (
    ("T-dense", "eval/t_dense"),
    ("T-moe", "eval/t_moe"),
    ("T-umv2", "eval/t_umv2"),
    ("T-engram", "eval/t_engram"),
)
S_FAMILY = (
    ("S-dense", "eval/s_dense"),
    ("S-moe", "eval/s_moe"),
    ("S-umv2", "eval/s_umv2"),
    ("S-engram", "eval/s_engram"),
)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One compared model: a config file plus dotted overrides (e.g. shrunk shapes in tests)."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task of a suite: a registered task (umv2_jax.data.tasks) with its parameters.

    name: the label in the results (a task may appear twice with different parameters);
    params: the task's parameters (plain data, as under `data.task` in YAML); train and test
    batches have `batch_size` rows of `seq_len` tokens; the test set is `eval_batches` batches of
    every test split the task has. `test_params` overrides parameters for the test batches only
    (e.g. longer MQAR settings than the training mix).
    """

    name: str
    task: str
    params: dict[str, Any]
    seq_len: int
    batch_size: int
    steps: int
    eval_batches: int = 4
    learning_rate: float | None = None  # None: the model config's
    test_params: dict[str, Any] | None = None
    # Learning curves: every `eval_every` steps (0: only at the end) the model is scored on the
    # first `probe_batches` test batches (exact match, answer loss, bits/byte for LM), so the
    # report has metric vs step and steps to 0.5 / 0.9 exact match.
    eval_every: int = 0
    probe_batches: int = 2


@dataclasses.dataclass(frozen=True)
class InjectionSpec:
    """Continual fact injection (umv2_jax.eval.injection): fact base A, then B.

    params: the fact_base task's parameters shared by A and B (the base is chosen per phase);
    modes: finetuning modes per model name ("all", "values", "rows"); rows_fraction: the share of
    the value rows that `rows` trains (the rows most specific to B).
    """

    params: dict[str, Any]
    seq_len: int
    batch_size: int
    pretrain_steps: int
    finetune_steps: int
    eval_every: int
    eval_batches: int
    modes: dict[str, tuple[str, ...]]
    rows_fraction: float = 0.05
    learning_rate: float | None = None
    seeds: int | None = None  # None: the suite's


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """Variants of one of the suite's models, trained on some of its tasks with the same seeds.

    The activation density vs table size sweep (the paper's 60B-top768 vs 120B-top256 claim):
    `topk` at a fixed table and the table (`n_keys`) at a fixed `topk`. model: the base model's
    name in `Suite.models`; variants: (label, dotted overrides applied after the base model's
    own); a variant runs as model `<model>.<label>` on each of `tasks` (names of the suite's
    tasks), with the base model's runs as the reference point of the paired differences.
    """

    model: str
    variants: tuple[tuple[str, tuple[str, ...]], ...]
    tasks: tuple[str, ...]

    def models(self, base: ModelSpec) -> tuple[ModelSpec, ...]:
        return tuple(
            ModelSpec(f"{base.name}.{label}", base.config, (*base.overrides, *overrides))
            for label, overrides in self.variants
        )


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    models: tuple[ModelSpec, ...]
    tasks: tuple[TaskSpec, ...]
    seeds: int = 3
    injection: InjectionSpec | None = None
    log_every: int = 10
    check_match: bool = True  # the accounting must confirm docs/evaluation.md's 3% matches first
    decode_batches: tuple[int, ...] = (1, 8, 64, 512)  # measured decode bytes at these batches
    # Decode bytes are measured on the seed-0 models trained on this task (None or a task not
    # chosen with --tasks: the first chosen task), on that task's test data.
    decode_task: str | None = "fact_base"
    sweep: SweepSpec | None = None
    description: str = ""

    def task(self, name: str) -> TaskSpec:
        return next(task for task in self.tasks if task.name == name)

    def models_for(self, task_name: str) -> tuple[ModelSpec, ...]:
        """The models trained on task `task_name`: the suite's, then the sweep's variants where
        the sweep has that task."""
        if self.sweep is not None and task_name in self.sweep.tasks:
            return self.models + self.sweep_models()
        return self.models

    def sweep_models(self) -> tuple[ModelSpec, ...]:
        """The sweep's variant models (none without a sweep)."""
        if self.sweep is None:
            return ()
        base = next(model for model in self.models if model.name == self.sweep.model)
        return self.sweep.models(base)

    def fingerprint(self) -> dict[str, Any]:
        """Plain data that identifies the suite's settings (what DIR/suite.json holds)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _family(models) -> tuple[ModelSpec, ...]:
    return tuple(ModelSpec(name, path) for name, path in models)


# Quick: the T family (dense, moe, umv2, engram) × 4 tasks × 3 seeds + injection. Task sizes from
# learning curves measured on the shared 2-core VM at load 13-28 (results/sizing/README.md,
# curves.jsonl; the fact-base curves are results/diagnosis/runs.jsonl), one seed each; the previous
# sizes separated nothing. `python -m umv2_jax.compare --suite quick --estimate` prints the cost.
QUICK = Suite(
    name="quick",
    models=_family(T_FAMILY),
    tasks=(
        # 25,600 examples of 4 pairs at seq 32 (the old 3,200 at seq 64 left every model at 0.20-0.22).
        # Sizing, seed 0 (results/sizing): T-moe 0.238 / 0.952 / 0.991 / 0.999 exact match at steps
        # 100 / 200 / 300 / 400, T-dense 0.225 / 0.245 / 0.255 / 0.294, T-umv2 0.216 / 0.260 / 0.237 /
        # 0.262. At 200 steps the 3-seed quick suite of 2026-12-07 had every model at 0.23-0.25 (the
        # jump came later on those seeds), so the suite runs 400 steps; learning speed (steps to 0.5 /
        # 0.9) is the unsaturated measure for a model that does jump.
        TaskSpec(
            "mqar",
            "mqar",
            {"mix": [[32, 4]]},
            seq_len=32,
            batch_size=64,
            steps=400,
            eval_every=50,
        ),
        # overwrite left the quick suite (it stays in `full`): at 150 steps the previous quick suite
        # measured exact match 0.137 ± 0.017 / 0.162 ± 0.003 / 0.121 ± 0.022 (dense / moe / umv2,
        # 3 seeds): above chance (1/128) but the models within ~2 sd of each other, and its ~4 min
        # (4 models × 3 seeds) do not fit the 30-min budget beside the tasks that separate them.
        # 4,096 facts × 20 exposures (160 steps of 32 rows × 16 facts; the old 512 facts × 100
        # exposures saturated every model at 1.000). Measured, seed 0, exact match at steps 40 / 80 /
        # 120 / 160: T-dense 0.012 / 0.035 / 0.148 / 0.258, T-umv2 0.012 / 0.034 / 0.151 / 0.226
        # (chance 1/512): a learning-speed regime, far from saturated (results/diagnosis).
        TaskSpec(
            "fact_base",
            "fact_base",
            {"num_facts": 4096, "exposures": 20},
            seq_len=96,
            batch_size=32,
            steps=160,
            eval_every=40,
        ),
        # icl_regression left the quick suite: at 150 steps every model predicted the mean
        # (normalized MSE 0.975 / 0.967 / 0.976 ± 0.16, results/quick), and regression in context
        # needs thousands of steps (the full suite runs 3,000), far past this budget.
        # docs/evaluation.md task 6 at equal training tokens for every model (200 × 16 × 128 bytes;
        # 600 steps would cost ~18 min of the 30-min budget: `--estimate`, 2026-12-07).
        TaskSpec(
            "shakespeare_lm",
            "shakespeare_lm",
            {},
            seq_len=128,
            batch_size=16,
            steps=200,
            eval_batches=16,
            eval_every=50,
            probe_batches=4,
        ),
    ),
    seeds=3,
    # The diagnosis (docs/diagnosis.md) found T-umv2's value tables barely move under the `paper`
    # init at this size (σ_V 0.34, 17× the release's 0.02) and measured `init: release` at 0.434 vs
    # 0.226 exact match on fact_base, one seed: the suite checks it with 3 paired seeds.
    sweep=SweepSpec(
        model="T-umv2",
        variants=(("init_release", ("model.memory.init=release",)),),
        tasks=("fact_base", "shakespeare_lm"),
    ),
    injection=InjectionSpec(
        params={"num_facts": 512},
        seq_len=96,
        batch_size=16,
        pretrain_steps=150,
        finetune_steps=60,
        eval_every=20,
        eval_batches=2,
        modes={"T-umv2": ("all", "values", "rows"), "T-moe": ("all",), "T-dense": ("all",)},
        seeds=1,
    ),
    description="T family (docs/evaluation.md), a short run per task: a CPU comparison",
)

# Activation density vs table size (the paper's 60B-top768 vs 120B-top256 claim) for T-umv2
# (n_keys 68 → a 4,624-row table, topk 8): topk 4 / 16 at that table, and a 2,304 / 9,216-row
# table at topk 8, on the quick suite's fact_base and LM tasks, 3 paired seeds.
T_DENSITY = SweepSpec(
    model="T-umv2",
    variants=(
        ("topk4", ("model.memory.topk=4",)),
        ("topk16", ("model.memory.topk=16",)),
        ("keys48", ("model.memory.n_keys=48",)),
        ("keys96", ("model.memory.n_keys=96",)),
    ),
    tasks=("fact_base", "shakespeare_lm"),
)
DENSITY = Suite(
    name="density",
    models=tuple(model for model in _family(T_FAMILY) if model.name == "T-umv2"),
    tasks=tuple(task for task in QUICK.tasks if task.name in T_DENSITY.tasks),
    seeds=3,
    check_match=False,  # one model and its variants: nothing to match
    decode_task=None,
    decode_batches=(),
    sweep=T_DENSITY,
    description="T-umv2: topk at a fixed table and the table at a fixed topk (density sweep)",
)

FULL = Suite(
    name="full",
    models=_family(S_FAMILY),
    tasks=(
        TaskSpec(
            "mqar",
            "mqar",
            {"mix": [[64, 4], [128, 8], [256, 16]]},
            seq_len=256,
            batch_size=32,
            steps=3000,
            eval_batches=8,
            test_params={"mix": [[256, 16], [512, 32]]},
            eval_every=250,
        ),
        TaskSpec("overwrite", "overwrite", {}, seq_len=256, batch_size=32, steps=3000),
        TaskSpec("needle_passkey", "needle_passkey", {}, seq_len=512, batch_size=16, steps=2000),
        TaskSpec("needle_multikey", "needle_multikey", {}, seq_len=512, batch_size=16, steps=2000),
        TaskSpec(
            "variable_tracking", "variable_tracking", {}, seq_len=512, batch_size=16, steps=2000
        ),
        TaskSpec(
            "fact_base", "fact_base", {}, seq_len=96, batch_size=32, steps=3000, eval_every=250
        ),
        # docs/evaluation.md 5a: d = 5, 11 points; the infinite pool here (finite pools: --tasks with a
        # suite of your own, e.g. pool_size 16 … 4096).
        TaskSpec("icl_regression", "icl_regression", {}, seq_len=66, batch_size=64, steps=3000),
        TaskSpec(
            "bursty_classification",
            "bursty_classification",
            {},
            seq_len=128,
            batch_size=32,
            steps=3000,
        ),
        TaskSpec(
            "shakespeare_lm",
            "shakespeare_lm",
            {},
            seq_len=256,
            batch_size=32,
            steps=3000,
            eval_batches=32,
            eval_every=250,
            probe_batches=8,
        ),
    ),
    seeds=3,
    injection=InjectionSpec(
        params={},
        seq_len=96,
        batch_size=32,
        pretrain_steps=2000,
        finetune_steps=500,
        eval_every=50,
        eval_batches=4,
        modes={"S-umv2": ("all", "values", "rows"), "S-moe": ("all",), "S-dense": ("all",)},
    ),
    # S-umv2 (n_keys 146 → 21,316 rows, topk 16): topk 8 / 32 at that table, the table halved /
    # doubled (n_keys 103 / 206) at topk 16.
    sweep=SweepSpec(
        model="S-umv2",
        variants=(
            ("topk8", ("model.memory.topk=8",)),
            ("topk32", ("model.memory.topk=32",)),
            ("keys103", ("model.memory.n_keys=103",)),
            ("keys206", ("model.memory.n_keys=206",)),
        ),
        tasks=("fact_base", "shakespeare_lm"),
    ),
    description="S family (docs/evaluation.md), sized for one GPU",
)

# Micro: tiny shapes of the T configs, 3 steps per run, for the end-to-end test (tests/eval/
# test_compare.py) and a smoke run (`--suite micro`). Every task and the injection have one shape,
# so each model compiles once; 2 seeds (the fewest that give an sd and an interval); the density
# sweep has one variant per axis (topk at the table, the table at topk).
_SHRINK = ("model.d_model=32", "model.num_heads=2", "model.max_seq_len=64")
MICRO = Suite(
    name="micro",
    models=(
        ModelSpec("dense", "configs/eval/t_dense.yaml", (*_SHRINK, "model.d_ff=64")),
        ModelSpec(
            "moe",
            "configs/eval/t_moe.yaml",
            (*_SHRINK, "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_d_ff=16"),
        ),
        ModelSpec(
            "umv2",
            "configs/eval/t_umv2.yaml",
            (
                *_SHRINK,
                "model.d_ff=48",
                "model.memory.n_keys=8",
                "model.memory.key_dim=8",
                "model.memory.rc_topk=4",
                "model.memory.topk=4",
                "model.memory.value_dim=8",
                "model.memory.pre_value_dim=4",
                "model.memory.calibration_tokens=64",
            ),
        ),
    ),
    tasks=(
        TaskSpec(
            "mqar",
            "mqar",
            {"mix": [[24, 4]]},
            seq_len=24,
            batch_size=4,
            steps=3,
            eval_every=1,
            probe_batches=1,
        ),
        TaskSpec(
            "fact_base",
            "fact_base",
            {"num_facts": 32, "facts_per_sequence": 4},
            seq_len=24,
            batch_size=4,
            steps=3,
        ),
        TaskSpec(
            "icl_regression",
            "icl_regression",
            {"dim": 2, "points": 4},
            seq_len=24,
            batch_size=4,
            steps=3,
        ),
        TaskSpec(
            "shakespeare_lm",
            "shakespeare_lm",
            {},
            seq_len=24,
            batch_size=4,
            steps=3,
            eval_batches=2,
            eval_every=1,
            probe_batches=1,
        ),
    ),
    seeds=2,
    injection=InjectionSpec(
        params={"num_facts": 32, "facts_per_sequence": 4},
        seq_len=24,
        batch_size=4,
        pretrain_steps=3,
        finetune_steps=2,
        eval_every=1,
        eval_batches=1,
        modes={"umv2": ("values", "rows")},
        rows_fraction=0.1,
        seeds=1,
    ),
    log_every=1,
    check_match=False,  # tiny shapes: not docs/evaluation.md's matched models
    decode_batches=(2,),  # one batch size: a decoder compile per batch size
    decode_task="fact_base",
    sweep=SweepSpec(
        model="umv2",
        variants=(("topk2", ("model.memory.topk=2",)), ("keys6", ("model.memory.n_keys=6",))),
        tasks=("fact_base", "shakespeare_lm"),
    ),
    description="micro test suite",
)

SUITES = {suite.name: suite for suite in (QUICK, DENSITY, FULL, MICRO)}
