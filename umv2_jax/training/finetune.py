"""Which value rows sparse memory finetuning trains (`train.trainable: rows`), and the row-usage
counts it ranks them by.

    mask = select_rows(base_counts, base_tokens, new_counts, new_tokens, count=64)   # bool [L, n²]
    mask = row_mask_from_config(config)           # the same, from train.rows_usage_* files (or None)
    counts, tokens = count_row_usage(parts, params, rest, batches)   # what `--row-usage` records

TF-IDF ranking of sparse memory finetuning (Lin et al., arXiv 2510.15103), per memory table l and
value row i, with the counted positions as the documents:

    c_new[l, i]  = positions of the new data that read row i of table l     (T_new positions in all)
    c_base[l, i] = positions of the base run's data that read it              (T_base positions)
    tf[l, i]     = c_new[l, i] / Σ_j c_new[l, j]
    idf[l, i]    = log((T_base + 1) / (c_base[l, i] + 1))
    score[l, i]  = tf[l, i] · idf[l, i]
    chosen       = per table, the `count` highest scores among rows with c_new > 0; ties go to the
                   row the new data reads more, then to the lower row index (deterministic)

so a row the new data reads often and the base data rarely ranks first, and a row every base
position reads (c_base = T_base) scores 0. The `+ 1`s keep rows the base never read finite. A
position that reads a row through several heads or slots counts once (the `--row-usage` format).

Row-usage files (`python -m umv2_jax.evaluate --row-usage OUT.npz`; `write_row_usage` here writes
the same format): an .npz with `counts` int64 [L, n²] (L memory tables), `tokens` (int64 scalar: the
positions counted), `config_name` (str) and `step` (int64); `evaluate` adds a few more keys, which
are read as they come.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from umv2_jax.errors import ConfigError

USAGE_KEYS = ("counts", "tokens", "config_name", "step")


def tfidf_scores(
    base_counts: np.ndarray, base_tokens: int, new_counts: np.ndarray, new_tokens: int
) -> np.ndarray:
    """score [L, rows] float64 of the module docstring's formula (new_tokens is only checked)."""
    base = np.asarray(base_counts, np.float64)
    new = np.asarray(new_counts, np.float64)
    if base.shape != new.shape or base.ndim != 2:
        raise ValueError(f"base counts {base.shape} and new counts {new.shape} must be [L, rows]")
    if base_tokens < 1 or new_tokens < 1:
        raise ValueError(f"token totals must be >= 1, got base {base_tokens}, new {new_tokens}")
    if base.min(initial=0) < 0 or new.min(initial=0) < 0 or base.max(initial=0) > base_tokens:
        raise ValueError(
            f"counts must be in [0, tokens]; base counts reach {base.max(initial=0):.0f} of "
            f"{base_tokens} tokens"
        )
    total = new.sum(axis=1, keepdims=True)
    tf = new / np.maximum(total, 1.0)
    idf = np.log((base_tokens + 1.0) / (base + 1.0))
    return tf * idf


