"""Parameters, FLOPs and decode memory traffic of a model config, computed without allocating it.

    python -m umv2_jax.eval.accounting --config configs/paper/ultramem_v2_227m.yaml [--set k=v] [--json]
    python -m umv2_jax.eval.accounting --match configs/eval/s_moe.yaml configs/eval/s_umv2.yaml \\
        [--dense configs/eval/s_dense.yaml]            # exit status 1 when a match fails
    python -m umv2_jax.eval.accounting --paper-table  # the 227M family and the 2.5B models vs the paper

    result = account(load_config(path))               # an `Accounting`

**Parameters** come from the model's abstract state (`nnx.eval_shape`: shapes only, so a 7B config
costs nothing to account). Every `nnx.Param` falls in one class:

    embedding       the token embedding and an untied LM head
    dense           everything else outside the sparse layers: attention, FFN, norms
    sparse dense    parameters of the sparse layers that every token uses: routers, memory queries,
                    keys, cores, gains, projections
    sparse table    value tables (`ValueParam`: values, pre-values, PEER experts) and MoE experts
                    (parameters whose first logical axis is `experts`)

Paper convention (docs/model.md §7): total = every non-embedding parameter; activated = embedding + dense +
sparse dense + the table entries one token touches. MoE: its k experts of E per layer (the table times
k/E). Memory: every memory layer reads H·m rows per token, so a table contributes H·m·(row width) per
layer reading it (UltraMemV2: m·(D_v + D_p) per layer and head; Memory+'s one table is read by each of
its layers). `ffn_slot` = the FFN plus the sparse layer: what differs between the compared models.

**Forward FLOPs per token** (2 per multiply-add; matmuls only: norms, activations, softmax, RoPE,
residual adds and top-k comparisons are not counted). S = sequence length, per layer:

    attention     8·h·H·d (q, k, v, out) + 4·S·H·d (scores and values over the full S×S matrix,
                  which is what XLA computes under a causal mask; a causal kernel does about half)
    FFN           6·h·d_ff
    MoE           2·h·E (router) + k·6·h·d_e (+ 6·h·d_shared)
    UltraMemV2    per head: 2·h·2·r_q·D_k (queries, r_q = r or 1), 2·2·r·N·D_k (row and column
                  scores, N keys per side), 2·2·r·N (rank-1 combination), 2·(k·r² + k²·r) (the summed
                  core on the k×k grid), 2·m·C·r² (per-core scores of the m cells), 2·m·D_p
                  (pre-scores), 2·m·D_v (aggregation); per layer 2·h·D_p (W_p) + 2·D_v·h (W_o)
    UltraMem v1   as UltraMemV2 with one query for all heads, no pre-values, W_o: 2·G·D_v·h
    PKM, Memory+, PEER   per head: 2·h·2·D_k (query), 2·2·n·D_k (half scores), k² (candidate sums),
                  2·m·D_v (aggregation; PEER 2·m·h more for the expert neurons); Memory+ per layer
                  4·h·D_v (W1, W2)
    Engram        2·2·W·h (key and value projections of the W = (N−1)·D_e retrieved numbers),
                  2·h (gate dot product), 2·K·h (depthwise convolution); the hashes and the
                  lookup (a gather) are free. Its FFN stays.
    LM head       2·h·V (padded vocabulary); the embedding lookup is free

Training FLOPs per token = 3 × forward (the backward pass costs two forwards; gathers and their
scatter-add transposes are counted by the same rule). `tests/eval/test_accounting.py` checks the
forward formula against XLA's `cost_analysis()` and states why they differ.

**Decode bytes per step** at batch B (one new token per sequence; weights only: the KV cache is the
same for the compared models and is left out). Every dense weight and sparse-dense weight is read
once, plus the LM head (V·h) and B embedding rows. Sparse tables under uniform routing, per layer:

    MoE     expected distinct experts E·(1 − (1 − k/E)^B), each 3·h·d_e numbers
    memory  expected distinct rows R·(1 − (1 − H·m/R)^B) of R addressable rows, each (row width)
    Engram  Σ over its (N−1)·H tables of p rows: p·(1 − (1 − 1/p)^B) (one row per token per table,
            uniform hashing), each D_h numbers; bound Σ min(B, p). Its rows are addressed by the
            token ids alone, so they are known before the step runs (`sparse_prefetchable`).

The expectation assumes every token draws its k experts (H·m rows) as a uniform random subset; the
`decode_bytes_bound` field gives docs/model.md §8's bound min(B·k, E) experts, min(B·H·m, R) rows, which
over-counts once rows repeat. Layers are counted separately even when they share a table (Memory+):
each layer reads its rows at a different time in the step. Bytes per number: 2 for a `bfloat16`
compute dtype, 4 for `float32` (override with `--bytes-per-number`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from umv2_jax.config import Config, ModelConfig, load_config
from umv2_jax.errors import ConfigError
from umv2_jax.models.abstract import abstract_model

DECODE_BATCHES = (1, 8, 64, 512)
MEMORY_KINDS = ("ultramem_v2", "ultramem", "memory_plus", "pkm", "peer", "engram")
# Kinds whose table rows depend only on the input token ids: a decoder can fetch them before the step.
PREFETCHABLE_KINDS = ("engram",)
MATCH_TOLERANCE = 0.03

# docs/model.md §7: the paper's 227M family (activated, total in the paper's convention), and the tolerance
# the project's counter must reproduce them to.
PAPER_227M = {
    "paper/olmoe_227m": ("OLMoE-227M/1.2B", 227e6, 1.18e9),
    "paper/memory_plus_227m": ("Memory+-227M/1.2B", 227e6, 1.18e9),
    "paper/ultramem_227m": ("UltraMem-227M/1.2B", 227e6, 1.18e9),
    "paper/ultramem_v2_227m": ("UltraMemV2-227M/1.2B", 227e6, 1.18e9),
}
# The paper's headline scale (docs/model.md §7: 2.5B activated; 60B / 120B total) and the MoE baseline
# matched to them on activated parameters (a 30B-total class; its shapes are chosen here).
PAPER_2P5B = {
    "paper/ultramem_v2_2p5b_60b_top768": ("UltraMemV2-2.5B/60B-top768", 2.5e9, 60e9),
    "paper/ultramem_v2_2p5b_120b_top256": (
        "UltraMemV2-2.5B/120B-top256",
        2.5e9,
        120e9,
    ),
    "paper/seedmoe_2p5b_30b": ("SeedMoE-2.5B/30B", 2.5e9, 30e9),
}
PAPER_TOLERANCE = 0.05


@dataclasses.dataclass(frozen=True)
class Accounting:
    """Everything this module measures about one config (counts are numbers of scalars)."""

    name: str
    kind: str  # model.sparse
    seq_len: int
    bytes_per_number: int
    embedding_params: int
    dense_params: int  # non-embedding, outside the sparse layers
    ffn_params: int  # the dense FFNs (part of dense_params)
    sparse_dense_params: int
    sparse_table_params: int
    sparse_total_params: int
    sparse_activated_params: int
    total_params: int  # paper: every non-embedding parameter
    activated_params: int  # paper: embedding + dense + what one token touches of the sparse layers
    ffn_slot_params: int  # FFN + sparse layers (total)
    flops_per_token: float  # forward
    ffn_slot_flops_per_token: float  # forward, FFN + sparse layers
    training_flops_per_token: float
    flops_breakdown: dict[str, float]  # forward FLOPs per token by component
    decode_bytes: dict[int, float]  # batch size → bytes read per decode step (expected, uniform)
    decode_bytes_bound: dict[int, float]  # the same with docs/model.md §8's min(...) bound
    sparse_prefetchable: bool = False  # table rows known from the token ids before the step runs

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["decode_bytes"] = {str(b): v for b, v in self.decode_bytes.items()}
        data["decode_bytes_bound"] = {str(b): v for b, v in self.decode_bytes_bound.items()}
        return data


def account(
    config: Config | ModelConfig,
    *,
    seq_len: int | None = None,
    bytes_per_number: int | None = None,
    batch_sizes: Sequence[int] = DECODE_BATCHES,
) -> Accounting:
    """Accounts `config` (a full Config gives the name and data.seq_len; a ModelConfig needs seq_len)."""
    if isinstance(config, Config):
        name, model = config.name, config.model
        seq_len = seq_len or config.data.seq_len
    else:
        name, model = "model", config
        seq_len = seq_len or model.max_seq_len
    if bytes_per_number is None:
        bytes_per_number = 2 if model.compute_dtype == "bfloat16" else 4
    counts = parameter_counts(model)
    flops = forward_flops(model, seq_len)
    ffn_slot_flops = flops["ffn"] + flops["sparse"]
    forward = sum(flops.values())
    expected, bound = decode_bytes(model, counts, batch_sizes, bytes_per_number)
    sparse_total = counts["sparse_dense"] + counts["sparse_table"]
    sparse_activated = counts["sparse_dense"] + counts["sparse_touched"]
    return Accounting(
        name=name,
        kind=model.sparse,
        seq_len=seq_len,
        bytes_per_number=bytes_per_number,
        embedding_params=counts["embedding"],
        dense_params=counts["dense"],
        ffn_params=counts["ffn"],
        sparse_dense_params=counts["sparse_dense"],
        sparse_table_params=counts["sparse_table"],
        sparse_total_params=sparse_total,
        sparse_activated_params=sparse_activated,
        total_params=counts["dense"] + sparse_total,
        activated_params=counts["embedding"] + counts["dense"] + sparse_activated,
        ffn_slot_params=counts["ffn"] + sparse_total,
        flops_per_token=forward,
        ffn_slot_flops_per_token=ffn_slot_flops,
        training_flops_per_token=3.0 * forward,
        flops_breakdown=flops,
        decode_bytes=expected,
        decode_bytes_bound=bound,
        sparse_prefetchable=model.sparse in PREFETCHABLE_KINDS,
    )


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


def parameter_counts(model: ModelConfig) -> dict[str, int]:
    """Scalar counts: embedding, dense, ffn, sparse_dense, sparse_table, sparse_touched."""
    return dict(_parameter_counts(model))


@functools.lru_cache(maxsize=64)
def _parameter_counts(model: ModelConfig) -> dict[str, int]:
    from umv2_jax.models.init import ValueParam

    abstract = abstract_model(model)
    counts = dict.fromkeys(
        ("embedding", "dense", "ffn", "sparse_dense", "sparse_table", "sparse_touched"), 0
    )
    memory_layers = len(model.sparse_layer_indices())
    slots = _slots_per_token(model)
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        size = math.prod(variable.shape)
        names = [str(getattr(p, "key", p)) for p in path]
        axes = tuple(variable.get_metadata().get("out_sharding") or ())
        # A block stacked for scan over layers holds its layers' copies along a leading "layers".
        stacked = names[0] == "blocks" and axes[:1] == ("layers",)
        copies = variable.shape[0] if stacked else 1
        axes = axes[1:] if stacked else axes
        if names[0] in ("embed", "lm_head"):
            counts["embedding"] += size
        elif names[0] == "shared" or "sparse" in names:
            if isinstance(variable, ValueParam):
                counts["sparse_table"] += size
                # Rows a token reads from this table: H·m per memory layer reading it (all of them
                # for a model-level table, one for a layer's own table).
                readers = memory_layers if names[0] == "shared" else copies
                counts["sparse_touched"] += readers * slots * variable.shape[-1]
            elif axes and axes[0] == "experts":
                counts["sparse_table"] += size
                counts["sparse_touched"] += size * model.moe.top_k // model.moe.num_experts
            else:
                counts["sparse_dense"] += size
        else:
            counts["dense"] += size
            if "ffn" in names:
                counts["ffn"] += size
    return counts


def _slots_per_token(model: ModelConfig) -> int:
    """Table rows one token reads per memory layer: heads · topk."""
    if model.sparse == "ultramem_v2":
        return model.memory.heads * model.memory.topk
    if model.sparse == "ultramem":
        return model.ultramem.heads * model.ultramem.topk
    if model.sparse == "engram":
        return (model.engram.max_ngram - 1) * model.engram.heads
    if model.sparse in MEMORY_KINDS:
        return model.product_key.heads * model.product_key.topk
    return 0


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------


def forward_flops(model: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by component: attention, ffn, sparse, lm_head (see the docstring)."""
    h, heads, d = model.d_model, model.num_heads, model.resolved_head_dim
    layers = model.num_layers
    sparse_blocks = model.sparse_layer_indices()
    replaces_ffn = model.sparse == "moe"
    ffn_blocks = layers - (len(sparse_blocks) if replaces_ffn else 0)
    return {
        "attention": float(layers * (8 * h * heads * d + 4 * seq_len * heads * d)),
        "ffn": float(ffn_blocks * 6 * h * model.d_ff),
        "sparse": float(len(sparse_blocks) * sparse_layer_flops(model)),
        "lm_head": float(2 * h * model.padded_vocab_size),
    }


