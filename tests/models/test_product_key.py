"""The product-key baselines (docs/model.md §7) against naive per-token references written from the papers.

Each reference picks the selected rows token by token in numpy (brute force over the whole n × n grid
for product keys; docs/model.md §2 steps 1–6 written out for UltraMem v1), then evaluates the layer's equation
in plain jax.numpy on those fixed rows, so `jax.grad` of the reference gives independent gradients
(the selection carries no gradient in either). Inputs are fresh random fp32.
Tolerances (fp32, sums taken in a different order): outputs rtol 1e-5, gradients rtol 1e-4, each
with an atol of rtol × the reference's largest magnitude (entries that cancel to ≈ 0).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from umv2_jax.config import ModelConfig, ProductKeyConfig, UltraMemConfig, load_config
from umv2_jax.errors import ConfigError
from umv2_jax.models import product_key as pk_lib
from umv2_jax.models.init import ValueParam
from umv2_jax.models.kinds import get_sparse_builder
from umv2_jax.models.sparse import SparseContext
from umv2_jax.models.transformer import Transformer

HIDDEN = 16
OUT_RTOL = 1e-5
GRAD_RTOL = 1e-4


def _config(kind: str, **fields) -> ModelConfig:
    shape = dict(n_keys=6, key_dim=8, heads=2, topk=4, rc_topk=5, **fields)
    section = (
        {"ultramem": UltraMemConfig(**shape)}
        if kind == "ultramem"
        else {"product_key": ProductKeyConfig(**shape)}
    )
    config = ModelConfig(
        d_model=HIDDEN,
        num_layers=4,
        num_heads=2,
        d_ff=32,
        vocab_size=50,
        sparse=kind,
        sparse_layers=None if kind == "ultramem" else (1, 3),
        **section,
    )
    config.validate()
    return config


def _random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


class _Holder(nnx.Module):
    def __init__(self, layer, shared):
        self.layer = layer
        self.shared = shared


def _random_module(make, seed: int):
    """make() → module with fresh random fp32 parameters, without running its initializers.

    Building through the initializers costs a compile per shape (tens of seconds on a loaded 2-core
    machine); the references need random parameters, not initialized ones. Gains and norm scales
    become 1 + N(0, 0.1²), other floats N(0, 0.3²), integer vectors (grid permutations) permutations.
    """
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(path[-1].key)
        if np.issubdtype(leaf.dtype, np.integer):
            return jnp.asarray(rng.permutation(leaf.shape[0]).astype(leaf.dtype))
        scale = 0.3 if not name.endswith(("gain", "scale")) else 0.1
        noise = scale * rng.standard_normal(leaf.shape)
        return jnp.asarray(noise + (1.0 if scale == 0.1 else 0.0), leaf.dtype)

    pure = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _build(config: ModelConfig, block: int, seed: int):
    builder = get_sparse_builder(config.sparse)

    def make():
        rngs = nnx.Rngs(params=seed)
        shared = builder.build_shared(config, rngs) if builder.build_shared else None
        return _Holder(builder.build_layer(config, block, rngs), shared)

    return _random_module(make, seed)


def _layer_outputs(holder, u, cotangent):
    """y and the gradients of <y, cotangent> w.r.t. u and every parameter (one jitted program)."""
    graphdef, params, rest = nnx.split(holder, nnx.Param, ...)

    @jax.jit
    def run(params, u):
        def loss(params, u):
            model = nnx.merge(graphdef, params, rest)
            y = model.layer(u, SparseContext(shared=model.shared)).y
            return jnp.sum(y * cotangent), y

        (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, u)
        return y, grads

    y, (d_params, d_u) = run(params, u)
    return np.asarray(y), np.asarray(d_u), nnx.to_pure_dict(d_params)


def _reference_outputs(reference, params, u, cotangent):
    def loss(params, u):
        y = reference(params, u)
        return jnp.sum(y * cotangent), y

    (_, y), (d_params, d_u) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        params, u
    )
    return np.asarray(y), np.asarray(d_u), d_params


def _pure(holder):
    return jax.tree.map(jnp.asarray, nnx.to_pure_dict(nnx.state(holder, nnx.Param)))


def _rms(x, gain, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gain


def _jrms(x, gain, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * gain


# --------------------------------------------------------------------------------------------------
# Product keys: selection by brute force over the n × n grid, then the layer's equation.
# --------------------------------------------------------------------------------------------------


def _product_key_queries(retrieval, x, eps, xp):
    """Normalized sub-queries [T, H, 2, D_k] and keys [H, 2, n, D_k] from the retrieval's params."""
    rms = _rms if xp is np else _jrms
    queries = xp.einsum("th,hnsd->tnsd", x, retrieval["query"])
    if "query_gain" in retrieval:
        queries = rms(queries, retrieval["query_gain"][None, :, None, :], eps)
    keys = retrieval["keys"]
    if "key_gain" in retrieval:
        keys = rms(keys, retrieval["key_gain"][:, None, None, :], eps)
    return queries, keys


