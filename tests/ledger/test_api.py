"""Tests of the ledger's API: declarations, records, the verdict rules, retractions, artifacts."""

import doctest
import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from ledger_cases import assert_consistent, clean_env, counts, db, declare_acc  # noqa: F401 (fixtures)
from lora_lens import ledger
from lora_lens.errors import ConfigError, MismatchError, NotFoundError
from lora_lens.stats import bootstrap_ci


# ------------------------------------------------------------------------------------------ declare / record
def test_declare_is_idempotent_and_a_changed_claim_is_an_error(db):
    h = declare_acc(db, tags=("edit",))
    assert h.prediction == "accuracy >= 0.9" and h.tags == ("edit",)
    assert declare_acc(db, tags=("other",), method="changed method") == h  # first declaration wins
    assert counts(db) == (1, 0, 1)
    with pytest.raises(MismatchError, match=r"claim=.*new id"):
        ledger.declare("acc-high", "Something else", "accuracy", ">=", 0.9, path=db)
    with pytest.raises(MismatchError, match="threshold"):
        ledger.declare("acc-high", h.claim, "accuracy", ">=", 0.8, falsifier=h.falsifier, path=db)
    with pytest.raises(MismatchError, match="min_runs"):
        declare_acc(db, min_runs=3)
    assert counts(db) == (1, 0, 1)
    assert ledger.hypothesis("acc-high", path=db) == h


@pytest.mark.parametrize("kw, match", [
    (dict(id="Bad Slug!"), "not a slug.*'bad-slug'"),
    (dict(comparator="~="), "unknown comparator '~='"),
    (dict(threshold=float("nan")), "not finite"),
    (dict(threshold="0.9"), "not a number"),
    (dict(comparator="between", threshold=(2, 1)), "lo > hi"),
    (dict(comparator="between", threshold=0.5), r"\(lo, hi\)"),
    (dict(rule="bayes"), "unknown verdict rule 'bayes'"),
    (dict(min_runs=0), "min_runs=0"),
    (dict(min_runs=1.5), "min_runs=1.5"),
    (dict(rule="majority", fraction=1.5), r"fraction=1.5.*\(0, 1\]"),
    (dict(rule="majority", fraction=0), "fraction=0"),
    (dict(fraction=0.5), "only used by rule='majority'"),
    (dict(claim=""), "claim"),
    (dict(tags="edit"), "tags"),
    (dict(rule="interval", comparator="=="), "comparator '==' has no side"),
    (dict(rule="interval", comparator="!="), "comparator '!=' has no side"),
    (dict(rule="interval", level=1.0), r"level=1.0.*\(0, 1\)"),
    (dict(rule="interval", level=0), "level=0"),
    (dict(rule="interval", level="0.9"), "not a number"),
    (dict(rule="interval", fraction=0.5), "only used by rule='majority'"),
    (dict(level=0.9), "level=0.9 is only used by rule='interval'"),
    (dict(rule="majority", level=0.9), "only used by rule='interval'"),
])
def test_bad_declarations_raise_and_create_nothing(db, kw, match):
    args = dict(id="acc-high", claim="c", metric="accuracy", comparator=">=", threshold=0.9, path=db)
    with pytest.raises(ConfigError, match=match):
        ledger.declare(**{**args, **kw})
    assert not db.exists()


def test_bad_records_raise_and_write_nothing(db, tmp_path):
    with pytest.raises(NotFoundError, match="no ledger"):
        ledger.record("acc-high", 0.5, path=db)
    assert not db.exists()
    declare_acc(db)
    before = counts(db)
    for value, match in ((float("nan"), "value=nan is not finite"), (float("inf"), "value=inf is not finite"),
                         ("0.5", "value='0.5' is not a number"), (None, "value=None is not a number"),
                         (True, "value=True is not a number")):
        with pytest.raises(ConfigError, match=match):
            ledger.record("acc-high", value, path=db)
    with pytest.raises(NotFoundError, match=r"unknown hypothesis 'acc-hihg'; did you mean 'acc-high'.*known: acc-high"):
        ledger.record("acc-hihg", 0.95, path=db)
    with pytest.raises(MismatchError, match="predicts 'accuracy', not 'loss'"):
        ledger.record("acc-high", 0.95, metric="loss", path=db)
    with pytest.raises(NotFoundError, match="artifact"):
        ledger.record("acc-high", 0.95, artifacts=[tmp_path / "missing.png"], path=db)
    with pytest.raises(ConfigError, match="seed"):
        ledger.record("acc-high", 0.95, seed="1", path=db)
    with pytest.raises(NotFoundError):
        ledger.retract(99, "no such record", path=db)
    assert counts(db) == before
    assert ledger.record("acc-high", 0.95, metric="accuracy", path=db).passed is True


