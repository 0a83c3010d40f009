"""One train step on a mesh equals the single-device step: dense and Memory+ models.

The step is the real one (`training.step.make_train_step`), jitted with the loop's shardings (state
by the parameters' logical axes, batch over the batch axes) and traced and run under
`parallel.use_mesh(mesh)`, on 8 fake CPU devices in one subprocess; the reference is the same step on
a 1-device mesh in the same process. The optimizer is replaced by one whose state is the step's
gradients (update zero), so the gradients come out of the step itself.

Tolerances (f32): loss within 1e-5 relative; every gradient leaf within 2e-5 relative to its own
largest magnitude (|g - g_ref| ≤ 2e-5·|g_ref| + 2e-5·max|g_ref|): summation order differs across
shards. Measured: at most ~6e-7 of a leaf's largest magnitude, loss 2e-7 relative.

Meshes: (fsdp 4, tensor 2) and (data 2, tensor 2, expert 2) in the default suite (one subprocess,
~50 s of CPU); (data 8) and (tensor 4, fsdp 2) are `slow` (another subprocess), and so are PKM, PEER
and UltraMem v1 on (data 2, tensor 2, expert 2) (a third). The compiled steps' collectives also show
that the product-key selection and value aggregation stay token-local (no token-sized scores, row
ids or slot gradients cross the batch axes).
"""

import json
import textwrap

import numpy as np
import pytest

from tests.fixtures import run_fresh
from tests.training.conftest import TINY

PRODUCT_KEY = [
    "model.sparse=memory_plus",
    "model.product_key.value_dim=16",
    "model.product_key.n_keys=6",  # 36 rows: split 2 or 4 ways on fsdp
    "model.product_key.key_dim=8",
    "model.product_key.topk=4",
    "model.product_key.heads=2",
]
KINDS = {"dense": TINY + ["train.batch_size=8"], "memory_plus": TINY + ["train.batch_size=8"]}
KINDS["memory_plus"] = KINDS["memory_plus"] + PRODUCT_KEY
GLOBAL_TOKENS = 8 * 32  # batch 8 × seq_len 32

# (data, fsdp, tensor, expert)
# fsdp4_tensor2 runs with -m slow: the memory model on that mesh is in the default suite
# (tests/parallel/test_memory.py), and fsdp in tests/parallel/test_exchange.py.
DEFAULT_MESHES = {"data2_tensor2_expert2": [2, 1, 2, 2]}
SLOW_MESHES = {"fsdp4_tensor2": [1, 4, 2, 1], "data8": [8, 1, 1, 1], "tensor4_fsdp2": [1, 2, 4, 1]}

