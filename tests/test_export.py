"""Export and import (umv2_jax/export.py) and the NumPy reference forward (umv2_jax/reference_numpy.py).

Run directories are made without training (`state.build` saved by the Checkpointer, as the loop
would), except for the slow test on a trained run. Round trips compare every tensor's bytes; the
reference forward is compared with our logits after checking that no top-k selection is a near tie.
The 4-device import runs in a fresh subprocess (the device count is fixed when JAX starts).
"""

from __future__ import annotations

import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.fixtures import run_fresh
from tests.training.conftest import SPARSE, TINY
from umv2_jax import export
from umv2_jax import reference_numpy as ref
from umv2_jax.config import load_config
from umv2_jax.data import run_tokenizer, tokenizers
from umv2_jax.generate import load_run
from umv2_jax.training import checkpoint, state

UMV2 = TINY + SPARSE["umv2"]
DENSE = TINY
MOE = TINY + SPARSE["moe"]


def make_run(workdir, overrides, steps=(1, 2)) -> str:
    """A run directory with checkpoints at `steps` (the initial state; earlier steps' embedding
    shifted by the step so that steps differ), the config and the byte tokenizer's identity."""
    workdir = str(workdir)
    config = load_config(None, overrides)
    setup = state.build(config)
    checkpoint.write_config(workdir, config)
    run_tokenizer.save(workdir, tokenizers.byte_tokenizer())
    writer = checkpoint.Checkpointer(workdir, config.checkpoint)
    for step in steps:
        params = dict(setup.state["params"])
        params["embed"] = params["embed"] + (steps[-1] - step)
        saved = dict(setup.state, params=params, step=jnp.int32(step))
        writer.save(step, saved, setup.rest, {"index": step}, config, force=True)
    writer.close()
    return workdir


