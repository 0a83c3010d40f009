"""The files of a results directory: their paths and atomic JSON reads / writes.

    DIR/runs/<task>__<model>__seed<k>.json       run_path
    DIR/decode/<model>.json                      decode_path
    DIR/injection/<model>__seed<k>.json          injection_path

Shared by the runner (compare.run, which writes them) and the report (compare.report, which only
reads them), so neither imports the other. Imports nothing of the package.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def run_path(out: str, task: str, model: str, seed: int) -> str:
    return os.path.join(out, "runs", f"{task}__{model}__seed{seed}.json")


def decode_path(out: str, model: str) -> str:
    return os.path.join(out, "decode", f"{model}.json")


def injection_path(out: str, model: str, seed: int) -> str:
    return os.path.join(out, "injection", f"{model}__seed{seed}.json")


def write_json(path: str, data: Any) -> None:
    """Writes `data` to `path` atomically (a temporary file, then a rename); numpy values become
    plain numbers and lists."""
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump(data, handle, indent=1, default=_jsonable)
    os.replace(temporary, path)


def write_text(path: str, text: str) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def load_json(path: str) -> Any:
    with open(path) as handle:
        return json.load(handle)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value)} is not JSON serializable")
