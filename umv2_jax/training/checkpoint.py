"""Orbax checkpoints of a run: train state, non-trainable variables, data iterator state, config.

Layout of a work directory:

    WORKDIR/config.json             the run's config (written once, checked on every resume)
    WORKDIR/checkpoints/<step>/     state/ (params, opt_state, step), rest/, data/ (JSON: every
                                    process's iterator state), config/ (JSON)

Multi-process: every process calls `save` (orbax writes each process's shards, process 0 commits
and checksums) and `restore_latest`. A checkpoint restores onto another mesh shape or process count
(orbax reads into the target shardings); each process gets its own iterator state back
(`_own_data_state`). Arrays the target cannot hold (another shape, a missing or extra array) are a
one-line CheckpointError naming the array and both shapes (`check_restorable`, from orbax's metadata
before any data is read), never an "unreadable" checkpoint moved aside.

Every step directory also holds `checksums.json`: the SHA-256 and size of each of its files,
computed in orbax's background thread after the data is finalized and before the step is committed
(so saves stay asynchronous; `close()` waits for the last one). Restoring takes the latest step and
verifies it against its checksums; if it does not match or orbax cannot read it (a flipped block, a
truncated or missing file) it says so in one line, moves it to `checkpoints_unreadable/` and falls
back to the previous one, and if none can be read it raises `CheckpointError`: a run never silently
starts afresh. A step without `checksums.json` (an older layout, or the file deleted) cannot be
verified: it is restored with a one-line warning, or refused under `checkpoint.require_checksums`.
A save that fails (a full disk) removes its partial directory, keeps the earlier
checkpoints and raises `CheckpointError`.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import shutil
import sys
import time
import traceback
from typing import Any

import jax
import orbax.checkpoint as ocp

from umv2_jax.config import SCAN_MIN_LAYERS, CheckpointConfig, Config, to_dict
from umv2_jax.errors import CheckpointError, WriteError

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
                f"{workdir} holds a run with a different config ({differing}); use a new "
                "--workdir, or pass --no-resume --overwrite-other-model to delete that run and "
                "start over there"
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
    """Writes WORKDIR/config.json atomically; WriteError (the temporary file removed) if it fails."""
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(tmp, "w") as handle:
            json.dump(to_dict(config), handle, indent=2)
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise WriteError(path, error) from None


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for one run, with a content checksum per step.

    `read_only=True` (generation, evaluation) never writes: an unreadable checkpoint is skipped
    with one line instead of being moved aside.
    """

    def __init__(self, workdir: str, options: CheckpointConfig, *, read_only: bool = False):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.read_only = read_only
        self.require_checksums = options.require_checksums
        self.checksum_seconds: list[float] = []  # per save, for measuring what checksums cost
        # Steps whose asynchronous save is in flight; orbax runs one at a time, in order.
        self._in_flight: collections.deque[int] = collections.deque()
        asynchronous = options.async_save and not read_only
        # Asynchronous saves checksum the step's files in orbax's background thread, after the
        # data is finalized and before the step directory is committed (renamed into place): a
        # committed step always carries its checksums, and the training thread never waits.
        self._orbax_errors = _OrbaxLogFilter()
        _install_unraisable_filter()  # a failed save's tensorstore callbacks report into stderr
        logging.getLogger("absl").addFilter(self._orbax_errors)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None if read_only else options.keep,
                enable_async_checkpointing=asynchronous,
                create=not read_only,
                read_only=read_only,
                async_options=(
                    ocp.AsyncOptions(post_finalization_callback=self._checksum_in_flight)
                    if asynchronous
                    else None
                ),
            ),
        )
        self._async = asynchronous

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(
        self, step: int, state: Any, rest: Any, data_state: dict, config: Config, force=False
    ) -> bool:
        """Starts saving `step` (asynchronously unless `checkpoint.async_save: false`).

        A save that fails (a full disk, a directory that became unwritable) raises CheckpointError
        here or at the next `save` / `wait` / `close`, after removing the partial step directory;
        the checkpoints saved before it are kept.
        """
        items = {
            "state": ocp.args.StandardSave(state),
            "data": ocp.args.JsonSave(_per_process(data_state)),  # every process's iterator
            "config": ocp.args.JsonSave(to_dict(config)),
        }
        if jax.tree.leaves(rest):  # orbax refuses empty trees; a dense model has no `rest`
            items["rest"] = ocp.args.StandardSave(rest)
        self.wait()  # orbax waits for the previous save anyway; this names its step if it failed
        self._in_flight.append(step)
        try:
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
            if not self._async:
                self._checksum_step(os.path.join(self.directory, str(step)))
                self._in_flight.clear()
        except Exception as error:  # noqa: BLE001 orbax/tensorstore raise many types
            raise self._save_failed(step, error) from None
        return saved

    def restore_latest(self, abstract_state: Any, abstract_rest: Any) -> tuple[int, Any, Any, dict]:
        """(step, state, rest, data_state) of the newest readable checkpoint.

        A step is readable when its files match its checksums (`checksums.json`; a step without
        one is restored with a one-line warning, or refused under `checkpoint.require_checksums`)
        and orbax can restore it into the abstract
        targets. Unreadable steps are reported in one line each and moved to `checkpoints_unreadable/`
        (left in place when read-only); orbax's own error output is summarized into that line.
        """
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        failures = []
        for step in reversed(steps):
            step_dir = os.path.join(self.directory, str(step))
            self._check_has_checksums(step, step_dir)
            reason = verify_checksums(step_dir)
            if reason is None:
                try:
                    restored, rest = self._restore(step, abstract_state, abstract_rest)
                except CheckpointError:
                    raise
                except Exception as error:  # noqa: BLE001 orbax/tensorstore raise many types
                    reason = _summarize(error)
            if reason is not None:
                failures.append((step, reason))
                continue
            self._report(failures, f"resumed from step {step}")
            return step, restored.state, rest, _own_data_state(dict(restored.data), step_dir)
        self._report(failures, "no earlier checkpoint is readable")
        raise CheckpointError(
            f"every checkpoint in {self.directory} is unreadable (steps {steps}); "
            "delete the directory or use a new --workdir"
        )

    def _check_has_checksums(self, step: int, step_dir: str) -> None:
        """A step without checksums.json cannot be verified: a one-line warning, or under
        `checkpoint.require_checksums` a CheckpointError (nothing moved or written)."""
        if os.path.isfile(os.path.join(step_dir, CHECKSUM_FILE)):
            return
        what = (
            f"checkpoint at step {step} in {self.directory} has no {CHECKSUM_FILE} (saved by an "
            "older version, or the file was deleted)"
        )
        if self.require_checksums:
            raise CheckpointError(
                f"{what} and checkpoint.require_checksums is set; restore the file, move the step "
                "directory away to resume from an earlier one, or pass "
                "--set checkpoint.require_checksums=false to load it unverified"
            )
        log.warning(
            "warning: %s: its files cannot be verified, so damage to them may go unnoticed; "
            "--set checkpoint.require_checksums=true refuses such checkpoints",
            what,
        )

    def wait(self) -> None:
        """Waits for the save in flight; CheckpointError if it failed."""
        step = self._in_flight[0] if self._in_flight else None
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001
            raise self._save_failed(step, error) from None
        if jax.process_index() != 0:
            # Process 0 commits (and checksums) each step; orbax runs the post-finalization
            # callback there only, so the other processes are done once the wait returns.
            self._in_flight.clear()
        if self._in_flight:  # orbax logged the failure and skipped the commit instead of raising
            raise self._save_failed(step, self._orbax_errors.first or "the save did not complete")

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
            logging.getLogger("absl").removeFilter(self._orbax_errors)

    # ---- internals ---------------------------------------------------------------------------------

    def _restore(self, step: int, abstract_state: Any, abstract_rest: Any) -> tuple[Any, Any]:
        step_dir = os.path.join(self.directory, str(step))
        check_restorable(os.path.join(step_dir, "state"), abstract_state, f"step {step}")
        if jax.tree.leaves(abstract_rest) and os.path.isdir(os.path.join(step_dir, "rest")):
            check_restorable(os.path.join(step_dir, "rest"), abstract_rest, f"step {step}")
        items = {
            "state": ocp.args.StandardRestore(abstract_state),
            "data": ocp.args.JsonRestore(),
        }
        if jax.tree.leaves(abstract_rest):
            items["rest"] = ocp.args.StandardRestore(abstract_rest)
        with _quiet_orbax():
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        _check_shapes(restored.state, abstract_state, step)
        return restored, (restored.rest if "rest" in items else abstract_rest)

    def _checksum_in_flight(self) -> None:
        """orbax's post-finalization callback: checksums the step being committed."""
        if not self._in_flight:
            return
        step = self._in_flight[0]
        pending = glob.glob(os.path.join(self.directory, f"{step}{TMP_MARKER}*"))
        self._checksum_step(pending[0] if pending else os.path.join(self.directory, str(step)))
        self._in_flight.popleft()

    def _checksum_step(self, step_dir: str) -> None:
        if jax.process_index() != 0:
            return
        start = time.perf_counter()
        write_checksums(step_dir)
        self.checksum_seconds.append(time.perf_counter() - start)

    def _save_failed(self, step: int | None, error: Any) -> CheckpointError:
        """Removes partial step directories; the one-line error for a failed save."""
        self._in_flight.clear()
        partials = glob.glob(os.path.join(self.directory, f"*{TMP_MARKER}*"))
        for partial in partials if jax.process_index() == 0 else ():  # process 0 owns the files
            shutil.rmtree(partial, ignore_errors=True)
        try:
            self.manager.reload()
        except Exception:  # noqa: BLE001 the directory itself may be gone
            pass
        kept = [s for s in self._existing_steps() if step is None or s < step]
        text = error if isinstance(error, str) else str(error)
        if not isinstance(error, str) and "No space left" not in text:
            text = _summarize(error)
        if "No space left" in text or "RESOURCE_EXHAUSTED" in text:
            free = shutil.disk_usage(self.directory).free if os.path.isdir(self.directory) else 0
            reason = f"no space left on the device ({free / 2**20:.1f} MiB free)"
            fix = "free disk space or use a --workdir on a larger disk, then resume"
        else:
            reason = text
            fix = "check the work directory, then resume"
        what = f"step {step}" if step is not None else "a checkpoint"
        keeps = f"kept step {kept[-1]}" if kept else "no earlier checkpoint exists"
        return CheckpointError(
            f"could not save the checkpoint of {what} in {self.directory}: {reason}; removed the "
            f"partial one, {keeps}; {fix}"
        )

    def _existing_steps(self) -> list[int]:
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(name) for name in os.listdir(self.directory) if name.isdigit())

    def _report(self, failures: list[tuple[int, str]], outcome: str) -> None:
        """One line per unreadable step (after setting them aside unless read-only)."""
        if not failures:
            return
        where = (
            "skipped" if self.read_only else f"moved to {self._set_aside([s for s, _ in failures])}"
        )
        for step, reason in failures:
            log.warning(
                "checkpoint at step %d in %s is unreadable (%s): %s and %s",
                step,
                self.directory,
                reason,
                where,
                outcome,
            )

    def _aside_dir(self) -> str:
        return self.directory + "_unreadable"

    def _set_aside(self, steps: list[int]) -> str:
        """Moves unreadable step directories out of the way (kept for inspection, never deleted)."""
        target = self._aside_dir()
        os.makedirs(target, exist_ok=True)
        for step in steps:
            source = os.path.join(self.directory, str(step))
            if os.path.isdir(source):
                os.replace(source, os.path.join(target, f"{step}-{int(time.time())}"))
        self.manager.reload()
        return target


