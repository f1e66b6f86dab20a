"""Storage of the hypothesis ledger: records, SQLite schema and migrations, connections, run context, location.

One SQLite file (WAL, 30 s busy timeout, every write a single ``BEGIN IMMEDIATE`` transaction, so concurrent runs
and killed processes leave it consistent). The records it stores are :class:`Hypothesis` and :class:`Evidence`;
:class:`RunContext` says where a record comes from (set by the runner through ``LORA_LENS_*`` variables) and on
what: the machine (:func:`machine`) and the number of threads (:func:`thread_count`).

Location: ``path`` argument > ``$LORA_LENS_LEDGER`` > ``<parent of $LORA_LENS_RUN_DIR>/ledger.sqlite`` >
``<project>/runs/ledger.sqlite`` inside a checkout (from any subfolder, e.g. ``notebooks/``) >
``./runs/ledger.sqlite`` (:func:`ledger_path`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import math
import operator
import os
import platform
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from lora_lens.errors import ConfigError, CorruptError, MismatchError, NotFoundError

__all__ = ["COMPARATORS", "MIGRATIONS", "RULES", "SCHEMA_VERSION", "Evidence", "Hypothesis", "RunContext",
           "evidence_from_row", "evidence_records", "get_hypothesis", "git_commit", "hypothesis_from_row",
           "ledger_path", "machine", "open_ledger", "run_context", "thread_count", "transaction", "utc_now"]

SCHEMA_VERSION = 3
COMPARATORS = (">", ">=", "<", "<=", "==", "!=", "between")
RULES = ("all", "majority", "interval")
_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """A declared hypothesis: claim, prediction (``metric comparator threshold``), falsifier and verdict rule."""

    id: str
    claim: str
    metric: str
    comparator: str
    threshold: float | tuple[float, float]
    falsifier: str = ""
    method: str = ""
    tags: tuple[str, ...] = ()
    author: str | None = None
    rule: str = "all"
    min_runs: int = 1
    fraction: float | None = None
    level: float | None = None
    created: str = ""

    @property
    def prediction(self) -> str:
        """The prediction as text, e.g. ``"effective_rank <= 4"``."""
        if self.comparator == "between":
            return f"{self.threshold[0]:g} <= {self.metric} <= {self.threshold[1]:g}"
        return f"{self.metric} {self.comparator} {self.threshold:g}"

    @property
    def rule_text(self) -> str:
        """The verdict rule as text."""
        if self.rule == "all":
            return f"supported when >= {self.min_runs} live run(s) and all pass; refuted by any failing run"
        if self.rule == "interval":
            return (f"after >= {self.min_runs} live run(s): supported when the {self.level * 100:g}% bootstrap "
                    "interval of the mean clears the threshold on the predicted side, refuted when it lies entirely "
                    "on the other side, else inconclusive")
        return f"after >= {self.min_runs} live run(s): supported when pass share >= {self.fraction:g}, else refuted"

    def passes(self, value: float) -> bool:
        """Whether ``value`` satisfies the prediction. A value that equals a threshold up to float rounding (relative
        1e-9) is on it, whatever its last bits: a drop of ``1.0 - 0.95`` meets ``<= 0.05``, and fails ``< 0.05``."""
        t = self.threshold
        if self.comparator == "between":
            return (t[0] <= value <= t[1]) or _on(value, t[0]) or _on(value, t[1])
        if self.comparator in ("==", "!="):
            return _on(value, t) == (self.comparator == "==")
        if _on(value, t):
            return self.comparator in (">=", "<=")
        return _OPS[self.comparator](value, t)



def _on(value: float, threshold: float) -> bool:
    """``value`` equals ``threshold`` up to float rounding."""
    return math.isclose(value, threshold, rel_tol=1e-9, abs_tol=1e-12)


@dataclasses.dataclass(frozen=True)
class Evidence:
    """One evidence record (or a retraction, when ``retracts`` is set); ``verdict`` is the verdict after it."""

    id: int
    uid: str
    hypothesis_id: str
    run_id: str
    notebook: str | None
    params: dict
    seed: int | None
    git_commit: str | None
    metric: str | None
    value: float | None
    passed: bool | None
    artifacts: list
    notes: str
    created: str
    machine: str | None = None
    threads: int | None = None
    retracts: int | None = None
    verdict: str | None = None


@dataclasses.dataclass(frozen=True)
class RunContext:
    """Where a record comes from (set by the runner through ``LORA_LENS_*`` environment variables) and on what:
    the machine (:func:`machine`) and the thread count (:func:`thread_count`), None when unknown."""

    run_id: str
    run_dir: str | None
    notebook: str | None
    params: dict
    machine: str | None = None
    threads: int | None = None


# ----------------------------------------------------------------------------------------------- context
def utc_now() -> str:
    """The current UTC time as ISO 8601 with microseconds: the timestamp of every record."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@functools.lru_cache(maxsize=None)
def _interactive_id(pid: int) -> str:
    return f"interactive-{pid}-{time.strftime('%Y%m%dT%H%M%S')}"


