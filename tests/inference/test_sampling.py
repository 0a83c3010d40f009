"""Sampling (umv2_jax.inference.sampling) on hand-made logits with known answers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from umv2_jax.inference.sampling import sample, sampling_logits, top_k_mask, top_p_mask

LOGITS = jnp.asarray(
    [
        [0.0, 3.0, 1.0, 2.0, -1.0],
        [5.0, 5.0, 0.0, -2.0, 1.0],  # a tie at the top
    ]
)


def _kept(masked) -> np.ndarray:
    return np.isfinite(np.asarray(masked))


def test_top_k_keeps_the_k_largest_of_each_row_and_ties_at_the_cutoff():
    np.testing.assert_array_equal(
        _kept(top_k_mask(LOGITS, 2)),
        [[False, True, False, True, False], [True, True, False, False, False]],
    )
    np.testing.assert_array_equal(
        _kept(top_k_mask(LOGITS, 1)),
        [[False, True, False, False, False], [True, True, False, False, False]],  # tie kept
    )
    np.testing.assert_array_equal(np.asarray(top_k_mask(LOGITS, 0)), np.asarray(LOGITS))
    np.testing.assert_array_equal(np.asarray(top_k_mask(LOGITS, 5)), np.asarray(LOGITS))


def test_top_p_keeps_the_smallest_most_likely_set_reaching_p_per_row():
    logits = jnp.log(jnp.asarray([[0.1, 0.5, 0.15, 0.25], [0.4, 0.3, 0.2, 0.1]]))
    np.testing.assert_array_equal(
        _kept(top_p_mask(logits, 0.7)),  # 0.5 + 0.25 >= 0.7 | 0.4 + 0.3 >= 0.7
        [[False, True, False, True], [True, True, False, False]],
    )
    np.testing.assert_array_equal(
        _kept(top_p_mask(logits, 0.71)),  # | 0.4 + 0.3 < 0.71: a third token
        [[False, True, False, True], [True, True, True, False]],
    )
    np.testing.assert_array_equal(
        _kept(top_p_mask(logits, 0.05)),  # the top token alone
        [[False, True, False, False], [True, False, False, False]],
    )


def test_greedy_is_the_argmax_and_ignores_the_key():
    np.testing.assert_array_equal(np.asarray(sample(LOGITS[:1], None)), [1])


def test_sampling_draws_only_kept_tokens_with_the_right_frequencies():
    # Two tokens survive top-k 2 at probabilities e^3 : e^2 → 0.731 : 0.269.
    logits = jnp.broadcast_to(LOGITS[0], (4000, 5))
    draws = np.asarray(sample(logits, jax.random.key(0), temperature=1.0, top_k=2))
    assert set(np.unique(draws)) == {1, 3}
    assert np.mean(draws == 1) == pytest.approx(np.e / (np.e + 1), abs=0.03)
    # Temperature 0.5 doubles the logits: e^6 : e^4 → 0.881.
    draws = np.asarray(sample(logits, jax.random.key(0), temperature=0.5, top_k=2))
    assert np.mean(draws == 1) == pytest.approx(np.e**2 / (np.e**2 + 1), abs=0.03)


# Probabilities 0.4, 0.3, 0.2, 0.1. Temperature 2 takes their square roots (renormalized):
# 0.632456, 0.547723, 0.447214, 0.316228 (sum 1.943621) → 0.325406, 0.281807, 0.230094, 0.162700.
# Top-p 0.65 after the temperature: the mass ranked above the third token is 0.607213 < 0.65, so it
# stays: {0, 1, 2}, drawn at 0.632456 : 0.547723 : 0.447214 (sum 1.627393) →
# 0.388631, 0.336564, 0.274805. Top-p before it would keep {0, 1} only (0.4 + 0.3 ≥ 0.65).
ORDER_LOGITS = jnp.log(jnp.asarray([0.4, 0.3, 0.2, 0.1]))
AFTER_TEMPERATURE = [0.388631, 0.336564, 0.274805, 0.0]
# Top-k 2 then top-p 0.5 at temperature 1: top-p sees top-k's renormalized 4/7, 3/7, so the top
# token alone reaches 0.5: {0}. Top-p first would keep {0, 1} (0.4 < 0.5), and top-k 2 both.
TOP_K_THEN_TOP_P = [1.0, 0.0, 0.0, 0.0]


def test_temperature_comes_before_top_p_and_top_k_before_top_p_exact_probabilities():
    probabilities = jax.nn.softmax(sampling_logits(ORDER_LOGITS, 2.0, top_p=0.65))
    np.testing.assert_allclose(probabilities, AFTER_TEMPERATURE, atol=2e-6)
    probabilities = jax.nn.softmax(sampling_logits(ORDER_LOGITS, 1.0, top_k=2, top_p=0.5))
    np.testing.assert_allclose(probabilities, TOP_K_THEN_TOP_P, atol=1e-7)


def test_sampling_frequencies_follow_the_temperature_then_top_p_order():
    """20,000 draws, fixed key: each frequency within 0.015 of the exact probability (about 4.5
    standard deviations, sqrt(p(1-p)/20000) ≤ 0.0035); dropped tokens never drawn."""
    logits = jnp.broadcast_to(ORDER_LOGITS, (20_000, 4))
    draws = np.asarray(sample(logits, jax.random.key(0), temperature=2.0, top_p=0.65))
    frequencies = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(frequencies, AFTER_TEMPERATURE, atol=0.015)
    assert frequencies[3] == 0
    draws = np.asarray(sample(logits, jax.random.key(1), temperature=1.0, top_k=2, top_p=0.5))
    np.testing.assert_array_equal(np.unique(draws), [0])


def test_sampling_is_deterministic_per_key():
    logits = jnp.zeros((64, 50))
    first = np.asarray(sample(logits, jax.random.key(7), temperature=1.0))
    np.testing.assert_array_equal(np.asarray(sample(logits, jax.random.key(7), 1.0)), first)
    assert not np.array_equal(np.asarray(sample(logits, jax.random.key(8), 1.0)), first)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(temperature=-1.0), "temperature -1.0"),
        (dict(temperature=float("nan")), "temperature nan"),
        (dict(temperature=1.0, top_k=-2), "top_k -2"),
        (dict(temperature=1.0, top_p=0.0), "top_p 0.0"),
        (dict(temperature=1.0, top_p=1.5), "top_p 1.5"),
    ],
)
def test_bad_sampling_arguments_name_themselves(options, message):
    with pytest.raises(ValueError, match=message):
        sample(LOGITS, jax.random.key(0), **options)
