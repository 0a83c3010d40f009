"""Logical axes → mesh shardings (umv2_jax/parallel.py), on 8 fake CPU devices.

`jax_num_cpu_devices` must be set before JAX initializes its backend, which the suite's own process
has long done, so the multi-device checks run in a fresh interpreter."""

import json
import re
import textwrap

import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from tests.fixtures import run_fresh
from tests.training.conftest import SPARSE, TINY
from umv2_jax import parallel
from umv2_jax.training import loop

MESH = ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "mesh.expert=2"]


def _one_device_losses(overrides: list[str], tmp_path) -> list[float]:
    """The same run's losses on this process's single device (the reference of a mesh run)."""
    from umv2_jax.config import load_config

    run = loop.train(
        load_config(None, overrides), str(tmp_path / "single"), progress=False, echo=lambda _: None
    )
    return run.losses


PROGRAM = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    from umv2_jax.config import load_config
    from umv2_jax.training import loop, state
    overrides = json.loads(sys.argv[1])
    config = load_config(None, overrides + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    setup = state.build(config)
    specs = {k: list(v.spec) for k, v in [
        ("embed", setup.state_shardings["params"]["embed"]),
        ("gate", setup.state_shardings["params"]["blocks"][0]["ffn"]["gate"]),
    ]}
    result = loop.train(config, sys.argv[2], progress=False, echo=lambda line: None)
    print(json.dumps({"losses": result.losses, "devices": jax.device_count(), "specs": specs}))
    """
)


def test_eight_device_mesh_matches_one_device(tmp_path):
    overrides = TINY + ["train.steps=3", "train.batch_size=8", "train.eval_every=3"]
    report = run_fresh(PROGRAM, json.dumps(overrides), str(tmp_path / "mesh"))
    assert report["devices"] == 8
    # embed [vocab, embed] → (tensor, fsdp); SwiGLU gate [embed, mlp] → (fsdp, tensor).
    assert report["specs"] == {
        "embed": ["tensor", "fsdp"],
        "gate": ["fsdp", "tensor"],
    }
    np.testing.assert_allclose(report["losses"], _one_device_losses(overrides, tmp_path), rtol=2e-5)


# Every parameter and optimizer-state leaf of a built sparse model: its logical axes, its kind,
# and the sharding the array actually has on a (data 1, fsdp 2, tensor 2, expert 2) mesh.
SHARDINGS = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    from flax import nnx
    from umv2_jax.config import load_config
    from umv2_jax.models.init import ValueParam
    from umv2_jax.models.transformer import Transformer
    from umv2_jax.training import state as state_lib

    def spec(array):
        return [list(a) if isinstance(a, tuple) else a for a in array.sharding.spec]

    report = {}
    for name, overrides in json.loads(sys.argv[1]).items():
        config = load_config(None, overrides)
        abstract = nnx.eval_shape(lambda: Transformer(config.model, nnx.Rngs(0)))
        variables = jax.tree_util.tree_flatten_with_path(
            nnx.state(abstract, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
        setup = state_lib.build(config)
        arrays = dict((jax.tree_util.keystr(p), x) for p, x in
                      jax.tree_util.tree_flatten_with_path(setup.state["params"])[0])
        params = {}
        for path, variable in variables:
            array = arrays[jax.tree_util.keystr(path)]
            params[jax.tree_util.keystr(path)] = {
                "axes": variable.get_metadata().get("out_sharding"),
                "values": isinstance(variable, ValueParam),
                "spec": spec(array),
                "shard": list(array.sharding.shard_shape(array.shape)),
            }
        opt = [[jax.tree_util.keystr(p), spec(x), list(x.shape)] for p, x in
               jax.tree_util.tree_flatten_with_path(setup.state["opt_state"])[0]]
        report[name] = {"params": params, "opt": opt, "devices": jax.device_count()}
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def sparse_shardings():
    configs = {name: TINY + SPARSE[name] + MESH for name in ("umv2", "moe")}
    return run_fresh(SHARDINGS, json.dumps(configs))


def test_memory_value_tables_are_split_along_the_value_dimension(sparse_shardings):
    params = sparse_shardings["umv2"]["params"]
    assert sparse_shardings["umv2"]["devices"] == 8
    tables = {path: p for path, p in params.items() if p["values"]}
    assert set(tables) == {"['shared']['values']", "['shared']['pre_values']"}
    # docs/model.md: dimension-wise memory parallelism: [layers, rows, D] with D over `tensor`, rows over fsdp.
    values, pre_values = tables["['shared']['values']"], tables["['shared']['pre_values']"]
    assert values["axes"] == pre_values["axes"] == ["layers", "mem_rows", "mem_dim"]
    assert values["spec"] == pre_values["spec"] == [None, "fsdp", "tensor"]
    assert values["shard"] == [2, 144 // 2, 16 // 2]  # value_dim 16
    assert pre_values["shard"] == [2, 144 // 2, 8 // 2]  # pre_value_dim 8
    # The projections on either side of the tables are split the same way along mem_dim.
    assert params["['blocks'][0]['sparse']['pre_value_proj']"]["spec"] == ["fsdp", "tensor"]
    assert params["['blocks'][0]['sparse']['output_proj']"]["spec"] == ["tensor", "fsdp"]


def test_moe_experts_are_split_over_the_expert_axis(sparse_shardings):
    params = sparse_shardings["moe"]["params"]
    for block in (0, 1):
        layer = f"['blocks'][{block}]['sparse']"
        for name in ("gate", "up"):  # [experts 4, embed 32, mlp 16]
            assert params[f"{layer}['{name}']"]["spec"] == ["expert", "fsdp", "tensor"]
            assert params[f"{layer}['{name}']"]["shard"] == [2, 16, 8]
        assert params[f"{layer}['down']"]["spec"] == ["expert", "tensor", "fsdp"]
        assert params[f"{layer}['down']"]["shard"] == [2, 8, 16]
        assert params[f"{layer}['router']"]["spec"] == ["fsdp", "expert"]  # [embed, experts]


@pytest.mark.parametrize("name", ["umv2", "moe"])
def test_optimizer_moments_take_each_parameters_sharding(sparse_shardings, name):
    report = sparse_shardings[name]
    moments = []  # (parameter path, sharding spec) of every Adam mu / nu leaf
    for path, spec, _ in report["opt"]:
        match = re.search(r"\.(mu|nu)(\[.*)$", path)
        if match:
            moments.append((match.group(2), spec))
    for path, param in report["params"].items():
        # Each parameter's mu and nu live in exactly one group (default or values), sharded like it.
        found = [spec for moment_path, spec in moments if moment_path == path]
        assert found == [param["spec"]] * 2, (path, found)
    assert len(moments) == 2 * len(report["params"])
    others = [spec for path, spec, _ in report["opt"] if not re.search(r"\.(mu|nu)\[", path)]
    assert others and all(all(a is None for a in spec) for spec in others)  # counts: replicated


def test_logical_axes_map_to_mesh_axes_or_replicate():
    mesh = AbstractMesh((2, 2, 4, 1), ("data", "fsdp", "tensor", "expert"))
    spec = parallel.logical_to_spec
    assert spec(("layers", "mem_rows", "mem_dim"), (2, 10, 8), mesh) == PartitionSpec(
        None, "fsdp", "tensor"
    )
    # A dimension the mesh axis does not divide is replicated, not padded.
    assert spec(("layers", "mem_rows", "mem_dim"), (2, 9, 6), mesh) == PartitionSpec(
        None, None, None
    )
    # The rules are overridable (`mesh.rules`); an unknown logical name is an error.
    rules = parallel.resolve_rules({"mem_rows": None, "embed": ["fsdp", "data"]})
    assert spec(("mem_rows", "embed"), (8, 8), mesh, rules) == PartitionSpec(None, ("fsdp", "data"))
    with pytest.raises(ValueError, match="no rule"):
        spec(("not_an_axis",), (8,), mesh)
    # batch spans both data-parallel axes; a mesh axis of size 1 shards nothing.
    assert spec(("batch", "kv"), (8, 3), mesh) == PartitionSpec(("data", "fsdp"), None)
    assert spec(("experts", "embed", "mlp"), (4, 6, 8), mesh) == PartitionSpec(
        None, "fsdp", "tensor"
    )
    # One mesh axis shards at most one dimension: vocab takes `tensor`, mlp then replicates.
    assert spec(("vocab", "mlp"), (8, 8), mesh) == PartitionSpec("tensor", None)
    assert spec(None, (3, 3), mesh) == PartitionSpec()


SCANNED = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    from umv2_jax.config import load_config
    from umv2_jax.training import loop, state
    overrides = json.loads(sys.argv[1])
    config = load_config(None, overrides + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    setup = state.build(config)
    stack = setup.state_shardings["params"]["blocks"][0]["layers"]
    specs = {"gate": list(stack["ffn"]["gate"].spec), "query": list(stack["attn"]["query"].spec)}
    result = loop.train(config, sys.argv[2], progress=False, echo=lambda line: None)
    print(json.dumps({"losses": result.losses, "specs": specs}))
    """
)


def test_scanned_memory_model_on_eight_devices_matches_one_device(tmp_path):
    """Stacked blocks keep their logical axes behind a replicated `layers` axis, and the sharded
    scanned step computes what one device computes."""
    overrides = (
        TINY
        + SPARSE["umv2"]
        + [
            "model.scan_layers=true",
            "train.steps=3",
            "train.batch_size=8",
            "train.eval_every=3",
        ]
    )
    report = run_fresh(SCANNED, json.dumps(overrides), str(tmp_path / "mesh"))
    # gate [layers, embed, mlp]; query [layers, embed, heads, kv]
    assert report["specs"] == {
        "gate": [None, "fsdp", "tensor"],
        "query": [None, "fsdp", "tensor", None],
    }
    np.testing.assert_allclose(report["losses"], _one_device_losses(overrides, tmp_path), rtol=2e-5)
