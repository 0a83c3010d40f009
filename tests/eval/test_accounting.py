"""The accounting tool: paper-convention parameter counts, analytic FLOPs, decode bytes, matches, CLI."""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from umv2_jax.config import load_config
from umv2_jax.eval import accounting as acc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _path(relative: str) -> str:
    return os.path.join(ROOT, relative)


@functools.cache
def _account(path: str, *overrides: str) -> acc.Accounting:
    return acc.account(load_config(_path(path), list(overrides)))


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


def test_paper_table_reproduces_the_papers_counts_within_5_percent():
    # docs/model.md §7: ≈ 227M activated and ≈ 1.18B total (paper convention) for all four 227M configs;
    # 2.5B activated with 60B / 120B total for the UltraMemV2-2.5B pair and 30B for the MoE baseline.
    table, differences = acc.paper_table()
    names = [name for name, _, _ in differences]
    assert len(differences) == 7
    for expected in (
        "UltraMemV2-2.5B/60B-top768",
        "UltraMemV2-2.5B/120B-top256",
        "SeedMoE-2.5B/30B",
    ):
        assert expected in names, (expected, table)
    for name, d_activated, d_total in differences:
        assert abs(d_activated) <= 0.05, (name, d_activated, table)
        assert abs(d_total) <= 0.05, (name, d_total, table)


def test_2p5b_configs_match_the_papers_shapes_and_each_other():
    # docs/model.md §7: topk 768 / 256 with rc_topk capped at 128; the MoE baseline is matched on activated
    # parameters to the UltraMemV2 pair (the accounting's --match tolerance, 3%).
    top768 = _account("configs/paper/ultramem_v2_2p5b_60b_top768.yaml")
    top256 = _account("configs/paper/ultramem_v2_2p5b_120b_top256.yaml")
    moe = _account("configs/paper/seedmoe_2p5b_30b.yaml")
    for path, topk in (("60b_top768", 768), ("120b_top256", 256)):
        memory = load_config(_path(f"configs/paper/ultramem_v2_2p5b_{path}.yaml")).model.memory
        assert (memory.topk, memory.rc_topk) == (topk, 128)
    for umv2 in (top768, top256):
        assert abs(moe.activated_params / umv2.activated_params - 1) <= acc.MATCH_TOLERANCE
    assert top256.total_params > 1.9 * top768.total_params


def test_1b7b_configs_are_accounted_without_allocating_them():
    before = sum(a.nbytes for a in jax.live_arrays())
    start = time.perf_counter()
    umv2 = _account("configs/paper/ultramem_v2_1b7b.yaml")
    olmoe = _account("configs/paper/olmoe_1b7b.yaml")
    elapsed = time.perf_counter() - start
    after = sum(a.nbytes for a in jax.live_arrays())
    assert after - before < 2**20  # shapes only: a 7B model would be 25 GB of fp32
    # Typically under 1 s for both on 2 cores; the bound leaves room for a machine shared with
    # other test runs.
    assert elapsed < 5, elapsed
    # OLMoE-1B/7B: 1.3B activated / 6.9B total including the untied embeddings (OLMoE's numbers).
    assert olmoe.activated_params == pytest.approx(1.28e9, rel=0.02)
    assert olmoe.total_params + olmoe.embedding_params == pytest.approx(6.92e9, rel=0.02)
    assert olmoe.embedding_params == 2 * 50304 * 2048  # untied: embedding + LM head
    assert umv2.activated_params == pytest.approx(olmoe.activated_params, rel=0.01)


def test_param_counts_equal_a_hand_count_from_eval_md_shapes():
    h, layers, vocab = 64, 2, 384  # T models; byte vocabulary 259 padded to 384, tied
    attention_and_norms = layers * (4 * h * h + 2 * h) + h
    moe = _account("configs/eval/t_moe.yaml")
    experts = layers * 32 * 3 * h * 32
    router = layers * h * 32
    assert moe.embedding_params == vocab * h
    assert moe.dense_params == attention_and_norms
    assert (moe.sparse_table_params, moe.sparse_dense_params) == (experts, router)
    assert moe.total_params == attention_and_norms + experts + router
    assert moe.activated_params == vocab * h + attention_and_norms + router + experts * 8 // 32

    umv2 = _account("configs/eval/t_umv2.yaml")
    n, d_k, r, m, d_v, d_p = 68, 16, 2, 8, 24, 8
    ffn = layers * 3 * h * 208
    tables = layers * n * n * (d_v + d_p)
    # W_q (per-rank queries), keys, cores, q/k gains, W_p, W_o
    memory_dense = layers * (
        h * 2 * r * d_k + 2 * n * r * d_k + 2 * r * r + 2 * d_k + h * d_p + d_v * h
    )
    assert umv2.ffn_params == ffn
    assert umv2.sparse_table_params == tables
    assert umv2.sparse_dense_params == memory_dense
    # Activated: m·(D_v + D_p) per layer and head (docs/model.md §7), everything else dense.
    touched = layers * m * (d_v + d_p)
    assert umv2.sparse_activated_params == memory_dense + touched
    assert umv2.activated_params == vocab * h + attention_and_norms + ffn + memory_dense + touched