def sparse_layer_flops(model: ModelConfig) -> float:
    """Forward FLOPs per token of one sparse layer (see the module docstring)."""
    h, kind = model.d_model, model.sparse
    if kind == "none":
        return 0.0
    if kind == "moe":
        moe = model.moe
        return (
            2 * h * moe.num_experts
            + moe.top_k * 6 * h * moe.expert_d_ff
            + 6 * h * moe.shared_expert_d_ff
        )
    if kind == "ultramem_v2":
        mem = model.memory
        keys = mem.key_expand * mem.effective_keys()
        query_ranks = mem.tucker_rank if mem.per_rank_query else 1
        per_head = 2 * h * 2 * query_ranks * mem.key_dim + _tucker_flops(
            keys, mem.key_dim, mem.tucker_rank, mem.n_cores, mem.rc_topk, mem.topk
        )
        per_head += 2 * mem.topk * (mem.pre_value_dim + mem.value_dim)
        return mem.heads * per_head + 2 * h * mem.pre_value_dim + 2 * mem.value_dim * h
    if kind == "engram":
        engram = model.engram
        width = (engram.max_ngram - 1) * engram.embed_dim
        return float(2 * 2 * width * h + 2 * h + 2 * engram.kernel_size * h)
    if kind == "ultramem":
        v1 = model.ultramem
        value_dim = v1.resolved_value_dim(h)
        k, m = v1.resolved_rc_topk(), v1.topk
        per_head = _tucker_flops(v1.keys_per_side(), v1.key_dim, v1.tucker_rank, v1.n_cores, k, m)
        per_head += 2 * m * value_dim
        query = 2 * h * 2 * v1.tucker_rank * v1.key_dim
        return query + v1.heads * per_head + 2 * v1.value_expand * value_dim * h
    pk = model.product_key
    value_dim = pk.resolved_value_dim(h)
    k, m = pk.resolved_rc_topk(), pk.topk
    per_head = 2 * h * 2 * pk.key_dim + 2 * 2 * pk.n_keys * pk.key_dim + k * k + 2 * m * value_dim
    if kind == "peer":
        per_head += 2 * m * h
    flops = pk.heads * per_head
    if kind == "memory_plus":
        flops += 4 * h * value_dim
    return float(flops)


