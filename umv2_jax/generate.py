"""Sample text from a trained run: `python -m umv2_jax.generate --workdir DIR --prompt "ROMEO:"`.

Decoding recomputes the whole window every token (simple and exact; the KV-cache decoder lives in
umv2_jax.inference). The window is the run's `data.seq_len`; longer outputs slide it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from umv2_jax.errors import CheckpointError, UserError


def load_run(workdir: str):
    """(config, parts, params, rest, step) of the latest checkpoint in `workdir`."""
    from umv2_jax.config import config_from_dict
    from umv2_jax.training import checkpoint as checkpoint_lib
    from umv2_jax.training.state import abstract_like, build

    path = os.path.join(workdir, checkpoint_lib.CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{workdir} holds no run (no {checkpoint_lib.CONFIG_FILE}); train first"
        )
    with open(path) as handle:
        data = json.load(handle)
    data["mesh"] = {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1}
    config = config_from_dict(data)
    setup = build(config)
    checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
    try:
        step, state, rest, _ = checkpointer.restore_latest(
            abstract_like(setup.state, setup.state_shardings),
            abstract_like(setup.rest, setup.rest_shardings),
        )
    finally:
        checkpointer.close()
    return config, setup.parts, state["params"], rest, step


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
) -> list[int]:
    """The new token ids after `prompt_ids` (BOS included by the caller), stopping at EOS (not kept).

    Each token comes from the logits at the context's last real position: the window holds the
    last `data.seq_len` ids left-aligned and PAD-filled after them (causal attention keeps the
    padding from reaching that position). temperature 0 = greedy (argmax).
    """
    from umv2_jax.data import tokenizer

    window = config.data.seq_len
    vocab = config.model.vocab_size

    @jax.jit
    def next_logits(params, rest, tokens, position):
        logits, _ = parts.build(params, rest)(tokens)
        return logits[0, position, :vocab]

    ids = list(prompt_ids)
    key = jax.random.key(seed)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        context = ids[-window:]
        buffer = np.full((1, window), tokenizer.PAD, np.int32)
        buffer[0, : len(context)] = context
        logits = next_logits(params, rest, jnp.asarray(buffer), len(context) - 1)
        if temperature <= 0:
            token = int(jnp.argmax(logits))
        else:
            logits = logits / temperature
            if 0 < top_k < vocab:
                cutoff = jax.lax.top_k(logits, top_k)[0][-1]
                logits = jnp.where(logits < cutoff, -jnp.inf, logits)
            key, sample_key = jax.random.split(key)
            token = int(jax.random.categorical(sample_key, logits))
        if token == tokenizer.EOS:
            break
        ids.append(token)
        generated.append(token)
    return generated


def generate(
    config,
    parts,
    params,
    rest,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
) -> str:
    """The text continuing `prompt` (see `generate_ids`; the prompt is prefixed with BOS)."""
    from umv2_jax.data import tokenizer

    prompt_ids = [tokenizer.BOS] + list(tokenizer.encode(prompt))
    generated = generate_ids(
        config, parts, params, rest, prompt_ids, max_new_tokens, temperature, top_k, seed
    )
    return tokenizer.decode(np.asarray(generated, np.int32))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m umv2_jax.generate", description=__doc__)
    parser.add_argument("--workdir", required=True, help="a run directory written by train.py")
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=40, help="0 = no top-k filtering")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        config, parts, params, rest, step = load_run(args.workdir)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    text = generate(
        config,
        parts,
        params,
        rest,
        args.prompt,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.seed,
    )
    print(f"[{config.name}, step {step}]")
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
