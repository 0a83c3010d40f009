"""Byte-level language modelling on the embedded Shakespeare (docs/evaluation.md task 6), as a task.

    task = make_task("shakespeare_lm", {})
    batch = task.batch(8, 128, seed=0, index=3, split="test")
        inputs   int32[B, S]   S consecutive bytes of the corpus
        targets  int32[B, S]   the next byte at every position (inputs shifted by one)
        loss_mask float32[B, S] all 1.0: every position is scored

Row b of batch (seed, index, split) is a window of S + 1 bytes starting at a uniformly drawn
offset of the split's text (the task's PCG64 stream for (seed, split, index)), so every model of a
seed reads the same windows. Split train reads the train works; split test reads the held-out
works (Hamlet, Henry V, The Tempest, Twelfth Night: `umv2_jax.data.shakespeare.VALIDATION_WORKS`),
text never trained on. The mean cross-entropy over all positions, in bits, is bits per byte.
Tokens are bytes [0, 256); the default vocabulary of 259 holds them. No slices.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from umv2_jax.data.tasks.base import Task

CORPUS_SPLITS = {"train": "train", "test": "validation"}


class ShakespeareLM(Task):
    """Next-byte prediction on Shakespeare windows; no parameters (the windows are the data)."""

    name: ClassVar[str] = "shakespeare_lm"
    SPLITS: ClassVar[tuple[str, ...]] = ("train", "test")
    bits_per_byte: ClassVar[bool] = True  # the runner reports mean CE in bits as bits/byte

    def _batch(self, rng, batch_size, seq_len, split, seed, index):
        from umv2_jax.data.tasks.needles import corpus_bytes

        text = np.frombuffer(corpus_bytes(CORPUS_SPLITS[split]), np.uint8)
        starts = rng.integers(0, len(text) - seq_len - 1, size=batch_size)
        windows = text[starts[:, None] + np.arange(seq_len + 1)[None, :]].astype(np.int32)
        return {
            "inputs": windows[:, :-1],
            "targets": windows[:, 1:],
            "loss_mask": np.ones((batch_size, seq_len), np.float32),
        }
