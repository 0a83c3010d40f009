"""A run directory that describes itself and is never mixed: its manifest, its lock, its state checks.

    WORKDIR/run.json     the manifest: run id, name, config, the steps of the finalized checkpoints,
                         the step reached and how the run last ended (written atomically)
    WORKDIR/train.lock   pid and host of the one process training into WORKDIR (flock'ed while held)

`RunDir` is the loop's handle on it, used as a context manager around a run:

    with RunDir(workdir, primary) as run:
        has_run = run.open(config, resume=...)  # lock, then check the directory's state (read-only)
        run.clear()                             # --no-resume: print each path, then delete it
        run.started(config, start_step)         # manifest written once the start step is known
        run.saved(step)                         # after each checkpoint save
        run.ended(step, preempted, total_steps)
    # leaving: the manifest records how the run ended, the lock is released

A resume never mixes two runs: a directory with metrics or a manifest but no checkpoint, or with
checkpoints but no config.json, stops with `RunDirError` (exit 2) saying how to continue or start
over. Only the primary process (process 0) writes files or takes the lock; every process runs the
read-only checks, so they all stop alike.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Callable
from typing import Any

from umv2_jax.config import Config, to_dict
from umv2_jax.errors import ConfigError, UserError, WriteError, describe_os_error
from umv2_jax.training import checkpoint as checkpoint_lib
from umv2_jax.training import metrics as metrics_lib

log = logging.getLogger("umv2_jax")

MANIFEST_FILE = "run.json"
LOCK_FILE = "train.lock"
CHECKPOINT_DIR = "checkpoints"  # as `checkpoint.Checkpointer` lays it out
TENSORBOARD_DIR = metrics_lib.TENSORBOARD_DIR
OVERWRITE_FLAG = "--overwrite-other-model"


class RunDirError(UserError):
    """A work directory a run cannot use as it is: locked by another process, or holding pieces of
    a run that do not fit together (e.g. metrics without checkpoints)."""


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the finalized checkpoints in WORKDIR/checkpoints (orbax renames a step directory
    into place when its save is finalized; in-flight saves are `<step>.orbax-checkpoint-tmp-*`)."""
    path = os.path.join(workdir, CHECKPOINT_DIR)
    try:
        names = os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(path, n)))


def read_manifest(workdir: str) -> dict[str, Any] | None:
    path = os.path.join(workdir, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict):
        raise RunDirError(
            f"{path} is unreadable; delete it (a resume rebuilds it from config.json and the "
            "checkpoints) or pass --no-resume to start over there"
        )
    return manifest


def write_json_atomically(path: str, data: Any) -> None:
    """Writes a temporary file beside `path`, syncs it, and renames it over `path`; WriteError if
    that fails (the temporary file is removed).

    On a full disk, where no new file can be written, the JSON is written over the old file's
    bytes instead, padded with spaces to its length (JSON allows trailing whitespace), if it fits:
    so a run stopped by a full disk can still record how it ended.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    text = json.dumps(data, indent=2)
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        _remove(tmp)
        compact = json.dumps(data, separators=(",", ":"))
        if error.errno not in (errno.ENOSPC, errno.EDQUOT) or not _write_in_place(path, compact):
            raise WriteError(path, error) from None


def _write_in_place(path: str, text: str) -> bool:
    """Overwrites `path`'s bytes with `text` padded to their length, allocating no new block."""
    data = text.encode()
    try:
        size = os.path.getsize(path)
        if len(data) > size:
            return False
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, data + b" " * (size - len(data)), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        return False
    return True


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def remove_stale_temporaries(workdir: str) -> list[str]:
    """Deletes the temporary files a killed run left beside its manifest, config and metrics
    (`run.json.tmp.<pid>`, …); only the lock holder calls this, so none of them is in use."""
    stale = []
    for name in (MANIFEST_FILE, checkpoint_lib.CONFIG_FILE, metrics_lib.METRICS_FILE):
        prefix = name + ".tmp"
        try:
            names = os.listdir(workdir)
        except OSError:
            return stale
        for entry in names:
            if entry.startswith(prefix):
                _remove(os.path.join(workdir, entry))
                stale.append(entry)
    return stale


