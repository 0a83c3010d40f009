"""Release compatibility (docs/model.md §9.7): the layer reproduces the authors' own layer on two stored cases.

The fixtures (tests/release_cases/, see its README) hold the release layer's weights, input,
intermediate scores, selected indices, output and the gradients of sum(out²). Built with
`per_rank_query: false`, one head, two cores, rc_topk = topk = knn and the file's permutation and
rank-1 vectors, the layer must select exactly the same slots and match output and gradients to float32
tolerance (≤ 1e-5 relative).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.fixtures import load_release_case
from umv2_jax.config import MemoryConfig, ModelConfig
from umv2_jax.models.retrieval import rank_one_vectors
from umv2_jax.models.sparse import SparseContext
from umv2_jax.models.ultramem_v2 import MemoryTables, UltraMemV2

TOLERANCE = 1e-5


def assert_close(actual, expected, name):
    """|a − e| ≤ 1e-5·(|e| + max|e|): relative to each element and to the array's scale."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, name
    scale = np.max(np.abs(expected))
    error = np.abs(actual - expected)
    bound = TOLERANCE * (np.abs(expected) + scale)
    assert np.all(error <= bound), f"{name}: worst error {error.max():.3g} (scale {scale:.3g})"


def load_case(name: str):
    data = dict(load_release_case(name))
    meta = json.loads(str(data["meta_json"]))["args"]
    return data, meta


def build_layer(data, meta):
    """The layer configured as docs/model.md §9.7 says, with every array of the file loaded into it."""
    kdim, hidden = meta["kdim"], meta["hidden"]
    config = ModelConfig(
        d_model=hidden,
        num_layers=1,
        num_heads=1,
        d_ff=4 * hidden,
        sparse="ultramem_v2",
        memory=MemoryConfig(
            n_keys=meta["knum"],
            key_dim=kdim,
            tucker_rank=meta["tucker_rank"],
            n_cores=meta["tucker_multihead"],
            rc_topk=meta["knn"],
            topk=meta["knn"],
            heads=meta["head"],
            value_dim=meta["vdim"],
            pre_value_dim=meta["pre_vdim"],
            key_expand=meta["key_expand_time"],
            per_rank_query=False,
            norm_eps=1e-5,
            init="release",
            tucker_penalty=1.0,  # weight 1: the file's `tucker/aux_loss` is the unweighted penalty
            tucker_tau=0.15,
        ),
    )
    config.validate()
    tables, layer = nnx.eval_shape(
        lambda: (MemoryTables(config, nnx.Rngs(0)), UltraMemV2(config, 0, nnx.Rngs(1)))
    )
    q = "param/query_layer/"
    query = data[q + "query_proj.weight"][: 2 * kdim].T  # [h, 2·D_k]: row query, then column query
    layer.retrieval.query.set_value(jnp.asarray(query.reshape(hidden, 1, 2, 1, kdim)))
    layer.retrieval.query_gain.set_value(jnp.asarray(data[q + "query_norm.weight"][None]))
    layer.retrieval.key_gain.set_value(jnp.asarray(data[q + "keys_norm.weight"][None]))
    # [head, side, key, dim, rank] → [head, side, key, rank, dim]
    layer.retrieval.keys.set_value(jnp.asarray(data[q + "keys"].transpose(0, 1, 2, 4, 3)))
    cores = np.stack([data[q + "tucker_core.0"], data[q + "tucker_core.1"]], axis=1)  # [1, C, r, r]
    layer.retrieval.cores.set_value(jnp.asarray(cores))
    layer.pre_value_proj.set_value(jnp.asarray(data[q + "pre_values_proj.weight"].T))
    layer.output_proj.set_value(jnp.asarray(data[q + "values_proj.weight"].T))
    layer.permutation.set_value(jnp.asarray(data["buffer/query_layer/shuffle_index"], jnp.int32))
    # One memory layer reading its own table (eval_shape left the structural state abstract).
    layer.window.set_value(jnp.asarray([0], jnp.int32))
    layer.block_index.set_value(jnp.int32(0))
    v = "param/value_layer/"
    tables.values.set_value(jnp.asarray(data[v + "values_for_look_up"][None]))
    tables.pre_values.set_value(jnp.asarray(data[v + "pre_values_for_look_up"][None]))
    rank_one = (
        jnp.asarray(data["buffer/query_layer/tucker_core_u"].reshape(1, -1)),
        jnp.asarray(data["buffer/query_layer/tucker_core_v"].reshape(1, -1)),
    )
    return layer, tables, rank_one


