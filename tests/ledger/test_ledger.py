"""Tests of the hypothesis ledger: rules, bad input, concurrency, crash safety, export/import, CLI, migration."""

import doctest
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import pytest

from lora_lens import ledger
from lora_lens.errors import ConfigError, CorruptError, LoraLensError, MismatchError, NotFoundError
from lora_lens.workshop.runner import ENV_VARS

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
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


# ------------------------------------------------------------------------------------------ context / location
def test_run_context_and_location_from_env(monkeypatch, tmp_path):
    run_dir = tmp_path / "runs" / "run-7"
    monkeypatch.setenv("LORA_LENS_RUN_ID", "run-7")
    monkeypatch.setenv("LORA_LENS_RUN_DIR", str(run_dir))
    monkeypatch.setenv("LORA_LENS_NOTEBOOK", "02_what_changed.ipynb")
    monkeypatch.setenv("LORA_LENS_PARAMS", json.dumps({"seed": 3, "rank": 8}))
    assert ledger.ledger_path() == tmp_path / "runs" / "ledger.sqlite"
    declare_acc(None)
    e = ledger.record("acc-high", 0.93)
    assert (e.run_id, e.notebook, e.params, e.seed) == ("run-7", "02_what_changed.ipynb", {"seed": 3, "rank": 8}, 3)
    assert ledger.record("acc-high", 0.93, seed=5).seed == 5
    assert (tmp_path / "runs" / "ledger.sqlite").exists()
    monkeypatch.setenv("LORA_LENS_LEDGER", str(tmp_path / "elsewhere.sqlite"))
    assert ledger.ledger_path() == tmp_path / "elsewhere.sqlite"
    assert ledger.ledger_path(tmp_path / "x.sqlite") == tmp_path / "x.sqlite"
    monkeypatch.setenv("LORA_LENS_PARAMS", "{not json")
    with pytest.raises(ConfigError, match="LORA_LENS_PARAMS"):
        ledger.record("acc-high", 0.93)


def test_interactive_context_and_default_location(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert ledger.ledger_path() == Path("runs") / "ledger.sqlite"
    ctx = ledger.run_context()
    assert ctx.run_id.startswith(f"interactive-{os.getpid()}-") and ctx.notebook is None and ctx.params == {}
    assert ledger.run_context().run_id == ctx.run_id  # stable within a process
    declare_acc(None)
    assert (tmp_path / "runs" / "ledger.sqlite").exists()


def test_default_location_is_the_projects_runs_folder_from_any_subfolder(monkeypatch, tmp_path):
    """JupyterLab starts kernels in notebooks/: they share the ledger that `lora-lens run` fills at the root."""
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "notebooks" / "deep").mkdir(parents=True)
    for cwd in (tmp_path, tmp_path / "notebooks", tmp_path / "notebooks" / "deep"):
        monkeypatch.chdir(cwd)
        assert ledger.ledger_path() == tmp_path / "runs" / "ledger.sqlite"


def test_artifacts_are_hashed(db, tmp_path):
    declare_acc(db)
    fig = tmp_path / "run-1" / "fig.png"
    fig.parent.mkdir()
    fig.write_bytes(b"png bytes")
    e = ledger.record("acc-high", 0.95, artifacts=[fig], path=db)
    assert e.artifacts == [{"path": str(Path("run-1") / "fig.png"), "sha256": hashlib.sha256(b"png bytes").hexdigest()}]


# ------------------------------------------------------------------------------------------ export / import / CLI
def _fill(db):
    declare_acc(db, tags=("edit",))
    ledger.declare("kl-small", "KL stays <small> & local | ok", "kl", "between", (0, 0.5), min_runs=2,
                   rule="majority", path=db)
    ledger.record("acc-high", 0.95, seed=0, path=db)
    bad = ledger.record("acc-high", 0.5, seed=1, path=db)
    ledger.retract(bad.id, "<script>alert(1)</script>", path=db)
    for v in (0.1, 0.7, 0.2):
        ledger.record("kl-small", v, path=db)


def test_export_markdown_and_html(db):
    _fill(db)
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
    _fill(db)
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


def test_cli(db, tmp_path, capsys):
    assert ledger.main(["--ledger", str(db), "list"]) == 0
    assert "no hypotheses" in capsys.readouterr().out
    _fill(db)
    assert ledger.main(["list", "--ledger", str(db)]) == 0
    assert "acc-high supported" in " ".join(capsys.readouterr().out.split())
    assert ledger.main(["--ledger", str(db), "show", "acc-high"]) == 0
    out = capsys.readouterr().out
    assert "## acc-high: supported" in out and "(evidence #3)" in out
    for fmt in ("md", "html", "jsonl"):
        assert ledger.main(["--ledger", str(db), "export", "--format", fmt, "--out", str(tmp_path / f"l.{fmt}")]) == 0
    assert ledger.main(["--ledger", str(tmp_path / "new.sqlite"), "import", str(tmp_path / "l.jsonl")]) == 0
    assert "imported 2 hypotheses, 6 evidence" in capsys.readouterr().out
    assert ledger.main(["--ledger", str(db), "show", "nope"]) == 2
    assert "unknown hypothesis 'nope'" in capsys.readouterr().err
    assert ledger.main(["--ledger", str(tmp_path / "missing.sqlite"), "export"]) == 2
    assert ledger.main(["frobnicate"]) == 2
    assert ledger.main(["--help"]) == 0


