"""Where the release reference cases live, for the tests that use them.

The cases ship beside the repository (`../shared/fixtures/release/`, SPEC §9.7), not in it. Outside
CI a checkout without them skips those tests; under CI (`CI` set) a missing case fails, so the
release-compatibility tests can never pass by being skipped.
"""

import os
from pathlib import Path

import numpy as np
import pytest

RELEASE_FIXTURES = Path(
    os.environ.get("UMV2_RELEASE_FIXTURES")
    or Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "release"
)


def load_release_case(name: str):
    """The arrays of `<name>.npz` (e.g. "small_sn"), or skip (fail under CI) when it is absent."""
    path = RELEASE_FIXTURES / f"{name}.npz"
    if not path.exists():
        message = f"release fixture {path} not found (set UMV2_RELEASE_FIXTURES to its folder)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return np.load(path)
