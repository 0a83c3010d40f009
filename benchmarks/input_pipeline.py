"""Input pipeline throughput against the train step that consumes it, measured in one process.

    python benchmarks/input_pipeline.py [--config configs/default.yaml] [--seconds 5] [--json]

Prints, on the embedded Shakespeare corpus (its train split, 4.5 MB of text):
  1. tokenize throughput, MB of text per second, for the byte tokenizer, the shipped sentencepiece
     BPE (2,048 pieces) and a Hugging Face byte-level BPE tokenizer.json (2,048 ids, trained here
     on the same text with the `tokenizers` library), one core, batched calls;
  2. pretokenize throughput (`umv2_jax.data.pretokenize` with every core), MB of text per second;
  3. the training loader's tokens per second (`make_train_iterator`, batches of the config's shape,
     on-the-fly tokenization and from pretokenized shards) against the tokens per second the
     config's jitted train step consumes (compilation excluded), and their ratio.
The step runs on whatever backend JAX has (CPU here); the loader ratio needed on an accelerator
is the step's tokens/s there divided by the loader's (README discusses it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shakespeare_texts() -> list[str]:
    from umv2_jax.config import DataConfig
    from umv2_jax.data import sources

    split = sources.open_split(DataConfig(), "shakespeare", "train")
    return [split[i] for i in range(len(split))]


def hf_byte_level_bpe(texts: list[str], directory: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    path = os.path.join(directory, "tokenizer.json")
    tokenizer.save(path)
    return path


def tokenize_mb_per_s(tokenizer, texts: list[str], seconds: float) -> float:
    total_bytes, start, rounds = sum(len(t.encode()) for t in texts), time.perf_counter(), 0
    while True:
        for begin in range(0, len(texts), 64):
            tokenizer.encode_batch(texts[begin : begin + 64])
        rounds += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return rounds * total_bytes / elapsed / 1e6


def loader_tokens_per_s(config, seconds: float) -> float:
    from umv2_jax.data import pipeline

    iterator = pipeline.make_train_iterator(config)
    next(iterator)  # opens the source, loads the tokenizer
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += next(iterator)["inputs"].size
    return tokens / (time.perf_counter() - start)


def step_tokens_per_s(config, steps: int) -> float:
    import jax

    from umv2_jax import parallel
    from umv2_jax.data import pipeline
    from umv2_jax.training.state import build
    from umv2_jax.training.step import make_train_step

    mesh = parallel.make_mesh(config.mesh)
    with parallel.use_mesh(mesh):
        setup = build(config, mesh)
        step = jax.jit(
            make_train_step(setup.parts, setup.optimizer, config.train.micro_batches, 0),
            donate_argnums=(0,),
        )
        iterator = pipeline.make_train_iterator(config)
        batches = [next(iterator) for _ in range(steps + 1)]
        state, metrics = step(setup.state, setup.rest, batches[0])  # compiles
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for batch in batches[1:]:
            state, metrics = step(state, setup.rest, batch)
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - start
    return steps * batches[0]["inputs"].size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput measurement")
    parser.add_argument("--steps", type=int, default=10, help="train steps timed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from umv2_jax.config import load_config
    from umv2_jax.data import pretokenize, tokenizers

    load = os.getloadavg()
    texts = shakespeare_texts()
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    results: dict = {"load_average": load, "cores": os.cpu_count(), "text_mb": megabytes}
    with tempfile.TemporaryDirectory() as directory:
        hf_path = hf_byte_level_bpe(texts, directory)
        specs = {
            "bytes": "bytes",
            "sentencepiece": "sentencepiece:shakespeare_bpe2048",
            "hf": f"hf:{hf_path}",
        }
        results["tokenize_mb_per_s"] = {
            name: tokenize_mb_per_s(tokenizers.load_tokenizer(spec), texts, args.seconds)
            for name, spec in specs.items()
        }
        out = os.path.join(directory, "pretokenized")
        start = time.perf_counter()
        manifest = pretokenize.pretokenize(
            "shakespeare", specs["sentencepiece"], out, progress=False
        )
        elapsed = time.perf_counter() - start
        text_bytes = sum(info["text_bytes"] for info in manifest["splits"].values())
        results["pretokenize"] = {
            "mb_per_s": text_bytes / elapsed / 1e6,
            "seconds": elapsed,
            "workers": os.cpu_count(),
            "note": "includes starting the worker processes",
        }
        base = load_config(args.config)
        sp = ["data.tokenizer=sentencepiece:shakespeare_bpe2048", "model.vocab_size=2048"]
        variants = {
            "bytes": [],
            "sentencepiece": sp,
            "sentencepiece, pretokenized": [*sp, f"data.source=arrayrecord:{out}/*"],
        }
        loader = {
            name: loader_tokens_per_s(load_config(args.config, overrides), args.seconds)
            for name, overrides in variants.items()
        }
    step = step_tokens_per_s(base, args.steps)
    results["loader_tokens_per_s"] = loader
    results["step_tokens_per_s"] = step
    results["loader_over_step"] = {name: rate / step for name, rate in loader.items()}
    results["config"] = args.config
    results["load_average_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(results))
        return
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} cores")
    print(f"text: the Shakespeare train split, {megabytes:.2f} MB")
    for name, rate in results["tokenize_mb_per_s"].items():
        print(f"tokenize {name:14s} {rate:8.2f} MB/s (one core)")
    pre = results["pretokenize"]
    print(
        f"pretokenize (sentencepiece, {pre['workers']} workers) {pre['mb_per_s']:.2f} MB/s "
        f"({pre['seconds']:.1f} s, worker start-up included)"
    )
    print(f"train step ({args.config}): {step:,.0f} tokens/s consumed")
    for name, rate in loader.items():
        print(f"loader {name:28s} {rate:12,.0f} tokens/s = {rate / step:7.1f}x the step")
    after = results["load_average_after"]
    print(f"load average after {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}")


if __name__ == "__main__":
    main()
