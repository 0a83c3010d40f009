"""Memory tables row-sharded on fsdp: the exchange path (umv2_jax/parallel/exchange.py).

Layer-level checks on fake CPU devices, all in ONE fresh interpreter (`jax_num_cpu_devices` must be
set before JAX starts): one UltraMemV2 layer (with its model-level tables) and one PKM layer, loss =
<y, probe> + the layer's auxiliary losses, differentiated in every parameter, every table and the
input; exchange path == window path == one device on fsdp 4, fsdp 2 × tensor 2 and data 2 × fsdp 2.
The compiled exchange step's collectives move no window-sized buffer. The whole-model steps with the
exchange path are in tests/parallel/test_memory.py's slow cases.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from umv2_jax.errors import ConfigError
from umv2_jax.parallel import exchange

ULTRAMEM = [
    "model.d_model=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.d_ff=64",
    "model.sparse=ultramem_v2",
    "model.memory.n_keys=12",
    "model.memory.key_dim=8",
    "model.memory.rc_topk=4",
    "model.memory.topk=4",
    "model.memory.heads=2",
    "model.memory.value_dim=16",
    "model.memory.pre_value_dim=8",
    "model.memory.n_cores=2",
    "model.memory.calibration_tokens=64",
    "model.memory.key_balance=0.01",
    "model.memory.pre_score_act=gelu",
]
PKM = [
    "model.d_model=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.d_ff=64",
    "model.sparse=pkm",
    "model.product_key.n_keys=12",
    "model.product_key.key_dim=8",
    "model.product_key.topk=4",
    "model.product_key.heads=2",
]
ROWS = 144  # n² = 12²; 36 rows per device at fsdp 4. Tokens: 8 × 16 = 128 (32 per device).
MESHES = {
    "fsdp4": {"fsdp": 4},
    "fsdp2_tensor2": {"fsdp": 2, "tensor": 2},
    "data2_fsdp2": {"data": 2, "fsdp": 2},
}
# (name, kind, mesh, path, extra overrides)
CASES = [
    (f"{kind}_{mesh}_{path}", kind, mesh, path, [])
    for kind in ("ultramem", "pkm")
    for mesh in MESHES
    for path in ("window", "exchange")
    if not (kind == "pkm" and path == "window" and mesh != "fsdp4")
] + [
    # A compacted buffer of ceil(3.5·8/4) = 7 of the 8 slots per token per owner: no token of this
    # batch has all 8 on one owner, so nothing is dropped and the result is exact...
    ("ultramem_fsdp4_capacity3", "ultramem", "fsdp4", "exchange",
     ["model.memory.exchange_capacity_factor=3.5"]),
    # ... while a buffer of 2 slots (the average) drops slots, and says so.
    ("ultramem_fsdp4_capacity1", "ultramem", "fsdp4", "exchange",
     ["model.memory.exchange_capacity_factor=1"]),
]  # fmt: skip

PROGRAM = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from umv2_jax import parallel
    from umv2_jax.config import load_config
    from umv2_jax.models.product_key import PKM
    from umv2_jax.models.sparse import SparseContext
    from umv2_jax.models.ultramem_v2 import MemoryTables, UltraMemV2
    from umv2_jax.parallel import hlo

    bases, meshes, cases, rows = json.loads(sys.argv[1])
    rng = np.random.default_rng(0)
    u = rng.standard_normal((8, 16, 32)).astype(np.float32)
    probe = rng.standard_normal((8, 16, 32)).astype(np.float32)

    def build(kind, overrides):
        model = load_config(None, bases[kind] + overrides).model
        block = model.sparse_layer_indices()[0]
        rngs = nnx.Rngs(0)
        if kind == "ultramem":
            tables = MemoryTables(model, rngs)
            layer = UltraMemV2(model, block, rngs)
        else:
            tables, layer = None, PKM(model, block, rngs)
        return nnx.split((layer, tables), nnx.Param, ...)

    def loss_fn(graph):
        def loss(params, rest, u):
            layer, tables = nnx.merge(graph, params, rest)
            context = SparseContext(shared=None if tables is None else tables)
            out = layer(u, context)
            total = jnp.sum(out.y.astype(jnp.float32) * probe) + sum(out.losses.values())
            return total, out.metrics
        return jax.value_and_grad(loss, argnums=(0, 2), has_aux=True)

    def table_spec(leaf, mesh):
        tensor = "tensor" if mesh.shape["tensor"] > 1 else None
        if leaf.ndim == 3 and leaf.shape[1] == rows:
            return P(None, "fsdp", tensor)
        if leaf.ndim == 2 and leaf.shape[0] == rows:
            return P("fsdp", tensor)
        return P()

    def run(kind, overrides, axes=None, compile_text=False):
        graph, params, rest = build(kind, overrides)
        step = loss_fn(graph)
        if axes is None:
            (loss, metrics), grads = jax.jit(step)(params, rest, u)
            return loss, metrics, grads, None
        config = load_config(None, bases[kind] + overrides
                             + [f"mesh.{a}={n}" for a, n in axes.items()])
        size = int(np.prod(list(axes.values())))
        mesh = parallel.make_mesh(config.mesh, jax.devices()[:size])
        specs = jax.tree.map(lambda x: NamedSharding(mesh, table_spec(x, mesh)), params)
        shardings = (specs, jax.tree.map(lambda _: parallel.replicated(mesh), rest),
                     NamedSharding(mesh, parallel.batch_spec(mesh)))
        with parallel.use_mesh(mesh):
            jitted = jax.jit(step, in_shardings=shardings)
            (loss, metrics), grads = jitted(params, rest, u)
            text = jitted.lower(params, rest, u).compile().as_text() if compile_text else None
        return loss, metrics, grads, text

    flat = lambda tree: [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    references = {kind: run(kind, []) for kind in bases}
    report = {}
    for name, kind, mesh_name, path, extra in cases:
        overrides = extra + [("model.memory" if kind == "ultramem" else "model.product_key")
                             + f".table_exchange={path}"]
        want_text = mesh_name == "fsdp4" and not extra
        loss, metrics, grads, text = run(kind, overrides, meshes[mesh_name], want_text)
        ref_loss, _, ref_grads, _ = references[kind]
        entry = {
            "loss": [float(loss), float(ref_loss)],
            "grads": [[float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))]
                      for a, b in zip(flat(grads), flat(ref_grads))],
            "dropped": float(metrics.get("exchange_dropped_fraction", -1.0)),
        }
        if text is not None:
            entry["collectives"] = [
                [op.kind, [list(a.shape) for a in op.result + op.operands]]
                for op in hlo.collectives(text)]
        report[name] = entry
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def report() -> dict:
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            PROGRAM,
            json.dumps(
                [
                    {"ultramem": ULTRAMEM, "pkm": PKM},
                    MESHES,
                    [list(case) for case in CASES],
                    ROWS,
                ]
            ),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _assert_equal(entry):
    np.testing.assert_allclose(*entry["loss"], rtol=1e-6)
    for difference, scale in entry["grads"]:
        assert difference <= 1e-5 * scale + 1e-7, (difference, scale)


@pytest.mark.parametrize("case", [name for name, *_ in CASES if "capacity1" not in name])
def test_path_equals_one_device(report, case):
    # Loss and the gradient of every parameter, table and the input.
    _assert_equal(report[case])


def test_compacted_buffer_is_exact_without_drops_and_reports_drops(report):
    assert report["ultramem_fsdp4_capacity3"]["dropped"] == 0.0
    dropped = report["ultramem_fsdp4_capacity1"]["dropped"]
    # Buffer 2 of 8 slots at fsdp 4: a token keeps at most 2 slots per owner; Binomial(8, 1/4)
    # counts above 2 drop ~0.25 of the slots on average (≈ 0.23 expected: 4·E[max(X − 2, 0)]/8).
    assert 0.05 < dropped < 0.4, dropped
    loss, reference = report["ultramem_fsdp4_capacity1"]["loss"]
    assert abs(loss - reference) > 1e-6 * abs(reference)


@pytest.mark.parametrize("kind", ["ultramem", "pkm"])
def test_exchange_moves_no_window_sized_buffer(report, kind):
    def window_sized(entry):
        # The window: n² rows (all-gathered or its gradient reduce-scattered); at fsdp 4 a table
        # shard's n²/4 rows in a collective would be a table-sized reduction too.
        return [
            (op, shapes)
            for op, shapes in entry["collectives"]
            if any(ROWS in shape or ROWS // 4 in shape for shape in shapes)
        ]

    assert window_sized(report[f"{kind}_fsdp4_window"]), "the check must see the window gather"
    assert window_sized(report[f"{kind}_fsdp4_exchange"]) == []


# --- the cost model (no devices) -------------------------------------------------------------------


def _ultramem_1b7b():
    # configs/paper/ultramem_v2_1b7b.yaml: n_keys 528, D_v 768, D_p 384, C 2, 1 head × topk 128.
    return exchange.TableTraffic(528**2, 528**2, 768, 384, 128, 2, 4)


def _ultramem_120b():
    # A 2.5B/120B-top256 shape: 24 memory layers × n² = 1792² rows × (1024 + 512) ≈ 118B
    # table parameters; 1 head × topk 256, C 2 (the paper's counts; the config is `scale`'s).
    return exchange.TableTraffic(1792**2, 1792**2, 1024, 512, 256, 2, 4)


def test_cost_model_bytes_follow_the_module_formula():
    traffic = _ultramem_1b7b()
    window, exchanged = exchange.path_bytes(traffic, tokens=4096, fsdp=8)
    assert window == 2 * (528**2 * 7 // 8) * (768 + 384) * 4
    per_token = 128 * 4 + 2 * (128 * 2 + 384 + 768) * 4
    assert exchanged == 7 * 4096 * per_token
    # The tensor split divides the dims on both paths.
    window_t, exchanged_t = exchange.path_bytes(traffic, tokens=4096, fsdp=4, tensor=2)
    assert window_t == 2 * (528**2 * 3 // 4) * (384 + 192) * 4
    assert exchanged_t == 3 * 4096 * (128 * 4 + 2 * (128 * 2 + 192 + 384) * 4)


def test_cost_model_choices():
    # 1B/7B at 4096 tokens per device, fsdp 8: exchanging per-token sums (0.34 GB per layer) beats
    # gathering the 278 784-row window (2.25 GB), and more so at 120B (fsdp 64: 4.4 vs 38 GB).
    cost = exchange.choose(_ultramem_1b7b(), tokens=4096, fsdp=8)
    assert cost.path == "exchange" and cost.reason == "cost model"
    assert cost.exchange_bytes * 6 < cost.window_bytes
    cost = exchange.choose(_ultramem_120b(), tokens=4096, fsdp=64)
    assert cost.path == "exchange" and cost.exchange_bytes * 8 < cost.window_bytes
    # Small tables stay gathered: the tests' 144-row window, and 1B/7B's at 64k tokens per device.
    small = exchange.TableTraffic(ROWS, ROWS, 16, 8, 8, 2, 4)
    assert exchange.choose(small, tokens=32, fsdp=4).path == "window"
    assert exchange.choose(_ultramem_1b7b(), tokens=65536, fsdp=8).path == "window"
    # The config key overrides the model; fsdp 1 has nothing to choose.
    forced = exchange.choose(small, tokens=32, fsdp=4, requested="exchange")
    assert forced.path == "exchange" and "table_exchange" in forced.reason
    assert exchange.choose(_ultramem_1b7b(), 4096, 1).path == "window"


def test_capacity_slots():
    assert exchange.capacity_slots(128, 8, 0.0) == 128  # lossless
    assert exchange.capacity_slots(128, 8, 2.0) == 32
    assert exchange.capacity_slots(256, 64, 1.5) == 6
    assert exchange.capacity_slots(8, 4, 10.0) == 8


def test_tables_that_cannot_be_sharded_are_one_line_errors():
    traffic = exchange.TableTraffic(ROWS, ROWS, 16, 8, 8, 2, 4)
    exchange.check_tables(traffic, 4, "exchange", 0.0)  # 144 rows / 4: fine
    exchange.check_tables(traffic, 5, "window", 0.0)  # the window path replicates instead
    with pytest.raises(
        ConfigError,
        match=r"mesh.fsdp.*5 does not divide the 144 rows.*"
        r"table_exchange=window",
    ) as error:
        exchange.check_tables(traffic, 5, "exchange", 0.0)
    assert "\n" not in str(error.value)
    with pytest.raises(
        ConfigError,
        match=r"exchange_capacity_factor.*buffer of 1 slot.*below the "
        r"2 slots.*8 slots / fsdp 4",
    ) as error:
        exchange.check_tables(traffic, 4, "exchange", 0.5)
    assert "\n" not in str(error.value)


def test_bad_table_exchange_value_is_a_config_error():
    from umv2_jax.config import load_config

    with pytest.raises(ConfigError, match="table_exchange"):
        load_config(None, [*ULTRAMEM, "model.memory.table_exchange=gather"])
    with pytest.raises(ConfigError, match="exchange_capacity_factor"):
        load_config(None, [*ULTRAMEM, "model.memory.exchange_capacity_factor=-1"])


def test_startup_line_names_both_paths_and_the_choice():
    from jax.sharding import AbstractMesh, AxisType

    from umv2_jax.config import load_config

    mesh = AbstractMesh((1, 4, 1, 1), ("data", "fsdp", "tensor", "expert"), (AxisType.Auto,) * 4)
    config = load_config(None, [*ULTRAMEM, "train.batch_size=8", "data.seq_len=16"])
    (line,) = exchange.startup_lines(config, mesh)
    assert line.startswith("memory tables: window path (cost model)"), line
    assert "window all-gather 20.7 KB vs exchange 33.8 KB" in line, line
    assert "32 tokens per device" in line, line
    forced = load_config(None, [*ULTRAMEM, "model.memory.table_exchange=exchange"])
    (line,) = exchange.startup_lines(forced, mesh)
    assert line.startswith("memory tables: exchange path (set by model.memory.table_exchange)")
