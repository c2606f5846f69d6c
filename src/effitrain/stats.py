"""The few statistics the benchmarks and serve-cost report: percentiles, the coefficient of variation, and a mean
with its 95% confidence interval (Student's t, from a table: no scipy needed for one number)."""

from __future__ import annotations

import math
import statistics

# two-sided 95% critical values of Student's t by degrees of freedom (1..30); beyond, the normal's 1.96 is within 4%
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def cv(values: list[float]) -> float:
    """Coefficient of variation: the sample standard deviation over the mean (0 for a single value)."""
    return statistics.stdev(values) / statistics.mean(values) if len(values) > 1 else 0.0


def mean_interval(values: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of its 95% confidence interval: t(n-1) x s / sqrt(n)); the half-width is None for one
    value, where there is no spread to state."""
    mean = statistics.mean(values)
    n = len(values)
    if n < 2:
        return mean, None
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96
    return mean, t * statistics.stdev(values) / math.sqrt(n)


def over_tables(tables: list[list[dict]], *, name: str, keys: tuple[str, ...]) -> list[dict]:
    """Rows of several tables of the same rows (one table per seed), matched by `name`: per row, for each of `keys`
    its mean and 95% half-width over the tables that have a value for it (`<key>_mean`, `<key>_ci95`, `<key>_n`),
    in the first table's order."""
    out = []
    for first in tables[0]:
        same = [row for table in tables for row in table if row[name] == first[name]]
        merged = {name: first[name]}
        for key in keys:
            values = [row[key] for row in same if row.get(key) is not None]
            mean, half = mean_interval(values) if values else (None, None)
            merged |= {f"{key}_mean": mean, f"{key}_ci95": half, f"{key}_n": len(values)}
        out.append(merged)
    return out