# --------------------------------------------------------------------------------------------------
# Checksums: one SHA-256 per file of a step directory, in `<step>/checksums.json`
# --------------------------------------------------------------------------------------------------

CHECKSUM_FILE = "checksums.json"
TMP_MARKER = ".orbax-checkpoint-tmp"
STEP_METADATA = "_CHECKPOINT_METADATA"


def write_checksums(step_dir: str) -> dict[str, list]:
    """Hashes every file under `step_dir` and writes CHECKSUM_FILE there (atomically).

    Paths are stored relative to the step directory, with orbax's temporary suffixes removed, so
    the checksums written before the commit (rename) match the committed layout.
    """
    files = {}
    for path in _data_files(step_dir):
        relative = _committed_name(os.path.relpath(path, step_dir))
        files[relative] = [os.path.getsize(path), _sha256(path)]
    temporary = os.path.join(step_dir, CHECKSUM_FILE + ".tmp")
    with open(temporary, "w") as handle:
        json.dump({"algorithm": "sha256", "files": files}, handle, indent=0, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, os.path.join(step_dir, CHECKSUM_FILE))
    return files


def verify_checksums(step_dir: str) -> str | None:
    """None if `step_dir`'s files match its checksums (or it has none); else why not, in a phrase."""
    path = os.path.join(step_dir, CHECKSUM_FILE)
    if not os.path.isfile(path):
        return None  # saved before checksums existed: orbax's own checks are all there is
    try:
        with open(path) as handle:
            files = json.load(handle)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{CHECKSUM_FILE} is unreadable"
    for relative, (size, digest) in sorted(files.items()):
        file = os.path.join(step_dir, relative)
        if not os.path.isfile(file):
            return f"{relative} is missing"
        actual = os.path.getsize(file)
        if actual != size:
            return f"{relative} has {actual:,} bytes, {size:,} were saved"
        if _sha256(file) != digest:
            return f"{relative} does not match its checksum"
    return None


