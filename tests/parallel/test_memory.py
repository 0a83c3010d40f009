"""UltraMemV2 token-local under shard_map (umv2_jax/parallel/memory.py), on 8 fake CPU devices.

All multi-device checks run in ONE fresh interpreter (`jax_num_cpu_devices` must be set before JAX
starts), which prints one JSON report; the tests below assert on its parts.
"""

import json
import textwrap

import numpy as np
import pytest

from tests.fixtures import run_fresh

BASE = [
    "model.d_model=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.d_ff=64",
    "data.seq_len=16",
    "train.batch_size=8",
    "model.sparse=ultramem_v2",
    "model.memory.n_keys=12",
    "model.memory.key_dim=8",
    "model.memory.rc_topk=4",
    "model.memory.topk=8",
    "model.memory.value_dim=16",
    "model.memory.pre_value_dim=8",
    "model.memory.n_cores=2",
    "model.memory.calibration_tokens=64",
    "model.memory.key_balance=0.01",
]
ROWS, LAYERS, D_V = 144, 2, 16

EXCHANGE = "model.memory.table_exchange=exchange"
# (name, mesh, extra overrides): every mesh of the issue, scan on and off, the xla ops and the Pallas
# kernels (`implementation=pallas`: on CPU the GPU kernels run interpreted, inside the shard_map).
# The default suite runs two; the rest are marked slow.
CASES = [
    ("data8", {"data": 8}, ["model.scan_layers=true"]),
    ("fsdp4_tensor2", {"fsdp": 4, "tensor": 2}, ["model.scan_layers=false"]),
]
SLOW_CASES = [
    # Interpreted Pallas inside the shard_map: ~1 min on 2 cores; the kernels against XLA on one
    # device are in the default suite (tests/kernels/test_value_bag_op.py, test_retrieval_op.py).
    (
        "fsdp4_tensor2_pallas",
        {"fsdp": 4, "tensor": 2},
        ["model.scan_layers=false", "model.memory.implementation=pallas"],
    ),
    ("data8_pallas", {"data": 8}, ["model.scan_layers=true", "model.memory.implementation=pallas"]),
    ("fsdp4_tensor2_scan", {"fsdp": 4, "tensor": 2}, ["model.scan_layers=true"]),
    ("data2_tensor2_expert2", {"data": 2, "tensor": 2, "expert": 2}, ["model.scan_layers=false"]),
    ("tensor4_fsdp2", {"tensor": 4, "fsdp": 2}, ["model.scan_layers=true"]),
    # The exchange path (umv2_jax/parallel/exchange.py) in the whole step; layer-level checks of
    # every mesh are in the default suite (tests/parallel/test_exchange.py).
    ("fsdp4_exchange", {"fsdp": 4}, ["model.scan_layers=true", EXCHANGE]),
    ("fsdp2_tensor2_exchange", {"fsdp": 2, "tensor": 2}, ["model.scan_layers=false", EXCHANGE]),
    (
        "data2_fsdp2_exchange_pallas",
        {"data": 2, "fsdp": 2},
        ["model.scan_layers=true", EXCHANGE, "model.memory.implementation=pallas"],
    ),
]
# (name, mesh, sequence lengths) of the compiled-step checks; 512 tokens per device are more than
# value_bag's 256-token block.
HLO = [("data8", {"data": 8}, [16, 512]), ("fsdp4_tensor2", {"fsdp": 4, "tensor": 2}, [16])]

