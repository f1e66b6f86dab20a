"""What a pattern would show by chance: the weight-space statistics of one run and their nulls, same shapes.

The cross-family patterns (:mod:`lora_lens.studies.patterns`) read per-run statistics of an adapter's weights —
where its energy lies (upper half, MLP) and how many directions it uses (effective and stable rank). Each has a
number it should be compared with besides its threshold, computed here from the same modules:

* **the random adapter** (:func:`lora_lens.lens.delta.random_like`): the same modules, ranks, base weights and
  total ‖ΔW‖_F, with Gaussian factors at one common scale — the energy a module of that shape gets by chance
  (``null_upper_share``, ``null_mlp_share``) and the ranks of random rank-r updates (``null_eff_rank_ratio``,
  ``null_stable_rank_ratio``); two seeds' random adapters give the φ of unrelated directions (in
  :mod:`lora_lens.studies.compare`);
* **the parameter share** (``upper_param_share``, ``mlp_param_share``): the share of the LoRA parameters,
  r · (in + out) per module, that lies in the upper half or in the MLPs — what an update spread evenly per parameter
  would show;
* **the Marchenko–Pastur expectation** (``mp_eff_rank_ratio``, ``mp_stable_rank_ratio``): the mean over the
  modules of the expected ranks of a random rank-r product of that module's shape
  (:func:`lora_lens.lens.delta.random_lora_ranks`, sampled with a fixed seed; the same for every run of a shape);
* **an adapter trained on shuffled answers** (:func:`shuffled_task`: the same prompts, the answers permuted; the
  ``shuffled_…`` columns of :data:`SHUFFLED_STATS`): a reference rather than a null to clear — it is itself an
  adapter of arbitrary fact edits, so a pattern it shares belongs to LoRA training on these prompts, not to the
  content of the edits.

:func:`weight_stats` computes the statistics from a :func:`lora_lens.lens.delta.summary` table, so that the trained
adapter and its random twin are measured by one function; :func:`weight_nulls` returns the null columns.

Example:
    >>> from lora_lens.lens import delta                                   # doctest: +SKIP
    >>> mods = delta.lora_modules(peft_model)                              # doctest: +SKIP
    >>> weight_stats(delta.summary(mods, intruders=False))["mlp_share"]    # doctest: +SKIP
    >>> weight_nulls(mods, seed=0)[0]["null_mlp_share"]                    # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from lora_lens.errors import ConfigError
from lora_lens.lab.modules import shared_type
from lora_lens.lab.world import Task
from lora_lens.lens import delta

__all__ = ["NULL_COLUMNS", "SHUFFLED_STATS", "shuffled_task", "upper_weight", "weight_nulls", "weight_stats"]

NULL_COLUMNS = ("null_upper_share", "null_mlp_share", "null_eff_rank_ratio", "null_stable_rank_ratio",
                "mp_eff_rank_ratio", "mp_stable_rank_ratio")
"""The columns :func:`weight_nulls` adds to a run (the parameter shares come with :func:`weight_stats`)."""

SHUFFLED_STATS = ("upper_share", "mlp_share", "eff_rank_ratio", "stable_rank_ratio")
"""The statistics of :func:`weight_stats` also measured on the shuffled-answers adapter (as ``shuffled_<name>``)."""


def shuffled_task(task: Task, seed: int = 0) -> Task:
    """The same task with its training answers permuted over its examples (seeded): same prompts, same answer
    vocabulary and count, no consistent mapping (paraphrases of one fact get different answers). Probes and truth
    stay as they are, so the adapter's own efficacy on the task's probes shows it did not learn the edits.

    Raises:
        ConfigError: Fewer than two training examples (nothing to permute).
    """
    if len(task.examples) < 2:
        raise ConfigError(f"task {task.name!r} has {len(task.examples)} training example(s): shuffling answers "
                          "needs at least 2")
    rng = np.random.default_rng(seed)
    answers = [a for _, a in task.examples]
    order = rng.permutation(len(answers))
    while len(set(answers)) > 1 and all(answers[i] == answers[j] for i, j in enumerate(order)):
        order = rng.permutation(len(answers))
    return dataclasses.replace(task, examples=[(p, answers[j]) for (p, _), j in zip(task.examples, order)])


def upper_weight(depth) -> np.ndarray:
    """1 above relative depth 0.5, 0.5 exactly at it (a middle layer counts half), 0 below."""
    depth = np.asarray(depth, dtype=float)
    return np.where(np.isclose(depth, 0.5), 0.5, (depth > 0.5).astype(float))


def weight_stats(summ: pd.DataFrame) -> dict:
    """Where one adapter's energy lies and how many directions it uses, from its :func:`delta.summary` table.

    Returns:
        ``{"upper_share", "mlp_share"}`` (shares of ‖ΔW‖_F² above relative depth 0.5 and in MLP modules),
        ``{"upper_param_share", "mlp_param_share"}`` (the same shares of the LoRA parameters r · (in + out)),
        ``{"eff_rank_ratio", "stable_rank_ratio"}`` (mean effective / stable rank of the modules over the rank).

    Raises:
        ConfigError: Not a summary table (or an empty one).
    """
    need = ("module_type", "depth", "rank", "in_features", "out_features", "energy_share", "effective_rank",
            "stable_rank")
    if not isinstance(summ, pd.DataFrame) or summ.empty or any(c not in summ.columns for c in need):
        raise ConfigError(f"expected a non-empty delta.summary(...) table (columns {list(need)}); got "
                          f"{type(summ).__name__}")
    share = summ["energy_share"].fillna(0.0).to_numpy(float)
    upper = upper_weight(summ["depth"])
    mlp = summ["module_type"].map(shared_type).str.startswith("mlp").to_numpy()
    params = (summ["rank"] * (summ["in_features"] + summ["out_features"])).to_numpy(float)
    rank = float(summ["rank"].iloc[0])
    return {"upper_share": float((share * upper).sum()), "mlp_share": float(share[mlp].sum()),
            "upper_param_share": float((params * upper).sum() / params.sum()),
            "mlp_param_share": float(params[mlp].sum() / params.sum()),
            "eff_rank_ratio": float(summ["effective_rank"].mean() / rank),
            "stable_rank_ratio": float(summ["stable_rank"].mean() / rank)}


def weight_nulls(mods: list, seed: int = 0, n_samples: int = 32) -> tuple[dict, list]:
    """The null columns of one run (:data:`NULL_COLUMNS`) and the random adapter they were read from.

    Args:
        mods: The trained adapter's modules (:func:`lora_lens.lens.delta.lora_modules`).
        seed: Seed of the random adapter (use the run's seed: one random twin per run).
        n_samples: Random products per module shape for the Marchenko–Pastur expectation (seed 0, per shape).

    Returns:
        ``(columns, random_modules)``.
    """
    random = delta.random_like(mods, seed=seed, norm="total")
    stats = weight_stats(delta.summary(random, intruders=False))
    shapes: dict = {}
    for d in mods:
        key = (*d.shape, d.rank)
        if key not in shapes:
            shapes[key] = delta.random_lora_ranks(*key, n_samples=n_samples, seed=0)
    nulls = [shapes[(*d.shape, d.rank)] for d in mods]
    cols = {"null_upper_share": stats["upper_share"], "null_mlp_share": stats["mlp_share"],
            "null_eff_rank_ratio": stats["eff_rank_ratio"], "null_stable_rank_ratio": stats["stable_rank_ratio"],
            "mp_eff_rank_ratio": float(np.mean([n.effective_ratio for n in nulls])),
            "mp_stable_rank_ratio": float(np.mean([n.stable_ratio for n in nulls]))}
    return cols, random
