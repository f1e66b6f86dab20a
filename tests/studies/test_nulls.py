"""Tests of the weight-space statistics of a run and their nulls (random adapter, parameter share, MP)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import randomize_lora, tiny_lora
from lora_lens.errors import ConfigError
from lora_lens.lab.modules import shared_type
from lora_lens.lens import delta
from lora_lens.studies import nulls


def _random_runs(pre, seeds):
    """weight_stats and weight_nulls of adapters whose factors are all random at one scale (no training)."""
    rows = []
    for seed in seeds:
        model, _ = tiny_lora(pre, r=4)
        mods = delta.lora_modules(randomize_lora(model, seed=seed))
        cols, random = nulls.weight_nulls(mods, seed=seed, n_samples=8)
        rows.append({**nulls.weight_stats(delta.summary(mods, intruders=False)), **cols})
    return pd.DataFrame(rows), mods, random


def test_a_random_adapter_is_explained_by_its_null(tiny_llama):
    runs, mods, random = _random_runs(tiny_llama, range(4))
    assert set(nulls.NULL_COLUMNS) <= set(runs.columns)
    # random factors at one scale: the energy shares and ranks of the adapter are those of its random twin
    for stat in ("mlp_share", "upper_share", "eff_rank_ratio", "stable_rank_ratio"):
        assert runs[stat].mean() == pytest.approx(runs[f"null_{stat}"].mean(), abs=0.06), stat
    assert runs["eff_rank_ratio"].mean() == pytest.approx(runs["mp_eff_rank_ratio"].mean(), abs=0.03)
    # the expected energy of a random module is ∝ out · in: the MLP share of the dense size, not of the parameters
    size = np.array([o * i for o, i in (d.shape for d in mods)], dtype=float)
    mlp = np.array([shared_type(d.module_type).startswith("mlp") for d in mods])
    assert runs["null_mlp_share"].mean() == pytest.approx(size[mlp].sum() / size.sum(), abs=0.06)
    # the twin has the adapter's shapes, ranks and total energy
    assert [d.shape for d in random] == [d.shape for d in mods]
    energy = [sum(float((d.delta() ** 2).sum()) for d in ms) for ms in (mods, random)]
    assert energy[1] == pytest.approx(energy[0], rel=1e-4)


def test_parameter_shares_and_the_mp_expectation_are_exact(tiny_llama):
    model, _ = tiny_lora(tiny_llama, r=4)
    mods = delta.lora_modules(randomize_lora(model, seed=0))
    stats = nulls.weight_stats(delta.summary(mods, intruders=False))
    params = np.array([4 * (d.shape[0] + d.shape[1]) for d in mods], dtype=float)
    mlp = np.array([shared_type(d.module_type).startswith("mlp") for d in mods])
    upper = nulls.upper_weight([d.depth for d in mods])
    assert stats["mlp_param_share"] == pytest.approx(params[mlp].sum() / params.sum())
    assert stats["upper_param_share"] == pytest.approx((params * upper).sum() / params.sum())
    cols, _ = nulls.weight_nulls(mods, seed=0, n_samples=8)
    expected = np.mean([delta.random_lora_ranks(*d.shape, 4, n_samples=8, seed=0).effective_ratio for d in mods])
    assert cols["mp_eff_rank_ratio"] == pytest.approx(expected)


def test_upper_weight_counts_the_middle_half():
    assert nulls.upper_weight([0.0, 0.4, 0.5, 0.6, 1.0]).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_weight_stats_rejects_a_table_that_is_not_a_summary():
    with pytest.raises(ConfigError, match="delta.summary"):
        nulls.weight_stats(pd.DataFrame({"module": ["x"]}))


def test_shuffled_task_permutes_the_answers_over_the_same_prompts(tiny_world):
    from lora_lens.lab.world import make_task
    task = make_task(tiny_world, "fact_edit", seed=0)
    shuffled = nulls.shuffled_task(task, seed=0)
    assert [p for p, _ in shuffled.examples] == [p for p, _ in task.examples]
    assert sorted(a for _, a in shuffled.examples) == sorted(a for _, a in task.examples)
    assert [a for _, a in shuffled.examples] != [a for _, a in task.examples]
    assert shuffled.probes is task.probes and shuffled.truth == task.truth
    assert nulls.shuffled_task(task, seed=0).examples == shuffled.examples  # seeded
    assert nulls.shuffled_task(task, seed=1).examples != shuffled.examples
    with pytest.raises(ConfigError, match="1 training example"):
        nulls.shuffled_task(task.__class__(task.name, None, task.examples[:1], {}), seed=0)
