"""One path layer for data files: local paths and cloud URIs (`gs://`, `s3://`) through etils.epath.

    path = to_path("gs://bucket/corpus/train.jsonl", "data.source")   # epath.Path
    files = glob("gs://bucket/corpus/*.jsonl.gz", "data.source")       # sorted [epath.Path]

A URI works where its filesystem library is installed (`gs://` needs gcsfs, `s3://` s3fs); without
it, or for a scheme etils does not know, the caller gets a one-line ConfigError naming the key and
the fix, never a local folder named `gs:`. Local paths are expanded (`~`) and made absolute.
"""

from __future__ import annotations

import glob as glob_lib
import os
import re

from etils import epath

from umv2_jax.errors import ConfigError, DataError

# scheme → the package that gives etils its filesystem.
_SCHEMES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme(path: str) -> str | None:
    """'gs' for 'gs://b/x', None for a local path."""
    match = _URI.match(str(path))
    return match.group(1).lower() if match else None


def to_path(path: str | os.PathLike, key: str) -> epath.Path:
    """`path` as an epath.Path; ConfigError (one line, naming `key`) when its scheme cannot be read."""
    text = os.fspath(path)
    kind = scheme(text)
    if kind is None:
        return epath.Path(os.path.abspath(os.path.expanduser(text)))
    if kind not in _SCHEMES:
        raise ConfigError(
            f"config '{key}': '{text}' has the unknown scheme {kind}://; use a local path or one "
            f"of {', '.join(s + '://' for s in _SCHEMES)}"
        )
    result = epath.Path(text)
    try:
        result.exists()
    except ImportError:
        raise ConfigError(
            f"config '{key}': reading {kind}:// paths needs {_SCHEMES[kind]} (pip install "
            f"{_SCHEMES[kind]}); install it or copy the data to a local path"
        ) from None
    except Exception as error:  # credentials, network: the backend's own message, first line
        raise DataError(f"cannot reach '{text}' ({_first_line(error)}); fix {key}") from None
    return result


def glob(pattern: str, key: str) -> list[epath.Path]:
    """The files matching `pattern` (`*`, `?`, `[...]`, `**` for any depth), sorted by name."""
    text = os.fspath(pattern)
    if scheme(text) is None:
        local = os.path.abspath(os.path.expanduser(text))
        return [
            epath.Path(p) for p in sorted(glob_lib.glob(local, recursive=True)) if os.path.isfile(p)
        ]
    # Split at the first component with a wildcard: the folder before it, the pattern after it.
    parts = text.split("/")
    first = next((i for i, part in enumerate(parts) if glob_lib.has_magic(part)), len(parts))
    base = to_path("/".join(parts[:first]), key)
    if first == len(parts):
        return [base] if base.is_file() else []
    return sorted((p for p in base.glob("/".join(parts[first:])) if p.is_file()), key=str)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]
