"""Tests of the cross-family patterns: verdicts against the threshold and against the null, ledger records."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lora_lens import ledger
from lora_lens.errors import ConfigError
from lora_lens.studies import compare, patterns

UPPER, MLP, EFF_RANK = (next(p for p in patterns.PATTERNS if p.id == i)
                        for i in ("xf-upper-half", "xf-mlp-over-attention", "xf-effective-rank-low"))


def _study(values: dict[str, list[float]], column: str = "upper_share", **nulls) -> compare.Study:
    """A study whose runs hold ``column`` and null columns (``name=value`` for every run, or a per-family list)."""
    rows = []
    for f, vs in values.items():
        for s, v in enumerate(vs):
            row = {"family": f, "seed": s, column: v}
            for name, null in nulls.items():
                row[name] = null[f][s] if isinstance(null, dict) else null
            rows.append(row)
    return compare.Study(list(values), [0, 1, 2], "tiny", None, None, pd.DataFrame(rows), pd.DataFrame(),
                         pd.DataFrame(), pd.DataFrame(), {}, {}, [])


HALF = {"null_upper_share": 0.5, "upper_param_share": 0.5}  # a null that sits at the threshold


def test_pattern_verdicts_per_family_and_overall():
    study = _study({"a": [0.7, 0.8, 0.75], "b": [0.2, 0.3, 0.25], "c": [0.3, 0.7, 0.5]}, **HALF)
    table = patterns.pattern_table(study, [UPPER], n_boot=500)
    verdicts = table.set_index("family")["verdict"].to_dict()
    assert verdicts == {"a": "holds", "b": "fails", "c": "unclear", "all": "some families"}
    assert (table["ci_low"] <= table["statistic"]).all() and (table["statistic"] <= table["ci_high"]).all()
    assert table.equals(patterns.pattern_table(study, [UPPER], n_boot=500))  # seeded: same numbers again
    everywhere = patterns.pattern_table(_study({"a": [0.7, 0.8, 0.9], "b": [0.6, 0.7, 0.65]}, **HALF), [UPPER])
    assert everywhere.set_index("family").loc["all", "verdict"] == "universal"
    nowhere = patterns.pattern_table(_study({"a": [0.1, 0.2, 0.3], "b": [0.4, 0.3, 0.35]}, **HALF), [UPPER])
    assert nowhere.set_index("family").loc["all", "verdict"] == "none"


def test_a_pattern_its_null_explains_is_not_universal():
    """MLP share above 0.5 in every family, but no more than the MLP's share of the parameters in one of them."""
    values = {"wide": [0.80, 0.82, 0.81], "narrow": [0.62, 0.64, 0.63]}
    params = {"wide": [0.85, 0.85, 0.85], "narrow": [0.40, 0.40, 0.40]}
    study = _study(values, column="mlp_share", null_mlp_share=0.3, mlp_param_share=params)
    table = patterns.pattern_table(study, [MLP], n_boot=500).set_index("family")
    assert set(table.loc[["wide", "narrow"], "verdict"]) == {"holds"}
    assert table.loc["wide", "vs_null"] == "explained" and table.loc["narrow", "vs_null"] == "clears"
    assert table.loc["all", "verdict"] == "explained by null"
    # the strictest null is the one compared with, and the margin is the paired difference
    assert table.loc["wide", "null"] == "parameter share" and table.loc["narrow", "null"] == "parameter share"
    assert table.loc["wide", "null_statistic"] == pytest.approx(0.85)
    assert table.loc["narrow", "margin"] == pytest.approx(0.63 - 0.40)
    assert table.loc["narrow", "margin_ci_low"] <= table.loc["narrow", "margin"] <= table.loc["narrow",
                                                                                            "margin_ci_high"]
    # with the wide family's MLP below its parameter share gone, it is universal
    cleared = patterns.pattern_table(_study({"narrow": values["narrow"]}, column="mlp_share", null_mlp_share=0.3,
                                            mlp_param_share={"narrow": params["narrow"]}), [MLP])
    assert cleared.set_index("family").loc["all", "verdict"] == "universal"


