"""Tests of the ledger's storage: run context, location, migrations, concurrent writers, crash safety."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ledger_cases import assert_consistent, clean_env, counts, db, declare_acc  # noqa: F401 (fixtures)
from lora_lens import ledger
from lora_lens.errors import ConfigError, CorruptError, LoraLensError, MismatchError
from lora_lens.ledger import store

ROOT = Path(__file__).resolve().parents[2]


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


# ------------------------------------------------------------------------------------------ schema
def test_migrates_a_v1_database(db):
    con = sqlite3.connect(db, isolation_level=None)
    store.MIGRATIONS[0](con)
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
    assert ev.machine[0] is None and ev.threads[0] is None  # v3: unknown for records made before it
    assert ledger.hypothesis("old", path=db).level is None and ledger.verdict("old", path=db) == "supported"
    new = ledger.record("old", -1, path=db)
    assert new.verdict == "refuted" and new.machine == store.machine()
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT version FROM schema_version").fetchall() == [(ledger.SCHEMA_VERSION,)]


def test_migrates_a_v2_database_to_intervals_and_machines(db):
    con = sqlite3.connect(db, isolation_level=None)
    for migrate in store.MIGRATIONS[:2]:
        migrate(con)
    con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    con.execute("INSERT INTO schema_version VALUES (2)")
    con.execute("INSERT INTO hypotheses VALUES ('old', 'c', 'm', '>=', 0, NULL, '', '', '[]', NULL, 'all', 2, NULL, "
                "'2024-01-01T00:00:00+00:00')")
    con.close()
    assert ledger.SCHEMA_VERSION == 3
    ledger.declare("new", "c", "m", ">", 0, rule="interval", path=db)
    e = ledger.record("new", 1.0, path=db)
    assert (ledger.hypothesis("old", path=db).level, ledger.hypothesis("new", path=db).level) == (None, 0.95)
    assert e.machine == store.machine() and ledger.evidence("new", path=db).machine[0] == e.machine
    assert ledger.record("old", 1.0, path=db).verdict == "inconclusive"


def test_machine_and_threads_of_every_record(db, monkeypatch):
    m = store.machine()
    assert isinstance(m, str) and m.endswith(f"{os.cpu_count()} CPUs") and len(m) < 120
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # torch not imported: the environment says
    for raw, threads in (("3", 3), ("", None), ("many", None), ("0", None)):
        monkeypatch.setenv("OMP_NUM_THREADS", raw)
        assert store.thread_count() == threads
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    declare_acc(db)
    assert ledger.record("acc-high", 0.95, path=db).threads == 3
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(get_num_threads=lambda: 5))  # torch imported: it says
    assert store.thread_count() == 5
    e = ledger.record("acc-high", 0.95, path=db)
    assert (e.threads, e.machine) == (5, m)
    assert ledger.evidence("acc-high", path=db)[["threads", "machine"]].values.tolist() == [[3, m], [5, m]]


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


@pytest.mark.parametrize("comparator, threshold, value, passes", [
    ("<=", 0.05, 1.0 - 0.95, True),            # 0.05000000000000004: on the bound, not over it
    ("<", 0.05, 1.0 - 0.95, False),
    (">=", 0.3, 0.1 + 0.2, True), (">", 0.3, 0.1 + 0.2, False),
    ("<=", 0.05, 0.0500001, False), (">=", 0.3, 0.2999999, False),
    ("between", (0.3, 0.5), 0.1 + 0.2, True), ("between", (0.3, 0.5), 0.29, False),
    ("==", 0.3, 0.1 + 0.2, True), ("!=", 0.3, 0.1 + 0.2, False),
])
def test_a_value_on_the_threshold_up_to_rounding_is_on_it(comparator, threshold, value, passes):
    h = store.Hypothesis("h", "claim", "m", comparator, threshold)
    assert h.passes(value) is passes
