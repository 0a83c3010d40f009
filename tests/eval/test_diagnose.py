"""The learning-curve runs and the diagnosis' table probes on a tiny UltraMemV2.

The probe's step ratios are checked against what the real train step does to the parameters on
the same batch (its oracle), and the value-LR multiplier against the plain ratio of two
multipliers at the first step (Adam's first update is ±lr per element, decay included, so the
values group's ‖Δθ‖ scales exactly with the multiplier).
"""

import dataclasses

import jax
import numpy as np
import pytest

from umv2_jax.compare import diagnose, probes, runner
from umv2_jax.compare.suites import MICRO, ModelSpec

# The micro suite's tiny UltraMemV2 shapes (one definition: umv2_jax/compare/suites.py).
TINY_UMV2 = next(model for model in MICRO.models if model.name == "umv2").overrides
PROBE = probes.Probe(
    "fact_base", {"num_facts": 32, "facts_per_sequence": 4}, 24, 4, 2, (1, 2), eval_batches=1
)


def test_steps_to_first_evaluation_reaching_the_level():
    evals = [{"step": 10, "m": 0.2}, {"step": 20, "m": 0.55}, {"step": 30, "m": 0.4}]
    assert probes.steps_to(evals, "m", 0.5) == 20
    assert probes.steps_to(evals, "m", 0.2) == 10
    assert probes.steps_to(evals, "m", 0.9) is None


def _global(tree) -> float:
    return float(
        np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree.leaves(tree)))
    )


@pytest.fixture(scope="module")
def tiny():
    cache = runner.ProgramCache()
    model = ModelSpec("umv2", "configs/eval/t_umv2.yaml", TINY_UMV2)
    return cache, model


def test_probe_step_ratios_equal_the_train_step_on_the_same_batch(tiny):
    cache, model = tiny
    from umv2_jax.compare.run import run_config
    from umv2_jax.data.tasks import make_task

    task = make_task(PROBE.task, PROBE.params)
    config = run_config(
        model,
        seq_len=PROBE.seq_len,
        batch_size=PROBE.batch_size,
        steps=PROBE.steps,
        vocab_size=task.vocab_size,
    )
    programs = cache.get(config)
    params, rest = programs.init(0)
    state = programs.initial_state(params)
    probe = diagnose.TableProbe(PROBE, seed=0)
    measured = probe(programs, state, rest, task, 0, final=False)
    old = jax.tree.map(np.array, state["params"])  # copies: the train step donates the state
    batch = runner.device_batch(task.batch(PROBE.batch_size, PROBE.seq_len, seed=0, index=0))
    state, _ = programs.train_step(state, rest, batch)
    new = jax.device_get(state["params"])
    for group in ("values", "default"):
        pick = lambda t, g=group: [  # noqa: E731
            x
            for x, label in zip(jax.tree.leaves(t), jax.tree.leaves(programs.labels))
            if label == g
        ]
        delta = _global([n - o for n, o in zip(pick(new), pick(old))])
        np.testing.assert_allclose(
            measured[f"step_ratio/{group}"], delta / _global(pick(old)), rtol=1e-3
        )
    for layer in (0, 1):
        assert 0.0 < measured[f"layer{layer}/rows_with_grad"] <= 1.0
        assert measured[f"layer{layer}/values_grad_norm"] > 0.0


@pytest.mark.slow  # two more model compilations (over 10 minutes on the loaded 2-core machine)
def test_value_lr_multiplier_scales_the_values_step_only(tiny):
    cache, _ = tiny
    ratios = {}
    for factor in (1, 4):
        model = ModelSpec(
            "umv2",
            "configs/eval/t_umv2.yaml",
            (*TINY_UMV2, f"model.memory.value_lr=constant:{factor}", "train.warmup_fraction=0.0"),
        )
        probe = dataclasses.replace(PROBE, steps=1, eval_at=(1,))
        result = probes.learning_curve(cache, model, probe, 0, on_eval=_first_step_probe(probe))
        ratios[factor] = result["evals"][0]
    np.testing.assert_allclose(
        ratios[4]["first/values"] / ratios[1]["first/values"], 4.0, rtol=1e-4
    )
    np.testing.assert_allclose(ratios[4]["first/default"], ratios[1]["first/default"], rtol=1e-5)
    # the whole-test-set union of rows read is a fraction of the table
    for layer in (0, 1):
        assert 0.0 < ratios[1][f"layer{layer}/rows_hit_union"] <= 1.0


def _first_step_probe(probe):
    """The probe's step ratios from a fresh optimizer state (step 0), renamed first/<group>."""
    table = diagnose.TableProbe(probe, seed=0)

    def on_eval(programs, state, rest, task, point, final):
        fresh = dict(state, opt_state=programs.optimizer.init(state["params"]))
        out = table(programs, fresh, rest, task, point, final)
        return out | {f"first/{g}": out[f"step_ratio/{g}"] for g in ("values", "default")}

    return on_eval


def test_summary_tables_read_the_runs(tmp_path):
    import json

    record = {
        "variant": "base",
        "probe_name": "fact_4k",
        "seed": 0,
        "accounting": {"total_params": 1234, "training_flops_per_token": 99.0},
        "evals": [
            {"step": 5, "test/exact_match/all": 0.25, "layer0/rows_hit_union": 0.5},
            {
                "step": 10,
                "test/exact_match/all": 0.75,
                "step_ratio/values": 0.01,
                "layer0/rows_hit_union": 0.625,
            },
        ],
    }
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(record) + "\n")
    table = diagnose.summary(str(path))
    assert "| fact_4k | base | 1 | 1,234 | 99 | 0.75 | — | 0.01 |" in table
    layers = diagnose.layer_table(str(path))
    assert "| layer0 rows hit (test set, union) | 0.5 | 0.625 |" in layers
    assert "| test/exact_match/all | 0.25 | 0.75 |" in layers


# The diagnosis' variants that claim T-umv2's budget: the other memory layers, and the row count /
# row width / pre-value trades, each within docs/evaluation.md's 3% of T-umv2's FFN slot (total
# parameters and forward FLOPs per token) by the accounting.
MATCHED_VARIANTS = (
    "pkm",
    "peer",
    "memory_plus",
    "ultramem_v1",
    "rows_n96_narrow",
    "rows_n48_wide",
    "dv32_dp0",
    "dv16_dp16",
)


@pytest.mark.parametrize("name", MATCHED_VARIANTS)
def test_matched_variants_keep_t_umv2s_budget(name):
    from umv2_jax.config import load_config
    from umv2_jax.eval.accounting import account

    base = account(load_config(diagnose.UMV2))
    path, overrides = diagnose.VARIANTS[name]
    variant = account(load_config(path, overrides=list(overrides)))
    assert variant.ffn_slot_params == pytest.approx(base.ffn_slot_params, rel=0.03)
    assert variant.ffn_slot_flops_per_token == pytest.approx(
        base.ffn_slot_flops_per_token, rel=0.03
    )
    if name in ("pkm", "peer", "memory_plus", "ultramem_v1"):
        assert variant.kind == {"ultramem_v1": "ultramem"}.get(name, name)
