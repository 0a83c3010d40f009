"""Sampling from a trained run (umv2_jax/generate.py): the greedy tokens are the argmax of a full
forward pass at each position of the generated text, teacher-forced on the generated prefix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.training.conftest import TINY
from umv2_jax.config import load_config
from umv2_jax.data import tokenizer
from umv2_jax.generate import generate, generate_ids, load_run
from umv2_jax.generate import main as generate_main
from umv2_jax.training import loop

QUIET = {"progress": False, "echo": lambda line: None}


def test_generate_from_checkpoint(tmp_path):
    loop.train(load_config(None, TINY), str(tmp_path), **QUIET)
    config, parts, params, rest, step = load_run(str(tmp_path))
    assert step == 8
    text = generate(config, parts, params, rest, "ROMEO:", 10, 0.0, 0, 0)
    assert isinstance(text, str) and len(text.encode("utf-8", "replace")) <= 40


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny model trained past the unigram level, so that its argmax depends on the context."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    overrides = ["train.steps=150", "train.eval_every=150", "checkpoint.every=150"]
    config = load_config(None, TINY + overrides + ["train.learning_rate=1e-2"])
    loop.train(config, workdir, **QUIET)
    return workdir, load_run(workdir)


def _forward(parts, params, rest, vocab, tokens):
    """logits [batch, seq, vocab] of the whole sequences, no padding (the reference)."""
    logits, _ = jax.jit(lambda p, r, t: parts.build(p, r)(t))(params, rest, jnp.asarray(tokens))
    return np.asarray(logits[..., :vocab])


def test_greedy_tokens_are_the_argmax_of_a_full_forward_pass(trained_run):
    _, (config, parts, params, rest, _) = trained_run
    vocab, window = config.model.vocab_size, config.data.seq_len
    prompt = [tokenizer.BOS, *tokenizer.encode("ROMEO:").tolist()]
    new = generate_ids(config, parts, params, rest, prompt, window - len(prompt), 0.0, 0, 0)
    assert len(set(new)) > 1, new  # a model emitting one token would not test the position
    sequence = prompt + new
    logits = _forward(parts, params, rest, vocab, np.asarray([sequence], np.int32))[0]
    predicted = logits.argmax(-1)
    # Position i predicts token i + 1: every generated token, and EOS where generation stopped.
    np.testing.assert_array_equal(predicted[len(prompt) - 1 : -1], new)
    if len(sequence) < window:
        assert predicted[-1] == tokenizer.EOS


def test_past_the_window_the_context_slides(trained_run):
    _, (config, parts, params, rest, _) = trained_run
    vocab, window = config.model.vocab_size, config.data.seq_len
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    prompt = [tokenizer.BOS, *tokenizer.encode(text).tolist()]
    assert len(prompt) > window
    new = generate_ids(config, parts, params, rest, prompt, 8, 0.0, 0, 0)
    sequence = prompt + new
    # Token j was read from the last `window` tokens before it.
    contexts = [sequence[len(prompt) + j - window : len(prompt) + j] for j in range(len(new))]
    logits = _forward(parts, params, rest, vocab, np.asarray(contexts, np.int32))
    np.testing.assert_array_equal(logits[:, -1].argmax(-1), new)


def test_the_command_prints_the_prompt_and_the_greedy_continuation(trained_run, capsys):
    workdir, (config, parts, params, rest, step) = trained_run
    argv = ["--workdir", workdir, "--prompt", "ROMEO:", "--max-new-tokens", "12"]
    assert generate_main(argv + ["--temperature", "0"]) == 0
    prompt = [tokenizer.BOS, *tokenizer.encode("ROMEO:").tolist()]
    new = generate_ids(config, parts, params, rest, prompt, 12, 0.0, 0, 0)
    expected = f"[{config.name}, step {step}]\nROMEO:{tokenizer.decode(new)}\n"
    assert capsys.readouterr().out == expected
