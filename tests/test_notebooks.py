"""The notebooks (notebooks/*.md, jupytext-paired with *.ipynb): each pair is in sync, and each
notebook executes without an error in a kernel of this interpreter (nbclient)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("*.md"))
# Every notebook executes in the default suite (each ≤ 2 minutes on 2 CPU cores: toy shapes).


def _cells(notebook) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def test_there_are_notebooks():
    assert SOURCES, "notebooks/*.md not found"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_ipynb_is_in_sync_with_its_markdown_source(source):
    jupytext = pytest.importorskip("jupytext")
    nbformat = pytest.importorskip("nbformat")
    paired = source.with_suffix(".ipynb")
    assert paired.is_file(), (
        f"{paired.name} missing: jupytext --to ipynb {source.relative_to(ROOT)}"
    )
    expected = _cells(jupytext.read(source))
    actual = _cells(nbformat.read(paired, as_version=4))
    assert actual == expected, (
        f"{paired.name} differs from {source.name}: jupytext --to ipynb {source.relative_to(ROOT)}"
    )


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_executes(source, monkeypatch):
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import NATIVE_KERNEL_NAME

    # The kernel is this interpreter (ipykernel's native spec) and imports this checkout.
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = jupytext.read(source)
    client = nbclient.NotebookClient(
        notebook,
        timeout=900,
        kernel_name=NATIVE_KERNEL_NAME,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    assert Path(sys.executable).exists()
    client.execute()  # raises CellExecutionError, naming the cell, when one fails