# ------------------------------------------------------------------------------------------ schema
def test_migrates_a_v1_database(db):
    con = sqlite3.connect(db, isolation_level=None)
    ledger._migrate_v1(con)
    con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    con.execute("INSERT INTO schema_version VALUES (1)")
    con.execute("INSERT INTO hypotheses VALUES ('old', 'c', 'm', '>', 0, NULL, '', '', '[]', NULL, 'all', 1, NULL, "
                "'2024-01-01T00:00:00+00:00')")
    con.execute("INSERT INTO evidence (hypothesis_id, run_id, params, metric, value, passed, artifacts, notes, "
                "created) VALUES ('old', 'r1', '{}', 'm', 1.0, 1, '[]', '', '2024-01-02T00:00:00+00:00')")
    con.execute("INSERT INTO verdicts (hypothesis_id, verdict, evidence_id, created) VALUES "
                "('old', 'inconclusive', NULL, '2024-01-01'), ('old', 'supported', 1, '2024-01-02')")
    con.close()
    ev = ledger.evidence("old", path=db)
    assert len(ev) == 1 and len(ev.uid[0]) == 32
    assert ledger.record("old", -1, path=db).verdict == "refuted"
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT version FROM schema_version").fetchall() == [(ledger.SCHEMA_VERSION,)]


def test_future_schema_and_garbage_are_refused(db, tmp_path):
    declare_acc(db)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(MismatchError, match="schema version 99.*upgrade lora_lens"):
        ledger.record("acc-high", 1.0, path=db)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(CorruptError, match="not a readable ledger"):
        ledger.verdict("x", path=junk)
    assert issubclass(CorruptError, LoraLensError)


# ------------------------------------------------------------------------------------------ processes
WRITER = """
import sys, time
from lora_lens import ledger
db, worker, n, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
while time.time() < start:
    time.sleep(0.001)
i = 0
while n < 0 or i < n:
    e = ledger.record("acc-high", 0.95 if i % 7 else 0.5, seed=worker, notes=f"{worker}-{i}", path=db)
    if n < 0 and i % 5 == 4:
        ledger.retract(e.id, "drill", path=db)
    i += 1
"""


def _writer(db, worker, n, start):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(worker), str(n), str(start)], env=env)


def test_concurrent_writers_lose_and_duplicate_nothing(db):
    declare_acc(db, rule="majority", fraction=0.8, min_runs=10)
    start = time.time() + 1.5
    procs = [_writer(db, w, 200, start) for w in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    ev = ledger.evidence("acc-high", path=db)
    assert len(ev) == 800
    assert sorted(ev.notes) == sorted(f"{w}-{i}" for w in range(4) for i in range(200))
    assert ev.seed.nunique() == 4 and ev.id.is_unique
    assert_consistent(db)


def test_sigkill_mid_write_leaves_a_consistent_ledger(db):
    declare_acc(db)
    for round_ in range(3):  # the writer records and retracts in a loop; kill it at an arbitrary moment
        target = (counts(db)[1] if db.exists() else 0) + 30
        proc = _writer(db, round_, -1, 0)
        deadline = time.time() + 30
        while time.time() < deadline and (not db.exists() or counts(db)[1] < target):
            time.sleep(0.02)
        time.sleep(0.007 * round_)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert counts(db)[1] >= target
        assert_consistent(db)
    n = counts(db)[1]
    assert ledger.record("acc-high", 0.99, path=db).id > 0
    assert counts(db)[1] == n + 1
    assert_consistent(db)


# ------------------------------------------------------------------------------------------ plots / docs
def test_plots_return_figures(db):
    import matplotlib.pyplot as plt

    assert plot_ok(ledger.plot_evidence(None, path=db))  # empty ledger: a figure saying so
    _fill(db)
    fig = ledger.plot_evidence("acc-high", path=db)
    assert fig.axes[0].get_title() == "acc-high: supported" and fig.axes[0].get_ylabel() == "accuracy"
    assert plot_ok(ledger.plot_evidence(None, path=db)) and plot_ok(ledger.plot_timeline(path=db))
    _, ax = plt.subplots()
    assert ledger.plot_evidence("kl-small", ax=ax, path=db) is ax.figure
    with pytest.raises(ConfigError, match="pass an id"):
        ledger.plot_evidence(None, ax=ax, path=db)
    plt.close("all")


def plot_ok(fig):
    fig.canvas.draw()
    return len(fig.axes) >= 1


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
