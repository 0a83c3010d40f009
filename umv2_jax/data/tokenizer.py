"""Byte-level tokenizer: UTF-8 bytes are ids 0..255, then three special tokens.

    ids = encode("To be, or not to be")       # int32[19]
    text = decode(ids)                         # "To be, or not to be"

Vocabulary (VOCAB_SIZE = 259, the default `ModelConfig.vocab_size`):
    0..255  one UTF-8 byte each
    256     BOS  begins a document; the packer puts one before every document
    257     EOS
    258     PAD  fills the tail of a sequence that ran out of text; its targets get loss_mask 0

A byte vocabulary needs no trained model file, handles any text and any language, and makes
bits-per-byte the natural metric.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

BYTE_VOCAB = 256
BOS = 256
EOS = 257
PAD = 258
VOCAB_SIZE = 259
SPECIAL_TOKENS = {"<bos>": BOS, "<eos>": EOS, "<pad>": PAD}


def encode(text: str, *, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    """Encodes `text` as its UTF-8 bytes: int32[len(utf-8 bytes) + add_bos + add_eos]."""
    body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
    if not (add_bos or add_eos):
        return body
    pieces = []
    if add_bos:
        pieces.append(np.array([BOS], np.int32))
    pieces.append(body)
    if add_eos:
        pieces.append(np.array([EOS], np.int32))
    return np.concatenate(pieces)


def decode(ids: Iterable[int] | np.ndarray) -> str:
    """Decodes ids (any shape, flattened) to text.

    Special tokens and any id outside 0..255 (e.g. the padded tail of the model's vocabulary) are
    dropped; byte sequences that are not valid UTF-8 become U+FFFD, so decoding never raises.
    """
    array = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"decode expects integer ids, got dtype {array.dtype}")
    kept = array[(array >= 0) & (array < BYTE_VOCAB)].astype(np.uint8)
    return kept.tobytes().decode("utf-8", errors="replace")
