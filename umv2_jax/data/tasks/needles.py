"""Needles in real text (docs/evaluation.md task 3): byte-level Shakespeare haystacks with planted facts.

A row is one example of length L (a context length from `lengths`), left-aligned, PAD after:

    [ haystack bytes with the needle(s) planted … ][ question ][ answer ]
                 ^ the queried needle at depth d (a fraction of the haystack; 0 = its start)

The haystack is a random stretch of the embedded Shakespeare corpus (`umv2_jax/data/prepared`),
from the train works for split train and from the held-out validation works (Hamlet, Henry V,
The Tempest, Twelfth Night) for split test, so test haystacks are text never trained on. Needles
are inserted after a whitespace byte at or after their position. Exact match is of the whole
answer (`metrics.sequence_exact_match`): its bytes follow the question in the input (teacher
forcing) and each is a target one position earlier (loss_mask 1). The answer string occurs
exactly once in the text before the question (rows where the corpus happens to contain it are
drawn again).

    needle_passkey     " The pass key is 71432. Remember it. "  →  "What is the pass key? …" 71432
    needle_multikey    four " The value of key QXZP is 4K8J2M. " needles (distinct keys and
                       values), one queried; the other three at uniform random depths
    variable_tracking  " VAR ABCDE = 12345. " then hops × " VAR FGHIJ = VAR ABCDE. " (each link
                       after the previous, at uniform depths after d), plus `distractors` chains
                       with other names and values; asks the value of the chain's last variable

Rows cycle through the grid lengths × depths (row r = index·B + b takes grid cell r mod size).
Slices: depth (percent of the haystack, int), length (L); variable_tracking adds hops.
aux/answer: 0 at the answer's positions, -1 elsewhere (one answer per row).
Tokens are bytes [0, 256) and PAD 258, so the default model vocabulary of 259 holds them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import numpy as np

from umv2_jax.data.tasks.base import Task, empty_batch
from umv2_jax.errors import DataError

MIN_HAYSTACK = 16  # bytes of real text an example keeps at least
_UPPER = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)
_DIGITS = np.frombuffer(b"0123456789", np.uint8)
_ALNUM = np.concatenate([_UPPER, _DIGITS])


@dataclasses.dataclass(frozen=True)
class _Needles(Task):
    """Shared parameters:
    lengths  context lengths L to cycle through; () = data.seq_len (default ())
    depths   depths d of the queried needle, fractions of the haystack in [0, 1]
             (default (0, 0.25, 0.5, 0.75, 1))
    """

    SLICES: ClassVar[tuple[str, ...]] = ("depth", "length")
    AUX: ClassVar[tuple[str, ...]] = ("answer",)

    lengths: tuple[int, ...] = ()
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)

    def min_seq_len(self) -> int:
        return max(self.lengths, default=self._longest_fixed() + MIN_HAYSTACK)

    def _check(self) -> None:
        if not self.depths:
            self._fail("depths", "is empty; give at least one depth in [0, 1]")
        for depth in self.depths:
            if not 0 <= depth <= 1:
                self._fail(
                    "depths",
                    f"{depth} is outside the haystack: depths are fractions of it, in [0, 1] "
                    "(0 = its start, 1 = its end)",
                )
        need = self._longest_fixed() + MIN_HAYSTACK
        for length in self.lengths:
            if length < need:
                self._fail(
                    "lengths",
                    f"{length} cannot hold the needles, question and answer ({self._longest_fixed()}"
                    f" bytes) plus {MIN_HAYSTACK} bytes of haystack; use lengths >= {need}",
                )

    def _batch(self, rng, batch_size, seq_len, split, seed, index):
        text = corpus_bytes("train" if split == "train" else "validation")
        lengths = self.lengths or (seq_len,)
        grid = [(length, depth) for length in lengths for depth in self.depths]
        batch = empty_batch(batch_size, seq_len, self.pad_id, self.SLICES)
        batch["aux/answer"] = np.full((batch_size, seq_len), -1, np.int32)
        for row in range(batch_size):
            length, depth = grid[(index * batch_size + row) % len(grid)]
            for _ in range(100):
                example = self._example(rng, text, length, depth)
                if example is not None:
                    break
            else:  # a corpus that keeps containing the answer string: not this one
                raise DataError(f"task {self.name}: could not plant a unique answer in 100 tries")
            context, question, answer, extra = example
            tokens = np.frombuffer(context + question + answer, np.uint8)
            batch["inputs"][row, : tokens.size] = tokens
            at = len(context) + len(question) - 1 + np.arange(len(answer))
            batch["targets"][row, at] = np.frombuffer(answer, np.uint8)
            batch["loss_mask"][row, at] = 1.0
            batch["aux/answer"][row, at] = 0
            batch["slice/depth"][row, at] = int(round(depth * 100))
            batch["slice/length"][row, at] = length
            for name, value in extra.items():
                batch[f"slice/{name}"][row, at] = value
        return batch

    # Subclasses: the needles for one example.
    def _longest_fixed(self) -> int:
        """The most bytes needles + question + answer can take."""
        raise NotImplementedError

    def _example(self, rng, text: bytes, length: int, depth: float):
        """(context, question, answer, extra slices) or None to draw again."""
        raise NotImplementedError

    def _plant(
        self, rng, text: bytes, haystack_length: int, needles: list[tuple[float, bytes]]
    ) -> bytes:
        """A random stretch of `text` of haystack_length bytes with each (depth, needle) inserted
        at that fraction of it (after the next whitespace byte); order kept for equal depths."""
        start = int(rng.integers(0, len(text) - haystack_length))
        haystack = text[start : start + haystack_length]
        cuts = []
        for depth, needle in needles:
            at = int(round(depth * haystack_length))
            space = _next_space(haystack, at)
            cuts.append((space, needle))
        cuts.sort(key=lambda cut: cut[0])  # stable: chain order survives equal positions
        pieces, previous = [], 0
        for at, needle in cuts:
            pieces += [haystack[previous:at], needle]
            previous = at
        pieces.append(haystack[previous:])
        return b"".join(pieces)


@dataclasses.dataclass(frozen=True)
class PasskeyNeedle(_Needles):
    """A 5-digit passkey (10000–99999). Parameters: lengths, depths (see _Needles)."""

    name: ClassVar[str] = "needle_passkey"

    def _longest_fixed(self) -> int:
        return len(_passkey_needle(b"00000")) + len(_PASSKEY_QUESTION) + 5

    def _example(self, rng, text, length, depth):
        answer = str(int(rng.integers(10000, 100000))).encode()
        needle = _passkey_needle(answer)
        haystack = length - len(needle) - len(_PASSKEY_QUESTION) - len(answer)
        context = self._plant(rng, text, haystack, [(depth, needle)])
        if context.count(answer) != 1:
            return None
        return context, _PASSKEY_QUESTION, answer, {}


@dataclasses.dataclass(frozen=True)
class MultiKeyNeedle(_Needles):
    """`needles` key → value needles (keys 4 capitals, values 6 capitals/digits), one queried.

    Parameters: needles (default 4), lengths, depths.
    """

    name: ClassVar[str] = "needle_multikey"

    needles: int = 4

    def _check(self) -> None:
        if self.needles < 1:
            self._fail("needles", f"must be >= 1, got {self.needles}")
        super()._check()

    def _longest_fixed(self) -> int:
        needle = len(_kv_needle(b"KKKK", b"VVVVVV"))
        return self.needles * needle + len(_kv_question(b"KKKK")) + 6

    def _example(self, rng, text, length, depth):
        keys = [_random_string(rng, _UPPER, 4) for _ in range(self.needles)]
        values = [_random_string(rng, _ALNUM, 6) for _ in range(self.needles)]
        if len(set(keys)) < self.needles or len(set(values)) < self.needles:
            return None
        needles = [(depth, _kv_needle(keys[0], values[0]))]
        needles += [(float(rng.random()), _kv_needle(k, v)) for k, v in zip(keys[1:], values[1:])]
        question, answer = _kv_question(keys[0]), values[0]
        haystack = length - sum(len(n) for _, n in needles) - len(question) - len(answer)
        context = self._plant(rng, text, haystack, needles)
        if context.count(answer) != 1:
            return None
        return context, question, answer, {}


@dataclasses.dataclass(frozen=True)
class VariableTracking(_Needles):
    """Chains `VAR A = v; VAR B = VAR A; …` (names 5 capitals, values 5 digits).

    Parameters: min_hops, max_hops (links after the value statement, default 2 and 4; each row
    draws its hops uniformly), distractors (other chains, default 2), lengths, depths.
    Slices: depth (of the value statement), length, hops.
    """

    name: ClassVar[str] = "variable_tracking"
    SLICES: ClassVar[tuple[str, ...]] = ("depth", "length", "hops")

    min_hops: int = 2
    max_hops: int = 4
    distractors: int = 2

    def _check(self) -> None:
        if not 1 <= self.min_hops <= self.max_hops:
            self._fail(
                "min_hops", f"need 1 <= min_hops <= max_hops, got {self.min_hops}, {self.max_hops}"
            )
        if self.distractors < 0:
            self._fail("distractors", f"must be >= 0, got {self.distractors}")
        super()._check()

    def _longest_fixed(self) -> int:
        chain = len(_value_statement(b"NNNNN", b"00000"))
        chain += self.max_hops * len(_link_statement(b"NNNNN", b"NNNNN"))
        return (1 + self.distractors) * chain + len(_vt_question(b"NNNNN")) + 5

    def _example(self, rng, text, length, depth):
        chains = 1 + self.distractors
        hops = rng.integers(self.min_hops, self.max_hops + 1, size=chains)
        names = [_random_string(rng, _UPPER, 5) for _ in range(int(hops.sum() + chains))]
        values = [str(int(rng.integers(10000, 100000))).encode() for _ in range(chains)]
        if len(set(names)) < len(names) or len(set(values)) < chains:
            return None
        needles, used = [], 0
        for chain in range(chains):
            chain_names = names[used : used + hops[chain] + 1]
            used += hops[chain] + 1
            first = depth if chain == 0 else float(rng.random())
            # The links follow the value statement: sorted uniform depths after it.
            after = np.sort(first + (1 - first) * rng.random(hops[chain]))
            needles.append((first, _value_statement(chain_names[0], values[chain])))
            for link, at in enumerate(after):
                needles.append(
                    (float(at), _link_statement(chain_names[link + 1], chain_names[link]))
                )
            if chain == 0:
                question = _vt_question(chain_names[-1])
        answer = values[0]
        haystack = length - sum(len(n) for _, n in needles) - len(question) - len(answer)
        context = self._plant(rng, text, haystack, needles)
        if context.count(answer) != 1:
            return None
        return context, question, answer, {"hops": int(hops[0])}


@functools.lru_cache(maxsize=2)
def corpus_bytes(split: str) -> bytes:
    """The embedded Shakespeare split ("train" or "validation") as one UTF-8 byte string."""
    import tensorflow_datasets as tfds

    from umv2_jax.data.sources import EMBEDDED_VERSION_DIR

    if not (EMBEDDED_VERSION_DIR / "dataset_info.json").is_file():
        raise DataError(
            f"the embedded Shakespeare dataset is missing from {EMBEDDED_VERSION_DIR}; reinstall "
            "umv2-jax or rebuild it with `python -m umv2_jax.data.build_shakespeare`"
        )
    source = tfds.builder_from_directory(str(EMBEDDED_VERSION_DIR)).as_data_source(split=split)
    pieces = []
    for position in range(len(source)):
        value = source[position]["text"]
        pieces.append(value if isinstance(value, bytes) else str(value).encode("utf-8"))
    return b"\n\n".join(pieces)


_PASSKEY_QUESTION = b"\nWhat is the pass key? The pass key is "


def _passkey_needle(passkey: bytes) -> bytes:
    return b" The pass key is " + passkey + b". Remember it. "


def _kv_needle(key: bytes, value: bytes) -> bytes:
    return b" The value of key " + key + b" is " + value + b". "


def _kv_question(key: bytes) -> bytes:
    return b"\nWhat is the value of key " + key + b"? The value of key " + key + b" is "


def _value_statement(name: bytes, value: bytes) -> bytes:
    return b" VAR " + name + b" = " + value + b". "


def _link_statement(name: bytes, source: bytes) -> bytes:
    return b" VAR " + name + b" = VAR " + source + b". "


def _vt_question(name: bytes) -> bytes:
    return b"\nWhat is the value of VAR " + name + b"? VAR " + name + b" = "


def _random_string(rng, alphabet: np.ndarray, length: int) -> bytes:
    return alphabet[rng.integers(0, alphabet.size, length)].tobytes()


def _next_space(text: bytes, at: int) -> int:
    """The position just after the first whitespace byte at or after `at` (or len(text))."""
    for position in range(at, len(text)):
        if text[position] in b" \n":
            return position + 1
    return len(text)
