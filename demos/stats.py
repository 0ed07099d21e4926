"""Small, dependency-free statistics for honest comparisons."""

from __future__ import annotations

import math


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well-behaved near 0 and 1, unlike the normal one)."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # rounding can put a bound a hair past p (at k = n, 0.9999999 < 1.0): the interval always holds p
    return (max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: b = only A right, c = only B right (paired items)."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def paired_quantile_diff_ci(
    a: list[float], b: list[float], q: float = 0.95, *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """``quantile(a) - quantile(b)`` over paired items (the same tasks) and its 95% percentile-bootstrap
    interval: whether a latency difference between two policies is more than sampling noise."""
    import random

    if len(a) != len(b) or not a:
        raise ValueError("paired samples of the same non-zero length")
    rng = random.Random(seed)
    n = len(a)
    diffs = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        diffs.append(percentile([a[i] for i in idx], q) - percentile([b[i] for i in idx], q))
    diffs.sort()
    return percentile(a, q) - percentile(b, q), percentile(diffs, 0.025), percentile(diffs, 0.975)


def finite(o: object) -> object:
    """A report with NaN and infinities as null: strict JSON that every reader accepts."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite(v) for v in o]
    return o
