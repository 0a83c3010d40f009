"""Nothing a user needs lives outside the repository: no file points at the specification, evaluation
or architecture notes that once sat beside it (`../shared/...`, SPEC.md, EVAL.md, ARCHITECTURE.md,
"SPEC §n"); they are docs/model.md, docs/evaluation.md, docs/architecture.md and docs/kernels.md, and
every relative Markdown link of the README and docs/ resolves inside the clone."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(
    r"\.\./shared\b|shared/(?:fixtures|SPEC|EVAL|ARCHITECTURE)"
    r"|(?<![\w/])(?:SPEC|EVAL|ARCHITECTURE)\.md\b|\bSPEC (?:§|steps?\b)"
)
SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", "runs", "node_modules"}


def _text_files() -> list[Path]:
    """The repository's own text files: what git tracks or would track (a virtualenv, build output or
    anything else .gitignore names is not the project's text, and may not even be UTF-8)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if listed.returncode == 0:
        candidates = [REPO / line for line in listed.stdout.splitlines()]
    else:  # not a git checkout (an unpacked sdist): walk, skipping environments and build output
        candidates = [
            path
            for path in REPO.rglob("*")
            if not any(
                part in SKIP_DIRS
                or part.endswith(".egg-info")
                or (REPO / part / "pyvenv.cfg").exists()
                for part in path.relative_to(REPO).parts
            )
        ]
    return [
        p
        for p in candidates
        if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".yml", ".toml")
    ]


def test_the_pattern_catches_outside_references():
    for text in (
        "see ../shared/SPEC.md",
        "EVAL.md task 4",
        "(SPEC §9.7)",
        "SPEC step 4",
        "ARCHITECTURE.md",
    ):
        assert OUTSIDE.search(text), text
    for text in ("docs/model.md §9.7", "--workdir /mnt/shared/runs/x", "SPECIAL_TOKENS"):
        assert not OUTSIDE.search(text), text


def test_no_file_points_outside_the_repository():
    offending = []
    for path in _text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if path.name == "test_docs_links.py":
                continue
            if OUTSIDE.search(line):
                offending.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}")
    assert offending == []


@pytest.mark.parametrize("name", ["model.md", "evaluation.md", "architecture.md", "kernels.md"])
def test_the_docs_exist(name):
    assert (REPO / "docs" / name).stat().st_size > 1000


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_relative_markdown_links_resolve():
    broken = []
    for path in [REPO / "README.md", REPO / "DEVELOPERS.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in LINK.findall(path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            resolved = (path.parent / target).resolve()
            if not resolved.exists() or REPO not in (resolved, *resolved.parents):
                broken.append(f"{path.relative_to(REPO)} → {target}")
    assert broken == []
