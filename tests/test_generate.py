"""Sampling from a trained run (umv2_jax/generate.py): the greedy tokens are the argmax of a full
forward pass at each position of the generated text, teacher-forced on the generated prefix."""

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.training.conftest import TINY
from umv2_jax.config import load_config, to_dict
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


# ---- read-only, validated, bytes in and out (issue 12) -----------------------------------------

REPO = Path(__file__).resolve().parents[1]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert captured.out == ""
    return lines[0]


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--max-new-tokens", "-5", "-5 is not a positive count"),
        ("--max-new-tokens", "0", "0 is not a positive count"),
        ("--max-new-tokens", "ten", "'ten' is not a whole number"),
        ("--temperature", "-1", "-1 is not a finite number >= 0"),
        ("--temperature", "nan", "nan is not a finite number >= 0"),
        ("--temperature", "inf", "inf is not a finite number >= 0"),
        ("--top-k", "-3", "-3 is negative"),
        ("--top-p", "0", "0 is not in (0, 1]"),
        ("--top-p", "1.5", "1.5 is not in (0, 1]"),
        ("--top-p", "nan", "nan is not in (0, 1]"),
        ("--seed", "-1", "-1 is outside 0..2**63-1"),
    ],
)
def test_every_bad_argument_is_one_line_and_exit_2_before_any_run_is_read(
    tmp_path, capsys, flag, value, expected
):
    missing = str(tmp_path / "no-such-run")  # arguments are checked before the run is read
    with pytest.raises(SystemExit) as exited:
        generate_main(["--workdir", missing, flag, value])
    assert exited.value.code == 2
    line = _one_error_line(capsys)
    assert f"argument {flag}: {expected}" in line, line
    assert not os.path.exists(missing)


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"[1, 2, 3]", "holds a JSON list, not a config mapping"),
        (b'{"model": ', "is not valid JSON"),
        (b"\xff\xfe{}", "is not valid JSON"),
        (b'{"model": {"d_model": "wide"}}', "model.d_model"),
    ],
)
def test_a_bad_config_json_is_one_line_and_exit_2(tmp_path, capsys, content, expected):
    (tmp_path / "config.json").write_bytes(content)
    assert generate_main(["--workdir", str(tmp_path)]) == 2
    assert expected in _one_error_line(capsys)
    assert os.listdir(tmp_path) == ["config.json"]


def test_a_run_without_checkpoints_is_one_line_and_creates_nothing(tmp_path, capsys):
    config = load_config(None, TINY)
    (tmp_path / "config.json").write_text(json.dumps(to_dict(config)))
    assert generate_main(["--workdir", str(tmp_path)]) == 2
    assert "holds no checkpoint" in _one_error_line(capsys)
    assert os.listdir(tmp_path) == ["config.json"]  # no empty checkpoints/


