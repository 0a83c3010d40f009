"""Row-major memory tables at the jit boundary: the train step's in/out layouts.

    formats = row_major_tables(state_shardings, state_shapes, table_paths)
    jax.jit(step, in_shardings=(formats, ...), out_shardings=(formats, ...))

XLA:TPU picks each argument's layout to minimise tile padding: for an f32 table [N, 192] (or
[L, N, 192], [N, 160]) that is column-major (`major_to_minor=(1, 0)`: 192 pads to 256 lanes row-
major), and every row gather then relayouts the whole table into a temporary (2.6 GB at the 227M
pool; DEVELOPERS.md). A `jax.experimental.layout.Format` with `Layout(major_to_minor=(0, 1, …))`
on the tables' in and out shardings fixes their layout to row-major, so the gathers read them in
place. The same holds for what mirrors a table in the optimizer state (Adam's moments: same path
suffix, same shape). On CPU and GPU the default layout is already row-major; the formats change
nothing there.

table_paths: key paths (tuples of dict keys) of the table parameters within the params tree, e.g.
("blocks", "sparse", "values"); a state leaf is a table (or its mirror) when its key path ends with
one of them and its shape is the table's.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental.layout import Format, Layout


def row_major(sharding: Any, ndim: int) -> Format:
    """`sharding` with a row-major layout for an array of `ndim` dimensions."""
    return Format(Layout(major_to_minor=tuple(range(ndim))), sharding)


def _key(key: Any) -> Any:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return getattr(key, attribute)
    return str(key)


def row_major_tables(shardings: Any, shapes: Any, tables: dict[tuple, tuple[int, ...]]) -> Any:
    """`shardings` (a tree matching `shapes`, ShapeDtypeStruct or array leaves) with every table
    leaf, and every leaf mirroring one, replaced by its row-major `Format`.

    tables: {key path of a table parameter: its shape}.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(shardings)
    leaves = jax.tree.leaves(shapes)
    out = []
    for (path, sharding), leaf in zip(flat, leaves, strict=True):
        keys = tuple(_key(k) for k in path)
        shape = tuple(getattr(leaf, "shape", ()))
        is_table = len(shape) >= 2 and any(
            keys[start:] in tables and tables[keys[start:]] == shape for start in range(len(keys))
        )
        out.append(row_major(sharding, len(shape)) if is_table else sharding)
    return jax.tree_util.tree_unflatten(treedef, out)


def table_paths(labels: dict, params: Any, group: str = "values") -> dict[tuple, tuple[int, ...]]:
    """{key path: shape} of the parameters `labels` (a pure dict of group names) puts in `group`."""
    flat = jax.tree_util.tree_flatten_with_path(labels)[0]
    shapes = jax.tree.leaves(params)
    return {
        tuple(_key(k) for k in path): tuple(leaf.shape)
        for (path, label), leaf in zip(flat, shapes, strict=True)
        if label == group
    }
