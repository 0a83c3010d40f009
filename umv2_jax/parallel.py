"""Device mesh from the config and logical → mesh axis rules.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `experts`, `mem_rows`, `mem_dim`, …);
`LOGICAL_RULES` maps each to a mesh axis (`data`, `fsdp`, `tensor`, `expert`) or to None
(replicated). A dimension that the mesh axis does not divide is replicated instead, so small models
run on any mesh. Memory values are sharded along `mem_dim` (dimension-wise memory parallelism).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from umv2_jax.config import MeshConfig

# Logical axis → mesh axis (or a tuple of mesh axes, or None).
LOGICAL_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv": None,
    "mlp": "tensor",
    "norm": None,
    "experts": "expert",
    "layers": None,
    "mem_rows": None,
    "mem_dim": "tensor",
}


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, expert); ConfigError if the axes cannot divide."""
    devices = list(devices if devices is not None else jax.devices())
    shape = config.shape(len(devices))
    grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MeshConfig.AXES, axis_types=(AxisType.Auto,) * len(shape))


def logical_to_spec(
    axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh
) -> PartitionSpec:
    """PartitionSpec for a value with logical `axes`; axes the mesh cannot divide are replicated."""
    if axes is None:
        return PartitionSpec()
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        target = LOGICAL_RULES.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1 and a not in used)
        extent = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or size % extent:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh) -> dict[str, Any]:
    """Pure-dict tree of NamedShardings for an nnx.State, from each Variable's logical axes."""

    def sharding(variable: nnx.Variable) -> NamedSharding:
        axes = variable.get_metadata().get("out_sharding")
        return NamedSharding(mesh, logical_to_spec(axes, variable.get_raw_value().shape, mesh))

    tree = jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return tree.to_pure_dict()


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a `[batch, seq]` array: batch split over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shardings_like(tree: Any, reference_paths: dict[tuple, NamedSharding], mesh: Mesh) -> Any:
    """Shardings for a tree (e.g. optimizer state) whose leaves mirror parameters.

    A leaf whose key path ends with a parameter's key path gets that parameter's sharding when the
    shapes agree; every other leaf (counts, scalars) is replicated.
    """

    def pick(path, leaf):
        keys = tuple(_key_name(k) for k in path)
        for start in range(len(keys)):
            match = reference_paths.get(keys[start:])
            if match is not None and match[1] == tuple(np.shape(leaf)):
                return match[0]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)


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
