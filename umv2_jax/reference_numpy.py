"""A pure-NumPy forward pass over an export (`python -m umv2_jax.export`), without JAX.

    tensors, model = load(DIR)                          # {name: ndarray}, config.json's "model"
    logits = forward(model, tensors, tokens)            # tokens int [batch, seq] → [b, s, padded_vocab]
    logits, info = forward(model, tensors, tokens, return_info=True)   # info["min_gap"], ["rows"]

It reads only NumPy, json and safetensors, and follows the tensor layout the export's README.md
states, so a reader can check that layout (and port it) without this project's JAX code. What it
computes, per block (docs/model.md §1), in float64 by default:

    x_mid  = x + Attn(RMSNorm(x))            causal MHA, RoPE (rotate-half), QK-norm where present
    u      = RMSNorm(x_mid)
    x_next = x_mid + SwiGLU(u) + Sparse(u)   Sparse: UltraMemV2 (docs/model.md §2–3), dropless MoE, or none

then the final RMSNorm and the head (`embed.T` when tied, else `lm_head`). Other sparse layers
(pkm, peer, memory_plus, ultramem v1) and capacity-limited MoE raise `Unsupported`.

Tolerance: with float32 parameters and `compute_dtype: float32` the JAX model's logits agree to
about 1e-6 relative (tests assert 1e-4 of the largest |logit|). The memory layer's top-k selections
are discrete: two candidates whose scores differ by less than float32 rounding may be ordered
differently by the two implementations; `info["min_gap"]` is the smallest score gap at any
selection boundary (stage 1's k-th vs (k+1)-th candidate, stage 2's m-th vs (m+1)-th cell), so a
comparison can first make sure no selection is that close. `compute_dtype: bfloat16` models are
computed here in full precision: expect bf16-sized differences.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import numpy as np

INDEX_FILE = "model.safetensors.index.json"
REST = "rest."


class Unsupported(ValueError):
    """The export holds a model this reference does not compute (the message says which part)."""


def load(directory: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """({tensor name: ndarray}, the exported config's "model" section) of an export folder."""
    from safetensors import safe_open

    with open(os.path.join(directory, INDEX_FILE)) as handle:
        weight_map = json.load(handle)["weight_map"]
    tensors = {}
    for file in sorted(set(weight_map.values())):
        with safe_open(os.path.join(directory, file), framework="numpy") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    with open(os.path.join(directory, "config.json")) as handle:
        model = json.load(handle)["model"]
    return tensors, model


def blocks(tensors: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Per block, {name inside the block: tensor} (rest tensors keep their `rest.` prefix).

    Segments `blocks.S` are taken in order of S; a stacked segment (`blocks.S.layers.*`, leading
    [layers] axis) contributes one block per position.
    """
    segments: dict[int, dict[str, tuple[bool, np.ndarray]]] = {}
    for name, array in tensors.items():
        match = re.match(r"^((?:rest\.)?)blocks\.(\d+)\.(layers\.)?(.+)$", name)
        if match is None:
            continue
        prefix, segment, stacked, tail = match.groups()
        segments.setdefault(int(segment), {})[prefix + tail] = (stacked is not None, array)
    result = []
    for segment in sorted(segments):
        entries = segments[segment]
        stacked = {flag for flag, _ in entries.values()}
        if stacked != {False} and stacked != {True}:
            raise ValueError(f"segment blocks.{segment} mixes stacked and single tensors")
        if stacked == {False}:
            result.append({name: array for name, (_, array) in entries.items()})
            continue
        count = {array.shape[0] for _, array in entries.values()}
        if len(count) != 1:
            raise ValueError(f"segment blocks.{segment}: stacks of different lengths {count}")
        for position in range(count.pop()):
            result.append({name: array[position] for name, (_, array) in entries.items()})
    return result


def forward(
    model: dict[str, Any],
    tensors: dict[str, np.ndarray],
    tokens: np.ndarray,
    positions: np.ndarray | None = None,
    *,
    dtype=np.float64,
    return_info: bool = False,
):
    """Logits [batch, seq, padded_vocab] of `tokens` [batch, seq] (see the module docstring).

    model: config.json's "model" section. positions default to 0 … seq−1 in every row.
    With return_info also {"min_gap": smallest selection gap (None without memory layers),
    "rows": {block: window rows [heads, batch·seq, topk] each memory layer read}}.
    """
    sparse = model.get("sparse", "none")
    if sparse not in ("none", "ultramem_v2", "moe"):
        raise Unsupported(
            f"the NumPy reference computes dense, ultramem_v2 and moe models, not sparse={sparse!r}"
        )
    if sparse == "moe" and float(model["moe"].get("capacity_factor", 0.0)) > 0:
        raise Unsupported("the NumPy reference computes dropless MoE only (capacity_factor 0)")
    tokens = np.asarray(tokens)
    batch, seq = tokens.shape
    if positions is None:
        positions = np.broadcast_to(np.arange(seq), (batch, seq))
    cast = lambda a: np.asarray(a).astype(dtype)  # noqa: E731 (bf16 tensors too)
    eps = float(model["norm_eps"])
    info: dict[str, Any] = {"min_gap": None, "rows": {}}
    x = cast(tensors["embed"])[tokens]  # [b, s, h]
    for number, block in enumerate(blocks(tensors)):
        p = {
            name: (array if name.startswith(REST) else cast(array)) for name, array in block.items()
        }
        h = _rms_norm(x, p["attn_norm.scale"], eps)
        x = x + _attention(h, p, positions, model, eps)
        u = _rms_norm(x, p["ffn_norm.scale"], eps)
        out = x
        if "ffn.gate" in p:
            out = out + _swiglu(u, p["ffn.gate"], p["ffn.up"], p["ffn.down"])
        if "sparse.retrieval.cores" in p:
            shared = {
                n: cast(tensors[n]) for n in ("shared.values", "shared.pre_values") if n in tensors
            }
            y, gap, rows = _ultramem_v2(u.reshape(batch * seq, -1), p, shared, model["memory"])
            out = out + y.reshape(u.shape)
            info["rows"][number] = rows
            info["min_gap"] = gap if info["min_gap"] is None else min(info["min_gap"], gap)
        elif "sparse.router" in p:
            out = out + _moe(u.reshape(batch * seq, -1), p, model["moe"]).reshape(u.shape)
        x = out
    x = _rms_norm(x, cast(tensors["final_norm.scale"]), eps)
    head = cast(tensors["lm_head"]) if "lm_head" in tensors else cast(tensors["embed"]).T
    logits = x @ head
    return (logits, info) if return_info else logits


def _rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotate-half RoPE. x [b, s, heads, d]; pair (i, i + d/2) rotates by position·θ^(−i/(d/2))."""
    half = x.shape[-1] // 2
    frequencies = theta ** (-np.arange(half, dtype=np.float64) / half)
    angles = positions[..., None].astype(np.float64) * frequencies  # [b, s, half]
    sin, cos = np.sin(angles)[:, :, None, :], np.cos(angles)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _attention(x, p, positions, model, eps) -> np.ndarray:
    """Causal MHA: q/k/v [h, heads, d], out [heads, d, h]; QK-norm over d where present."""
    q = np.einsum("bse,end->bsnd", x, p["attn.query"])
    k = np.einsum("bse,end->bsnd", x, p["attn.key"])
    v = np.einsum("bse,end->bsnd", x, p["attn.value"])
    if "attn.query_norm.scale" in p:
        q = _rms_norm(q, p["attn.query_norm.scale"], eps)
        k = _rms_norm(k, p["attn.key_norm.scale"], eps)
    theta = float(model["rope_theta"])
    q, k = _rope(q, positions, theta), _rope(k, positions, theta)
    scores = np.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(q.shape[-1])
    seq = x.shape[1]
    scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    attended = np.einsum("bnqk,bknd->bqnd", probs, v)
    return np.einsum("bsnd,nde->bse", attended, p["attn.out"])


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def _swiglu(u, gate, up, down) -> np.ndarray:
    return (_silu(u @ gate) * (u @ up)) @ down


def _top(scores: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the `count` largest per row, best first, ties to the lower index; the gap
    between the count-th and the next score per row, +inf when nothing is left out)."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    chosen = order[..., :count]
    if scores.shape[-1] == count:
        gap = np.full(scores.shape[:-1], np.inf)
    else:
        picked = np.take_along_axis(scores, order[..., count - 1 : count + 1], axis=-1)
        gap = picked[..., 0] - picked[..., 1]
    return chosen, gap


def _ultramem_v2(x, p, shared, memory) -> tuple[np.ndarray, float, np.ndarray]:
    """One UltraMemV2 layer on tokens x [T, h] (docs/model.md §2): y [T, h], min selection gap, rows.

    Retrieval per head n: queries W_q [h, H, 2, r_q, D_k] (r_q = 1 broadcasts to every rank),
    RMS-normalized over D_k with γ_q; keys [H, 2, N, r, D_k] RMS-normalized with γ_k; per-rank
    scores S[t, a, i]; stage 1 keeps the k best keys per side by u*·S (row) and t*·S (column),
    (u*, t*) the leading singular pair of C = Σ_c C^c with u*'s largest-magnitude entry positive;
    stage 2 keeps the m best cells of R C Qᵀ; cell (i, j) is grid index I_row·N + I_col, read at
    window row π(cell) mod (g·n²) of the tables listed in `window`.
    """
    eps = float(memory["norm_eps"])
    k_side, m = int(memory["rc_topk"]), int(memory["topk"])
    retrieval = {
        n[len("sparse.retrieval.") :]: a for n, a in p.items() if n.startswith("sparse.retrieval.")
    }
    query, keys, cores = retrieval["query"], retrieval["keys"], retrieval["cores"]
    heads, _, n_keys, rank, _ = keys.shape
    tokens = x.shape[0]
    projected = np.einsum("th,hnsad->nstad", x, query)  # [H, 2, T, r_q, D_k]
    projected = _rms_norm(projected, retrieval["query_gain"][:, None, None, None, :], eps)
    projected = np.broadcast_to(projected, (heads, 2, tokens, rank, projected.shape[-1]))
    keys = _rms_norm(keys, retrieval["key_gain"][:, None, None, None, :], eps)
    permutation = np.asarray(p["rest.sparse.permutation"]).astype(np.int64)
    window = np.asarray(p["rest.sparse.window"]).astype(np.int64)
    values = shared["shared.values"][window].reshape(-1, shared["shared.values"].shape[-1])
    pre_values = shared.get("shared.pre_values")
    if pre_values is not None:
        pre_values = pre_values[window].reshape(-1, pre_values.shape[-1])
    n_cores = cores.shape[1]
    all_rows, all_scores, gaps = [], [], []
    for head in range(heads):
        core_sum = cores[head].sum(0)  # [r, r]
        left, _, right_t = np.linalg.svd(core_sum)
        u_star, t_star = left[:, 0], right_t[0, :]
        sign = -1.0 if u_star[np.argmax(np.abs(u_star))] < 0 else 1.0
        u_star, t_star = u_star * sign, t_star * sign
        s_row = np.einsum("tad,nad->tan", projected[head, 0], keys[head, 0])  # [T, r, N]
        s_col = np.einsum("tad,nad->tan", projected[head, 1], keys[head, 1])
        cand_row, gap_row = _top(np.einsum("a,tan->tn", u_star, s_row), k_side)
        cand_col, gap_col = _top(np.einsum("a,tan->tn", t_star, s_col), k_side)
        r_cand = np.take_along_axis(s_row, cand_row[:, None, :], axis=2)  # [T, r, k]
        q_cand = np.take_along_axis(s_col, cand_col[:, None, :], axis=2)
        total = np.einsum("tai,ab,tbj->tij", r_cand, core_sum, q_cand).reshape(tokens, -1)
        best, gap_cell = _top(total, m)
        best_i, best_j = best // k_side, best % k_side
        grid = np.take_along_axis(cand_row, best_i, axis=1) * n_keys + np.take_along_axis(
            cand_col, best_j, axis=1
        )  # [T, m]
        r_sel = np.take_along_axis(r_cand, best_i[:, None, :], axis=2).transpose(0, 2, 1)
        q_sel = np.take_along_axis(q_cand, best_j[:, None, :], axis=2).transpose(0, 2, 1)
        scores = np.einsum("tma,cab,tmb->tmc", r_sel, cores[head], q_sel)  # [T, m, C]
        all_rows.append(permutation[grid] % values.shape[0])
        all_scores.append(scores)
        gaps += [gap_row.min(), gap_col.min(), gap_cell.min()]
    rows = np.stack(all_rows)  # [H, T, m]
    slots = rows.transpose(1, 0, 2).reshape(tokens, -1)  # head-major slots
    weights = np.stack(all_scores).transpose(1, 0, 2, 3).reshape(tokens, -1, n_cores)
    if pre_values is not None:
        x_p = x @ p["sparse.pre_value_proj"]
        raw = np.einsum("tmd,td->tm", pre_values[slots], x_p)
        if memory.get("pre_score_act", "identity") == "gelu":
            raw = 0.5 * raw * (1.0 + np.vectorize(math.erf)(raw / math.sqrt(2.0)))
        weights = weights * raw[..., None]
    gathered = values[slots].reshape(tokens, slots.shape[1], n_cores, -1)  # [T, slots, C, D_v/C]
    o = np.einsum("tmc,tmcd->tcd", weights, gathered).reshape(tokens, -1)
    return o @ p["sparse.output_proj"], float(min(gaps)), rows


def _moe(x, p, moe) -> np.ndarray:
    """Dropless OLMoE layer: softmax router, top-k experts (weights not renormalized unless
    `renormalize`), SwiGLU experts [E, h, d_e] / [E, d_e, h], plus the shared expert if any."""
    logits = x @ p["sparse.router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = probs / probs.sum(-1, keepdims=True)
    chosen, _ = _top(probs, int(moe["top_k"]))
    weights = np.take_along_axis(probs, chosen, axis=1)
    if moe.get("renormalize", False):
        weights = weights / weights.sum(-1, keepdims=True)
    y = np.zeros_like(x)
    for slot in range(chosen.shape[1]):
        for expert in np.unique(chosen[:, slot]):
            mask = chosen[:, slot] == expert
            out = _swiglu(
                x[mask], p["sparse.gate"][expert], p["sparse.up"][expert], p["sparse.down"][expert]
            )
            y[mask] += weights[mask, slot, None] * out
    if "sparse.shared_expert.gate" in p:
        y = y + _swiglu(
            x,
            p["sparse.shared_expert.gate"],
            p["sparse.shared_expert.up"],
            p["sparse.shared_expert.down"],
        )
    return y