def _brute_force_rows(retrieval, x, eps, heads, topk):
    """rows i·n + j [T, H, m] of the m best cells of the full grid s_ij = s_row[i] + s_col[j]."""
    retrieval = jax.tree.map(lambda a: np.asarray(a, np.float64), retrieval)
    queries, keys = _product_key_queries(retrieval, np.asarray(x, np.float64), eps, np)
    keys = np.broadcast_to(keys, (heads, *keys.shape[1:]))
    n_keys = keys.shape[2]
    rows = np.zeros((x.shape[0], heads, topk), np.int64)
    for t in range(x.shape[0]):
        for head in range(heads):
            s_row = keys[head, 0] @ queries[t, head, 0]
            s_col = keys[head, 1] @ queries[t, head, 1]
            grid = (s_row[:, None] + s_col[None, :]).reshape(-1)
            rows[t, head] = np.argsort(-grid, kind="stable")[:topk]
    return rows, n_keys


def _product_key_weights(retrieval, x, rows, n_keys, eps, heads):
    """softmax over each head's selected cells of s = <q_row, K_row[i]> + <q_col, K_col[j]>: [T, H, m]."""
    queries, keys = _product_key_queries(retrieval, x, eps, jnp)
    keys = jnp.broadcast_to(keys, (heads, *keys.shape[1:]))
    i, j = rows // n_keys, rows % n_keys
    head = np.arange(heads)[None, :, None]
    s = jnp.einsum("thd,thmd->thm", queries[:, :, 0], keys[head, 0, i]) + jnp.einsum(
        "thd,thmd->thm", queries[:, :, 1], keys[head, 1, j]
    )
    return jax.nn.softmax(s, axis=-1)


def _close(got, want, rtol, what):
    """rtol elementwise, plus an atol of rtol·max|want|: entries that cancel to near 0 keep the
    absolute error of their large summands."""
    want = np.asarray(want)
    atol = rtol * max(float(np.abs(want).max()), 1e-30)
    np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=atol, err_msg=what)


def _check(holder, reference, u, cotangent, param_paths):
    y, d_u, d_params = _layer_outputs(holder, jnp.asarray(u), jnp.asarray(cotangent))
    y_ref, d_u_ref, d_params_ref = _reference_outputs(
        reference, _pure(holder), jnp.asarray(u), jnp.asarray(cotangent)
    )
    _close(y, y_ref, OUT_RTOL, "output")
    _close(d_u, d_u_ref, GRAD_RTOL, "d input")
    for path in param_paths:
        got, want = d_params, d_params_ref
        for key in path:
            got, want = got[key], want[key]
        _close(got, want, GRAD_RTOL, f"d {'/'.join(path)}")


