"""Continual fact injection: the choice of the rows most specific to fact base B."""

import numpy as np
import pytest

from umv2_jax.eval.injection import select_specific_rows


def test_rows_hit_far_more_by_b_than_by_a_are_chosen():
    # 10 sequences of A and of B, one layer of 6 rows:
    #   row 0: A 10, B 10 (shared, not specific)    row 1: A 0, B 8 (B only: most specific)
    #   row 2: A 1, B 9 (nearly B only)             row 3: A 0, B 0 (unused)
    #   row 4: A 5, B 10 (B twice as often)          row 5: A 0, B 1 (B only, but rare)
    hits_a = np.array([[10, 0, 1, 0, 5, 0]])
    hits_b = np.array([[10, 8, 9, 0, 10, 1]])
    # score = (b/10) / (a/10 + 1/10) = b / (a + 1): 0.91, 8, 4.5, 0, 1.67, 1
    mask = select_specific_rows(hits_a, hits_b, count=2, n_a=10, n_b=10)
    np.testing.assert_array_equal(mask, [[False, True, True, False, False, False]])
    mask = select_specific_rows(hits_a, hits_b, count=4, n_a=10, n_b=10)
    np.testing.assert_array_equal(mask, [[False, True, True, False, True, True]])


def test_rows_b_never_hits_are_never_chosen_and_layers_choose_separately():
    hits_a = np.array([[0, 3, 0], [0, 0, 0]])
    hits_b = np.array([[0, 3, 0], [2, 0, 2]])
    mask = select_specific_rows(hits_a, hits_b, count=3, n_a=4, n_b=4)
    # Layer 0: only row 1 is hit by B; layer 1: rows 0 and 2 tie, both fit.
    np.testing.assert_array_equal(mask, [[False, True, False], [True, False, True]])


def test_ties_go_to_more_b_hits_then_to_the_lower_row():
    hits_a = np.array([[1, 0, 0, 3]])
    hits_b = np.array([[2, 1, 1, 4]])  # scores b / (a + 1): 1, 1, 1, 1
    mask = select_specific_rows(hits_a, hits_b, count=2, n_a=1, n_b=1)
    np.testing.assert_array_equal(mask, [[True, False, False, True]])  # B hits 4 and 2 first
    mask = select_specific_rows(hits_a[:, 1:3], hits_b[:, 1:3], count=1, n_a=1, n_b=1)
    np.testing.assert_array_equal(mask, [[True, False]])


def test_sequence_counts_scale_the_rates():
    # B hits row 0 in 5 of 5 sequences, A in 50 of 100: rates 1.0 vs 0.5 → score 1/0.51;
    # row 1: B 1 of 5, A 0 of 100 → 0.2 / 0.01 = 20: the rare-in-A row wins.
    mask = select_specific_rows(np.array([[50, 0]]), np.array([[5, 1]]), count=1, n_a=100, n_b=5)
    np.testing.assert_array_equal(mask, [[False, True]])


@pytest.mark.parametrize("kwargs", [dict(count=0, n_a=1, n_b=1), dict(count=1, n_a=0, n_b=1)])
def test_bad_counts_raise(kwargs):
    with pytest.raises(ValueError, match="must be >= 1"):
        select_specific_rows(np.zeros((1, 2)), np.zeros((1, 2)), **kwargs)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="layers, rows"):
        select_specific_rows(np.zeros((1, 2)), np.zeros((1, 3)), count=1, n_a=1, n_b=1)