PROGRAM = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    import numpy as np
    import optax
    from umv2_jax import parallel
    from umv2_jax.config import MeshConfig, load_config
    from umv2_jax.parallel import hlo
    from umv2_jax.training import state as state_lib
    from umv2_jax.training.step import make_train_step

    kinds, meshes = json.loads(sys.argv[1]), json.loads(sys.argv[2])

    def capture_gradients():
        # An optimizer whose state is the step's (fp32, accumulated) gradients; its update is zero.
        init = lambda params: jax.tree.map(jnp.zeros_like, params)
        update = lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads)
        return optax.GradientTransformation(init, update)

    def one_step(config, devices, shape):
        mesh = parallel.make_mesh(MeshConfig(*shape), devices)
        setup = state_lib.build(config, mesh)
        shardings = dict(setup.state_shardings, opt_state=setup.state_shardings["params"])
        state = dict(setup.state, opt_state=jax.device_put(
            jax.tree.map(jnp.zeros_like, setup.state["params"]), shardings["opt_state"]))
        rng = np.random.default_rng(0)
        b, s = config.train.batch_size, config.data.seq_len
        tokens = rng.integers(0, 256, (b, s + 1)).astype(np.int32)
        batch_sharding = parallel.batch_sharding(mesh)
        batch = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                "loss_mask": np.ones((b, s), np.float32)}, batch_sharding)
        step = make_train_step(setup.parts, capture_gradients(), 1, config.train.seed)
        with parallel.use_mesh(mesh):
            jitted = jax.jit(step, in_shardings=(shardings, setup.rest_shardings, batch_sharding),
                             out_shardings=(shardings, parallel.replicated(mesh)))
            compiled = jitted.trace(state, setup.rest, batch).lower().compile()
            new_state, metrics = compiled(state, setup.rest, batch)
        return mesh, setup, compiled, new_state, metrics

    def spec(array):
        entries = list(array.sharding.spec) + [None] * (array.ndim - len(array.sharding.spec))
        return [list(a) if isinstance(a, tuple) else a for a in entries]

    report = {}
    for kind, overrides in kinds.items():
        config = load_config(None, overrides)
        _, ref_setup, _, ref_state, ref_metrics = one_step(config, jax.devices()[:1], (1, 1, 1, 1))
        ref_grads = jax.tree_util.tree_flatten_with_path(ref_state["opt_state"])[0]
        ref_params = jax.tree.leaves(ref_setup.state["params"])
        for name, shape in meshes.items():
            mesh, setup, compiled, new_state, metrics = one_step(config, jax.devices(), shape)
            grads = jax.tree.leaves(new_state["opt_state"])
            failures, worst = [], 0.0
            for (path, ref), grad in zip(ref_grads, grads):
                ref, grad = np.asarray(ref), np.asarray(grad)
                scale = float(np.max(np.abs(ref)))
                worst = max(worst, float(np.max(np.abs(grad - ref))) / (scale or 1.0))
                try:
                    np.testing.assert_allclose(grad, ref, rtol=2e-5, atol=2e-5 * scale)
                except AssertionError as error:
                    failures.append(jax.tree_util.keystr(path) + str(error)[:400])
            params = jax.tree_util.tree_flatten_with_path(setup.state["params"])[0]
            report[kind + "/" + name] = {
                "devices": mesh.size,
                "loss": float(metrics["loss"]),
                "ref_loss": float(ref_metrics["loss"]),
                "failures": failures,
                "worst": worst,
                "grad_specs": [spec(g) for g in grads],
                "specs": {jax.tree_util.keystr(p): spec(x) for p, x in params},
                "same_init": all(np.array_equal(np.asarray(a), np.asarray(b))
                                 for a, b in zip(ref_params, jax.tree.leaves(setup.state["params"]))),
                "collectives": [
                    [op.kind, list(hlo.axes_of_groups(op.groups, mesh)),
                     [[a.dtype, list(a.shape)] for a in op.result]]
                    for op in hlo.collectives(compiled.as_text())],
            }
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def default_meshes():
    return run_fresh(PROGRAM, json.dumps(KINDS), json.dumps(DEFAULT_MESHES))


@pytest.fixture(scope="module")
def slow_meshes():
    return run_fresh(PROGRAM, json.dumps(KINDS), json.dumps(SLOW_MESHES))


CASES = [
    pytest.param(kind, mesh, "default_meshes", id=f"{kind}-{mesh}")
    for kind in KINDS
    for mesh in DEFAULT_MESHES
] + [
    pytest.param(kind, mesh, "slow_meshes", id=f"{kind}-{mesh}", marks=pytest.mark.slow)
    for kind in KINDS
    for mesh in SLOW_MESHES
]


@pytest.mark.parametrize("kind, mesh, fixture", CASES)
def test_one_step_loss_and_gradients_equal_the_single_device_step(kind, mesh, fixture, request):
    case = request.getfixturevalue(fixture)[f"{kind}/{mesh}"]
    assert case["devices"] == 8
    assert case["same_init"]  # the same initial parameters whatever their sharding
    np.testing.assert_allclose(case["loss"], case["ref_loss"], rtol=1e-5)
    assert case["failures"] == []
    assert case["worst"] < 2e-5


# Parameter shardings by the rules table (umv2_jax/parallel/rules.py), worked out by hand: embed
# [vocab 384, embed 32] → (tensor, fsdp); SwiGLU gate [embed 32, mlp 64] → (fsdp, tensor); query
# [embed, heads 2, kv] → (fsdp, tensor, -) unless tensor (4) does not divide the 2 heads; Memory+'s
# shared table [mem_rows 36, mem_dim 16] → (fsdp, tensor). Axes of size 1 shard nothing.
EXPECTED_SPECS = {
    "fsdp4_tensor2": {
        "['embed']": ["tensor", "fsdp"],
        "['blocks'][0]['ffn']['gate']": ["fsdp", "tensor"],
        "['blocks'][1]['attn']['query']": ["fsdp", "tensor", None],
        "['shared']['values']": ["fsdp", "tensor"],
        "['blocks'][0]['sparse']['gate_proj']": ["fsdp", "tensor"],
    },
    "data2_tensor2_expert2": {
        "['embed']": ["tensor", None],
        "['blocks'][0]['ffn']['gate']": [None, "tensor"],
        "['blocks'][1]['attn']['query']": [None, "tensor", None],
        "['shared']['values']": [None, "tensor"],
        "['blocks'][0]['sparse']['gate_proj']": [None, "tensor"],
    },
    "data8": {
        "['embed']": [None, None],
        "['blocks'][0]['ffn']['gate']": [None, None],
        "['shared']['values']": [None, None],
    },
    "tensor4_fsdp2": {
        "['embed']": ["tensor", "fsdp"],
        "['blocks'][0]['ffn']['gate']": ["fsdp", "tensor"],
        "['blocks'][1]['attn']['query']": ["fsdp", None, None],
        "['shared']['values']": ["fsdp", "tensor"],
        "['blocks'][0]['sparse']['gate_proj']": ["fsdp", "tensor"],
    },
}


