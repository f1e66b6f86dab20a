"""When is the top direction shared between two ranks? φ(1, 1) between r = 8 and r = 64 across training conditions.

Hu et al. (2021, §7) found the top singular direction of a rank-8 and a rank-64 adapter trained on the same task
largely shared (φ > 0.5 on GPT-3's W_q, W_v). :func:`rank_phi_sweep` trains both ranks under each *condition* —
a change of the task size (``k`` edited facts), the training budget (``steps``), the learning rate (``lr``), the
initialisation (``init``: peft's kaiming default, ``gaussian``, ``pissa``, ``olora``), the rsLoRA scaling
(``rslora``), the rehearsal (``replay``) or the zoo model size (``size``) — on every seed, and puts beside each
condition's mean φ(1, 1) over the adapted modules (with its 95 % bootstrap interval over the seeds,
:func:`lora_lens.stats.over_seeds`) the Monte Carlo null of two random adapters of the same shapes and ranks
(:func:`lora_lens.lens.delta.random_phi`, ≈ 1/d).

Seeds follow notebook 02 (:func:`lora_lens.lab.study.seed_list`): on the zoo seed s is the world's, the base's
pretraining and the adapter's seed; on your own model (``base_model``) only the adapter's. Adapters come from the
adapter cache (:func:`lora_lens.lab.study.fit_adapter`), so the default condition reuses notebook 02's own.
``workers=N`` trains N (condition, seed) pairs at once in worker processes (:func:`lora_lens.workers.run_jobs`).

Example:
    >>> df = rank_phi_sweep({"default": {}, "4x steps": {"steps": 800}}, seeds=[0, 1, 2])   # doctest: +SKIP
    >>> df[["condition", "phi", "phi_ci_low", "phi_ci_high", "null", "ratio"]]              # doctest: +SKIP
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from lora_lens.errors import ConfigError
from lora_lens.figures import styled
from lora_lens.lab.study import fit_adapter
from lora_lens.lab.train import INITS, default_spec
from lora_lens.lab.world import make_task, make_world
from lora_lens.lab.zoo import SIZES, get_pretrained
from lora_lens.lens import delta
from lora_lens.stats import over_seeds
from lora_lens.workers import check_devices, check_workers, run_jobs, worker_device

__all__ = ["CONDITION_KEYS", "DEFAULT_CONDITIONS", "FULL_CONDITIONS", "plot_rank_phi", "rank_phi_sweep",
           "shared_conditions", "sweep_records"]

CONDITION_KEYS = ("size", "k", "steps", "lr", "init", "rslora", "replay")
"""What a condition may change: the zoo size, the number of edited facts ``k`` (zoo only) and :class:`LoraSpec`
fields."""

DEFAULT_CONDITIONS = {"default": {}, "50 steps": {"steps": 50}}
"""Notebook 02's workshop sweep: the default training (its own adapters, from the cache) and a quarter of the steps."""

FULL_CONDITIONS = {
    "default": {}, "50 steps": {"steps": 50}, "400 steps": {"steps": 400}, "lr 1e-3": {"lr": 1e-3},
    "lr 1e-2": {"lr": 1e-2}, "40 edits": {"k": 40}, "no rehearsal": {"replay": 0.0},
    "gaussian init": {"init": "gaussian"}, "pissa init": {"init": "pissa"}, "rsLoRA": {"rslora": True},
}
"""The full sweep on the zoo small model (one change from the default each). ``size`` is a condition too, but the
tiny model cannot hold r = 64 (its k/v projections are 32 → 16) and ``base`` needs three bases pretrained."""


