"""The comparison runner end to end on a micro suite, resuming, and its refusals."""

import hashlib
import json
import os

import numpy as np
import pytest

from umv2_jax.compare import run as compare_run
from umv2_jax.compare import run_suite, runner
from umv2_jax.compare.__main__ import main
from umv2_jax.compare.run import decode_path, run_path
from umv2_jax.compare.suites import MICRO
from umv2_jax.data.tasks import make_task


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
        "accuracy_shakespeare_lm.png",
        "curve_mqar.png",
        "curve_shakespeare_lm.png",
        "decode_bytes.png",
        "density.png",
        "injection.png",
        "lm_bits_per_byte.png",
        "loss_vs_flops.png",
        "loss_vs_wall.png",
    ]
    for plot in plots:
        with open(os.path.join(out, "plots", plot), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n", plot
    # One file per finished run: 4 tasks × 3 models × 2 seeds, and the sweep's 2 variants × 2
    # tasks × 2 seeds.
    assert len(os.listdir(os.path.join(out, "runs"))) == 24 + 8
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved == json.loads(json.dumps(results))
    keys = {(r["task"], r["model"], r["seed"]) for r in saved["records"]}
    assert len(keys) == 32
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
    assert "| split | metric | slice | dense | moe | umv2 | umv2 − dense | umv2 − moe |" in table
    assert "± " in table  # two seeds: mean ± sd
    assert "| steps to exact match | dense | moe | umv2 |" in table  # mqar's learning speed


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
    assert lines[1] == f"30 finished run(s) in {out} skipped"  # after the FLOPs line
    assert lines[0].startswith("training: ")
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

    # MICRO: 4 tasks of 3 steps at 4 × 24 tokens, 2 seeds; umv2's 2 sweep variants on 2 of them
    # (at umv2's speed); injection 1 seed of 3 pretraining steps + 2 finetuning steps per mode
    # (umv2: 2 modes, the others none), also 4 × 24 tokens.
    total = extrapolate(MICRO, "mqar", {"dense": 1.0, "umv2": 2.0})
    assert total == pytest.approx(
        {"dense": 4 * 3 * 2 + 3, "umv2": 2.0 * (4 * 3 * 2 + 2 * 2 * 3 * 2 + 3 + 2 * 2)}
    )


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


def test_seed_pairing_same_batches_for_every_model_different_init_per_seed(finished):
    """Every model of a seed (the sweep's variants too) read the same training batches; every
    seed read other batches and started from other weights; the recorded batch digest is that of
    the task's own batches (recomputed here), so a runner feeding anything else fails."""
    out, _ = finished
    runs = [
        json.load(open(os.path.join(out, "runs", name)))
        for name in sorted(os.listdir(os.path.join(out, "runs")))
    ]
    batch_digests, init_digests = {}, {}
    for run in runs:
        batch_digests.setdefault((run["task"], run["seed"]), set()).add(run["batch_digest"])
        init_digests.setdefault((run["model"], run["seed"]), set()).add(run["init_digest"])
    assert len(batch_digests) == 4 * 2
    for key, digests in batch_digests.items():
        assert len(digests) == 1, key  # one digest for every model of (task, seed)
    for task in {task for task, _ in batch_digests}:
        assert batch_digests[task, 0] != batch_digests[task, 1], task
    for model in {model for model, _ in init_digests}:
        # One model and seed: the same initial weights on every task (one shape); seeds differ.
        assert len(init_digests[model, 0]) == 1 and len(init_digests[model, 1]) == 1, model
        assert init_digests[model, 0] != init_digests[model, 1], model
    assert len({init_digests["dense", 0].pop(), init_digests["moe", 0].pop()}) == 2
    spec = MICRO.task("shakespeare_lm")
    task = make_task(spec.task, spec.params)
    digest = hashlib.sha1()
    for index in range(spec.steps):
        batch = task.batch(spec.batch_size, spec.seq_len, seed=1, index=index)
        digest.update(batch["inputs"].astype(np.int32).tobytes())
        digest.update(batch["targets"].astype(np.int32).tobytes())
    assert batch_digests["shakespeare_lm", 1] == {digest.hexdigest()}


def test_lm_task_reports_bits_per_byte_curves_and_the_equal_flops_view(finished):
    out, results = finished
    lm = [run for run in results["runs"] if run["task"] == "shakespeare_lm"]
    assert len(lm) == 5 * 2  # 3 models and 2 sweep variants, 2 seeds
    for run in lm:
        # eval_every 1: a held-out probe at every step, FLOPs and wall-clock on every point.
        assert [("test/bits_per_byte" in p) for p in run["curve"]] == [True] * 3
        assert run["curve"][-1]["flops"] == pytest.approx(
            3 * 4 * 24 * run["accounting"]["training_flops_per_token"]
        )
    values = {
        (r["model"], r["seed"], r["metric"]): r["value"]
        for r in results["records"]
        if r["task"] == "shakespeare_lm" and r["slice"] == "all"
    }
    for (model, seed, metric), value in values.items():
        if metric == "bits_per_byte":
            assert value == pytest.approx(values[model, seed, "answer_loss"] / np.log(2))
            assert 1.0 < value < 12.0  # an untrained byte model: near log2(259)
    # Equal FLOPs: each suite model's held-out curve at the smallest final FLOPs of its seed.
    for seed in (0, 1):
        runs = {r["model"]: r for r in lm if r["seed"] == seed}
        budget = min(runs[m]["curve"][-1]["flops"] for m in ("dense", "moe", "umv2"))
        for model in ("dense", "moe", "umv2"):
            xs = [p["flops"] for p in runs[model]["curve"]]
            ys = [p["test/bits_per_byte"] for p in runs[model]["curve"]]
            expected = np.interp(budget, xs, ys)
            got = values[model, seed, "bits_per_byte_at_equal_flops"]
            assert got == pytest.approx(expected), (model, seed)
    table = open(os.path.join(out, "results.md")).read()
    assert "| test | bits_per_byte | all |" in table
    assert "| test | bits_per_byte_at_equal_flops | all |" in table


def test_density_sweep_runs_variants_on_its_tasks_and_reports_them(finished):
    out, results = finished
    sweep_runs = {(r["task"], r["model"]) for r in results["runs"] if r["sweep"]}
    assert sweep_runs == {
        (task, model)
        for task in ("fact_base", "shakespeare_lm")
        for model in ("umv2.topk2", "umv2.keys6")
    }
    counts = {r["model"]: r["accounting"] for r in results["runs"] if r["task"] == "fact_base"}
    # topk at a fixed table: the same parameters; a smaller table: fewer.
    assert counts["umv2.topk2"]["total_params"] == counts["umv2"]["total_params"]
    assert counts["umv2.keys6"]["total_params"] < counts["umv2"]["total_params"]
    table = open(os.path.join(out, "results.md")).read()
    assert "## Activation density vs table size" in table
    assert "| umv2 |" in table and "| umv2.topk2 |" in table and "| umv2.keys6 |" in table
    assert "fact_base knowledge_bits | Δ vs base" in table
    assert "shakespeare_lm bits_per_byte | Δ vs base" in table
    # The main tables compare the suite's models only.
    assert "| split | metric | slice | dense | moe | umv2 | umv2 − dense |" in table
    assert "umv2.topk2 − " not in table
    # fact_base's capacity measures, derived from knowledge bits and the accounting.
    for r in results["records"]:
        if r["metric"] == "knowledge_bits_per_param":
            run = next(
                x
                for x in results["runs"]
                if (x["task"], x["model"], x["seed"]) == (r["task"], r["model"], r["seed"])
            )
            bits = next(
                x["value"]
                for x in results["records"]
                if (x["task"], x["model"], x["seed"], x["metric"], x["slice"], x["split"])
                == (r["task"], r["model"], r["seed"], "knowledge_bits", "all", "test")
            )
            assert r["value"] == pytest.approx(bits / run["accounting"]["total_params"])


def test_the_engram_baseline_is_matched_beside_moe_and_umv2():
    from umv2_jax.compare.suites import SUITES
    from umv2_jax.config import load_config

    suite = SUITES["quick"]
    configs = {m.name: load_config(m.config) for m in suite.models}
    assert "T-engram" in configs
    match = compare_run.check_matches(suite, configs)
    engram = [row for row in match["rows"] if "T-engram" in (row["model"], row["reference"])]
    assert len(match["rows"]) == 7 and len(engram) == 3 and match["ok"], match["table"]
