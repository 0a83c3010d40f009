"""umv2_jax/parallel/hlo.py: collectives read from compiled HLO text.

The compiled programs come from one subprocess with 8 fake CPU devices (`jax_num_cpu_devices` must
be set before JAX initializes); the text forms XLA may print are also checked on written-out lines.
"""

import textwrap

import pytest
from jax.sharding import AbstractMesh

from tests.fixtures import run_fresh
from umv2_jax.parallel import hlo

# Mesh (data 2, fsdp 1, tensor 2, expert 2): partition id = 4·data + 2·tensor + expert.
PROGRAMS = textwrap.dedent(
    """
    import json
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
    from umv2_jax.parallel import hlo

    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 1, 2, 2), ("data", "fsdp", "tensor", "expert"),
                axis_types=(AxisType.Auto,) * 4)

    def compiled(f, in_specs, out_specs, x):
        g = jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
        return jax.jit(g).trace(x).lower().compile().as_text()

    f32 = jax.ShapeDtypeStruct((8, 16), jnp.float32)
    bf16 = jax.ShapeDtypeStruct((8, 16), jnp.bfloat16)
    texts = {
        "psum_data": compiled(lambda x: jax.lax.psum(x, "data"), P("data"), P(), f32),
        "gather_tensor": compiled(
            lambda x: jax.lax.all_gather(x, "tensor", tiled=True), P("tensor"), P(), bf16),
        "scatter_data_expert": compiled(
            lambda x: jax.lax.psum_scatter(x, ("data", "expert"), tiled=True), P(),
            P(("data", "expert")), f32),
        "all_to_all_expert": compiled(
            lambda x: jax.lax.all_to_all(x, "expert", 0, 0, tiled=True), P("expert"), P("expert"),
            f32),
        "permute_data": compiled(
            lambda x: jax.lax.ppermute(x, "data", [(0, 1), (1, 0)]), P("data"), P("data"), f32),
    }
    # GSPMD (no shard_map): a reduction over a dimension sharded on data, result replicated.
    x = jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=NamedSharding(mesh, P("data", "tensor")))
    texts["gspmd_sum"] = jax.jit(
        lambda x: x.sum(0), out_shardings=NamedSharding(mesh, P())).trace(x).lower().compile(
        ).as_text()
    report = {}
    for name, text in texts.items():
        report[name] = [
            {"kind": op.kind, "result": [[a.dtype, list(a.shape)] for a in op.result],
             "operands": [[a.dtype, list(a.shape)] for a in op.operands],
             "bytes": op.bytes, "groups": [list(g) for g in op.groups],
             "axes": list(hlo.axes_of_groups(op.groups, mesh))}
            for op in hlo.collectives(text)
        ]
        report[name + "_moved"] = hlo.bytes_moved(hlo.collectives(text))
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def compiled():
    return run_fresh(PROGRAMS)


def test_psum_over_data_is_one_all_reduce_over_data(compiled):
    (op,) = compiled["psum_data"]
    assert op["kind"] == "all-reduce"
    assert op["result"] == op["operands"] == [["f32", [4, 16]]]
    assert op["bytes"] == 4 * 16 * 4
    assert op["groups"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert op["axes"] == ["data"]
    assert compiled["psum_data_moved"] == {"all-reduce": 256}


def test_all_gather_over_tensor(compiled):
    ops = compiled["gather_tensor"]
    assert [op["kind"] for op in ops] == ["all-gather"]
    (op,) = ops
    # XLA:CPU gathers bf16 as f32 (a convert before it); the gathered result is [8, 16].
    assert op["result"][0][1] == [8, 16] and op["operands"][0][1] == [4, 16]
    assert op["axes"] == ["tensor"]
    assert op["groups"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    width = {"f32": 4, "bf16": 2}[op["result"][0][0]]
    assert op["bytes"] == 8 * 16 * width


def test_reduce_scatter_over_two_axes(compiled):
    (op,) = compiled["scatter_data_expert"]
    assert op["kind"] == "reduce-scatter"
    assert op["operands"] == [["f32", [8, 16]]] and op["result"] == [["f32", [2, 16]]]
    assert op["bytes"] == 8 * 16 * 4  # the unscattered operand
    assert op["axes"] == ["data", "expert"]
    assert sorted(map(sorted, op["groups"])) == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_all_to_all_and_collective_permute(compiled):
    (op,) = compiled["all_to_all_expert"]
    assert op["kind"] == "all-to-all" and op["axes"] == ["expert"]
    assert op["bytes"] == 4 * 16 * 4  # two [2, 16] pieces in, two out
    (op,) = compiled["permute_data"]
    assert op["kind"] == "collective-permute" and op["axes"] == ["data"]
    assert op["groups"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_gspmd_reduction_names_the_axes_it_crosses(compiled):
    ops = compiled["gspmd_sum"]
    reduce = [op for op in ops if op["kind"] == "all-reduce"]
    assert reduce and all(op["axes"] == ["data"] for op in reduce)
    gather = [op for op in ops if op["kind"] == "all-gather"]
    assert all(op["axes"] == ["tensor"] for op in gather)  # the [16] result was split on tensor


MESH = AbstractMesh((2, 1, 2, 2), ("data", "fsdp", "tensor", "expert"))


@pytest.mark.parametrize(
    "text, groups",
    [
        ("replica_groups={{0,1},{2,3}}, dimensions={0}", ((0, 1), (2, 3))),
        ("replica_groups={}, to_apply=%add", ()),
        ("replica_groups=[2,4]<=[8], dimensions={0}", ((0, 1, 2, 3), (4, 5, 6, 7))),
        ("replica_groups=[4,2]<=[2,2,2]T(1,0,2), x", ((0, 1), (4, 5), (2, 3), (6, 7))),
        ("replica_groups=mesh['a'=2,'b'=4] {'a'}, x", ((0, 4), (1, 5), (2, 6), (3, 7))),
        ("replica_groups=mesh['a'=2,'b'=4] {'b':(2)2}, x", ((0, 1), (2, 3), (4, 5), (6, 7))),
        ("replica_groups=mesh['a'=2,'b'=4] {'b':(1)2}, x", ((0, 2), (1, 3), (4, 6), (5, 7))),
        (
            "replica_groups=mesh['a'=2,'b'=4], device_ids=([2,2,2]T(1,0,2)) {'a'}, x",
            ((0, 2), (1, 3), (4, 6), (5, 7)),
        ),
    ],
)
def test_replica_group_forms(text, groups):
    assert hlo.parse_replica_groups(text) == groups


def test_async_pairs_count_once_and_operands_come_from_their_definitions():
    text = textwrap.dedent(
        """
        ENTRY %main {
          %p = bf16[4,32]{1,0} parameter(0)
          %ags = (bf16[4,32]{1,0}, bf16[16,32]{1,0}) all-gather-start(%p), replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}
          %agd = bf16[16,32]{1,0} all-gather-done(%ags)
          %ars = f32[16,32]{1,0} all-reduce-start(f32[16,32]{1,0} %c), replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
          %ard = f32[16,32]{1,0} all-reduce-done(%ars)
          %r = s32[8]{0} ragged-all-to-all(%a, %b, %c1, %c2, %c3, %c4), replica_groups={{0,1}}
        }
        """
    )
    ops = hlo.collectives(text)
    assert [(op.kind, op.async_) for op in ops] == [
        ("all-gather", True),
        ("all-reduce", True),
        ("ragged-all-to-all", False),
    ]
    gather, reduce, _ = ops
    assert gather.operands == (hlo.Array("bf16", (4, 32)),)
    assert gather.result == (hlo.Array("bf16", (16, 32)),)
    assert gather.bytes == 16 * 32 * 2
    assert gather.groups == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert hlo.axes_of_groups(gather.groups, MESH) == ("data", "tensor")
    assert reduce.operands == (hlo.Array("f32", (16, 32)),) and reduce.bytes == 16 * 32 * 4
    assert hlo.axes_of_groups(reduce.groups, MESH) == ("tensor", "expert")
    assert hlo.bytes_moved(ops) == {"all-gather": 1024, "all-reduce": 2048, "ragged-all-to-all": 32}
    assert hlo.largest(ops, "all-reduce") is reduce
    assert hlo.largest(ops, "reduce-scatter") is None
    with pytest.raises(ValueError, match="kind must be one of"):
        hlo.largest(ops, "all_reduce")
    with pytest.raises(ValueError, match="outside the 8-device mesh"):
        hlo.axes_of_groups(((0, 8),), MESH)
