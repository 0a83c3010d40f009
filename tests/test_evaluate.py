"""`python -m umv2_jax.evaluate` (umv2_jax/evaluate.py) and the params-only restore
(umv2_jax/training/restore.py): the trainer's own eval numbers come back, nothing is written into
the run, no optimizer state is read, row-usage counts, one-line errors for bad input."""

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.training.conftest import SPARSE, TINY
from umv2_jax.config import load_config
from umv2_jax.evaluate import main
from umv2_jax.training import loop, restore

QUIET = {"progress": False, "echo": lambda line: None}
REPO = Path(__file__).resolve().parents[1]
STEPS = ["train.steps=4", "train.eval_every=4", "checkpoint.every=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny UltraMemV2 run: checkpoints at steps 2 and 4, the trainer's evaluation at step 4."""
    workdir = str(tmp_path_factory.mktemp("run"))
    loop.train(load_config(None, TINY + SPARSE["umv2"] + STEPS), workdir, **QUIET)
    return workdir


def _snapshot(root: str) -> dict[str, tuple]:
    """{path: (size, mtime_ns, sha256)} of every file and folder under `root`."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            digest = None
            if os.path.isfile(path):
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            found[os.path.relpath(path, root)] = (info.st_size, info.st_mtime_ns, digest)
    return found


def _run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _trainer_eval(workdir: str, step: int) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    return next(r for r in records if r["step"] == step and "eval_loss" in r)


def test_evaluate_equals_the_trainers_eval_and_writes_nothing(run, tmp_path):
    before = _snapshot(run)
    usage_path = str(tmp_path / "usage.npz")
    code, out, err = _run_main(["--workdir", run, "--json", "--row-usage", usage_path])
    assert code == 0, err
    report = json.loads(out)
    trainer = _trainer_eval(run, 4)
    assert report["step"] == 4
    assert report["loss"] == pytest.approx(trainer["eval_loss"], rel=1e-6)
    assert report["bits_per_byte"] == pytest.approx(trainer["eval_bpb"], rel=1e-6)
    assert report["perplexity"] == pytest.approx(np.exp(trainer["eval_loss"]), rel=1e-6)
    for key, value in trainer.items():  # every per-layer diagnostic of the trainer's evaluation
        if key.startswith("eval/"):
            assert report["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert set(report["memory"]) == {"0", "1"}
    assert 0 < report["memory"]["0"]["rows_hit_fraction_window"] <= 1

    usage = np.load(usage_path)
    assert set(usage.files) == {
        "counts",
        "tokens",
        "config_name",
        "step",
        "source",
        "split",
        "blocks",
    }
    counts, tokens = usage["counts"], int(usage["tokens"])
    memory = load_config(None, TINY + SPARSE["umv2"]).model.memory
    assert counts.dtype == np.int64 and counts.shape == (2, memory.n_keys**2)
    assert usage["tokens"].dtype == np.int64 and tokens == report["tokens"] > 0
    assert int(usage["step"]) == 4 and str(usage["config_name"]) == report["config_name"]
    # Each evaluated position selects heads × top-m rows, a row at most once per position.
    slots = memory.num_heads * memory.topk if hasattr(memory, "num_heads") else None
    assert (counts <= tokens).all() and (counts.sum(axis=1) > 0).all()
    if slots is not None:
        assert (counts.sum(axis=1) <= tokens * slots).all()
    # Rows counted are rows hit (the hit mask also covers PAD positions, so it may hold more).
    hit_fraction = (counts > 0).sum(axis=1) / memory.n_keys**2
    for layer in range(2):
        assert (
            hit_fraction[layer] <= report["metrics"][f"eval/layer{layer}/rows_hit_fraction_window"]
        )
    assert _snapshot(run) == before


def test_an_earlier_step_and_the_text_report(run):
    code, out, err = _run_main(["--workdir", run, "--step", "2", "--max-tokens", "100"])
    assert code == 0, err
    assert out.startswith("[default, step 2] shakespeare (validation): 1 batch(es), 128 tokens")
    assert "nats/token" in out and "perplexity" in out and "layer 1:" in out


def test_a_relative_workdir_works(run, monkeypatch):
    """orbax refuses relative checkpoint paths; `--workdir runs/x` from the shell must still work."""
    from umv2_jax.generate import load_run

    monkeypatch.chdir(os.path.dirname(run))
    code, out, err = _run_main(["--workdir", os.path.basename(run), "--max-tokens", "100"])
    assert code == 0, err
    assert "loss" in out
    assert load_run(os.path.basename(run))[-1] == 4  # generate's restore, given a relative path


def test_restore_reads_parameters_only(run, monkeypatch):
    """orbax is asked for state.params (a partial restore) and rest: never opt_state."""
    import orbax.checkpoint as ocp

    asked = []
    original = ocp.PyTreeCheckpointer.restore

    def spy(self, directory, *args, **kwargs):
        asked.append((os.path.basename(str(directory)), kwargs["args"]))
        return original(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", spy)
    config, parts, params, rest, step = restore.load_params(run)
    assert step == 4
    assert [name for name, _ in asked] == ["state", "rest"]
    state_args = asked[0][1]
    assert state_args.partial_restore and set(state_args.item) == {"params"}
    assert set(parts.params_template.to_pure_dict()) == set(params)
    # What was restored is exactly the parameters' bytes (the checkpoint holds ~3x that).
    import jax

    restored = sum(x.nbytes for x in jax.tree.leaves(params))
    expected = sum(
        np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(parts.params_template)
    )
    assert restored == expected


def test_generate_load_run_is_params_only(run, monkeypatch):
    from umv2_jax import generate

    calls = []
    monkeypatch.setattr(restore, "load_params", lambda workdir: calls.append(workdir) or "ok")
    assert generate.load_run(run) == "ok" and calls == [run]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--step", "3"], "has no checkpoint at step 3; saved steps: 2, 4"),
        (["--source", "nosuch:x"], "'data.source': 'nosuch:x'"),
        (["--tokenizer", "sentencepiece:shakespeare_bpe2048"], "is not the tokenizer the run"),
        (["--source", "files:/nonexistent/*.txt"], "/nonexistent"),
        (["--mesh", "data=3"], "need 3 devices"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, argv, message):
    before = _snapshot(run)
    usage = str(tmp_path / "usage.npz")
    code, out, err = _run_main(["--workdir", run, "--row-usage", usage, *argv])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not os.path.exists(usage) and os.listdir(tmp_path) == []
    assert _snapshot(run) == before


def test_a_run_without_checkpoints_and_usage_inside_the_run(run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(os.path.join(run, "config.json"), empty / "config.json")
    code, out, err = _run_main(["--workdir", str(empty)])
    assert code == 2 and err.count("\n") == 1 and "holds no checkpoint" in err, err
    assert sorted(os.listdir(empty)) == ["config.json"]  # no checkpoints/ created
    code, _, err = _run_main(["--workdir", str(tmp_path / "missing")])
    assert code == 2 and "holds no run" in err and not (tmp_path / "missing").exists()
    before = _snapshot(run)
    code, _, err = _run_main(["--workdir", run, "--row-usage", os.path.join(run, "u.npz")])
    assert code == 2 and "inside the run directory" in err, err
    assert _snapshot(run) == before


def test_lm_eval_without_the_package_is_one_line(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval → ImportError
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    code, out, err = _run_main(["--workdir", run, "--lm-eval", "hellaswag"])
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "needs the lm-eval package" in err and "umv2-jax[eval]" in err


@pytest.fixture
def shared_tmp():
    """A temporary folder another user can reach (pytest's own is private to its user)."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="umv2_evaluate_"))
    os.chmod(base, 0o755)
    yield base
    for folder, _dirs, _files in os.walk(base):
        os.chmod(folder, 0o755)
    shutil.rmtree(base, ignore_errors=True)


def test_read_only_directory_on_a_two_device_mesh(run, shared_tmp):
    """A real read-only run directory (another user, no write permission anywhere in it) on a
    data=2 mesh: the trainer's numbers and the single-device row counts come back."""
    tmp_path = shared_tmp
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    os.chmod(out_dir, 0o777)
    for folder, _dirs, files in os.walk(copy):
        for name in files:
            os.chmod(os.path.join(folder, name), 0o444)
        os.chmod(folder, 0o555)
    before = _snapshot(str(copy))
    usage = str(out_dir / "usage.npz")
    code = (
        "import sys, jax; jax.config.update('jax_num_cpu_devices', 2); "
        "from umv2_jax.evaluate import main; sys.exit(main(sys.argv[1:]))"
    )
    command = [sys.executable, "-c", code, "--workdir", str(copy), "--mesh", "data=2"]
    command += ["--json", "--row-usage", usage]
    if os.geteuid() == 0 and shutil.which("setpriv"):  # root ignores permissions: drop to nobody
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(out_dir)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=out_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    trainer = _trainer_eval(run, 4)
    assert report["loss"] == pytest.approx(trainer["eval_loss"], rel=1e-5)
    assert report["bits_per_byte"] == pytest.approx(trainer["eval_bpb"], rel=1e-5)
    assert _snapshot(str(copy)) == before
    # The same counts as on one device (the layer's counts are summed over the data axis).
    single = str(tmp_path / "single.npz")
    code, _, err = _run_main(["--workdir", run, "--row-usage", single])
    assert code == 0, err
    np.testing.assert_array_equal(np.load(usage)["counts"], np.load(single)["counts"])


def test_task_source_reports_task_metrics(tmp_path):
    workdir = str(tmp_path / "task")
    task = ["data.source=task:mqar", "data.seq_len=32", "data.task.mix=[[32,4]]"]
    config = load_config(None, TINY + task + STEPS)
    loop.train(config, workdir, **QUIET)
    code, out, err = _run_main(["--workdir", workdir, "--json"])
    assert code == 0, err
    report = json.loads(out)
    trainer = _trainer_eval(workdir, 4)
    assert report["loss"] == pytest.approx(trainer["eval_loss"], rel=1e-6)
    assert "exact_match/all" in report["task"] and 0 <= report["task"]["exact_match/all"] <= 1
    assert "answer_loss/all" in report["task"]


def test_row_token_counts_against_numpy():
    import jax.numpy as jnp

    from umv2_jax.models.ultramem_v2 import row_token_counts

    rng = np.random.default_rng(0)
    rows = rng.integers(0, 10, size=(2, 7, 3))  # [heads, tokens, m], with repeats within tokens
    mask = rng.integers(0, 2, size=7)
    got = np.asarray(row_token_counts(jnp.asarray(rows, jnp.int32), jnp.asarray(mask), 10))
    want = np.zeros(10, np.int64)
    for t in range(7):
        for r in set(rows[:, t].ravel().tolist()):
            want[r] += mask[t]
    np.testing.assert_array_equal(got, want)


def test_table_counts_follow_the_value_sharing_windows():
    from umv2_jax.evaluate import table_counts

    overrides = SPARSE["umv2"] + ["model.num_layers=3", "model.memory.value_share=ring:2"]
    config = load_config(None, TINY + overrides)
    rows = config.model.memory.n_keys**2
    blocks = list(config.model.sparse_layer_indices())
    window = {block: np.arange(2 * rows) + 1000 * layer for layer, block in enumerate(blocks)}
    counts, got_blocks = table_counts(config, window)
    assert counts.shape == (3, rows) and got_blocks.tolist() == blocks
    # ring:2 over 3 tables: layer l reads tables l and l+1 (mod 3), in that row order.
    want = np.zeros((3, rows), np.int64)
    for layer in range(3):
        for position, table in enumerate([layer, (layer + 1) % 3]):
            want[table] += window[blocks[layer]][position * rows : (position + 1) * rows]
    np.testing.assert_array_equal(counts, want)