def test_a_below_pattern_reads_its_null_from_below():
    """Effective rank: fails its threshold (0.5) everywhere, yet clearly below a random update's (it clears)."""
    study = _study({"a": [0.74, 0.76, 0.75], "b": [0.70, 0.72, 0.71]}, column="eff_rank_ratio",
                   null_eff_rank_ratio={"a": [0.99, 0.98, 0.99], "b": [0.97, 0.98, 0.99]}, mp_eff_rank_ratio=0.985)
    table = patterns.pattern_table(study, [EFF_RANK], n_boot=500).set_index("family")
    assert table.loc["all", "verdict"] == "none" and table.loc["all", "vs_null"] == "clears"
    # for "<" the strictest null is the smallest one, per run
    assert table.loc["a", "null_statistic"] == pytest.approx(np.mean([0.985, 0.98, 0.985]))
    assert (table["margin_ci_high"] < 0).all()


def test_a_constant_null_and_a_pattern_without_null():
    same = next(p for p in patterns.PATTERNS if p.id == "xf-same-input-tokens")
    table = patterns.pattern_table(_study({"a": [0.6, 0.7, 0.65]}, column="token_agreement"), [same])
    row = table.set_index("family").loc["a"]
    assert row["null"] == "independent rankings" and row["null_statistic"] == 0.0 and row["vs_null"] == "clears"
    bare = patterns.Pattern("x", "x", "x", "upper_share", ">", 0.5, "x")
    t = patterns.pattern_table(_study({"a": [0.7, 0.8, 0.75]}), [bare]).set_index("family")
    assert t.loc["all", "verdict"] == "universal" and t.loc["a", "vs_null"] == "" and math.isnan(t.loc["a", "margin"])
    assert patterns.pattern_records(t.reset_index(), [bare])[0]["null"] is None


def test_pattern_table_names_a_missing_column():
    with pytest.raises(ConfigError, match="'upper_share'"):
        patterns.pattern_table(_study({"a": [0.1, 0.2]}, column="other"), [UPPER])
    with pytest.raises(ConfigError, match="null column 'upper_param_share'"):
        patterns.pattern_table(_study({"a": [0.1, 0.2]}, null_upper_share=0.5), [UPPER])


def test_patterns_land_in_the_ledger_one_record_per_family(tmp_path):
    db = tmp_path / "ledger.sqlite"
    compare.declare_patterns([MLP], path=db)
    compare.declare_patterns([MLP], path=db)  # idempotent
    study = _study({"a": [0.80, 0.82, 0.81], "b": [0.62, 0.64, 0.63]}, column="mlp_share", null_mlp_share=0.3,
                   mlp_param_share={"a": [0.85] * 3, "b": [0.40] * 3})
    table = compare.pattern_table(study, [MLP])
    verdicts = compare.record_patterns(table, [MLP], path=db)
    assert verdicts == {MLP.id: "supported", patterns.null_id(MLP): "refuted"}
    ev = ledger.evidence(MLP.id, path=db)
    assert len(ev) == 2 and ev["notes"].str.startswith(("a:", "b:")).all()
    # the recorded value is the interval bound nearest the threshold (of the statistic; of the margin for the null)
    fams = table[table["family"] != "all"]
    assert sorted(ev["value"]) == sorted(fams["ci_low"])
    assert sorted(ledger.evidence(patterns.null_id(MLP), path=db)["value"]) == sorted(fams["margin_ci_low"])
    records = compare.pattern_records(table, [MLP])
    rec = records[0]
    assert rec["verdict"] == "explained by null" and set(rec["by_family"]) == {"a", "b"}
    assert rec["null"]["nulls"] == ["random adapter", "parameter share"] and rec["null"]["clears"] is False
    assert rec["by_family"]["b"]["null"]["clears"] is True and rec["by_family"]["a"]["null"]["vs_null"] == "explained"
    assert rec["null"]["ci_low"] <= rec["null"]["statistic"] <= rec["null"]["ci_high"]


