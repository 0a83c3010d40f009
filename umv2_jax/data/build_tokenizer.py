"""Trains the shipped sentencepiece BPE model on the embedded Shakespeare corpus's train split.

    python -m umv2_jax.data.build_tokenizer                       # vocab 2048 → SHAKESPEARE_BPE
    python -m umv2_jax.data.build_tokenizer --vocab-size 4096 --out /tmp/bpe4096.model

The model keeps the text exactly (identity normalization, no dummy prefix, spaces kept, "\\n" its
own piece, byte fallback for characters outside the training text), so decode(encode(text)) ==
text for any text and the pieces' byte lengths sum to the text's UTF-8 length. Ids: unk 0, BOS 1,
EOS 2, PAD 3. Training reads the records in split order with one thread and no sampling, so the
same corpus gives the same file.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from umv2_jax.data.tokenizers import SHAKESPEARE_BPE

TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    add_dummy_prefix=False,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    user_defined_symbols=["\n"],
    character_coverage=1.0,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=3,
    hard_vocab_limit=False,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    num_threads=1,
    minloglevel=2,
)


def split_texts(split: str) -> list[str]:
    """The records of a split of the embedded Shakespeare dataset, as text, in order."""
    import tensorflow_datasets as tfds

    from umv2_jax.data.pipeline import EMBEDDED_VERSION_DIR

    source = tfds.builder_from_directory(str(EMBEDDED_VERSION_DIR)).as_data_source(split=split)
    texts = []
    for index in range(len(source)):
        text = source[index]["text"]
        texts.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
    return texts


def train(texts: list[str], vocab_size: int) -> bytes:
    """The serialized sentencepiece model trained on `texts` (see TRAINER_OPTIONS)."""
    import sentencepiece as spm

    model = io.BytesIO()
    longest = max(len(text.encode("utf-8")) for text in texts)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        max_sentence_length=max(longest + 1, 4192),
        **TRAINER_OPTIONS,
    )
    return model.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path(SHAKESPEARE_BPE))
    args = parser.parse_args(argv)
    model = train(split_texts("train"), args.vocab_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model)

    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=model)
    validation = split_texts("validation")
    broken = sum(processor.decode(processor.encode(text)) != text for text in validation)
    tokens = sum(len(ids) for ids in processor.encode(validation))
    size = sum(len(text.encode("utf-8")) for text in validation)
    print(
        f"wrote {args.out} ({len(model)} bytes, vocab {processor.get_piece_size()}); validation: "
        f"{size / tokens:.2f} bytes/token, {broken} of {len(validation)} records do not round-trip"
    )
    if broken:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