def test_memory_plus_counts_its_shared_table_once_and_reads_it_in_every_layer():
    result = _account("configs/paper/memory_plus_227m.yaml")
    n, d_v, layers, heads, m = 1138, 768, 4, 2, 80
    assert result.sparse_table_params == n * n * d_v
    assert result.sparse_activated_params - result.sparse_dense_params == layers * heads * m * d_v


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------


def _xla_flops_per_token(model, batch: int, seq: int) -> float:
    graphdef, state = nnx.split(acc.abstract_model(model))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0])
    cost = forward.lower(state, tokens).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return cost["flops"] / (batch * seq)


@pytest.mark.parametrize(
    "path, overrides",
    [
        ("configs/eval/t_dense.yaml", []),
        ("configs/eval/t_umv2.yaml", []),
        (
            "configs/eval/t_dense.yaml",
            [
                "model.sparse=pkm",
                "model.product_key.n_keys=16",
                "model.product_key.key_dim=16",
                "model.product_key.heads=2",
                "model.product_key.topk=8",
            ],
        ),
        ("configs/eval/t_engram.yaml", []),
    ],
    ids=["dense", "umv2", "pkm", "engram"],
)
def test_forward_flops_agree_with_xla_cost_analysis(path, overrides):
    """XLA counts every op: norms, SiLU, softmax, RoPE, residual adds, the one-hot matmuls that pick
    selected candidates, so it reads a few percent above the matmul-only formula at these tiny widths
    (h = 64), never below. Tolerance: 0 ≤ XLA/analytic − 1 ≤ 8%.

    MoE is not in this list: on CPU its expert matmuls run as a loop over the used row blocks of
    `block_padded`, and XLA's cost analysis counts a loop body once whatever its trip count, so XLA
    cannot cross-check it here; `test_moe_forward_flops_equal_a_hand_count` checks the formula."""
    batch, seq = 4, 64
    config = load_config(_path(path), overrides + [f"data.seq_len={seq}"])
    expected = acc.account(config).flops_per_token
    model = config.model
    measured = _xla_flops_per_token(model, batch, seq)
    assert 0.0 <= measured / expected - 1.0 <= 0.08, (measured, expected)


def test_moe_forward_flops_equal_a_hand_count():
    """T-moe (h 64, 2 layers, 32 experts × SwiGLU 32, top-8): per token and layer the router is
    2·h·E and the k chosen experts three matmuls of 2·h·d_e each (multiply-adds counted as 2 FLOPs)."""
    result = _account("configs/eval/t_moe.yaml")
    h, layers, experts, top_k, d_e = 64, 2, 32, 8, 32
    assert result.flops_breakdown["sparse"] == layers * (2 * h * experts + top_k * 3 * 2 * h * d_e)


def test_training_flops_are_three_forwards():
    result = _account("configs/eval/s_umv2.yaml")
    assert result.training_flops_per_token == 3 * result.flops_per_token
    assert result.flops_per_token == sum(result.flops_breakdown.values())


# --------------------------------------------------------------------------------------------------
# Matches (docs/evaluation.md)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["t", "s"])
def test_eval_models_are_matched_within_3_percent(size):
    moe = _account(f"configs/eval/{size}_moe.yaml")
    umv2 = _account(f"configs/eval/{size}_umv2.yaml")
    dense = _account(f"configs/eval/{size}_dense.yaml")
    rows = acc.match_rows(moe, umv2, dense)
    assert len(rows) == 4
    assert all(row.ok(0.03) for row in rows), acc.match_table(rows)


# --------------------------------------------------------------------------------------------------
# Decode bytes
# --------------------------------------------------------------------------------------------------


def test_moe_decode_bytes_follow_uniform_routing():
    result = _account("configs/eval/s_moe.yaml")  # fp32 compute: 4 bytes per number
    h, layers, experts, k, d_e, vocab = 128, 4, 64, 8, 64, 384
    fixed = result.dense_params + result.sparse_dense_params + vocab * h
    expert = 3 * h * d_e
    for batch in (1, 8, 64, 512):
        distinct = experts * (1 - (1 - k / experts) ** batch)
        rows = min(batch, vocab) * h  # the batch's embedding rows: at most the whole vocabulary
        expected = 4 * (fixed + rows + layers * distinct * expert)
        assert result.decode_bytes[batch] == pytest.approx(expected, rel=1e-12)
        bound = 4 * (fixed + rows + layers * min(batch * k, experts) * expert)
        assert result.decode_bytes_bound[batch] == pytest.approx(bound, rel=1e-12)
    assert result.decode_bytes[1] == result.decode_bytes_bound[1]  # one token: exactly k experts