def snapshot(directory) -> dict:
    """{relative path: (size, mtime)} of every file below `directory`."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = (
                os.path.getsize(path),
                os.path.getmtime(path),
            )
    return found


def same_bytes(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_trees_bitwise(got, want):
    got_flat, want_flat = export.flatten(got), export.flatten(want)
    assert list(got_flat) == list(want_flat)
    for name in want_flat:
        assert same_bytes(got_flat[name], want_flat[name]), name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run directories: UltraMemV2 as a loop model and scanned, and a dense loop model."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "loop": make_run(root / "loop", UMV2 + ["model.scan_layers=false"]),
        "scan": make_run(root / "scan", UMV2 + ["model.scan_layers=true"]),
        "dense": make_run(root / "dense", DENSE + ["model.scan_layers=true"], steps=(2,)),
    }


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    made = {}
    for name in ("loop", "scan", "dense"):
        made[name] = str(root / name)
        export.export_run(runs[name], made[name])
    made["unscanned"] = str(root / "unscanned")
    export.export_run(runs["scan"], made["unscanned"], unscanned=True)
    return made


# ---- the format ---------------------------------------------------------------------------------


def test_export_writes_shards_index_config_tokenizer_and_readme(runs, exports):
    directory = exports["loop"]
    assert sorted(os.listdir(directory)) == sorted(
        [
            "model-00001-of-00001.safetensors",
            export.INDEX_FILE,
            "config.json",
            "README.md",
            "tokenizer",
        ]
    )
    with open(os.path.join(directory, export.INDEX_FILE)) as handle:
        index = json.load(handle)
    _, _, params, rest, step = load_run(runs["loop"])
    names = {**export.flatten(params), **export.flatten(rest, "rest.")}
    assert set(index["weight_map"]) == set(names)
    assert "blocks.1.sparse.retrieval.keys" in names and "rest.blocks.0.sparse.permutation" in names
    assert index["metadata"]["total_size"] == sum(np.asarray(a).nbytes for a in names.values())
    assert index["metadata"]["step"] == step == 2 and index["metadata"]["layout"] == [[0], [1]]
    with open(os.path.join(directory, "config.json")) as handle:
        saved = json.load(handle)
    with open(os.path.join(runs["loop"], "config.json")) as handle:
        assert saved["model"] == json.load(handle)["model"]
    assert os.path.isfile(os.path.join(directory, "tokenizer", "identity.json"))
    readme = open(os.path.join(directory, "README.md")).read()
    for name, array in names.items():
        assert f"| `{name}` | {list(np.shape(array))} | {np.asarray(array).dtype.name} |" in readme


def test_export_never_writes_into_the_run(runs, tmp_path):
    before = snapshot(runs["loop"])
    export.export_run(runs["loop"], str(tmp_path / "again"), step=1)
    assert snapshot(runs["loop"]) == before


# ---- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["loop", "scan", "dense"])
def test_round_trip_is_bitwise(runs, exports, kind):
    _, _, params, rest, _ = load_run(runs[kind])
    config, parts, got_params, got_rest = export.load_pretrained(exports[kind])
    assert_trees_bitwise(got_params, params)
    assert_trees_bitwise(got_rest, rest)
    assert config.model.resolved_scan_layers == (kind != "loop")
    parts.build(got_params, got_rest)  # the parts rebuild the model


def test_unscanned_export_imports_into_the_scanned_layout_bitwise(runs, exports):
    index = export.read_index(exports["unscanned"])
    assert not any(".layers." in name for name in index.shapes)
    assert index.metadata["layout"] == [[0], [1]]
    _, _, params, rest, _ = load_run(runs["scan"])
    config, _, got_params, got_rest = export.load_pretrained(exports["unscanned"])
    assert not config.model.resolved_scan_layers
    assert "layers" not in got_params["blocks"][0]
    config, _, got_params, got_rest = export.load_pretrained(
        exports["unscanned"], overrides=["model.scan_layers=true"]
    )
    assert config.model.resolved_scan_layers
    assert_trees_bitwise(got_params, params)
    assert_trees_bitwise(got_rest, rest)


def test_a_loop_export_imports_into_a_scanned_model_and_back(runs, exports):
    _, _, scanned, _, _ = load_run(runs["scan"])
    _, _, loop_params, loop_rest, _ = load_run(runs["loop"])
    _, _, got, got_rest = export.load_pretrained(
        exports["loop"], overrides=["model.scan_layers=true"]
    )
    stacked = got["blocks"][0]["layers"]["attn"]["query"]
    assert stacked.shape[0] == 2
    assert same_bytes(stacked[1], loop_params["blocks"][1]["attn"]["query"])
    assert same_bytes(
        got_rest["blocks"][0]["layers"]["sparse"]["permutation"][1],
        loop_rest["blocks"][1]["sparse"]["permutation"],
    )
    assert jax.tree.structure(got) == jax.tree.structure(scanned)


def test_step_small_shards_and_bfloat16(runs, tmp_path):
    directory = str(tmp_path / "bf16")
    summary = export.export_run(
        runs["loop"], directory, step=1, dtype="bfloat16", shard_size=20_000
    )
    assert summary["step"] == 1 and len(summary["files"]) > 2
    index = export.read_index(directory)
    assert set(index.weight_map.values()) == set(summary["files"])
    assert (
        index.dtypes["embed"] == "BF16"
        and index.dtypes["rest.blocks.0.sparse.permutation"] == "I32"
    )
    _, _, params, rest, _ = export.restore_run(runs["loop"], 1)
    config, _, got, got_rest = export.load_pretrained(directory)
    assert config.model.param_dtype == "bfloat16"
    assert_trees_bitwise(got, jax.tree.map(lambda a: a.astype(jnp.bfloat16), params))
    assert_trees_bitwise(got_rest, rest)
    # step 1's embedding is step 2's plus one (make_run): --step picked step 1.
    _, _, latest, _, _ = load_run(runs["loop"])
    np.testing.assert_allclose(
        np.asarray(got["embed"], np.float32),
        np.asarray(latest["embed"] + 1, np.float32),
        rtol=1e-2,
    )


# ---- the NumPy reference forward ----------------------------------------------------------------


def our_logits(directory, tokens):
    _, parts, params, rest = export.load_pretrained(directory)
    logits, _ = jax.jit(lambda p, r, t: parts.build(p, r)(t))(params, rest, jnp.asarray(tokens))
    return np.asarray(logits, np.float64)


def compare_with_reference(directory, seeds=(0, 1), batch=2, seq=24, near_tie=None):
    """Our logits vs the reference's on random tokens, to 1e-4 of the largest |logit|.

    near_tie None: every seed's selections must be clear (min gap > 1e-4). Otherwise seeds whose
    smallest selection gap is below `near_tie` (float32 rounding may order those candidates
    either way) are skipped; at least one seed must be compared."""
    tensors, model = ref.load(directory)
    compared = 0
    for seed in seeds:
        tokens = np.random.default_rng(seed).integers(0, model["vocab_size"], (batch, seq))
        reference, info = ref.forward(model, tensors, tokens, return_info=True)
        if info["min_gap"] is not None:
            if near_tie is None:
                assert info["min_gap"] > 1e-4, info["min_gap"]
            elif info["min_gap"] < near_tie:
                continue
        ours = our_logits(directory, tokens)
        assert ours.shape == reference.shape == (batch, seq, -(-model["vocab_size"] // 128) * 128)
        scale = np.abs(reference).max()
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4 * scale)
        compared += 1
    assert compared >= 1


@pytest.mark.parametrize("kind", ["loop", "scan", "dense"])
def test_numpy_reference_forward_equals_ours(exports, kind):
    compare_with_reference(exports[kind])


def test_numpy_reference_reads_an_unscanned_export_the_same(exports):
    tokens = np.random.default_rng(3).integers(0, 259, (1, 16))
    tensors, model = ref.load(exports["scan"])
    flat, model_u = ref.load(exports["unscanned"])
    np.testing.assert_array_equal(
        ref.forward(model, tensors, tokens), ref.forward(model_u, flat, tokens)
    )


def test_numpy_reference_selects_the_rows_the_model_selects(exports):
    """The memory layer's rows, ours (from the layer's own retrieval) vs the reference's."""
    tensors, model = ref.load(exports["loop"])
    tokens = np.random.default_rng(5).integers(0, 259, (2, 16))
    _, info = ref.forward(model, tensors, tokens, return_info=True)
    _, parts, params, rest = export.load_pretrained(exports["loop"])
    net = parts.build(params, rest)
    x = jnp.take(net.embed[...], jnp.asarray(tokens), axis=0)
    positions = jnp.broadcast_to(jnp.arange(16), tokens.shape)
    from umv2_jax.models.sparse import SparseContext
    from umv2_jax.models.transformer import _layer_shared

    for index, block in enumerate(net.blocks):
        x_mid = x + block.attn(block.attn_norm(x), positions)
        u = block.ffn_norm(x_mid).reshape(-1, x.shape[-1])
        grid = block.sparse.retrieval(u).grid_indices
        _, window_rows, _ = block.sparse.physical_rows(grid)
        np.testing.assert_array_equal(np.asarray(window_rows), info["rows"][index])
        context = SparseContext(shared=_layer_shared(net.shared, index))
        x = block(x, positions, context)[0]


