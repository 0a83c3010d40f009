"""Log-likelihoods of token sequences, batched, through the KV cache: what lm-eval-harness asks.

    scorer = Scorer(model, batch_size=8)                     # any Transformer; or Scorer.from_run
    scorer.loglikelihood([(context_ids, continuation_ids), ...])   # [(sum logprob, is_greedy), ...]
    scorer.loglikelihood_rolling([ids, ...], prefix_id=bos)         # [sum logprob, ...]
    scorer.generate([prompt_ids, ...], max_new_tokens=32, stop_ids=…)   # greedy continuations

A (context, continuation) pair is scored in two cached passes per batch: the contexts, left-padded
to the batch's longest (`inference.decode.left_pad`), are prefilled into a KV cache (each row
attends its own tokens only; positions count from its first real token), then the continuations,
right-padded, extend the cache in ONE multi-token pass. logprob(continuation[0]) comes from the
prefill's last position, logprob(continuation[j]) from the extension's position j − 1. The sum is
over the continuation's tokens of log_softmax over the model's whole (padded) vocabulary — the
distribution the trainer's loss uses — and is_greedy says whether every continuation token is the
argmax at its position. Equivalent to, per pair (the tests check it):

    logits = model(np.asarray([context + continuation[:-1]]))[0][0]          # no cache
    logp = jax.nn.log_softmax(logits[len(context) - 1 :])
    sum(logp[j, continuation[j]] for j), all(logp[j].argmax() == continuation[j] for j)

Contexts longer than the window (`max_length`, default the run's `data.seq_len`) lose their oldest
tokens so that context + continuation[:-1] fits (lm-eval's rule); a continuation longer than the
window is a ValueError. Requests are sorted by length (longest first) and lengths rounded up to
powers of two, so a task compiles a handful of shapes; results come back in the caller's order.

Rolling log-likelihood (perplexity tasks) follows lm-eval's `get_rolling_token_windows` with
`make_disjoint_window`: the first window predicts tokens[:L] from [prefix] + tokens[:L-1]; each
next one predicts the next L − context_len + 1 tokens from the max_length tokens before them
(`context_len` − 1 tokens of overlap beyond the one that is always there). Every token is predicted
exactly once, so the sum over windows is the text's log-likelihood under windowed attention.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from umv2_jax.inference.cache import init_cache
from umv2_jax.inference.decode import left_pad


def rolling_windows(
    tokens: Sequence[int], prefix_id: int, max_length: int, context_len: int = 1
) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs covering `tokens` once each, lm-eval's rolling windows made
    disjoint (see the module text). Each pair's context + continuation[:-1] is ≤ max_length."""
    if not 1 <= context_len <= max_length:
        raise ValueError(f"context_len {context_len} must be in 1 … max_length {max_length}")
    tokens = list(tokens)
    if not tokens:
        return []
    pred_len = max_length - context_len + 1
    first = min(max_length, len(tokens))
    windows = [([prefix_id] + tokens[: first - 1], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        count = min(len(tokens) - predicted, pred_len)
        end = predicted + count
        context = tokens[max(end - max_length - 1, 0) : end - 1]
        windows.append((context, tokens[end - count : end]))
        predicted += count
    # make_disjoint_window: the context stops where the continuation's prediction starts.
    return [(context[: len(context) - (len(cont) - 1)], cont) for context, cont in windows]


class Scorer:
    """Batched log-likelihood scoring and greedy generation for one model (see the module text).

    model: a Transformer; batch_size: requests per forward pass; max_length: the window in tokens
    (default: config.max_seq_len); pad_id: the id in padded slots (never attended).
    """

    def __init__(
        self,
        model: nnx.Module,
        *,
        batch_size: int = 8,
        max_length: int | None = None,
        pad_id: int = 0,
        vocab_size: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be at least 1")
        self.config = model.config
        self.graphdef, self.state = nnx.split(model)
        self.batch_size = batch_size
        self.max_length = max_length or self.config.max_seq_len
        self.pad_id = pad_id
        self.vocab_size = vocab_size or self.config.vocab_size

    @classmethod
    def from_run(cls, config, parts, params, rest, **kwargs) -> Scorer:
        """A Scorer for a restored run (`training.restore.load_params`), window data.seq_len."""
        kwargs.setdefault("max_length", min(config.data.seq_len, config.model.max_seq_len))
        kwargs.setdefault("vocab_size", config.model.vocab_size)
        return cls(parts.build(params, rest), **kwargs)

    # ---- log-likelihoods ---------------------------------------------------------------------------

    def loglikelihood(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[tuple[float, bool]]:
        """[(sum of the continuation's log-probabilities, is_greedy)] per (context, continuation);
        contexts need at least one token (e.g. BOS), continuations too."""
        pairs = [self._fit(context, continuation) for context, continuation in requests]
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for begin in range(0, len(order), self.batch_size):
            chunk = order[begin : begin + self.batch_size]
            scores = self._score_batch([pairs[i] for i in chunk])
            for index, score in zip(chunk, scores):
                results[index] = score
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(
        self, texts: Sequence[Sequence[int]], prefix_id: int, context_len: int = 1
    ) -> list[float]:
        """The log-likelihood of each token list (every token predicted once, the first from
        `prefix_id`, e.g. BOS), in windows of max_length (see `rolling_windows`)."""
        pairs, owners = [], []
        for number, tokens in enumerate(texts):
            for pair in rolling_windows(tokens, prefix_id, self.max_length, context_len):
                pairs.append(pair)
                owners.append(number)
        totals = [0.0] * len(texts)
        for owner, (logprob, _) in zip(owners, self.loglikelihood(pairs)):
            totals[owner] += logprob
        return totals

    # ---- generation --------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
    ) -> list[list[int]]:
        """Greedy continuations of each prompt (left-truncated to fit max_length with the new
        tokens), cut before the first id in `stop_ids`."""
        from umv2_jax.inference.decode import generate as decode_generate

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens} must be at least 1")
        max_new_tokens = min(max_new_tokens, self.max_length - 1)
        keep = self.max_length - max_new_tokens + 1
        prompts = [list(prompt)[-keep:] for prompt in prompts]
        model = nnx.merge(self.graphdef, self.state)
        stop = set(stop_ids)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[list[int] | None] = [None] * len(prompts)
        for begin in range(0, len(order), self.batch_size):
            chunk = order[begin : begin + self.batch_size]
            rows = [prompts[i] for i in chunk]
            rows += [[self.pad_id]] * (self.batch_size - len(rows))  # fixed batch shape
            longest = max(len(row) for row in rows)
            new = decode_generate(
                model, rows, max_new_tokens, longest + max_new_tokens - 1, pad_id=self.pad_id
            )
            for index, ids in zip(chunk, new):
                cut = next((k for k, token in enumerate(ids) if token in stop), len(ids))
                out[index] = list(ids[:cut])
        return out  # type: ignore[return-value]

    # ---- internals ---------------------------------------------------------------------------------

    def _fit(self, context: Sequence[int], continuation: Sequence[int]):
        context, continuation = list(context), list(continuation)
        if not context or not continuation:
            raise ValueError("every request needs a non-empty context (e.g. BOS) and continuation")
        if len(continuation) > self.max_length:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens does not fit the window of "
                f"{self.max_length}; raise max_length or shorten it"
            )
        room = self.max_length - (len(continuation) - 1)
        return context[-room:] if room > 0 else context[-1:], continuation

    def _score_batch(self, pairs) -> list[tuple[float, bool]]:
        contexts = [context for context, _ in pairs]
        continuations = [cont for _, cont in pairs]
        count = len(pairs)
        contexts += [[self.pad_id]] * (self.batch_size - count)
        continuations += [[self.pad_id]] * (self.batch_size - count)
        width = _bucket(max(len(c) for c in contexts), self.max_length)
        tokens, start = left_pad(contexts, self.pad_id)
        if tokens.shape[1] < width:  # widen the left padding to the bucket
            extra = width - tokens.shape[1]
            tokens = np.concatenate(
                [np.full((tokens.shape[0], extra), self.pad_id, np.int32), tokens], axis=1
            )
            start = start + extra
        cont_width = _bucket(max(len(c) for c in continuations), self.max_length)
        cont = np.full((len(continuations), cont_width), self.pad_id, np.int32)
        lengths = np.zeros((len(continuations),), np.int32)
        for row, ids in enumerate(continuations):
            cont[row, : len(ids)] = ids
            lengths[row] = len(ids)
        sums, greedy = _score(
            self.graphdef,
            self.state,
            jnp.asarray(tokens),
            jnp.asarray(start),
            jnp.asarray(cont),
            jnp.asarray(lengths),
            cache_len=width + cont_width - 1,
        )
        sums, greedy = np.asarray(sums), np.asarray(greedy)
        return [(float(sums[i]), bool(greedy[i])) for i in range(count)]


def _bucket(length: int, limit: int) -> int:
    """The next power of two ≥ length, at most max(limit, length)."""
    size = 1 << max(length - 1, 0).bit_length()
    return max(length, min(size, limit))


def _head_logits(model, hidden: jax.Array) -> jax.Array:
    """The model's logits from its final hidden states (as `Transformer.__call__` computes them)."""
    dtype = model.compute_dtype
    return (hidden.astype(dtype) @ model.head_matrix().astype(dtype)).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _score(graphdef, state, tokens, start, continuation, lengths, *, cache_len):
    """(sum logprob [B], is_greedy [B]) of continuation[b, :lengths[b]] after left-padded tokens."""
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.config, tokens.shape[0], cache_len, start)
    hidden, aux = model(tokens, cache=cache, return_hidden=True)
    logits = _head_logits(model, hidden[:, -1:])  # [B, 1, V]: predicts continuation[:, 0]
    if continuation.shape[1] > 1:
        extended, _ = model(continuation[:, :-1], cache=aux.cache)  # [B, C − 1, V]
        logits = jnp.concatenate([logits, extended], axis=1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, continuation[..., None], axis=-1)[..., 0]  # [B, C]
    valid = jnp.arange(continuation.shape[1])[None, :] < lengths[:, None]
    greedy = jnp.argmax(logits, axis=-1) == continuation
    return jnp.sum(jnp.where(valid, picked, 0.0), axis=1), jnp.all(greedy | ~valid, axis=1)
