"""Shared cases of the ledger tests: a ledger file per test, a clean run context, and helpers over the raw file."""

import sqlite3

import pytest

from lora_lens import ledger
from lora_lens.workshop.runner import ENV_VARS

__all__ = ["assert_consistent", "clean_env", "counts", "db", "declare_acc", "fill"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No run context from the environment: every test starts outside a run."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def db(tmp_path):
    return tmp_path / "ledger.sqlite"


def declare_acc(db, **kw):
    args = dict(falsifier="accuracy below 0.9 on any seed", method="probe set", path=db)
    return ledger.declare("acc-high", "The adapter learns the edit", "accuracy", ">=", 0.9, **{**args, **kw})


def counts(db):
    with sqlite3.connect(db) as con:
        return tuple(con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                     for t in ("hypotheses", "evidence", "verdicts"))


def assert_consistent(db):
    """Integrity ok; the latest logged verdict equals the verdict recomputed from the evidence."""
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = {r[0] for r in con.execute("SELECT id FROM evidence")}
        caused = {r[0] for r in con.execute("SELECT evidence_id FROM verdicts WHERE evidence_id IS NOT NULL")}
        assert caused <= ids
        assert con.execute("SELECT COUNT(DISTINCT uid) FROM evidence").fetchone()[0] == len(ids)
    hist = ledger.history(path=db)
    for hid in ledger.hypotheses(db)["id"]:
        assert hist[hist.hypothesis_id == hid].verdict.iloc[-1] == ledger.verdict(hid, path=db)


def fill(db):
    """Two hypotheses, six records, one of them retracted with a reason that needs escaping."""
    declare_acc(db, tags=("edit",))
    ledger.declare("kl-small", "KL stays <small> & local | ok", "kl", "between", (0, 0.5), min_runs=2,
                   rule="majority", path=db)
    ledger.record("acc-high", 0.95, seed=0, path=db)
    bad = ledger.record("acc-high", 0.5, seed=1, path=db)
    ledger.retract(bad.id, "<script>alert(1)</script>", path=db)
    for v in (0.1, 0.7, 0.2):
        ledger.record("kl-small", v, path=db)