def test_numpy_reference_forward_moe(tmp_path):
    run = make_run(tmp_path / "moe", MOE, steps=(1,))
    export.export_run(run, str(tmp_path / "out"))
    compare_with_reference(str(tmp_path / "out"), seeds=(0,))


def test_numpy_reference_refuses_other_sparse_layers():
    with pytest.raises(ref.Unsupported, match="pkm"):
        ref.forward({"sparse": "pkm"}, {}, np.zeros((1, 2), int))
    with pytest.raises(ref.Unsupported, match="dropless"):
        ref.forward({"sparse": "moe", "moe": {"capacity_factor": 1.25}}, {}, np.zeros((1, 2), int))


@pytest.mark.slow
def test_numpy_reference_on_a_trained_run(tmp_path):
    from umv2_jax.training import loop

    config = load_config(
        "configs/tiny_umv2.yaml",
        [
            "train.steps=30",
            "checkpoint.every=30",
            "train.eval_every=30",
            "train.eval_batches=1",
            "train.batch_size=4",
            "data.seq_len=32",
        ],
    )
    loop.train(config, str(tmp_path / "run"), progress=False, echo=lambda line: None)
    export.export_run(str(tmp_path / "run"), str(tmp_path / "out"))
    compare_with_reference(str(tmp_path / "out"), seeds=(0, 1, 2, 3), seq=32, near_tie=2e-5)