PROGRAM = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    import numpy as np
    from umv2_jax import parallel
    from umv2_jax.config import load_config
    from umv2_jax.parallel import hlo
    from umv2_jax.training import state as state_lib
    from umv2_jax.training.step import aux_losses_and_metrics, token_losses

    base, cases, hlo_cases, with_temporaries, rows, layers, d_v = json.loads(sys.argv[1])

    def grad_fn(parts, diagnostics=False):
        # diagnostics: also the rows each layer read (the selections), next to the gradients.
        def loss(params, rest, batch):
            logits, aux = parts.build(params, rest)(batch["inputs"], diagnostics=diagnostics)
            total, _, metrics = aux_losses_and_metrics(aux)
            loss = jnp.mean(token_losses(logits, batch["targets"])) + total
            return loss, (metrics, aux.row_hits)
        return jax.value_and_grad(loss, has_aux=True)

    rng = np.random.default_rng(0)
    batch = {k: rng.integers(0, 256, (8, 16)).astype(np.int32) for k in ("inputs", "targets")}
    flat = lambda tree: [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
    references, report = {}, {"cases": {}}
    for name, axes, extra in cases:
        key = json.dumps(extra)
        if key not in references:  # the single-device step: no mesh, plain code
            single = state_lib.build(load_config(None, base + extra))
            (loss, (metrics, hits)), grads = jax.jit(grad_fn(single.parts, True))(
                single.state["params"], single.rest, batch)
            references[key] = (float(loss), flat(grads), flat(hits),
                               float(metrics["layer0/loss/key_balance"]))
        config = load_config(None, base + extra + [f"mesh.{a}={n}" for a, n in axes.items()])
        setup = state_lib.build(config, parallel.make_mesh(config.mesh))
        mesh = setup.mesh
        shardings = (setup.state_shardings["params"], setup.rest_shardings,
                     parallel.batch_sharding(mesh))
        with parallel.use_mesh(mesh):
            step = jax.jit(grad_fn(setup.parts, True), in_shardings=shardings)
            (loss, (metrics, hits)), grads = step(setup.state["params"], setup.rest, batch)
        ref_loss, ref_grads, ref_hits, ref_balance = references[key]
        report["cases"][name] = {
            "loss": [float(loss), ref_loss],
            "key_balance": [float(metrics["layer0/loss/key_balance"]), ref_balance],
            "hit_layers": len(ref_hits),
            "hits_equal": all(np.array_equal(a, b) for a, b in zip(flat(hits), ref_hits)),
            # per leaf: (max |difference|, max |reference|)
            "grads": [[float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))]
                      for a, b in zip(flat(grads), ref_grads)],
        }

    def compiled(axes, seq):
        config = load_config(None, base + ["model.scan_layers=true", f"data.seq_len={seq}"]
                             + [f"mesh.{a}={n}" for a, n in axes.items()])
        plan = state_lib.plan(config, parallel.make_mesh(config.mesh))
        mesh = plan.mesh
        tokens = jax.ShapeDtypeStruct((8, seq), jnp.int32)
        shardings = (plan.state_shardings["params"], plan.rest_shardings,
                     parallel.batch_sharding(mesh))
        with parallel.use_mesh(mesh):
            step = jax.jit(grad_fn(plan.parts), in_shardings=shardings)
            text = step.trace(plan.state["params"], plan.rest,
                              {"inputs": tokens, "targets": tokens}).lower().compile().as_text()
        return mesh, text, plan

    report["hlo"] = {}
    for name, axes, seqs in hlo_cases:
        entry = {}
        for seq in seqs:
            mesh, text, plan = compiled(axes, seq)
            batch_axes = set(parallel.batch_axes(mesh))
            tokens = 8 * seq
            gathers = []
            for op in hlo.collectives(text):
                over = set(hlo.axes_of_groups(op.groups, mesh))
                shapes = [a.shape for a in op.result] + [a.shape for a in op.operands]
                if op.kind == "all-gather" and over & batch_axes:
                    # The memory layer's arrays are [H, T, m(, C)] / [T, slots] over flattened
                    # tokens: token-sized = a dim of the global token count; row ids = int32 with
                    # m (8) slots last.
                    token_sized = any(tokens in s or tokens * 8 in s for s in shapes)
                    row_ids = any(a.dtype == "s32" and a.shape and a.shape[-1] == 8
                                  for a in op.result)
                    gathers.append([op.line[:160], token_sized, row_ids])
            table_reductions = [
                op.line[:160] for op in hlo.collectives(text)
                if op.kind in ("all-reduce", "reduce-scatter")
                and any(a.dtype == "f32" and (rows in a.shape or rows // 4 in a.shape)
                        and a.shape[-1] in (d_v, d_v // 2, 8, 4) for a in op.operands)]
            stack_rows = [s for s in hlo.parse_arrays(text) if layers * rows in s.shape]
            entry[str(seq)] = {
                "batch_gathers": gathers,
                "table_reductions": table_reductions,
                "stack_sized": [str(s) for s in stack_rows][:5],
            }
        if name == "fsdp4_tensor2":
            p = plan.state_shardings["params"]["shared"]
            opt = [list(x.spec) for x in jax.tree.leaves(plan.state_shardings["opt_state"])
                   if getattr(x, "spec", None) is not None and len(x.spec) == 3]
            entry["specs"] = {"values": list(p["values"].spec),
                              "pre_values": list(p["pre_values"].spec), "opt": opt}
        report["hlo"][name] = entry

    # Single device: the scanned step's temporaries when L doubles (4096 rows of 16 + 8 floats).
    def temporaries(n_layers):
        config = load_config(None, base + [
            f"model.num_layers={n_layers}", "model.memory.n_keys=64", "data.seq_len=64",
            "model.scan_layers=true", "model.remat=full"])
        plan = state_lib.plan(config)
        tokens = jax.ShapeDtypeStruct((2, 64), jnp.int32)
        step = jax.jit(grad_fn(plan.parts))
        memory = step.trace(plan.state["params"], plan.rest, {"inputs": tokens, "targets": tokens}
                            ).lower().compile().memory_analysis()
        return memory.temp_size_in_bytes
    if with_temporaries:
        report["temporaries"] = {"window_bytes": 4096 * 24 * 4,
                                 "L2": temporaries(2), "L4": temporaries(4)}
    print(json.dumps(report))
    """
)


def _run(cases, hlo_cases, with_temporaries) -> dict:
    return run_fresh(
        PROGRAM,
        json.dumps([BASE, cases, hlo_cases, with_temporaries, ROWS, LAYERS, D_V]),
        timeout=1200,
        stderr_tail=4000,
    )


@pytest.fixture(scope="module")
def report():
    return _run(CASES, HLO, True)


@pytest.fixture(scope="module")
def slow_report():
    return _run(SLOW_CASES, [], False)


def _check_case(result):
    # Selections first: every layer read exactly the rows it reads on one device (no flipped tie).
    assert result["hit_layers"] == LAYERS and result["hits_equal"]
    np.testing.assert_allclose(*result["loss"], rtol=1e-6)
    # Key balance is global: f and p averaged over the mesh before their product.
    np.testing.assert_allclose(*result["key_balance"], rtol=1e-5)
    for difference, scale in result["grads"]:
        assert difference <= 1e-5 * scale + 1e-7, (difference, scale)


@pytest.mark.parametrize("case", [name for name, _, _ in CASES])
def test_mesh_step_equals_single_device(report, case):
    _check_case(report["cases"][case])


@pytest.mark.slow
@pytest.mark.parametrize("case", [name for name, _, _ in SLOW_CASES])
def test_more_meshes_equal_single_device(slow_report, case):
    _check_case(slow_report["cases"][case])


@pytest.mark.parametrize("mesh", ["data8", "fsdp4_tensor2"])
def test_no_token_sized_gather_across_batch_axes(report, mesh):
    for seq, entry in report["hlo"][mesh].items():
        if seq == "specs":
            continue
        for line, token_sized, row_ids in entry["batch_gathers"]:
            assert not token_sized and not row_ids, (seq, line)


@pytest.mark.parametrize("mesh", ["data8", "fsdp4_tensor2"])
def test_no_stack_sized_table_buffer_and_one_reduction_per_table(report, mesh):
    entry = report["hlo"][mesh]
    for seq in [key for key in entry if key != "specs"]:
        # No array with L·n² rows: each layer's table gradient has its window's g·n² rows.
        assert entry[seq]["stack_sized"] == [], entry[seq]["stack_sized"]
    short = entry["16"]["table_reductions"]
    long = entry.get("512", entry["16"])["table_reductions"]
    # The table gradient is reduced over the batch axes once per layer (in the scan body, on the
    # window's [1, n², D] gradient; XLA may combine values and pre-values into one tuple), and the
    # collectives do not multiply with value_bag's token blocks (512 tokens per device).
    assert 1 <= len(short) <= 4, short
    assert len(long) == len(short), (short, long)


def test_tables_and_optimizer_state_sharded_by_the_rules(report):
    specs = report["hlo"]["fsdp4_tensor2"]["specs"]
    assert specs["values"] == [None, "fsdp", "tensor"]
    assert specs["pre_values"] == [None, "fsdp", "tensor"]
    assert [None, "fsdp", "tensor"] in specs["opt"]


def test_table_temporaries_do_not_grow_with_depth(report):
    temporaries = report["temporaries"]
    window = temporaries["window_bytes"]
    # Two more layers add less than one window of temporaries (a per-layer buffer of the whole
    # stack would add at least 2 windows per layer; stacked xs views, one more stack: 2 windows).
    assert temporaries["L4"] - temporaries["L2"] < window, temporaries
