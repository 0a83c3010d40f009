"""The tokenizer a run was trained with, kept in its work directory.

    save(workdir, tokenizer)         # WORKDIR/tokenizer/identity.json (+ a copy of the file)
    check(workdir, tokenizer)        # DataError (one line) if the run used another tokenizer
    load(workdir, config)            # the run's tokenizer, from its own copy, for generate/evaluate

The identity (kind, file name, SHA-256 of the file, vocabulary size, special ids) is compared on
resume and by `generate`; the copy lets a run be sampled after the original file moved.
"""

from __future__ import annotations

import json
import os
import shutil

from umv2_jax.config import Config
from umv2_jax.data import tokenizers
from umv2_jax.errors import DataError, WriteError

DIRECTORY = "tokenizer"
IDENTITY = "identity.json"


def identity_path(workdir: str) -> str:
    return os.path.join(workdir, DIRECTORY, IDENTITY)


def saved_identity(workdir: str) -> dict | None:
    """The identity saved in `workdir`, or None (no tokenizer saved: runs before this existed)."""
    path = identity_path(workdir)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        raise DataError(f"{path} is unreadable; restore it or start in a new --workdir") from None


def check(workdir: str, tokenizer) -> None:
    """DataError if `workdir` holds a run trained with another tokenizer than `tokenizer`."""
    saved = saved_identity(workdir)
    if saved is not None:
        tokenizers.check_identity(saved, tokenizer.identity(), workdir)


def save(workdir: str, tokenizer) -> None:
    """Writes the identity and a copy of the tokenizer file atomically (process 0 only);
    WriteError naming the file (its temporary removed) if the disk refuses."""
    directory = os.path.join(workdir, DIRECTORY)
    identity = tokenizer.identity()
    temporaries = []
    try:
        os.makedirs(directory, exist_ok=True)
        if tokenizer.path is not None:
            copy = os.path.join(directory, os.path.basename(tokenizer.path))
            if not os.path.isfile(copy):
                temporaries.append(copy + ".tmp")
                shutil.copyfile(tokenizer.path, copy + ".tmp")
                os.replace(copy + ".tmp", copy)
        temporaries.append(identity_path(workdir) + ".tmp")
        with open(temporaries[-1], "w") as handle:
            json.dump({**identity, "spec": tokenizer.spec}, handle, indent=2)
        os.replace(temporaries[-1], identity_path(workdir))
    except OSError as error:
        for temporary in temporaries:
            if os.path.exists(temporary):
                os.remove(temporary)
        raise WriteError(
            temporaries[-1].removesuffix(".tmp") if temporaries else directory, error
        ) from None


def load(workdir: str, config: Config):
    """The run's tokenizer: its saved copy when there is one (checked against the identity),
    else the config's `data.tokenizer`."""
    data = config.data
    saved = saved_identity(workdir)
    spec = data.tokenizer
    if saved is not None and saved.get("file"):
        copy = os.path.join(workdir, DIRECTORY, saved["file"])
        if os.path.isfile(copy):
            spec = f"{saved['kind']}:{copy}"
    tokenizer = tokenizers.load_tokenizer(
        spec, bos=data.bos_token, eos=data.eos_token, pad=data.pad_token
    )
    if saved is not None:
        tokenizers.check_identity(saved, tokenizer.identity(), workdir)
    return tokenizer