@functools.lru_cache(maxsize=1)
def machine() -> str:
    """The machine in one short string: architecture, CPU model and logical CPUs, e.g.
    ``"x86_64 · AMD EPYC 7B13 · 16 CPUs"`` (cached per process; the CPU model is omitted when unknown)."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")) and ":" in line:
                model = line.split(":", 1)[1].strip()
                break
    model = " ".join((model or platform.processor() or "").split())
    parts = [platform.machine() or "unknown", model if model != platform.machine() else "",
             f"{os.cpu_count() or '?'} CPUs"]
    return " · ".join(p for p in parts if p)


def thread_count() -> int | None:
    """The intra-op threads of this process: ``torch.get_num_threads()`` when torch is already imported (it is
    never imported for this), else ``$OMP_NUM_THREADS`` as an integer, else None."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        return int(torch.get_num_threads())
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


def run_context() -> RunContext:
    """Read the run context from the environment (``interactive-<pid>-<time>`` outside a run), with the machine
    and the thread count.

    Raises:
        ConfigError: ``$LORA_LENS_PARAMS`` is not a JSON object.
    """
    raw = os.environ.get("LORA_LENS_PARAMS") or "{}"
    try:
        params = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"LORA_LENS_PARAMS={raw[:80]!r} is not valid JSON ({exc}); set it to a JSON object") from None
    if not isinstance(params, dict):
        raise ConfigError(f"LORA_LENS_PARAMS={raw[:80]!r} must be a JSON object like '{{\"seed\": 0}}'")
    return RunContext(os.environ.get("LORA_LENS_RUN_ID") or _interactive_id(os.getpid()),
                      os.environ.get("LORA_LENS_RUN_DIR") or None, os.environ.get("LORA_LENS_NOTEBOOK") or None,
                      params, machine(), thread_count())


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the checkout holding this package, or None (cached per process)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def ledger_path(path: str | os.PathLike | None = None) -> Path:
    """Resolve the ledger file: ``path`` > ``$LORA_LENS_LEDGER`` > run folder's parent > the project's ``runs/``.

    Outside a run the default is ``<project>/runs/ledger.sqlite`` when the current directory is inside a checkout
    (the nearest folder holding both ``pyproject.toml`` and ``notebooks/``), so a notebook opened in JupyterLab
    (whose working directory is ``notebooks/``) shares the ledger of ``lora-lens run`` started at the project root.
    Elsewhere it is ``./runs/ledger.sqlite``.
    """
    if path is not None:
        return Path(path)
    if os.environ.get("LORA_LENS_LEDGER"):
        return Path(os.environ["LORA_LENS_LEDGER"])
    if os.environ.get("LORA_LENS_RUN_DIR"):
        return Path(os.environ["LORA_LENS_RUN_DIR"]).parent / "ledger.sqlite"
    cwd = Path.cwd()
    for folder in (cwd, *cwd.parents):
        if (folder / "pyproject.toml").is_file() and (folder / "notebooks").is_dir():
            return folder / "runs" / "ledger.sqlite"
    return Path("runs") / "ledger.sqlite"


# ----------------------------------------------------------------------------------------------- storage
def _run_sql(db: sqlite3.Connection, script: str) -> None:
    for stmt in filter(str.strip, script.split(";")):  # not executescript: it would COMMIT our transaction
        db.execute(stmt)


def _migrate_v1(db: sqlite3.Connection) -> None:
    """v1: the hypotheses, evidence and verdicts tables."""
    _run_sql(db, """
    CREATE TABLE hypotheses (id TEXT PRIMARY KEY, claim TEXT NOT NULL, metric TEXT NOT NULL,
        comparator TEXT NOT NULL, threshold REAL NOT NULL, threshold_hi REAL, falsifier TEXT NOT NULL,
        method TEXT NOT NULL, tags TEXT NOT NULL, author TEXT, rule TEXT NOT NULL, min_runs INTEGER NOT NULL,
        fraction REAL, created TEXT NOT NULL);
    CREATE TABLE evidence (id INTEGER PRIMARY KEY AUTOINCREMENT,
        hypothesis_id TEXT NOT NULL REFERENCES hypotheses(id), run_id TEXT NOT NULL, notebook TEXT,
        params TEXT NOT NULL, seed INTEGER, git_commit TEXT, metric TEXT, value REAL, passed INTEGER,
        artifacts TEXT NOT NULL, notes TEXT NOT NULL, created TEXT NOT NULL, retracts INTEGER REFERENCES evidence(id));
    CREATE INDEX evidence_hypothesis ON evidence(hypothesis_id);
    CREATE TABLE verdicts (id INTEGER PRIMARY KEY AUTOINCREMENT, hypothesis_id TEXT NOT NULL,
        verdict TEXT NOT NULL, evidence_id INTEGER, created TEXT NOT NULL)""")


def _migrate_v2(db: sqlite3.Connection) -> None:
    """v2: a globally unique id per evidence record, so that export/import round trips are idempotent."""
    _run_sql(db, """ALTER TABLE evidence ADD COLUMN uid TEXT;
    UPDATE evidence SET uid = lower(hex(randomblob(16))) WHERE uid IS NULL;
    CREATE UNIQUE INDEX evidence_uid ON evidence(uid);
    CREATE INDEX evidence_retracts ON evidence(retracts)""")


