"""Tests of the ledger's export (md, html, jsonl) and import."""

import json

import pytest

from ledger_cases import assert_consistent, clean_env, counts, db, fill  # noqa: F401 (fixtures)
from lora_lens import ledger
from lora_lens.errors import ConfigError, CorruptError, MismatchError
from lora_lens.ledger import store


def test_export_markdown_and_html(db):
    fill(db)
    md = ledger.export("md", db)
    assert "| id | verdict | evidence | pass | mean [interval] | prediction | claim |" in md
    assert "| acc-high | **supported** | 1 | 1 | 0.95 [0.95, 0.95] | accuracy >= 0.9 |" in md
    assert "| kl-small | **supported** | 3 | 2 | 0.3333 [0.1, 0.7] | 0 <= kl <= 0.5 | KL stays <small> & local" in md
    assert "| KL stays <small> & local \\| ok |" in md
    assert "- **Falsifier:** accuracy below 0.9 on any seed" in md and "retracted by #3" in md
    assert "- **Evidence:** mean 0.3333, 95% bootstrap interval [0.1, 0.7] over 3 live run(s), 2 passing" in md
    assert "| # | run | notebook | seed | value | pass | threads | machine |" in md
    assert f"| 0.95 | pass | {store.thread_count() or ''} | {store.machine()} |" in md
    page = ledger.export("html", db)
    assert page.startswith("<!DOCTYPE html>") and "<script>" not in page and "&lt;small&gt; &amp; local" in page
    assert "<th>mean [interval]</th>" in page and "<td>0.3333 [0.1, 0.7]</td>" in page
    assert f"<td>{store.thread_count() or ''}</td><td>{store.machine()}</td>" in page
    with pytest.raises(ConfigError, match="unknown export format 'pdf'"):
        ledger.export("pdf", db)


def test_jsonl_round_trip_is_idempotent(db, tmp_path):
    fill(db)
    dump = tmp_path / "ledger.jsonl"
    dump.write_text(ledger.export("jsonl", db))
    other = tmp_path / "other.sqlite"
    assert ledger.import_jsonl(dump, other) == {"hypotheses": 2, "evidence": 6}
    assert ledger.import_jsonl(dump, other) == {"hypotheses": 0, "evidence": 0}
    assert ledger.import_jsonl(dump, db) == {"hypotheses": 0, "evidence": 0}
    cols = ["hypothesis_id", "run_id", "value", "passed", "retracted", "uid", "notes", "machine", "threads"]
    assert ledger.evidence(path=other)[cols].equals(ledger.evidence(path=db)[cols])
    assert ledger.hypotheses(other).drop(columns="author").equals(ledger.hypotheses(db).drop(columns="author"))
    assert list(ledger.history(path=other).verdict) == list(ledger.history(path=db).verdict)
    assert_consistent(other)
    # a conflicting hypothesis aborts the whole import
    conflict = tmp_path / "conflict.sqlite"
    ledger.declare("kl-small", "a different claim", "kl", "<", 1, path=conflict)
    with pytest.raises(MismatchError, match="kl-small"):
        ledger.import_jsonl(dump, conflict)
    assert counts(conflict) == (1, 0, 1)
    assert ledger.evidence(path=other).threads.tolist() == ledger.evidence(path=db).threads.tolist()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "ledger", "schema_version": 2}\nnot json\n')
    with pytest.raises(CorruptError, match=":2 is not a ledger record"):
        ledger.import_jsonl(bad, other)


def test_jsonl_keeps_the_interval_rule_and_older_exports_still_import(db, tmp_path, monkeypatch):
    monkeypatch.setattr(store, "thread_count", lambda: 1)
    ledger.declare("eff", "The edit lands", "efficacy", ">=", 0.8, rule="interval", level=0.9, path=db)
    for v in (0.9, 0.95, 0.85):
        ledger.record("eff", v, path=db)
    dump = tmp_path / "ledger.jsonl"
    dump.write_text(ledger.export("jsonl", db))
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert lines[0]["schema_version"] == 3 and lines[1]["level"] == 0.9 and lines[1]["rule"] == "interval"
    assert all(d["machine"] == store.machine() and d["threads"] == 1 for d in lines[2:])
    other = tmp_path / "other.sqlite"
    assert ledger.import_jsonl(dump, other) == {"hypotheses": 1, "evidence": 3}
    assert ledger.hypothesis("eff", path=other) == ledger.hypothesis("eff", path=db)
    assert ledger.hypotheses(other).drop(columns="author").equals(ledger.hypotheses(db).drop(columns="author"))
    assert ledger.verdict("eff", path=other) == "supported"
    # an export of a v2 ledger has no level, machine or threads: it imports, with those unknown
    old = [{k: v for k, v in d.items() if k not in ("level", "machine", "threads")} for d in lines]
    old[0]["schema_version"] = 2
    old[1]["rule"], old[1]["min_runs"] = "all", 1
    v2 = tmp_path / "v2.jsonl"
    v2.write_text("".join(json.dumps(d) + "\n" for d in old))
    third = tmp_path / "third.sqlite"
    assert ledger.import_jsonl(v2, third) == {"hypotheses": 1, "evidence": 3}
    ev = ledger.evidence(path=third)
    assert ev.machine.isna().all() and ev.threads.isna().all() and ledger.hypothesis("eff", path=third).level is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**lines[1]}) + "\n" + json.dumps({**lines[2], "threads": "two"}) + "\n")
    with pytest.raises(CorruptError, match="threads='two'"):
        ledger.import_jsonl(bad, tmp_path / "fourth.sqlite")