def _tucker_flops(keys: int, key_dim: int, rank: int, cores: int, rc_topk: int, topk: int) -> float:
    """TDQKR for one head after the query projection: scores, rank-1 combination, grid, core scores."""
    scores = 2 * 2 * rank * keys * key_dim
    rank_one = 2 * 2 * rank * keys
    grid = 2 * (rc_topk * rank * rank + rc_topk * rc_topk * rank)
    core_scores = 2 * topk * cores * rank * rank
    return float(scores + rank_one + grid + core_scores)


# --------------------------------------------------------------------------------------------------
# Decode memory traffic
# --------------------------------------------------------------------------------------------------


def decode_bytes(
    model: ModelConfig,
    counts: dict[str, int],
    batch_sizes: Sequence[int],
    bytes_per_number: int,
) -> tuple[dict[int, float], dict[int, float]]:
    """Bytes read per decode step for each batch size: (expected under uniform routing, bound)."""
    h, vocab = model.d_model, model.padded_vocab_size
    head = vocab * h  # the LM head (tied: the embedding matrix) is read in full every step
    fixed = counts["dense"] + counts["sparse_dense"] + head
    expected, bound = {}, {}
    for batch in batch_sizes:
        rows = min(batch, vocab) * h  # embedding rows of the batch's tokens (at most B distinct)
        sparse_expected, sparse_bound = _sparse_decode_numbers(model, batch)
        expected[batch] = float((fixed + rows + sparse_expected) * bytes_per_number)
        bound[batch] = float((fixed + rows + sparse_bound) * bytes_per_number)
    return expected, bound


