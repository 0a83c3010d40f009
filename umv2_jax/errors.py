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
