"""value_bag's Pallas kernels end to end: models built with `implementation="pallas"` (the kernels in
the interpreter on CPU) match `"xla"` in the forward pass, every parameter gradient and a few
training steps of T-umv2.

The config's `implementation` field reaches every op of the memory layer (selection and value_bag);
to test the value_bag kernels alone, the selection ops' "pallas" is pinned to their XLA path here,
and value_bag's "pallas" to one kernel module at a time (gpu: Pallas Triton, tpu: Mosaic TPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.training.conftest import SPARSE, TINY
from umv2_jax.config import load_config
from umv2_jax.models.transformer import Transformer
from umv2_jax.ops import product_key_topk, registry, retrieval_topk, value_bag  # noqa: F401 (declare)

SELECTION_OPS = ("retrieval_topk", "product_key_topk")


# The TPU kernel's end-to-end runs are behind `slow` (its own tests cover it in the default suite);
# the default suite keeps the GPU kernel's model checks (about 30 s of CPU together).
@pytest.fixture(params=["gpu", pytest.param("tpu", marks=pytest.mark.slow)])
def pinned_kernel(request, monkeypatch):
    """value_bag's "pallas" = only the `request.param` kernel; selection ops' "pallas" = xla."""
    registered = registry.registered("value_bag")
    platform = "cuda" if request.param == "gpu" else "tpu"
    if platform not in registered.get("pallas", ()):
        pytest.skip(f"no value_bag {request.param} kernel registered")
    op = registry._op("value_bag")
    kernel = op.implementations["pallas"][platform]
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("interpret"))
        return kernel(*args, **kwargs)

    monkeypatch.setitem(op.implementations, "pallas", {platform: counted})
    for name in SELECTION_OPS:
        selection = registry._op(name)
        registry.registered(name)  # imports its kernels first, so that the pin is not undone
        monkeypatch.setitem(
            selection.implementations, "pallas", dict(selection.implementations["xla"])
        )
    return calls


def _config(sparse, implementation, *extra):
    field = "memory" if sparse == "umv2" else "product_key"
    overrides = TINY + SPARSE.get(sparse, [])
    if sparse == "peer":
        overrides += [
            "model.sparse=peer",
            "model.product_key.n_keys=6",
            "model.product_key.topk=4",
            "model.product_key.heads=2",
        ]
    return load_config(None, overrides + [f"model.{field}.implementation={implementation}", *extra])


def _loss_and_grads(config, tokens):
    model = Transformer(config.model, nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1])[0].astype(jnp.float32)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("sparse", ["umv2", "peer"])
def test_model_with_pallas_value_bag_matches_xla_in_loss_and_every_gradient(sparse, pinned_kernel):
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 17)), jnp.int32)
    got_loss, got = _loss_and_grads(_config(sparse, "pallas"), tokens)
    assert pinned_kernel, "the model-level implementation did not reach the value_bag kernel"
    want_loss, want = _loss_and_grads(_config(sparse, "xla"), tokens)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    got_leaves = jax.tree_util.tree_leaves_with_path(got)
    want_leaves = jax.tree_util.tree_leaves_with_path(want)
    assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
    for (path, g), (_, w) in zip(got_leaves, want_leaves):
        scale = max(1e-3, float(jnp.max(jnp.abs(w))))
        np.testing.assert_allclose(
            g, w, rtol=1e-4, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path)
        )


@pytest.mark.slow  # about 50 s of CPU on 2 cores: three steps, each kernel in the interpreter
def test_t_umv2_training_steps_give_the_same_losses(pinned_kernel):
    from umv2_jax.training.state import build
    from umv2_jax.training.step import make_train_step

    def losses(implementation):
        config = _config("umv2", implementation, "train.micro_batches=1", "train.batch_size=2",
                         "data.seq_len=16")  # fmt: skip
        setup = build(config)
        step = jax.jit(make_train_step(setup.parts, setup.optimizer, 1, config.train.seed))
        rng = np.random.default_rng(0)
        state, out = setup.state, []
        for _ in range(3):
            tokens = rng.integers(0, 256, (2, 17))
            batch = {
                "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
                "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
                "loss_mask": jnp.ones((2, 16), jnp.float32),
            }
            state, metrics = step(state, setup.rest, batch)
            out.append(float(metrics["loss"]))
        return out

    got = losses("pallas")
    assert pinned_kernel
    np.testing.assert_allclose(got, losses("xla"), rtol=1e-5)