def _tree(path: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


def _as_nobody(*argv, stdin=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    command = [*NOBODY, sys.executable, "-m", "umv2_jax.generate", *argv]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=300, input=stdin)
    return done.returncode, done.stdout, done.stderr.decode("utf-8", "replace")


def test_generate_on_a_read_only_workdir_skips_an_unreadable_checkpoint_and_writes_nothing():
    """As `nobody` (root ignores permission bits) on a root-owned run: the newest checkpoint is
    truncated, so generation says so in one line and uses the previous one, moving nothing."""
    base = Path(tempfile.mkdtemp(prefix="generate-ro-", dir="/tmp"))
    try:
        base.chmod(0o755)
        workdir = base / "run"
        loop.train(load_config(None, TINY), str(workdir), **QUIET)
        steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
        assert steps == [4, 6, 8]
        largest = max((workdir / "checkpoints" / "8" / "state").rglob("*"), key=_size)
        with open(largest, "r+b") as handle:
            handle.truncate(_size(largest) // 2)
        subprocess.run(["chmod", "-R", "a+rX,go-w", str(base)], check=True)
        before = _tree(workdir)

        status, out, err = _as_nobody("--workdir", str(workdir), "--max-new-tokens", "4")
        assert status == 0, err[-3000:]
        assert out.startswith(b"[default, step 6]\n"), out
        unreadable = [line for line in err.splitlines() if "unreadable" in line]
        assert len(unreadable) == 1 and "step 8" in unreadable[0] and "skipped" in unreadable[0]
        assert "Traceback" not in err
        assert _tree(workdir) == before  # nothing moved, created or rewritten

        (workdir / "config.json").chmod(0o600)  # now unreadable for nobody
        status, out, err = _as_nobody("--workdir", str(workdir))
        assert status == 2 and out == b""
        assert err.strip().count("\n") == 0, err
        assert err.startswith(f"error: {workdir / 'config.json'} is unreadable (Permission denied)")
    finally:
        shutil.rmtree(base)


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else -1


NOT_UTF8 = b"caf\xe9 \xff\xfe ROMEO:"  # Latin-1 and stray bytes: not decodable as UTF-8


def _greedy_output(trained_run, prompt: bytes) -> str:
    """The command's output for `prompt`'s bytes: the greedy continuation of exactly those bytes,
    prompt and continuation decoded as UTF-8 with U+FFFD for the bytes that are not."""
    _, (config, parts, params, rest, step) = trained_run
    new = generate_ids(config, parts, params, rest, [tokenizer.BOS, *prompt], 6, 0.0, 0, 0)
    text = (prompt + bytes(new)).decode("utf-8", "replace")
    return f"[{config.name}, step {step}]\n{text}\n"


def test_a_non_utf8_prompt_is_read_as_bytes_from_a_file_stdin_and_argv(
    trained_run, tmp_path, capsys, monkeypatch
):
    workdir = trained_run[0]
    expected = _greedy_output(trained_run, NOT_UTF8)
    argv = ["--workdir", workdir, "--max-new-tokens", "6", "--temperature", "0"]

    (tmp_path / "prompt.txt").write_bytes(NOT_UTF8)
    assert generate_main(argv + ["--prompt-file", str(tmp_path / "prompt.txt")]) == 0
    assert capsys.readouterr().out == expected

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(NOT_UTF8)))
    assert generate_main(argv + ["--prompt-file", "-"]) == 0
    assert capsys.readouterr().out == expected

    # argv as Python decodes a non-UTF-8 command line (surrogateescape)
    assert generate_main(argv + ["--prompt", os.fsdecode(NOT_UTF8)]) == 0
    assert capsys.readouterr().out == expected


def test_an_unreadable_prompt_file_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    assert generate_main(["--workdir", str(tmp_path), "--prompt-file", str(missing)]) == 2
    assert f"--prompt-file {missing}: No such file or directory" in _one_error_line(capsys)


def test_top_p_keeps_the_smallest_set_reaching_p():
    from umv2_jax.generate import _nucleus

    logits = jnp.log(jnp.asarray([0.1, 0.5, 0.15, 0.25]))
    kept = np.isfinite(np.asarray(_nucleus(logits, 0.7)))  # 0.5 + 0.25 >= 0.7
    np.testing.assert_array_equal(kept, [False, True, False, True])
    kept = np.isfinite(np.asarray(_nucleus(logits, 0.3)))  # the top token alone
    np.testing.assert_array_equal(kept, [False, True, False, False])


def test_a_prompt_longer_than_the_kv_cache_is_one_line_and_exit_2(trained_run, capsys):
    workdir, (config, *_rest) = trained_run
    prompt = "x" * config.data.seq_len  # + BOS: one token more than the default cache
    assert generate_main(["--workdir", workdir, "--prompt", prompt]) == 2
    line = _one_error_line(capsys)
    assert f"the prompt is {config.data.seq_len + 1} tokens but the KV cache holds" in line, line
    assert "--cache-len" in line
    argv = ["--workdir", workdir, "--prompt", prompt, "--max-new-tokens", "3", "--temperature", "0"]
    assert generate_main(argv + ["--cache-len", str(config.data.seq_len + 1)]) == 0
    capsys.readouterr()
    assert generate_main(argv + ["--cache-len", str(config.model.max_seq_len + 1)]) == 2
    assert "exceeds the model's max_seq_len" in _one_error_line(capsys)
