"""The byte tokenizer: ids are UTF-8 bytes, three specials above them, decoding never raises."""

from __future__ import annotations

import numpy as np
import pytest

from umv2_jax.config import ModelConfig
from umv2_jax.data import tokenizer


def test_tokenizer_ids_are_utf8_bytes_and_round_trip():
    text = "To be, or not to be — Café 東京 🎭\n"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("").shape == (0,)


def test_tokenizer_specials_and_vocab_match_the_model_default():
    assert (tokenizer.BOS, tokenizer.EOS, tokenizer.PAD) == (256, 257, 258)
    assert tokenizer.VOCAB_SIZE == 259 == ModelConfig().vocab_size
    ids = tokenizer.encode("hi", add_bos=True, add_eos=True)
    assert ids.tolist() == [256, 104, 105, 257]
    # Specials and ids past the byte range (the model's padded vocabulary) are dropped.
    assert tokenizer.decode([256, 104, 258, 300, 105, 257, 258]) == "hi"


def test_tokenizer_replaces_invalid_utf8():
    assert tokenizer.decode([0xFF, 65, 0xC3]) == "\ufffdA\ufffd"
    assert tokenizer.decode(np.array([[72, 105]], np.int64)) == "Hi"


def test_specials_sit_above_the_byte_range_that_bits_per_byte_counts():
    # The eval step counts targets below BYTE_VOCAB as bytes of the text; every special is above.
    assert tokenizer.BYTE_VOCAB == 256
    assert all(
        tokenizer.BYTE_VOCAB <= t < tokenizer.VOCAB_SIZE for t in tokenizer.SPECIAL_TOKENS.values()
    )
    assert sorted(tokenizer.SPECIAL_TOKENS.values()) == list(range(256, tokenizer.VOCAB_SIZE))


def test_bos_and_eos_are_added_independently():
    assert tokenizer.encode("a", add_bos=True).tolist() == [tokenizer.BOS, 97]
    assert tokenizer.encode("a", add_eos=True).tolist() == [97, tokenizer.EOS]
    assert tokenizer.encode("", add_bos=True, add_eos=True).tolist() == [256, 257]
    assert tokenizer.encode("a", add_bos=True).dtype == np.int32


def test_decode_drops_negative_and_out_of_range_ids_and_refuses_floats():
    assert tokenizer.decode(np.array([-1, 72, 1000, 105], np.int32)) == "Hi"
    assert tokenizer.decode([]) == ""
    with pytest.raises(TypeError, match="integer ids"):
        tokenizer.decode(np.array([72.0, 105.0]))


def test_a_multibyte_character_cut_by_a_window_decodes_to_replacement_not_an_error():
    ids = tokenizer.encode("é東")  # 2 + 3 bytes
    assert len(ids) == 5
    assert tokenizer.decode(ids[:4]) == "é\ufffd"
    assert tokenizer.decode(ids[1:]) == "\ufffd東"