@pytest.mark.parametrize("kind, mesh, fixture", CASES)
def test_parameters_and_gradients_are_sharded_as_the_rules_say(kind, mesh, fixture, request):
    case = request.getfixturevalue(fixture)[f"{kind}/{mesh}"]
    specs = case["specs"]
    for path, expected in EXPECTED_SPECS[mesh].items():
        if path in specs or kind == "memory_plus":
            assert specs[path] == expected, path
    # The step's gradients leave it laid out like their parameters.
    assert case["grad_specs"] == list(specs.values())


def _token_sized_float_gathers(case) -> list:
    """Floating all-gathers across a batch axis whose result has a token-sized dimension."""
    batch = {"data", "fsdp", "expert"}
    found = []
    for kind, axes, results in case["collectives"]:
        if kind != "all-gather" or not batch & set(axes):
            continue
        for dtype, shape in results:
            if dtype.startswith(("f", "bf")) and any(d and d % GLOBAL_TOKENS == 0 for d in shape):
                found.append([axes, dtype, shape])
    return found


@pytest.mark.parametrize(
    "mesh, fixture, batch",
    [
        pytest.param(
            "data2_tensor2_expert2",
            "default_meshes",
            {"data", "expert"},
            id="data2_tensor2_expert2",
        ),
        pytest.param("data8", "slow_meshes", {"data"}, id="data8", marks=pytest.mark.slow),
    ],
)
def test_memory_plus_selection_gathers_no_token_sized_scores_across_the_batch(
    mesh, fixture, batch, request
):
    """Product-key selection runs token-local (ops/product_key_topk.token_local): under plain GSPMD
    the step all-gathered the [heads, 256 tokens, n] scores of every layer across data."""
    case = request.getfixturevalue(fixture)[f"memory_plus/{mesh}"]
    assert _token_sized_float_gathers(case) == []
    # The keys' gradient is summed over the batch axes (the shard_map transpose's all-reduce).
    keys = [
        axes
        for kind, axes, results in case["collectives"]
        if kind == "all-reduce" and ["f32", [2, 6, 8]] in results
    ]
    assert keys and all(batch <= set(axes) for axes in keys), keys


SLOTS = 2 * 4  # Memory+'s heads × topk
VALUE_DIM = 16
SLOT_BLOCK = GLOBAL_TOKENS // 8 * SLOTS  # the fewest slots a device holds (8-way batch split): 256


def _token_sized_slot_traffic(case) -> list:
    """All-gathers / all-reduces across a batch axis of row ids or of a whole batch's slot buffer.

    value_bag under plain GSPMD all-gathers (and all-reduces) the s32 [tokens·H·m] = [2048] row ids
    and all-reduces f32 [tokens·H·m, D_v/t] = [2048, 8] slot gradients across the batch axes. Found:
    an integer buffer with a dimension a multiple of one device's slots (256), or a float one with
    a dimension a multiple of the batch's slots (2048; the model's f32 [256, 8] fsdp traffic is not
    the memory's).
    """
    batch = {"data", "fsdp", "expert"}
    found = []
    for kind, axes, results in case["collectives"]:
        if kind not in ("all-gather", "all-reduce") or not batch & set(axes):
            continue
        for dtype, shape in results:
            block = SLOT_BLOCK if dtype.startswith(("s", "u")) else GLOBAL_TOKENS * SLOTS
            if any(d and d % block == 0 for d in shape):
                found.append([kind, axes, dtype, shape])
    return found