def _migrate_v3(db: sqlite3.Connection) -> None:
    """v3: the coverage ``level`` of ``rule="interval"``; the machine and thread count of every evidence record."""
    _run_sql(db, """ALTER TABLE hypotheses ADD COLUMN level REAL;
    ALTER TABLE evidence ADD COLUMN machine TEXT;
    ALTER TABLE evidence ADD COLUMN threads INTEGER""")


MIGRATIONS = [_migrate_v1, _migrate_v2, _migrate_v3]
"""``MIGRATIONS[v]`` upgrades a version-``v`` database to ``v + 1``."""


@contextlib.contextmanager
def transaction(db: sqlite3.Connection):
    """One ``BEGIN IMMEDIATE`` transaction: committed when the block ends, rolled back when it raises."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _version(db: sqlite3.Connection) -> int:
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'").fetchone():
        return 0
    return db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0


def _connect(path: Path, create: bool = False) -> sqlite3.Connection:
    """Open (creating and/or migrating) the ledger; the caller closes it."""
    if not path.exists():
        if not create:
            raise NotFoundError(f"no ledger at {str(path)!r}; declare a hypothesis first (ledger.declare) "
                                "or pass the right path / --ledger")
        path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    db.row_factory = sqlite3.Row
    try:
        db.execute("PRAGMA busy_timeout = 30000")
        if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: a killed process never corrupts the file
        version = _version(db)
        if version > SCHEMA_VERSION:
            raise MismatchError(f"ledger {str(path)!r} has schema version {version}, but this lora_lens only knows "
                                f"up to {SCHEMA_VERSION}; upgrade lora_lens to read it")
        if version < SCHEMA_VERSION:
            with transaction(db):
                db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                for migrate in MIGRATIONS[_version(db):]:  # re-read under the write lock
                    migrate(db)
                db.execute("DELETE FROM schema_version")
                db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
    except sqlite3.DatabaseError as exc:
        db.close()
        raise CorruptError(f"{str(path)!r} is not a readable ledger ({exc}); pass another path or move it away") \
            from exc
    except BaseException:
        db.close()
        raise
    return db


@contextlib.contextmanager
def open_ledger(path=None, create: bool = False, write: bool = False):
    """The ledger at :func:`ledger_path` ``(path)`` as a connection, closed afterwards; ``write``: one transaction.

    Raises:
        NotFoundError: no ledger there and not ``create``. CorruptError: not a ledger. MismatchError: too new.
    """
    db = _connect(ledger_path(path), create)
    try:
        if write:
            with transaction(db):
                yield db
        else:
            yield db
    finally:
        db.close()


def hypothesis_from_row(row: sqlite3.Row) -> Hypothesis:
    """The :class:`Hypothesis` of a ``hypotheses`` row."""
    t = row["threshold"] if row["threshold_hi"] is None else (row["threshold"], row["threshold_hi"])
    return Hypothesis(row["id"], row["claim"], row["metric"], row["comparator"], t, row["falsifier"], row["method"],
                      tuple(json.loads(row["tags"])), row["author"], row["rule"], row["min_runs"], row["fraction"],
                      row["level"], row["created"])


def evidence_from_row(row: sqlite3.Row, verdict: str | None = None) -> Evidence:
    """The :class:`Evidence` of an ``evidence`` row (``verdict``: the verdict after it, when known)."""
    passed = None if row["passed"] is None else bool(row["passed"])
    return Evidence(row["id"], row["uid"], row["hypothesis_id"], row["run_id"], row["notebook"],
                    json.loads(row["params"]), row["seed"], row["git_commit"], row["metric"], row["value"], passed,
                    json.loads(row["artifacts"]), row["notes"], row["created"], row["machine"], row["threads"],
                    row["retracts"], verdict)


def get_hypothesis(db: sqlite3.Connection, id: str) -> Hypothesis:
    """The declared hypothesis ``id``.

    Raises:
        NotFoundError: no such id (the message suggests a close one).
    """
    row = db.execute("SELECT * FROM hypotheses WHERE id = ?", (id,)).fetchone()
    if row is None:
        known = [r[0] for r in db.execute("SELECT id FROM hypotheses ORDER BY id")]
        close = difflib.get_close_matches(str(id), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise NotFoundError(f"unknown hypothesis {id!r}; {hint}known: {', '.join(known) or 'none'} "
                            "(declare it first with ledger.declare)")
    return hypothesis_from_row(row)


def evidence_records(db: sqlite3.Connection, id: str | None = None) -> list[Evidence]:
    """Every evidence record (of hypothesis ``id``, which must exist, or of all), retractions included, by id."""
    if id is not None:
        get_hypothesis(db, id)
    sql = "SELECT * FROM evidence" + (" WHERE hypothesis_id = ?" if id is not None else "") + " ORDER BY id"
    return [evidence_from_row(r) for r in db.execute(sql, () if id is None else (id,))]

