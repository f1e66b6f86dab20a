"""The notebooks on a real model: SmolLM2-135M-Instruct with the example task, small parameters (marked `real`).

``REAL`` is the table: a notebook prefix -> the parameters it runs with (on top of the ``smoke`` preset) and the
check of its ``summary.json``. To add a notebook, add a check function and a row.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import EXAMPLE_TASK
from lora_lens.workshop.runner import run_series

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
REAL_BASE = {"base_model": "smollm2-135m", "task_file": str(EXAMPLE_TASK)}


def check_01(summary: dict) -> None:
    """Notebook 01 on SmolLM2: one adapter on the example task (the default spec for data), full-answer metrics."""
    assert summary["base_model"] == "smollm2-135m" and set(summary["tasks"]) == {"smollm2_facts"}
    t = summary["tasks"]["smollm2_facts"]
    assert {"efficacy", "paraphrase", "specificity", "perplexity_ratio", "stops", "adapter_dir"} <= set(t)
    assert t["efficacy"] >= 0.9 and t["stops"] >= 0.9 and t["specificity"] >= 0.9 and t["perplexity_ratio"] <= 1.1
    assert (Path(t["adapter_dir"]) / "adapter_model.safetensors").is_file()
    assert [(r["rank"], r["targets"]) for r in summary["sweep"]] == [(8, "all")]


REAL = {
    # the sweep is the main adapter itself (rank 8 on all modules): a cache hit, no second training
    "01": ({**REAL_BASE, "rank": 8, "ranks": [8], "target_sets": []}, check_01),
}


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("prefix", sorted(REAL))
def test_notebook_on_smollm2(prefix: str, tmp_path: Path, request) -> None:
    request.getfixturevalue("smollm2_fit")  # the example task's adapter, trained once per session and shared
    params, check = REAL[prefix]
    t0 = time.perf_counter()
    run_dir = run_series(preset="smoke", only=[prefix], overrides=params, out=tmp_path / "run",
                         notebooks_dir=NOTEBOOKS)
    print(f"notebook {prefix} on smollm2-135m: {time.perf_counter() - t0:.0f} s")
    path = next((run_dir).glob(f"{prefix}_*/summary.json"))
    check(json.loads(path.read_text()))
