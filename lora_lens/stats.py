"""Numbers that hold: the seeded bootstrap interval of a mean, over runs or pooled over groups of runs.

One home for the intervals every headline claim carries: :func:`bootstrap_ci` (a percentile bootstrap of the mean
of one number per run, e.g. per seed) and :func:`pooled_ci` (a stratified bootstrap of the mean of group means,
e.g. seeds within families). Both are seeded, so the same input gives the same interval on every machine; the
ledger's ``rule="interval"`` and the cross-family patterns read them here. :func:`over_seeds` and :func:`headline`
turn a notebook's per-seed values of a headline number into what its ``summary.json`` records.

Convention of a headline number over seeds in ``summary.json`` (notebooks 01-03): the number keeps its key and holds
the mean; beside it ``<key>_ci_low`` and ``<key>_ci_high`` (the 95 % interval of :func:`bootstrap_ci`) and
``<key>_values`` (one value per seed, in the order of the summary's ``seeds``).

Example:
    >>> m, lo, hi = bootstrap_ci([0.2, 0.4, 0.6])
    >>> lo <= m <= hi
    True
"""

from __future__ import annotations

import numpy as np

from lora_lens.errors import ConfigError

__all__ = ["bootstrap_ci", "headline", "over_seeds", "pooled_ci"]


def _finite(values, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        raise ConfigError(f"{what} is empty: pass at least one value")
    if not np.isfinite(x).all():
        raise ConfigError(f"{what}={x.tolist()} contains NaN or inf: drop the runs that have no value")
    return x


def _check_boot(n_boot, level) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ConfigError(f"n_boot={n_boot!r} must be a positive integer")
    if not isinstance(level, (int, float)) or isinstance(level, bool) or not 0 < level < 1:
        raise ConfigError(f"level={level!r} must be a probability in (0, 1), e.g. 0.95")


def bootstrap_ci(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile bootstrap interval of the mean (seeded: the same input gives the same interval).

    Args:
        values: One number per run (e.g. per seed).
        n_boot: Bootstrap resamples.
        level: Interval coverage (0.95 for a 95% interval).
        seed: Seed of the resampling.

    Returns:
        ``(mean, low, high)``; a single value gives ``(v, v, v)``.

    Raises:
        ConfigError: Empty or non-finite values, a bad ``n_boot`` or ``level``.

    Example:
        >>> m, lo, hi = bootstrap_ci([0.2, 0.4, 0.6])
        >>> lo <= m <= hi
        True
    """
    x = _finite(values, "values")
    _check_boot(n_boot, level)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(x.mean()), float(lo), float(hi)


def pooled_ci(groups: dict, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean of group means with a stratified bootstrap interval (resampling within each group, e.g. seeds within
    families, so that every family weighs the same whatever its number of runs).

    Returns:
        ``(mean of group means, low, high)``.

    Raises:
        ConfigError: No groups, or an empty / non-finite group.
    """
    if not groups:
        raise ConfigError("groups is empty: pass {family: [values per seed]}")
    xs = [_finite(v, f"groups[{k!r}]") for k, v in groups.items()]
    _check_boot(n_boot, level)
    rng = np.random.default_rng(seed)
    boot = np.mean([x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1) for x in xs], axis=0)
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(np.mean([x.mean() for x in xs])), float(lo), float(hi)


def over_seeds(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """A headline number over seeds: ``{"mean", "ci_low", "ci_high", "values"}`` (the interval of
    :func:`bootstrap_ci`).

    Args:
        values: One value per seed; ``None`` for a seed that has no value (e.g. a model without middle layers): it
            is kept in ``values`` and left out of the mean. All ``None`` gives ``None`` for the mean and interval.
        n_boot, level, seed: As in :func:`bootstrap_ci`.

    Raises:
        ConfigError: No values, a NaN or inf, a bad ``n_boot`` or ``level``.

    Example:
        >>> over_seeds([1.0, None, 0.5])["mean"]
        0.75
    """
    values = list(values)
    if not values:
        raise ConfigError("values is empty: pass one value per seed")
    given = [v for v in values if v is not None]
    if not given:
        return {"mean": None, "ci_low": None, "ci_high": None, "values": values}
    mean, lo, hi = bootstrap_ci(given, n_boot=n_boot, level=level, seed=seed)
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "values": [None if v is None else float(v) for v in values]}


def headline(key: str, values, **kw) -> dict:
    """The ``summary.json`` entries of a headline number over seeds: ``{key: mean, key_ci_low, key_ci_high,
    key_values}`` (see the module docstring; ``kw`` go to :func:`over_seeds`).

    Example:
        >>> sorted(headline("recall", [1.0, 0.9, 1.0]))
        ['recall', 'recall_ci_high', 'recall_ci_low', 'recall_values']
    """
    if not isinstance(key, str) or not key:
        raise ConfigError(f"key={key!r} must be a non-empty string naming the summary entry")
    r = over_seeds(values, **kw)
    return {key: r["mean"], f"{key}_ci_low": r["ci_low"], f"{key}_ci_high": r["ci_high"], f"{key}_values": r["values"]}
