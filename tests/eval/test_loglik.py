"""umv2_jax/eval/loglik.py: cached, batched, left-padded log-likelihoods equal the model's
per-token log-probabilities from a full forward pass without the cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from umv2_jax.config import load_config
from umv2_jax.eval.loglik import Scorer, rolling_windows
from umv2_jax.models.transformer import Transformer

WINDOW = 24
MODELS = {
    "umv2": [
        "model.sparse=ultramem_v2",
        "model.memory.n_keys=12",
        "model.memory.key_dim=8",
        "model.memory.rc_topk=4",
        "model.memory.topk=4",
        "model.memory.value_dim=16",
        "model.memory.pre_value_dim=8",
        "model.memory.calibration_tokens=64",
    ],
}


@pytest.fixture(scope="module")
def model():
    base = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=64"]
    config = load_config(None, base + MODELS["umv2"])
    return Transformer(config.model, nnx.Rngs(0))


def _reference(model, context, continuation):
    """(sum logprob, is_greedy) of continuation after context, from one uncached forward pass."""
    sequence = np.asarray([list(context) + list(continuation[:-1])], np.int32)
    logits = model(jnp.asarray(sequence))[0][0]
    logp = np.asarray(jax.nn.log_softmax(logits[len(context) - 1 :], axis=-1))
    total = sum(float(logp[j, token]) for j, token in enumerate(continuation))
    greedy = all(int(logp[j].argmax()) == token for j, token in enumerate(continuation))
    return total, greedy


def test_loglikelihood_equals_the_uncached_forward_pass(model):
    rng = np.random.default_rng(0)
    shapes = [(1, 1), (3, 5), (9, 2), (20, 4), (6, 1)]  # (context, continuation) lengths
    requests = [
        ([256, *rng.integers(0, 256, k - 1).tolist()], rng.integers(0, 256, c).tolist())
        for k, c in shapes
    ]
    # One request whose continuation is the model's own greedy choice: is_greedy must be True.
    context = [256, 5, 6, 7]
    greedy_token = int(np.asarray(model(jnp.asarray([context]))[0][0, -1]).argmax())
    requests.append((context, [greedy_token]))
    scorer = Scorer(model, batch_size=3, max_length=WINDOW)  # 6 requests: 2 batches, padded
    got = scorer.loglikelihood(requests)
    for (context, continuation), (logprob, greedy) in zip(requests, got):
        want, want_greedy = _reference(model, context, continuation)
        assert logprob == pytest.approx(want, rel=1e-5, abs=1e-4)
        assert greedy == want_greedy
    assert got[-1][1] is True


def test_long_contexts_lose_their_oldest_tokens(model):
    rng = np.random.default_rng(1)
    context = [256, *rng.integers(0, 256, 40).tolist()]
    continuation = rng.integers(0, 256, 3).tolist()
    ((logprob, _),) = Scorer(model, max_length=WINDOW).loglikelihood([(context, continuation)])
    kept = context[-(WINDOW - len(continuation) + 1) :]  # context + continuation[:-1] == WINDOW
    assert logprob == pytest.approx(_reference(model, kept, continuation)[0], rel=1e-5, abs=1e-4)
    with pytest.raises(ValueError, match="does not fit the window"):
        Scorer(model, max_length=4).loglikelihood([([256], [1, 2, 3, 4, 5])])


def test_rolling_windows_predict_every_token_once():
    tokens = list(range(1, 60))
    for context_len in (1, 5):
        windows = rolling_windows(tokens, 0, WINDOW, context_len)
        predicted = [token for _, continuation in windows for token in continuation]
        assert predicted == tokens
        for context, continuation in windows:
            assert len(context) + len(continuation) - 1 <= WINDOW
            whole = [0, *tokens]  # the context is what immediately precedes the continuation
            start = whole.index(continuation[0])
            assert whole[start - len(context) : start] == context
    assert rolling_windows(tokens[:10], 0, WINDOW) == [([0], tokens[:10])]  # disjoint form
    assert rolling_windows([], 0, WINDOW) == []


def test_rolling_loglikelihood_is_the_sum_over_the_texts_tokens(model):
    rng = np.random.default_rng(2)
    short = rng.integers(0, 256, 15).tolist()
    long = rng.integers(0, 256, 50).tolist()  # three windows of 24
    scorer = Scorer(model, batch_size=4, max_length=WINDOW)
    got = scorer.loglikelihood_rolling([short, long], prefix_id=256)
    # Short text: one full forward pass over [BOS] + text, every token's log-probability summed.
    logits = model(jnp.asarray([[256, *short[:-1]]]))[0][0]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    want = sum(float(logp[j, token]) for j, token in enumerate(short))
    assert got[0] == pytest.approx(want, rel=1e-5, abs=1e-4)
    # Long text: the windows' uncached sums.
    want = sum(_reference(model, c, t)[0] for c, t in rolling_windows(long, 256, WINDOW))
    assert got[1] == pytest.approx(want, rel=1e-5, abs=1e-3)


def test_generate_is_greedy_and_stops(model):
    scorer = Scorer(model, batch_size=2, max_length=WINDOW)
    prompts = [[256, 10, 20, 30], [256, 40]]
    new = scorer.generate(prompts, 5)
    for prompt, ids in zip(prompts, new):
        assert len(ids) == 5
        sequence = prompt + ids
        vocab = model.config.vocab_size  # generation picks among real ids only
        logits = np.asarray(model(jnp.asarray([sequence]))[0][0, :, :vocab])
        np.testing.assert_array_equal(logits[len(prompt) - 1 : -1].argmax(-1), ids)
    stopped = scorer.generate(prompts, 5, stop_ids=[new[0][2]])
    assert stopped[0] == new[0][: new[0].index(new[0][2])]