def _check_conditions(conditions, real: bool) -> dict:
    if isinstance(conditions, (list, tuple)):
        conditions = {_label(c): c for c in conditions}
    if not isinstance(conditions, dict) or not conditions:
        raise ConfigError(f"conditions={conditions!r} must be a non-empty dict {{label: {{field: value}}}} (or a list "
                          f"of such dicts), fields from {list(CONDITION_KEYS)}; e.g. {{'default': {{}}, '4x steps': "
                          "{'steps': 800}}")
    for label, c in conditions.items():
        if not isinstance(c, dict):
            raise ConfigError(f"condition {label!r}={c!r} must be a dict of fields from {list(CONDITION_KEYS)}")
        bad = sorted(set(c) - set(CONDITION_KEYS))
        if bad:
            raise ConfigError(f"condition {label!r} has unknown fields {bad}: use fields from {list(CONDITION_KEYS)}")
        if real and ("size" in c or "k" in c):
            raise ConfigError(f"condition {label!r} changes {sorted({'size', 'k'} & set(c))}, which exist only on the "
                              "zoo (a synthetic world); with base_model use LoraSpec fields (steps, lr, init, …)")
        if "size" in c and c["size"] not in SIZES:
            raise ConfigError(f"condition {label!r}: size={c['size']!r} must be one of {list(SIZES)}")
        if "init" in c and c["init"] not in INITS:
            raise ConfigError(f"condition {label!r}: init={c['init']!r} must be one of {list(INITS)}")
        if "k" in c and (isinstance(c["k"], bool) or not isinstance(c["k"], int) or c["k"] < 1):
            raise ConfigError(f"condition {label!r}: k={c['k']!r} must be a positive number of edited facts")
        default_spec(None, **{f: v for f, v in c.items() if f not in ("size", "k")})   # a bad spec field fails now
    return conditions


def _label(c: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in c.items()) or "default"


def _zoo_base(base: dict, cond: dict, s: int, device: str):
    """The zoo base of one condition × seed of :func:`rank_phi_sweep` (from the cache; pretrained when absent)."""
    return get_pretrained(base["family"], cond.get("size", base["size"]),
                          world=make_world(n_entities=base["n_entities"], seed=s), seed=s, device=device,
                          cache=base["cache"])


def _pair_run(label: str, cond: dict, s: int, base: dict) -> tuple[dict, float]:
    """One condition × seed of :func:`rank_phi_sweep` (here or in a worker: :mod:`lora_lens.workers`): the two
    ranks' adapters and their φ; ``(per-seed record, seconds)``."""
    t0 = time.perf_counter()
    device, cache = worker_device(base["device"]), base["cache"]
    small_rank, large_rank, n_null = base["small_rank"], base["large_rank"], base["n_null"]
    spec = {f: v for f, v in cond.items() if f not in ("size", "k")}
    if base["real"]:
        pre, task = base["base_model"], base["task_file"]
    else:
        pre = _zoo_base(base, cond, s, device)
        task = make_task(pre.world, "fact_edit", seed=s, **({"k": cond["k"]} if "k" in cond else {}))
    fits = {r: fit_adapter(pre, task, seed=s, rank=r, device=device, cache=cache, **spec)
            for r in dict.fromkeys((small_rank, large_rank))}
    m1, m2 = (delta.lora_modules(fits[r].model) for r in (small_rank, large_rank))
    null = delta.random_phi(m1, m2, 1, 1, n_samples=n_null, seed=1000 * s)
    record = {
        "condition": label, "seed": s,
        "phi": float(delta.phi_table(m1, m2, 1, 1)["phi"].mean()),
        "phi_left": float(delta.phi_table(m1, m2, 1, 1, side="left")["phi"].mean()),
        "null": float(null.mean()), "null_high": float(np.quantile(null, 0.975)),
        "null_left": float(delta.random_phi(m1, m2, 1, 1, side="left", n_samples=n_null, seed=1000 * s).mean()),
        "efficacy_small": fits[small_rank].evaluation.metrics.get("efficacy"),
        "efficacy_large": fits[large_rank].evaluation.metrics.get("efficacy")}
    return record, time.perf_counter() - t0


