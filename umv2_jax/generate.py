"""Sample text from a trained run: `python -m umv2_jax.generate --workdir DIR --prompt "ROMEO:"`.

Read-only: it never writes into the work directory (an unreadable checkpoint is skipped with one
line and the previous one used; a read-only directory works). Every argument is checked before
the model is built: a bad one, a missing run or an unreadable `config.json` is one line on stderr
and exit status 2. Prompts are bytes (`--prompt` as the shell passed it, `--prompt-file`, or `-`
for stdin): the byte tokenizer takes any input, UTF-8 or not; a subword tokenizer (the run's own,
from WORKDIR/tokenizer/, checked against the identity saved at training) needs UTF-8 text. The
output is the prompt and its continuation decoded with the run's tokenizer (U+FFFD for bytes that
are not UTF-8).

Decoding uses the KV cache of umv2_jax.inference: the prompt is prefilled once, then each token
costs one cached step. The cache holds `--cache-len` tokens (default: the run's `data.seq_len`, at
most `model.max_seq_len`); a prompt longer than that (BOS included) is one line and exit status 2.
When the output fills the cache the context slides: the last `cache_len` ids are prefilled again
(positions restart at 0, exactly what a fresh pass over that window computes).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax
import numpy as np

from umv2_jax.errors import ConfigError, UserError

MAX_SEED = 2**63 - 1


def load_run(workdir: str):
    """(config, parts, params, rest, step) of the latest readable checkpoint in `workdir`.

    Reads only, and only the parameters and non-trainable variables (never the optimizer state:
    `umv2_jax.training.restore.load_params`); CheckpointError (one line) for a missing or
    unreadable run.
    """
    from umv2_jax.training.restore import load_params

    return load_params(str(workdir))


def generate_ids(
    config,
    parts,
    params,
    rest,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    top_p: float = 1.0,
    cache_len: int | None = None,
    eos_id: int | None = None,
) -> list[int]:
    """The new token ids after `prompt_ids` (BOS included by the caller), stopping at EOS (not kept).

    Each token comes from the logits after the context: the last `cache_len` ids (default
    `data.seq_len`), prefilled into the KV cache once and extended one cached step per token; a
    longer prompt, or an output that fills the cache, slides the window (the last `cache_len` ids
    are prefilled again). temperature 0 = greedy (argmax); otherwise sampling from the `top_k` most
    likely tokens (0 = all) within the smallest set whose probability reaches `top_p` (1 = all),
    with one split of `jax.random.key(seed)` per sampled token. `eos_id` (default: the EOS of
    the config's tokenizer) ends the output.
    """
    from umv2_jax.inference import sampling
    from umv2_jax.inference.decode import Decoder

    _check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    window = cache_len or config.data.seq_len
    decoder = Decoder(parts.build(params, rest), config.model.vocab_size)
    no_padding = np.zeros((1,), np.int32)

    def prefill(ids):
        context = np.asarray([ids[-window:]], np.int32)
        logits, cache, _ = decoder.prefill(context, no_padding, window)
        return logits[0], cache, context.shape[1]

    if eos_id is None:
        eos_id = _config_tokenizer(config).eos_id
    ids = list(prompt_ids)
    key = jax.random.key(seed)
    generated: list[int] = []
    logits, cache, filled = prefill(ids) if max_new_tokens else (None, None, 0)
    for _ in range(max_new_tokens):
        if temperature <= 0:
            token = int(sampling.sample(logits, None))
        else:
            key, sample_key = jax.random.split(key)
            token = int(sampling.sample(logits, sample_key, temperature, top_k, top_p))
        if token == eos_id:
            break
        ids.append(token)
        generated.append(token)
        if len(generated) == max_new_tokens:
            break
        if filled < window:
            step_logits, cache, _ = decoder.step(np.asarray([token], np.int32), cache)
            logits, filled = step_logits[0], filled + 1
        else:  # the cache is full: slide the window
            logits, cache, filled = prefill(ids)
    return generated


def generate(
    config,
    parts,
    params,
    rest,
    prompt: str | bytes,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
    top_p: float = 1.0,
    tokenizer=None,
) -> str:
    """The text continuing `prompt` (see `generate_ids`; the prompt is prefixed with BOS).

    `tokenizer` defaults to the config's `data.tokenizer`. For the byte tokenizer a str prompt is
    UTF-8 encoded and bytes are taken as they are; other tokenizers encode the text.
    """
    tokenizer = tokenizer or _config_tokenizer(config)
    generated = generate_ids(
        config,
        parts,
        params,
        rest,
        _prompt_ids(prompt, tokenizer),
        max_new_tokens,
        temperature,
        top_k,
        seed,
        top_p,
        eos_id=tokenizer.eos_id,
    )
    return tokenizer.decode(np.asarray(generated, np.int32))


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m umv2_jax.generate", description=__doc__)
    parser.add_argument("--workdir", required=True, help="a run directory written by train.py")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue")
    prompt.add_argument(
        "--prompt-file", default=None, metavar="PATH", help="read the prompt's bytes ('-': stdin)"
    )
    parser.add_argument("--max-new-tokens", type=_positive_int, default=200, help="at least 1")
    parser.add_argument("--temperature", type=_temperature, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=_non_negative_int, default=40, help="0 = no top-k filter")
    parser.add_argument(
        "--top-p", type=_top_p, default=1.0, help="nucleus sampling, 0 < p <= 1 (1 = off)"
    )
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument(
        "--cache-len",
        type=_positive_int,
        default=None,
        help="KV cache length in tokens (default: the run's data.seq_len; at most model.max_seq_len)",
    )
    args = parser.parse_args(argv)
    try:
        prompt_bytes = _read_prompt(args)
        tokenizer = _run_tokenizer(args.workdir)
        prompt_ids = _prompt_ids(prompt_bytes, tokenizer)
        _check_cache(args, len(prompt_ids))
        config, parts, params, rest, step = load_run(args.workdir)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    generated = generate_ids(
        config,
        parts,
        params,
        rest,
        prompt_ids,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.seed,
        args.top_p,
        args.cache_len,
        eos_id=tokenizer.eos_id,
    )
    print(f"[{config.name}, step {step}]")
    print(tokenizer.decode(np.asarray(prompt_ids[1:] + generated, np.int32)))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error form: one line on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive count; pass 1 or more")
    return value


def _non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; pass 0 (off) or more")
    return value


def _seed(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{value} is outside 0..2**63-1")
    return value


def _temperature(text: str) -> float:
    value = _float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0 (0 = greedy)")
    return value


def _top_p(text: str) -> float:
    value = _float(text)
    if not (0 < value <= 1):  # also false for nan
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1] (1 = off)")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _check_sampling(
    max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int
) -> None:
    """The CLI's argument checks, for callers of the functions (ValueError)."""
    if max_new_tokens < 0 or top_k < 0 or not 0 <= seed <= MAX_SEED:
        raise ValueError(
            f"max_new_tokens {max_new_tokens}, top_k {top_k} and seed {seed} must be >= 0"
        )
    if not (math.isfinite(temperature) and temperature >= 0) or not 0 < top_p <= 1:
        raise ValueError(f"temperature {temperature} must be finite >= 0, top_p {top_p} in (0, 1]")


def _nucleus(logits: jax.Array, top_p: float) -> jax.Array:
    """logits outside the smallest most-likely set with total probability >= top_p -> -inf."""
    from umv2_jax.inference.sampling import top_p_mask

    return top_p_mask(logits, top_p)


def _check_cache(args: argparse.Namespace, prompt_len: int) -> None:
    """ConfigError (one line) when --cache-len exceeds model.max_seq_len or the prompt (BOS
    included) does not fit the cache; reads only the run's config.json."""
    from umv2_jax import config as config_lib
    from umv2_jax.inference.decode import check_fits
    from umv2_jax.training.restore import read_run_config

    config = config_lib.config_from_dict(read_run_config(args.workdir))
    cache_len = args.cache_len or config.data.seq_len
    if cache_len > config.model.max_seq_len:
        raise ConfigError(
            f"--cache-len {cache_len} exceeds the model's max_seq_len {config.model.max_seq_len} "
            f"(the longest sequence RoPE was set up for); pass --cache-len "
            f"{config.model.max_seq_len} or less"
        )
    check_fits(prompt_len, cache_len)


def _prompt_ids(prompt: str | bytes, tokenizer=None) -> list[int]:
    """[BOS, prompt ids...]: the byte tokenizer takes any bytes; others need UTF-8 text."""
    from umv2_jax.data import tokenizers

    tokenizer = tokenizer or tokenizers.byte_tokenizer()
    if tokenizer.kind == "bytes":
        data = prompt.encode("utf-8") if isinstance(prompt, str) else bytes(prompt)
        return [tokenizer.bos_id, *np.frombuffer(data, np.uint8).tolist()]
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(
                f"the prompt is not UTF-8 text, and the run's {tokenizer.kind} tokenizer encodes "
                "text; pass UTF-8"
            ) from None
    return [tokenizer.bos_id, *tokenizer.encode(prompt).tolist()]


def _config_tokenizer(config):
    """The tokenizer `config` names (bytes for task sources)."""
    from umv2_jax.data import tokenizers

    data = config.data
    if data.task_name is not None:
        return tokenizers.byte_tokenizer()
    return tokenizers.load_tokenizer(
        data.tokenizer, bos=data.bos_token, eos=data.eos_token, pad=data.pad_token
    )


def _run_tokenizer(workdir: str):
    """The tokenizer of the run in `workdir` (its saved copy, checked against its identity)."""
    from umv2_jax import config as config_lib
    from umv2_jax.data import run_tokenizer
    from umv2_jax.training.restore import read_run_config

    config = config_lib.config_from_dict(read_run_config(workdir))
    if config.data.task_name is not None:
        return _config_tokenizer(config)
    return run_tokenizer.load(workdir, config)


def _read_prompt(args: argparse.Namespace) -> bytes:
    """The prompt's bytes: --prompt as the shell passed them (os.fsencode undoes Python's
    surrogateescape decoding of argv), or the raw bytes of --prompt-file / stdin."""
    if args.prompt_file is None:
        return os.fsencode(args.prompt)
    if args.prompt_file == "-":
        return sys.stdin.buffer.read()
    try:
        with open(args.prompt_file, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ConfigError(
            f"--prompt-file {args.prompt_file}: {error.strerror}; pass a readable file"
        ) from None


if __name__ == "__main__":
    sys.exit(main())