def _verdicts(db, values, **kw):
    ledger.declare("h", "claim", "m", kw.pop("comparator", ">"), kw.pop("threshold", 0.0), path=db, **kw)
    return [ledger.record("h", v, path=db).verdict for v in values]


@pytest.mark.parametrize("values, kw, expected", [
    ([1, 2], {}, ["supported", "supported"]),
    ([1, -1, 2], {}, ["supported", "refuted", "refuted"]),
    ([1, 2, 3], dict(min_runs=3), ["inconclusive", "inconclusive", "supported"]),
    ([1, -1], dict(min_runs=3), ["inconclusive", "refuted"]),  # a failure refutes before n runs
    ([1, -1, 1, 1], dict(rule="majority", min_runs=2), ["inconclusive", "supported", "supported", "supported"]),
    ([1, -1, -1], dict(rule="majority", fraction=0.6), ["supported", "refuted", "refuted"]),
    ([-1, 1, 1], dict(rule="majority", fraction=2 / 3), ["refuted", "refuted", "supported"]),
    ([0.5, 1.0, 1.5], dict(comparator="between", threshold=(0.5, 1.0)), ["supported", "supported", "refuted"]),
    ([0.1 + 0.2], dict(comparator="==", threshold=0.3), ["supported"]),
    ([0.3], dict(comparator="!=", threshold=0.1 + 0.2), ["refuted"]),
    ([-1], dict(comparator="<=", threshold=-1), ["supported"]),
])
def test_verdict_rules(db, values, kw, expected):
    assert _verdicts(db, values, **kw) == expected
    assert ledger.verdict("h", path=db) == expected[-1]


@pytest.mark.parametrize("values, kw, expected", [
    # below min_runs (default 3 for this rule) inconclusive; then the interval decides, not each record
    ([1, 2, 3], {}, ["inconclusive", "inconclusive", "supported"]),
    ([-1, -2, -3], {}, ["inconclusive", "inconclusive", "refuted"]),
    ([-1, 1, 2], {}, ["inconclusive", "inconclusive", "inconclusive"]),  # the interval straddles 0
    ([2, 3, 1, 4], dict(min_runs=2), ["inconclusive", "supported", "supported", "supported"]),
    ([-0.5, 3, 4, 5, 6, 7], dict(min_runs=6), ["inconclusive"] * 5 + ["supported"]),  # one failing run, a clear mean
    ([1, 1, 1], dict(comparator=">=", threshold=1), ["inconclusive", "inconclusive", "supported"]),  # on the edge
    ([1, 1, 1], dict(comparator=">", threshold=1), ["inconclusive", "inconclusive", "refuted"]),
    ([1, 2, 3], dict(comparator="<", threshold=0), ["inconclusive", "inconclusive", "refuted"]),
    ([0.9, 0.9, 0.9], dict(comparator="<=", threshold=0.9), ["inconclusive", "inconclusive", "supported"]),
    ([0.2, 0.5, 0.8], dict(comparator="between", threshold=(0.2, 0.8)), ["inconclusive", "inconclusive", "supported"]),
    ([0.5, 0.9, 1.5], dict(comparator="between", threshold=(0, 1)), ["inconclusive", "inconclusive", "inconclusive"]),
    ([2, 3, 4], dict(comparator="between", threshold=(0, 1)), ["inconclusive", "inconclusive", "refuted"]),
])
def test_interval_rule(db, values, kw, expected):
    assert _verdicts(db, values, rule="interval", **kw) == expected
    assert ledger.verdict("h", path=db) == expected[-1]


