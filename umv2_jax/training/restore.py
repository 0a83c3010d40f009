"""Restore a trained run's parameters only, read-only, on one device or a mesh.

    config, parts, params, rest, step = load_params("runs/tiny")            # newest readable step
    config, parts, params, rest, step = load_params("runs/tiny", step=50, mesh=mesh)

What a user of a trained model (generation, evaluation, export) needs is the parameters and the
non-trainable variables (`rest`: permutations, calibration constants), never the optimizer state,
which for Adam is twice the parameters again. `load_params` asks orbax for the `params` subtree of
the checkpoint's `state` item only (a partial restore into abstract targets: shapes, dtypes and the
shardings of `mesh`), so no optimizer moment is ever read from disk or allocated, and builds no
model: the targets come from `state.plan` (shapes only).

Read-only: nothing is written into the work directory (no orbax manager, no `checkpoints/` created,
no unreadable step moved aside), so a read-only directory works. Like the trainer's restore, each
step's files are checked against its `checksums.json` first; a step that does not match or that
orbax cannot read is skipped with one warning line and the previous one used, unless `step` names
it (then CheckpointError). Every problem is one line (`CheckpointError`, exit status 2 in the CLIs):
a directory without a run or without checkpoints, a step that does not exist, arrays whose shapes
differ from the config's.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax

from umv2_jax.errors import CheckpointError

log = logging.getLogger("umv2_jax")

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"


def read_run_config(workdir: str) -> dict:
    """The run's config.json as a mapping, with the mesh reset to this machine's devices (`data`
    over every device); CheckpointError (one line) when it is missing or unreadable."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.lexists(path):
        raise CheckpointError(f"{workdir} holds no run (no {CONFIG_FILE}); train first")
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read())
    except OSError as error:
        raise CheckpointError(
            f"{path} is unreadable ({error.strerror}); fix its permissions or restore it"
        ) from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(
            f"{path} is not valid JSON ({str(error).splitlines()[0][:80]}); restore it from "
            "checkpoints/<step>/config/metadata"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(data).__name__}, not a config mapping; restore it from "
            "checkpoints/<step>/config/metadata"
        )
    data["mesh"] = {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1}
    return data


def saved_steps(workdir: str) -> list[int]:
    """The committed checkpoint steps of `workdir`, oldest first (CheckpointError if none)."""
    directory = os.path.join(workdir, CHECKPOINTS)
    if not os.path.isdir(directory):
        raise CheckpointError(
            f"{workdir} holds no checkpoint ({directory} is missing); train first"
        )
    steps = sorted(
        int(name)
        for name in os.listdir(directory)
        if name.isdigit() and os.path.isdir(os.path.join(directory, name, "state"))
    )
    if not steps:
        raise CheckpointError(f"{workdir} holds no checkpoint ({directory} is empty); train first")
    return steps


def load_params(
    workdir: str,
    step: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    config: Any = None,
) -> tuple[Any, Any, dict, dict, int]:
    """(config, parts, params, rest, step) of `workdir`'s checkpoint at `step` (default: newest
    readable), with parameters and `rest` laid out on `mesh` (default: every local device on
    `data`, i.e. replicated parameters) by the config's sharding rules.

    `config` (default: the run's config.json) may differ from the run's in anything but the model.
    Reads only the `params` subtree of the checkpoint's state and its `rest` item.
    """
    from umv2_jax import parallel
    from umv2_jax.config import config_from_dict
    from umv2_jax.training import checkpoint as checkpoint_lib

    workdir = os.path.abspath(str(workdir))  # orbax wants absolute paths
    if config is None:
        config = config_from_dict(read_run_config(workdir))
    steps = saved_steps(workdir)
    if step is not None and step not in steps:
        raise CheckpointError(
            f"{workdir} has no checkpoint at step {step}; saved steps: {', '.join(map(str, steps))}"
        )
    mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
    parts, target_params, target_rest = abstract_params(config, mesh)
    candidates = [step] if step is not None else list(reversed(steps))
    failures = []
    for candidate in candidates:
        step_dir = os.path.join(workdir, CHECKPOINTS, str(candidate))
        reason = checkpoint_lib.verify_checksums(step_dir)
        if reason is None:
            _check_params_restorable(step_dir, target_params, target_rest, candidate)
            try:
                params, rest = _restore(step_dir, target_params, target_rest)
            except CheckpointError:
                raise
            except Exception as error:  # noqa: BLE001 orbax/tensorstore raise many types
                reason = checkpoint_lib._summarize(error)
        if reason is None:
            for failed, why in failures:
                log.warning(
                    "checkpoint at step %d in %s is unreadable (%s): skipped, restored step %d",
                    failed,
                    workdir,
                    why,
                    candidate,
                )
            return config, parts, params, rest, candidate
        failures.append((candidate, reason))
    if step is not None:
        raise CheckpointError(
            f"checkpoint at step {step} in {workdir} is unreadable ({failures[0][1]}); pick "
            "another --step"
        )
    raise CheckpointError(
        f"every checkpoint in {os.path.join(workdir, CHECKPOINTS)} is unreadable (steps {steps}, "
        f"newest: {failures[0][1]}); retrain or restore the files"
    )