def test_product_key_topk_is_the_exact_top_m_of_the_sum_grid():
    rng = np.random.default_rng(0)
    q_row, q_col = rng.standard_normal((2, 7, 5)).astype(np.float32)
    k_row, k_col = rng.standard_normal((2, 9, 5)).astype(np.float32)
    rows, scores = pk_lib.product_key_topk(
        *map(jnp.asarray, (q_row, q_col, k_row, k_col)), rc_topk=4, topk=4
    )
    grid = (q_row @ k_row.T)[:, :, None] + (q_col @ k_col.T)[:, None, :]  # [T, n, n]
    expected = np.argsort(-grid.reshape(7, -1), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(np.asarray(rows), expected)
    np.testing.assert_allclose(
        np.asarray(scores), np.take_along_axis(grid.reshape(7, -1), expected, 1), rtol=1e-5
    )


def test_pkm_matches_per_token_reference():
    config = _config("pkm")
    pk = config.product_key
    holder = _build(config, 1, seed=1)
    u = _random((2, 3, HIDDEN), 2)
    x = u.reshape(-1, HIDDEN)
    rows, n_keys = _brute_force_rows(_pure(holder)["layer"]["retrieval"], x, pk.norm_eps, 2, 4)

    def reference(params, u):
        layer = params["layer"]
        x = u.reshape(-1, HIDDEN)
        w = _product_key_weights(layer["retrieval"], x, rows, n_keys, pk.norm_eps, 2)
        y = jnp.einsum("thm,thmd->td", w, layer["values"][rows])  # Σ_h Σ_ℓ w_ℓ V[row_ℓ]
        return y.reshape(u.shape)

    _check(
        holder,
        reference,
        u,
        _random(u.shape, 3),
        [("layer", "values"), ("layer", "retrieval", "query"), ("layer", "retrieval", "keys")],
    )
    assert isinstance(holder.layer.values, ValueParam)


def test_memory_plus_matches_per_token_reference_with_one_shared_table():
    config = _config("memory_plus", value_dim=12, key_norm=True)
    pk = config.product_key
    holder = _build(config, 3, seed=4)
    u = _random((2, 3, HIDDEN), 5)
    x = u.reshape(-1, HIDDEN)
    rows, n_keys = _brute_force_rows(_pure(holder)["layer"]["retrieval"], x, pk.norm_eps, 2, 4)

    def reference(params, u):
        layer = params["layer"]
        x = u.reshape(-1, HIDDEN)
        w = _product_key_weights(layer["retrieval"], x, rows, n_keys, pk.norm_eps, 2)
        o = jnp.einsum("thm,thmd->td", w, params["shared"]["values"][rows])
        y = (o * jax.nn.silu(x @ layer["gate_proj"])) @ layer["output_proj"]  # W2(o ⊙ silu(W1 u))
        return y.reshape(u.shape)

    _check(
        holder,
        reference,
        u,
        _random(u.shape, 6),
        [
            ("shared", "values"),
            ("layer", "gate_proj"),
            ("layer", "retrieval", "keys"),
            ("layer", "retrieval", "key_gain"),
        ],
    )
    # One table for every Memory+ layer: the model holds it once, at model level.
    model = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0)))
    assert isinstance(model.shared.values, ValueParam)
    assert all(not hasattr(block.sparse, "values") for block in model.blocks if block.sparse)


def test_peer_matches_per_token_reference():
    config = _config("peer", activation="gelu")
    pk = config.product_key
    holder = _build(config, 1, seed=7)
    u = _random((2, 3, HIDDEN), 8)
    x = u.reshape(-1, HIDDEN)
    # PEER's heads share one set of product keys (stored with a head axis of 1).
    assert holder.layer.retrieval.keys.shape[0] == 1
    rows, n_keys = _brute_force_rows(_pure(holder)["layer"]["retrieval"], x, pk.norm_eps, 2, 4)

    def reference(params, u):
        layer = params["layer"]
        x = u.reshape(-1, HIDDEN)
        w = _product_key_weights(layer["retrieval"], x, rows, n_keys, pk.norm_eps, 2)
        up, down = layer["expert_up"][rows], layer["expert_down"][rows]  # [T, H, m, h]
        neuron = jax.nn.gelu(jnp.einsum("thmd,td->thm", up, x), approximate=False)
        y = jnp.einsum("thm,thmd->td", w * neuron, down)  # Σ w_ℓ σ(<u_ℓ, x>) v_ℓ
        return y.reshape(u.shape)

    _check(
        holder,
        reference,
        u,
        _random(u.shape, 9),
        [("layer", "expert_up"), ("layer", "expert_down"), ("layer", "retrieval", "query")],
    )


# --------------------------------------------------------------------------------------------------
# UltraMem v1: docs/model.md §2 steps 1–6 per token, value groups kept side by side, W_o: G·D_v → h.
# --------------------------------------------------------------------------------------------------


