"""Trains a sentencepiece BPE model on a source's train split (default: the shipped Shakespeare one).

    python -m umv2_jax.data.build_tokenizer                       # vocab 2048 → SHAKESPEARE_BPE
    python -m umv2_jax.data.build_tokenizer --vocab-size 4096 --out /tmp/bpe4096.model
    python -m umv2_jax.data.build_tokenizer --source 'files:my_corpus/*.txt' --out my.model

`--source` takes any text source of `data.source` (files:GLOB, hf_disk:PATH, tfds:NAME); the
model is trained on its train split (the holdout's training side for sources without splits) and
checked on its eval split.

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

    from umv2_jax.data.sources import EMBEDDED_VERSION_DIR

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


def source_texts(source: str, role: str, text_key: str, limit: int | None = None) -> list[str]:
    """The text documents of `source`'s train or eval split (DataError for a bad source)."""
    from umv2_jax.config import DataConfig
    from umv2_jax.data import sources

    data = DataConfig(source=source, text_key=text_key)
    data.validate()
    split = sources.open_split(data, source, role)
    count = len(split) if limit is None else min(limit, len(split))
    texts = [split[index] for index in range(count)]
    if any(not isinstance(text, str) for text in texts):
        from umv2_jax.errors import DataError

        raise DataError(f"{source} holds token ids, not text; pass a text source")
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--source", default="shakespeare", help="a text source (data.source)")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--max-documents", type=int, default=200_000, help="train on the first N")
    args = parser.parse_args(argv)
    from umv2_jax.errors import UserError

    if args.out is None:
        if args.source != "shakespeare":
            parser.error("--out is required with --source (the shipped model is Shakespeare's)")
        args.out = Path(SHAKESPEARE_BPE)
    try:
        if args.source == "shakespeare":
            texts, validation = split_texts("train"), split_texts("validation")
        else:
            texts = source_texts(args.source, "train", args.text_key, args.max_documents)
            validation = source_texts(args.source, "eval", args.text_key, 1000)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    model = train(texts, args.vocab_size)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model)

    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=model)
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