@pytest.fixture(scope="module", params=["small_sn", "ket2_sn"])
def case(request):
    """Runs the layer once per case: forward, selection and the gradients of sum(out²)."""
    data, meta = load_case(request.param)
    layer, tables, rank_one = build_layer(data, meta)
    graphdef, params, rest = nnx.split((layer, tables), nnx.Param, ...)
    x = jnp.asarray(data["input/x"])

    def loss(params, x):
        layer, tables = nnx.merge(graphdef, params, rest)
        output = layer(x, SparseContext(shared=tables), rank_one=rank_one)
        out = output.y
        aux = {**{f"loss/{k}": v for k, v in output.losses.items()}, **output.metrics}
        result = layer.retrieval(x, implementation="xla", rank_one=rank_one)
        rows, _, groups = layer.physical_rows(result.grid_indices)
        return jnp.sum(out * out), (out, aux, result, rows, groups)

    # Backend optimization level 0 compiles about twice as fast and computes the same float32 ops.
    compiled = (
        jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
        .lower(params, x)
        .compile({"xla_backend_optimization_level": 0})
    )
    (value, extras), (grads, grad_x) = compiled(params, x)
    return data, meta, layer, value, extras, grads, grad_x


def test_rank_one_vectors_equal_the_sign_ruled_svd_in_the_file(case):
    data, _, layer, *_ = case
    u_star, t_star = rank_one_vectors(layer.retrieval.cores[...][0])
    assert_close(u_star, data["tucker/u"].reshape(-1), "u*")
    assert_close(t_star, data["tucker/v"].reshape(-1), "t*")


def test_selected_slots_are_exactly_the_releases(case):
    data, meta, _, _, extras, _, _ = case
    _, _, result, rows, groups = extras
    grid = np.asarray(result.grid_indices[0])
    expected = data["tdqkr/best_indices"]
    # Same sets per token, and (no ties in these cases) the same descending order.
    np.testing.assert_array_equal(np.sort(grid, axis=1), np.sort(expected, axis=1))
    np.testing.assert_array_equal(grid, expected)
    np.testing.assert_array_equal(rows[0], data["trace/FusedLookup/rows"])
    np.testing.assert_array_equal(groups[0], data["trace/FusedLookup/groups"])
    assert_close(result.core_scores[0], data["tdqkr/best_scores"], "per-core scores")


def test_output_and_loss_match(case):
    data, _, _, value, extras, _, _ = case
    out, aux = extras[0], extras[1]
    assert_close(out, data["output/out"], "output")
    assert_close(value, data["output/loss"], "loss")
    assert_close(aux["loss/tucker_penalty"], data["tucker/aux_loss"], "Tucker penalty")
    singular_values = data["tucker/svd_S"].reshape(-1)
    assert_close([aux["lambda1"], aux["lambda2"]], singular_values, "λ1, λ2")


def test_every_gradient_matches(case):
    data, meta, _, _, _, grads, grad_x = case
    kdim, hidden = meta["kdim"], meta["hidden"]
    layer_grads, table_grads = grads[0], grads[1]
    retrieval = layer_grads["retrieval"]
    q, v = "grad/query_layer/", "grad/value_layer/"
    assert_close(grad_x, data["grad/x"], "x")
    query_grad = data[q + "query_proj.weight"]
    assert_close(retrieval["query"][...].reshape(hidden, 2 * kdim).T, query_grad[: 2 * kdim], "W_q")
    # The release's projection has rows no head reads (docs/model.md §9.1); they get exactly zero gradient.
    np.testing.assert_array_equal(query_grad[2 * kdim :], 0.0)
    assert_close(retrieval["query_gain"][...][0], data[q + "query_norm.weight"], "γ_q")
    assert_close(retrieval["key_gain"][...][0], data[q + "keys_norm.weight"], "γ_k")
    assert_close(retrieval["keys"][...], data[q + "keys"].transpose(0, 1, 2, 4, 3), "keys")
    cores = np.stack([data[q + "tucker_core.0"], data[q + "tucker_core.1"]], axis=1)
    assert_close(retrieval["cores"][...], cores, "cores")
    assert_close(layer_grads["pre_value_proj"][...].T, data[q + "pre_values_proj.weight"], "W_p")
    assert_close(layer_grads["output_proj"][...].T, data[q + "values_proj.weight"], "W_o")
    assert_close(table_grads["values"][...][0], data[v + "values_for_look_up"], "values")
    assert_close(
        table_grads["pre_values"][...][0], data[v + "pre_values_for_look_up"], "pre-values"
    )
