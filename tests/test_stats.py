"""The statistics the benchmarks report: a mean's 95% interval and the merge of one table per seed."""

from __future__ import annotations

import pytest

from effitrain.stats import mean_interval, over_tables


def test_a_table_per_seed_becomes_means_and_intervals():
    # three seeds; each row's gap already taken to its own seed's dense run (bench_compression's one_seed)
    tables = [[{"option": "dense", "gap": 0.0}, {"option": "qat", "gap": 1.0}, {"option": "ddp", "gap": None}],
              [{"option": "dense", "gap": 0.0}, {"option": "qat", "gap": 2.0}, {"option": "ddp", "gap": 4.0}],
              [{"option": "qat", "gap": 3.0}, {"option": "dense", "gap": 0.0}]]  # matched by name, not position
    dense, qat, ddp = over_tables(tables, name="option", keys=("gap",))
    assert [r["option"] for r in (dense, qat, ddp)] == ["dense", "qat", "ddp"]
    assert (dense["gap_mean"], dense["gap_ci95"], dense["gap_n"]) == (0.0, 0.0, 3)
    # mean 2, sample sd 1, n 3: t(2) = 4.303, half-width 4.303 / sqrt(3) = 2.484 -- the interval [-0.48, 4.48]
    # holds zero, so three seeds cannot say this gap is real
    assert qat["gap_mean"] == 2.0 and qat["gap_ci95"] == pytest.approx(4.303 / 3 ** 0.5) and qat["gap_n"] == 3
    assert (ddp["gap_mean"], ddp["gap_ci95"], ddp["gap_n"]) == (4.0, None, 1)  # one value: no interval to state


def test_interval_shrinks_with_seeds_as_t_over_root_n():
    values = [1.0, 3.0] * 5  # sd stays near 1.05 as n grows; t(9) = 2.262
    mean, half = mean_interval(values)
    assert mean == 2.0 and half == pytest.approx(2.262 * 1.0540925533894598 / 10 ** 0.5)
    assert mean_interval([1.0, 3.0])[1] == pytest.approx(12.706 * 2 ** 0.5 / 2 ** 0.5)
