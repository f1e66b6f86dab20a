"""Tests of the seeded bootstrap intervals (:mod:`lora_lens.stats`), their one home."""

from __future__ import annotations

import numpy as np
import pytest

from lora_lens import stats
from lora_lens.errors import ConfigError
from lora_lens.studies import compare, patterns


def test_the_intervals_have_one_home_and_the_studies_re_export_it():
    for name in ("bootstrap_ci", "pooled_ci"):
        assert getattr(patterns, name) is getattr(stats, name) is getattr(compare, name)
        assert name in patterns.__all__ and name in compare.__all__


def test_bootstrap_ci_is_deterministic_and_contains_the_mean():
    values = [0.61, 0.55, 0.72, 0.58, 0.66]
    first = stats.bootstrap_ci(values, n_boot=1000, seed=3)
    assert stats.bootstrap_ci(values, n_boot=1000, seed=3) == first
    mean, lo, hi = first
    assert mean == pytest.approx(np.mean(values))
    assert min(values) <= lo <= mean <= hi <= max(values)
    # a wider level gives a wider (or equal) interval
    _, lo80, hi80 = stats.bootstrap_ci(values, n_boot=1000, level=0.8, seed=3)
    assert lo <= lo80 and hi80 <= hi


def test_bootstrap_ci_of_one_value_or_equal_values_is_a_point():
    assert stats.bootstrap_ci([0.4]) == (0.4, 0.4, 0.4)
    m, lo, hi = stats.bootstrap_ci([2.0, 2.0, 2.0])
    assert m == lo == hi == pytest.approx(2.0)


@pytest.mark.parametrize("values, kwargs, needle", [
    ([], {}, "empty"),
    ([0.1, float("nan")], {}, "NaN"),
    ([0.1, 0.2], {"n_boot": 0}, "n_boot=0"),
    ([0.1, 0.2], {"level": 1.5}, "level=1.5"),
])
def test_bootstrap_ci_rejects_bad_input(values, kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        stats.bootstrap_ci(values, **kwargs)


def test_pooled_ci_weighs_families_equally_and_is_deterministic():
    groups = {"a": [0.9, 0.9, 0.9, 0.9, 0.9, 0.9], "b": [0.1, 0.2, 0.3]}
    m, lo, hi = stats.pooled_ci(groups, seed=0)
    assert m == pytest.approx((0.9 + 0.2) / 2)  # mean of family means, not of all runs
    assert lo <= m <= hi
    assert stats.pooled_ci(groups, seed=0) == (m, lo, hi)
    with pytest.raises(ConfigError, match="groups is empty"):
        stats.pooled_ci({})


def test_over_seeds_is_the_mean_and_interval_of_the_values_and_keeps_a_missing_seed():
    r = stats.over_seeds([0.2, None, 0.6])
    assert r["values"] == [0.2, None, 0.6]
    assert (r["mean"], r["ci_low"], r["ci_high"]) == stats.bootstrap_ci([0.2, 0.6])
    assert stats.over_seeds([None, None]) == {"mean": None, "ci_low": None, "ci_high": None, "values": [None, None]}
    with pytest.raises(ConfigError, match="one value per seed"):
        stats.over_seeds([])
    with pytest.raises(ConfigError, match="NaN"):
        stats.over_seeds([0.1, float("nan")])


def test_headline_writes_the_summary_convention_beside_the_key():
    h = stats.headline("recall", [1.0, 0.8, 0.9])
    mean, lo, hi = stats.bootstrap_ci([1.0, 0.8, 0.9])
    assert h == {"recall": mean, "recall_ci_low": lo, "recall_ci_high": hi, "recall_values": [1.0, 0.8, 0.9]}
    assert lo < mean < hi
    with pytest.raises(ConfigError, match="key=''"):
        stats.headline("", [1.0])