def _sparse_decode_numbers(model: ModelConfig, batch: int) -> tuple[float, float]:
    """Table numbers read per decode step over all sparse layers: (expected, min-bound)."""
    layers = len(model.sparse_layer_indices())
    if model.sparse == "moe":
        moe = model.moe
        experts, k = moe.num_experts, moe.top_k
        per_expert = 3 * model.d_model * moe.expert_d_ff
        distinct = experts * (1.0 - (1.0 - k / experts) ** batch)
        return layers * distinct * per_expert, layers * min(batch * k, experts) * per_expert
    if model.sparse not in MEMORY_KINDS:
        return 0.0, 0.0
    if model.sparse == "engram":
        from umv2_jax.models.engram import table_primes

        primes = table_primes(model.engram)
        width = model.engram.embed_dim // model.engram.heads
        distinct = sum(p * (1.0 - (1.0 - 1.0 / p) ** batch) for p in primes)
        return layers * distinct * width, layers * sum(min(batch, p) for p in primes) * width
    rows, width = _memory_rows_and_width(model)
    slots = _slots_per_token(model)
    fraction = min(slots / rows, 1.0)
    distinct = rows * (1.0 - (1.0 - fraction) ** batch)
    return layers * distinct * width, layers * min(batch * slots, rows) * width