def _v1_selection(params, permutation, x, config):
    """Per token and head: (virtual row v [T, H, m], row candidates, column candidates, cells)."""
    pk = config.ultramem
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["layer"]["retrieval"])
    heads, rank, k, m = pk.heads, pk.tucker_rank, pk.resolved_rc_topk(), pk.topk
    side = pk.key_expand() * pk.n_keys
    projected = np.einsum("th,hsad->tsad", np.asarray(x, np.float64), p["query"][:, 0])
    tokens = x.shape[0]
    out = np.zeros((tokens, heads, m), np.int64)
    cand = np.zeros((tokens, heads, 2, k), np.int64)
    cells = np.zeros((tokens, heads, 2, m), np.int64)
    for head in range(heads):
        q = _rms(projected, p["query_gain"][head], pk.norm_eps)  # [T, 2, r, D_k]
        keys = _rms(p["keys"][head], p["key_gain"][head], pk.norm_eps)  # [2, N, r, D_k]
        core_sum = p["cores"][head].sum(0)
        left, _, right_t = np.linalg.svd(core_sum)
        u_star, t_star = left[:, 0], right_t[0]
        if u_star[np.argmax(np.abs(u_star))] < 0:  # docs/model.md §2 step 4's sign rule
            u_star, t_star = -u_star, -t_star
        for t in range(tokens):
            s_row = np.einsum("ad,nad->an", q[t, 0], keys[0])  # [r, N]
            s_col = np.einsum("ad,nad->an", q[t, 1], keys[1])
            i_row = np.argsort(-(u_star @ s_row), kind="stable")[:k]
            i_col = np.argsort(-(t_star @ s_col), kind="stable")[:k]
            total = s_row[:, i_row].T @ core_sum @ s_col[:, i_col]  # [k, k] = Σ_c R C^c Qᵀ
            best = np.argsort(-total.reshape(-1), kind="stable")[:m]
            cand[t, head] = i_row, i_col
            cells[t, head] = best // k, best % k
            out[t, head] = permutation[i_row[best // k] * side + i_col[best % k]]
    assert rank == p["cores"].shape[-1]
    return out, cand, cells


def test_ultramem_v1_matches_per_token_reference():
    config = _config("ultramem", value_dim=12, value_expand=4, skip_layers="0:1/2:3")
    pk = config.ultramem
    holder = _build(config, 3, seed=10)
    u = _random((2, 3, HIDDEN), 11)
    x = u.reshape(-1, HIDDEN)
    permutation = np.asarray(holder.layer.permutation[...])
    virtual, cand, cells = _v1_selection(_pure(holder), permutation, x, config)
    rows_per_table, groups, value_dim = pk.n_keys**2, pk.value_expand, 12
    group, row = virtual // rows_per_table, virtual % rows_per_table
    tokens, heads = x.shape[0], pk.heads
    t_idx, h_idx = np.arange(tokens)[:, None, None], np.arange(heads)[None, :, None]

    def reference(params, u):
        layer, retrieval = params["layer"], params["layer"]["retrieval"]
        x = u.reshape(-1, HIDDEN)
        projected = jnp.einsum("th,hsad->tsad", x, retrieval["query"][:, 0])  # one query, all heads
        q = _jrms(projected[:, None], retrieval["query_gain"][None, :, None, None], pk.norm_eps)
        keys = _jrms(retrieval["keys"], retrieval["key_gain"][:, None, None, None], pk.norm_eps)
        # Per-rank scores of the selected candidates (step 3), then per-core scores (step 5).
        r = jnp.einsum("thad,thkad->thka", q[:, :, 0], keys[h_idx, 0, cand[:, :, 0]])
        c = jnp.einsum("thad,thkad->thka", q[:, :, 1], keys[h_idx, 1, cand[:, :, 1]])
        r_sel = r[t_idx, h_idx, cells[:, :, 0]]  # [T, H, m, r]
        c_sel = c[t_idx, h_idx, cells[:, :, 1]]
        s = jnp.einsum("thma,hcab,thmb->thmc", r_sel, retrieval["cores"], c_sel)  # [T, H, m, C]
        v = layer["values"][row].reshape(tokens, heads, pk.topk, pk.n_cores, -1)
        weighted = (s[..., None] * v).reshape(tokens, heads, pk.topk, value_dim)
        one_hot = jax.nn.one_hot(group, groups)  # [T, H, m, G]
        o = jnp.einsum("thmg,thmd->tgd", one_hot, weighted).reshape(tokens, groups * value_dim)
        return (o @ layer["output_proj"]).reshape(u.shape)

    _check(
        holder,
        reference,
        u,
        _random(u.shape, 12),
        [
            ("layer", "values"),
            ("layer", "output_proj"),
            ("layer", "retrieval", "query"),
            ("layer", "retrieval", "cores"),
        ],
    )


def test_ultramem_v1_skip_layer_wiring_places_layers_and_reads_earlier_blocks():
    config = _config("ultramem", value_dim=12, value_expand=4, skip_layers="0:1/2:3")
    assert config.sparse_layer_indices() == (1, 3)
    model = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0)))
    assert [i for i, b in enumerate(model.blocks) if b.sparse is not None] == [1, 3]
    assert dict(model.sparse_sources) == {1: 0, 3: 2}  # the memory in block b reads block a's input
    # G·D_v → h output projection; two heads read one query projection.
    assert model.blocks[1].sparse.output_proj.shape == (4 * 12, HIDDEN)
    assert model.blocks[1].sparse.retrieval.query.shape[1] == 1


