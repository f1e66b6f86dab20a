"""Tests of the ledger's export (md, html, jsonl) and import."""

import pytest

from ledger_cases import assert_consistent, clean_env, counts, db, fill  # noqa: F401 (fixtures)
from lora_lens import ledger
from lora_lens.errors import ConfigError, CorruptError, MismatchError


def test_export_markdown_and_html(db):
    fill(db)
    md = ledger.export("md", db)
    assert "| id | verdict | evidence | pass | prediction | claim |" in md
    assert "| acc-high | **supported** | 1 | 1 | accuracy >= 0.9 |" in md
    assert "| kl-small | **supported** | 3 | 2 | 0 <= kl <= 0.5 | KL stays <small> & local \\| ok |" in md
    assert "- **Falsifier:** accuracy below 0.9 on any seed" in md and "retracted by #3" in md
    page = ledger.export("html", db)
    assert page.startswith("<!DOCTYPE html>") and "<script>" not in page and "&lt;small&gt; &amp; local" in page
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
    cols = ["hypothesis_id", "run_id", "value", "passed", "retracted", "uid", "notes"]
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
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "ledger", "schema_version": 2}\nnot json\n')
    with pytest.raises(CorruptError, match=":2 is not a ledger record"):
        ledger.import_jsonl(bad, other)