def _data_files(step_dir: str) -> list[str]:
    found = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            # orbax rewrites its step metadata (commit time) when it commits the step
            if root == step_dir and (name.startswith(CHECKSUM_FILE) or name == STEP_METADATA):
                continue
            found.append(os.path.join(root, name))
    return sorted(found)


def _committed_name(relative: str) -> str:
    return "/".join(part.split(TMP_MARKER)[0] for part in relative.split(os.sep))


def _sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()  # releases the GIL while hashing


# --------------------------------------------------------------------------------------------------
# orbax's error output: summarized, not printed
# --------------------------------------------------------------------------------------------------


class _OrbaxLogFilter(logging.Filter):
    """Drops orbax's warnings and errors from the `absl` logger (a failed background save logs
    each of its threads' tracebacks); keeps the first error's first line for the one-line report."""

    def __init__(self):
        super().__init__()
        self.first: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not _from_orbax(record):
            return True
        if self.first is None and record.levelno >= logging.ERROR:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                message = str(record.exc_info[1])
            self.first = _first_line(message)
        return False


def _from_orbax(record: logging.LogRecord) -> bool:
    """A record orbax logged (`absl.logging.exception` names absl's own file as the caller)."""
    if "orbax" in record.pathname or str(record.msg).startswith("[process="):
        return True
    error = record.exc_info[1] if record.exc_info else None
    frames = traceback.extract_tb(error.__traceback__) if error is not None else []
    return any("orbax" in frame.filename for frame in frames)