@pytest.mark.parametrize(
    "skip_layers, message",
    [
        ("0:1/2:9", "num_layers"),  # output block out of range
        ("3:1", "input <= output"),  # output before input
        ("0:2/1:3", "overlap"),
        ("0:1/1:3", "overlap"),  # sharing a block counts as overlapping
        ("0-1", "INPUT:OUTPUT"),
    ],
)
def test_bad_skip_layer_specs_are_config_errors(skip_layers, message):
    with pytest.raises(ConfigError, match=message):
        _config("ultramem", value_dim=12, value_expand=4, skip_layers=skip_layers)


def test_skip_layers_must_agree_with_sparse_layers():
    config = _config("ultramem", value_dim=12, value_expand=4, skip_layers="0:1/2:3")
    with pytest.raises(ConfigError, match="sparse_layers"):
        dataclasses.replace(config, sparse_layers=(1, 2)).validate()  # noqa: B018


def test_other_config_mistakes_are_config_errors():
    with pytest.raises(ConfigError, match="value_dim"):
        _config("pkm", value_dim=12)  # pkm rows are outputs: D_v must be d_model
    with pytest.raises(ConfigError, match="skip_layers"):  # UltraMem v1's field, in its section
        load_config(None, ["model.sparse=memory_plus", "model.product_key.skip_layers=0:1"])
    with pytest.raises(ConfigError, match="not a square"):
        _config("ultramem", value_dim=12, value_expand=3)
    with pytest.raises(ConfigError, match="rc_topk"):
        ModelConfig(
            sparse="pkm", product_key=ProductKeyConfig(n_keys=6, topk=4, rc_topk=7)
        ).validate()  # more candidates than the 6 keys per side


def test_unknown_baseline_name_is_a_config_error():
    with pytest.raises(ConfigError, match="'model.sparse': 'product_keys' is not allowed"):
        load_config(None, ["model.sparse=product_keys"])
    with pytest.raises(ValueError, match="not registered"):  # past the config: a caller's bug
        get_sparse_builder("product_keys")


@pytest.mark.parametrize(
    "kind, fields",
    [
        ("memory_plus", {"value_dim": 12}),  # the model-level shared table reaches the layers
        ("ultramem", {"value_dim": 12, "value_expand": 4, "skip_layers": "0:1/2:3"}),  # taps
    ],
)
def test_transformer_with_baseline_runs_jitted(kind, fields):
    config = _config(kind, **fields)
    model = _random_module(lambda: Transformer(config, nnx.Rngs(0)), 13)
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.arange(12).reshape(2, 6) % 50, jnp.int32)
    logits, aux = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, diagnostics=True))(state, tokens)
    assert logits.shape == (2, 6, 128) and np.isfinite(np.asarray(logits)).all()
    assert "layer1/rows_hit_fraction" in aux.metrics and "layer3/output_std" in aux.metrics