def rank_phi_sweep(conditions=None, seeds=(0, 1, 2), family: str = "llama", size: str = "small",
                   n_entities: int = 200, small_rank: int = 8, large_rank: int = 64, base_model: str = "",
                   task_file: str = "", n_null: int = 16, device: str = "cpu", cache=None,
                   log=None, workers: int = 1, devices=None) -> pd.DataFrame:
    """φ(1, 1) between a rank-``small_rank`` and a rank-``large_rank`` adapter under each condition, over seeds.

    Args:
        conditions: ``{label: {field: value}}`` (fields :data:`CONDITION_KEYS`; ``{}`` is the default training of
            the task kind) or a list of such dicts (labelled by their fields); default :data:`DEFAULT_CONDITIONS`.
        seeds: Seeds (≥ 3 for an interval that means something).
        family, size, n_entities: The zoo base and world (ignored with ``base_model``).
        small_rank, large_rank: The two ranks compared (equal ranks compare two adapters of one seed and rank: the
            same adapter, φ = 1).
        base_model, task_file: Your own model and its JSONL task instead of the zoo (conditions without ``size`` and
            ``k``).
        n_null: Random adapter pairs per seed for the null (:func:`lora_lens.lens.delta.random_phi`).
        device: Torch device.
        cache: Cache root (default: the shared one).
        log: Optional callable receiving one line per trained pair (progress; as pairs finish).
        workers: Processes the (condition, seed) pairs are spread over (:func:`lora_lens.workers.run_jobs`): 1
            trains them here one after another; N > 1 pretrains every zoo base here first, then trains N pairs at
            once (CPUs // N threads each, N copies of a base in memory). The same numbers either way (seeded).
        devices: With ``workers > 1``, torch devices the workers take in turn (e.g. ``["cuda:0", "cuda:1"]``).

    Returns:
        One row per condition: ``condition`` (its label), the condition's fields, ``n_seeds``; ``phi`` (mean over
        the seeds of the mean φ(1, 1) over the adapted modules, input side as in the paper), ``phi_ci_low``,
        ``phi_ci_high`` (95 % bootstrap interval), ``phi_values`` (per seed); ``phi_left`` and its interval (output
        side); ``null`` (mean of the random pairs, input side), ``null_high`` (their 97.5 % quantile), ``null_left``;
        ``ratio`` = phi / null; ``efficacy_small``, ``efficacy_large`` (mean efficacy of the two ranks, so a
        condition that did not learn the task shows); ``seconds`` (spent on the condition's pairs, summed).
        ``df.attrs["per_seed"]`` holds one dict per condition and seed (a list, so that ``pd.concat`` of two sweeps
        works).

    Raises:
        ConfigError: Bad conditions, seeds, ranks, ``n_null``, ``workers`` or ``devices`` (before anything is
            trained).
        WorkerError: With ``workers > 1``, a pair failed in its worker (named, with the worker's traceback).
    """
    real = bool(base_model)
    check_workers(workers)
    check_devices(devices)
    conditions = _check_conditions(DEFAULT_CONDITIONS if conditions is None else conditions, real)
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ConfigError(f"seeds={seeds!r} must be a non-empty list of integers, e.g. [0, 1, 2]")
    for name, r in (("small_rank", small_rank), ("large_rank", large_rank)):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ConfigError(f"{name}={r!r} must be a positive integer rank")
    if small_rank > large_rank:
        raise ConfigError(f"small_rank={small_rank} > large_rank={large_rank}: pass the smaller rank first")
    if real and not task_file:
        raise ConfigError("base_model is given without task_file: pass the JSONL task both adapters are trained on")
    base = {"real": real, "base_model": base_model, "task_file": task_file, "family": family, "size": size,
            "n_entities": n_entities, "small_rank": small_rank, "large_rank": large_rank, "n_null": n_null,
            "device": device, "cache": cache}
    jobs = [(label, cond, s, base) for label, cond in conditions.items() for s in seeds]
    if workers > 1 and not real:   # every zoo base pretrained here once, before the workers load it from the cache
        for cond, s in {(cond.get("size", size), s): (cond, s) for _, cond, s, _ in jobs}.values():
            _zoo_base(base, cond, s, device)

    def logged(i, result):
        if log is not None:
            p = result[0]
            log(f"{p['condition']} seed {p['seed']}: φ(1,1) {p['phi']:.3f} (null {p['null']:.4f})")

    results = run_jobs(_pair_run, jobs, workers=workers, devices=devices, desc="rank pairs", on_done=logged)
    rows, per_seed = [], [p for p, _ in results]
    for label, cond in conditions.items():
        ps = [p for p in per_seed if p["condition"] == label]
        phi, left = over_seeds([p["phi"] for p in ps]), over_seeds([p["phi_left"] for p in ps])
        null = float(np.mean([p["null"] for p in ps]))
        eff = {k: (float(np.mean(v)) if all(x is not None for x in v) else None)
               for k in ("efficacy_small", "efficacy_large") for v in [[p[k] for p in ps]]}
        rows.append({"condition": label, **{f: cond.get(f) for f in CONDITION_KEYS}, "n_seeds": len(ps),
                     "phi": phi["mean"], "phi_ci_low": phi["ci_low"], "phi_ci_high": phi["ci_high"],
                     "phi_values": phi["values"], "phi_left": left["mean"], "phi_left_ci_low": left["ci_low"],
                     "phi_left_ci_high": left["ci_high"], "null": null,
                     "null_high": float(np.max([p["null_high"] for p in ps])),
                     "null_left": float(np.mean([p["null_left"] for p in ps])), "ratio": phi["mean"] / null,
                     **eff, "seconds": float(sum(t for p, t in results if p["condition"] == label))})
    df = pd.DataFrame(rows)
    for f in CONDITION_KEYS:                                   # unset fields stay None (not NaN)
        df[f] = pd.Series([r[f] for r in rows], dtype=object)
    df.attrs.update({"per_seed": per_seed, "seeds": seeds, "ranks": [small_rank, large_rank],
                     "base": base_model or f"{family}/{size}"})
    return df


