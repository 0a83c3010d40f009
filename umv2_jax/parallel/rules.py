"""Logical axis names → mesh axes: one table, overridable from the config (`mesh.rules`).

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `experts`, `mem_rows`, `mem_dim`, …);
`LOGICAL_RULES` maps each to a mesh axis (`data`, `fsdp`, `tensor`, `expert`), a tuple of them, or
None (replicated). A dimension that its mesh axes do not divide is replicated instead, so small models
run on any mesh. Memory tables split along `mem_dim` on `tensor` (dimension-wise memory parallelism,
the authors' and Meta's choice) and along `mem_rows` on `fsdp`; experts on `expert`. Optimizer state
takes each parameter's sharding (`shardings_like`).

    rules = resolve_rules(config.mesh.rules)        # ConfigError for a name the table does not know
    spec = logical_to_spec(("embed", "mlp"), (2048, 8192), mesh, rules)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from umv2_jax.config import LOGICAL_RULES, MeshAxes, resolve_rules  # noqa: F401 (re-exported)
from umv2_jax.parallel.mesh import replicated

# LOGICAL_RULES and resolve_rules are plain data owned by the config floor (config.py imports nothing
# above it, and validates `mesh.rules` with them); re-exported here, where sharding applies them.


def logical_to_spec(
    axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, MeshAxes] | None = None,
) -> PartitionSpec:
    """PartitionSpec for a value with logical `axes`; axes the mesh cannot divide are replicated.

    A logical name missing from the rules is a ValueError (a model bug: every name a parameter
    carries must be in `LOGICAL_RULES`).
    """
    rules = LOGICAL_RULES if rules is None else rules
    if axes is None:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        target = rules[name] if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1 and a not in used)
        extent = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or size % extent:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def state_shardings(
    state: nnx.State, mesh: Mesh, rules: Mapping[str, MeshAxes] | None = None
) -> dict[str, Any]:
    """Pure-dict tree of NamedShardings for an nnx.State, from each Variable's logical axes."""

    def sharding(variable: nnx.Variable) -> NamedSharding:
        axes = variable.get_metadata().get("out_sharding")
        shape = variable.get_raw_value().shape
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))

    tree = jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return tree.to_pure_dict()


def shardings_like(tree: Any, reference_paths: dict[tuple, NamedSharding], mesh: Mesh) -> Any:
    """Shardings for a tree (e.g. optimizer state) whose leaves mirror parameters.

    A leaf whose key path ends with a parameter's key path gets that parameter's sharding when the
    shapes agree; a leaf with one dimension of the parameter's shape deleted (a factored second
    moment, e.g. Adafactor's row and column statistics [L, D] and [L, n²] of a table [L, n², D])
    gets the parameter's spec with that dimension's entry deleted; every other leaf (counts,
    scalars) is replicated.
    """

    def pick(path, leaf):
        keys = tuple(_key_name(k) for k in path)
        shape = tuple(np.shape(leaf))
        for start in range(len(keys)):
            match = reference_paths.get(keys[start:])
            if match is None:
                continue
            if match[1] == shape:
                return match[0]
            reduced = _reduced_spec(match[0], match[1], shape)
            if reduced is not None:
                return NamedSharding(mesh, reduced)
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)


def _reduced_spec(sharding: NamedSharding, full: tuple, shape: tuple) -> PartitionSpec | None:
    """The spec of `sharding` (for shape `full`) with the one dimension deleted that turns `full`
    into `shape` (the last such dimension: optax factors a table's two largest), or None."""
    if len(shape) != len(full) - 1 or not shape:
        return None
    spec = tuple(sharding.spec) + (None,) * (len(full) - len(sharding.spec))
    for dim in reversed(range(len(full))):
        if full[:dim] + full[dim + 1 :] == shape:
            return PartitionSpec(*(spec[:dim] + spec[dim + 1 :]))
    return None


def path_index(shardings: Any, shapes: Any) -> dict[tuple, tuple[NamedSharding, tuple]]:
    """{key path: (sharding, shape)} of a pure-dict tree of shardings and a matching shape tree."""
    flat_shardings = jax.tree_util.tree_flatten_with_path(shardings)[0]
    flat_shapes = jax.tree_util.tree_leaves(shapes)
    return {
        tuple(_key_name(k) for k in path): (sharding, tuple(np.shape(shape)))
        for (path, sharding), shape in zip(flat_shardings, flat_shapes)
    }


def _key_name(key: Any) -> Any:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return getattr(key, attribute)
    return str(key)
