"""One tokenizer interface over bytes, sentencepiece models and Hugging Face tokenizer.json files.

    tok = load_tokenizer("sentencepiece:shakespeare_bpe2048")   # "bytes", "hf:/x/tokenizer.json"
    ids = tok.encode("To be, or not to be")      # int32[n], no special tokens added
    ids_list = tok.encode_batch(texts)            # list of int32[n_i] (the libraries' batch calls)
    text = tok.decode(ids)                        # drops special ids and ids >= vocab_size
    lengths = tok.token_byte_lengths()            # int32[vocab_size]: UTF-8 bytes each id covers
    tok.identity()                                # JSON-able; check_identity compares two of them

Attributes: `kind` ("bytes" | "sentencepiece" | "hf"), `spec` (the `data.tokenizer` string),
`path` (absolute path of the file, None for bytes), `vocab_size` (every id is in
[0, vocab_size); the model's vocabulary may be padded beyond it), `bos_id`, `eos_id`, `pad_id`.

Specs (`data.tokenizer`): `bytes` (umv2_jax.data.tokenizer: ids 0..255 = UTF-8 bytes, BOS 256,
EOS 257, PAD 258); `sentencepiece:PATH` (a .model file; a bare name without "/" or extension,
e.g. `sentencepiece:shakespeare_bpe2048`, is a model shipped in prepared/tokenizers/);
`hf:PATH` (a `tokenizers` tokenizer.json). The libraries load only when their kind is used.

Special tokens: BOS, EOS and PAD default to the tokenizer's own (sentencepiece: bos_id(),
eos_id(), pad_id() when >= 0; hf: the first of HF_SPECIAL_CANDIDATES found in the vocabulary).
`data.bos_token` / `data.eos_token` / `data.pad_token` name others by their token string. The
three ids must differ unless the same token is named explicitly for both (e.g. pad = eos).

Byte lengths (bits-per-byte divides by their sum): bytes 1 per byte id; sentencepiece the
piece's UTF-8 length with "▁" as a space, byte-fallback pieces <0xNN> 1; hf by the pipeline's
decoding: ByteLevel (GPT-2) maps each character back to its byte, Metaspace like sentencepiece,
WordPiece strips "##", otherwise the token's UTF-8 length. BOS/EOS/PAD and control, unknown,
unused and special tokens are 0. The sum over a document's ids is its UTF-8 length exactly for
bytes, for byte-level BPE without add_prefix_space and for sentencepiece models with byte
fallback, identity normalization and no dummy prefix (the shipped one). Approximations: a dummy
prefix (add_dummy_prefix, Metaspace prepend, ByteLevel add_prefix_space) adds a space that is
not in the text (+1 byte per document); WordPiece does not count the spaces between words;
normalizers that change the text and unknown tokens (0 bytes) make the sum differ. Text that
spells a special token of an hf tokenizer (e.g. "<|endoftext|>") encodes to that token, as the
library does.

Errors are one line: ConfigError for a malformed spec or a missing library, DataError for a
missing, unreadable or malformed file and for missing, unknown or clashing special tokens.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from umv2_jax.data import tokenizer as byte_level
from umv2_jax.errors import ConfigError, DataError

KINDS = ("bytes", "sentencepiece", "hf")
# Shipped in the package (pyproject package-data); `__package__` is "umv2_jax.data".
SHIPPED_DIR = Path(str(resources.files(__package__) / "prepared" / "tokenizers"))
SHAKESPEARE_BPE = str(SHIPPED_DIR / "shakespeare_bpe2048.model")

# Default special tokens of an hf tokenizer: the first one in its vocabulary wins. GPT-2 style
# files have only <|endoftext|> (taken as EOS): name BOS and PAD with data.bos_token/pad_token.
HF_SPECIAL_CANDIDATES = {
    "BOS": ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "<BOS>", "[BOS]", "<|bos|>"),
    "EOS": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<EOS>", "[EOS]", "<|eos|>"),
    "PAD": ("<pad>", "<|pad|>", "<PAD>", "[PAD]", "<|padding|>"),
}

_ALLOWED_FORMS = "'bytes', 'sentencepiece:PATH' (a .model file) or 'hf:PATH' (a tokenizer.json)"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Tokenizer:
    """The interface (see the module docstring); `load_tokenizer` builds the implementations."""

    kind: str = ""  # "bytes" | "sentencepiece" | "hf"
    spec: str  # the data.tokenizer string it was loaded from
    path: str | None  # absolute path of the file; None for bytes
    vocab_size: int  # every id is in [0, vocab_size)
    sha256: str | None  # of the file's bytes; None for bytes
    bos_id: int
    eos_id: int
    pad_id: int

    def __init__(self, spec: str, path: str | None, vocab_size: int, sha256: str | None):
        self.spec = spec
        self.path = path
        self.vocab_size = int(vocab_size)
        self.sha256 = sha256
        self.bos_id = self.eos_id = self.pad_id = -1
        self._lengths: np.ndarray | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(spec={self.spec!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})"
        )

    def encode(self, text: str) -> np.ndarray:
        """The text's ids, int32[n]; no special tokens are added."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """encode() of each text (one batched library call where the library has one)."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of any integer ids (flattened); drops special ids and ids outside [0, vocab_size).

        Never raises on byte sequences that are not valid UTF-8 (they become U+FFFD).
        """
        return self._decode_kept(self._kept(ids))

    def decode_batch(self, batch: Sequence) -> list[str]:
        """decode() of each row of `batch` (a sequence of id sequences or a 2-D array)."""
        return self._decode_kept_batch([self._kept(ids) for ids in batch])

    def token_byte_lengths(self) -> np.ndarray:
        """int32[vocab_size]: UTF-8 bytes of the original text each id covers (0 for specials)."""
        if self._lengths is None:
            lengths = np.asarray(self._byte_lengths(), np.int32)
            lengths[[self.bos_id, self.eos_id, self.pad_id]] = 0
            self._lengths = lengths
        return self._lengths.copy()

    def identity(self) -> dict[str, Any]:
        """What a run records to check that it is resumed/evaluated with the same tokenizer."""
        return {
            "kind": self.kind,
            "file": None if self.path is None else Path(self.path).name,
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }

    # Implementations provide these.

    def _decode_kept(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _decode_kept_batch(self, batch: list[list[int]]) -> list[str]:
        return [self._decode_kept(ids) for ids in batch]

    def _byte_lengths(self) -> np.ndarray:
        raise NotImplementedError

    def _token_id(self, token: str) -> int | None:
        """The id of `token` in the vocabulary, or None."""
        raise NotImplementedError

    def _default_specials(self) -> dict[str, int | None]:
        raise NotImplementedError

    def _special_examples(self) -> list[str]:
        """A few special tokens of the vocabulary, for error messages."""
        return []

    def _kept(self, ids: Iterable[int] | np.ndarray) -> list[int]:
        if not (hasattr(ids, "__array__") or isinstance(ids, list | tuple)):
            ids = list(ids)  # a generator or other iterable
        array = np.asarray(ids).reshape(-1)
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"decode expects integer ids, got dtype {array.dtype}")
        array = array.astype(np.int64)
        keep = (array >= 0) & (array < self.vocab_size)
        keep &= ~np.isin(array, [self.bos_id, self.eos_id, self.pad_id])
        return array[keep].tolist()


class _BytesTokenizer(Tokenizer):
    kind = "bytes"

    def __init__(self, spec: str):
        super().__init__(spec, None, byte_level.VOCAB_SIZE, None)

    def encode(self, text: str) -> np.ndarray:
        return byte_level.encode(text)

    def _decode_kept(self, ids: list[int]) -> str:
        return byte_level.decode(np.asarray(ids, np.int64))

    def _byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, np.int32)
        lengths[: byte_level.BYTE_VOCAB] = 1
        return lengths

    def _token_id(self, token: str) -> int | None:
        return byte_level.SPECIAL_TOKENS.get(token)

    def _default_specials(self) -> dict[str, int | None]:
        return {"BOS": byte_level.BOS, "EOS": byte_level.EOS, "PAD": byte_level.PAD}

    def _special_examples(self) -> list[str]:
        return list(byte_level.SPECIAL_TOKENS)


class _SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, spec: str, path: str, data: bytes, sha256: str):
        spm = _import_library("sentencepiece", spec)
        try:
            processor = spm.SentencePieceProcessor(model_proto=data)
            size = processor.get_piece_size()
        except Exception as error:  # the library raises RuntimeError/OSError with long text
            raise DataError(
                f"tokenizer file {path} is not a sentencepiece model ({_first_line(error)}); "
                "fix data.tokenizer"
            ) from None
        if size <= 0:  # an empty protobuf parses as a model without pieces
            raise DataError(
                f"tokenizer file {path} is not a sentencepiece model (no pieces); "
                "fix data.tokenizer"
            )
        super().__init__(spec, path, size, sha256)
        self._sp = processor

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text, out_type=int), np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        if not texts:
            return []
        rows = self._sp.encode(list(texts), out_type=int)
        return [np.asarray(row, np.int32) for row in rows]

    def _decode_kept(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def _decode_kept_batch(self, batch: list[list[int]]) -> list[str]:
        return self._sp.decode(batch) if batch else []

    def _byte_lengths(self) -> np.ndarray:
        sp = self._sp
        lengths = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue
            if sp.is_byte(i):
                lengths[i] = 1
            else:
                lengths[i] = len(sp.id_to_piece(i).replace("▁", " ").encode("utf-8"))
        return lengths

    def _token_id(self, token: str) -> int | None:
        index = self._sp.piece_to_id(token)
        return index if self._sp.id_to_piece(index) == token else None

    def _default_specials(self) -> dict[str, int | None]:
        sp = self._sp
        found = {"BOS": sp.bos_id(), "EOS": sp.eos_id(), "PAD": sp.pad_id()}
        return {name: (index if index >= 0 else None) for name, index in found.items()}

    def _special_examples(self) -> list[str]:
        sp = self._sp
        return [sp.id_to_piece(i) for i in range(self.vocab_size) if sp.is_control(i)]


class _HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, spec: str, path: str, data: bytes, sha256: str):
        library = _import_library("tokenizers", spec)
        try:
            text = data.decode("utf-8")
            self._config = json.loads(text)
            if not isinstance(self._config, dict):
                raise ValueError("not a JSON object")
            self._tok = library.Tokenizer.from_str(text)
        except Exception as error:  # json / UnicodeDecodeError / the library's plain Exception
            raise DataError(
                f"tokenizer file {path} is not a Hugging Face tokenizer.json "
                f"({_first_line(error)}); fix data.tokenizer"
            ) from None
        self._vocab = self._tok.get_vocab(with_added_tokens=True)
        if not self._vocab:
            raise DataError(
                f"tokenizer file {path} is not a Hugging Face tokenizer.json (empty vocabulary); "
                "fix data.tokenizer"
            )
        added = self._config.get("added_tokens") or []
        self._special_ids = {t["id"] for t in added if isinstance(t, dict) and t.get("special")}
        super().__init__(spec, path, max(self._vocab.values()) + 1, sha256)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        if not texts:
            return []
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(encoding.ids, np.int32) for encoding in encodings]

    def _decode_kept(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def _decode_kept_batch(self, batch: list[list[int]]) -> list[str]:
        return self._tok.decode_batch(batch, skip_special_tokens=True) if batch else []

    def _byte_lengths(self) -> np.ndarray:
        nodes = [
            node
            for key in ("normalizer", "pre_tokenizer", "decoder")
            for node in _typed_nodes(self._config.get(key))
        ]
        types = {node["type"] for node in nodes}
        byte_fallback = "ByteFallback" in types
        if "ByteLevel" in types:
            alphabet = _byte_level_alphabet()

            def length(token: str) -> int:
                if all(char in alphabet for char in token):
                    return len(token)  # one byte per character
                return len(token.encode("utf-8"))  # the decoder keeps such tokens as they are

        elif metaspace := _metaspace_char(nodes):

            def length(token: str) -> int:
                if byte_fallback and _BYTE_PIECE.fullmatch(token):
                    return 1
                return len(token.replace(metaspace, " ").encode("utf-8"))

        elif "WordPiece" in types:
            prefix = next(n.get("prefix", "##") for n in nodes if n["type"] == "WordPiece")

            def length(token: str) -> int:
                return len(token.removeprefix(prefix).encode("utf-8"))

        else:
            suffixes = [n.get("suffix", "</w>") for n in nodes if n["type"] == "BPEDecoder"]

            def length(token: str) -> int:
                if byte_fallback and _BYTE_PIECE.fullmatch(token):
                    return 1
                if suffixes and token.endswith(suffixes[0]):
                    return len(token[: -len(suffixes[0])].encode("utf-8")) + 1  # suffix → " "
                return len(token.encode("utf-8"))

        lengths = np.zeros(self.vocab_size, np.int32)
        for token, index in self._vocab.items():
            if index not in self._special_ids:
                lengths[index] = length(token)
        return lengths

    def _token_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def _default_specials(self) -> dict[str, int | None]:
        return {
            name: next((self._vocab[t] for t in candidates if t in self._vocab), None)
            for name, candidates in HF_SPECIAL_CANDIDATES.items()
        }

    def _special_examples(self) -> list[str]:
        by_id = {index: token for token, index in self._vocab.items()}
        return [by_id[i] for i in sorted(self._special_ids) if i in by_id]


def byte_tokenizer() -> Tokenizer:
    """The default byte-level tokenizer (vocab 259, BOS 256, EOS 257, PAD 258)."""
    return load_tokenizer("bytes")


def parse_tokenizer_spec(spec: str) -> tuple[str, str | None]:
    """`data.tokenizer` → (kind, absolute path or None); ConfigError if it is none of the forms."""
    if not isinstance(spec, str):
        raise ConfigError(f"config 'data.tokenizer': expected {_ALLOWED_FORMS}, got {spec!r}")
    if spec == "bytes":
        return "bytes", None
    kind, colon, path = spec.partition(":")
    if not colon or kind not in KINDS[1:]:
        raise ConfigError(
            f"config 'data.tokenizer': {spec!r} is not a tokenizer; use {_ALLOWED_FORMS}"
        )
    if not path:
        raise ConfigError(f"config 'data.tokenizer': {spec!r} names no file; use {_ALLOWED_FORMS}")
    if kind == "sentencepiece" and "/" not in path and "\\" not in path and not Path(path).suffix:
        return kind, str(SHIPPED_DIR / f"{path}.model")
    return kind, str(Path(path).expanduser().resolve())


def load_tokenizer(
    spec: str, *, bos: str | None = None, eos: str | None = None, pad: str | None = None
) -> Tokenizer:
    """Loads the tokenizer `spec` names (see the module docstring); bos/eos/pad name tokens.

    ConfigError for a malformed spec or a missing library; DataError for a missing, unreadable or
    malformed file and for special tokens that are missing, unknown or clash.
    """
    kind, path = parse_tokenizer_spec(spec)
    if kind == "bytes":
        tok: Tokenizer = _BytesTokenizer(spec)
    else:
        assert path is not None
        _import_library("sentencepiece" if kind == "sentencepiece" else "tokenizers", spec)
        data = _read_file(path, kind)
        sha256 = hashlib.sha256(data).hexdigest()
        implementation = _SentencePieceTokenizer if kind == "sentencepiece" else _HFTokenizer
        tok = implementation(spec, path, data, sha256)
    _set_specials(tok, {"BOS": bos, "EOS": eos, "PAD": pad})
    return tok


def check_identity(saved: dict, current: dict, where: str) -> None:
    """DataError unless `current` is the tokenizer `saved` describes (the file may have moved)."""
    keys = ("kind", "sha256", "vocab_size", "bos_id", "eos_id", "pad_id")
    if all(saved.get(key) == current.get(key) for key in keys):
        return
    raise DataError(
        f"the run at {where} was trained with tokenizer {_describe(saved)} but data.tokenizer is "
        f"{_describe(current)}; use the run's tokenizer"
    )


def _set_specials(tok: Tokenizer, named: dict[str, str | None]) -> None:
    where = "the byte tokenizer" if tok.path is None else f"tokenizer {tok.path}"
    defaults = tok._default_specials()
    ids: dict[str, int | None] = {}
    for name, token in named.items():
        if token is None:
            ids[name] = defaults[name]
            continue
        index = tok._token_id(token)
        if index is None:
            examples = tok._special_examples()[:8]
            hint = f" (its special tokens include {', '.join(examples)})" if examples else ""
            raise DataError(
                f"data.{name.lower()}_token {token!r} is not in the vocabulary of {where}{hint}; "
                f"name a token it has"
            )
        ids[name] = index
    missing = [name for name, index in ids.items() if index is None]
    if missing:
        keys = " and ".join(
            f"data.{name.lower()}_token=<token in its vocabulary>" for name in missing
        )
        raise DataError(
            f"{where} has no {' or '.join(missing)} token; "
            f"name {'one' if len(missing) == 1 else 'them'} with {keys}"
        )
    names = list(ids)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            explicit = named[first] is not None and named[second] is not None
            if ids[first] == ids[second] and not explicit:
                raise DataError(
                    f"{where} gives {first} and {second} the same id {ids[first]}; name distinct "
                    f"tokens with data.{first.lower()}_token / data.{second.lower()}_token (or the "
                    "same token for both explicitly)"
                )
    tok.bos_id, tok.eos_id, tok.pad_id = (int(ids[name]) for name in ("BOS", "EOS", "PAD"))


def _read_file(path: str, kind: str) -> bytes:
    file = Path(path)
    if not file.exists():
        if file.parent == SHIPPED_DIR:
            shipped = ", ".join(sorted(p.stem for p in SHIPPED_DIR.glob("*.model"))) or "none"
            raise DataError(
                f"no shipped sentencepiece model '{file.stem}' (shipped: {shipped}; looked for "
                f"{file}); fix data.tokenizer or give a path to a .model file"
            )
        raise DataError(f"tokenizer file {path} does not exist; fix data.tokenizer ({kind}:PATH)")
    if file.is_dir():
        inside = file / "tokenizer.json"
        hint = f" (use hf:{inside})" if kind == "hf" and inside.is_file() else ""
        raise DataError(
            f"tokenizer file {path} is a directory; data.tokenizer must name the file{hint}"
        )
    try:
        return file.read_bytes()
    except PermissionError:
        raise DataError(
            f"tokenizer file {path} is not readable (permission denied); fix its permissions "
            "or data.tokenizer"
        ) from None
    except OSError as error:
        raise DataError(
            f"cannot read tokenizer file {path} ({error.strerror or error}); fix data.tokenizer"
        ) from None


def _import_library(module: str, spec: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"config 'data.tokenizer': {spec!r} needs the {module} package; pip install {module}"
        ) from None


def _describe(identity: dict) -> str:
    kind = identity.get("kind")
    specials = "/".join(str(identity.get(key)) for key in ("bos_id", "eos_id", "pad_id"))
    details = f"vocab {identity.get('vocab_size')}, BOS/EOS/PAD {specials}"
    if kind == "bytes" or identity.get("sha256") is None:
        return f"{kind} ({details})"
    return f"{identity.get('file')} ({kind}, sha256 {str(identity['sha256'])[:12]}…, {details})"


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:160]


def _typed_nodes(config: Any) -> list[dict]:
    """Every dict with a "type" in an hf normalizer/pre_tokenizer/decoder config (Sequences too)."""
    if isinstance(config, list):
        return [node for item in config for node in _typed_nodes(item)]
    if not isinstance(config, dict):
        return []
    nodes = [config] if isinstance(config.get("type"), str) else []
    for value in config.values():
        if isinstance(value, list | dict):
            nodes += _typed_nodes(value)
    return nodes


def _metaspace_char(nodes: list[dict]) -> str | None:
    """The character an hf pipeline writes for a space ("▁"), if it has one."""
    for node in nodes:
        if node["type"] == "Metaspace":
            return node.get("replacement", "▁")
    for node in nodes:
        pattern = node.get("pattern") if node["type"] == "Replace" else None
        if isinstance(pattern, dict) and node.get("content") == " ":
            if pattern.get("String") == "▁":
                return "▁"
    return None


def _byte_level_alphabet() -> dict[str, int]:
    """character → byte of GPT-2's byte-level BPE: printable Latin-1 bytes stand for themselves,
    the other bytes, in order, for U+0100, U+0101, ..."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    alphabet: dict[str, int] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(0x100 + shifted)] = byte
            shifted += 1
    return alphabet
