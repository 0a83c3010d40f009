"""Orbax checkpoints of a run: train state, non-trainable variables, data iterator state, config.

Layout of a work directory:

    WORKDIR/config.json             the run's config (written once, checked on every resume)
    WORKDIR/checkpoints/<step>/     state/ (params, opt_state, step), rest/, data/ (iterator, JSON),
                                    config/ (JSON)

Saves are asynchronous; `close()` waits for the last one. Restoring takes the latest step; if that
checkpoint is unreadable (e.g. a truncated file) it says so and falls back to the previous one, and
if none can be read it raises `CheckpointError`: a run never silently starts afresh.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from umv2_jax.config import SCAN_MIN_LAYERS, CheckpointConfig, Config, to_dict
from umv2_jax.errors import CheckpointError

log = logging.getLogger("umv2_jax")
CONFIG_FILE = "config.json"


def check_compatible(workdir: str, config: Config) -> bool:
    """True if `workdir` holds a run; CheckpointError if that run's model or data differ.

    Called before anything is written, so a mismatched resume leaves the directory untouched.
    Training length, logging cadence and the like may change between runs; the model (shapes),
    the sequence length and the data source may not.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as handle:
            saved = json.load(handle)
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(
            f"{path} is unreadable; restore it or start in a new --workdir"
        ) from None
    current = to_dict(config)
    saved = {**saved, "model": _layout_fields(saved.get("model", {}), scanned_default=False)}
    current = {**current, "model": _layout_fields(current["model"], scanned_default=False)}
    for section in ("model", "data"):
        if saved.get(section) != current[section]:
            differing = _first_difference(saved.get(section, {}), current[section], section)
            raise CheckpointError(
                f"{workdir} holds a run with a different config ({differing}); "
                "use a new --workdir or pass --no-resume to start over there"
            )
    return True


def _layout_fields(model: dict[str, Any], scanned_default: bool) -> dict[str, Any]:
    """The model section as far as a checkpoint's layout goes: `scan_layers` resolved to whether
    the blocks are stacked (a run saved before the field existed was a loop), `remat` dropped (it
    changes what the backward recomputes, not what is stored)."""
    model = dict(model)
    model.pop("remat", None)
    scan = model.get("scan_layers", scanned_default)
    if scan == "auto":
        scan = model.get("num_layers", 0) >= SCAN_MIN_LAYERS
    model["scan_layers"] = bool(scan)
    return model


def _first_difference(saved: Any, current: Any, prefix: str) -> str:
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in sorted(set(saved) | set(current)):
            if saved.get(key) != current.get(key):
                return _first_difference(saved.get(key), current.get(key), f"{prefix}.{key}")
    return f"{prefix}: saved {saved!r}, now {current!r}"


def write_config(workdir: str, config: Config) -> None:
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(to_dict(config), handle, indent=2)
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for one run."""

    def __init__(self, workdir: str, options: CheckpointConfig):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=options.keep,
                enable_async_checkpointing=options.async_save,
                create=True,
            ),
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(
        self, step: int, state: Any, rest: Any, data_state: dict, config: Config, force=False
    ) -> bool:
        items = {
            "state": ocp.args.StandardSave(state),
            "data": ocp.args.JsonSave(data_state),
            "config": ocp.args.JsonSave(to_dict(config)),
        }
        if jax.tree.leaves(rest):  # orbax refuses empty trees; a dense model has no `rest`
            items["rest"] = ocp.args.StandardSave(rest)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore_latest(self, abstract_state: Any, abstract_rest: Any) -> tuple[int, Any, Any, dict]:
        """(step, state, rest, data_state) of the newest readable checkpoint."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        failures = []
        for step in reversed(steps):
            try:
                items = {
                    "state": ocp.args.StandardRestore(abstract_state),
                    "data": ocp.args.JsonRestore(),
                }
                if jax.tree.leaves(abstract_rest):
                    items["rest"] = ocp.args.StandardRestore(abstract_rest)
                restored = self.manager.restore(step, args=ocp.args.Composite(**items))
                _check_shapes(restored.state, abstract_state, step)
                rest = restored.rest if "rest" in items else abstract_rest
            except CheckpointError:
                raise
            except Exception as error:  # orbax/tensorstore raise many types for a damaged file
                reason = (
                    str(error).strip().splitlines()[0][:160] if str(error) else type(error).__name__
                )
                failures.append(step)
                log.warning(
                    "checkpoint at step %d in %s is unreadable (%s); trying the previous one",
                    step,
                    self.directory,
                    reason,
                )
                continue
            if failures:
                moved = self._set_aside(failures)
                log.warning(
                    "resumed from step %d because the checkpoint(s) at step(s) %s are unreadable "
                    "(moved to %s)",
                    step,
                    ", ".join(map(str, failures)),
                    moved,
                )
            return step, restored.state, rest, dict(restored.data)
        raise CheckpointError(
            f"every checkpoint in {self.directory} is unreadable (steps {steps}); "
            "delete the directory or use a new --workdir"
        )

    def _set_aside(self, steps: list[int]) -> str:
        """Moves unreadable step directories out of the way (kept for inspection, never deleted)."""
        target = self.directory + "_unreadable"
        os.makedirs(target, exist_ok=True)
        for step in steps:
            source = os.path.join(self.directory, str(step))
            if os.path.isdir(source):
                os.replace(source, os.path.join(target, f"{step}-{int(time.time())}"))
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _check_shapes(restored: Any, abstract: Any, step: int) -> None:
    got = jax.tree.map(lambda x: tuple(x.shape), restored)
    want = jax.tree.map(lambda x: tuple(x.shape), abstract)
    if got != want:
        raise CheckpointError(
            f"checkpoint at step {step} has shapes that do not match the config; "
            "use a new --workdir"
        )
