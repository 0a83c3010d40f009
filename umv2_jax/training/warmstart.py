"""Warm start: a new run that starts from another model's parameters, with a fresh optimizer.

    python train.py --config NEW.yaml --workdir runs/ft --init-from runs/base[:STEP]
    python train.py --config RETRO.yaml --workdir runs/retro --init-from hf:DIR   # umv2_jax.retrofit

`--init-from` sets `train.init_from`. The new run's step 0 holds the source's parameters bit for
bit (and, from a run, its non-trainable variables: the memory layers' grid permutations and
calibration records, without which a value row would mean another row); the optimizer state is
the one `train.trainable` builds, freshly initialized; the data stream and step count start at 0.
A run that already has checkpoints resumes from them and ignores `init_from`.

Sources:
  RUN[:STEP]  a run directory (config.json + checkpoints/); its newest checkpoint or STEP. Only the
              parameters and `rest` are read (a partial restore: no optimizer moment is read). The
              run's model may differ from the new config's in anything that keeps every parameter's
              shape (dropout, implementations, LR multipliers, scan over layers: the layout is
              converted); a parameter of another shape is one line naming the first one.
  hf:DIR      a dense Hugging Face checkpoint retrofitted with memory (umv2_jax.retrofit): the
              config must have the checkpoint's backbone fields (write it with
              `python -m umv2_jax.retrofit`); the memory layers are fresh with W_o = 0.
  DIR         an exported directory (`python -m umv2_jax.export`): read by
              `umv2_jax.export.load_pretrained` where that module is installed.

Every problem is found by `resolve` before the trainer writes anything (one line, exit status 2):
a missing run or step, a run of another shape, an unmappable Hugging Face config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from umv2_jax.errors import CheckpointError, ConfigError

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class InitSource:
    """Where a warm start's parameters come from. kind: run | hf | export."""

    kind: str
    path: str
    step: int | None = None

    def __str__(self) -> str:
        if self.kind == "hf":
            return f"hf:{self.path}"
        return self.path if self.step is None else f"{self.path} step {self.step}"


def parse(text: str) -> InitSource:
    """`RUN[:STEP]`, `hf:DIR` or an export `DIR` → InitSource (no file is read)."""
    if text.startswith("hf:"):
        return InitSource("hf", os.path.abspath(text[3:]))
    path, sep, step = text.rpartition(":")
    if sep and step.isdigit() and path:
        return InitSource("run", os.path.abspath(path), int(step))  # orbax wants absolute paths
    return InitSource("run", os.path.abspath(text))


def saved_steps(workdir: str) -> list[int]:
    directory = os.path.join(workdir, CHECKPOINTS)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def resolve(config) -> InitSource | None:
    """The checked source of `config.train.init_from` (None when unset): ConfigError /
    CheckpointError (one line) unless its parameters fit the config. Reads metadata only."""
    text = config.train.init_from
    if not text:
        return None
    source = parse(text)
    where = f"--init-from {text}"
    if source.kind == "hf":
        from umv2_jax import retrofit

        if not os.path.isdir(source.path):
            raise ConfigError(f"{where}: {source.path} is not a directory")
        retrofit.check_matches(config, source.path)
        return source
    if not os.path.isdir(source.path):
        raise CheckpointError(
            f"{where}: {source.path} is not a directory; give RUN[:STEP] or hf:DIR"
        )
    if not os.path.isdir(os.path.join(source.path, CHECKPOINTS)):
        if any(name.endswith(".safetensors") for name in os.listdir(source.path)):
            export = _export_module(where)  # raises if the export tools are not installed
            _check_same_shapes(export.read_config(source.path), config, where)
            return InitSource("export", source.path)
        raise CheckpointError(
            f"{where}: {source.path} holds no checkpoints/ (not a run directory); train it first "
            "or give hf:DIR for a Hugging Face checkpoint"
        )
    steps = saved_steps(source.path)
    if not steps:
        raise CheckpointError(f"{where}: {source.path} holds no checkpoint; train it first")
    if source.step is not None and source.step not in steps:
        raise CheckpointError(
            f"{where}: {source.path} has no checkpoint at step {source.step}; saved steps: "
            f"{', '.join(map(str, steps))}"
        )
    step = source.step if source.step is not None else steps[-1]
    source = InitSource("run", source.path, step)
    _check_same_shapes(_run_config(source.path, where), config, where)
    return source


def _check_same_shapes(base, config, where: str) -> None:
    """ConfigError naming the first parameter whose shape differs between `base` and `config`."""
    first = first_difference(_shapes(base), _shapes(config))
    if first is not None:
        name, theirs, ours = first
        raise ConfigError(
            f"{where}: parameter {name} is {theirs} there but {ours} in this config; warm start "
            "needs the same model shapes (start from the run's config.json and change training "
            "fields only)"
        )


def _export_module(where: str):
    try:
        from umv2_jax import export
    except ImportError:
        raise ConfigError(
            f"{where}: an exported directory needs umv2_jax.export, which this install lacks; "
            "warm start from the run directory instead"
        ) from None
    if not hasattr(export, "load_pretrained"):
        raise ConfigError(f"{where}: umv2_jax.export has no load_pretrained")
    return export


def _run_config(workdir: str, where: str):
    from umv2_jax.config import config_from_dict

    path = os.path.join(workdir, CONFIG_FILE)
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{where}: {path} is missing or unreadable") from None
    data.pop("mesh", None)  # the base run's mesh says nothing about this machine
    return config_from_dict(data)