def test_interval_rule_reads_the_pooled_evidence_with_its_interval(db):
    values = [0.95, 0.97, 0.93, 0.99, 0.96, 0.94]
    h = ledger.declare("h", "claim", "acc", ">=", 0.9, rule="interval", level=0.9, path=db)
    assert (h.min_runs, h.level) == (3, 0.9)
    assert "90% bootstrap interval of the mean clears the threshold" in h.rule_text and "after >= 3" in h.rule_text
    for v in values:
        ledger.record("h", v, path=db)
    row = ledger.hypotheses(db).iloc[0]
    mean, lo, hi = bootstrap_ci(sorted(values), level=0.9)
    assert (row["verdict"], row["rule"], row["level"]) == ("supported", "interval", 0.9)
    assert (row["mean"], row["ci_low"], row["ci_high"]) == pytest.approx((mean, lo, hi))
    assert row["ci_low"] >= 0.9
    # the same values recorded in another order give the same interval: it depends on the values only
    other = db.parent / "other.sqlite"
    ledger.declare("h", "claim", "acc", ">=", 0.9, rule="interval", level=0.9, path=other)
    for v in reversed(values):
        ledger.record("h", v, path=other)
    assert ledger.hypotheses(other)[["mean", "ci_low", "ci_high"]].equals(ledger.hypotheses(db)[["mean", "ci_low",
                                                                                                    "ci_high"]])
    # a low run pulls the interval across the threshold; retracting it restores the verdict
    bad = ledger.record("h", 0.2, path=db)
    assert bad.verdict == "inconclusive"
    assert ledger.retract(bad.id, "base model evaluated", path=db).verdict == "supported"
    with pytest.raises(MismatchError, match="level"):
        ledger.declare("h", "claim", "acc", ">=", 0.9, rule="interval", path=db)  # level 0.95 is another rule
    assert_consistent(db)


def test_every_rule_shows_the_mean_and_its_interval(db):
    declare_acc(db)
    assert ledger.hypotheses(db)[["mean", "ci_low", "ci_high"]].isna().all(axis=None)  # no evidence yet
    for v in (0.9, 1.0):
        ledger.record("acc-high", v, path=db)
    row = ledger.hypotheses(db).iloc[0]
    assert row["level"] is None or pd.isna(row["level"])
    assert row["mean"] == pytest.approx(0.95) and 0.9 <= row["ci_low"] <= row["mean"] <= row["ci_high"] <= 1.0


def test_a_rerun_of_one_seed_repeats_a_measurement_and_does_not_narrow_the_interval(db, monkeypatch):
    ledger.declare("h", "claim", "acc", ">=", 0.9, rule="interval", path=db)
    monkeypatch.setenv("LORA_LENS_PARAMS", json.dumps({"seeds": 2, "family": "llama"}))
    for run in ("run-1", "run-2", "run-3"):  # the same configuration three times: seeds 0 and 1, two families each
        monkeypatch.setenv("LORA_LENS_RUN_ID", run)
        for seed, values in ((0, (0.95, 0.99)), (1, (0.91, 0.97))):
            for v in values:
                ledger.record("h", v + (0.001 if run == "run-3" else 0.0), seed=seed, path=db)
    row = ledger.hypotheses(db).iloc[0]
    assert (row["n_evidence"], row["n_measured"]) == (12, 4)  # the k-th record of a seed in each run is one
    assert row["verdict"] == "supported"  # 4 distinct measurements clear the interval rule's min_runs
    assert row["mean"] == pytest.approx((0.95 + 0.99 + 0.91 + 0.97) / 4 + 0.001 / 3)
    assert ledger.verdict_text("h", path=db).endswith(
        "over 4 measurements (12 records: reruns of one seed count once))")
    monkeypatch.setenv("LORA_LENS_PARAMS", json.dumps({"seeds": 2, "family": "qwen2"}))  # another configuration
    ledger.record("h", 0.2, seed=0, path=db)
    assert ledger.hypotheses(db).iloc[0]["n_measured"] == 5


def test_two_records_of_one_seed_repeat_nothing_but_need_min_runs_measurements(db, monkeypatch):
    ledger.declare("h", "claim", "acc", ">=", 0.9, rule="interval", path=db)
    monkeypatch.setenv("LORA_LENS_PARAMS", json.dumps({"seed": 0}))
    for run in ("a", "b", "c"):
        monkeypatch.setenv("LORA_LENS_RUN_ID", run)
        ledger.record("h", 0.95, path=db)  # the seed comes from the parameters
    assert ledger.verdict("h", path=db) == "inconclusive"  # three reruns of seed 0 are one measurement
    assert ledger.verdict_text("h", path=db).endswith("needs 3 measurements)")


def test_verdict_text_renders_the_verdict_and_interval_the_ledger_decides_on(db):
    ledger.declare("h", "claim", "acc", ">=", 0.9, rule="interval", path=db)
    assert ledger.verdict_text("h", path=db) == "`h`: **inconclusive** (acc >= 0.9; no evidence yet)"
    ledger.record("h", 0.95, path=db)
    assert ledger.verdict_text("h", path=db).endswith("over 1 measurement; needs 3 measurements)")
    for v in (0.97, 0.93):
        ledger.record("h", v, path=db)
    row = ledger.hypotheses(db).iloc[0]
    interval = f"[{row['ci_low']:.3g}, {row['ci_high']:.3g}]"
    assert ledger.verdict_text("h", path=db) == (f"`h`: **supported** (acc >= 0.9; mean {row['mean']:.3g}, 95 % "
                                                 f"interval {interval} over 3 measurements)")
    ledger.record("h", 0.5, path=db)
    assert ledger.verdict_text("h", path=db).startswith("`h`: **inconclusive**")
    assert ledger.verdict_text("h", path=db).endswith("; the interval straddles the threshold)")
    with pytest.raises(NotFoundError):
        ledger.verdict_text("nope", path=db)


