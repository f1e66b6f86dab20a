"""Tests of the series: parsing overrides and planning the parameters of each notebook."""

from __future__ import annotations

import pytest

from lora_lens.errors import ConfigError
from lora_lens.workshop import presets
from lora_lens.workshop.series import Notebook, parse_assignments, parse_value, plan


def test_parse_value_literals_and_strings():
    assert parse_value("3") == 3
    assert parse_value("0.5") == 0.5
    assert parse_value("['llama', 'gpt2']") == ["llama", "gpt2"]
    assert parse_value("True") is True
    assert parse_value("None") is None
    assert parse_value("tiny") == "tiny"
    assert parse_value("hello world") == "hello world"
    assert parse_value("") == ""


def test_parse_assignments():
    assert parse_assignments(["a=1", "01.b=x=y", "c="]) == {"a": 1, "01.b": "x=y", "c": ""}
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        parse_assignments(["novalue"])


def test_plan_layers_defaults_preset_and_overrides(monkeypatch, tmp_path):
    declared = {name: {} for name in ("output_dir", "size", "seed")}
    nbs = [Notebook("00", tmp_path / "00_a.ipynb", declared), Notebook("01", tmp_path / "01_b.ipynb", declared)]
    monkeypatch.setattr(presets, "PRESETS", {"smoke": {"00": {"size": "tiny", "seed": (1, 2)}, "05": {"gone": 1}}})
    steps = plan(nbs, "smoke", {"seed": 3, "01.size": "small"})
    assert [params for _, params in steps] == [{"size": "tiny", "seed": 3}, {"size": "small", "seed": 3}]
    steps = plan(nbs, "smoke", {})
    assert steps[0][1] == {"size": "tiny", "seed": [1, 2]}  # tuples become lists, as papermill needs
    with pytest.raises(ConfigError, match="not a string"):
        plan(nbs, "smoke", {"seed": {1, 2}})


def test_plan_makes_the_paths_a_user_names_absolute(monkeypatch, tmp_path):
    """Each notebook runs in its own output folder: a relative task file, adapter or model folder is read from where
    ``lora-lens run`` was started (the README's `-p task_file=examples/…` failed with "does not exist" before)."""
    (tmp_path / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(presets, "PRESETS", {"smoke": {}})
    names = ("output_dir", "task_file", "adapter", "base_model", "base_models", "seed")
    nbs = [Notebook("01", tmp_path / "01_b.ipynb", {name: {} for name in names})]
    overrides = {"task_file": "examples/t.jsonl", "adapter": "", "base_model": "models/mine",
                 "base_models": ["models/mine", "org/hub-name", "smollm2-135m"], "seed": 1}
    (params,) = [p for _, p in plan(nbs, "smoke", overrides)]
    assert params == {"task_file": str(tmp_path / "examples/t.jsonl"), "adapter": "",
                      "base_model": str(tmp_path / "models/mine"),
                      "base_models": [str(tmp_path / "models/mine"), "org/hub-name", "smollm2-135m"], "seed": 1}
    assert plan(nbs, "smoke", {"task_file": "/abs/t.jsonl"})[0][1]["task_file"] == "/abs/t.jsonl"


def test_a_presets_zoo_family_gives_way_to_your_own_model(monkeypatch, tmp_path):
    """The smoke preset lists two zoo families for notebook 06; `-p base_models=[...]` must not clash with them
    (notebook 06 refuses both given), while a family the user sets is kept (and then refused by the notebook)."""
    monkeypatch.setattr(presets, "PRESETS", {"smoke": {"06": {"families": ["llama", "gpt2"], "seeds": 2},
                                                       "01": {"family": "gpt2", "size": "tiny"}}})
    nbs = [Notebook("01", tmp_path / "01_a.ipynb", {n: {} for n in ("output_dir", "family", "size", "base_model")}),
           Notebook("06", tmp_path / "06_b.ipynb", {n: {} for n in ("output_dir", "families", "seeds", "base_models")})]
    (_, p01), (_, p06) = plan(nbs, "smoke", {"base_models": ["smollm2-135m"], "01.base_model": "smollm2-135m"})
    assert p06 == {"seeds": 2, "base_models": ["smollm2-135m"]}
    assert p01 == {"size": "tiny", "base_model": "smollm2-135m"}
    (_, p01), (_, p06) = plan(nbs, "smoke", {"base_models": ["smollm2-135m"], "families": ["qwen2"]})
    assert p06["families"] == ["qwen2"] and p01 == {"family": "gpt2", "size": "tiny"}  # no base_model for 01
    (_, p01), _ = plan(nbs, "smoke", {"base_model": ""})
    assert p01["family"] == "gpt2"  # an empty base_model is the zoo
