"""The default suite's slow-variant list (tests/conftest.py SLOW_VARIANTS) names tests that exist:
a renamed test must not silently return to the default run or vanish from the slow one."""

from pathlib import Path

from tests.conftest import SLOW_VARIANTS

ROOT = Path(__file__).resolve().parents[1]


def test_every_slow_variant_names_an_existing_test_function():
    missing = []
    for node in SLOW_VARIANTS:
        path, _, name = node.partition("::")
        function = name.split("[", 1)[0]
        source = ROOT / path
        if not source.is_file() or f"def {function}(" not in source.read_text(encoding="utf-8"):
            missing.append(node)
    assert missing == []
