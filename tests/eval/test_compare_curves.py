"""Learning-speed and equal-FLOPs numbers read off curves, the statistic tables, hand-computed;
and the comparison package's imports (the report never reaches back into the runner)."""

import math

import pytest

from umv2_jax.compare import curves, tables


def _curve(values, key="test/exact_match", flops_per_step=10.0):
    return [
        {"step": step, "flops": step * flops_per_step, "wall_s": 0.1 * step, key: value}
        for step, value in values
    ]


def test_steps_to_thresholds_is_the_first_probed_step_reaching_them():
    curve = _curve([(50, 0.2), (100, 0.55), (150, 0.48), (200, 0.91)])
    curve.insert(1, {"step": 60, "flops": 600.0, "wall_s": 6.0})  # a point without a probe
    assert curves.steps_to(curve, "test/exact_match", 0.5) == 100
    assert curves.steps_to(curve, "test/exact_match", 0.9) == 200
    assert curves.steps_to(curve, "test/exact_match", 0.95) is None


def test_value_at_interpolates_in_flops_and_refuses_to_extrapolate():
    curve = _curve([(1, 4.0), (3, 2.0)], key="test/bits_per_byte")  # flops 10 and 30
    assert curves.value_at(curve, "test/bits_per_byte", 20.0) == pytest.approx(3.0)
    assert curves.value_at(curve, "test/bits_per_byte", 30.0) == pytest.approx(2.0)
    assert math.isnan(curves.value_at(curve, "test/bits_per_byte", 31.0))


def _run(model, seed, curve, records=(), total_params=100):
    return {
        "task": "t",
        "model": model,
        "seed": seed,
        "curve": curve,
        "records": list(records),
        "accounting": {"total_params": total_params},
    }


def test_derived_records_hand_computed():
    key = "test/bits_per_byte"
    # a ends at 30 FLOPs, b at 33: the budget is 30; b at 30 is 2.0 + (3.0 − 2.0)·(33−30)/(33−11)
    a = _run("a", 0, [{"step": 1, "flops": 10.0, key: 5.0}, {"step": 3, "flops": 30.0, key: 3.0}])
    b = _run("b", 0, [{"step": 1, "flops": 11.0, key: 4.0}, {"step": 3, "flops": 33.0, key: 2.0}])
    bits = {"metric": "knowledge_bits", "split": "test", "slice": "all", "value": 60.0}
    c = _run("c", 0, [{"step": 3, "flops": 3e9}], [bits], total_params=120)
    got = {
        (r["model"], r["metric"]): r["value"] for r in curves.derived_records([a, b, c], {"a", "b"})
    }
    assert got["a", "bits_per_byte_at_equal_flops"] == pytest.approx(3.0)
    assert got["b", "bits_per_byte_at_equal_flops"] == pytest.approx(4.0 - 2.0 * 19 / 22)
    assert got["c", "knowledge_bits_per_param"] == pytest.approx(0.5)
    assert got["c", "knowledge_bits_per_gflop"] == pytest.approx(20.0)


def test_speed_table_counts_seeds_that_reached_and_pairs_the_rest():
    runs = [
        _run("umv2", 0, _curve([(100, 0.6), (200, 0.95)])),
        _run("umv2", 1, _curve([(100, 0.4), (200, 0.7)])),
        _run("umv2", 2, _curve([(100, 0.7), (200, 0.8)])),
        _run("dense", 0, _curve([(100, 0.2), (200, 0.6)])),
        _run("dense", 1, _curve([(100, 0.1), (200, 0.3)])),
        _run("dense", 2, _curve([(100, 0.3), (200, 0.5)])),
    ]
    lines = tables.speed_table(runs, "t", ["dense", "umv2"], "umv2")
    assert lines[0] == "| steps to exact match | dense | umv2 | umv2 − dense |"
    # ≥ 0.5: umv2 at 100, 200, 100 (3/3); dense at 200, –, 200 (2/3): paired on seeds 0, 2 →
    # d = (−100, −100), sd 0: the interval is the point −100, marked.
    assert lines[2] == "| ≥ 0.5 | 200 ± 0 (2/3) | 133 ± 58 (3/3) | -100 [-100, -100] * |"
    assert lines[3] == "| ≥ 0.9 | not reached (0/3) | 200 (1 seed) (1/3) | – |"


def test_metric_table_marks_differences_outside_the_interval():
    records = []
    for seed, (u, d) in enumerate([(0.9, 0.5), (0.8, 0.45), (0.85, 0.52)]):
        for model, value in (("umv2", u), ("dense", d)):
            records.append(
                {
                    "task": "t",
                    "model": model,
                    "seed": seed,
                    "metric": "exact_match",
                    "slice": "all",
                    "split": "test",
                    "value": value,
                }
            )
    values = tables.by_seed(records)
    lines = tables.metric_table(
        values, "t", ["dense", "umv2"], "umv2", [("test", "exact_match", "all")]
    )
    # d = (0.4, 0.35, 0.33): mean 0.36, sd 0.036056, t 4.302653 → half 0.089567.
    assert lines[2] == (
        "| test | exact_match | all | 0.490 ± 0.036 | 0.850 ± 0.050 | +0.360 [+0.270, +0.450] * |"
    )


def test_compare_modules_import_no_circle_and_the_report_not_the_runner():
    """Edges between compare's modules (the package's own __init__, which re-exports run_suite,
    aside): acyclic, and the report reads result files without reaching run / runner / timing."""
    from tests.test_layering import GRAPH

    package = "umv2_jax.compare"
    inside = {m for m in GRAPH if m.startswith(package + ".")}
    edges = {m: (GRAPH[m] & inside) for m in inside}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for name in edges[todo.pop()] - seen:
                seen.add(name)
                todo.append(name)
        return seen

    for module in inside:
        assert module not in reach(module), f"{module} imports itself through {reach(module)}"
    report = reach(f"{package}.report") | {f"{package}.report"}
    for runner_side in ("run", "runner", "timing", "cost"):
        assert f"{package}.{runner_side}" not in report
    assert f"{package}.files" in edges[f"{package}.report"]
    assert f"{package}.report" in edges[f"{package}.run"]
