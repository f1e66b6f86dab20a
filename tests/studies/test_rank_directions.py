"""Tests of the φ(1, 1) sweep across training conditions (r = small vs r = large) and its random-pair null."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import assert_same_float
from lora_lens.errors import ConfigError
from lora_lens.lens import delta
from lora_lens.studies import rank_directions as rd

TINY = dict(size="tiny", n_entities=24, seeds=[0, 1], n_null=24)      # two tiny bases: seconds each


def test_bad_conditions_are_refused_before_training():
    with pytest.raises(ConfigError, match=r"unknown fields \['rank'\]"):
        rd.rank_phi_sweep({"x": {"rank": 4}}, **TINY)
    with pytest.raises(ConfigError, match="size='huge'"):
        rd.rank_phi_sweep({"x": {"size": "huge"}}, **TINY)
    with pytest.raises(ConfigError, match="init='zeros'"):
        rd.rank_phi_sweep({"x": {"init": "zeros"}}, **TINY)
    with pytest.raises(ConfigError, match="lr"):
        rd.rank_phi_sweep({"x": {"lr": -1.0}}, **TINY)
    with pytest.raises(ConfigError, match="only on the zoo"):
        rd.rank_phi_sweep({"x": {"k": 5}}, base_model="smollm2-135m", task_file="t.jsonl")
    with pytest.raises(ConfigError, match="small_rank=16 > large_rank=4"):
        rd.rank_phi_sweep(None, small_rank=16, large_rank=4, **TINY)
    with pytest.raises(ConfigError, match="non-empty dict"):
        rd.rank_phi_sweep({}, **TINY)
    with pytest.raises(ConfigError, match="seeds"):
        rd.rank_phi_sweep(None, **{**TINY, "seeds": []})


@pytest.fixture(scope="module")
def same_rank():
    """Both ranks 4: one adapter per seed compared with itself (φ = 1), and a short-training condition."""
    return rd.rank_phi_sweep({"default": {}, "20 steps": {"steps": 20}}, small_rank=4, large_rank=4, **TINY)


def test_the_same_adapter_up_to_rank_gives_phi_one_and_the_null_is_one_over_d(same_rank):
    df = same_rank
    assert df["condition"].tolist() == ["default", "20 steps"]
    assert df["steps"].tolist() == [None, 20] and (df["n_seeds"] == 2).all()
    for col in ("phi", "phi_ci_low", "phi_ci_high", "phi_left"):
        assert_same_float(df[col].to_numpy(), np.ones(2), ulps=512)
    assert all(len(v) == 2 for v in df["phi_values"])
    # the null: two random adapters of these shapes, E φ(1, 1) = mean over modules of 1 / in_features
    per_seed = pd.DataFrame(df.attrs["per_seed"])
    assert len(per_seed) == 4 and set(per_seed["seed"]) == {0, 1}
    from lora_lens.lab.study import fit_adapter
    from lora_lens.lab.world import make_world
    from lora_lens.lab.zoo import get_pretrained

    pre = get_pretrained("llama", "tiny", world=make_world(n_entities=24, seed=0), seed=0)
    mods = delta.lora_modules(fit_adapter(pre, "fact_edit", seed=0, rank=4).model)
    expected = np.mean([1 / d.shape[1] for d in mods])
    null = delta.random_phi(mods, mods, n_samples=24, seed=0)
    se = null.std(ddof=1) / np.sqrt(len(null))
    assert abs(per_seed["null"].iloc[0] - expected) < 4 * se
    assert abs(df["null"].iloc[0] - expected) < 4 * se
    assert df["ratio"].iloc[0] == pytest.approx(1 / df["null"].iloc[0])
    assert 0 <= df["efficacy_small"].iloc[0] <= 1
    assert rd.shared_conditions(df) == ["default", "20 steps"]
    assert rd.shared_conditions(df, threshold=1.5) == []
    assert pd.concat([df, df]).shape[0] == 4                       # two sweeps concatenate
    rec = rd.sweep_records(df)
    assert rec[0]["steps"] is None and rec[1]["steps"] == 20 and isinstance(rec[0]["n_seeds"], int)
    assert rec[0]["phi_values"] == pytest.approx([1.0, 1.0], abs=1e-4)


def test_two_ranks_differ_and_the_figure_shows_every_condition(same_rank):
    df = rd.rank_phi_sweep({"default": {}}, small_rank=4, large_rank=16, **TINY)
    row = df.iloc[0]
    assert row["phi_ci_low"] <= row["phi"] <= row["phi_ci_high"] and row["phi"] < 0.99
    assert row["ratio"] == pytest.approx(row["phi"] / row["null"])
    fig = rd.plot_rank_phi(df)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["default"]
    fig = rd.plot_rank_phi(same_rank)
    ax = fig.axes[0]
    ticks = dict(zip([t.get_text() for t in ax.get_yticklabels()], ax.get_yticks()))
    assert ticks["default"] > ticks["20 steps"]                  # the first condition on top
    assert ax.get_xlim() == (0, 1) and any("null" in t.get_text() for t in ax.get_legend().get_texts())
    with pytest.raises(ConfigError, match="rank_phi_sweep"):
        rd.plot_rank_phi(same_rank.drop(columns="phi"))


def test_two_workers_give_the_sweep_of_one(same_rank, test_cache, tmp_path, monkeypatch):
    """Both sweeps train their pairs (two caches with the bases of the seeds, no adapters), one thread everywhere:
    the same φ, nulls and efficacies."""
    import shutil

    import torch

    for name in ("one", "two"):
        for entry in (test_cache / "models").glob("llama-tiny-*"):
            shutil.copytree(entry, tmp_path / name / "models" / entry.name)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    lines = []
    args = dict(conditions={"30 steps": {"steps": 30}}, small_rank=4, large_rank=8, **TINY)
    try:
        two = rd.rank_phi_sweep(**args, cache=tmp_path / "two", workers=2, log=lines.append)
        one = rd.rank_phi_sweep(**args, cache=tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    assert list((tmp_path / "two" / "adapters").iterdir()) and sorted(lines)[0].startswith("30 steps seed 0: φ(1,1)")
    a, b = pd.DataFrame(two.attrs["per_seed"]), pd.DataFrame(one.attrs["per_seed"])
    assert a[["condition", "seed"]].equals(b[["condition", "seed"]])
    np.testing.assert_allclose(a.drop(columns=["condition", "seed"]).to_numpy(float),
                               b.drop(columns=["condition", "seed"]).to_numpy(float), rtol=1e-5, atol=1e-7)
    cols = ["phi", "phi_ci_low", "phi_ci_high", "phi_left", "null", "ratio", "efficacy_small", "efficacy_large"]
    np.testing.assert_allclose(two[cols].to_numpy(float), one[cols].to_numpy(float), rtol=1e-5, atol=1e-7)


def test_bad_workers_are_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="workers=0"):
        rd.rank_phi_sweep(None, cache=tmp_path, workers=0, **TINY)
    assert not (tmp_path / "models").exists()
