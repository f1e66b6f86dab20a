"""Adapter recipes and cache (study.py) and the probe widget (widgets.py)."""

import pytest

from conftest import TINY_FIT
from lora_lens.lab import study
from lora_lens.lab.study import fit_adapter, results_table
from lora_lens.workshop import widgets


def test_fit_trains_saves_and_evaluates(tiny_fit):
    f = tiny_fit
    assert (f.adapter_dir / "adapter_model.safetensors").is_file()
    assert (f.adapter_dir / "lora_lens_manifest.json").is_file()
    assert f.evaluation.metrics["efficacy"] > f.evaluation.metrics["base_efficacy"]
    assert f.train["steps"] == TINY_FIT["steps"] and len(f.train["curve"]["loss"]) > 1
    table = results_table({("fact_edit", 4, "all"): f})
    assert list(table[["task", "rank", "targets"]].iloc[0]) == ["fact_edit", 4, "all"]


def test_second_fit_comes_from_the_cache(tiny_fit, tiny_llama, test_cache, monkeypatch):
    f = tiny_fit

    def no_training(*a, **k):
        raise AssertionError("trained again instead of using the cache")

    monkeypatch.setattr(study, "train_lora", no_training)
    again = fit_adapter(tiny_llama, **TINY_FIT, cache=test_cache)
    assert again.adapter_dir == f.adapter_dir and again.train == f.train
    assert again.evaluation.metrics == pytest.approx(f.evaluation.metrics, nan_ok=True)


def test_corrupt_cached_adapter_is_retrained(tiny_llama, tmp_path):
    first = fit_adapter(tiny_llama, "trigger", seed=0, rank=2, steps=20, replay=0.0, cache=tmp_path)
    weights = first.adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.warns(UserWarning, match="cached adapter .* is unusable"):
        again = fit_adapter(tiny_llama, "trigger", seed=0, rank=2, steps=20, replay=0.0, cache=tmp_path)
    assert again.train["final_loss"] == pytest.approx(first.train["final_loss"])


def test_probe_browser_headless(tiny_fit):
    f = tiny_fit
    tables = {("fact_edit", 2): f.evaluation.table(), ("copy", 2): f.evaluation.table().head(3)}
    box = widgets.probe_browser(tables, n=50)
    pick, which, changed = box.children[0].children
    assert len(box.state["table"]) == len(tables[("fact_edit", 2)].head(50))
    which.value = "efficacy"
    assert set(box.state["table"]["set"]) == {"efficacy"}
    changed.value = True
    assert box.state["table"]["changed"].all()
    pick.value = "copy · 2"
    assert len(box.state["table"]) <= 3