def abstract_params(config: Any, mesh: jax.sharding.Mesh) -> tuple[Any, dict, dict]:
    """(parts, params, rest) of `config`'s model as `jax.ShapeDtypeStruct`s with their shardings
    on `mesh` (the trainer's: `state.plan` without the optimizer); nothing is allocated."""
    from flax import nnx

    from umv2_jax import parallel
    from umv2_jax.models.transformer import Transformer
    from umv2_jax.training.state import ModelParts, abstract_like

    rules = parallel.resolve_rules(config.mesh.rules)
    abstract = nnx.eval_shape(lambda: Transformer(config.model, nnx.Rngs(config.train.seed)))
    param_shardings = parallel.state_shardings(nnx.state(abstract, nnx.Param), mesh, rules)
    rest_shardings = parallel.state_shardings(nnx.state(abstract, nnx.Not(nnx.Param)), mesh, rules)
    parts, params, rest = ModelParts.split(abstract)
    shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return (
        parts,
        abstract_like(shapes(params), param_shardings),
        abstract_like(shapes(rest), rest_shardings),
    )


def restore_items(step_dir: str, target_params: Any, target_rest: Any) -> dict[str, Any]:
    """What `load_params` asks orbax for: {item: (tree of abstract targets, partial?)}. The state
    item is asked for its `params` subtree only (tests check this: no optimizer state)."""
    items = {"state": ({"params": target_params}, True)}
    if jax.tree.leaves(target_rest) and os.path.isdir(os.path.join(step_dir, "rest")):
        items["rest"] = (target_rest, False)
    return items


def _restore(step_dir: str, target_params: Any, target_rest: Any) -> tuple[dict, dict]:
    import orbax.checkpoint as ocp

    from umv2_jax.training import checkpoint as checkpoint_lib

    restored = {}
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        for item, (target, partial) in restore_items(step_dir, target_params, target_rest).items():
            args = ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=partial,
            )
            with checkpoint_lib._quiet_orbax():
                restored[item] = checkpointer.restore(os.path.join(step_dir, item), args=args)
    finally:
        checkpointer.close()
    params = restored["state"]["params"]
    rest = restored.get("rest", target_rest)
    got = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), params)
    want = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), target_params)
    if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
        raise CheckpointError(
            f"{step_dir} holds parameters that do not match the run's config; restore "
            "config.json from checkpoints/<step>/config/metadata"
        )
    return params, rest


def _check_params_restorable(step_dir: str, target_params: Any, target_rest: Any, step: int):
    """CheckpointError naming the first parameter whose saved shape differs from the config's
    (orbax metadata only; the optimizer state's arrays are not looked at)."""
    import orbax.checkpoint as ocp

    from umv2_jax.training.checkpoint import _path_name

    try:
        metadata = ocp.StandardCheckpointHandler().metadata(
            ocp.path.step.epath.Path(os.path.join(step_dir, "state"))
        )
        saved = {
            _path_name(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(metadata.tree)[0]
        }
    except Exception:  # noqa: BLE001 a damaged checkpoint: the restore itself reports it
        return
    fix = "evaluate with the config the run was saved with (its config.json)"
    for path, leaf in jax.tree_util.tree_flatten_with_path({"params": target_params})[0]:
        name = _path_name(path)
        shape = tuple(leaf.shape)
        if name not in saved:
            raise CheckpointError(
                f"checkpoint at step {step} has no parameter {name} of shape {shape} that the "
                f"config builds; {fix}"
            )
        if saved[name] != shape:
            raise CheckpointError(
                f"checkpoint at step {step}: parameter {name} was saved with shape {saved[name]} "
                f"but the config builds {shape}; {fix}"
            )
