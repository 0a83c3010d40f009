"""Statistics of a comparison over paired seeds: mean ± sd and paired differences with a t-interval.

    summary(values)                     -> Summary(mean, sd, n)           sd with ddof 1
    paired_difference(a, b)             -> Difference(mean, low, high, n)  a − b paired by seed
    t_quantile(0.975, df)               Student t quantile (df ≥ 1), plain Python, no scipy

`a` and `b` are {seed: value}: seed k of one model is paired with seed k of the other (the same
initialization seed, training batches and test batches: compare.runner), and only seeds both have
count. The interval is mean(d) ± t_{1−α/2, n−1} · sd(d) / √n over the per-seed differences d, the
paired t-interval; it needs n ≥ 2. `Difference.outside` is True when the interval excludes 0: the
difference is outside what seed-to-seed noise explains at that confidence.

The t quantile inverts the t CDF, F(t) = 1 − I_x(df/2, 1/2) / 2 with x = df / (df + t²) for t > 0,
by bisection; the regularized incomplete beta I_x(a, b) is evaluated by its continued fraction
(modified Lentz), switching to I_x(a, b) = 1 − I_{1−x}(b, a) where the fraction converges slowly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Summary:
    mean: float
    sd: float  # sample sd (ddof 1); nan for n < 2
    n: int

    def text(self, digits: int = 3) -> str:
        if self.n == 0:
            return "–"
        if self.n == 1:
            return f"{_number(self.mean, digits, self.mean)} (1 seed)"
        scale = max(abs(self.mean), abs(self.sd))
        return f"{_number(self.mean, digits, scale)} ± {_number(self.sd, digits, scale)}"


@dataclasses.dataclass(frozen=True)
class Difference:
    """a − b over n paired seeds: the mean difference and its t-interval (nan bounds for n < 2)."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = CONFIDENCE

    @property
    def outside(self) -> bool:
        """The interval excludes 0 (False when there is no interval)."""
        return self.n >= 2 and (self.low > 0.0 or self.high < 0.0)

    def text(self, digits: int = 3) -> str:
        """'+0.120 [+0.050, +0.190] *' (* when the interval excludes 0), '–' without seeds."""
        if self.n == 0:
            return "–"
        if self.n < 2:
            return f"{_number(self.mean, digits, self.mean, '+')} (1 seed, no interval)"
        mark = " *" if self.outside else ""
        scale = max(abs(self.low), abs(self.high))
        low, high = (_number(v, digits, scale, "+") for v in (self.low, self.high))
        return f"{_number(self.mean, digits, scale, '+')} [{low}, {high}]{mark}"


def _number(value: float, digits: int, scale: float, sign: str = "") -> str:
    """`digits` decimals; `digits` significant digits in scientific notation when the row's
    `scale` (its largest magnitude) is below 10^−digits and not 0, so small quantities (e.g.
    knowledge bits per parameter at tiny shapes) do not print as 0.000."""
    if scale != 0 and abs(scale) < 10.0**-digits:
        return f"{value:{sign}.{max(digits - 1, 0)}e}"
    return f"{value:{sign}.{digits}f}"


def summary(values: Sequence[float]) -> Summary:
    """Mean and sample sd of the finite values (nan values are dropped)."""
    finite = [float(v) for v in values if not math.isnan(float(v))]
    if not finite:
        return Summary(math.nan, math.nan, 0)
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan
    return Summary(float(np.mean(finite)), sd, len(finite))


def paired_difference(
    a: Mapping[int, float], b: Mapping[int, float], confidence: float = CONFIDENCE
) -> Difference:
    """a − b paired by seed (seeds both have, with finite values) with its paired t-interval."""
    seeds = sorted(
        s for s in set(a) & set(b) if not (math.isnan(float(a[s])) or math.isnan(float(b[s])))
    )
    d = np.array([float(a[s]) - float(b[s]) for s in seeds], np.float64)
    n = len(d)
    if n == 0:
        return Difference(math.nan, math.nan, math.nan, 0, confidence)
    mean = float(d.mean())
    if n < 2:
        return Difference(mean, math.nan, math.nan, 1, confidence)
    half = t_quantile(0.5 + confidence / 2, n - 1) * float(d.std(ddof=1)) / math.sqrt(n)
    return Difference(mean, mean - half, mean + half, n, confidence)


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with `df` > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if t == 0.0:
        return 0.5
    tail = 0.5 * incomplete_beta(df / (df + t * t), df / 2.0, 0.5)  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T ≤ t) = p (0 < p < 1), to ~1e-12 relative, by bisection on t_cdf."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low <= 1e-13 * high:
            break
    return 0.5 * (low + high)


def incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), 0 ≤ x ≤ 1, a, b > 0."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1.0 - x, b, a) / b


def _beta_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz; converges for x < (a+1)/(a+b+2))."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return result
