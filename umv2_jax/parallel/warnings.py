"""Mesh axes a model cannot use, reported at start-up with what they replicate.

    for line in mesh_warnings(config, mesh):     # the training loop and the AOT tool print these
        print("warning:", line)

A mesh axis of size > 1 that the model cannot split is not an error (the run is correct, every
device just holds or computes the same thing along it), but it wastes memory or compute, so it is
reported, one line each:

- `expert` > 1 on a model without experts: one more data-parallel axis (the batch is split over
  it), the parameters replicated over it.
- `tensor` > 1 that does not divide `model.num_heads`: attention's heads cannot be split, so
  attention is computed replicated over `tensor`.
- any parameter whose logical axes map to `tensor`, `fsdp` or `expert` (umv2_jax.parallel.rules)
  but whose dimension that axis does not divide: it is replicated over that axis instead
  (`logical_to_spec`); the line names the parameters, their dimension and their share of the
  parameter bytes.

Equivalent plain check for one parameter: `logical_to_spec(axes, shape, mesh, rules)` lacks an axis
that `rules[name]` names for one of its dimensions.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from umv2_jax.config import Config
from umv2_jax.parallel.rules import logical_to_spec, resolve_rules

# Mesh axes that split parameters (data never does; the batch axes carry tokens).
_PARAMETER_AXES = ("fsdp", "tensor", "expert")
_NAMES_SHOWN = 4


def mesh_warnings(
    config: Config, mesh: jax.sharding.Mesh, params_template: Any | None = None
) -> list[str]:
    """One line per mesh axis the model cannot (fully) use on `mesh`, or [] when it uses them all.

    params_template: an nnx.State of the parameters (shapes + logical axes, e.g.
    `Plan.parts.params_template`); default: built with `nnx.eval_shape` (nothing allocated).
    """
    model = config.model
    shape = dict(mesh.shape)
    lines = []
    if shape.get("expert", 1) > 1 and model.sparse != "moe":
        lines.append(
            f"mesh.expert={shape['expert']}: model.sparse={model.sparse!r} has no experts, so "
            "'expert' acts as data parallel (the batch is split over it); parameters are "
            "replicated over it"
        )
    tensor = shape.get("tensor", 1)
    if tensor > 1 and model.num_heads % tensor:
        lines.append(
            f"mesh.tensor={tensor} does not divide model.num_heads={model.num_heads}: attention's "
            "heads cannot be split, so attention is computed replicated over 'tensor'"
        )
    if params_template is None:
        from umv2_jax.models.transformer import Transformer

        abstract = nnx.eval_shape(lambda: Transformer(model, nnx.Rngs(0)))
        params_template = nnx.state(abstract, nnx.Param)
    lines += _replicated_parameters(config, mesh, params_template)
    return lines


def _replicated_parameters(config: Config, mesh: jax.sharding.Mesh, params: Any) -> list[str]:
    rules = resolve_rules(config.mesh.rules)
    leaves = jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    total_bytes = 0
    replicated: dict[str, list[tuple[str, str, int]]] = {axis: [] for axis in _PARAMETER_AXES}
    for path, variable in leaves:
        if not isinstance(variable, nnx.Variable):
            continue
        value = variable.get_raw_value()
        dims = tuple(value.shape)
        nbytes = int(np.prod(dims, dtype=np.int64)) * np.dtype(value.dtype).itemsize
        total_bytes += nbytes
        axes = variable.get_metadata().get("out_sharding")
        if not axes:
            continue
        used = {
            axis
            for entry in logical_to_spec(axes, dims, mesh, rules)
            if entry is not None
            for axis in ((entry,) if isinstance(entry, str) else entry)
        }
        for mesh_axis in _PARAMETER_AXES:
            if mesh.shape[mesh_axis] <= 1 or mesh_axis in used:
                continue
            for name, size in zip(axes, dims):
                target = rules.get(name) if name is not None else None
                targets = (target,) if isinstance(target, str) else tuple(target or ())
                if mesh_axis in targets:
                    key = "/".join(str(getattr(k, "key", k)) for k in path)
                    replicated[mesh_axis].append((key, f"{name} {size}", nbytes))
                    break
    lines = []
    for mesh_axis, entries in replicated.items():
        if not entries:
            continue
        share = sum(nbytes for *_, nbytes in entries) / max(total_bytes, 1)
        entries.sort(key=lambda entry: -entry[2])
        shown = ", ".join(f"{key} ({dim})" for key, dim, _ in entries[:_NAMES_SHOWN])
        more = f" and {len(entries) - _NAMES_SHOWN} more" if len(entries) > _NAMES_SHOWN else ""
        lines.append(
            f"mesh.{mesh_axis}={mesh.shape[mesh_axis]} does not divide {len(entries)} "
            f"parameter(s) ({share:.0%} of the parameter bytes), replicated over "
            f"'{mesh_axis}' instead: {shown}{more}"
        )
    return lines
