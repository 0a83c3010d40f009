"""The UltraMemV2 layer against docs/model.md §2–§6, written out independently in this file.

The reference selects slots in float64 numpy straight from the docs/model.md equations (per token, per head),
then recomputes the layer's output with those slots fixed in differentiable jax code (a Python loop
over tokens), so its gradients are autodiff of the docs/model.md formulas with no gradient through the top-k.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from umv2_jax.config import MemoryConfig, ModelConfig
from umv2_jax.errors import ConfigError
from umv2_jax.models.sparse import SparseContext
from umv2_jax.models.transformer import Transformer
from umv2_jax.models.ultramem_v2 import (
    GridPermutation,
    LayerIndex,
    MemoryTables,
    UltraMemV2,
    WindowTables,
    map_virtual_rows,
    value_share_window,
)

D_MODEL = 24
TOKENS = (2, 3)  # [batch, seq]: 6 tokens


def run_compiled(fn, *args, optimized: bool = False):
    """jit(fn)(*args) compiled at XLA backend optimization level 0, or at the default level.

    These tests check the math, not the speed: the unoptimized backend compiles about twice as fast
    on a 2-core machine and computes the same float32 operations. Some cases also run at the
    default level, the one training uses (fusion and layout passes must not change the result).
    """
    options = None if optimized else {"xla_backend_optimization_level": 0}
    compiled = jax.jit(fn).lower(*args).compile(options)
    return compiled(*args)


# ---------------------------------------------------------------------------------------------------
# Building layers with random parameters (abstract build, then every variable filled from numpy).


def model_config(num_layers: int = 2, **memory) -> ModelConfig:
    base = dict(
        n_keys=5, key_dim=8, rc_topk=4, topk=5, value_dim=8, pre_value_dim=4, init="release"
    )
    base.update(memory)
    config = ModelConfig(
        d_model=D_MODEL,
        num_layers=num_layers,
        num_heads=2,
        d_ff=48,
        sparse="ultramem_v2",
        memory=MemoryConfig(**base),
    )
    config.validate()
    return config


def fill_random(module: nnx.Module, rng: np.random.Generator) -> None:
    """Gives every variable fresh random values: gains 1 ± 0.3, permutations random, others N(0, 1)/2;
    structural state (a layer's block index and table window) is left to `random_layer`."""
    for path, node in nnx.iter_graph(module):
        if not isinstance(node, nnx.Variable) or isinstance(node, LayerIndex | WindowTables):
            continue
        shape = node.get_value().shape
        if isinstance(node, GridPermutation):
            value = rng.permutation(shape[0]).astype(np.int32)
        elif path and str(path[-1]).endswith("gain"):
            value = (1.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
        else:
            value = (0.5 * rng.standard_normal(shape)).astype(np.float32)
        node.set_value(jnp.asarray(value))


def random_layer(config: ModelConfig, block: int, seed: int) -> tuple[UltraMemV2, MemoryTables]:
    tables, layer = nnx.eval_shape(
        lambda: (MemoryTables(config, nnx.Rngs(0)), UltraMemV2(config, block, nnx.Rngs(1)))
    )
    rng = np.random.default_rng(seed)
    fill_random(tables, rng)
    fill_random(layer, rng)
    # The structural state, as the layer's constructor sets it (eval_shape left it abstract).
    memory_layers = config.sparse_layer_indices()
    share = config.memory.value_share
    window = value_share_window(
        share.topology, share.window, memory_layers.index(block), len(memory_layers)
    )
    layer.window.set_value(jnp.asarray(window, jnp.int32))
    layer.block_index.set_value(jnp.int32(block))
    return layer, tables


def layer_params(layer: UltraMemV2, tables: MemoryTables) -> dict[str, np.ndarray]:
    """The layer's parameters under docs/model.md names (float64 copies)."""
    r = layer.retrieval
    p = {
        "query": r.query[...],
        "query_gain": r.query_gain[...],
        "key_gain": r.key_gain[...],
        "keys": r.keys[...],
        "cores": r.cores[...],
        "output_proj": layer.output_proj[...],
        "values": tables.values[...],
    }
    if layer.pre_value_proj is not None:
        p["pre_value_proj"] = layer.pre_value_proj[...]
        p["pre_values"] = tables.pre_values[...]
    return {name: np.asarray(value, np.float64) for name, value in p.items()}


# ---------------------------------------------------------------------------------------------------
# The reference: docs/model.md §2 steps 1–9.


def rms(x, gain, eps, xp=np):
    return x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps) * gain


def reference_window(topology: str, g: int, layer: int, num_layers: int) -> list[int]:
    """docs/model.md §3, written as the list of windows a topology offers."""
    if topology == "ring":
        return [(layer + i) % num_layers for i in range(g)]
    if topology == "noring":  # windows starting at each layer, the last ones clamped to the end
        windows = [list(range(s, s + g)) for s in range(num_layers - g + 1)]
        return windows[min(layer, len(windows) - 1)]
    if topology == "block":  # consecutive blocks of g; a short last block is slid back to full size
        blocks = [list(range(s, s + g)) for s in range(0, num_layers - g + 1, g)]
        if num_layers % g:
            blocks.append(list(range(num_layers - g, num_layers)))
        return blocks[layer // g]
    return [layer]


def reference_select(p, x, memory: MemoryConfig, keys_per_side, permutation, window):
    """Per token and head: (grid cells [m], row keys [m], column keys [m], flat rows [m], window rows).

    float64 numpy; the order is by descending total score Σ_c s^c.
    """
    heads, r, k, m = memory.heads, memory.tucker_rank, memory.rc_topk, memory.topk
    n2 = memory.n_keys**2
    window_rows = len(window) * n2
    out = []
    for t in range(x.shape[0]):
        per_head = []
        for head in range(heads):
            q = np.einsum("h,hsad->sad", x[t], p["query"][:, head])  # [2, r_q, D_k]
            q = np.broadcast_to(rms(q, p["query_gain"][head], memory.norm_eps), (2, r, q.shape[-1]))
            keys = rms(p["keys"][head], p["key_gain"][head], memory.norm_eps)  # [2, N, r, D_k]
            s_row = np.einsum("ad,iad->ai", q[0], keys[0])  # [r, N]
            s_col = np.einsum("ad,iad->ai", q[1], keys[1])
            left, _, right_t = np.linalg.svd(p["cores"][head].sum(0))
            u_star, t_star = left[:, 0], right_t[0]
            if u_star[np.argmax(np.abs(u_star))] < 0:
                u_star, t_star = -u_star, -t_star
            rows_c = np.argsort(-(u_star @ s_row), kind="stable")[:k]
            cols_c = np.argsort(-(t_star @ s_col), kind="stable")[:k]
            grid = sum(s_row[:, rows_c].T @ core @ s_col[:, cols_c] for core in p["cores"][head])
            best = np.argsort(-grid.reshape(-1), kind="stable")[:m]
            row_keys, col_keys = rows_c[best // k], cols_c[best % k]
            cells = row_keys * keys_per_side + col_keys
            virtual = permutation[cells]
            in_window = virtual % window_rows
            flat = np.asarray(window)[in_window // n2] * n2 + in_window % n2
            per_head.append((cells, row_keys, col_keys, flat, in_window))
        out.append(per_head)
    return out


def reference_balance_constants(p, x, memory: MemoryConfig, keys_per_side):
    """Per head and side: (rank-1 vector, share f of the stage-1 selections per key), float64."""
    constants = []
    for head in range(memory.heads):
        q = np.einsum("th,hsad->tsad", x, p["query"][:, head])
        q = rms(q, p["query_gain"][head], memory.norm_eps)
        q = np.broadcast_to(q, (x.shape[0], 2, memory.tucker_rank, q.shape[-1]))
        keys = rms(p["keys"][head], p["key_gain"][head], memory.norm_eps)
        left, _, right_t = np.linalg.svd(p["cores"][head].sum(0))
        sign = 1.0 if left[np.argmax(np.abs(left[:, 0])), 0] > 0 else -1.0
        per_side = []
        for side, vector in ((0, sign * left[:, 0]), (1, sign * right_t[0])):
            scores = np.einsum("a,tad,nad->tn", vector, q[:, side], keys[side])
            chosen = np.argsort(-scores, axis=1, kind="stable")[:, : memory.rc_topk]
            share = np.bincount(chosen.reshape(-1), minlength=keys_per_side) / chosen.size
            per_side.append((vector, share))
        constants.append(per_side)
    return constants


def reference_forward(p, x, selection, memory: MemoryConfig, keys_per_side, balance_constants=None):
    """y [T, h] and the aux losses, differentiable in p and x, with the selected slots fixed.

    `token_output` is docs/model.md §2 steps 1–9 for one token; it is vmapped over the tokens so that it compiles
    once instead of being unrolled per token.
    """
    heads, r, n_cores = memory.heads, memory.tucker_rank, memory.n_cores
    chunk = memory.value_dim // n_cores
    values = p["values"].reshape(-1, memory.value_dim)
    pre_values = p["pre_values"].reshape(-1, memory.pre_value_dim) if "pre_values" in p else None
    act = {"identity": lambda z: z, "gelu": lambda z: jax.nn.gelu(z, approximate=False)}[
        memory.pre_score_act
    ]

    def token_output(x_t, row_keys, col_keys, flat):  # x_t [h]; the rest [H, m]
        o = jnp.zeros((memory.value_dim,))
        for head in range(heads):
            q = jnp.einsum("h,hsad->sad", x_t, p["query"][:, head])  # step 1
            q = rms(q, p["query_gain"][head], memory.norm_eps, jnp)
            q = jnp.broadcast_to(q, (2, r, q.shape[-1]))
            keys = rms(p["keys"][head], p["key_gain"][head], memory.norm_eps, jnp)  # step 2
            # Steps 3 and 5 at the selected cells: R, Q rows of the slots [m, r], s^c = R C^c Qᵀ.
            big_r = jnp.einsum("ad,lad->la", q[0], keys[0][row_keys[head]])
            big_q = jnp.einsum("ad,lad->la", q[1], keys[1][col_keys[head]])
            scores = jnp.einsum("la,cab,lb->lc", big_r, p["cores"][head], big_q)
            if pre_values is None:
                pre = jnp.ones((flat.shape[1],))
            else:  # step 7
                pre = act(pre_values[flat[head]] @ (x_t @ p["pre_value_proj"]))
            chunks = values[flat[head]].reshape(-1, n_cores, chunk)  # step 8
            o = o + jnp.einsum("l,lc,lcd->cd", pre, scores, chunks).reshape(-1)
        return o @ p["output_proj"]  # step 9

    def stacked(field):
        return np.asarray([[sel[field] for sel in per_head] for per_head in selection])

    y = jax.vmap(token_output)(x, stacked(1), stacked(2), stacked(3))
    losses = {}
    if memory.tucker_penalty > 0:
        penalties = []
        for head in range(heads):
            lam = jnp.linalg.svd(p["cores"][head].sum(0), compute_uv=False)
            penalties.append(jnp.sum(jax.nn.relu(lam[1:] - memory.tucker_tau) ** 2) / (r - 1))
        losses["loss/tucker_penalty"] = memory.tucker_penalty * jnp.mean(jnp.stack(penalties))
    if memory.key_balance > 0:
        terms = []
        for head in range(heads):
            q = jnp.einsum("th,hsad->tsad", x, p["query"][:, head])
            q = rms(q, p["query_gain"][head], memory.norm_eps, jnp)
            q = jnp.broadcast_to(q, (x.shape[0], 2, r, q.shape[-1]))
            keys = rms(p["keys"][head], p["key_gain"][head], memory.norm_eps, jnp)
            total = 0.0
            for side in (0, 1):
                vector, share = balance_constants[head][side]
                scores = jnp.einsum("a,tad,nad->tn", vector, q[:, side], keys[side])
                probabilities = jnp.mean(jax.nn.softmax(scores, axis=-1), axis=0)
                total = total + keys_per_side * jnp.sum(share * probabilities)
            terms.append(total)
        losses["loss/key_balance"] = memory.key_balance * jnp.mean(jnp.stack(terms))
    return y, losses


# ---------------------------------------------------------------------------------------------------
# Layer vs reference.

# (per_rank_query, key_expand, heads, pre_value_dim, extra memory fields, num_layers, block)
CASES = {
    "rank_queries-E1-H1-pre": (True, 1, 1, 4, {}, 2, 0),
    # The release-compatible layer with key_expand 2 needs a square window (docs/model.md §9.7): ring:4.
    "shared_query-E2-H2-pre-ring-losses": (
        False,
        2,
        2,
        4,
        {"value_share": "ring:4", "tucker_penalty": 0.3, "tucker_tau": 0.05, "key_balance": 0.5},
        4,
        1,
    ),
    # Per-rank queries keep this project's split by g·n² rows at a non-square window (ring:2).
    "rank_queries-E2-H2-no_pre": (True, 2, 2, 0, {"value_share": "ring:2"}, 2, 1),
    "shared_query-E1-H1-pre-gelu": (False, 1, 1, 4, {"pre_score_act": "gelu"}, 2, 1),
    # The other two sharing topologies, at windows that slide back inside the network (docs/model.md §3):
    # noring:3 at memory layer 2 of 4 reads tables [1, 2, 3] (ring would wrap to [2, 3, 0]);
    # block:2 at layer 3 of 5 reads [2, 3] (noring would read [3, 4]).
    "rank_queries-E1-H1-pre-noring": (True, 1, 1, 4, {"value_share": "noring:3"}, 4, 2),
    "shared_query-E1-H2-pre-block": (False, 1, 2, 4, {"value_share": "block:2"}, 5, 3),
}
# Cases also compiled at XLA's default optimization level.
OPTIMIZED_CASES = ("shared_query-E2-H2-pre-ring-losses", "rank_queries-E1-H1-pre-noring")


def rel_close(actual, expected, tol=2e-5):
    """|a − e| ≤ tol·(|e| + max|e|) elementwise: relative to the array's scale."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = np.max(np.abs(expected)) + 1e-30
    np.testing.assert_array_less(np.abs(actual - expected), tol * (np.abs(expected) + scale))


@pytest.mark.parametrize(
    "case, optimized",
    [(case, False) for case in CASES] + [(case, True) for case in OPTIMIZED_CASES],
)
def test_layer_matches_spec_reference_outputs_and_gradients(case, optimized):
    per_rank, key_expand, heads, pre_dim, extra, num_layers, block = CASES[case]
    config = model_config(
        num_layers,
        per_rank_query=per_rank,
        key_expand=key_expand,
        heads=heads,
        pre_value_dim=pre_dim,
        **extra,
    )
    memory = config.memory
    layer, tables = random_layer(config, block, seed=list(CASES).index(case))
    rng = np.random.default_rng(7)
    u = rng.standard_normal((*TOKENS, D_MODEL)).astype(np.float32)
    cotangent = rng.standard_normal((*TOKENS, D_MODEL)).astype(np.float32)
    graphdef, params, rest = nnx.split((layer, tables), nnx.Param, ...)

    def loss(params, u):
        layer, tables = nnx.merge(graphdef, params, rest)
        out = layer(u, SparseContext(shared=tables, diagnostics=True))
        y, aux = out.y, {**{f"loss/{k}": v for k, v in out.losses.items()}, **out.metrics}
        objective = jnp.sum(y * cotangent) + sum(out.losses.values())
        # The layer's own selection, from the same compiled program.
        result = layer.retrieval(u.reshape(-1, D_MODEL), implementation="xla")
        rows, _, _ = layer.physical_rows(result.grid_indices)
        return objective, (y, aux, result, rows)

    (_, (y, aux, result, rows)), (grads, grad_u) = run_compiled(
        jax.value_and_grad(loss, (0, 1), has_aux=True), params, jnp.asarray(u), optimized=optimized
    )

    # Reference selection (float64) and the layer's own selection agree exactly, in order.
    p = layer_params(layer, tables)
    x = u.reshape(-1, D_MODEL).astype(np.float64)
    keys_per_side = key_expand * memory.effective_keys()
    topology, g = memory.value_share.topology, memory.value_share.window
    window = reference_window(topology, g, block, num_layers)
    permutation = np.asarray(layer.permutation[...])
    selection = reference_select(p, x, memory, keys_per_side, permutation, window)
    for t in range(x.shape[0]):
        for head in range(heads):
            np.testing.assert_array_equal(result.grid_indices[head, t], selection[t][head][0])
            np.testing.assert_array_equal(rows[head, t], selection[t][head][3])

    # Output, aux losses and every gradient.
    p_jax = {name: jnp.asarray(value, jnp.float32) for name, value in p.items()}

    balance = reference_balance_constants(p, x, memory, keys_per_side)

    def reference_loss(p, x):
        y, losses = reference_forward(p, x, selection, memory, keys_per_side, balance)
        return jnp.sum(y * cotangent.reshape(-1, D_MODEL)) + sum(losses.values()), (y, losses)

    (_, (y_ref, losses_ref)), (g_ref, gx_ref) = run_compiled(
        jax.value_and_grad(reference_loss, (0, 1), has_aux=True), p_jax, jnp.asarray(x, jnp.float32)
    )
    rel_close(y.reshape(-1, D_MODEL), y_ref)
    assert set(losses_ref) == {k for k in aux if k.startswith("loss/")}
    for name, value in losses_ref.items():
        rel_close(aux[name], value)
    rel_close(grad_u.reshape(-1, D_MODEL), gx_ref)
    layer_grads, table_grads = grads[0], grads[1]
    got = {
        "query": layer_grads["retrieval"]["query"],
        "query_gain": layer_grads["retrieval"]["query_gain"],
        "key_gain": layer_grads["retrieval"]["key_gain"],
        "keys": layer_grads["retrieval"]["keys"],
        "cores": layer_grads["retrieval"]["cores"],
        "output_proj": layer_grads["output_proj"],
        "values": table_grads["values"],
    }
    if pre_dim:
        got["pre_value_proj"] = layer_grads["pre_value_proj"]
        got["pre_values"] = table_grads["pre_values"]
    assert set(got) == set(g_ref)
    for name, value in got.items():
        rel_close(value[...], g_ref[name])

    # Diagnostics (docs/model.md §6) against the reference's selection and scores.
    window_rows = {int(w) for per_head in selection for sel in per_head for w in sel[4]}
    addressable = min(len(window) * memory.n_keys**2, keys_per_side**2)
    np.testing.assert_allclose(aux["rows_hit_fraction"], len(window_rows) / addressable, rtol=1e-6)
    lam = np.linalg.svd(p["cores"][0].sum(0), compute_uv=False)
    np.testing.assert_allclose([aux["lambda1"], aux["lambda2"]], lam, rtol=1e-5)
    totals = np.sum(np.asarray(result.core_scores, np.float64), axis=-1)  # [H, T, m]
    np.testing.assert_allclose(aux["top1_score"], totals[:, :, 0].mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["topm_score"], totals.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["output_std"], np.std(np.asarray(y_ref)), rtol=1e-4)


def test_dropout_zeroes_and_rescales_the_output_only_when_not_deterministic():
    rate = 0.5
    config = model_config(dropout=rate)
    layer, tables = random_layer(config, 0, seed=31)
    u = jnp.asarray(np.random.default_rng(32).standard_normal((4, 8, D_MODEL)), jnp.float32)
    graphdef, state = nnx.split(layer)

    def run(state, u, key, deterministic):
        context = SparseContext(shared=tables, deterministic=deterministic, dropout_rng=key)
        return nnx.merge(graphdef, state)(u, context).y

    run = jax.jit(run, static_argnums=3)
    key = jax.random.key(0)
    clean = np.asarray(run(state, u, key, True))
    dropped = np.asarray(run(state, u, key, False))
    kept = dropped != 0
    assert 0.4 < kept.mean() < 0.6
    np.testing.assert_allclose(dropped[kept], clean[kept] / (1 - rate), rtol=1e-6)
    assert not np.array_equal(dropped, np.asarray(run(state, u, jax.random.key(1), False)))


# ---------------------------------------------------------------------------------------------------
# Value aggregation.


def test_zeroing_one_cores_scores_zeroes_exactly_that_value_chunk():
    config = model_config(n_cores=2, value_dim=8)
    layer, tables = random_layer(config, 0, seed=21)
    rng = np.random.default_rng(22)
    heads, tokens, topk = 1, 6, config.memory.topk
    x = jnp.asarray(rng.standard_normal((tokens, D_MODEL)), jnp.float32)
    rows = jnp.asarray(rng.integers(0, 2 * 25, (heads, tokens, topk)), jnp.int32)
    scores = rng.standard_normal((heads, tokens, topk, 2)).astype(np.float32)
    aggregate = jax.jit(lambda s: layer.aggregate(x, rows, s, tables))
    full = np.asarray(aggregate(jnp.asarray(scores)))
    for core in range(2):
        zeroed = scores.copy()
        zeroed[..., core] = 0.0
        out = np.asarray(aggregate(jnp.asarray(zeroed)))
        chunk = slice(4 * core, 4 * core + 4)
        other = slice(4 * (1 - core), 4 * (1 - core) + 4)
        np.testing.assert_array_equal(out[:, chunk], 0.0)
        np.testing.assert_allclose(out[:, other], full[:, other], rtol=1e-6, atol=1e-7)
        assert np.abs(full[:, chunk]).max() > 0


# ---------------------------------------------------------------------------------------------------
# Index algebra.


@pytest.mark.parametrize(
    "topology, g, num_layers, expected",
    [
        ("none", 1, 3, [[0], [1], [2]]),
        ("ring", 3, 5, [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 0], [4, 0, 1]]),
        ("noring", 3, 5, [[0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 4], [2, 3, 4]]),
        ("block", 2, 4, [[0, 1], [0, 1], [2, 3], [2, 3]]),
        ("block", 3, 5, [[0, 1, 2], [0, 1, 2], [0, 1, 2], [2, 3, 4], [2, 3, 4]]),
        ("ring", 4, 4, [[0, 1, 2, 3], [1, 2, 3, 0], [2, 3, 0, 1], [3, 0, 1, 2]]),
    ],
)
def test_sharing_windows_per_topology(topology, g, num_layers, expected):
    got = [value_share_window(topology, g, layer, num_layers) for layer in range(num_layers)]
    assert got == expected


@pytest.mark.parametrize("topology", ["ring", "noring", "block"])
def test_every_window_holds_g_distinct_tables_including_its_own(topology):
    for num_layers in range(1, 8):
        for g in range(1, num_layers + 1):
            for layer in range(num_layers):
                window = value_share_window(topology, g, layer, num_layers)
                assert len(set(window)) == g
                assert all(0 <= w < num_layers for w in window)
                assert layer in window


def test_sharing_window_rejects_bad_topology_and_sizes():
    # The user's values are checked by load_config (tests/test_config.py); here it is a caller's bug.
    with pytest.raises(ValueError):
        value_share_window("spiral", 2, 0, 4)
    with pytest.raises(ValueError):
        value_share_window("ring", 5, 0, 4)


@pytest.mark.parametrize(
    "n_keys, key_expand, window",
    [(3, 1, [0]), (3, 2, [1]), (3, 1, [2, 0, 1, 3]), (4, 2, [3, 0]), (5, 1, [1, 2, 3])],
)
def test_physical_rows_stay_inside_the_window(n_keys, key_expand, window):
    n2 = n_keys * n_keys
    n_eff = math.floor(math.sqrt(len(window)) * n_keys + 1e-9)
    cells = (key_expand * n_eff) ** 2
    virtual = np.random.default_rng(1).permutation(cells).astype(np.int32)
    flat, in_window, group = map(np.asarray, map_virtual_rows(jnp.asarray(virtual), n2, window))
    allowed = {w * n2 + row for w in window for row in range(n2)}
    assert set(flat.tolist()) <= allowed
    np.testing.assert_array_equal(group, virtual // (len(window) * n2))
    # Every addressable row is reached, and with key_expand = E each is reached by E² virtual slots
    # when the grid covers the window exactly.
    assert len(set(flat.tolist())) == min(len(allowed), cells)
    if cells == key_expand**2 * len(allowed):
        np.testing.assert_array_equal(np.bincount(in_window), np.full(len(allowed), key_expand**2))


def test_permutation_is_a_bijection_of_the_virtual_grid_drawn_from_the_init_seed():
    config = model_config(n_keys=4, key_expand=2, init="release")

    def build(seed):
        return nnx.jit(lambda: UltraMemV2(config, 0, nnx.Rngs(seed)).permutation[...])()

    first, again, other = build(0), build(0), build(1)
    cells = (2 * 4) ** 2
    np.testing.assert_array_equal(np.sort(first), np.arange(cells))
    assert first.dtype == jnp.int32
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_permutation_is_state_not_a_trainable_parameter():
    config = model_config()
    layer = nnx.eval_shape(lambda: UltraMemV2(config, 0, nnx.Rngs(0)))
    params = jax.tree_util.tree_leaves(nnx.state(layer, nnx.Param))
    assert all(not jnp.issubdtype(leaf.dtype, jnp.integer) for leaf in params)
    assert nnx.state(layer, GridPermutation)["permutation"].get_value().shape == ((5 * 1) ** 2,)


# ---------------------------------------------------------------------------------------------------
# In the model.


def test_transformer_holds_the_tables_once_and_every_block_its_layer():
    config = ModelConfig(
        d_model=32,
        num_layers=3,
        num_heads=2,
        d_ff=64,
        sparse="ultramem_v2",
        memory=MemoryConfig(
            n_keys=5,
            key_dim=8,
            rc_topk=4,
            topk=4,
            value_dim=8,
            pre_value_dim=4,
            value_share="ring:2",
            init="release",
        ),
    )
    config.validate()
    model = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0)))
    assert isinstance(model.shared, MemoryTables)
    assert model.shared.values.get_value().shape == (3, 25, 8)
    assert model.shared.pre_values.get_value().shape == (3, 25, 4)
    assert isinstance(model.shared.values, nnx.Param)
    built = jax.jit(lambda: nnx.state(Transformer(config, nnx.Rngs(0)), WindowTables))()
    windows = [tuple(np.asarray(built["blocks"][b]["sparse"]["window"][...])) for b in range(3)]
    assert windows == [(0, 1), (1, 2), (2, 0)]
    assert all(block.sparse.keys_per_side == 7 for block in model.blocks)  # floor(sqrt(2)·5)
    graphdef, state = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((2, 4), jnp.int32)
    logits, aux = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t), state, tokens)
    assert logits.shape == (2, 4, config.padded_vocab_size)
    expected = {"top1_score", "topm_score", "output_std", "lambda1", "lambda2"}
    expected.add(
        "ffn_output_std"
    )  # the block reports the FFN's beside the memory's (docs/model.md §6)
    assert set(aux.metrics) == {f"layer{b}/{name}" for b in range(3) for name in expected}
    assert aux.row_hits == {}  # the per-row hit scatter is evaluation-only
    # With diagnostics (what evaluation asks for) the row-hit masks and fractions come too.
    _, aux = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t, diagnostics=True), state, tokens)
    expected.add("rows_hit_fraction")
    assert set(aux.metrics) == {f"layer{b}/{name}" for b in range(3) for name in expected}
    assert {b: m.shape for b, m in aux.row_hits.items()} == {b: (2 * 25,) for b in range(3)}


# ---------------------------------------------------------------------------------------------------
# Config validation.


@pytest.mark.parametrize(
    "fields, num_layers, message",
    [
        ({"value_dim": 10, "n_cores": 3}, 4, "not divisible by n_cores"),
        ({"rc_topk": 3, "topk": 10}, 4, "exceeds rc_topk²"),
        ({"n_keys": 4, "rc_topk": 5, "topk": 4}, 4, "exceeds the keys per side"),
        ({"value_share": "ring:5"}, 4, "larger than the number of layers"),
        ({"value_share": "spiral:2"}, 4, "unknown topology"),
        ({"value_share": "ring"}, 4, "positive window"),
        ({"pre_score_act": "relu"}, 4, "pre_score_act"),
        ({"key_expand": 0}, 4, "key_expand"),
        ({"n_keys": 30000, "key_expand": 2}, 4, "does not fit int32"),
        (
            {"key_expand": 2, "value_share": "ring:2", "per_rank_query": False},
            4,
            r"config 'model.memory.key_expand': key_expand 2 with value_share ring:2 and "
            r"per_rank_query false: .*docs/model.md §9.7.*use key_expand 1, a square window",
        ),
        ({"n_keys": 8000}, 40, "int32"),
        ({"heads": 0}, 4, "heads"),
        ({"init": "xavier"}, 4, "init"),
    ],
)
def test_invalid_memory_configs_fail_with_a_config_error(fields, num_layers, message):
    base = dict(n_keys=8, key_dim=8, rc_topk=4, topk=4, value_dim=8, pre_value_dim=4)
    base.update(fields)
    with pytest.raises(ConfigError, match=message):  # string fields already fail when parsed
        ModelConfig(
            d_model=32,
            num_layers=num_layers,
            num_heads=2,
            d_ff=64,
            sparse="ultramem_v2",
            memory=MemoryConfig(**base),
        ).validate()


def _release_rows(virtual, n_keys, g):
    """The authors' release: virtual groups of n_eff² rows, n_eff = floor(sqrt(g)·n) (docs/model.md §9.7)."""
    split = math.floor(math.sqrt(g) * n_keys + 1e-9) ** 2
    return virtual % split, virtual // split


def test_release_compatible_key_expand_accepts_only_windows_where_the_release_split_agrees():
    """per_rank_query false with key_expand 2: the configurations accepted map every virtual slot to
    the release's row and group (computed from its formula); the issue's case (16 keys, 2 layers,
    ring:2), where 1,452 of 1,936 rows and 168 groups differ, is refused at validation."""
    n_keys, expand = 16, 2
    for g, accepted in [(1, True), (2, False), (3, False), (4, True)]:
        share = "none" if g == 1 else f"ring:{g}"
        n_eff = math.floor(math.sqrt(g) * n_keys + 1e-9)
        virtual = np.arange((expand * n_eff) ** 2, dtype=np.int32)
        _, ours, group = map(
            np.asarray, map_virtual_rows(jnp.asarray(virtual), n_keys**2, range(g))
        )
        release, release_group = _release_rows(virtual, n_keys, g)
        agree = np.array_equal(ours, release) and np.array_equal(group, release_group)
        assert agree == accepted, g
        if g == 2:
            assert (ours != release).sum() == 1452 and (group != release_group).sum() == 168
        fields = dict(n_keys=n_keys, key_expand=expand, value_share=share, per_rank_query=False)
        if accepted:
            model_config(max(g, 2), **fields)
        else:
            with pytest.raises(ConfigError, match="docs/model.md §9.7"):
                model_config(max(g, 3), **fields)
        model_config(max(g, 2), **{**fields, "per_rank_query": True})  # our split: accepted
