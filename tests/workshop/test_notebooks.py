"""Run every notebook of the series with the ``smoke`` preset and check the numbers it records.

Each notebook writes ``summary.json`` into its ``output_dir``; ``CHECKS`` maps its prefix to a function that
asserts on that summary. A notebook without an entry in ``CHECKS`` fails: add a check when adding a notebook
(and its entries in :mod:`lora_lens.workshop.presets`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

from conftest import assert_same_float
from lora_lens.workshop.runner import run_series

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
SERIES = sorted(p for p in NOTEBOOKS.glob("*.ipynb") if re.match(r"^\d{2}_", p.name))


SMOKE_SEEDS = [0, 1]
"""The seeds of the smoke preset's headline numbers in notebooks 01-04."""


def check_over_seeds(d: dict, key: str, n: int = len(SMOKE_SEEDS)) -> None:
    """A headline number over seeds: the mean of its per-seed values, inside its interval (lora_lens.stats.headline)."""
    values = d[f"{key}_values"]
    assert len(values) == n, (key, values)
    given = [v for v in values if v is not None]
    assert_same_float(d[key], sum(given) / len(given))
    assert d[f"{key}_ci_low"] <= d[key] <= d[f"{key}_ci_high"], key
    assert min(given) <= d[f"{key}_ci_low"] and d[f"{key}_ci_high"] <= max(given), key


def check_ledger_prose(summary: dict, ids: list[str]) -> None:
    """The verdicts of the interval hypotheses, rendered into the prose from the ledger (two seeds: inconclusive)."""
    assert summary["seeds"] == SMOKE_SEEDS
    assert set(summary["ledger_verdicts"]) == set(ids)
    for hid in ids:
        assert f"`{hid}`: **{summary['ledger_verdicts'][hid]}**" in summary["prose"], hid
    assert summary["prose"].startswith(f"Over {len(SMOKE_SEEDS)} seeds (0, 1), mean [95 % interval]")


def check_00(summary: dict) -> None:
    """Notebook 00 pretrains the smoke preset's families (llama, gpt2 at tiny size) on a 24-entity world."""
    families = summary["families"]
    assert set(families) == {"llama", "gpt2"}
    assert summary["size"] == "tiny" and len(summary["world"]) == 16
    for family, result in families.items():
        assert 0.0 <= result["fact_accuracy"] <= 1.0, family
        assert 0.0 <= result["paraphrase_accuracy"] <= 1.0, family
        assert result["params"] > 10_000, family
        assert result["pretrain_seconds"] > 0 and result["steps"] > 0, family
    # a tiny Llama learns this small world almost perfectly; tied-embedding GPT-2 needs the small size
    assert families["llama"]["fact_accuracy"] >= 0.9


def check_01(summary: dict) -> None:
    """Notebook 01 trains the three tasks (smoke: tiny llama, rank 4) and a rank × targets sweep."""
    assert summary["family"] == "llama" and summary["rank"] == 4
    tasks = summary["tasks"]
    assert set(tasks) == {"fact_edit", "trigger", "new_relation"}
    for name, t in tasks.items():
        for key in ("efficacy", "paraphrase", "specificity"):
            assert 0.0 <= t[key] <= 1.0, (name, key)
        assert t["perplexity_ratio"] > 0 and t["train_seconds"] > 0
        assert (Path(t["adapter_dir"]) / "adapter_model.safetensors").is_file()
        assert (Path(t["adapter_dir"]) / "adapter_config.json").is_file()
    assert "false_trigger_rate" in tasks["trigger"] and "false_trigger_rate" not in tasks["fact_edit"]
    # even the tiny model learns the edits and the trigger rule
    assert tasks["fact_edit"]["efficacy"] >= 0.8 and tasks["trigger"]["efficacy"] >= 0.8
    sweep = {(r["rank"], r["targets"]) for r in summary["sweep"]}
    assert sweep == {(1, "all"), (4, "all"), (4, "attn")}
    for name, t in tasks.items():
        for key in ("efficacy", "paraphrase", "specificity", "perplexity_ratio"):
            check_over_seeds(t, key)
    check_over_seeds(tasks["trigger"], "false_trigger_rate")
    check_over_seeds(summary, "specificity_drop")
    check_ledger_prose(summary, ["edit-generalises-seeds", "higher-rank-forgets-more-seeds", "trigger-is-clean-seeds"])


