"""Decode memory access (umv2_jax.eval.decode_access): distinct counts on hand-made selections,
the bytes they convert to, and the measurement through a real model against the layer's own
selection."""

from __future__ import annotations

import numpy as np
import pytest

from umv2_jax.config import load_config
from umv2_jax.eval import accounting
from umv2_jax.eval.decode_access import (
    distinct_per_step,
    measure_decode_access,
    summarize,
    uniform_routing_curve,
    unit_numbers,
)
from umv2_jax.inference.cache import cache_bytes


def test_distinct_per_step_counts_the_union_over_tokens_and_slots():
    selected = np.asarray(
        [
            [[0, 1], [1, 2], [2, 0]],  # {0, 1, 2}
            [[5, 5], [5, 5], [5, 5]],  # {5}
            [[0, 1], [2, 3], [4, 5]],  # all different
        ]
    )
    np.testing.assert_array_equal(distinct_per_step(selected), [3, 1, 6])
    with pytest.raises(ValueError, match=r"\[steps, batch, slots\]"):
        distinct_per_step(selected[0])


def _records(config, distinct_by_step, tokens=2, filled=5, batch=2):
    unit, width = unit_numbers(config)
    return [
        {
            "batch": batch,
            "step": step,
            "layer": layer,
            "unit": unit,
            "distinct": count,
            "addressable": 32,
            "unit_bytes": width * 4,
            "bytes": count * width * 4,
            "tokens": tokens,
            "filled": filled + step,
        }
        for step, counts in enumerate(distinct_by_step)
        for layer, count in enumerate(counts)
    ]


def test_summary_bytes_of_a_hand_made_moe_selection():
    config = load_config("configs/eval/t_moe.yaml").model
    # 2 layers, 2 steps: (3 + 5) and (4 + 4) distinct experts: a mean of 8 experts per step.
    summary = summarize(config, _records(config, [[3, 5], [4, 4]]))[2]
    expert = 3 * 64 * 32 * 4  # 3·h·d_e fp32 numbers
    assert summary["sparse"] == 8 * expert
    counts = accounting.parameter_counts(config)
    weights = (counts["dense"] + counts["sparse_dense"] + config.padded_vocab_size * 64) * 4
    assert summary["weights"] == weights
    assert summary["embedding"] == 2 * 64 * 4
    assert summary["kv_cache"] == (cache_bytes(config, 2, 5) + cache_bytes(config, 2, 6)) / 2
    assert (
        cache_bytes(config, 2, 5) == 2 * 2 * 2 * 32 * 2 * 5 * 4
    )  # k,v · L · H · D · B · slots · 4
    assert summary["distinct_by_layer"] == {"0": 3.5, "1": 4.5}
    assert summary["measured"] == weights + 2 * 64 * 4 + 8 * expert
    # What the sparse layers read in all: the selected experts and the router, read every step.
    assert summary["sparse_dense"] == counts["sparse_dense"] * 4 == 2 * 64 * 32 * 4  # 2 routers
    assert summary["sparse_layers"] == 8 * expert + summary["sparse_dense"]


def test_sparse_layer_bytes_of_a_memory_model_count_its_keys_and_projections():
    """T-umv2 at B = 8 reads about 14 KB of value rows, but its keys, query, pre-value and output
    projections (21,072 numbers, 84 KB in fp32) are read in full every step: they are part of what
    its sparse layers read (`sparse_layers`), as the router is for MoE."""
    config = load_config("configs/eval/t_umv2.yaml").model
    counts = accounting.parameter_counts(config)
    assert counts["sparse_dense"] == 21_072
    row = unit_numbers(config)[1] * 4
    summary = summarize(config, _records(config, [[200, 245]], tokens=8, batch=8))[8]
    assert summary["sparse"] == 445 * row
    assert summary["sparse_layers"] == 445 * row + 21_072 * 4


def test_at_batch_one_the_measurement_meets_the_uniform_curve():
    """One token reads exactly k experts / H·m rows per layer: measured = uniform at B = 1."""
    for name in ("t_moe", "t_umv2"):
        config = load_config(f"configs/eval/{name}.yaml").model
        slots = 8  # T-moe top-8; T-umv2 one head × m 8
        records = _records(config, [[slots, slots]], tokens=1, batch=1)
        measured = summarize(config, records)[1]["measured"]
        assert measured == pytest.approx(uniform_routing_curve(config, (1,))[1], rel=1e-12)


def test_measured_counts_match_the_rows_the_memory_layer_selects():
    """Through a real (tiny, scanned) memory model: each step's count is the number of distinct
    rows the layer selects for the step's B fed tokens, recomputed from the uncached blocks."""
    from tests.inference.test_decode import _built

    model, _ = _built("umv2_scanned")
    tokens = np.random.default_rng(0).integers(1, 64, (4, 6)).astype(np.int32)
    records = measure_decode_access(model, tokens, batch_sizes=(1, 4), prompt_len=4, steps=2)
    assert {(r["batch"], r["step"], r["layer"]) for r in records} == {
        (b, s, layer) for b in (1, 4) for s in (0, 1) for layer in (0, 1)
    }
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    reference = jax.jit(
        lambda state, prefixes, layer: _rows_selected_by_last_tokens(
            nnx.merge(graphdef, state), prefixes, layer
        ),
        static_argnums=2,
    )
    for record in records:
        fed = 4 + record["step"]  # the step fed token `fed` of each row
        prefixes = np.zeros((4, fed + 1), np.int32)  # one shape per step: rows past B ignored
        prefixes[: record["batch"]] = tokens[: record["batch"], : fed + 1]
        hits = np.asarray(reference(state, prefixes, record["layer"])[: record["batch"]]).any(0)
        assert record["distinct"] == int(hits.sum()), record
        assert record["tokens"] == len(set(tokens[: record["batch"], fed].tolist()))


def _rows_selected_by_last_tokens(model, prefixes, layer):
    """bool [batch, window rows]: rows memory layer `layer` selects for the last token of each
    prefix (int [batch, seq], no padding), by the uncached blocks and the layer's own hit mask."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from umv2_jax.models.sparse import SparseContext

    x = jnp.take(model.embed[...], jnp.asarray(prefixes), axis=0)
    positions = jnp.broadcast_to(jnp.arange(prefixes.shape[1]), prefixes.shape)
    context = SparseContext(shared=model.shared, diagnostics=True)
    graphdef, state = nnx.split(model.blocks[0].layers)  # the stack of both blocks
    for index in range(layer + 1):
        block = nnx.merge(graphdef, jax.tree.map(lambda leaf, i=index: leaf[i], state))
        if index == layer:
            u = block.ffn_norm(x + block.attn(block.attn_norm(x), positions))
            return jnp.stack([block.sparse(u[b, -1:], context).row_hits for b in range(len(u))])
        x, _, _, _ = block(x, positions, context)
    raise AssertionError(f"no block {layer}")
