"""Scan over layers: a scanned model is the loop model with its blocks stacked.

The oracle is the unscanned model (a Python loop over blocks, each block checked against its own
reference elsewhere): built from the same seed, the scanned model must hold the same numbers, and give
the same logits, auxiliary losses, metrics and gradients, for every kind of sparse layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from umv2_jax.config import load_config
from umv2_jax.models.transformer import (
    BlockStack,
    Transformer,
    convert_block_tree,
    segment_layout,
)

BASE = [
    "model.d_model=32",
    "model.num_layers=4",
    "model.num_heads=2",
    "model.d_ff=48",
    "model.vocab_size=64",
]
UMV2 = [
    "model.sparse=ultramem_v2",
    "model.memory.n_keys=6",
    "model.memory.key_dim=8",
    "model.memory.rc_topk=4",
    "model.memory.topk=4",
    "model.memory.value_dim=8",
    "model.memory.pre_value_dim=4",
    "model.memory.calibration_tokens=32",
]
PRODUCT_KEY = [
    "model.product_key.n_keys=6",
    "model.product_key.key_dim=8",
    "model.product_key.topk=4",
    "model.product_key.heads=2",
]
KINDS = {
    "dense": [],
    "umv2_ring_losses_heads": UMV2
    + [
        "model.memory.value_share=ring:2",
        "model.memory.heads=2",
        "model.memory.tucker_penalty=0.5",
        "model.memory.tucker_tau=0.01",
        "model.memory.key_balance=0.01",
    ],
    "umv2_some_blocks": UMV2 + ["model.sparse_layers=[1, 2]", "model.memory.value_share=block:2"],
    "moe": [
        "model.sparse=moe",
        "model.d_ff=0",
        "model.moe.num_experts=4",
        "model.moe.top_k=2",
        "model.moe.expert_d_ff=16",
    ],
    "pkm": ["model.sparse=pkm"] + PRODUCT_KEY,
    "memory_plus": ["model.sparse=memory_plus", "model.product_key.value_dim=16"] + PRODUCT_KEY,
    "peer": ["model.sparse=peer"] + PRODUCT_KEY,
    "ultramem_skip": [
        "model.num_layers=8",
        "model.sparse=ultramem",
        "model.ultramem.n_keys=6",
        "model.ultramem.key_dim=8",
        "model.ultramem.topk=4",
        "model.ultramem.value_dim=12",
        "model.ultramem.value_expand=4",
        "model.ultramem.skip_layers=0:3/4:7",
    ],
}
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)


def _models(overrides, scan_extra=()):
    loop = load_config(None, BASE + overrides + ["model.scan_layers=false"]).model
    scan = load_config(None, BASE + overrides + ["model.scan_layers=true", *scan_extra]).model
    return loop, scan


def _init(config):
    """The model's parameters and other state as pure dicts (one jitted init)."""

    @jax.jit
    def init():
        _, params, rest = nnx.split(Transformer(config, nnx.Rngs(3)), nnx.Param, ...)
        return params.to_pure_dict(), rest.to_pure_dict()

    return init()


def _forward(config, rest, diagnostics=False):
    """params (pure dict) → (logits, aux) of `config`'s model on TOKENS, with `rest` fixed."""
    abstract = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(3)))
    graphdef, params_state, rest_state = nnx.split(abstract, nnx.Param, ...)

    def forward(params):
        state = jax.tree.map(lambda x: x, params_state)
        nnx.replace_by_pure_dict(state, params)
        others = jax.tree.map(lambda x: x, rest_state)
        nnx.replace_by_pure_dict(others, rest)
        return nnx.merge(graphdef, state, others)(TOKENS, diagnostics=diagnostics)

    return forward


def _loss_and_grads(config, params, rest, diagnostics=False):
    forward = _forward(config, rest, diagnostics)

    def loss(params):
        logits, aux = forward(params)
        log_probs = jax.nn.log_softmax(logits)
        nll = -jnp.mean(jnp.take_along_axis(log_probs, jnp.roll(TOKENS, -1, 1)[..., None], -1))
        return nll + sum(aux.losses.values(), 0.0), (logits, aux)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def _to_loop(tree, scan_config, loop_config):
    tree = dict(tree)
    if "blocks" not in tree:
        return tree
    tree["blocks"] = convert_block_tree(
        tree["blocks"], segment_layout(scan_config), segment_layout(loop_config)
    )
    return tree


def _assert_trees_close(actual, expected, **tolerance):
    flat_actual = jax.tree_util.tree_leaves_with_path(actual)
    flat_expected = jax.tree_util.tree_leaves_with_path(expected)
    assert [p for p, _ in flat_actual] == [p for p, _ in flat_expected]
    for (path, a), (_, b) in zip(flat_actual, flat_expected):
        np.testing.assert_allclose(a, b, err_msg=jax.tree_util.keystr(path), **tolerance)