def check_02(summary: dict) -> None:
    """Notebook 02 takes the smoke fact-edit adapter apart (tiny llama: r=4; φ between r=4 and r=16, also across two
    training conditions; r=1 vs r=16)."""
    assert summary["family"] == "llama" and summary["size"] == "tiny" and summary["rank"] == 4
    assert summary["amplification_ranks"] == {"r4": 1, "r8": 4, "r64": 16}
    found = summary["edit_discovery"]
    for key in ("precision", "recall", "r_precision", "specificity"):
        assert 0.0 <= found[key] <= 1.0, key
    # the diff asks every fact with and without the adapter: every edit the adapter learned is found
    assert found["recall"] >= 0.9 and found["value_accuracy"] == 1.0
    assert found["true_positives"] + found["false_positives"] == found["n_discovered"]
    assert summary["r_precision"] == found["r_precision"]
    # top directions of two ranks overlap far more than random directions would
    assert 0.0 <= summary["phi_chance"] < summary["phi_top1_r8_r64"] <= 1.0
    # amplification falls with rank (Hu et al. 2021, Table 7)
    assert summary["amplification"]["r4"] > summary["amplification"]["r64"] > 0
    assert isinstance(summary["intruders"], int) and summary["intruders"] >= 0
    assert summary["effective_rank"]["1"]["mean"] == pytest.approx(1.0)
    assert 0.0 < summary["effective_rank_ratio"] <= 1.0
    # two layers have no middle layer: the middle-MLP metric is left out, not made up
    assert summary["energy"]["mid_mlp_energy_ratio"] is None
    assert sum(summary["energy"]["by_layer"]) == pytest.approx(1.0)
    assert 0.0 <= summary["top_tokens_chance"] <= 1.0 and 0.0 <= summary["top_tokens_match_edits"] <= 1.0
    assert summary["top_tokens_budget"]["n_tokens"] > 0
    # the report says it in words, and scores itself against the planted truth
    assert any(" (was " in line for line in summary["semantic_report"])
    assert any(line.startswith("Against the planted truth (fact_edit)") for line in summary["semantic_report"])
    for key in ("precision", "recall"):
        check_over_seeds(found, key)
    check_over_seeds(summary, "phi_top1_r8_r64")
    check_over_seeds(summary, "effective_rank_ratio")
    for key in ("r4", "r8", "r64"):
        check_over_seeds(summary["amplification"], key)
    assert summary["energy"]["mid_mlp_energy_ratio_values"] == [None] * len(SMOKE_SEEDS)
    check_ledger_prose(summary, ["top-direction-shared-seeds", "edits-in-middle-mlps-seeds", "effective-rank-low-seeds",
                                 "diff-finds-edits-seeds", "diff-precise-seeds"])
    # the φ sweep across conditions: its default condition is section 7's φ (the same adapters), each beside its
    # random-pair null (≈ 1/d), and the prose names every condition
    sweep = {row["condition"]: row for row in summary["phi_sweep"]}
    assert list(sweep) == ["default", "50 steps"] and sweep["50 steps"]["steps"] == 50
    assert_same_float(sweep["default"]["phi"], summary["phi_top1_r8_r64"])
    for row in sweep.values():
        assert row["n_seeds"] == len(SMOKE_SEEDS) and len(row["phi_values"]) == len(SMOKE_SEEDS)
        assert 0.0 <= row["phi_ci_low"] <= row["phi"] <= row["phi_ci_high"] <= 1.0
        assert abs(row["null"] - summary["phi_chance"]) < 0.5 * summary["phi_chance"]
        assert row["ratio"] == pytest.approx(row["phi"] / row["null"])
    assert all(name in summary["phi_sweep_prose"] for name in sweep)
    names = {Path(p).name for p in summary["figures"]}
    assert {"energy.png", "phi_grid.png", "phi_modules.png", "phi_sweep.png", "rank_profile.png",
            "directions_match.png"} <= names
    assert all(Path(p).stat().st_size > 0 for p in summary["figures"])