def write_failed(error: WriteError, workdir: str, step: int | None = None) -> WriteError:
    """The one line for a run stopped by a file it could not write: what, why, what is kept."""
    reason = describe_os_error(error.error)
    if error.disk_full:
        free = shutil.disk_usage(workdir).free if os.path.isdir(workdir) else 0
        reason = f"no space left on the device ({free / 2**20:.1f} MiB free)"
        fix = "free disk space or use a --workdir on a larger disk, then resume"
    else:
        fix = "check the work directory, then resume"
    kept = checkpoint_steps(workdir)
    where = f" at step {step}" if step is not None else ""
    keeps = (
        f"kept the checkpoint of step {kept[-1]} in {os.path.join(workdir, CHECKPOINT_DIR)}"
        if kept
        else "no checkpoint was saved yet"
    )
    return WriteError(
        error.path,
        error.error,
        f"the run stopped{where}: could not write {error.path}: {reason}; {keeps}; {fix}",
    )


def divergence_advice(last_good: int | None, checkpoint_dir: str, first_save: int) -> str:
    """The second half of a divergence message: where the run can continue from, if anywhere."""
    if last_good is None:
        return (
            f"No checkpoint was saved before it (the first was due at step {first_save}); lower "
            "train.learning_rate or raise train.warmup_fraction and start over with --no-resume"
        )
    return (
        f"The last good checkpoint is step {last_good} in {checkpoint_dir}; lower "
        "train.learning_rate or raise train.warmup_fraction and resume"
    )


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class _Lock:
    """WORKDIR/train.lock: held with `flock` (released by the kernel when its process dies) and
    naming its holder's pid and host. A lock file left by a dead process of this host is taken over
    with a log line; one naming another host (where flock may not reach) is never taken over."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        if os.path.lexists(self.workdir) and not os.path.isdir(self.workdir):
            raise RunDirError(f"--workdir {self.workdir} is not a directory; pass a directory")
        try:
            os.makedirs(self.workdir, exist_ok=True)
        except OSError as error:
            raise RunDirError(
                f"cannot create the work directory {self.workdir} ({error.strerror}); "
                "pass a writable --workdir"
            ) from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise RunDirError(
                    f"cannot write {self.path} ({error.strerror}); pass a writable --workdir"
                ) from None
            flocked = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno in (errno.EAGAIN, errno.EACCES):
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise RunDirError(_in_use(self.workdir, holder)) from None
                flocked = False  # a filesystem without flock (ENOLCK, EOPNOTSUPP): the pid decides
            if not _same_file(fd, self.path):  # its holder released (unlinked) it meanwhile
                os.close(fd)
                continue
            holder = _read_holder(fd)
            if holder is not None and not self._stale(holder, flocked):
                os.close(fd)
                raise RunDirError(_in_use(self.workdir, holder))
            if holder is not None and holder.get("pid") != os.getpid():
                log.warning(
                    "took over the stale lock %s of pid %s on %s (that process is gone)",
                    self.path,
                    holder.get("pid"),
                    holder.get("host"),
                )
            me = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            self._fd = fd
            return

    @staticmethod
    def _stale(holder: dict[str, Any], flocked: bool) -> bool:
        """Whether a lock file whose flock we got was left by a process that is gone. On this host
        the flock decides (the kernel drops it when its process dies; a pid may be reused); without
        flock support the pid decides. Another host's lock is never taken over (cannot tell)."""
        pid, host = holder.get("pid"), holder.get("host")
        if host != socket.gethostname():
            return False
        if flocked or not isinstance(pid, int):
            return True
        return pid == os.getpid() or not _pid_alive(pid)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it, so no one can lock the old file
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _same_file(fd: int, path: str) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _in_use(workdir: str, holder: dict[str, Any] | None) -> str:
    holder = holder or {}
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    since = f" since {holder['since']}" if holder.get("since") else ""
    return (
        f"{workdir} is in use by another training process (pid {pid} on host {host}{since}); "
        f"wait for it or stop it, or use another --workdir (if that process is gone, delete "
        f"{os.path.join(workdir, LOCK_FILE)})"
    )


# --------------------------------------------------------------------------------------------------
# The state of a work directory, and the run's handle on it
# --------------------------------------------------------------------------------------------------


