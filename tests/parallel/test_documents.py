"""Packed batches on a mesh: "segment_ids" and "positions" take the batch sharding like every other
key of the batch (the loop's one `batch_sharding` for the whole dict), the attention's shard_map
splits the ids with their rows, and one train step equals the single-device step.

One subprocess with 8 fake CPU devices: a dense model (an UltraMemV2 one, with token-local memory
layers, is `slow`) on mesh (data 2, fsdp 2, tensor 2) against a 1-device mesh, the step's gradients
captured by an optimizer whose state is the gradients (as tests/parallel/test_equivalence.py does).
The ids' effect on the loss is checked single-device in tests/training/test_step.py.
"""

import json
import textwrap

import numpy as np
import pytest

from tests.fixtures import run_fresh
from tests.training.conftest import SPARSE, TINY

OVERRIDES = TINY + ["train.batch_size=8", "model.attention_chunk=8"]
SLOW_OVERRIDES = OVERRIDES + SPARSE["umv2"]

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
    from umv2_jax.training import state as state_lib
    from umv2_jax.training.step import make_train_step

    config = load_config(None, json.loads(sys.argv[1]))
    b, s = config.train.batch_size, config.data.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (b, s + 1)).astype(np.int32)
    starts = [0, 5, 12, 20, 31]  # documents of 5, 7, 8, 11 and 1 tokens, shifted per row
    segment_ids = np.zeros((b, s), np.int32)
    positions = np.zeros((b, s), np.int32)
    for row in range(b):
        cuts = sorted({(c + row) % s for c in starts} | {0})
        for number, (lo, hi) in enumerate(zip(cuts, cuts[1:] + [s]), start=1):
            segment_ids[row, lo:hi] = number
            positions[row, lo:hi] = np.arange(hi - lo)
    packed = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
              "loss_mask": np.ones((b, s), np.float32),
              "segment_ids": segment_ids, "positions": positions}

    def capture_gradients():
        init = lambda params: jax.tree.map(jnp.zeros_like, params)
        update = lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads)
        return optax.GradientTransformation(init, update)

    def one_step(devices, shape, batch):
        mesh = parallel.make_mesh(MeshConfig(*shape), devices)
        setup = state_lib.build(config, mesh)
        shardings = dict(setup.state_shardings, opt_state=setup.state_shardings["params"])
        state = dict(setup.state, opt_state=jax.device_put(
            jax.tree.map(jnp.zeros_like, setup.state["params"]), shardings["opt_state"]))
        batch_sharding = parallel.batch_sharding(mesh)
        placed = jax.device_put(batch, batch_sharding)
        step = make_train_step(setup.parts, capture_gradients(), 1, config.train.seed)
        with parallel.use_mesh(mesh):
            jitted = jax.jit(step, in_shardings=(shardings, setup.rest_shardings, batch_sharding),
                             out_shardings=(shardings, parallel.replicated(mesh)))
            new_state, metrics = jitted(state, setup.rest, placed)
        ids_spec = [list(a) if isinstance(a, tuple) else a
                    for a in placed.get("segment_ids", placed["inputs"]).sharding.spec]
        return metrics, jax.tree.leaves(new_state["opt_state"]), ids_spec

    ref_metrics, ref_grads, _ = one_step(jax.devices()[:1], (1, 1, 1, 1), packed)
    metrics, grads, ids_spec = one_step(jax.devices(), (2, 2, 2, 1), packed)
    worst = max(float(np.max(np.abs(np.asarray(g) - np.asarray(r))))
                / (float(np.max(np.abs(np.asarray(r)))) or 1.0)
                for g, r in zip(grads, ref_grads))
    print(json.dumps({
        "loss": float(metrics["lm_loss"]),
        "ref_loss": float(ref_metrics["lm_loss"]),
        "worst_gradient": worst,
        "ids_spec": ids_spec,
    }))
    """
)


@pytest.mark.parametrize(
    "overrides",
    [OVERRIDES, pytest.param(SLOW_OVERRIDES, marks=pytest.mark.slow)],
    ids=["dense", "umv2"],
)
def test_packed_step_on_a_mesh_equals_the_single_device_step(overrides):
    case = run_fresh(PROGRAM, json.dumps(overrides))
    assert case["ids_spec"] == [["data", "fsdp", "expert"]]  # rows over the batch axes, as "inputs"
    np.testing.assert_allclose(case["loss"], case["ref_loss"], rtol=1e-5)
    assert case["worst_gradient"] < 2e-5