def select_rows(
    base_counts: np.ndarray,
    base_tokens: int,
    new_counts: np.ndarray,
    new_tokens: int,
    count: int,
) -> np.ndarray:
    """bool [L, rows]: per table, the `count` rows with the highest TF-IDF score (module docstring)
    among the rows the new data reads; fewer where the new data reads fewer rows.

    Equivalent numpy per table: order = lexsort((arange(rows), -new, -score)); the first `count`
    of order with new > 0.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    score = tfidf_scores(base_counts, base_tokens, new_counts, new_tokens)
    new = np.asarray(new_counts)
    mask = np.zeros(score.shape, bool)
    rows = np.arange(score.shape[1])
    for layer in range(score.shape[0]):
        order = np.lexsort((rows, -new[layer], -score[layer]))
        order = order[new[layer][order] > 0][:count]
        mask[layer, order] = True
    return mask


def read_row_usage(path: str, key: str) -> dict[str, Any]:
    """{counts int64 [L, rows], tokens int, config_name str, step int} of a row-usage file;
    ConfigError naming `key` (the config key that gave the path) when it is missing or malformed."""
    if not os.path.isfile(path):
        raise ConfigError(
            f"config '{key}': row-usage file '{path}' does not exist; write it with "
            "python -m umv2_jax.evaluate --workdir RUN --row-usage OUT.npz"
        )
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in ("counts", "tokens") if name not in data.files]
            if missing:
                raise ConfigError(
                    f"config '{key}': '{path}' has no '{missing[0]}' array (a row-usage file "
                    "holds counts, tokens, config_name, step)"
                )
            usage = {
                "counts": np.asarray(data["counts"], np.int64),
                "tokens": int(data["tokens"]),
                "config_name": str(data["config_name"]) if "config_name" in data.files else "",
                "step": int(data["step"]) if "step" in data.files else -1,
            }
    except (OSError, ValueError) as error:
        raise ConfigError(f"config '{key}': '{path}' is not a row-usage .npz ({error})") from None
    if usage["counts"].ndim != 2:
        raise ConfigError(
            f"config '{key}': counts in '{path}' have shape {usage['counts'].shape}, not [L, rows]"
        )
    return usage


def write_row_usage(path: str, counts: np.ndarray, tokens: int, config_name: str, step: int):
    """Writes a row-usage file (the format `read_row_usage` and `evaluate --row-usage` share)."""
    np.savez(
        path,
        counts=np.asarray(counts, np.int64),
        tokens=np.int64(tokens),
        config_name=np.asarray(config_name),
        step=np.int64(step),
    )


def row_mask_from_config(config) -> np.ndarray | None:
    """The row mask `train.trainable: rows` trains (None for every other mode): `select_rows` on
    the `train.rows_usage_base` / `train.rows_usage_new` files, `train.rows_count` rows per table.

    ConfigError (one line naming the keys) when a file is missing or does not fit the model.
    """
    train, model = config.train, config.model
    if train.trainable != "rows":
        return None
    if not train.rows_usage_base or not train.rows_usage_new:
        raise ConfigError(
            "config 'train.trainable': 'rows' needs row-usage counts: set train.rows_usage_base "
            "(the base run's data) and train.rows_usage_new (the new data), each written by "
            "python -m umv2_jax.evaluate --workdir BASE_RUN --row-usage OUT.npz"
        )
    base = read_row_usage(train.rows_usage_base, "train.rows_usage_base")
    new = read_row_usage(train.rows_usage_new, "train.rows_usage_new")
    shape = (len(model.sparse_layer_indices()), model.memory.n_keys**2)
    for key, usage in (("train.rows_usage_base", base), ("train.rows_usage_new", new)):
        if tuple(usage["counts"].shape) != shape:
            raise ConfigError(
                f"config '{key}': counts of shape {tuple(usage['counts'].shape)} do not fit the "
                f"model's memory tables [L, n²] = {list(shape)}; count rows with the model "
                "being finetuned"
            )
        if usage["tokens"] < 1 or usage["counts"].max(initial=0) > usage["tokens"]:
            raise ConfigError(
                f"config '{key}': tokens={usage['tokens']} is not >= 1 and >= every count"
            )
    return select_rows(
        base["counts"], base["tokens"], new["counts"], new["tokens"], train.rows_count
    )


def count_row_usage(parts, params: dict, rest: dict, batches: list[dict]) -> tuple[np.ndarray, int]:
    """(int64 [L, n²] positions reading each row of each memory table, positions counted) of an
    UltraMemV2 model on `batches` ({"inputs", "loss_mask", optionally "positions"}; the positions
    with loss_mask > 0 are counted; a position reading a row through several heads or slots counts
    once), the `--row-usage` semantics.

    Runs the blocks one by one (a scanned stack is unstacked outside any scan) and asks each memory
    layer's retrieval which rows its input selects. Needs value_share none (a layer reads its own
    table): with sharing, hits land in the tables of the layer's window, which `evaluate` handles.
    """
    from flax import nnx

    from umv2_jax.models.sparse import SparseContext
    from umv2_jax.models.transformer import BlockStack, _layer_shared

    config = parts.build(params, rest).config
    if config.sparse != "ultramem_v2" or config.memory.value_share.window != 1:
        raise ValueError("count_row_usage needs an ultramem_v2 model with value_share none")
    memory_blocks = list(config.sparse_layer_indices())
    rows = config.memory.n_keys**2

    def blocks_in_order(model):
        for segment, indices in zip(model.blocks, model.layout):
            if isinstance(segment, BlockStack):
                graphdef, state = nnx.split(segment.layers)
                for position, index in enumerate(indices):
                    layer_state = jax.tree.map(lambda v, p=position: v[p], state)
                    yield index, nnx.merge(graphdef, layer_state)
            else:
                yield indices[0], segment

    @jax.jit
    def hits(params, rest, inputs, positions, weights):
        model = parts.build(params, rest)
        x = jnp.take(model.embed[...], inputs, axis=0).astype(model.compute_dtype)
        out = {}
        for index, block in blocks_in_order(model):
            layer_shared = _layer_shared(model.shared, index)
            shared = model.shared if layer_shared is None else layer_shared
            context = SparseContext(shared=shared, deterministic=True, dropout_rng=None)
            x_next, u, _, _ = block(x, positions, context)
            if index in memory_blocks:
                layer = block.sparse
                tokens = u.reshape(-1, u.shape[-1])
                result = layer.retrieval(tokens, implementation=layer.implementation)
                _, window_rows, _ = layer.physical_rows(result.grid_indices)  # [H, T, m]
                per_token = window_rows.transpose(1, 0, 2).reshape(tokens.shape[0], -1)
                seen = jnp.zeros((tokens.shape[0], rows), jnp.bool_)
                seen = seen.at[jnp.arange(tokens.shape[0])[:, None], per_token].set(True)
                out[index] = jnp.sum(seen & (weights.reshape(-1, 1) > 0), axis=0, dtype=jnp.int32)
            x = x_next
        return out

    total = np.zeros((len(memory_blocks), rows), np.int64)
    tokens = 0
    for batch in batches:
        inputs = jnp.asarray(batch["inputs"])
        positions = batch.get("positions")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
        weights = jnp.asarray(batch["loss_mask"])
        counts = jax.device_get(hits(params, rest, inputs, jnp.asarray(positions), weights))
        for position, block in enumerate(memory_blocks):
            total[position] += np.asarray(counts[block], np.int64)
        tokens += int(np.sum(np.asarray(batch["loss_mask"]) > 0))
    return total, tokens
