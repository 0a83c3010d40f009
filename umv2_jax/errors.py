"""User-facing errors: each carries a one-line message that names the problem and the fix.

The CLI prints the message (no traceback) and exits with status 2. Internal errors are ordinary
exceptions and keep their traceback.
"""


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


SHOW_LIMIT = 80  # characters of a user's value echoed in a message


def show(value: object, limit: int = SHOW_LIMIT) -> str:
    """`repr(value)` for a message, cut to `limit` characters with the full length named (a
    100,000-character `--set` value or a 5,000-digit number is not echoed whole)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 1]}… ({len(text):,} characters)"