def shared_conditions(sweep: pd.DataFrame, threshold: float = 0.5) -> list[str]:
    """The conditions whose 95 % interval of φ(1, 1) lies above ``threshold`` (the paper's 0.5)."""
    if not isinstance(sweep, pd.DataFrame) or "phi_ci_low" not in sweep:
        raise ConfigError("sweep must be a rank_phi_sweep(...) table (with a phi_ci_low column)")
    return sweep.loc[sweep["phi_ci_low"] > threshold, "condition"].tolist()


def sweep_records(sweep: pd.DataFrame) -> list[dict]:
    """The sweep as JSON-ready rows for ``summary.json`` (unset condition fields and missing numbers as None)."""
    if not isinstance(sweep, pd.DataFrame) or "phi" not in sweep:
        raise ConfigError("sweep must be a rank_phi_sweep(...) table")

    def clean(v):
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            return None
        return v.item() if isinstance(v, np.generic) else v

    return [{k: clean(v) for k, v in row.items()} for row in sweep.astype(object).to_dict("records")]


@styled
def plot_rank_phi(sweep: pd.DataFrame, threshold: float = 0.5, ax=None):
    """Condition vs φ(1, 1): the mean over seeds with its 95 % interval (input side; output side hollow), every
    seed's value as a dot, the random-pair null of each condition and the paper's threshold."""
    import matplotlib.pyplot as plt

    if not isinstance(sweep, pd.DataFrame) or "phi" not in sweep or sweep.empty:
        raise ConfigError("sweep must be a non-empty rank_phi_sweep(...) table")
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 0.45 * len(sweep) + 2.0), constrained_layout=True)
    y = np.arange(len(sweep))[::-1]
    ax.errorbar(sweep["phi"], y, xerr=[sweep["phi"] - sweep["phi_ci_low"], sweep["phi_ci_high"] - sweep["phi"]],
                fmt="o", color="C0", capsize=3, label="φ(1, 1), input side (mean, 95 % interval)", zorder=3)
    for yi, vals in zip(y, sweep["phi_values"]):
        ax.scatter([v for v in vals if v is not None], [yi - 0.18] * sum(v is not None for v in vals), s=10,
                   color="C0", alpha=0.5, zorder=2)
    if "phi_left" in sweep:
        ax.scatter(sweep["phi_left"], y + 0.18, marker="o", facecolors="none", edgecolors="C1",
                   label="output side (mean)", zorder=3)
    ax.scatter(sweep["null"], y, marker="|", s=200, color="0.3", label="null: two random adapters", zorder=3)
    ax.axvline(threshold, color="C3", ls="--", lw=1, label=f"paper: > {threshold:g}")
    ax.set_yticks(y, sweep["condition"])
    ax.set_xlim(0, 1)
    ax.set_xlabel("mean φ(1, 1) over the adapted modules")
    ranks = sweep.attrs.get("ranks", [8, 64])
    ax.set_title(f"Top direction shared between r = {ranks[0]} and r = {ranks[1]}? ({sweep.attrs.get('base', '')}, "
                 f"{int(sweep['n_seeds'].max())} seeds)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)
    return ax.figure