# ---- bad input: one line, exit status 2, nothing written ----------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = export.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line(err: str, *needles: str):
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def test_cli_export_and_check(runs, tmp_path, capsys):
    out = str(tmp_path / "cli")
    code = export.main(["--workdir", runs["loop"], "--out", out, "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and summary["tensors"] == len(export.read_index(out).shapes)
    code = export.main(["--from", out, "--check", "--json"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and report["bitwise"] and report["max_rel_diff"] < 1e-4


def test_a_run_without_checkpoints(tmp_path, capsys):
    workdir = tmp_path / "empty"
    workdir.mkdir()
    checkpoint.write_config(str(workdir), load_config(None, DENSE))
    code, err = run_cli(capsys, "--workdir", str(workdir), "--out", str(tmp_path / "out"))
    assert code == 2
    assert_one_line(err, "no checkpoint", "train first")
    assert not (tmp_path / "out").exists() and sorted(os.listdir(workdir)) == ["config.json"]


def test_a_step_that_does_not_exist(runs, tmp_path, capsys):
    code, err = run_cli(
        capsys, "--workdir", runs["loop"], "--out", str(tmp_path / "out"), "--step", "7"
    )
    assert code == 2
    assert_one_line(err, "step 7", "[1, 2]")
    assert os.listdir(tmp_path) == []


def test_a_non_empty_out_without_overwrite(runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "--workdir", runs["loop"], "--out", str(out))
    assert code == 2
    assert_one_line(err, "not empty", "--overwrite")
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["out"]


def test_an_out_inside_the_run(runs, capsys):
    before = snapshot(runs["loop"])
    code, err = run_cli(capsys, "--workdir", runs["loop"], "--out", runs["loop"] + "/export")
    assert code == 2
    assert_one_line(err, "inside the run directory", "outside it")
    assert snapshot(runs["loop"]) == before


def copy_export(source, target) -> str:
    import shutil

    shutil.copytree(source, target)
    return str(target)


def rewrite_shard(directory, change):
    """Applies change(tensors dict) to the single shard and rewrites the index to match."""
    from safetensors.numpy import save_file

    index = export.read_index(directory)
    (file,) = set(index.weight_map.values())
    tensors, _ = ref.load(directory)
    change(tensors)
    save_file(tensors, os.path.join(directory, file))
    path = os.path.join(directory, export.INDEX_FILE)
    with open(path) as handle:
        data = json.load(handle)
    data["weight_map"] = {name: file for name in tensors}
    with open(path, "w") as handle:
        json.dump(data, handle)


def test_an_export_with_a_missing_shard(runs, tmp_path, capsys):
    directory = str(tmp_path / "sharded")
    export.export_run(runs["loop"], directory, shard_size=50_000)
    (second,) = [name for name in os.listdir(directory) if name.startswith("model-00002-of-")]
    os.remove(os.path.join(directory, second))
    before = snapshot(directory)
    code, err = run_cli(capsys, "--from", directory, "--check")
    assert code == 2
    assert_one_line(err, "missing shard model-00002-of-", "copy the whole export")
    assert snapshot(directory) == before


def test_a_tensor_whose_shape_does_not_fit_the_config(exports, tmp_path, capsys):
    code, err = run_cli(capsys, "--from", exports["loop"], "--check", "--set", "model.d_ff=96")
    assert code == 2
    assert_one_line(err, "blocks.0.ffn.down", "[64, 32]", "[96, 32]")
    directory = copy_export(exports["loop"], tmp_path / "bad_shape")
    rewrite_shard(directory, lambda t: t.update(embed=t["embed"][:-1]))
    with pytest.raises(
        export.CheckpointError,
        match=r"tensor embed has shape \[383, 32\] but the config builds \[384, 32\]",
    ):
        export.load_pretrained(directory)


def test_an_unknown_or_missing_tensor(exports, tmp_path, capsys):
    unknown = copy_export(exports["loop"], tmp_path / "unknown")
    rewrite_shard(unknown, lambda t: t.update(extra=np.zeros((3,), np.float32)))
    code, err = run_cli(capsys, "--from", unknown, "--check")
    assert code == 2
    assert_one_line(err, "tensor extra of shape [3]", "does not build")
    missing = copy_export(exports["loop"], tmp_path / "missing")
    rewrite_shard(missing, lambda t: t.pop("rest.blocks.1.sparse.permutation"))
    code, err = run_cli(capsys, "--from", missing, "--check")
    assert code == 2
    assert_one_line(err, "no tensor rest.blocks.1.sparse.permutation")


# ---- onto a 4-device mesh -----------------------------------------------------------------------

MESH_PROGRAM = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_compilation_cache_dir", sys.argv[3])
    import numpy as np
    from umv2_jax import export

    report = {"devices": jax.device_count()}
    for name, overrides in json.loads(sys.argv[2]).items():
        config, parts, params, rest = export.load_pretrained(sys.argv[1], overrides=overrides)
        values = params["shared"]["values"]
        flat = export.flatten(params)
        report[name] = {
            "split": sum(a.sharding.shard_shape(a.shape) != a.shape for a in flat.values()),
            "values_shard": list(values.sharding.shard_shape(values.shape)),
            "values_shape": list(values.shape),
            "check": export.check_export(sys.argv[1], overrides),
        }
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def on_four_devices(exports, tmp_path_factory):
    meshes = {
        "fsdp4": ["mesh.data=1", "mesh.fsdp=4"],
        "data2_tensor2": ["mesh.data=2", "mesh.tensor=2", "model.scan_layers=true"],
    }
    cache = jax.config.jax_compilation_cache_dir or str(tmp_path_factory.mktemp("xla"))
    return run_fresh(MESH_PROGRAM, exports["loop"], json.dumps(meshes), cache)


def test_import_onto_four_devices_is_bitwise_and_split(on_four_devices):
    report = on_four_devices
    assert report["devices"] == 4
    for name in ("fsdp4", "data2_tensor2"):
        check = report[name]["check"]
        assert check["devices"] == 4 and check["bitwise"], (name, check)
        assert report[name]["split"] > 0
        assert check["max_rel_diff"] < 1e-4, (name, check)
    layers, rows, dim = report["fsdp4"]["values_shape"]
    assert report["fsdp4"]["values_shard"] == [layers, rows // 4, dim]
    assert report["data2_tensor2"]["values_shard"] == [layers, rows, dim // 2]
