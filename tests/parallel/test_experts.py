"""Expert-parallel MoE (umv2_jax/parallel/experts.py) on 8 fake CPU devices.

Tiny MoE (d_model 32, 8 experts, top-2, expert_d_ff 16, 2 layers; batch 8 × 16 tokens). One
subprocess (`jax_num_cpu_devices` must be set before JAX starts) computes loss and gradients on
one device and on each mesh, the compiled HLO's collectives, and the ragged path's CUDA lowering;
the tests assert on its JSON report.
"""

import json
import os
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from tests.fixtures import run_fresh
from umv2_jax.ops.moe_dispatch import moe_dispatch, moe_dispatch_reference

TOKENS, TOP_K, HIDDEN, EXPERTS = 128, 2, 32, 8
BLOCK = 32  # model.moe.block_size

PROGRAM = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    import numpy as np
    from umv2_jax import parallel
    from umv2_jax.config import load_config
    from umv2_jax.parallel import experts, hlo
    from umv2_jax.training import state as state_lib, step as step_lib

    BASE = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=0",
            "model.sparse=moe", "model.moe.num_experts=8", "model.moe.top_k=2",
            "model.moe.expert_d_ff=16", "model.moe.block_size=32", "data.seq_len=16",
            "train.batch_size=8"]
    jobs = json.loads(sys.argv[1])

    def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                   recv_sizes, *, axis_name):
        # ragged_all_to_all's documented semantics from all_gather (XLA:CPU has no ragged one).
        me = jax.lax.axis_index(axis_name)
        sources = jax.lax.all_gather(operand, axis_name)
        starts = jax.lax.all_gather(input_offsets, axis_name)[:, me]
        sizes = jax.lax.all_gather(send_sizes, axis_name)[:, me]
        lands = jax.lax.all_gather(output_offsets, axis_name)[:, me]
        rows = jnp.arange(output.shape[0])
        for source in range(sources.shape[0]):
            inside = (rows >= lands[source]) & (rows < lands[source] + sizes[source])
            index = jnp.clip(starts[source] + rows - lands[source], 0, operand.shape[0] - 1)
            picked = sources[source][index]
            output = jnp.where(inside.reshape((-1,) + (1,) * (output.ndim - 1)), picked, output)
        return output

    def loss_fn(parts):
        def f(params, rest, batch):
            model = parts.build(params, rest)
            logits, aux = model(batch["inputs"], deterministic=True)
            ce = jnp.mean(step_lib.token_losses(logits, batch["targets"]))
            total, _, metrics = step_lib.aux_losses_and_metrics(aux)
            return ce + total, metrics
        return jax.value_and_grad(f, has_aux=True)

    def batch_of(rows):
        tokens = np.random.default_rng(0).integers(0, 256, (rows, 17)).astype(np.int32)
        return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}

    def single(extra, batch):
        config = load_config(None, BASE + extra + ["mesh.data=1"])
        setup = state_lib.build(config, parallel.make_mesh(config.mesh, jax.devices()[:1]))
        (loss, metrics), grads = jax.jit(loss_fn(setup.parts))(
            setup.state["params"], setup.rest, batch)
        return setup, float(loss), metrics, grads

    def on_mesh(setup, extra, axes, batch, ragged=False):
        config = load_config(None, BASE + extra + [f"mesh.{a}={n}" for a, n in axes.items()])
        mesh = parallel.make_mesh(config.mesh)
        layout = state_lib.plan(config, mesh)
        shard = layout.state_shardings["params"]
        params = jax.device_put(setup.state["params"], shard)
        rest = jax.device_put(setup.rest, layout.rest_shardings)
        tokens = parallel.batch_sharding(mesh)
        out = parallel.replicated(mesh)
        if ragged:
            experts.ragged_all_to_all = emulated_ragged_all_to_all
        with parallel.use_mesh(mesh):
            jitted = jax.jit(loss_fn(layout.parts), in_shardings=(shard, layout.rest_shardings,
                             tokens), out_shardings=((out, out), shard))
            compiled = jitted.trace(params, rest, jax.device_put(batch, tokens)).lower().compile()
            (loss, metrics), grads = compiled(params, rest, jax.device_put(batch, tokens))
        experts.ragged_all_to_all = jax.lax.ragged_all_to_all
        return compiled, float(loss), metrics, grads, layout

    def compare(reference, got):
        ref_loss, ref_grads = reference
        loss, grads = got
        errors = jax.tree.map(
            lambda a, r: float(np.max(np.abs(np.asarray(a) - np.asarray(r)))
                               / (np.max(np.abs(np.asarray(r))) + 1e-30)), grads, ref_grads)
        return {"loss": loss, "ref_loss": ref_loss,
                "grad_error": max(jax.tree.leaves(errors)),
                "grad_leaves": len(jax.tree.leaves(errors))}

    def collectives(compiled):
        return [{"kind": op.kind,
                 "shapes": [list(a.shape) for a in op.result + op.operands]}
                for op in hlo.collectives(compiled.as_text())]

    report = {}
    batch = batch_of(8)
    setup, ref_loss, ref_metrics, ref_grads = single([], batch)
    report["ref_metrics"] = {k: float(v) for k, v in ref_metrics.items()}
    for name, job in jobs.items():
        extra, axes = job.get("extra", []), job["axes"]
        if job.get("identical_shards"):  # every device gets the same sequence
            one = batch_of(1)
            setup_1, loss_1, metrics_1, grads_1 = single(extra, one)
            repeated = jax.tree.map(lambda x: jnp.tile(x, (8, 1)), one)
            compiled, loss, metrics, grads, _ = on_mesh(setup_1, extra, axes, repeated)
            entry = compare((loss_1, grads_1), (loss, grads))
            entry["ref_metrics"] = {k: float(v) for k, v in metrics_1.items()}
        else:
            ref = (ref_loss, ref_grads)
            if extra:
                setup_x, loss_x, _, grads_x = single(extra, batch)
                ref = (loss_x, grads_x)
            compiled, loss, metrics, grads, layout = on_mesh(
                setup, extra, axes, batch, ragged=job.get("emulate_ragged", False))
            entry = compare(ref, (loss, grads))
        entry["metrics"] = {k: float(v) for k, v in metrics.items()}
        if job.get("hlo"):
            entry["collectives"] = collectives(compiled)
        report[name] = entry
        print(name, "done", file=sys.stderr, flush=True)

    if "cuda" in sys.argv[2:]:
        config = load_config(None, BASE + ["mesh.data=2", "mesh.tensor=2", "mesh.expert=2"])
        mesh = parallel.make_mesh(config.mesh)
        layout = state_lib.plan(config, mesh)
        tokens = parallel.batch_sharding(mesh)
        abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=tokens)
                    for k, v in batch.items()}
        from umv2_jax.ops import registry
        with registry.lowering_platforms("cuda"), parallel.use_mesh(mesh):
            lowered = jax.jit(loss_fn(layout.parts)).trace(
                layout.state["params"], layout.rest, abstract).lower(lowering_platforms=("cuda",))
        text = lowered.as_text()
        report["cuda"] = {"ragged_all_to_all": text.count("ragged_all_to_all"),
                          "all_to_all": text.count("all_to_all")}
    print(json.dumps(report))
    """
)

DEFAULT_JOBS = {
    # The four meshes of the issue; HLO collectives at the expert-parallel one.
    "data2_tensor2_expert2": {"axes": {"data": 2, "tensor": 2, "expert": 2}, "hlo": True},
    "data8": {"axes": {"data": 8}},
    "fsdp4_tensor2": {"axes": {"data": 1, "fsdp": 4, "tensor": 2}},
    "tensor4_fsdp2": {"axes": {"data": 1, "tensor": 4, "fsdp": 2}},
    # The ragged (dropless) exchange's offsets, with ragged_all_to_all emulated by all_gather.
    "ragged_emulated": {
        "axes": {"data": 2, "tensor": 2, "expert": 2},
        "extra": ["model.moe.expert_parallel=ragged"],
        "emulate_ragged": True,
    },
}

SLOW_JOBS = {
    "expert8": {"axes": {"data": 1, "expert": 8}, "hlo": True},
    "expert8_ragged_emulated": {
        "axes": {"data": 1, "expert": 8},
        "extra": ["model.moe.expert_parallel=ragged"],
        "emulate_ragged": True,
    },
    # A small exchange buffer drops (and reports it); capacity per shard on identical shards.
    "expert4_small_buffer": {
        "axes": {"data": 2, "expert": 4},
        "extra": ["model.moe.expert_parallel=capacity", "model.moe.ep_capacity_factor=0.5"],
    },
    "capacity_per_shard": {
        "axes": {"data": 2, "expert": 4},
        "extra": ["model.moe.capacity_factor=1.0"],
        "identical_shards": True,
    },
}


def _run(jobs: dict, *flags: str) -> dict:
    return run_fresh(PROGRAM, json.dumps(jobs), *flags, timeout=900)


@pytest.fixture(scope="module")
def report():
    return _run(DEFAULT_JOBS, "cuda")


@pytest.fixture(scope="module")
def slow_report():
    return _run(SLOW_JOBS)


def _assert_matches_one_device(entry):
    assert entry["grad_leaves"] > 10
    np.testing.assert_allclose(entry["loss"], entry["ref_loss"], rtol=1e-6)
    assert entry["grad_error"] < 1e-5, entry["grad_error"]


@pytest.mark.parametrize("mesh", sorted(DEFAULT_JOBS))
def test_one_step_loss_and_gradients_equal_one_device(report, mesh):
    _assert_matches_one_device(report[mesh])


def test_routing_statistics_are_those_of_the_whole_batch(report):
    # lb / z losses and the diagnostics come from psum'd statistics, equal to one device's.
    for mesh in DEFAULT_JOBS:
        metrics = report[mesh]["metrics"]
        for name, value in report["ref_metrics"].items():
            np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=(mesh, name))
    # The dropless exchange drops nothing (capacity = worst case) and says so.
    assert report["data2_tensor2_expert2"]["metrics"]["layer0/ep_dropped_fraction"] == 0.0


def _shapes(collectives, kind):
    return [tuple(shape) for op in collectives if op["kind"] == kind for shape in op["shapes"]]


def _assert_expert_parallel_collectives(entry, data, expert):
    tokens = TOKENS // (data * expert)  # a device's tokens
    rows = tokens * min(TOP_K, EXPERTS // expert)  # exchange buffer rows per destination
    collectives = entry["collectives"]
    # Token rows go out and come back (and their gradients) through all-to-all over `expert`:
    # 4 per layer. (XLA:CPU prints an all-to-all as one [1, C, h] chunk per peer.)
    exchanges = [
        op
        for op in collectives
        if op["kind"] == "all-to-all"
        and all(shape in ([expert, rows, HIDDEN], [1, rows, HIDDEN]) for shape in op["shapes"])
    ]
    assert len(exchanges) >= 4 * 2, len(exchanges)
    # No all-reduce of an assignment-sized buffer: [T·k, h] globally or per device, the exchange
    # buffer, its block-padded copy, or [T, k, h]; tensor parallelism psums only the combined
    # output and the token gradient, [T, h] per device.
    per_device = EXPERTS // expert
    padded = -(-(expert * rows + per_device * (BLOCK - 1)) // BLOCK) * BLOCK
    forbidden = {
        (TOKENS * TOP_K, HIDDEN),
        (tokens * TOP_K, HIDDEN),
        (expert * rows, HIDDEN),
        (padded, HIDDEN),
        (TOKENS, TOP_K, HIDDEN),
        (tokens, TOP_K, HIDDEN),
    }
    too_big = forbidden & set(_shapes(collectives, "all-reduce"))
    assert not too_big, too_big
    # Expert weights are never gathered whole (they stay split over `expert`).
    gathered = [s for s in _shapes(collectives, "all-gather") if len(s) == 3 and s[0] == EXPERTS]
    assert not gathered, gathered


def test_expert_parallel_step_exchanges_tokens_by_all_to_all(report):
    _assert_expert_parallel_collectives(report["data2_tensor2_expert2"], 2, 2)


def test_ragged_path_lowers_to_ragged_all_to_all_for_cuda(report):
    # auto picks the ragged exchange when lowering for GPU (XLA:CPU cannot run it).
    assert report["cuda"]["ragged_all_to_all"] >= 2 * 3


def test_absent_assignments_are_computed_by_no_expert():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((10, 8), np.float32))
    ids = jnp.asarray(rng.integers(0, 3, (10, 1)), jnp.int32)
    valid = jnp.asarray(rng.random((10, 1)) < 0.6)
    weights = [jnp.asarray(rng.standard_normal(s, np.float32)) for s in [(3, 8, 4)] * 2]
    down = jnp.asarray(rng.standard_normal((3, 4, 8), np.float32))
    for capacity in (None, 2):
        out, kept = moe_dispatch(
            x, ids, *weights, down, capacity=capacity, block_size=2, valid=valid
        )
        ref_out, ref_kept = moe_dispatch_reference(
            x, ids, *weights, down, capacity=capacity, valid=valid
        )
        np.testing.assert_array_equal(kept, ref_kept)
        assert not np.any(np.asarray(kept)[~np.asarray(valid)])
        np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_expert8_mesh_matches_and_exchanges_by_all_to_all(slow_report):
    _assert_matches_one_device(slow_report["expert8"])
    _assert_matches_one_device(slow_report["expert8_ragged_emulated"])
    _assert_expert_parallel_collectives(slow_report["expert8"], 1, 8)


@pytest.mark.slow
def test_small_exchange_buffer_drops_and_reports_it(slow_report):
    entry = slow_report["expert4_small_buffer"]
    dropped = [entry["metrics"][f"layer{i}/ep_dropped_fraction"] for i in (0, 1)]
    assert all(0.0 < d < 1.0 for d in dropped), dropped
    # The dropped assignments contribute nothing: the loss moves away from the dropless one.
    assert abs(entry["loss"] - entry["ref_loss"]) > 1e-4


@pytest.mark.slow
def test_capacity_is_per_shard(slow_report):
    # Identical shards: each device drops what one device drops on its shard alone.
    entry = slow_report["capacity_per_shard"]
    _assert_matches_one_device(entry)
    for layer in (0, 1):
        name = f"layer{layer}/dropped_fraction"
        assert entry["ref_metrics"][name] > 0
        np.testing.assert_allclose(entry["metrics"][name], entry["ref_metrics"][name], rtol=1e-6)


# Compiles the expert-parallel step for a TPU v5e 2x2 topology (4 chips) from this CPU host.
TPU_PROGRAM = textwrap.dedent(
    """
    import json
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from umv2_jax import parallel
    from umv2_jax.config import load_config
    from umv2_jax.parallel import hlo
    from umv2_jax.training import state as state_lib, step as step_lib

    BASE = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=0",
            "model.sparse=moe", "model.moe.num_experts=8", "model.moe.top_k=2",
            "model.moe.expert_d_ff=16", "data.seq_len=16", "train.batch_size=8"]
    devices = topologies.get_topology_desc("v5e:2x2", platform="tpu").devices
    report = {}
    for name, axes in {"expert4": ["mesh.data=1", "mesh.expert=4"],
                       "expert2_tensor2": ["mesh.data=1", "mesh.expert=2", "mesh.tensor=2"]}.items():
        config = load_config(None, BASE + axes)
        mesh = parallel.make_mesh(config.mesh, devices)
        layout = state_lib.plan(config, mesh)
        tokens = parallel.batch_sharding(mesh)
        batch = {k: jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=tokens)
                 for k in ("inputs", "targets")}

        def loss(params, rest, batch, parts=layout.parts):
            logits, aux = parts.build(params, rest)(batch["inputs"], deterministic=True)
            total, _, _ = step_lib.aux_losses_and_metrics(aux)
            return jnp.mean(step_lib.token_losses(logits, batch["targets"])) + total

        with parallel.use_mesh(mesh):
            compiled = jax.jit(
                jax.value_and_grad(loss),
                in_shardings=(layout.state_shardings["params"], layout.rest_shardings, tokens),
            ).trace(layout.state["params"], layout.rest, batch).lower().compile()
        ops = hlo.collectives(compiled.as_text())
        report[name] = {"ragged": sum(op.kind == "ragged-all-to-all" for op in ops)}
    print(json.dumps(report))
    """
)


@pytest.mark.slow
def test_ragged_path_compiles_for_a_tpu_topology():
    from pallas_kernels import testing

    python = testing.tpu_python()
    if python is None:
        pytest.skip("no Python with libtpu")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env.update(testing.TPU_COMPILE_ENV, UMV2_LOWERING_PLATFORMS="tpu")
    report = run_fresh(TPU_PROGRAM, timeout=900, env=env, python=python)
    for name in ("expert4", "expert2_tensor2"):
        # Out, back, and both again in the backward, per layer: the dropless exchange on TPU.
        assert report[name]["ragged"] >= 2 * 4, report