def _memory_rows_and_width(model: ModelConfig) -> tuple[int, int]:
    """(rows one memory layer can address, numbers read per row)."""
    h = model.d_model
    if model.sparse == "ultramem_v2":
        mem = model.memory
        window = mem.value_share.window
        side = mem.key_expand * mem.effective_keys()
        return min(window * mem.n_keys**2, side * side), mem.value_dim + mem.pre_value_dim
    if model.sparse == "ultramem":
        return model.ultramem.n_keys**2, model.ultramem.resolved_value_dim(h)
    if model.sparse == "engram":
        from umv2_jax.models.engram import table_rows

        return table_rows(model.engram), model.engram.embed_dim // model.engram.heads
    pk = model.product_key
    rows = pk.n_keys**2
    if model.sparse == "peer":
        return rows, 2 * h
    return rows, pk.resolved_value_dim(h)


# --------------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MatchRow:
    """One matched quantity: a/b − 1 must be within the tolerance."""

    quantity: str
    a_name: str
    a: float
    b_name: str
    b: float

    @property
    def difference(self) -> float:
        return self.a / self.b - 1.0

    def ok(self, tolerance: float = MATCH_TOLERANCE) -> bool:
        return abs(self.difference) <= tolerance


def match_rows(
    first: Accounting, second: Accounting, dense: Accounting | None = None
) -> list[MatchRow]:
    """docs/evaluation.md's matches: the two sparse models' FFN slots (total params, forward FLOPs per token);
    the dense model's forward FLOPs per token against each sparse model's (activated compute)."""
    rows = [
        MatchRow(
            "ffn-slot total params",
            second.name,
            second.ffn_slot_params,
            first.name,
            first.ffn_slot_params,
        ),
        MatchRow(
            "ffn-slot forward FLOPs/token",
            second.name,
            second.ffn_slot_flops_per_token,
            first.name,
            first.ffn_slot_flops_per_token,
        ),
    ]
    if dense is not None:
        for other in (first, second):
            rows.append(
                MatchRow(
                    "model forward FLOPs/token",
                    dense.name,
                    dense.flops_per_token,
                    other.name,
                    other.flops_per_token,
                )
            )
    return rows


def match_table(rows: list[MatchRow], tolerance: float = MATCH_TOLERANCE) -> str:
    lines = [
        f"| quantity | model | value | reference | value | difference | within {tolerance:.0%} |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.quantity} | {row.a_name} | {row.a:,.0f} | {row.b_name} | {row.b:,.0f} | "
            f"{row.difference:+.2%} | {'yes' if row.ok(tolerance) else 'NO'} |"
        )
    return "\n".join(lines)


