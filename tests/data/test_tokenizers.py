"""The tokenizer interface: bytes, sentencepiece and Hugging Face tokenizer.json behave alike.

Sentencepiece models and tokenizer.json files are trained here, offline, once per module.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from umv2_jax.data import tokenizers
from umv2_jax.data.tokenizers import (
    SHAKESPEARE_BPE,
    check_identity,
    load_tokenizer,
    parse_tokenizer_spec,
)
from umv2_jax.errors import ConfigError, DataError

spm = pytest.importorskip("sentencepiece")
hf = pytest.importorskip("tokenizers")

TRAIN_TEXTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\n  Or to take arms against a sea of troubles\n",
    "Café, naïve, résumé, Grüße — the quick brown fox jumps over the lazy dog 0123456789.\n",
    "And by opposing end them. To die—to sleep,\nNo more; and by a sleep to say we end\n",
] * 20
MULTILINGUAL = (
    "Hello, world!\nCafé naïve — Grüße, Ελληνικά, русский, 東京タワー, 한국어, العربية.\n\n"
    "\ttabs  and   spaces  12345 🎉 👩‍👩‍👧 🇫🇷\r\n  trailing  \n"
    + "".join(chr(code) for code in range(1, 256))
)
ROUND_TRIP_TEXTS = [
    "",
    "plain ascii",
    "To be, or not to be.\n",
    "\n\n\n",
    "  leading and trailing spaces  ",
    "Café 東京 🎭 emoji 👍🏽 and a ZWJ 👨‍💻",
    MULTILINGUAL,
    MULTILINGUAL * 40,  # long: ~14 KB
]
SPECIALS = ["<s>", "</s>", "<pad>", "<|endoftext|>"]


def _train_sentencepiece(path: Path, **options) -> str:
    model = io.BytesIO()
    settings = dict(
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"],
        character_coverage=1.0,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    settings.update(options)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXTS), model_writer=model, **settings
    )
    path.write_bytes(model.getvalue())
    return str(path)


def _train_byte_level_bpe(path: Path, specials: list[str]) -> str:
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXTS, trainer)
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "sentencepiece": _train_sentencepiece(root / "exact.model"),
        "sp_dummy_prefix": _train_sentencepiece(root / "dummy.model", add_dummy_prefix=True),
        "sp_no_pad": _train_sentencepiece(root / "nopad.model", pad_id=-1),
        "hf": _train_byte_level_bpe(root / "tokenizer.json", SPECIALS),
        "hf_gpt2_like": _train_byte_level_bpe(root / "gpt2like.json", ["<|endoftext|>"]),
    }


@pytest.fixture(scope="module")
def toks(files) -> dict[str, tokenizers.Tokenizer]:
    return {
        "bytes": tokenizers.byte_tokenizer(),
        "sentencepiece": load_tokenizer(f"sentencepiece:{files['sentencepiece']}"),
        "hf": load_tokenizer(f"hf:{files['hf']}"),
    }


KINDS = ["bytes", "sentencepiece", "hf"]


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# Specs.


def test_parse_spec_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_tokenizer_spec("bytes") == ("bytes", None)
    assert parse_tokenizer_spec("sentencepiece:/a/b.model") == ("sentencepiece", "/a/b.model")
    assert parse_tokenizer_spec("hf:sub/tokenizer.json") == (
        "hf",
        str(tmp_path.resolve() / "sub" / "tokenizer.json"),
    )
    assert parse_tokenizer_spec("sentencepiece:x.model")[1] == str(tmp_path.resolve() / "x.model")
    # A bare name is a shipped model.
    assert parse_tokenizer_spec("sentencepiece:shakespeare_bpe2048") == (
        "sentencepiece",
        SHAKESPEARE_BPE,
    )


@pytest.mark.parametrize(
    "spec", ["byte", "gpt2", "sentencepiece", "sentencepiece:", "hf:", "spm:/x.model", "", "Bytes"]
)
def test_parse_spec_rejects_other_forms(spec):
    with pytest.raises(ConfigError) as error:
        parse_tokenizer_spec(spec)
    message = _one_line(error)
    assert "data.tokenizer" in message
    assert "'bytes'" in message and "sentencepiece:PATH" in message and "hf:PATH" in message
    with pytest.raises(ConfigError):
        load_tokenizer(spec)


# Round trips, batching, specials.


@pytest.mark.parametrize("kind", KINDS)
def test_round_trips(toks, kind):
    tok = toks[kind]
    for text in ROUND_TRIP_TEXTS:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert ((ids >= 0) & (ids < tok.vocab_size)).all()
        assert tok.decode(ids) == text
    assert tok.encode("").shape == (0,)
    assert tok.decode([]) == "" and tok.decode(np.zeros(0, np.int32)) == ""


def test_bytes_kind_is_the_byte_tokenizer(toks):
    tok = toks["bytes"]
    assert (tok.kind, tok.spec, tok.path, tok.vocab_size) == ("bytes", "bytes", None, 259)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    assert tok.encode("hé").tolist() == [104, 0xC3, 0xA9]


def test_subword_kinds_compress_and_use_the_files_ids(toks, files):
    sp = spm.SentencePieceProcessor(model_file=files["sentencepiece"])
    text = "To be, or not to be, that is the question"
    assert toks["sentencepiece"].encode(text).tolist() == sp.encode(text)
    reference = hf.Tokenizer.from_file(files["hf"])
    assert toks["hf"].encode(text).tolist() == reference.encode(text).ids
    for kind in ("sentencepiece", "hf"):
        assert len(toks[kind].encode(text)) < len(text) * 2 / 3
        assert toks[kind].kind == kind and toks[kind].path == files[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_batched_equals_one_by_one(toks, kind):
    tok = toks[kind]
    batch = tok.encode_batch(ROUND_TRIP_TEXTS)
    assert len(batch) == len(ROUND_TRIP_TEXTS)
    for text, ids in zip(ROUND_TRIP_TEXTS, batch):
        assert ids.dtype == np.int32
        np.testing.assert_array_equal(ids, tok.encode(text))
    assert tok.decode_batch(batch) == ROUND_TRIP_TEXTS
    assert tok.decode_batch([ids.tolist() for ids in batch]) == ROUND_TRIP_TEXTS
    assert tok.encode_batch([]) == [] and tok.decode_batch([]) == []
    rows = np.stack([tok.encode("ab ab ab")[:3]] * 2)  # a 2-D array decodes row by row
    assert tok.decode_batch(rows) == [tok.decode(rows[0])] * 2


def test_special_ids_come_from_the_files(toks, files):
    assert [getattr(toks["sentencepiece"], f"{n}_id") for n in ("bos", "eos", "pad")] == [1, 2, 3]
    reference = hf.Tokenizer.from_file(files["hf"])
    expected = [reference.token_to_id(t) for t in ("<s>", "</s>", "<pad>")]
    assert [toks["hf"].bos_id, toks["hf"].eos_id, toks["hf"].pad_id] == expected
    for tok in toks.values():
        assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
        assert all(0 <= i < tok.vocab_size for i in (tok.bos_id, tok.eos_id, tok.pad_id))


@pytest.mark.parametrize("kind", KINDS)
def test_decode_drops_specials_and_ids_past_the_vocabulary(toks, kind):
    tok = toks[kind]
    text = "Café 🎉 to be"
    ids = tok.encode(text).tolist()
    noisy = [tok.bos_id, *ids[:2], tok.pad_id, tok.vocab_size, *ids[2:], tok.eos_id]
    noisy += [tok.vocab_size + 57, -1, tok.pad_id]
    assert tok.decode(noisy) == text
    assert tok.decode(np.asarray(noisy, np.int64)) == text
    assert tok.decode(iter(noisy)) == text and tok.decode(tuple(noisy)) == text
    assert tok.decode(np.asarray([noisy[:6], noisy[6:12]], np.int32)) == tok.decode(noisy[:12])
    assert tok.decode([tok.bos_id, tok.eos_id, tok.pad_id]) == ""
    assert tok.decode_batch([noisy, [tok.pad_id] * 3]) == [text, ""]


def test_decode_never_raises_on_broken_utf8(toks, files):
    # Each kind's id for a lone 0xFF byte, found independently of the interface.
    sp = spm.SentencePieceProcessor(model_file=files["sentencepiece"])
    hf_ff = hf.Tokenizer.from_file(files["hf"]).token_to_id("ÿ")  # GPT-2 maps byte 0xFF to ÿ
    lone_ff = {"bytes": 0xFF, "sentencepiece": sp.piece_to_id("<0xFF>"), "hf": hf_ff}
    for kind, index in lone_ff.items():
        a = toks[kind].encode("A").tolist()
        assert toks[kind].decode([*a, index, *a]) == "A\ufffdA", kind


# Byte lengths (bits per byte).


def test_byte_lengths_of_the_byte_tokenizer(toks):
    lengths = toks["bytes"].token_byte_lengths()
    assert lengths.dtype == np.int32
    assert lengths.tolist() == [1] * 256 + [0] * 3


@pytest.mark.parametrize("kind", KINDS)
def test_byte_lengths_sum_to_the_text_bytes_exactly(toks, kind):
    tok = toks[kind]
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,) and lengths.dtype == np.int32
    assert lengths[[tok.bos_id, tok.eos_id, tok.pad_id]].tolist() == [0, 0, 0]
    assert (lengths >= 0).all()
    for text in ROUND_TRIP_TEXTS:
        assert lengths[tok.encode(text)].sum() == len(text.encode("utf-8")), (kind, text[:20])
    batch = tok.encode_batch(ROUND_TRIP_TEXTS)
    total = sum(int(lengths[ids].sum()) for ids in batch)
    assert total == sum(len(text.encode("utf-8")) for text in ROUND_TRIP_TEXTS)


def test_sentencepiece_byte_lengths_of_pieces(toks, files):
    sp = spm.SentencePieceProcessor(model_file=files["sentencepiece"])
    lengths = toks["sentencepiece"].token_byte_lengths()
    assert lengths[sp.piece_to_id("<unk>")] == 0
    assert lengths[sp.piece_to_id("<0xE6>")] == 1
    assert lengths[sp.piece_to_id("\n")] == 1
    assert lengths[sp.piece_to_id("▁the")] == 4  # " the"


def test_dummy_prefix_adds_at_most_one_byte_per_document(files):
    tok = load_tokenizer(f"sentencepiece:{files['sp_dummy_prefix']}")
    lengths = tok.token_byte_lengths()
    for text in ROUND_TRIP_TEXTS[1:]:
        extra = int(lengths[tok.encode(text)].sum()) - len(text.encode("utf-8"))
        assert extra in (0, 1), text[:20]
    assert lengths[tok.encode("Café 東京")].sum() == len("Café 東京".encode()) + 1


def test_hf_byte_level_alphabet_is_gpt2s():
    alphabet = tokenizers._byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    # Well-known GPT-2 characters: space Ġ, newline Ċ, tab ĉ, "!" itself, byte 0xAD Ń.
    assert [alphabet[c] for c in "ĠĊĉ!Ń"] == [0x20, 0x0A, 0x09, 0x21, 0xAD]
    assert set(alphabet) == set(hf.pre_tokenizers.ByteLevel.alphabet())


def test_hf_metaspace_and_wordpiece_byte_lengths(tmp_path):
    vocab = {"[UNK]": 0, "[PAD]": 1, "play": 2, "##ing": 3, "##ed": 4, "日本": 5, "##語": 6}
    wordpiece = hf.Tokenizer(hf.models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = hf.pre_tokenizers.WhitespaceSplit()
    wordpiece.decoder = hf.decoders.WordPiece()
    wordpiece.add_special_tokens(["[UNK]", "[PAD]"])
    wordpiece.save(str(tmp_path / "wp.json"))
    tok = load_tokenizer(f"hf:{tmp_path / 'wp.json'}", bos="[UNK]", eos="[PAD]", pad="[PAD]")
    assert tok.token_byte_lengths().tolist() == [0, 0, 4, 3, 2, 6, 3]

    metaspace = hf.Tokenizer(hf.models.BPE())
    metaspace.pre_tokenizer = hf.pre_tokenizers.Metaspace(prepend_scheme="first")
    metaspace.decoder = hf.decoders.Metaspace(prepend_scheme="first")
    trainer = hf.trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS, show_progress=False)
    metaspace.train_from_iterator(TRAIN_TEXTS, trainer)
    metaspace.save(str(tmp_path / "metaspace.json"))
    tok = load_tokenizer(f"hf:{tmp_path / 'metaspace.json'}")
    text = "To be, or not to be, the question of fortune"
    # The prepended "▁" of the first word is not in the text: one byte per document.
    assert tok.token_byte_lengths()[tok.encode(text)].sum() == len(text) + 1
    assert tok.decode(tok.encode(text)) == text


# Identity.


def test_identity_is_stable_and_names_the_file(toks, files):
    again = load_tokenizer(f"sentencepiece:{files['sentencepiece']}")
    identity = again.identity()
    assert identity == toks["sentencepiece"].identity()
    assert json.loads(json.dumps(identity)) == identity
    digest = hashlib.sha256(Path(files["sentencepiece"]).read_bytes()).hexdigest()
    assert identity == {
        "kind": "sentencepiece",
        "file": "exact.model",
        "sha256": digest,
        "vocab_size": 400,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": 3,
    }
    assert toks["bytes"].identity() == {
        "kind": "bytes",
        "file": None,
        "sha256": None,
        "vocab_size": 259,
        "bos_id": 256,
        "eos_id": 257,
        "pad_id": 258,
    }
    other = load_tokenizer(f"sentencepiece:{files['sp_dummy_prefix']}").identity()
    assert other["sha256"] != identity["sha256"]
    assert (
        toks["hf"].identity()["sha256"]
        == hashlib.sha256(Path(files["hf"]).read_bytes()).hexdigest()
    )


def test_check_identity_accepts_a_moved_copy(files, tmp_path):
    saved = load_tokenizer(f"sentencepiece:{files['sentencepiece']}").identity()
    moved = tmp_path / "elsewhere" / "renamed.model"
    moved.parent.mkdir()
    shutil.copy(files["sentencepiece"], moved)
    current = load_tokenizer(f"sentencepiece:{moved}").identity()
    assert current["file"] == "renamed.model"
    check_identity(saved, current, "/runs/a")
    check_identity(saved, json.loads(json.dumps(saved)), "/runs/a")


def test_check_identity_rejects_another_tokenizer(toks, files):
    saved = toks["sentencepiece"].identity()
    others = [
        toks["bytes"].identity(),
        toks["hf"].identity(),
        load_tokenizer(f"sentencepiece:{files['sp_dummy_prefix']}").identity(),
        # Same file, other special ids.
        load_tokenizer(f"sentencepiece:{files['sentencepiece']}", pad="<unk>").identity(),
    ]
    for current in others:
        with pytest.raises(DataError) as error:
            check_identity(saved, current, "/runs/a")
        message = _one_line(error)
        assert message.startswith("the run at /runs/a was trained with tokenizer exact.model")
        assert saved["sha256"][:12] in message and "vocab 400" in message
        assert "use the run's tokenizer" in message
    with pytest.raises(DataError, match="bytes .*vocab 259.* but data.tokenizer is exact.model"):
        check_identity(toks["bytes"].identity(), saved, "/runs/b")


# Special-token options.


def test_missing_special_tokens_are_named(files):
    with pytest.raises(DataError) as error:
        load_tokenizer(f"sentencepiece:{files['sp_no_pad']}")
    assert _one_line(error) == (
        f"tokenizer {files['sp_no_pad']} has no PAD token; "
        "name one with data.pad_token=<token in its vocabulary>"
    )
    with pytest.raises(DataError) as error:
        load_tokenizer(f"hf:{files['hf_gpt2_like']}")
    message = _one_line(error)
    assert f"tokenizer {files['hf_gpt2_like']} has no BOS or PAD token" in message
    assert "data.bos_token=" in message and "data.pad_token=" in message
    assert "data.eos_token" not in message


def test_named_special_tokens(files):
    reference = hf.Tokenizer.from_file(files["hf_gpt2_like"])
    eot = reference.token_to_id("<|endoftext|>")
    token = "<|endoftext|>"
    tok = load_tokenizer(f"hf:{files['hf_gpt2_like']}", bos=token, eos=token, pad=token)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (eot, eot, eot)
    assert tok.token_byte_lengths()[eot] == 0
    assert tok.decode([eot, *tok.encode("hi there"), eot]) == "hi there"
    # pad = eos named explicitly is fine; a named pad that clashes with the default eos is not.
    sp = load_tokenizer(f"sentencepiece:{files['sp_no_pad']}", eos="</s>", pad="</s>")
    assert (sp.bos_id, sp.eos_id, sp.pad_id) == (1, 2, 2)
    with pytest.raises(DataError) as error:
        load_tokenizer(f"sentencepiece:{files['sp_no_pad']}", pad="</s>")
    message = _one_line(error)
    assert "EOS and PAD" in message and "data.pad_token" in message
    # A user-defined piece can serve as PAD.
    sp = load_tokenizer(f"sentencepiece:{files['sp_no_pad']}", pad="\n")
    assert sp.pad_id == spm.SentencePieceProcessor(model_file=files["sp_no_pad"]).piece_to_id("\n")


@pytest.mark.parametrize("kind", KINDS)
def test_named_token_not_in_the_vocabulary(toks, files, kind):
    spec = "bytes" if kind == "bytes" else f"{kind}:{files[kind]}"
    with pytest.raises(DataError) as error:
        load_tokenizer(spec, pad="<no such token>")
    message = _one_line(error)
    assert "data.pad_token '<no such token>'" in message
    if kind != "bytes":
        assert files[kind] in message


# Bad inputs.


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_bad_files(files, tmp_path, kind):
    expected = "is not a sentencepiece model" if kind == "sentencepiece" else "not a Hugging Face"
    text = tmp_path / "notes.txt"
    text.write_text("just some text\nnot a tokenizer\n")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    source = files["sentencepiece" if kind == "sentencepiece" else "hf"]
    truncated = tmp_path / "truncated"
    truncated.write_bytes(Path(source).read_bytes()[:3000])
    wrong_kind = files["hf" if kind == "sentencepiece" else "sentencepiece"]
    plain_json = tmp_path / "other.json"
    plain_json.write_text('{"vocab": [1, 2, 3]}')
    for path in (text, empty, truncated, wrong_kind, plain_json):
        with pytest.raises(DataError) as error:
            load_tokenizer(f"{kind}:{path}")
        message = _one_line(error)
        assert str(path) in message and expected in message, message


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_missing_file_and_directory(tmp_path, kind):
    missing = tmp_path / "absent.file"
    with pytest.raises(DataError) as error:
        load_tokenizer(f"{kind}:{missing}")
    assert str(missing) in _one_line(error) and "does not exist" in str(error.value)
    with pytest.raises(DataError) as error:
        load_tokenizer(f"{kind}:{tmp_path}")
    assert str(tmp_path) in _one_line(error) and "directory" in str(error.value)


def test_directory_holding_a_tokenizer_json_hints_at_it(files):
    folder = Path(files["hf"]).parent
    with pytest.raises(DataError, match=f"use hf:{folder / 'tokenizer.json'}"):
        load_tokenizer(f"hf:{folder}")


def test_unknown_shipped_name():
    with pytest.raises(DataError) as error:
        load_tokenizer("sentencepiece:no_such_model")
    message = _one_line(error)
    assert "no_such_model" in message and "shakespeare_bpe2048" in message


def test_unreadable_file(files, monkeypatch):
    path = files["sentencepiece"]
    original = Path.read_bytes

    def read_bytes(self):
        if str(self) == path:
            raise PermissionError(13, "Permission denied", path)
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)  # root can read any file; simulate
    with pytest.raises(DataError) as error:
        load_tokenizer(f"sentencepiece:{path}")
    assert path in _one_line(error) and "permission denied" in str(error.value)


@pytest.mark.parametrize(
    ("kind", "module"), [("sentencepiece", "sentencepiece"), ("hf", "tokenizers")]
)
def test_missing_library(files, monkeypatch, kind, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ConfigError) as error:
        load_tokenizer(f"{kind}:{files[kind]}")
    assert f"pip install {module}" in _one_line(error)
    tokenizers.byte_tokenizer()  # bytes needs neither library


# The shipped model.


def test_shipped_shakespeare_bpe():
    tok = load_tokenizer("sentencepiece:shakespeare_bpe2048")
    assert tok.path == SHAKESPEARE_BPE and Path(SHAKESPEARE_BPE).is_file()
    assert tok.vocab_size == 2048
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    digest = hashlib.sha256(Path(SHAKESPEARE_BPE).read_bytes()).hexdigest()
    assert tok.identity()["sha256"] == digest
    assert tok.identity()["file"] == "shakespeare_bpe2048.model"
    assert load_tokenizer(f"sentencepiece:{SHAKESPEARE_BPE}").identity() == tok.identity()
    lengths = tok.token_byte_lengths()
    for text in ROUND_TRIP_TEXTS:  # byte fallback: any text survives, lengths are exact
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert lengths[ids].sum() == len(text.encode("utf-8"))


def test_shipped_model_round_trips_the_validation_split():
    from umv2_jax.data import build_tokenizer

    texts = build_tokenizer.split_texts("validation")
    assert len(texts) > 100
    tok = load_tokenizer("sentencepiece:shakespeare_bpe2048")
    batch = tok.encode_batch(texts)
    assert tok.decode_batch(batch) == texts
    lengths = tok.token_byte_lengths()
    size = sum(len(text.encode("utf-8")) for text in texts)
    assert sum(int(lengths[ids].sum()) for ids in batch) == size
    assert size / sum(len(ids) for ids in batch) > 2.0  # it compresses: > 2 bytes per token


def test_build_tokenizer_is_deterministic():
    from umv2_jax.data import build_tokenizer

    texts = TRAIN_TEXTS[:4] * 5
    first = build_tokenizer.train(texts, vocab_size=320)
    assert build_tokenizer.train(texts, vocab_size=320) == first
    processor = spm.SentencePieceProcessor(model_proto=first)
    assert processor.get_piece_size() == 320
    assert [processor.id_to_piece(i) for i in range(5)] == ["<unk>", "<s>", "</s>", "<pad>", "\n"]
    for text in ROUND_TRIP_TEXTS:
        assert processor.decode(processor.encode(text)) == text
