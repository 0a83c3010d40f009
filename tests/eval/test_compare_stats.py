"""compare.stats against hand-computed cases: t quantiles, the paired t-interval, summaries."""

import math

import pytest

from umv2_jax.compare.stats import (
    incomplete_beta,
    paired_difference,
    summary,
    t_cdf,
    t_quantile,
)


def test_t_quantile_closed_forms():
    # df = 1 is Cauchy: t_p = tan(π (p − 1/2)); df = 2: t_p = (2p − 1) √(2 / (4p(1 − p))).
    for p in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
        assert t_quantile(p, 2) == pytest.approx(
            (2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))), rel=1e-10
        )


def test_t_quantile_table_values():
    # Printed Student t tables, two-sided 95% (p = 0.975), and the normal limit.
    table = {2: 4.302653, 3: 3.182446, 4: 2.776445, 9: 2.262157, 29: 2.045230}
    for df, value in table.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=2e-6)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)
    assert t_quantile(0.025, 4) == pytest.approx(-2.776445, abs=2e-6)  # symmetric
    assert t_quantile(0.5, 7) == 0.0


def test_t_cdf_and_incomplete_beta_closed_forms():
    # I_x(a, 1) = x^a; I_x(1, b) = 1 − (1 − x)^b; df = 1: F(t) = 1/2 + atan(t) / π.
    assert incomplete_beta(0.3, 2.5, 1.0) == pytest.approx(0.3**2.5, rel=1e-12)
    assert incomplete_beta(0.8, 1.0, 3.0) == pytest.approx(1 - 0.2**3, rel=1e-12)
    for t in (-3.0, -0.5, 0.7, 12.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, rel=1e-12)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_paired_difference_worked_example():
    # d = (0.3, 0.1, 0.4): mean 0.26667, sd 0.152753, se 0.088192, t_{0.975,2} 4.302653:
    # half width 0.379459 → [−0.112792, 0.646125], which holds 0: not marked.
    a = {0: 0.9, 1: 0.8, 2: 0.7}
    b = {0: 0.6, 1: 0.7, 2: 0.3}
    diff = paired_difference(a, b)
    assert (diff.mean, diff.n) == (pytest.approx(0.266667, abs=1e-6), 3)
    assert diff.low == pytest.approx(-0.112792, abs=1e-6)
    assert diff.high == pytest.approx(0.646125, abs=1e-6)
    assert not diff.outside
    assert diff.text() == "+0.267 [-0.113, +0.646]"


def test_paired_difference_marks_an_interval_that_excludes_zero():
    # d = (0.10, 0.12, 0.11, 0.13): mean 0.115, sd 0.0129099, t_{0.975,3} 3.182446:
    # half 0.0205426 → [0.0944574, 0.1355426].
    diff = paired_difference({0: 0.5, 1: 0.62, 2: 0.41, 3: 0.33}, {0: 0.4, 1: 0.5, 2: 0.3, 3: 0.2})
    assert diff.low == pytest.approx(0.0944574, abs=1e-6)
    assert diff.high == pytest.approx(0.1355426, abs=1e-6)
    assert diff.outside and diff.text().endswith(" *")
    assert paired_difference({0: 0.0, 1: 0.0}, {0: 1.0, 1: 1.1}).outside  # negative, excluded


def test_pairing_is_by_seed_not_by_position():
    # Seed 2 is missing from b: only seeds 0 and 1 pair; a's order does not matter.
    diff = paired_difference({2: 100.0, 1: 3.0, 0: 1.0}, {0: 0.0, 1: 1.0})
    assert diff.n == 2 and diff.mean == pytest.approx(1.5)
    # Pairing removes the seed effect that an unpaired comparison would keep:
    # a = b + 0.01 exactly, seeds spread widely → a tiny interval around 0.01.
    b = {0: 0.1, 1: 0.5, 2: 0.9}
    diff = paired_difference({k: v + 0.01 for k, v in b.items()}, b)
    assert diff.outside and diff.mean == pytest.approx(0.01)
    assert diff.high - diff.low < 1e-9


def test_one_seed_has_no_interval_and_summary_drops_nan():
    single = paired_difference({0: 1.0}, {0: 0.5})
    assert single.n == 1 and not single.outside and "no interval" in single.text()
    assert paired_difference({}, {0: 1.0}).text() == "–"
    s = summary([1.0, float("nan"), 2.0, 3.0])
    assert (s.mean, s.sd, s.n) == (2.0, 1.0, 3)
    assert s.text() == "2.000 ± 1.000"
    assert summary([0.5]).text() == "0.500 (1 seed)"
    assert summary([]).text() == "–"


def test_small_quantities_keep_significant_digits():
    assert summary([0.0004, 0.0006]).text() == "5.00e-04 ± 1.41e-04"
    diff = paired_difference({0: 0.0003, 1: 0.0005}, {0: 0.0001, 1: 0.0002})
    assert diff.text() == "+2.50e-04 [-3.85e-04, +8.85e-04]"
    assert summary([0.0, 0.0]).text() == "0.000 ± 0.000"
