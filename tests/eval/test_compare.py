"""The comparison runner end to end on a micro suite, resuming, and its refusals."""

import json
import os

import numpy as np
import pytest

from umv2_jax.compare import InjectionSpec, ModelSpec, Suite, TaskSpec, run_suite, runner
from umv2_jax.compare import run as compare_run
from umv2_jax.compare.__main__ import main
from umv2_jax.compare.run import decode_path, run_path
from umv2_jax.data.tasks import make_task

SHRINK = ("model.d_model=32", "model.num_heads=2", "model.max_seq_len=64")
MICRO = Suite(
    name="micro",
    models=(
        ModelSpec("dense", "configs/eval/t_dense.yaml", (*SHRINK, "model.d_ff=64")),
        ModelSpec(
            "moe",
            "configs/eval/t_moe.yaml",
            (*SHRINK, "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_d_ff=16"),
        ),
        ModelSpec(
            "umv2",
            "configs/eval/t_umv2.yaml",
            (
                *SHRINK,
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
        # Both tasks (and the injection's pretraining) have one shape: one compilation per model.
        TaskSpec("mqar", "mqar", {"mix": [[24, 4]]}, seq_len=24, batch_size=4, steps=3),
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
    check_match=False,  # tiny shapes: not EVAL.md's matched models
    decode_batches=(2,),  # one batch size: a decoder compile per batch size
    decode_task="fact_base",
    description="micro test suite",
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("micro"))
    results = run_suite(MICRO, out, progress=False, echo=lambda line: None)
    return out, results


def test_micro_suite_writes_every_output_file(finished):
    out, results = finished
    for name in ("results.md", "results.json", "suite.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    plots = sorted(os.listdir(os.path.join(out, "plots")))
    assert plots == [
        "accuracy_fact_base.png",
        "accuracy_icl_regression.png",
        "accuracy_mqar.png",
        "decode_bytes.png",
        "injection.png",
        "loss_vs_flops.png",
        "loss_vs_wall.png",
    ]
    for plot in plots:
        with open(os.path.join(out, "plots", plot), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n", plot
    # One file per finished run: 3 tasks × 3 models × 2 seeds.
    assert len(os.listdir(os.path.join(out, "runs"))) == 18
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved == json.loads(json.dumps(results))
    keys = {(r["task"], r["model"], r["seed"]) for r in saved["records"]}
    assert len(keys) == 18
    assert {"task", "model", "seed", "metric", "slice", "value"} <= set(saved["records"][0])
    metrics = {(r["task"], r["metric"]) for r in saved["records"]}
    assert ("fact_base", "knowledge_bits") in metrics and ("mqar", "exact_match") in metrics
    for run in saved["runs"]:
        assert [p["step"] for p in run["curve"]] == [1, 2, 3]
        assert run["wall_s"] > 0
    for model in ("dense", "moe", "umv2"):
        counts = saved["models"][model]["accounting"]["mqar"]
        assert counts["activated_params"] <= counts["total_params"] + counts["embedding_params"]
    modes = {(i["model"], mode) for i in saved["injection"] for mode in i["modes"]}
    assert modes == {("umv2", "values"), ("umv2", "rows")}
    for item in saved["injection"]:
        for data in item["modes"].values():
            assert [p["step"] for p in data["curve"]] == [0, 1, 2]
    rows = next(i for i in saved["injection"] if i["model"] == "umv2")["modes"]["rows"]
    assert 1 <= rows["rows_trained"] <= 2 * 6  # 10% of 64 rows, per each of 2 layers
    table = open(os.path.join(out, "results.md")).read()
    assert "| split | metric | slice | dense | moe | umv2 |" in table
    assert "± " in table  # two seeds: mean ± sd


def test_decode_bytes_are_measured_on_the_trained_models(finished):
    out, results = finished
    assert sorted(os.listdir(os.path.join(out, "decode"))) == [
        "dense.json",
        "moe.json",
        "umv2.json",
    ]
    for model, data in results["decode"].items():
        assert (data["task"], data["seed"], data["trained_steps"]) == ("fact_base", 0, 3), model
        assert "trained 3 steps on fact_base" in data["note"]
        assert set(data["measured"]) == {"2"}
    # The memory model's file equals a measurement of the seed-0 fact_base model retrained here
    # (the same batches, so the same weights), and differs from the untrained one's.
    spec = MICRO.task("fact_base")
    model = MICRO.models[2]
    config = compare_run.run_config(
        model, seq_len=24, batch_size=4, steps=3, vocab_size=results_vocab(results)
    )
    programs = runner.Programs(config, config.model.vocab_size)
    task = make_task(spec.task, spec.params)
    params, rest = programs.init(0)
    untrained = compare_run._decode_bytes(programs, params, rest, spec, task, model, (2,))
    state, *_ = runner.train(
        programs,
        programs.initial_state(params),
        rest,
        lambda i: task.batch(4, 24, seed=0, index=i),
        3,
        log_every=1,
        flops_per_token=1.0,
    )
    trained = compare_run._decode_bytes(programs, state["params"], rest, spec, task, model, (2,))
    assert results["decode"]["umv2"]["sparse"] == trained["sparse"]
    assert untrained["sparse"] != trained["sparse"]


def results_vocab(results):
    """The suite's one vocabulary: the largest task's (as run_suite chooses it)."""
    tasks = [make_task(t.task, t.params) for t in MICRO.tasks]
    tasks.append(make_task("fact_base", MICRO.injection.params))
    return max(task.vocab_size for task in tasks)


def test_icl_regression_reports_normalized_mse_beside_ols_and_ridge(finished):
    _, results = finished
    got = {
        (r["split"], r["metric"], r["slice"]): r["value"]
        for r in results["records"]
        if r["task"] == "icl_regression" and r["model"] == "umv2" and r["seed"] == 0
    }
    for split in ("test", "test_pool"):
        for metric in ("normalized_mse", "ols_normalized_mse", "ridge_normalized_mse"):
            curve = [got[split, metric, f"examples={k}"] for k in range(4)]
            assert all(np.isfinite(curve)) and min(curve) >= 0, (split, metric)
            assert got[split, metric, "all"] == pytest.approx(np.mean(curve))
        # With no point in context both references predict 0 (the prior mean).
        assert got[split, "ols_normalized_mse", "examples=0"] == pytest.approx(
            got[split, "ridge_normalized_mse", "examples=0"]
        )


def test_second_invocation_skips_finished_runs(finished):
    out, _ = finished
    path = run_path(out, "mqar", "moe", 1)
    stamp = os.stat(path).st_mtime_ns
    umv2_run = run_path(out, "fact_base", "umv2", 0)
    umv2_stamp = os.stat(umv2_run).st_mtime_ns
    os.remove(run_path(out, "fact_base", "dense", 0))
    os.remove(decode_path(out, "umv2"))  # its decode bytes need the trained seed-0 model again
    lines = []
    run_suite(MICRO, out, progress=False, echo=lines.append)
    assert lines[0] == f"16 finished run(s) in {out} skipped"
    assert os.stat(path).st_mtime_ns == stamp  # not rerun
    assert os.path.exists(run_path(out, "fact_base", "dense", 0))  # the missing one was rerun
    assert os.path.exists(decode_path(out, "umv2"))
    assert os.stat(umv2_run).st_mtime_ns != umv2_stamp  # retrained for its decode bytes


def test_out_holding_another_suite_is_refused_and_nothing_written(finished, capsys):
    out, _ = finished
    before = {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in os.listdir(out)}
    assert main(["--suite", "quick", "--out", out, "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0
    assert "holds results of suite 'micro', not 'quick'" in error
    assert {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in os.listdir(out)} == before


def test_unknown_task_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["--suite", "quick", "--tasks", "mqar", "nope", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "unknown task nope" in error and "mqar" in error
    assert not out.exists()


def test_nonempty_foreign_directory_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["--suite", "quick", "--out", str(tmp_path)]) == 2
    assert "holds no suite.json" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_regression_predictions_read_the_answer_positions():
    # d = 2, 3 points: a row is x00 x01 y0 x10 x11 y1 x20 x21 y2; y_k is predicted at x_k1.
    task = make_task("icl_regression", {"dim": 2, "points": 3})
    predictions = np.zeros((2, 9), np.int32)
    predictions[0, [1, 4, 7]] = [128, 191, 255]  # y bins 0, 63, 127
    predictions[1, [1, 4, 7]] = [5, 192, 300]  # an x token and a token past the y bins
    got = runner._regression_predictions(predictions, {}, task)
    centre = [-4 + (b + 0.5) * 8 / 128 for b in (0, 63, 127, 64)]  # bin centres on [-4, 4]
    expected = [[centre[0], centre[1], centre[2]], [0.0, centre[3], 0.0]]  # not a y token: 0
    np.testing.assert_allclose(got, expected)


def test_timing_extrapolates_every_run_linearly_in_tokens():
    from umv2_jax.compare.timing import extrapolate

    # MICRO: 3 tasks of 3 steps at 4 × 24 tokens, 2 seeds; injection 1 seed of 3 pretraining
    # steps + 2 finetuning steps per mode (umv2: 2 modes, the others none), also 4 × 24 tokens.
    total = extrapolate(MICRO, "mqar", {"dense": 1.0, "umv2": 2.0})
    assert total == pytest.approx({"dense": 3 * 3 * 2 + 3, "umv2": 2.0 * (3 * 3 * 2 + 3 + 2 * 2)})


def test_sparse_layer_bytes_in_the_report_count_the_layers_dense_parts():
    """The report's sparse-layer bytes are the selected units plus the sparse layers' dense parts
    (keys, projections, router): from the decode record's `sparse_layers`, or for records measured
    before it, `sparse` plus the accounting's sparse-dense parameters."""
    from umv2_jax.compare import report

    counts = {
        "activated_params": 1,
        "total_params": 1,
        "flops_per_token": 1.0,
        "decode_bytes": dict.fromkeys(("1", "8", "64", "512"), 1.0),
        "sparse_dense_params": 21_072,
        "bytes_per_number": 4,
    }
    results = {
        "models": {"old": {"accounting": {"t": counts}, "wall_s": [1.0]}},
        "decode": {"old": {"measured": {"8": 1.0}, "sparse": {"8": 14_240.0}, "note": "n"}},
    }
    results["models"]["new"] = results["models"]["old"]
    results["decode"]["new"] = {**results["decode"]["old"], "sparse_layers": {"8": 98_528.0}}
    lines = report._accounting_table(results, ["old", "new"])
    assert "| old | 0.099 MB |" in lines and "| new | 0.099 MB |" in lines  # 14,240 + 84,288
    assert any("everything the sparse layers read" in line for line in lines)


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path, capsys, monkeypatch):
    """Ctrl-C used to print a 20-line KeyboardInterrupt traceback; the finished runs are kept (a
    rerun skips them), so it says so in one line and exits 130."""
    out = tmp_path / "quick"

    def interrupted(suite, out_dir, **kwargs):
        os.makedirs(os.path.join(out_dir, "runs"))
        for name in ("mqar-dense-0.json", "mqar-moe-0.json"):
            with open(os.path.join(out_dir, "runs", name), "w") as handle:
                handle.write("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_run, "run_suite", interrupted)
    assert main(["--suite", "quick", "--out", str(out), "--no-progress"]) == 130
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "Traceback" not in error
    assert error == (
        f"interrupted: 2 finished run(s) are kept in {out}; run the same command to continue "
        "(finished runs are skipped)"
    )


def test_device_batches_carry_a_packed_batchs_document_ids():
    """The runner sends segment_ids / positions to its steps where a batch has them, else only
    the three keys every task batch has (other keys stay on the host)."""
    ones = np.ones((2, 4), np.int32)
    plain = {"inputs": ones, "targets": ones, "loss_mask": ones.astype(np.float32), "x": ones}
    assert set(runner.device_batch(plain)) == {"inputs", "targets", "loss_mask"}
    packed = runner.device_batch({**plain, "segment_ids": ones, "positions": 0 * ones})
    assert set(packed) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
    np.testing.assert_array_equal(packed["positions"], 0 * ones)


def test_the_engram_baseline_is_matched_beside_moe_and_umv2():
    from umv2_jax.compare.suites import SUITES
    from umv2_jax.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    suite = SUITES["quick"]
    configs = {m.name: load_config(os.path.join(root, m.config)) for m in suite.models}
    assert "T-engram" in configs
    match = compare_run.check_matches(suite, configs)
    engram = [row for row in match["rows"] if "T-engram" in (row["model"], row["reference"])]
    assert len(match["rows"]) == 7 and len(engram) == 3 and match["ok"], match["table"]