class _State:
    """What a work directory holds, read without writing anything."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.config_path = os.path.join(workdir, checkpoint_lib.CONFIG_FILE)
        self.has_config = os.path.isfile(self.config_path)
        self.saved_config: dict[str, Any] | None = None
        self.config_readable = True
        if self.has_config:
            try:
                with open(self.config_path) as handle:
                    self.saved_config = json.load(handle)
            except (OSError, ValueError):
                self.saved_config = None
            if not isinstance(self.saved_config, dict):
                self.saved_config, self.config_readable = None, False
        self.steps = checkpoint_steps(workdir)
        self.manifest = read_manifest(workdir)
        self.records = metrics_lib.read_metrics(workdir)

    def record_summary(self) -> str:
        steps = [r["step"] for r in self.records if isinstance(r.get("step"), int)]
        last = f", up to step {max(steps)}" if steps else ""
        return f"{len(self.records)} records{last}"


class RunDir:
    """The loop's handle on its work directory (see the module docstring)."""

    def __init__(self, workdir: str, primary: bool = True, echo: Callable[[str], None] = print):
        self.workdir = os.path.abspath(workdir)
        self.primary = primary
        self.echo = echo if primary else (lambda line: None)
        self._lock = _Lock(self.workdir)
        self._created = False
        self._manifest: dict[str, Any] | None = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if self._manifest is not None and self.primary:
                if exc is not None and self._manifest["status"] != "diverged":
                    interrupted = isinstance(exc, KeyboardInterrupt | SystemExit)
                    self._manifest["status"] = "interrupted" if interrupted else "failed"
                try:
                    self._write_manifest()
                except WriteError as error:
                    if exc is None:
                        raise
                    if not isinstance(exc, WriteError):  # else the disk is known to be full
                        log.warning("could not update %s: %s", MANIFEST_FILE, error)
        finally:
            self._lock.release()
            if self._created:
                try:
                    os.rmdir(self.workdir)  # only if the run stopped before writing anything
                except OSError:
                    pass

    # ---- start-up: lock, check, clear -------------------------------------------------------------

    def open(self, config: Config, *, resume: bool, overwrite_other_model: bool = False) -> bool:
        """Locks the directory (primary) and checks its state; True if it holds a run to resume.

        Raises RunDirError / ConfigError / CheckpointError (exit 2) before anything is written
        but the lock file (which leaving the `with` block removes again).
        """
        if self.primary:
            self._created = not os.path.lexists(self.workdir)
            self._lock.acquire()
        state = _State(self.workdir)
        if resume:
            return self._check_resume(state, config)
        self._check_overwrite(state, config, overwrite_other_model)
        self._state = state
        return False

    def _check_resume(self, state: _State, config: Config) -> bool:
        workdir = self.workdir
        if not state.config_readable:
            raise RunDirError(
                f"{state.config_path} does not hold a readable config (a JSON mapping); restore "
                "it, or pass --no-resume to start over there"
            )
        if state.steps and not state.has_config:
            copy = os.path.join(workdir, CHECKPOINT_DIR, str(state.steps[-1]), "config", "metadata")
            how = (
                f"restore it (cp {copy} {state.config_path})"
                if os.path.isfile(copy)
                else ("restore it")
            )
            raise RunDirError(
                f"{workdir} has checkpoints (steps {_join(state.steps)}) but no "
                f"{checkpoint_lib.CONFIG_FILE}; to continue that run {how}, or pass --no-resume "
                "to start over there"
            )
        if state.has_config:
            checkpoint_lib.check_compatible(workdir, config)  # CheckpointError on another model
        if not state.steps:
            manifest = state.manifest or {}
            if manifest.get("status") == "diverged":
                raise RunDirError(
                    f"the run in {workdir} diverged at step {manifest.get('diverged_at', '?')} "
                    "before its first checkpoint, so there is nothing to resume; change the config "
                    "(e.g. lower train.learning_rate) and pass --no-resume to start over there"
                )
            if manifest.get("checkpoints"):
                raise RunDirError(
                    f"{os.path.join(workdir, MANIFEST_FILE)} lists checkpoints at steps "
                    f"{_join(manifest['checkpoints'])} but {workdir}/{CHECKPOINT_DIR} holds none; "
                    "restore them to continue, or pass --no-resume to start over there"
                )
            if state.records:
                raise RunDirError(
                    f"{workdir} holds {metrics_lib.METRICS_FILE} ({state.record_summary()}) but "
                    "no checkpoint to resume from; pass --no-resume to start over there (deleting "
                    "them), or use a new --workdir"
                )
            return state.has_config
        latest = state.steps[-1]
        if config.train.steps < latest:
            raise ConfigError(
                f"config 'train.steps': {config.train.steps} is below the step of the latest "
                f"checkpoint in {workdir} ({latest}); pass --steps {latest} or more to continue "
                "that run, or --no-resume to start over"
            )
        return True

    def _check_overwrite(self, state: _State, config: Config, overwrite: bool) -> None:
        """--no-resume deletes a run; a run of another model only with --overwrite-other-model."""
        if overwrite:
            return
        if not state.config_readable:
            raise RunDirError(
                f"{state.config_path} is unreadable, so {self.workdir} may hold a run of another "
                f"model; --no-resume would delete it: add {OVERWRITE_FLAG} to do that, or use a "
                "new --workdir"
            )
        saved = state.saved_config or (state.manifest or {}).get("config")
        difference = _model_difference(saved, config) if isinstance(saved, dict) else None
        if difference:
            raise RunDirError(
                f"{self.workdir} holds a run of another model ({difference}); --no-resume would "
                f"delete it: add {OVERWRITE_FLAG} to do that, or use a new --workdir"
            )

    def clear(self) -> list[str]:
        """--no-resume: prints each path it deletes (with what it held), then deletes it."""
        if not self.primary:
            return []
        state = getattr(self, "_state", None) or _State(self.workdir)
        join = os.path.join
        candidates = [
            (
                join(self.workdir, CHECKPOINT_DIR),
                f"checkpoints at steps {_join(state.steps)}" if state.steps else "no checkpoint",
            ),
            (
                join(self.workdir, CHECKPOINT_DIR + "_unreadable"),
                "checkpoints set aside as unreadable",
            ),
            (join(self.workdir, TENSORBOARD_DIR), "TensorBoard events"),
            (join(self.workdir, "profile"), "jax.profiler traces"),
            (join(self.workdir, "wandb_run_id"), "the W&B run id (WORKDIR/wandb/ is kept)"),
            (join(self.workdir, metrics_lib.METRICS_FILE), state.record_summary()),
            (join(self.workdir, metrics_lib.PLOT_FILE), "loss plot"),
            (
                join(self.workdir, MANIFEST_FILE),
                f"run {(state.manifest or {}).get('run_id', '?')}",
            ),
            (join(self.workdir, checkpoint_lib.CONFIG_FILE), "the run's config"),
            (join(self.workdir, "tokenizer"), "the run's tokenizer"),
        ]
        removed = []
        for path, what in candidates:
            if not os.path.lexists(path):
                continue
            self.echo(f"--no-resume: deleting {path} ({what})")
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
            removed.append(path)
        if not removed:
            self.echo(f"--no-resume: {self.workdir} holds no previous run; nothing to delete")
        return removed

    # ---- the manifest -----------------------------------------------------------------------------

    def started(self, config: Config, start_step: int) -> None:
        """Writes the manifest once the run knows where it starts (after any restore)."""
        if not self.primary:
            return
        remove_stale_temporaries(self.workdir)
        previous = read_manifest(self.workdir) or {}
        self._manifest = {
            "run_id": previous.get("run_id") or _new_run_id(),
            "name": config.name,
            "created": previous.get("created") or _now(),
            "updated": _now(),
            "status": "running",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start_step": start_step,
            "step": start_step,
            "total_steps": config.train.steps,
            "checkpoints": checkpoint_steps(self.workdir),
            "metrics": metrics_lib.METRICS_FILE,
            "config": to_dict(config),
        }
        self._write_manifest()

    def saved(self, step: int) -> None:
        """After a checkpoint save: the manifest lists every checkpoint finalized so far (a save
        waits for the previous one to finalize; the last is listed when the run ends)."""
        if self._manifest is None:
            return
        self._manifest["step"] = step
        self._write_manifest()

    def diverged(self, step: int, during: str = "training") -> None:
        """The loss became non-finite at `step`: in its training step (the run reached the step
        before it) or in the evaluation after it (`during="evaluation"`)."""
        if self._manifest is None:
            return
        reached = step if during == "evaluation" else max(step - 1, 0)
        self._manifest.update(
            status="diverged", diverged_at=step, diverged_during=during, step=reached
        )
        self._write_manifest()

    def ended(self, step: int, preempted: bool, total_steps: int) -> None:
        if self._manifest is None:
            return
        status = "finished" if step >= total_steps else "preempted" if preempted else "stopped"
        self._manifest.update(status=status, step=step)

    def _write_manifest(self) -> None:
        assert self._manifest is not None
        self._manifest["checkpoints"] = checkpoint_steps(self.workdir)
        self._manifest["updated"] = _now()
        write_json_atomically(os.path.join(self.workdir, MANIFEST_FILE), self._manifest)


def _new_run_id() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]


def _join(steps: list[int]) -> str:
    return ", ".join(map(str, steps))


def _model_difference(saved: dict[str, Any], config: Config) -> str | None:
    """The first model/data field where a saved config differs from `config` (as for a resume)."""
    current = to_dict(config)
    for section in ("model", "data"):
        old, new = saved.get(section), current[section]
        if section == "model" and isinstance(old, dict):
            old = checkpoint_lib._layout_fields(old, scanned_default=False)
            new = checkpoint_lib._layout_fields(new, scanned_default=False)
        if old != new:
            return checkpoint_lib._first_difference(old or {}, new, section)
    return None