def test_no_evidence_is_inconclusive(db):
    declare_acc(db)
    assert ledger.verdict("acc-high", path=db) == "inconclusive"
    assert list(ledger.history("acc-high", path=db).verdict) == ["inconclusive"]


def test_retraction_changes_verdict_and_is_in_history(db):
    declare_acc(db)
    good = ledger.record("acc-high", 0.95, path=db)
    bad = ledger.record("acc-high", 0.2, notes="wrong checkpoint", path=db)
    assert bad.passed is False and bad.verdict == "refuted"
    r = ledger.retract(bad.id, "evaluated the base model by mistake", path=db)
    assert r.retracts == bad.id and r.verdict == "supported" and r.value is None
    hist = ledger.history("acc-high", path=db)
    assert list(hist.verdict) == ["inconclusive", "supported", "refuted", "supported"]
    assert list(hist.evidence_id[1:]) == [good.id, bad.id, r.id]
    ev = ledger.evidence("acc-high", path=db)
    assert list(ev.retracted) == [False, True, False] and len(ev) == 3  # nothing deleted
    with pytest.raises(ConfigError, match="already retracted"):
        ledger.retract(bad.id, "again", path=db)
    with pytest.raises(ConfigError, match="itself a retraction"):
        ledger.retract(r.id, "undo", path=db)
    with pytest.raises(ConfigError, match="reason"):
        ledger.retract(good.id, " ", path=db)
    assert ledger.hypotheses(db)[["n_evidence", "n_pass"]].values.tolist() == [[1, 1]]
    assert_consistent(db)


def test_artifacts_are_hashed(db, tmp_path):
    declare_acc(db)
    fig = tmp_path / "run-1" / "fig.png"
    fig.parent.mkdir()
    fig.write_bytes(b"png bytes")
    e = ledger.record("acc-high", 0.95, artifacts=[fig], path=db)
    assert e.artifacts == [{"path": str(Path("run-1") / "fig.png"), "sha256": hashlib.sha256(b"png bytes").hexdigest()}]


def test_module_docstring_example_runs():
    result = doctest.testmod(ledger, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_two_runs_of_a_series_double_the_evidence_not_the_hypotheses(monkeypatch, tmp_path):
    """Under `lora-lens run` every notebook declares near the top and records where it measures: a second run of
    the series re-declares (a no-op) and appends its own evidence, tagged with its own run id."""
    from conftest import write_notebook
    from lora_lens.workshop import presets
    from lora_lens.workshop.runner import run_series

    monkeypatch.setattr(presets, "PRESETS", {"workshop": {}, "smoke": {}})
    cell = ("from lora_lens import ledger\n"
            "ledger.declare('h-{n}', 'claim {n}', 'acc', '>=', 0.5, falsifier='acc below 0.5')\n"
            "ledger.record('h-{n}', 0.9)")
    nbs = tmp_path / "nbs"
    for n in ("00", "01"):
        write_notebook(nbs / f"{n}_nb.ipynb", [cell.format(n=n)])
    for name in ("a", "b"):
        run_series("workshop", out=tmp_path / "runs" / name, notebooks_dir=nbs)
    db = tmp_path / "runs" / "ledger.sqlite"
    assert sorted(ledger.hypotheses(path=db)["id"]) == ["h-00", "h-01"]
    ev = ledger.evidence(path=db)
    assert len(ev) == 4 and ev["run_id"].nunique() == 2
    assert sorted(ev["notebook"].str[:2]) == ["00", "00", "01", "01"]
    assert all(ledger.verdict(h, path=db) == "supported" for h in ("h-00", "h-01"))
    md = ledger.export("md", path=db)
    assert "h-00" in md and "h-01" in md and all(run_id in md for run_id in ev["run_id"].unique())
    # a smoke run keeps its evidence apart: it never decides the verdicts of the real runs
    run_series("smoke", out=tmp_path / "runs" / "quick", notebooks_dir=nbs)
    assert len(ledger.evidence(path=db)) == 4
    assert len(ledger.evidence(path=tmp_path / "runs" / "ledger-smoke.sqlite")) == 2