def test_memory_reads_far_less_than_moe_at_decode():
    moe = _account("configs/paper/olmoe_227m.yaml")
    umv2 = _account("configs/paper/ultramem_v2_227m.yaml")
    sparse = {}
    for name, result in (("moe", moe), ("umv2", umv2)):
        fixed = result.dense_params + result.sparse_dense_params
        sparse[name] = [
            result.decode_bytes[b] - 2 * (fixed + 50304 * 768 + b * 768) for b in (8, 64)
        ]
        values = list(result.decode_bytes.values())
        assert values == sorted(values)  # more tokens never read less
        assert all(result.decode_bytes[b] <= result.decode_bytes_bound[b] for b in (1, 8, 64, 512))
    # docs/model.md §8: MoE reads min(B·k, E) experts of 3·h·d_e per layer; memory at most B·m·(D_v + D_p).
    assert sparse["moe"][0] > 20 * sparse["umv2"][0]


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def test_cli_json_prints_one_object_with_the_documented_keys(capsys):
    status = acc.main(
        ["--config", _path("configs/eval/t_umv2.yaml"), "--set", "model.d_ff=256", "--json"]
    )
    assert status == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("activated_params", "total_params", "embedding_params", "flops_per_token"):
        assert isinstance(data[key], int | float)
    assert set(data["decode_bytes"]) == {"1", "8", "64", "512"}
    assert data["ffn_params"] == 2 * 3 * 64 * 256  # the override reached the model


def test_cli_match_reports_and_fails_a_mismatch(capsys):
    pair = [_path("configs/eval/t_moe.yaml"), _path("configs/eval/t_umv2.yaml")]
    assert acc.main(["--match", *pair]) == 0
    assert "| ffn-slot total params |" in capsys.readouterr().out
    assert acc.main(["--match", *pair, "--set", "model.d_ff=512"]) == 1  # T-umv2 FFN too wide


def test_cli_config_errors_exit_2(capsys):
    config = _path("configs/eval/t_umv2.yaml")
    assert acc.main(["--config", config, "--set", "model.memory.topk=0"]) == 2
    assert "model.memory.topk" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Engram
# --------------------------------------------------------------------------------------------------


def _primes_from(start: int, count: int) -> list[int]:
    found, value = [], start
    while len(found) < count:
        if all(value % d for d in range(2, int(value**0.5) + 1)):
            found.append(value)
        value += 1
    return found


def test_engram_counts_flops_and_decode_bytes_equal_a_hand_count():
    """S-engram by hand: h 128, 4 blocks (4 heads), SwiGLU 448, Engram in blocks 1 and 2 with
    orders 2-3 × 8 heads of 16 numbers (W = 256 retrieved), tables of the 16 primes >= 10673,
    a 4-tap convolution. Tied embedding, vocabulary padded to 384, seq 256, fp32 (4 B)."""
    result = _account("configs/eval/s_engram.yaml")
    h, layers, d_ff, vocab, seq = 128, 4, 448, 384, 256
    engram_layers, tables, head_dim, width, taps = 2, 16, 16, 256, 4
    primes = _primes_from(10673, tables)
    backbone = (
        layers * (4 * h * h + 2 * h + 3 * h * d_ff) + h
    )  # attention, 2 norms, FFN; final norm
    engram_dense = 2 * width * h + 3 * h + taps * h  # W_K, W_V, three norm gains, the convolution
    engram_table = sum(primes) * head_dim
    assert result.dense_params == backbone
    assert result.sparse_dense_params == engram_layers * engram_dense
    assert result.sparse_table_params == engram_layers * engram_table
    assert result.total_params == backbone + engram_layers * (engram_dense + engram_table)
    touched = tables * head_dim  # one row of every table per token
    activated = vocab * h + backbone + engram_layers * (engram_dense + touched)
    assert result.activated_params == activated
    engram_flops = 2 * 2 * width * h + 2 * h + 2 * taps * h
    assert result.flops_breakdown["sparse"] == engram_layers * engram_flops
    forward = layers * (8 * h * h + 4 * seq * h + 6 * h * d_ff) + engram_layers * engram_flops
    assert result.flops_per_token == forward + 2 * h * vocab
    fixed = backbone + engram_layers * engram_dense + vocab * h
    for batch in (1, 8, 64, 512):
        distinct = sum(p * (1 - (1 - 1 / p) ** batch) for p in primes)  # per table, uniform hash
        expected = 4 * (fixed + min(batch, vocab) * h + engram_layers * distinct * head_dim)
        assert result.decode_bytes[batch] == pytest.approx(expected, rel=1e-12)
        bound = 4 * (fixed + min(batch, vocab) * h + engram_layers * tables * batch * head_dim)
        assert result.decode_bytes_bound[batch] == pytest.approx(bound, rel=1e-12)
    assert (
        result.sparse_prefetchable and not _account("configs/eval/s_umv2.yaml").sparse_prefetchable
    )


@pytest.mark.parametrize("size", ["t", "s"])
def test_engram_models_are_matched_to_moe_within_3_percent(size):
    moe = _account(f"configs/eval/{size}_moe.yaml")
    engram = _account(f"configs/eval/{size}_engram.yaml")
    dense = _account(f"configs/eval/{size}_dense.yaml")
    rows = acc.match_rows(moe, engram, dense)
    assert all(row.ok(0.03) for row in rows), acc.match_table(rows)
