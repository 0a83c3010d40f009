"""Tokenize a text source once into ArrayRecord shards of token ids, using every core.

    python -m umv2_jax.data.pretokenize --source files:corpus/*.jsonl.gz \\
        --tokenizer sentencepiece:tok.model --out data/corpus_tok [--workers N]

then train with `--set data.source=arrayrecord:data/corpus_tok/* --set data.tokenizer=<the same>`:
the batches are those of tokenizing on the fly (the same documents in the same order, so the same
holdout and shuffle). Output, in OUT:

    {split}-NNNNN-of-NNNNN.arrayrecord   one record per document: its ids (no BOS/EOS) as
                                         little-endian uint16 (vocabulary <= 65536) or int32
    manifest.json                        {"format", "source", "tokenizer": identity, "dtype",
                                          "splits": {split: {"documents", "tokens", "text_bytes",
                                          "shards": [{"file", "documents", "tokens"}]}}}

Splits are the source's own (shakespeare, tfds, a DatasetDict) or one split `all` (files, a
Dataset), held out by `data.eval_holdout` when training reads it. Documents are encoded by a pool
of worker processes in chunks and written in order. Everything is written into OUT.partial-PID and
renamed to OUT at the end, so an interrupted or failed run leaves no half-written OUT; an existing
non-empty OUT is an error unless --overwrite.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
from typing import Any

import numpy as np

from umv2_jax.errors import ConfigError, UserError

FORMAT = "umv2-pretokenized-v1"
CHUNK_DOCUMENTS = 256  # documents per task handed to a worker


def pretokenize(
    source: str,
    tokenizer_spec: str,
    out: str,
    *,
    data_overrides: dict[str, Any] | None = None,
    workers: int | None = None,
    shard_documents: int = 100_000,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Writes the shards and manifest (module docstring) and returns the manifest."""
    from array_record.python import array_record_module
    from tqdm import tqdm

    from umv2_jax.config import DataConfig, from_dict
    from umv2_jax.data import sources, tokenizers

    fields = {"source": source, "tokenizer": tokenizer_spec, **(data_overrides or {})}
    data = from_dict(DataConfig, fields, "data")
    data.validate("data")
    if data.task_name is not None:
        raise ConfigError(
            f"--source {source}: task sources generate their own ids; nothing to pretokenize"
        )
    if shard_documents < 1:
        raise ConfigError(f"--shard-documents {shard_documents} must be >= 1")
    from umv2_jax import paths

    if paths.scheme(out) is not None:  # abspath would make a local folder named "gs:"
        raise ConfigError(
            f"--out {out}: pretokenize writes a local folder; pass a local path and copy the "
            "folder to the bucket afterwards (training reads arrayrecord: shards from a local path)"
        )
    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ConfigError(
            f"--out {out} exists and is not empty; pass another folder or --overwrite"
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} is a file; pass a folder")
    tokenizer = tokenizers.load_tokenizer(
        data.tokenizer, bos=data.bos_token, eos=data.eos_token, pad=data.pad_token
    )
    splits = sources.open_all_splits(data, source)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    workers = max(1, workers or os.cpu_count() or 1)
    partial = f"{out}.partial-{os.getpid()}"
    os.makedirs(partial)
    manifest = {
        "format": FORMAT,
        "source": source,
        "text_key": data.text_key,
        "tokenizer": tokenizer.identity(),
        "dtype": np.dtype(dtype).name,
        "splits": {},
    }
    total = sum(len(split) for split in splits.values())
    bar = tqdm(total=total, unit="doc", desc="pretokenize", disable=not progress, file=sys.stderr)
    context = multiprocessing.get_context("spawn")  # the tokenizer libraries hold threads
    try:
        with context.Pool(workers, initializer=_init_worker, initargs=(fields,)) as pool:
            for name, split in splits.items():
                count = len(split)
                shard_count = max(1, -(-count // shard_documents))
                info = {"documents": 0, "tokens": 0, "text_bytes": 0, "shards": []}
                tasks = [
                    (name, start, min(start + CHUNK_DOCUMENTS, count))
                    for start in range(0, count, CHUNK_DOCUMENTS)
                ]
                # One document at a time: a chunk may straddle shards.
                results = (item for chunk in pool.imap(_encode_chunk, tasks) for item in chunk)
                for shard in range(shard_count):
                    file = f"{name}-{shard:05d}-of-{shard_count:05d}.arrayrecord"
                    writer = array_record_module.ArrayRecordWriter(
                        os.path.join(partial, file), "group_size:1"
                    )
                    stop = min((shard + 1) * shard_documents, count)
                    written = tokens = 0
                    while info["documents"] + written < stop:
                        ids, text_bytes = next(results)
                        writer.write(ids.astype(dtype).tobytes())
                        written += 1
                        tokens += ids.size
                        info["text_bytes"] += text_bytes
                        bar.update(1)
                    writer.close()
                    info["documents"] += written
                    info["tokens"] += tokens
                    info["shards"].append({"file": file, "documents": written, "tokens": tokens})
                manifest["splits"][name] = info
    except BaseException:
        bar.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    bar.close()
    with open(os.path.join(partial, "manifest.json"), "w") as handle:
        json.dump(manifest, handle, indent=2)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(partial, out)
    return manifest


# Worker state: each worker opens the source and the tokenizer once.
_WORKER: dict[str, Any] = {}


def _init_worker(fields: dict) -> None:
    from umv2_jax.config import DataConfig, from_dict
    from umv2_jax.data import sources, tokenizers

    data = from_dict(DataConfig, fields, "data")
    _WORKER["splits"] = sources.open_all_splits(data, data.source)
    _WORKER["tokenizer"] = tokenizers.load_tokenizer(
        data.tokenizer, bos=data.bos_token, eos=data.eos_token, pad=data.pad_token
    )


def _encode_chunk(task: tuple[str, int, int]) -> list[tuple[np.ndarray, int]]:
    """(ids, UTF-8 bytes of the text) of documents [start, stop) of a split."""
    name, start, stop = task
    split, tokenizer = _WORKER["splits"][name], _WORKER["tokenizer"]
    documents = [split[index] for index in range(start, stop)]
    texts = [d for d in documents if isinstance(d, str)]
    if len(texts) != len(documents):
        raise ConfigError(f"{split.label} holds token ids already; nothing to pretokenize")
    encoded = tokenizer.encode_batch(texts)
    return [(ids, len(text.encode("utf-8"))) for ids, text in zip(encoded, texts)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m umv2_jax.data.pretokenize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--source", required=True, help="shakespeare | tfds:NAME | files:GLOB | hf_disk:PATH"
    )
    parser.add_argument("--tokenizer", required=True, help="bytes | sentencepiece:PATH | hf:PATH")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--data-dir", default=None, help="tfds data_dir for tfds:NAME")
    parser.add_argument("--max-document-chars", type=int, default=None)
    parser.add_argument("--skip-bad-records", action="store_true")
    for special in ("bos", "eos", "pad"):
        parser.add_argument(f"--{special}-token", default=None)
    parser.add_argument("--workers", type=int, default=None, help="default: every core")
    parser.add_argument("--shard-documents", type=int, default=100_000)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {
        "text_key": args.text_key,
        "skip_bad_records": args.skip_bad_records,
    }
    if args.data_dir is not None:
        overrides["data_dir"] = args.data_dir
    if args.max_document_chars is not None:
        overrides["max_document_chars"] = args.max_document_chars
    for special in ("bos", "eos", "pad"):
        if getattr(args, f"{special}_token") is not None:
            overrides[f"{special}_token"] = getattr(args, f"{special}_token")
    try:
        manifest = pretokenize(
            args.source,
            args.tokenizer,
            args.out,
            data_overrides=overrides,
            workers=args.workers,
            shard_documents=args.shard_documents,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    for name, info in manifest["splits"].items():
        print(
            f"{name}: {info['documents']:,} documents, {info['tokens']:,} tokens, "
            f"{info['text_bytes']:,} bytes of text in {len(info['shards'])} shard(s)"
        )
    print(
        f"wrote {os.path.abspath(args.out)}; train with data.source=arrayrecord:{os.path.abspath(args.out)}/*"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
