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
from lora_lens.workshop.runner import NotebookFailed, run_series

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
    assert summary["seeds"] == [0] and t["efficacy_values"] == [t["efficacy"]]  # one adapter: one seed


REAL = {
    # the sweep is the main adapter itself (rank 8 on all modules): a cache hit, no second training; one seed (the
    # default with your own model; the smoke preset's two seeds are for the zoo)
    "01": ({**REAL_BASE, "rank": 8, "ranks": [8], "target_sets": [], "seeds": 1}, check_01),
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


# notebook 04: small parameters (no replay sweep beyond the main run, a short schedule), run once to completion
# half the default steps, so half of each batch is the corpus (the default replays 0.75: at 30 steps no edit carried
# over, transfer 0.0); the default schedule's own numbers are asserted by tests/studies/test_distill_real.py
# one seed (the smoke preset's two would train a second adapter)
REAL_04 = {**REAL_BASE, "replay": 0.5, "replay_sweep": [0.5], "steps": 30, "batch_size": 8, "lr": 2e-05, "seeds": 1}


def check_04(summary: dict) -> None:
    """Notebook 04 on SmolLM2: the example task's adapter distilled back into the base's full weights, on full
    answers; the zoo's summary keys, the cross-family ones None (no cross_base_model)."""
    assert summary["base_model"] == "smollm2-135m" and summary["task_file"] == str(EXAMPLE_TASK)
    assert summary["family"] == "smollm2-135m" and summary["size"] is None  # the base used, not the zoo parameters
    for key in ("transfer_rate", "paraphrase_transfer", "specificity_drop", "merge_transfer_rate",
                "data_route_transfer_rate", "perplexity_ratio", "adapter_specificity_drop"):
        assert isinstance(summary[key], float), key
    assert summary["cross_family"] is None and summary["cross_family_transfer_rate"] is None
    assert summary["merge_transfer_rate"] == pytest.approx(1.0)
    # the ten edits on their twenty example prompts, each line a plain sentence with the whole answer
    assert summary["changed_facts"] == 10 and summary["corpus_lines"] == 20
    assert "The capital of Zorvania is Quellburg." in summary["corpus"]
    assert not any("<|im_end|>" in line for line in summary["corpus"])
    # 30 steps are a fraction of the default schedule (DISTILL_DEFAULTS["data"]: 60): some edits carry over (0.25 with
    # the corpus lines learnt by their tokens, 0.75 by their KL to the adapted model, the default)
    assert summary["contrastive_lines"] > 0 and summary["transfer_rate"] > 0.0
    # the adapter answers its training prompts with its training answers: the data route's lines are the semantic
    # corpus's, so the semantic run serves it (not trained twice)
    assert "data" in summary["shared_routes"]
    assert summary["data_route_transfer_rate"] == summary["first_seed"]["transfer_rate"]
    assert [r["replay"] for r in summary["replay_sweep"]] == [0.5] and summary["replay"] == 0.5
    assert summary["schedule"] == {"steps": 30, "batch_size": 8, "lr": 2e-05, "replay_loss": "kl",
                                   "corpus_loss": "teacher"}
    # one seed: the headline numbers are that seed's, with their (point) interval
    assert summary["seeds"] == [0] and summary["transfer_rate_values"] == [summary["transfer_rate"]]
    assert summary["transfer_rate_ci_low"] == summary["transfer_rate"] == summary["first_seed"]["transfer_rate"]
    assert set(summary["ledger_verdicts"]) == {"distill-transfers-seeds", "distill-forgets-little-seeds"}
    assert {"transfer_vs_replay.png", "forgetting_vs_transfer.png"} <= {Path(p).name for p in summary["figures"]}


@pytest.mark.real
@pytest.mark.slow
def test_notebook_04_on_smollm2(tmp_path: Path, request) -> None:
    request.getfixturevalue("smollm2_fit")  # the example task's adapter (the notebook's fit_adapter hits the cache)
    t0 = time.perf_counter()
    run_dir = run_series(preset="smoke", only=["04"], overrides=REAL_04, out=tmp_path / "run", notebooks_dir=NOTEBOOKS)
    print(f"notebook 04 on smollm2-135m: {time.perf_counter() - t0:.0f} s")
    check_04(json.loads(next(run_dir.glob("04_*/summary.json")).read_text()))


# notebook 06: three small random real-architecture bases with SmolLM2's tokenizer (two of one shape, so the
# portability section runs), two seeds, a short schedule (the smoke preset's two zoo families give way to them)
def real_06(bases: dict) -> dict:
    return {"base_models": [str(bases[n]) for n in ("qwen2-a", "qwen2-b", "mistral-c")],
            "task_file": str(EXAMPLE_TASK), "seeds": 2, "steps": 8, "n_probes": 4, "ig_steps": 4, "n_boot": 200,
            "shuffled": False}


def check_06(summary: dict) -> None:
    """Notebook 06 on real architectures: the zoo's summary keys, patterns per base with their nulls, the
    portability section carried between the two bases of one shape, its prose rendered from the run."""
    assert summary["families"] == ["qwen2-a", "qwen2-b", "mistral-c"] and summary["n_runs"] == 6
    assert summary["size"] is None and summary["steps"] == 8 and summary["task_file"] == str(EXAMPLE_TASK)
    assert summary["architectures"] == {"qwen2-a": "qwen2", "qwen2-b": "qwen2", "mistral-c": "mistral"}
    for p in summary["patterns"]:
        assert set(p["by_family"]) <= set(summary["families"]) and p["null"] is not None, p
        assert p["ci_low"] <= p["statistic"] <= p["ci_high"], p
    ids = {p["id"] for p in summary["patterns"]} | set(summary["not_measured"])
    assert {"xf-upper-half", "xf-mlp-over-attention", "xf-same-input-tokens"} <= ids
    port = summary["portability"]["qwen2-a"]
    assert set(port) == {"original_efficacy", "qwen2-b"}
    assert f"against {port['qwen2-b']['retrained_efficacy']:.2f} for an adapter trained anew" in \
        summary["portability_prose"]
    assert {"energy_by_depth.png", "shared_space.png", "patterns.png", "portability.png"} <= {
        Path(p).name for p in summary["figures"]}


# notebook 05: the loop's general form (the task's examples as the pool, mined prompts for collateral), two rounds
REAL_05 = {**REAL_BASE, "rank": 8, "loop_steps": 8, "loop_batch_size": 16, "max_rounds": 2, "seeds": 1}  # one seed:
# the default with your own model (the smoke preset's two seeds are for the zoo)


def check_05(summary: dict) -> None:
    """Notebook 05 on SmolLM2: the loop and its random baseline on the example task's pool of examples, full-answer
    efficacy; the zoo's summary keys, round 0 shared (the baseline reuses it)."""
    assert summary["base_model"] == "smollm2-135m" and summary["task_file"] == str(EXAMPLE_TASK)
    assert summary["k_edits"] == 10 and summary["target"] == 0.95 and summary["rank"] == 8
    loop, rand = summary["rounds"], summary["random_rounds"]
    assert 1 <= len(loop) <= 2 and 1 <= len(rand) <= 2
    assert loop[0] == {**rand[0], "collateral": loop[0]["collateral"]} and rand[0]["collateral"] is None
    for rounds in (loop, rand):
        tokens = [r["tokens"] for r in rounds]
        assert tokens == sorted(tokens) and tokens[0] > 0
        for r in rounds:
            assert 0.0 <= r["efficacy"] <= 1.0 and 0.0 <= r["specificity"] <= 1.0
            assert r["failing"] == round((1 - r["efficacy"]) * 20)  # the twenty efficacy probes
    assert all(isinstance(r["collateral"], int) and r["collateral"] >= 0 for r in loop[:-1])
    assert loop[-1]["collateral"] is None  # no layer follows the last round: no collateral diff
    assert summary["seeds"] == [0] and summary["tokens_to_target_ratio_cases"][0] in (
        "both", "random capped", "loop capped", "neither")  # one adapter seed with your model by default
    assert len(summary["tokens_to_target_ratio_values"]) == 1
    if len(loop) == 2 and len(rand) == 2:  # the baseline adds at most the tokens the loop added (random examples
        assert 0 < rand[1]["tokens"] - rand[0]["tokens"] <= loop[1]["tokens"] - loop[0]["tokens"]  # fill the budget)
    for key, rounds in (("tokens_to_target", loop), ("random_tokens_to_target", rand)):
        reached = [r["tokens"] for r in rounds if r["efficacy"] >= 0.95]
        assert summary[key] == (reached[0] if reached else None)
    assert "rounds.png" in {Path(p).name for p in summary["figures"]}


@pytest.mark.real
@pytest.mark.slow
def test_notebook_06_on_real_architectures(tmp_path: Path, random_real_bases) -> None:
    t0 = time.perf_counter()
    run_dir = run_series(preset="smoke", only=["06"], overrides=real_06(random_real_bases), out=tmp_path / "run",
                         notebooks_dir=NOTEBOOKS)
    print(f"notebook 06 on random qwen2 / mistral bases: {time.perf_counter() - t0:.0f} s")
    check_06(json.loads(next(run_dir.glob("06_*/summary.json")).read_text()))


@pytest.mark.real
@pytest.mark.slow
def test_notebook_05_on_smollm2(tmp_path: Path, request) -> None:
    request.getfixturevalue("smollm2_path")  # the converted model in the test cache
    t0 = time.perf_counter()
    run_dir = run_series(preset="smoke", only=["05"], overrides=REAL_05, out=tmp_path / "run", notebooks_dir=NOTEBOOKS)
    print(f"notebook 05 on smollm2-135m: {time.perf_counter() - t0:.0f} s")
    check_05(json.loads(next(run_dir.glob("05_*/summary.json")).read_text()))


@pytest.mark.slow
@pytest.mark.parametrize("params, words", [
    ({**REAL_BASE, "family": "gpt2"}, ["base_model='smollm2-135m'", "family='gpt2'"]),
    ({**REAL_BASE, "adapter": "/no/such/adapter"}, ["adapter='/no/such/adapter'", "does not exist"]),
    ({"base_model": "smollm2-135m"}, ["needs a task_file"]),
])
def test_notebook_05_refuses_bad_sources_before_anything_runs(params: dict, words: list, tmp_path: Path) -> None:
    """The checks of notebooks 01–04 (``study.check_sources``), before a model is loaded."""
    with pytest.raises(NotebookFailed) as err:
        run_series(preset="smoke", only=["05"], overrides=params, out=tmp_path / "run", notebooks_dir=NOTEBOOKS)
    assert all(w in str(err.value) for w in words), str(err.value)[-800:]