@contextlib.contextmanager
def _quiet_orbax():
    """Silences what a failing orbax restore prints: Python's stderr, orbax's log records, and the
    'Exception ignored' reports of its abandoned read coroutines and tensorstore callbacks (which
    can arrive after the restore returns, so that filter stays installed)."""
    _install_unraisable_filter()
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.CRITICAL)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    finally:
        absl_logger.setLevel(level)


_unraisable_filter_installed = False


def _install_unraisable_filter() -> None:
    global _unraisable_filter_installed
    if _unraisable_filter_installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _from_orbax_io(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    # A failed save's abandoned orbax tasks are reported by asyncio ("Task exception was never
    # retrieved", with their traceback) whenever they are garbage collected, often at exit, after
    # the one-line error: drop those records, and only those.
    logging.getLogger("asyncio").addFilter(_AbandonedOrbaxTaskFilter())
    _unraisable_filter_installed = True


class _AbandonedOrbaxTaskFilter(logging.Filter):
    """Drops asyncio's reports of orbax tasks whose exception nobody retrieved."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[1] is not None and _from_orbax(record))


def _from_orbax_io(unraisable) -> bool:
    """An exception of an abandoned orbax read (its coroutine, or a tensorstore callback into the
    closed event loop orbax ran it on)."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and "orbax" in code.co_filename:
        return True
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
    return any("orbax" in frame.filename or "tensorstore" in frame.filename for frame in frames)


def _summarize(error: BaseException) -> str:
    """orbax's and tensorstore's multi-line errors (whole specs, tracebacks) as one short phrase."""
    text = str(error) or type(error).__name__
    for marker in ("No space left on device", "Failed to write", "Error reading", "Error writing"):
        if marker in text:
            at = text.index(marker)
            return _first_line(text[at:])
    return _first_line(text.split(". See full TensorStore details")[0])


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return line if len(line) <= 200 else line[:197] + "..."


def _check_shapes(restored: Any, abstract: Any, step: int) -> None:
    got = jax.tree.map(lambda x: tuple(x.shape), restored)
    want = jax.tree.map(lambda x: tuple(x.shape), abstract)
    if got != want:
        raise CheckpointError(
            f"checkpoint at step {step} has shapes that do not match the config; "
            "use a new --workdir"
        )


# --------------------------------------------------------------------------------------------------
# Restoring onto another mesh / process count: what can be resharded, and whose iterator is whose
# --------------------------------------------------------------------------------------------------

DATA_FORMAT = "per-process"


def check_restorable(item_dir: str, abstract: Any, what: str) -> None:
    """CheckpointError unless every array saved in `item_dir` can be restored into `abstract`.

    orbax restores an array into any target sharding (another mesh shape, another process count:
    each process reads the pieces its devices hold), but not into another shape; it would say so
    without naming the array, after reading. This reads orbax's metadata only (shapes, no data) and
    names the first array whose saved shape differs from the target's, or that one side lacks, and
    checks that each target sharding can hold its array. Unreadable metadata is left to the
    restore, which reports the checkpoint as unreadable.
    """
    try:
        saved = ocp.StandardCheckpointHandler().metadata(ocp.path.step.epath.Path(item_dir)).tree
        saved_shapes = {
            _path_name(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]
        }
    except Exception:  # noqa: BLE001 a damaged checkpoint: the restore itself reports it
        return
    target = jax.tree_util.tree_flatten_with_path(abstract)[0]
    target.sort(key=lambda entry: not _path_name(entry[0]).startswith(".params"))  # params first
    fix = "restore with the config the run was saved with (its config.json) or use a new --workdir"
    item = os.path.basename(item_dir.rstrip("/"))
    wanted = {_path_name(path) for path, _ in target}
    for path, leaf in target:
        name = _path_name(path)
        shape = tuple(leaf.shape)
        if name not in saved_shapes:
            extra = sorted(set(saved_shapes) - wanted, key=_params_first)
            instead = f" (it holds {extra[0]} instead)" if extra else ""
            raise CheckpointError(
                f"checkpoint at {what} has no array {item}{name} of shape {shape} that the config "
                f"builds{instead}; {fix}"
            )
        if saved_shapes[name] != shape:
            raise CheckpointError(
                f"checkpoint at {what}: array {item}{name} was saved with shape "
                f"{saved_shapes[name]} but the config builds {shape}; {fix}"
            )
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            try:
                sharding.shard_shape(shape)
            except ValueError:
                raise CheckpointError(
                    f"checkpoint at {what}: array {item}{name} of shape {shape} cannot be split "
                    f"as {sharding.spec} over mesh {dict(sharding.mesh.shape)}; change the config's "
                    "mesh (or mesh.rules) so that its axes divide the array"
                ) from None
    extra = sorted(set(saved_shapes) - wanted, key=_params_first)
    if extra:
        raise CheckpointError(
            f"checkpoint at {what} holds array {item}{extra[0]} of shape {saved_shapes[extra[0]]} "
            f"that the config does not build; {fix}"
        )


def _params_first(name: str) -> tuple[bool, str]:
    return not name.startswith(".params"), name


def _path_name(path: tuple) -> str:
    """A tree path as `.a.b.0` whatever the container types (orbax's metadata stores the train
    state's tuples and named tuples with the same keys and indices as the live tree)."""
    parts = []
    for key in path:
        for attribute in ("key", "idx", "name"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "".join(f".{part}" for part in parts)


def _per_process(data_state: dict) -> dict:
    """Every process's data-iterator state, gathered onto each (orbax writes it from process 0):
    `{"format": "per-process", "processes": [state of process 0, state of process 1, ...]}`."""
    count = jax.process_count()
    if count == 1:
        states = [data_state]
    else:
        import numpy as np
        from jax.experimental import multihost_utils

        encoded = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
        lengths = multihost_utils.process_allgather(np.asarray([encoded.size], np.int32))
        padded = np.zeros(int(np.max(lengths)), np.uint8)
        padded[: encoded.size] = encoded
        rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(count, -1)
        sizes = np.asarray(lengths).reshape(count)
        states = [json.loads(bytes(row[:size])) for row, size in zip(rows, sizes)]
    return {"format": DATA_FORMAT, "processes": states}


def _own_data_state(saved: dict, step_dir: str) -> dict:
    """This process's iterator state from a checkpoint's data item.

    Same process count: its own entry. Another count: per-row states (the text pipeline's) are
    merged, other entries must agree (task streams walk one global stream), else CheckpointError. A checkpoint from before per-process entries holds one shared state.
    """
    if saved.get("format") != DATA_FORMAT:
        return saved
    states = saved["processes"]
    if len(states) == jax.process_count():
        return states[jax.process_index()]
    if all(state == states[0] for state in states):
        return states[0]
    if all(isinstance(state, dict) and isinstance(state.get("rows"), dict) for state in states):
        # Text pipelines keep one entry per global batch row: the union is the global state,
        # from which each process of the new count takes its rows.
        merged = dict(states[0])
        merged["rows"] = {row: entry for state in states for row, entry in state["rows"].items()}
        return merged
    raise CheckpointError(
        f"checkpoint {step_dir} was saved by {len(states)} processes whose data iterators are at "
        f"different positions; resume it with {len(states)} processes"
    )
