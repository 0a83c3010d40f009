"""Resharding checkpoints (umv2_jax/training/checkpoint.py): a run saved on one mesh restores onto
another mesh shape and another device count with identical values, and trains on.

One 8-fake-device subprocess trains 2 steps of a dense model on (data 8), restores that checkpoint
on (data 8) and on (fsdp 4, tensor 2), and continues the run to step 4 on each mesh; this process
(one device) restores the same checkpoint and continues it too. An UltraMemV2 model's initial
state (tables split on fsdp rows and tensor columns on the target) is saved on (data 8) and
restored on (fsdp 4, tensor 2). A checkpoint whose arrays the config cannot
hold stops with one CheckpointError naming the array and both shapes, and stays where it is.
"""

import json
import shutil
import textwrap
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from tests.fixtures import run_fresh
from tests.training.conftest import SPARSE, TINY
from umv2_jax.config import load_config
from umv2_jax.errors import CheckpointError
from umv2_jax.training import checkpoint, loop, state

BASE = TINY + [
    "model.sparse=none",
    "train.steps=4",
    "train.batch_size=8",
    "train.eval_every=4",
    "train.eval_batches=1",
    "train.log_every=1",
    "checkpoint.every=2",
]
MEMORY = TINY + SPARSE["umv2"]

PROGRAM = textwrap.dedent(
    """
    import json, os, shutil, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_compilation_cache_dir", sys.argv[3])
    import numpy as np
    from umv2_jax.config import load_config
    from umv2_jax.training import checkpoint, loop, state

    base, root = json.loads(sys.argv[1]), sys.argv[2]
    data8, grid = base + ["mesh.data=8"], base + ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"]
    quiet = dict(progress=False, echo=lambda line: None)
    first = loop.train(load_config(None, data8), f"{root}/data8", stop_after=2, **quiet)
    for name in ("grid", "one", "untouched"):
        shutil.copytree(f"{root}/data8", f"{root}/{name}")

    def restore(overrides):
        setup = state.plan(load_config(None, overrides))
        reader = checkpoint.Checkpointer(f"{root}/untouched", setup.config.checkpoint,
                                         read_only=True)
        step, train_state, rest, data = reader.restore_latest(setup.state, setup.rest)
        reader.close()
        return step, train_state, setup

    step8, on8, _ = restore(data8)
    stepg, ong, plan = restore(grid)
    leaves8, leavesg = jax.tree.leaves(on8), jax.tree.leaves(ong)
    np.savez(f"{root}/values.npz", *[np.asarray(x) for x in leaves8])
    placed = jax.tree.leaves(jax.tree.map(
        lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), ong, plan.state_shardings))
    split = [leaf for leaf in leavesg if leaf.sharding.shard_shape(leaf.shape) != leaf.shape]
    report = {
        "devices": jax.device_count(),
        "steps": [step8, stepg],
        "leaves": len(leaves8),
        "equal": [bool(np.array_equal(np.asarray(a), np.asarray(b)))
                  for a, b in zip(leaves8, leavesg)],
        "dtypes": [str(a.dtype) == str(b.dtype) for a, b in zip(leaves8, leavesg)],
        "placed": all(placed),
        "split_on_grid": len(split),
        "embed_spec": [a for a in ong["params"]["embed"].sharding.spec],
        "first": first.losses,
        "straight": loop.train(load_config(None, data8), f"{root}/data8", **quiet).losses,
        "grid": loop.train(load_config(None, grid), f"{root}/grid", **quiet).losses,
    }
    # UltraMemV2's tables [L, n², D] (rows on fsdp, D on tensor) and its non-trainable variables:
    # initialized on (data 8), saved, restored on (fsdp 4, tensor 2). No step is compiled.
    memory = json.loads(sys.argv[4])
    built = state.build(load_config(None, memory + ["mesh.data=8"]))
    writer = checkpoint.Checkpointer(f"{root}/memory", built.config.checkpoint)
    writer.save(0, built.state, built.rest, {"index": 0}, built.config, force=True)
    writer.close()
    target = state.plan(load_config(None, memory + ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"]))
    reader = checkpoint.Checkpointer(f"{root}/memory", target.config.checkpoint, read_only=True)
    _, memory_state, memory_rest, _ = reader.restore_latest(target.state, target.rest)
    reader.close()
    pairs = list(zip(jax.tree.leaves((built.state, built.rest)),
                     jax.tree.leaves((memory_state, memory_rest))))
    values = memory_state["params"]["shared"]["values"]
    report["memory"] = {
        "leaves": len(pairs),
        "rest_leaves": len(jax.tree.leaves(memory_rest)),
        "equal": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs),
        "values_spec": [a for a in values.sharding.spec],
        "values_shard": list(values.sharding.shard_shape(values.shape)),
        "values_shape": list(values.shape),
    }
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    cache = jax.config.jax_compilation_cache_dir or str(root / "xla_cache")
    report = run_fresh(PROGRAM, json.dumps(BASE), str(root), cache, json.dumps(MEMORY))
    with np.load(root / "values.npz") as saved:
        values = [saved[f"arr_{i}"] for i in range(report["leaves"])]
    return SimpleNamespace(report=report, values=values, root=root)


def test_a_data8_checkpoint_restores_on_fsdp4_tensor2_with_identical_values(resharded):
    report = resharded.report
    assert report["devices"] == 8 and report["steps"] == [2, 2]
    assert report["leaves"] > 10 and all(report["equal"]) and all(report["dtypes"])
    # Restored into the target mesh's shardings: the parameters and moments are split there.
    assert report["placed"]
    assert report["split_on_grid"] > report["leaves"] // 2
    assert report["embed_spec"] == ["tensor", "fsdp"]


def test_memory_tables_restore_split_on_rows_and_value_dimension(resharded):
    memory = resharded.report["memory"]
    assert memory["equal"] and memory["leaves"] > 20 and memory["rest_leaves"] > 0
    layers, rows, dim = memory["values_shape"]  # [L, n², D_v] on (fsdp 4, tensor 2)
    assert memory["values_spec"] == [None, "fsdp", "tensor"]
    assert memory["values_shard"] == [layers, rows // 4, dim // 2]


def test_the_resharded_run_trains_on_like_the_straight_run(resharded):
    report = resharded.report
    assert len(report["first"]) == 2 and len(report["straight"]) == len(report["grid"]) == 2
    np.testing.assert_allclose(report["grid"], report["straight"], rtol=2e-5)


def test_the_data8_checkpoint_restores_on_one_device_and_trains_on(resharded):
    assert jax.device_count() == 1
    config = load_config(None, BASE)
    setup = state.plan(config)
    reader = checkpoint.Checkpointer(
        str(resharded.root / "untouched"), config.checkpoint, read_only=True
    )
    step, train_state, _, _ = reader.restore_latest(setup.state, setup.rest)
    reader.close()
    leaves = jax.tree.leaves(train_state)
    assert step == 2 and len(leaves) == len(resharded.values)
    for restored, saved in zip(leaves, resharded.values):
        np.testing.assert_array_equal(np.asarray(restored), saved)
    run = loop.train(config, str(resharded.root / "one"), progress=False, echo=lambda line: None)
    np.testing.assert_allclose(run.losses, resharded.report["straight"], rtol=2e-5)


def test_a_checkpoint_of_other_shapes_is_one_checkpoint_error_and_stays(resharded, tmp_path):
    workdir = tmp_path / "other"
    shutil.copytree(resharded.root / "untouched", workdir)
    config = load_config(None, BASE + ["model.d_ff=96"])
    setup = state.plan(config)
    reader = checkpoint.Checkpointer(str(workdir), config.checkpoint)
    with pytest.raises(CheckpointError) as caught:
        reader.restore_latest(setup.state, setup.rest)
    reader.close()
    message = str(caught.value)
    assert "\n" not in message
    assert "state.params.blocks" in message and "ffn" in message, message
    assert "(32, 64)" in message or "(64, 32)" in message, message
    assert "(32, 96)" in message or "(96, 32)" in message, message
    assert "config.json" in message  # the fix
    # Not "unreadable": the checkpoint is where it was, not moved aside.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]
    assert not (workdir / "checkpoints_unreadable").exists()


def test_an_array_the_config_does_not_build_is_named(resharded, tmp_path):
    config = load_config(None, BASE + ["model.num_layers=1"])
    setup = state.plan(config)
    directory = str(resharded.root / "untouched" / "checkpoints" / "2" / "state")
    with pytest.raises(CheckpointError, match=r"holds array state\.params\.blocks\.1\."):
        checkpoint.check_restorable(directory, setup.state, "step 2")


def test_data_iterator_entries_follow_the_process(monkeypatch):
    states = [{"index": 3}, {"index": 3}]
    saved = {"format": checkpoint.DATA_FORMAT, "processes": states}
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert checkpoint._own_data_state({**saved, "processes": [{"i": 0}, {"i": 1}]}, "d") == {"i": 1}
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    assert checkpoint._own_data_state(saved, "d") == {"index": 3}  # 2 → 1 process: they agree
    assert checkpoint._own_data_state({"index": 5}, "d") == {"index": 5}  # one shared state
    with pytest.raises(CheckpointError, match="saved by 2 processes .* resume it with 2"):
        checkpoint._own_data_state({**saved, "processes": [{"i": 0}, {"i": 1}]}, "d")