def paper_table(root: str | None = None) -> tuple[str, list[tuple[str, float, float]]]:
    """The 227M family and the 2.5B-activated models against docs/model.md §7's numbers: (Markdown table,
    [(name, Δactivated, Δtotal)]).

    root: a directory holding configs/ to read them from (default: the packaged configs).
    """
    import os

    lines = [
        "| model | activated | total | paper activated | paper total | Δ activated | Δ total |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    differences = []
    for path, (name, paper_activated, paper_total) in {**PAPER_227M, **PAPER_2P5B}.items():
        result = account(
            load_config(os.path.join(root, "configs", f"{path}.yaml") if root else path)
        )
        d_act = result.activated_params / paper_activated - 1.0
        d_tot = result.total_params / paper_total - 1.0
        differences.append((name, d_act, d_tot))
        lines.append(
            f"| {name} | {_human(result.activated_params)} | {_human(result.total_params)} | "
            f"{_human(paper_activated)} | {_human(paper_total)} | {d_act:+.1%} | {d_tot:+.1%} |"
        )
    return "\n".join(lines), differences


def summary(result: Accounting) -> str:
    """A human-readable report of one config."""
    lines = [
        f"{result.name} (sparse: {result.kind}, seq_len {result.seq_len})",
        f"  activated params   {_human(result.activated_params):>9}   (paper convention)",
        f"  total params       {_human(result.total_params):>9}   (non-embedding)",
        f"  embedding          {_human(result.embedding_params):>9}",
        f"  dense              {_human(result.dense_params):>9}   (FFN {_human(result.ffn_params)})",
        f"  sparse total       {_human(result.sparse_total_params):>9}   "
        f"(tables {_human(result.sparse_table_params)}, dense part "
        f"{_human(result.sparse_dense_params)})",
        f"  sparse activated   {_human(result.sparse_activated_params):>9}",
        f"  FFN slot params    {_human(result.ffn_slot_params):>9}",
        f"  forward FLOPs/tok  {_human(result.flops_per_token):>9}   "
        + ", ".join(f"{k} {_human(v)}" for k, v in result.flops_breakdown.items()),
        f"  FFN-slot FLOPs/tok {_human(result.ffn_slot_flops_per_token):>9}",
        f"  training FLOPs/tok {_human(result.training_flops_per_token):>9}",
        f"  decode bytes/step ({result.bytes_per_number} B/number; expected | bound)"
        + (
            ": table rows prefetchable (addressed by token ids)"
            if result.sparse_prefetchable
            else ":"
        ),
    ]
    for batch, value in result.decode_bytes.items():
        bound = result.decode_bytes_bound[batch]
        lines.append(f"    B={batch:<4} {_human(value, 'B'):>10} | {_human(bound, 'B'):>10}")
    return "\n".join(lines)


def _human(value: float, unit: str = "") -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{suffix}{unit}"
    return f"{value:.0f}{unit}"


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m umv2_jax.eval.accounting",
        description="Parameters, FLOPs and decode bytes of a config, without allocating the model.",
    )
    parser.add_argument("--config", help="YAML config to account")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seq-len", type=int, default=None, help="default: data.seq_len")
    parser.add_argument("--bytes-per-number", type=int, default=None)
    parser.add_argument(
        "--match",
        nargs=2,
        metavar=("CONFIG_A", "CONFIG_B"),
        help="check docs/evaluation.md's 3%% matches between two sparse configs (exit 1 if not)",
    )
    parser.add_argument("--dense", help="with --match: the dense config matched on forward FLOPs")
    parser.add_argument("--tolerance", type=float, default=MATCH_TOLERANCE)
    parser.add_argument(
        "--paper-table",
        action="store_true",
        help="the 227M family and the 2.5B-activated 60B/120B/MoE-30B configs vs the paper (docs/model.md §7)",
    )
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    options = dict(seq_len=args.seq_len, bytes_per_number=args.bytes_per_number)
    if args.paper_table:
        table, differences = paper_table()
        ok = all(max(abs(a), abs(t)) <= PAPER_TOLERANCE for _, a, t in differences)
        if args.json:
            print(
                json.dumps([dict(zip(("name", "d_activated", "d_total"), d)) for d in differences])
            )
        else:
            print(table)
            print(f"\nall within {PAPER_TOLERANCE:.0%}: {'yes' if ok else 'NO'}")
        return 0 if ok else 1
    if args.match:
        first, second = (account(load_config(p, args.set), **options) for p in args.match)
        dense = account(load_config(args.dense, args.set), **options) if args.dense else None
        rows = match_rows(first, second, dense)
        ok = all(row.ok(args.tolerance) for row in rows)
        if args.json:
            print(
                json.dumps(
                    {
                        "ok": ok,
                        "rows": [
                            {**dataclasses.asdict(row), "difference": row.difference}
                            for row in rows
                        ],
                    }
                )
            )
        else:
            print(match_table(rows, args.tolerance))
        return 0 if ok else 1
    if not args.config:
        raise ConfigError("pass --config PATH (or --match A B, or --paper-table)")
    result = account(load_config(args.config, args.set), **options)
    print(json.dumps(result.to_json()) if args.json else summary(result))
    return 0


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")  # shapes only: never claim an accelerator
    sys.exit(main())