def _shapes(config) -> dict[str, Any]:
    """{"params": …, "rest": …} ShapeDtypeStruct pure dicts of `config`'s model, in loop layout."""
    from flax import nnx

    from umv2_jax.models.transformer import Transformer, convert_block_tree, segment_layout
    from umv2_jax.training.state import ModelParts

    model = config.model
    abstract = nnx.eval_shape(lambda: Transformer(model, nnx.Rngs(0)))
    _, params, rest = ModelParts.split(abstract)
    loop = tuple((i,) for i in range(model.num_layers))
    layout = segment_layout(model)
    for tree in (params, rest):
        if "blocks" in tree:
            tree["blocks"] = jax.eval_shape(
                lambda blocks: convert_block_tree(blocks, layout, loop), tree["blocks"]
            )
    return {"params": params, "rest": rest}


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    from umv2_jax.training.checkpoint import _path_name

    return {
        _path_name(path).lstrip("."): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def first_difference(base: Any, new: Any) -> tuple[str, str, str] | None:
    """(name, base shape, new shape) of the first parameter (then non-trainable variable) whose
    shape differs or that one side lacks, in the new model's order; None when all fit."""
    for item in ("params", "rest"):
        theirs, ours = _flat_shapes(base[item]), _flat_shapes(new[item])
        for name, shape in ours.items():
            if theirs.get(name) != shape:
                there = list(theirs[name]) if name in theirs else "absent"
                return f"{item}.{name}", str(there), str(list(shape))
        for name in theirs:
            if name not in ours:
                return f"{item}.{name}", str(list(theirs[name])), "absent"
    return None


def initial_state(config, setup, source: InitSource) -> tuple[dict, dict]:
    """(train state at step 0, rest): `source`'s parameters, a fresh optimizer state for them
    (`setup.optimizer.init`, on the setup's shardings) and step 0."""
    import jax.numpy as jnp

    params, rest = load(config, setup, source)
    shardings = setup.state_shardings
    opt_state = jax.jit(setup.optimizer.init, out_shardings=shardings["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    return {"params": params, "opt_state": opt_state, "step": step}, rest


def load(config, setup, source: InitSource) -> tuple[dict, dict]:
    """(params, rest) of `source` laid out like `setup`'s (its shardings), for the new run's step 0."""
    if source.kind == "hf":
        from umv2_jax import retrofit

        host_params = jax.device_get(setup.state["params"])
        params = retrofit.retrofit_params(host_params, config, source.path)
        rest = setup.rest
    elif source.kind == "export":
        # Read into this run's layout (an unscanned export regroups into a scanned config).
        layout = f"model.scan_layers={str(config.model.resolved_scan_layers).lower()}"
        loaded = _export_module(f"--init-from {source.path}").load_pretrained(
            source.path, setup.mesh, overrides=[layout]
        )
        params, rest = loaded[-2], loaded[-1]
    else:
        params, rest = restore_run(config, source)
    params = jax.tree.map(
        lambda x, target: np.asarray(x).astype(target.dtype), params, setup.state["params"]
    )
    params = jax.device_put(params, setup.state_shardings["params"])
    rest = jax.device_put(rest, setup.rest_shardings)
    return params, rest


def restore_run(config, source: InitSource) -> tuple[dict, dict]:
    """The run's parameters and `rest` at source.step, in `config`'s layout (host numpy)."""
    import orbax.checkpoint as ocp

    from umv2_jax.models.transformer import Transformer, convert_block_tree, segment_layout
    from umv2_jax.training import checkpoint as checkpoint_lib
    from umv2_jax.training.state import ModelParts

    where = f"--init-from {source}"
    base = _run_config(source.path, where)
    step_dir = os.path.abspath(os.path.join(source.path, CHECKPOINTS, str(source.step)))
    reason = checkpoint_lib.verify_checksums(step_dir)
    if reason is not None:
        raise CheckpointError(f"{where}: checkpoint {step_dir} is unreadable ({reason})")
    from flax import nnx

    abstract = nnx.eval_shape(lambda: Transformer(base.model, nnx.Rngs(0)))
    _, params_shapes, rest_shapes = ModelParts.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree
    )
    items = {"state": ({"params": target(params_shapes)}, True)}
    if jax.tree.leaves(rest_shapes) and os.path.isdir(os.path.join(step_dir, "rest")):
        items["rest"] = (target(rest_shapes), False)
    restored = {}
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        for item, (tree, partial) in items.items():
            args = ocp.args.PyTreeRestore(
                item=tree,
                restore_args=ocp.checkpoint_utils.construct_restore_args(tree),
                partial_restore=partial,
            )
            with checkpoint_lib._quiet_orbax():
                restored[item] = checkpointer.restore(os.path.join(step_dir, item), args=args)
    except Exception as error:  # noqa: BLE001 orbax/tensorstore raise many types
        raise CheckpointError(
            f"{where}: checkpoint {step_dir} is unreadable ({checkpoint_lib._summarize(error)})"
        ) from None
    finally:
        checkpointer.close()
    params = jax.device_get(restored["state"]["params"])
    rest = jax.device_get(restored.get("rest", rest_shapes))
    source_layout, target_layout = segment_layout(base.model), segment_layout(config.model)
    if source_layout != target_layout:
        for tree in (params, rest):
            if "blocks" in tree:
                tree["blocks"] = jax.device_get(
                    convert_block_tree(tree["blocks"], source_layout, target_layout)
                )
    return params, rest
