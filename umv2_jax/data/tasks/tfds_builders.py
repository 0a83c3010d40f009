"""Every task as a tfds dataset, so a cluster run can materialize it to ArrayRecord once.

    path = materialize("mqar", {"mix": [[256, 16]]}, seq_len=256, data_dir="/data/tfds",
                       examples={"train": 1_000_000, "test": 10_000}, seed=0)
    source = tfds.builder_from_directory(path).as_data_source(split="test")
    source[0]  # {"inputs": int32[S], "targets": int32[S], "loss_mask": float32[S], "slice/…": …}

Example k of a split is row k % ROWS_PER_BATCH of `task.batch(ROWS_PER_BATCH, seq_len, seed=seed,
index=k // ROWS_PER_BATCH, split=split)`, so the stored rows are exactly the generator's rows
(the trainer reads the generator directly by default; this is for runs that want files). Building
and reading need no TensorFlow (tensorflow-datasets 4.9.10 with file_format="array_record").
The builder config name encodes the task, its parameters, seq_len and seed (a short hash), so
different settings never overwrite each other in one data_dir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from umv2_jax.data.tasks import make_task

ROWS_PER_BATCH = 64
DATASET_VERSION = "1.0.0"


@dataclasses.dataclass(kw_only=True)
class TaskBuilderConfig(tfds.core.BuilderConfig):
    """Which task, with which parameters, sequence length, seed and split sizes."""

    task: str = "mqar"
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    seq_len: int = 256
    seed: int = 0
    examples: dict[str, int] = dataclasses.field(default_factory=lambda: {"train": 1024})


class TaskDataset(tfds.core.GeneratorBasedBuilder):
    """A synthetic task of umv2_jax.data.tasks, materialized row by row."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Rows of umv2_jax.data.tasks generators."}
    BUILDER_CONFIGS = [TaskBuilderConfig(name="mqar_default")]

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        task = make_task(config.task, config.params)
        sample = task.batch(1, config.seq_len, seed=config.seed, index=0, split=task.splits()[0])
        features = {
            key: tfds.features.Tensor(shape=value.shape[1:], dtype=value.dtype)
            for key, value in sample.items()
        }
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"umv2_jax task {config.task} with parameters {json.dumps(task.params())}, "
                f"seq_len {config.seq_len}, seed {config.seed}."
            ),
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        config = self.builder_config
        return {
            split: self._generate_examples(split, count) for split, count in config.examples.items()
        }

    def _generate_examples(self, split: str, count: int) -> Iterator:
        config = self.builder_config
        task = make_task(config.task, config.params)
        for index in range(-(-count // ROWS_PER_BATCH)):
            batch = task.batch(
                ROWS_PER_BATCH, config.seq_len, seed=config.seed, index=index, split=split
            )
            for row in range(min(ROWS_PER_BATCH, count - index * ROWS_PER_BATCH)):
                key = index * ROWS_PER_BATCH + row
                yield f"{key:010d}", {name: value[row] for name, value in batch.items()}


def config_name(task: str, params: Mapping[str, Any] | None, seq_len: int, seed: int) -> str:
    """e.g. `mqar_s256_seed0_1a2b3c4d`: readable, and distinct for distinct settings."""
    resolved = make_task(task, dict(params or {})).params()
    digest = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:8]
    return f"{task}_s{seq_len}_seed{seed}_{digest}"


def materialize(
    task: str,
    params: Mapping[str, Any] | None,
    seq_len: int,
    data_dir: str | Path,
    examples: Mapping[str, int],
    seed: int = 0,
) -> Path:
    """Builds the dataset (ArrayRecord) in data_dir and returns its version folder."""
    make_task(task, dict(params or {})).check_seq_len(seq_len)  # ConfigError before any file
    for split, count in examples.items():
        if count < 1:
            raise ValueError(f"examples[{split!r}] must be >= 1, got {count}")
    config = TaskBuilderConfig(
        name=config_name(task, params, seq_len, seed),
        task=task,
        params=dict(params or {}),
        seq_len=seq_len,
        seed=seed,
        examples=dict(examples),
    )
    builder = TaskDataset(config=config, data_dir=str(data_dir))
    builder.download_and_prepare()
    return Path(builder.data_dir)


def as_numpy(example: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A stored example as plain numpy arrays (tfds data sources may give other array types)."""
    return {key: np.asarray(value) for key, value in example.items()}