def test_every_pattern_has_a_null():
    assert all(p.nulls for p in patterns.PATTERNS)
    assert len({patterns.null_id(p) for p in patterns.PATTERNS}) == len(patterns.PATTERNS)


def test_pattern_prose_is_rendered_from_the_table():
    study = _study({"a": [0.80, 0.82, 0.81], "b": [0.62, 0.64, 0.63]}, column="mlp_share", null_mlp_share=0.3,
                   mlp_param_share={"a": [0.85] * 3, "b": [0.40] * 3})
    table = patterns.pattern_table(study, [MLP])
    text = patterns.pattern_prose(table)
    pooled = table.set_index("family").loc["all"]
    assert "**Universal against its null** (holds and clears its null in every family): none." in text
    assert f"explained by its null**: *{MLP.name}*." in text
    assert f"{pooled['statistic']:.2f} [{pooled['ci_low']:.2f}, {pooled['ci_high']:.2f}]" in text
    assert f"its null (parameter share) is {pooled['null_statistic']:.2f}" in text
    assert "it clears it in 1 of 2 families (b; explained in a)" in text


def test_the_shuffled_answers_reference_stands_beside_the_null():
    study = _study({"a": [0.80, 0.82, 0.81], "b": [0.70, 0.72, 0.71]}, column="mlp_share", null_mlp_share=0.3,
                   mlp_param_share=0.4, shuffled_mlp_share={"a": [0.60, 0.62, 0.61], "b": [0.75, 0.76, 0.74]})
    table = patterns.pattern_table(study, [MLP], n_boot=500).set_index("family")
    assert table.loc["a", "vs_shuffled"] == "beyond" and table.loc["b", "vs_shuffled"] == "not beyond"
    assert table.loc["all", "vs_shuffled"] == "some families"
    assert table.loc["a", "shuffled_statistic"] == pytest.approx(0.61)
    # a reference, not a null to clear: the verdict rests on the null
    assert table.loc["all", "verdict"] == "universal"
    rec = patterns.pattern_records(table.reset_index(), [MLP])[0]
    assert rec["by_family"]["a"]["null"]["shuffled"]["vs_shuffled"] == "beyond"
    assert "Trained on shuffled answers: 0.68" in patterns.pattern_prose(table.reset_index())
    # without shuffled runs the reference is absent
    bare = patterns.pattern_table(_study({"a": [0.8, 0.82, 0.81]}, column="mlp_share", null_mlp_share=0.3,
                                         mlp_param_share=0.4), [MLP])
    assert (bare["vs_shuffled"] == "").all()
    assert patterns.pattern_records(bare, [MLP])[0]["null"]["shuffled"] is None


def test_a_pattern_without_values_is_listed_with_its_reason():
    """A statistic no run could measure (e.g. attribution agreement between bases of different tokenizers) leaves
    its pattern out of the table and names it, with the study's reason, in the table and the prose."""
    same_tokens = next(p for p in patterns.PATTERNS if p.id == "xf-same-input-tokens")
    study = _study({"a": [0.80, 0.82, 0.81], "b": [0.62, 0.64, 0.63]}, column="mlp_share", null_mlp_share=0.3,
                   mlp_param_share=0.4, token_agreement=math.nan)
    study.skipped = {"token_agreement": "no two bases read the shared probes as the same tokens"}
    table = patterns.pattern_table(study, [MLP, same_tokens])
    assert set(table["pattern"]) == {MLP.id}
    assert table.attrs["skipped"] == {same_tokens.id: {"name": same_tokens.name,
                                                       "reason": study.skipped["token_agreement"]}}
    text = patterns.pattern_prose(table)
    assert (f"- **{same_tokens.name}** (`{same_tokens.id}`): not measured in this run — no two bases read the "
            "shared probes as the same tokens.") in text
    study.skipped = {}
    assert "no run has a value of 'token_agreement'" in patterns.pattern_table(study, [same_tokens]).attrs[
        "skipped"][same_tokens.id]["reason"]