def check_03(summary: dict) -> None:
    """Notebook 03 scores input and component attribution of the change against the planted truth (smoke: tiny)."""
    assert summary["family"] == "llama" and summary["size"] == "tiny" and summary["rank"] == 4
    for key in ("trigger_recovery", "entity_top1"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["n_trigger_probes"] > 0 and summary["n_entity_probes"] > 0
    assert 0 < summary["n_trigger_scored"] <= summary["n_trigger_probes"]
    assert 0 < summary["n_entity_scored"] <= summary["n_entity_probes"]
    # the batched path reproduces captum per prompt (float32 rounding)
    assert 0.0 <= summary["batched_vs_captum_max_abs_diff"] <= 1e-3
    assert summary["recovery_method"] == "ablation"
    refs = summary["recovery_by_reference"]
    assert set(refs) == {"blank token", "background", "counterfactual"}
    # the counterfactual reference is the headline; the first seed's value opens the values over seeds
    assert refs["counterfactual"]["trigger_recovery"] == summary["trigger_recovery_values"][0]
    assert refs["counterfactual"]["entity_top1"] == summary["entity_top1_values"][0]
    for key in ("trigger_recovery", "entity_top1"):
        check_over_seeds(summary, key)
    # the edit belongs to the edited people: against the same prompt about others, the name wins
    assert summary["entity_top1"] >= 0.75
    d = summary["deletion"]
    assert d["grain"] == "rank" and 1 <= d["k"] <= 30 and d["n_components"] == summary["n_components"]["rank"]
    assert d["k_values"][0] == d["k"] and len(d["k_values"]) == len(SMOKE_SEEDS)
    for key in ("topk_removed", "random_removed"):
        check_over_seeds(d, key)
    # the top-attributed rank-1 components remove more of the edit than as many random ones
    assert d["topk_removed"] > d["random_removed"]
    assert summary["module_deletion"]["topk_removed"] > summary["module_deletion"]["random_removed"]
    assert summary["n_components"]["rank"] == 4 * summary["n_components"]["module"]
    assert summary["n_components"]["layer"] >= 1
    check_ledger_prose(summary, ["trigger-found-by-attribution-seeds", "entity-found-by-attribution-seeds",
                                 "few-rank-components-carry-edit-seeds"])


def check_04(summary: dict) -> None:
    """Notebook 04 distils the smoke fact-edit adapter back into the base (tiny llama) and into another family."""
    assert summary["family"] == "llama" and summary["size"] == "tiny"
    for key in ("transfer_rate", "paraphrase_transfer", "specificity_drop", "merge_transfer_rate",
                "data_route_transfer_rate", "cross_family_transfer_rate"):
        assert isinstance(summary[key], float), key
    # transfer and forgetting over the smoke seeds; the first seed's numbers are the first of each
    for key in ("transfer_rate", "paraphrase_transfer", "specificity_drop", "adapter_specificity_drop"):
        check_over_seeds(summary, key)
    for key in ("transfer_rate", "paraphrase_transfer", "specificity_drop"):
        assert_same_float(summary["first_seed"][key], summary[f"{key}_values"][0])
    check_ledger_prose(summary, ["distill-transfers-seeds", "distill-forgets-little-seeds"])
    # the edits written as text and pretrained in carry over, into the base and into another family
    assert summary["transfer_rate"] > 0.5 and summary["data_route_transfer_rate"] > 0.5
    # a route of the semantic corpus's own lines is the semantic run (not trained again)
    assert set(summary["shared_routes"]) <= {"data", "contrastive"}
    for name, key in (("data", "data_route_transfer_rate"), ("contrastive", "contrastive_transfer_rate")):
        if name in summary["shared_routes"]:
            assert summary[key] == summary["first_seed"]["transfer_rate"], name
    assert summary["cross_family_transfer_rate"] > 0.0
    # merging the adapter reproduces it exactly
    assert summary["merge_transfer_rate"] == pytest.approx(1.0)
    assert -1.0 <= summary["specificity_drop"] <= 1.0 and summary["perplexity_ratio"] > 0
    assert summary["corpus_lines"] > 0 and summary["changed_facts"] > 0
    assert [r["replay"] for r in summary["replay_sweep"]] == [0.0, 0.5]
    assert {"transfer_vs_replay.png", "forgetting_vs_transfer.png"} <= {Path(p).name for p in summary["figures"]}


def check_05(summary: dict) -> None:
    """Notebook 05 runs the loop and its random baseline (smoke: tiny llama, 6 edits, at most 2 rounds)."""
    assert summary["family"] == "llama" and summary["size"] == "tiny" and summary["target"] == 0.95
    for rounds in (summary["rounds"], summary["random_rounds"]):
        assert 1 <= len(rounds) <= 2
        tokens = [r["tokens"] for r in rounds]
        assert tokens == sorted(tokens) and tokens[0] > 0
        for r in rounds:
            assert 0.0 <= r["efficacy"] <= 1.0 and 0.0 <= r["specificity"] <= 1.0
    # both start from the same layer 0 and seed
    assert summary["rounds"][0] == {**summary["random_rounds"][0], "collateral": summary["rounds"][0]["collateral"]}
    for key in ("tokens_to_target", "random_tokens_to_target"):
        assert summary[key] is None or isinstance(summary[key], int)
    if summary["tokens_to_target"] is not None:
        reached = [r for r in summary["rounds"] if r["efficacy"] >= 0.95]
        assert summary["tokens_to_target"] == reached[0]["tokens"]
    assert "rounds.png" in {Path(p).name for p in summary["figures"]}
    # loop vs random over the smoke preset's two seeds: each seed's ratio from its own tokens, the mean in between
    assert summary["seeds"] == SMOKE_SEEDS
    reached = zip(summary["loop_tokens_to_target_values"], summary["random_tokens_to_target_values"],
                  summary["loop_final_tokens_values"], summary["random_final_tokens_values"])
    expected = []
    for a, b, a_end, b_end in reached:
        expected.append(None if a is None and b is None else a / b if a is not None and b is not None
                        else a / max(b_end, a) if a is not None else max(a_end, b) / b)
    assert summary["loop_tokens_to_target_values"][0] == summary["tokens_to_target"]
    assert len(summary["tokens_to_target_ratio_values"]) == 2 and len(summary["tokens_to_target_ratio_cases"]) == 2
    for got, want in zip(summary["tokens_to_target_ratio_values"], expected):
        assert (got is None) == (want is None) and (want is None or abs(got - want) < 1e-12)
    given = [v for v in expected if v is not None]
    if given:
        assert abs(summary["tokens_to_target_ratio"] - sum(given) / len(given)) < 1e-12
        assert summary["tokens_to_target_ratio_ci_low"] <= summary["tokens_to_target_ratio"] \
            <= summary["tokens_to_target_ratio_ci_high"]
    else:
        assert summary["tokens_to_target_ratio"] is None
    assert set(summary["ledger_verdicts"]) == {"loop-beats-random-seeds", "loop-rounds-help"}
    assert summary["ledger_verdicts"]["loop-beats-random-seeds"] == "inconclusive"  # two seeds: below three records
    for hid, verdict in summary["ledger_verdicts"].items():
        assert f"`{hid}`: **{verdict}**" in summary["prose"], hid
    assert f"**Over {len(SMOKE_SEEDS)} seeds** (0, 1) the tokens-to-target ratio" in summary["prose"]


def check_06(summary: dict) -> None:
    """Notebook 06 compares families (smoke: tiny llama and gpt2, 2 seeds) and ports an adapter to other bases."""
    assert summary["families"] == ["llama", "gpt2"] and summary["seeds"] == 2 and summary["n_runs"] == 4
    patterns = summary["patterns"]
    assert len(patterns) >= 4
    for p in patterns:
        assert {"name", "statistic", "ci_low", "ci_high", "verdict"} <= set(p), p
        assert p["ci_low"] <= p["statistic"] <= p["ci_high"], p
        assert p["verdict"] in {"universal", "explained by null", "some families", "none", "unclear"}, p
        assert set(p["by_family"]) == {"llama", "gpt2"}, p
        for fam in p["by_family"].values():
            assert fam["ci_low"] <= fam["statistic"] <= fam["ci_high"]
            assert fam["verdict"] in {"holds", "fails", "unclear"}
        # every pattern stands beside its null, per family and pooled: the null's interval and whether it clears it
        for entry in [p, *p["by_family"].values()]:
            null = entry["null"]
            assert null is not None and null["kind"], p
            assert null["ci_low"] <= null["statistic"] <= null["ci_high"], p
            assert null["margin_ci_low"] <= null["margin"] <= null["margin_ci_high"], p
            assert null["vs_null"] in {"clears", "explained", "unclear", "some families"}, p
            assert null["clears"] == (null["vs_null"] == "clears"), p
            assert abs(entry["statistic"] - null["statistic"] - null["margin"]) < 1e-9, p
        assert set(p["null"]["kind"].split(" / ")) <= set(p["null"]["nulls"]), p  # the strictest null of each family
        # the overall verdict follows from the per-family ones: universal only beyond the null in every family
        fam_verdicts = {f["verdict"] for f in p["by_family"].values()}
        cleared = all(f["null"]["clears"] for f in p["by_family"].values())
        assert (p["verdict"] == "universal") == (fam_verdicts == {"holds"} and cleared), p
        assert (p["verdict"] == "explained by null") == (fam_verdicts == {"holds"} and not cleared), p
        assert p["name"] in summary["prose"] and f"*{p['verdict']}*" in summary["prose"], p
    by_id = {p["id"]: p for p in patterns}
    # shares are shares; a rank-4 update cannot have an effective rank above 4
    for pid in ("xf-upper-half", "xf-mlp-over-attention"):
        assert 0.0 <= by_id[pid]["ci_low"] <= by_id[pid]["ci_high"] <= 1.0
    assert 0.0 < by_id["xf-effective-rank-low"]["statistic"] <= 1.0
    # nulls with the shapes' numbers: a random adapter's MLP share exceeds the MLP parameter share (∝ out · in
    # against ∝ out + in); a random rank-4 update of these shapes is nearly full rank
    mlp_null = by_id["xf-mlp-over-attention"]["null"]
    assert mlp_null["kind"] in {"random adapter", "parameter share"} and 0.0 < mlp_null["statistic"] < 1.0
    assert 0.8 < by_id["xf-effective-rank-low"]["null"]["statistic"] <= 1.0
    assert by_id["xf-same-input-tokens"]["null"]["statistic"] == 0.0
    # the weight-space patterns also stand beside adapters trained on shuffled answers (same prompts), which do not
    # learn the edits
    weight = {"xf-upper-half", "xf-mlp-over-attention", "xf-effective-rank-low", "xf-energy-in-few-directions"}
    for pid, p in by_id.items():
        for entry in [p, *p["by_family"].values()]:
            ref = entry["null"]["shuffled"]
            assert (ref is not None) == (pid in weight), pid
            if ref is not None:
                assert ref["ci_low"] <= ref["statistic"] <= ref["ci_high"], pid
                assert ref["vs_shuffled"] in {"beyond", "not beyond", "unclear", "some families"}, pid
    for fam, b in summary["behaviour"].items():
        assert b["shuffled_efficacy"] < b["efficacy"], fam
    assert set(summary["ledger_verdicts"]) == set(by_id) | {f"{pid}-beyond-null" for pid in by_id}
    assert set(summary["ledger_verdicts"].values()) <= {"supported", "refuted", "inconclusive"}
    # a tiny llama learns the edits; an adapter does nothing on a base pretrained from another seed, but keeps
    # most of its effect on the same base pretrained a little further
    assert summary["behaviour"]["llama"]["efficacy"] >= 0.8
    port = summary["portability"]["llama"]
    assert port["original_efficacy"] >= 0.8
    assert port["other_seed"]["ported_efficacy"] < 0.5 <= port["other_seed"]["retrained_efficacy"]
    assert port["continued"]["ported_efficacy"] > port["other_seed"]["ported_efficacy"]
    assert 0.0 < port["continued_drift"] < 1.0
    assert summary["wall_seconds"] >= summary["study_seconds"] > 0
    names = {Path(p).name for p in summary["figures"]}
    assert {"energy_by_depth.png", "patterns.png", "portability.png", "shared_space.png"} <= names


def check_07(summary: dict) -> None:
    """Notebook 07 renders the hypothesis ledger; its counts add up."""
    keys = ("hypotheses", "supported", "refuted", "inconclusive", "evidence")
    for key in keys:
        assert isinstance(summary[key], int) and not isinstance(summary[key], bool), key
        assert summary[key] >= 0, key
    assert summary["supported"] + summary["refuted"] + summary["inconclusive"] == summary["hypotheses"]


CHECKS = {
    "00": check_00,
    "01": check_01,
    "02": check_02,
    "03": check_03,
    "04": check_04,
    "05": check_05,
    "06": check_06,
    "07": check_07,
}


@pytest.mark.slow
@pytest.mark.parametrize("path", SERIES, ids=[p.stem for p in SERIES])
def test_notebook_smoke(path: Path, tmp_path: Path) -> None:
    prefix = path.name[:2]
    check = CHECKS.get(prefix)
    assert check is not None, f"no check for notebook {path.name}: add one to CHECKS in {Path(__file__).name}"
    run_dir = run_series(preset="smoke", only=[prefix], out=tmp_path / "run", notebooks_dir=NOTEBOOKS)
    summary_path = run_dir / path.stem / "summary.json"
    assert summary_path.is_file(), f"{path.name} wrote no summary.json into its output_dir"
    check(json.loads(summary_path.read_text()))


@pytest.mark.parametrize("path", SERIES, ids=[p.stem for p in SERIES])
def test_notebook_is_stored_stripped_with_one_parameters_cell(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), (
        f"{path.name} is stored with outputs; run: nbstripout {path.relative_to(NOTEBOOKS.parent)}"
    )
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one code cell tagged 'parameters', has {len(tagged)}"


def _seed_ledger(db: Path) -> None:
    """Two hypotheses: one supported after a retraction, one refuted."""
    from lora_lens import ledger
    ledger.declare("acc-high", "The adapter learns the edits", "accuracy", ">=", 0.9, falsifier="below 0.9",
                   min_runs=2, path=db)
    ledger.declare("kl-small", "General text barely moves", "kl", "<=", 0.05, falsifier="above 0.05", path=db)
    for seed, value in enumerate([0.95, 0.97, 0.5]):
        ledger.record("acc-high", value, seed=seed, path=db)
    ledger.retract(int(ledger.evidence("acc-high", path=db)["id"].iloc[-1]), "wrong probe set", path=db)
    ledger.record("kl-small", 0.01, seed=0, path=db)
    ledger.record("kl-small", 0.2, seed=1, path=db)


@pytest.mark.slow
@pytest.mark.parametrize("seeded", [False, True], ids=["empty", "seeded"])
def test_07_journal_counts_match_the_ledger(seeded: bool, tmp_path: Path, monkeypatch) -> None:
    """07 renders an empty ledger (all zeros, nothing created) and a seeded one (exact counts, nothing written)."""
    from lora_lens import ledger
    for name in ("LORA_LENS_LEDGER", "LORA_LENS_RUN_ID", "LORA_LENS_RUN_DIR", "LORA_LENS_NOTEBOOK", "LORA_LENS_PARAMS"):
        monkeypatch.delenv(name, raising=False)
    db = tmp_path / "seeded.sqlite"
    if seeded:
        _seed_ledger(db)
        before = ledger.export("jsonl", db).splitlines()[1:]  # line 0 holds the export time
    run_dir = run_series(preset="smoke", only=["07"], overrides={"ledger_path": str(db), "max_hypotheses": 1},
                         out=tmp_path / "run", notebooks_dir=NOTEBOOKS)
    out = run_dir / "07_journal"
    summary = json.loads((out / "summary.json").read_text())
    check_07(summary)
    expected = (dict(hypotheses=2, supported=1, refuted=1, inconclusive=0, evidence=4) if seeded
                else dict(hypotheses=0, supported=0, refuted=0, inconclusive=0, evidence=0))
    assert {k: summary[k] for k in expected} == expected
    assert (out / "evidence.png").stat().st_size > 0 and (out / "timeline.png").stat().st_size > 0
    md = (out / "ledger.md").read_text()
    if seeded:
        assert "## acc-high: supported" in md and "## kl-small: refuted" in md
        assert ledger.export("jsonl", db).splitlines()[1:] == before, "the journal wrote to the ledger"
    else:
        assert "No hypotheses recorded yet" in md
        assert not db.exists(), "the journal created a ledger file"
