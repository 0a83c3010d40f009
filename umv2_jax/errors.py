"""User-facing errors: each carries a one-line message that names the problem and the fix.

The CLI prints the message (no traceback) and exits with status 2. Internal errors are ordinary
exceptions and keep their traceback.
"""

import errno


class UserError(Exception):
    """Base class of the errors a user can fix by changing an input."""

    exit_code = 2


class ConfigError(UserError):
    """A config key, value or combination that is not allowed."""


class DataError(UserError):
    """A data source that is missing, malformed or too small."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt or incompatible with the config."""


class ResourceError(UserError):
    """A work directory, disk or memory that cannot hold the run (checked before it starts)."""


class WriteError(UserError):
    """A file of the run could not be written (a full disk, a directory made unwritable): raised by
    every writer of a run (metrics, TensorBoard, plot, manifest), in the training thread."""

    def __init__(self, path: str, error: OSError, message: str | None = None):
        self.path, self.error = path, error
        super().__init__(message or f"could not write {path} ({describe_os_error(error)})")

    @property
    def disk_full(self) -> bool:
        return self.error.errno in (errno.ENOSPC, errno.EDQUOT)


def describe_os_error(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


SHOW_LIMIT = 80  # characters of a user's value echoed in a message


def show(value: object, limit: int = SHOW_LIMIT) -> str:
    """`repr(value)` for a message, cut to `limit` characters with the full length named (a
    100,000-character `--set` value or a 5,000-digit number is not echoed whole)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 1]}… ({len(text):,} characters)"
