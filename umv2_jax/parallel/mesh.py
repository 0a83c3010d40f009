"""The device mesh: built from `config.mesh`, and the one the traced program runs under.

    mesh = make_mesh(config.mesh)            # axes (data, fsdp, tensor, expert), all Auto
    with use_mesh(mesh):                     # the loop, the AOT tool and the evaluator trace under it
        ...                                  # ops find it with `active_mesh()` to go token-local

`use_mesh` is this project's own context, read only by our ops; it is not `jax.set_mesh`, under which
Flax would turn every parameter's logical axis names into (nonexistent) mesh axes. A jitted function
must be traced and called under the same `use_mesh` (the context is not part of jit's cache key).

Batch axes: every axis but `tensor` carries distinct tokens (`BATCH_AXES`). `expert` shards the batch
too, so that expert parallelism exchanges tokens (an all-to-all) instead of repeating them; in a model
without experts it is one more data-parallel axis with parameters replicated over it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

# BATCH_AXES: mesh axes whose devices hold different tokens, in the order the batch dimension is
# split (config data: the sharding table there uses it).
from umv2_jax.config import BATCH_AXES, MeshConfig


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, expert); ConfigError if the axes cannot divide."""
    devices = list(devices if devices is not None else jax.devices())
    shape = config.shape(len(devices))
    grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MeshConfig.AXES, axis_types=(AxisType.Auto,) * len(shape))


_ACTIVE: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("umv2_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[None]:
    """Within the block, `active_mesh()` is `mesh` (None: plain single-device code)."""
    token = _ACTIVE.set(mesh)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `use_mesh`, or None without one or when it has one device.

    Ops use it to decide whether to run token-local under `shard_map`; None means plain code.
    """
    mesh = _ACTIVE.get()
    if mesh is None or mesh.size == 1:
        return None
    return mesh


def batch_axes(mesh: Mesh | AbstractMesh) -> tuple[str, ...]:
    """The mesh axes of `BATCH_AXES` this mesh has, with size > 1 (what a batch dimension splits on)."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def batch_shards(mesh: Mesh | AbstractMesh) -> int:
    """How many ways the batch dimension is split."""
    return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)], dtype=np.int64))


def batch_spec(mesh: Mesh | AbstractMesh) -> PartitionSpec:
    """PartitionSpec of a `[batch, ...]` array: batch split over the batch axes."""
    axes = batch_axes(mesh)
    return PartitionSpec(axes if axes else None)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a `[batch, seq]` array: batch split over the batch axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def token_local(run, n_tokens: int, n_split: int, n_outputs: int = 1):
    """`run(*split, *whole)` on each device's own tokens under an active mesh (else `run` itself).

    The first `n_split` arguments have the tokens [T] (the flattened [B·S], which follow the batch
    split) leading and are split over `batch_axes(mesh)`; the rest (keys, tables) enter replicated.
    `run` returns `n_outputs` arrays (one array when 1) with T leading, split the same way. One
    `jax.shard_map`: nothing token-sized crosses the batch axes, and the transpose sums the
    replicated inputs' cotangents once over the mesh. Plain `run` without a mesh, inside an enclosing
    shard_map over those axes, or when the batch shards do not divide T (left to the partitioner).
    Plain-JAX equivalent: `run(*split, *whole)`.
    """
    mesh = active_mesh()
    if mesh is None:
        return run
    axes = batch_axes(mesh)
    manual = set(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()) or ())
    if not axes or n_tokens % batch_shards(mesh) or manual & set(axes):
        return run
    tokens, whole = PartitionSpec(axes), PartitionSpec()
    out_specs = tokens if n_outputs == 1 else (tokens,) * n_outputs

    def wrapped(*args):
        specs = tuple(tokens if i < n_split else whole for i in range(len(args)))
        # Pallas calls carry no varying-axes types (the registry traces every platform's branch),
        # so the check is off; unchecked, the transpose still sums the replicated inputs'
        # cotangents over every axis after dividing the outputs' by the axes they are replicated
        # on: the true gradient (the mesh-equivalence tests compare it with one device's).
        return jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=False)(
            *args
        )

    return wrapped