@pytest.mark.parametrize(
    "mesh, fixture, batch",
    [
        pytest.param(
            "data2_tensor2_expert2",
            "default_meshes",
            {"data", "expert"},
            id="data2_tensor2_expert2",
        ),
        pytest.param(
            "fsdp4_tensor2", "slow_meshes", {"fsdp"}, id="fsdp4_tensor2", marks=pytest.mark.slow
        ),
        pytest.param("data8", "slow_meshes", {"data"}, id="data8", marks=pytest.mark.slow),
    ],
)
def test_memory_plus_value_bag_moves_no_row_ids_or_slot_gradients_across_the_batch(
    mesh, fixture, batch, request
):
    """Memory+'s value aggregation runs token-local (models/product_key.token_local_bag): under plain
    GSPMD the step all-gathered the s32 [tokens, heads·topk] row ids across the batch axes and
    all-reduced an f32 [tokens·heads·topk, D_v] gradient."""
    case = request.getfixturevalue(fixture)[f"memory_plus/{mesh}"]
    assert _token_sized_slot_traffic(case) == []
    # The shared table's gradient leaves the shard_map whole: one table-sized [36, 16] all-reduce
    # over the batch axes (the transpose of its replicated entry), not per slot.
    table = [
        axes
        for kind, axes, results in case["collectives"]
        if kind == "all-reduce" and ["f32", [36, VALUE_DIM]] in results
    ]
    assert table and all(batch <= set(axes) for axes in table), table


# PKM, PEER and UltraMem v1 aggregate through the same `token_local_bag` (slow: ~60 s of CPU).
_SMALL_KEYS = ["n_keys=6", "key_dim=8", "topk=4", "heads=2"]
OTHER_KINDS = {
    "pkm": ["model.sparse=pkm"] + [f"model.product_key.{f}" for f in _SMALL_KEYS],
    "peer": ["model.sparse=peer"] + [f"model.product_key.{f}" for f in _SMALL_KEYS],
    "ultramem": ["model.sparse=ultramem", "model.ultramem.value_dim=16"]
    + ["model.ultramem.value_expand=4"]
    + [f"model.ultramem.{f}" for f in _SMALL_KEYS],
}
OTHER_KINDS = {k: TINY + ["train.batch_size=8"] + v for k, v in OTHER_KINDS.items()}
OTHER_MESH = "data2_tensor2_expert2"


@pytest.fixture(scope="module")
def other_kinds():
    return run_fresh(
        PROGRAM, json.dumps(OTHER_KINDS), json.dumps({OTHER_MESH: DEFAULT_MESHES[OTHER_MESH]})
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(OTHER_KINDS))
def test_other_product_key_layers_equal_the_single_device_step_and_stay_token_local(
    kind, other_kinds
):
    case = other_kinds[f"{kind}/{OTHER_MESH}"]
    assert case["devices"] == 8 and case["same_init"]
    np.testing.assert_allclose(case["loss"], case["ref_loss"], rtol=1e-5)
    assert case["failures"] == []
    assert case["worst"] < 2e-5
    assert _token_sized_slot_traffic(case) == []


# Engram (slow: a subprocess of its own, ~1-2 min of CPU): its tables are `mem_rows` × `mem_dim`
# (the 4 primes >= 31: 31 + 37 + 41 + 43 = 152 rows, split 4 ways on fsdp; head dim 8 on tensor), its
# lookup a gather by token ids, its convolution a shift along the sequence.
ENGRAM_KINDS = {
    "engram": TINY
    + [
        "train.batch_size=8",
        "model.sparse=engram",
        "model.engram.heads=2",
        "model.engram.embed_dim=16",
        "model.engram.table_size=31",
    ]
}


@pytest.fixture(scope="module")
def engram_meshes():
    return run_fresh(PROGRAM, json.dumps(ENGRAM_KINDS), json.dumps(ENGRAM_MESHES))


ENGRAM_MESHES = {**DEFAULT_MESHES, "fsdp4_tensor2": SLOW_MESHES["fsdp4_tensor2"]}


@pytest.mark.slow
@pytest.mark.parametrize("mesh", list(ENGRAM_MESHES))
def test_engram_step_equals_the_single_device_step_with_sharded_tables(mesh, engram_meshes):
    case = engram_meshes[f"engram/{mesh}"]
    assert case["devices"] == 8 and case["same_init"]
    np.testing.assert_allclose(case["loss"], case["ref_loss"], rtol=1e-5)
    assert case["failures"] == [] and case["worst"] < 2e-5
    table = case["specs"]["['blocks'][0]['sparse']['table']"]
    assert table == (["fsdp", "tensor"] if mesh == "fsdp4_tensor2" else [None, "tensor"])