@pytest.mark.parametrize("kind", list(KINDS))
def test_scanned_model_equals_the_loop_model(kind):
    loop_config, scan_config = _models(KINDS[kind])
    assert any(len(segment) > 1 for segment in segment_layout(scan_config))
    loop_params, loop_rest = _init(loop_config)
    scan_params, scan_rest = _init(scan_config)
    # The same numbers, stacked: initialization does not depend on the layout.
    _assert_trees_close(
        _to_loop(scan_params, scan_config, loop_config), loop_params, rtol=0, atol=0
    )
    _assert_trees_close(_to_loop(scan_rest, scan_config, loop_config), loop_rest, rtol=0, atol=0)

    (loop_loss, (loop_logits, loop_aux)), loop_grads = _loss_and_grads(
        loop_config, loop_params, loop_rest, diagnostics=True
    )
    (scan_loss, (scan_logits, scan_aux)), scan_grads = _loss_and_grads(
        scan_config, scan_params, scan_rest, diagnostics=True
    )
    np.testing.assert_allclose(scan_loss, loop_loss, rtol=1e-6)
    np.testing.assert_allclose(scan_logits, loop_logits, rtol=1e-5, atol=1e-6)
    assert scan_aux.losses.keys() == loop_aux.losses.keys()
    assert scan_aux.metrics.keys() == loop_aux.metrics.keys()
    _assert_trees_close(scan_aux.losses, loop_aux.losses, rtol=1e-5, atol=1e-7)
    _assert_trees_close(scan_aux.metrics, loop_aux.metrics, rtol=1e-5, atol=1e-6)
    _assert_trees_close(scan_aux.row_hits, loop_aux.row_hits, rtol=0, atol=0)
    _assert_trees_close(
        _to_loop(scan_grads, scan_config, loop_config), loop_grads, rtol=2e-5, atol=1e-7
    )


@pytest.mark.parametrize("remat", ["full", "save_dots"])
@pytest.mark.parametrize("scan", [False, True])
def test_rematerialization_changes_no_number(remat, scan):
    overrides = KINDS["umv2_ring_losses_heads"] + [f"model.scan_layers={str(scan).lower()}"]
    plain = load_config(None, BASE + overrides).model
    remat_config = load_config(None, BASE + overrides + [f"model.remat={remat}"]).model
    params, rest = _init(plain)
    (loss, (logits, _)), grads = _loss_and_grads(plain, params, rest)
    (remat_loss, (remat_logits, _)), remat_grads = _loss_and_grads(remat_config, params, rest)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    np.testing.assert_allclose(remat_logits, logits, rtol=1e-5, atol=1e-6)
    _assert_trees_close(remat_grads, grads, rtol=2e-5, atol=1e-7)


def test_rematerialization_recomputes_in_the_backward():
    """With remat the backward recomputes the block's forward: its matmuls appear again."""
    overrides = BASE + KINDS["dense"] + ["model.scan_layers=true"]

    def dots_in_grad(remat):
        config = load_config(None, overrides + [f"model.remat={remat}"]).model
        params, rest = _init(config)
        forward = _forward(config, rest)

        def loss(params):
            return jnp.mean(forward(params)[0] ** 2)

        text = jax.jit(jax.grad(loss)).lower(params).as_text()
        return text.count("stablehlo.dot_general")

    assert dots_in_grad("full") > dots_in_grad("none")


def test_layout_groups_runs_of_identical_blocks():
    def layout(*overrides):
        return segment_layout(load_config(None, BASE + list(overrides)).model)

    assert layout() == ((0,), (1,), (2,), (3,))  # 4 blocks: auto is the loop
    assert layout("model.num_layers=8") == (tuple(range(8)),)  # auto scans from 8 blocks
    assert layout("model.scan_layers=true") == ((0, 1, 2, 3),)
    # Memory in blocks 1 and 2 only: dense, memory, memory, dense.
    assert layout("model.scan_layers=true", *UMV2, "model.sparse_layers=[1, 2]") == (
        (0,),
        (1, 2),
        (3,),
    )
    # Skip wiring 0:3/4:7: the tapped blocks (0, 4) and the memories (3, 7) stay single.
    ultramem = KINDS["ultramem_skip"]
    assert layout("model.scan_layers=true", *ultramem) == (
        (0,),
        (1, 2),
        (3,),
        (4,),
        (5, 6),
        (7,),
    )


def test_stacked_parameters_carry_a_leading_layers_axis():
    config = load_config(None, BASE + UMV2 + ["model.scan_layers=true"]).model
    model = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0)))
    (stack,) = model.blocks
    assert isinstance(stack, BlockStack) and stack.indices == (0, 1, 2, 3)
    query = stack.layers.attn.query
    assert query.get_value().shape[0] == 4
    assert query.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "kv")
    window = stack.layers.sparse.window
    assert window.get_value().shape == (4, 1)  # one table per layer, stacked


def test_scanned_program_does_not_grow_with_depth():
    """One block body in the program, whatever the depth (the loop repeats it per block)."""

    def dots(blocks, scan):
        config = load_config(
            None,
            BASE + UMV2 + [f"model.num_layers={blocks}", f"model.scan_layers={str(scan).lower()}"],
        ).model
        abstract = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
        return forward.lower(state, TOKENS).as_text().count("stablehlo.dot_general")

    assert dots(2, True) == dots(6, True)
    assert dots(6, False) > dots(2, False)


def test_block_tree_conversion_round_trips():
    loop_config, scan_config = _models(UMV2 + ["model.sparse_layers=[0, 1, 2]"])
    params, _ = _init(loop_config)
    scanned = convert_block_tree(
        params["blocks"], segment_layout(loop_config), segment_layout(scan_config)
    )
    assert set(scanned) == {0, 1}  # blocks 0–2 stacked, block 3 (dense) alone
    assert scanned[0]["layers"]["attn"]["query"].shape[0] == 3
    back = convert_block_tree(scanned, segment_layout(scan_config), segment_layout(loop_config))
    _assert_trees_close(back, params["blocks"], rtol=0, atol=0)
