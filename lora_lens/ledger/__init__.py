"""Hypothesis ledger: claims before tests, evidence from every run, verdicts by rule.

A hypothesis is declared *before* the test: a claim, a prediction ``metric comparator threshold``, the result that
would falsify it, and the verdict rule. Every run then attaches evidence — a measured value whose pass/fail is
computed here from the comparator, never passed in — and the verdict follows from the declared rule.

Verdict rule (``rule="all"``, the default, with ``min_runs`` n ≥ 1): only *live* evidence counts — records that
are not retractions and have not been retracted. **refuted** as soon as any live record fails (every record is
pre-registered, because the API only accepts evidence for an already declared hypothesis); **supported** when at
least n live records exist and all pass; **inconclusive** otherwise. With ``rule="majority"`` and a ``fraction``
f in (0, 1] (default 0.5): **inconclusive** below n live records, else **supported** when the pass share is ≥ f,
else **refuted**. A rule that cannot be evaluated raises :class:`~lora_lens.errors.ConfigError` at declaration.

Comparators: ``>``, ``>=``, ``<``, ``<=``, ``==``, ``!=`` (equality within ``math.isclose(rel_tol=1e-9,
abs_tol=1e-12)``) and ``between`` (threshold ``(lo, hi)``, both ends included).

Storage: one SQLite file (WAL, 30 s busy timeout, every write a single ``BEGIN IMMEDIATE`` transaction, so
concurrent runs and killed processes leave it consistent). Evidence is append-only; a mistake is retracted by a
new record (:func:`retract`), never edited. Every change of verdict is logged with the evidence that caused it
(:func:`history`). Re-declaring an id with the same claim, falsifier, prediction and rule is a no-op (method,
tags and author of the first declaration are kept); a changed one is an error.

Location: ``path`` argument > ``$LORA_LENS_LEDGER`` > ``<parent of $LORA_LENS_RUN_DIR>/ledger.sqlite`` >
``<project>/runs/ledger.sqlite`` inside a checkout (from any subfolder, e.g. ``notebooks/``) >
``./runs/ledger.sqlite``. Run context comes from ``$LORA_LENS_RUN_ID``, ``$LORA_LENS_NOTEBOOK`` and
``$LORA_LENS_PARAMS`` (JSON) set by the runner; outside a run the run id is ``interactive-<pid>-<time>``.

Example:
    >>> import tempfile
    >>> from lora_lens import ledger
    >>> db = tempfile.mkdtemp() + "/ledger.sqlite"
    >>> h = ledger.declare("rank-low", "The adapter's update is low rank", "effective_rank", "<=", 4,
    ...                    falsifier="effective rank above 4 on any seed", min_runs=2, path=db)
    >>> ledger.record("rank-low", 2.7, seed=0, path=db).verdict
    'inconclusive'
    >>> ledger.record("rank-low", 3.1, seed=1, path=db).verdict
    'supported'
    >>> ledger.verdict("rank-low", path=db)
    'supported'

CLI: ``lora-lens ledger [--ledger PATH] list | show ID | export --format md|jsonl|html [--out FILE] | import FILE``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import hashlib
import html
import json
import math
import operator
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lora_lens.errors import ConfigError, CorruptError, LoraLensError, MismatchError, NotFoundError

SCHEMA_VERSION = 2
COMPARATORS = (">", ">=", "<", "<=", "==", "!=", "between")
RULES = ("all", "majority")
_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_FIXED = ("claim", "falsifier", "metric", "comparator", "threshold", "rule", "min_runs", "fraction")

__all__ = ["COMPARATORS", "RULES", "SCHEMA_VERSION", "Evidence", "Hypothesis", "RunContext", "declare", "evidence",
           "export", "git_commit", "history", "hypotheses", "hypothesis", "import_jsonl", "ledger_path", "main",
           "plot_evidence", "plot_timeline", "record", "retract", "run_context", "verdict"]


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
        return f"after >= {self.min_runs} live run(s): supported when pass share >= {self.fraction:g}, else refuted"

    def passes(self, value: float) -> bool:
        """Whether ``value`` satisfies the prediction."""
        t = self.threshold
        if self.comparator == "between":
            return t[0] <= value <= t[1]
        if self.comparator in ("==", "!="):
            return math.isclose(value, t, rel_tol=1e-9, abs_tol=1e-12) == (self.comparator == "==")
        return _OPS[self.comparator](value, t)


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
    retracts: int | None = None
    verdict: str | None = None


@dataclasses.dataclass(frozen=True)
class RunContext:
    """Where a record comes from: set by the runner through ``LORA_LENS_*`` environment variables."""

    run_id: str
    run_dir: str | None
    notebook: str | None
    params: dict


# ----------------------------------------------------------------------------------------------- context
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


@functools.lru_cache(maxsize=None)
def _interactive_id(pid: int) -> str:
    return f"interactive-{pid}-{time.strftime('%Y%m%dT%H%M%S')}"


def run_context() -> RunContext:
    """Read the run context from the environment (``interactive-<pid>-<time>`` outside a run).

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
                      params)


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


_MIGRATIONS = [_migrate_v1, _migrate_v2]  # _MIGRATIONS[v] upgrades a version-v database to v + 1


@contextlib.contextmanager
def _tx(db: sqlite3.Connection):
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
            with _tx(db):
                db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                for migrate in _MIGRATIONS[_version(db):]:  # re-read under the write lock
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
def _open(path, create=False, write=False):
    db = _connect(ledger_path(path), create)
    try:
        if write:
            with _tx(db):
                yield db
        else:
            yield db
    finally:
        db.close()


def _hyp(row: sqlite3.Row) -> Hypothesis:
    t = row["threshold"] if row["threshold_hi"] is None else (row["threshold"], row["threshold_hi"])
    return Hypothesis(row["id"], row["claim"], row["metric"], row["comparator"], t, row["falsifier"], row["method"],
                      tuple(json.loads(row["tags"])), row["author"], row["rule"], row["min_runs"], row["fraction"],
                      row["created"])


def _ev(row: sqlite3.Row, verdict: str | None = None) -> Evidence:
    passed = None if row["passed"] is None else bool(row["passed"])
    return Evidence(row["id"], row["uid"], row["hypothesis_id"], row["run_id"], row["notebook"],
                    json.loads(row["params"]), row["seed"], row["git_commit"], row["metric"], row["value"], passed,
                    json.loads(row["artifacts"]), row["notes"], row["created"], row["retracts"], verdict)


def _get(db: sqlite3.Connection, id: str) -> Hypothesis:
    row = db.execute("SELECT * FROM hypotheses WHERE id = ?", (id,)).fetchone()
    if row is None:
        known = [r[0] for r in db.execute("SELECT id FROM hypotheses ORDER BY id")]
        close = difflib.get_close_matches(str(id), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise NotFoundError(f"unknown hypothesis {id!r}; {hint}known: {', '.join(known) or 'none'} "
                            "(declare it first with ledger.declare)")
    return _hyp(row)


_LIVE = ("hypothesis_id = ? AND retracts IS NULL "  # live = neither a retraction nor retracted
         "AND id NOT IN (SELECT retracts FROM evidence WHERE retracts IS NOT NULL)")


def _counts(db: sqlite3.Connection, id: str) -> tuple[int, int]:
    n, n_pass = db.execute(f"SELECT COUNT(*), COALESCE(SUM(passed), 0) FROM evidence WHERE {_LIVE}", (id,)).fetchone()
    return n, n_pass


def _decide(h: Hypothesis, n: int, n_pass: int) -> str:
    if h.rule == "all":
        return "refuted" if n_pass < n else "supported" if n >= h.min_runs else "inconclusive"
    if n < h.min_runs:
        return "inconclusive"
    return "supported" if n_pass >= h.fraction * n - 1e-9 else "refuted"


def _update_verdict(db: sqlite3.Connection, h: Hypothesis, evidence_id: int | None, when: str) -> str:
    new = _decide(h, *_counts(db, h.id))
    last = db.execute("SELECT verdict FROM verdicts WHERE hypothesis_id = ? ORDER BY id DESC LIMIT 1",
                      (h.id,)).fetchone()
    if last is None or last[0] != new:
        db.execute("INSERT INTO verdicts (hypothesis_id, verdict, evidence_id, created) VALUES (?, ?, ?, ?)",
                   (h.id, new, evidence_id, when))
    return new


# ----------------------------------------------------------------------------------------------- validation
def _number(x: Any, what: str) -> float:
    if isinstance(x, (str, bytes, bool)) or x is None:
        raise ConfigError(f"{what}={x!r} is not a number; pass a finite float")
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}={x!r} is not a number; pass a finite float") from None
    if not math.isfinite(v):
        raise ConfigError(f"{what}={x!r} is not finite; fix the computation (nothing was recorded)")
    return v


def _text(x: Any, what: str, required: bool = False) -> str:
    if not isinstance(x, str) or (required and not x.strip()):
        raise ConfigError(f"{what}={x!r} must be a {'non-empty ' if required else ''}string")
    return x


def _make(id, claim, metric, comparator, threshold, falsifier, method, tags, author, rule, min_runs, fraction,
          created) -> Hypothesis:
    """Validate a declaration completely before anything is written."""
    if not isinstance(id, str) or not _SLUG.match(id):
        slug = re.sub(r"[^a-z0-9_-]+", "-", str(id).lower()).strip("-_")[:64] or "h1"
        raise ConfigError(f"hypothesis id {id!r} is not a slug (lowercase letters, digits, '-', '_', at most 64, "
                          f"starting with a letter or digit); try {slug!r}")
    if comparator not in COMPARATORS:
        raise ConfigError(f"unknown comparator {comparator!r}; use one of {', '.join(COMPARATORS)}")
    if comparator == "between":
        if not isinstance(threshold, (tuple, list)) or len(threshold) != 2:
            raise ConfigError(f"comparator 'between' needs threshold=(lo, hi), got {threshold!r}")
        threshold = (_number(threshold[0], "threshold[0]"), _number(threshold[1], "threshold[1]"))
        if threshold[0] > threshold[1]:
            raise ConfigError(f"threshold={threshold!r} has lo > hi; pass ({threshold[1]}, {threshold[0]})")
    else:
        threshold = _number(threshold, "threshold")
    if rule not in RULES:
        raise ConfigError(f"unknown verdict rule {rule!r}; use one of {', '.join(RULES)}")
    if isinstance(min_runs, bool) or not isinstance(min_runs, int) or min_runs < 1:
        raise ConfigError(f"min_runs={min_runs!r} cannot be evaluated; pass an integer >= 1")
    if rule == "all" and fraction is not None:
        raise ConfigError(f"fraction={fraction!r} is only used by rule='majority'; drop it or set rule='majority'")
    if rule == "majority":
        fraction = 0.5 if fraction is None else _number(fraction, "fraction")
        if not 0 < fraction <= 1:
            raise ConfigError(f"fraction={fraction!r} cannot be evaluated; pass a share in (0, 1], e.g. 0.5")
    if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
        raise ConfigError(f"tags={tags!r} must be a sequence of strings, e.g. ('rank', 'llama')")
    if author is not None:
        _text(author, "author")
    return Hypothesis(id, _text(claim, "claim", True), _text(metric, "metric", True), comparator, threshold,
                      _text(falsifier, "falsifier"), _text(method, "method"), tuple(tags), author, rule, min_runs,
                      fraction, created)


def _insert_or_check(db: sqlite3.Connection, h: Hypothesis) -> Hypothesis:
    row = db.execute("SELECT * FROM hypotheses WHERE id = ?", (h.id,)).fetchone()
    if row is not None:
        old = _hyp(row)
        for field in _FIXED:
            if getattr(old, field) != getattr(h, field):
                raise MismatchError(
                    f"hypothesis {h.id!r} was declared with {field}={getattr(old, field)!r}, not "
                    f"{getattr(h, field)!r}; a pre-registered hypothesis cannot change - declare a new id "
                    f"(e.g. {h.id + '-v2'!r}) or restore the original {field}")
        return old
    lo, hi = h.threshold if h.comparator == "between" else (h.threshold, None)
    db.execute("INSERT INTO hypotheses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
               (h.id, h.claim, h.metric, h.comparator, lo, hi, h.falsifier, h.method, json.dumps(list(h.tags)),
                h.author, h.rule, h.min_runs, h.fraction, h.created))
    db.execute("INSERT INTO verdicts (hypothesis_id, verdict, evidence_id, created) VALUES (?, 'inconclusive', "
               "NULL, ?)", (h.id, h.created))
    return h


def _insert_evidence(db, h: Hypothesis, ctx: RunContext, seed, metric, value, artifacts, notes, retracts,
                     created, uid, commit) -> Evidence:
    passed = None if value is None else h.passes(value)
    cur = db.execute(
        "INSERT INTO evidence (hypothesis_id, run_id, notebook, params, seed, git_commit, metric, value, passed, "
        "artifacts, notes, created, retracts, uid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (h.id, ctx.run_id, ctx.notebook, json.dumps(ctx.params, sort_keys=True, default=str), seed, commit, metric,
         value, passed, json.dumps(artifacts), notes, created, retracts, uid))
    new = _update_verdict(db, h, cur.lastrowid, created)
    return _ev(db.execute("SELECT * FROM evidence WHERE id = ?", (cur.lastrowid,)).fetchone(), new)


# ----------------------------------------------------------------------------------------------- notebook API
def declare(id: str, claim: str, metric: str, comparator: str, threshold: float | tuple[float, float],
            falsifier: str = "", method: str = "", tags=(), author: str | None = None, min_runs: int = 1,
            rule: str = "all", fraction: float | None = None, path=None) -> Hypothesis:
    """Pre-register a hypothesis (idempotent: the same declaration again returns the stored one).

    Args:
        id: Short slug, e.g. ``"rank-low"``.
        claim: The claim in words.
        metric: Name of the measured quantity.
        comparator: One of :data:`COMPARATORS`.
        threshold: Number, or ``(lo, hi)`` for ``"between"``.
        falsifier: What result would refute the claim.
        method: How it is tested.
        tags: Free labels.
        author: Who declares it (default: ``$USER``).
        min_runs: Live evidence records needed before a verdict other than inconclusive.
        rule: ``"all"`` or ``"majority"`` (see the module docstring).
        fraction: Pass share needed by ``"majority"`` (default 0.5).
        path: Ledger file (default: see :func:`ledger_path`).

    Returns:
        The stored :class:`Hypothesis`.

    Raises:
        ConfigError: An invalid value (nothing is written).
        MismatchError: The id exists with a different claim, falsifier, prediction or rule.
    """
    author = author if author is not None else os.environ.get("USER") or None
    h = _make(id, claim, metric, comparator, threshold, falsifier, method, tags, author, rule, min_runs, fraction,
              _now())
    with _open(path, create=True, write=True) as db:
        return _insert_or_check(db, h)


def _artifact(p, root: Path) -> dict:
    p = Path(p)
    if not p.is_file():
        raise NotFoundError(f"artifact {str(p)!r} does not exist; save it before recording evidence")
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    p = p.resolve()
    with contextlib.suppress(ValueError):
        p = p.relative_to(root.resolve())
    return {"path": str(p), "sha256": digest.hexdigest()}


def record(id: str, value: float, metric: str | None = None, seed: int | None = None, artifacts=(), notes: str = "",
           path=None) -> Evidence:
    """Attach one measured value to a hypothesis; pass/fail and the new verdict are computed here.

    Args:
        id: Hypothesis id.
        value: The measured value (finite).
        metric: Optional check that this is the hypothesis's metric.
        seed: Seed of the run (default: ``seed`` from ``$LORA_LENS_PARAMS`` when present).
        artifacts: Files backing the value; stored with their sha256 (paths relative to the ledger's folder).
        notes: Free text.
        path: Ledger file.

    Returns:
        The stored :class:`Evidence`, with ``passed`` and the resulting ``verdict``.

    Raises:
        ConfigError: Non-finite value or bad seed. NotFoundError: unknown hypothesis, missing ledger or artifact.
        MismatchError: ``metric`` differs from the declared one. Nothing is written in any of these cases.
    """
    value, notes, ctx, file = _number(value, "value"), _text(notes, "notes"), run_context(), ledger_path(path)
    seed = ctx.params.get("seed") if seed is None and isinstance(ctx.params.get("seed"), int) else seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed={seed!r} must be an integer or None")
    arts = [_artifact(a, file.parent) for a in ([artifacts] if isinstance(artifacts, (str, Path)) else artifacts)]
    with _open(file, write=True) as db:
        h = _get(db, id)
        if metric is not None and metric != h.metric:
            raise MismatchError(f"hypothesis {id!r} predicts {h.metric!r}, not {metric!r}; record the declared "
                                "metric or declare a new hypothesis")
        return _insert_evidence(db, h, ctx, seed, h.metric, value, arts, notes, None, _now(),
                                uuid.uuid4().hex, git_commit())


def retract(evidence_id: int, reason: str, path=None) -> Evidence:
    """Retract a mistaken evidence record by appending a retraction (nothing is deleted).

    Raises:
        ConfigError: Empty reason, or the record is a retraction / already retracted.
        NotFoundError: No such evidence.
    """
    reason, ctx = _text(reason, "reason", True), run_context()
    with _open(path, write=True) as db:
        row = db.execute("SELECT * FROM evidence WHERE id = ?", (evidence_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no evidence with id {evidence_id!r}; see ledger.evidence() for the ids")
        if row["retracts"] is not None:
            raise ConfigError(f"evidence {evidence_id} is itself a retraction; record new evidence instead")
        done = db.execute("SELECT id FROM evidence WHERE retracts = ?", (evidence_id,)).fetchone()
        if done:
            raise ConfigError(f"evidence {evidence_id} was already retracted by evidence {done[0]}")
        return _insert_evidence(db, _get(db, row["hypothesis_id"]), ctx, None, None, None, [], reason, evidence_id,
                                _now(), uuid.uuid4().hex, git_commit())


def hypothesis(id: str, path=None) -> Hypothesis:
    """The declared :class:`Hypothesis` with this id."""
    with _open(path) as db:
        return _get(db, id)


def verdict(id: str, path=None) -> str:
    """Current verdict of a hypothesis: ``"supported"``, ``"refuted"`` or ``"inconclusive"``."""
    with _open(path) as db:
        return _decide(_get(db, id), *_counts(db, id))


def _frame(rows: list[dict], columns: list[str]):
    import pandas as pd

    return pd.DataFrame(rows, columns=columns)


_H_COLS = ["id", "verdict", "n_evidence", "n_pass", "prediction", "claim", "falsifier", "method", "rule", "min_runs",
           "fraction", "tags", "author", "created"]
_E_COLS = ["id", "hypothesis_id", "run_id", "notebook", "seed", "metric", "value", "passed", "retracted", "retracts",
           "notes", "params", "artifacts", "git_commit", "created", "uid"]


def hypotheses(path=None):
    """All hypotheses with verdict and live evidence counts, as a DataFrame (empty when there is no ledger)."""
    if not ledger_path(path).exists():
        return _frame([], _H_COLS)
    with _open(path) as db:
        rows = []
        for r in db.execute("SELECT * FROM hypotheses ORDER BY created, id").fetchall():
            h, (n, k) = _hyp(r), _counts(db, r["id"])
            rows.append({**dataclasses.asdict(h), "verdict": _decide(h, n, k), "n_evidence": n, "n_pass": k,
                         "prediction": h.prediction, "tags": ", ".join(h.tags)})
    return _frame(rows, _H_COLS)


def _evidence_rows(db, id=None) -> list[Evidence]:
    if id is not None:
        _get(db, id)
    sql = "SELECT * FROM evidence" + (" WHERE hypothesis_id = ?" if id is not None else "") + " ORDER BY id"
    return [_ev(r) for r in db.execute(sql, () if id is None else (id,))]


def evidence(id: str | None = None, path=None):
    """Evidence records (all, or of one hypothesis) including retractions, as a DataFrame."""
    if id is None and not ledger_path(path).exists():
        return _frame([], _E_COLS)
    with _open(path) as db:
        evs = _evidence_rows(db, id)
    gone = {e.retracts for e in evs if e.retracts is not None}
    return _frame([{**dataclasses.asdict(e), "retracted": e.id in gone} for e in evs], _E_COLS)


def history(id: str | None = None, path=None):
    """Every change of verdict (hypothesis_id, verdict, evidence_id, created), as a DataFrame."""
    cols = ["hypothesis_id", "verdict", "evidence_id", "created"]
    if id is None and not ledger_path(path).exists():
        return _frame([], cols)
    with _open(path) as db:
        if id is not None:
            _get(db, id)
        sql = "SELECT * FROM verdicts" + (" WHERE hypothesis_id = ?" if id else "") + " ORDER BY id"
        return _frame([{c: r[c] for c in cols} for r in db.execute(sql, (id,) if id else ())], cols)


# ----------------------------------------------------------------------------------------------- export / import
_EV_HEAD = ["#", "run", "notebook", "seed", "value", "pass"]


def _report(db) -> list[tuple[Hypothesis, str, int, int, list[list[str]]]]:
    """(hypothesis, verdict, n live, n pass, evidence table rows) for every hypothesis."""
    out = []
    for r in db.execute("SELECT * FROM hypotheses ORDER BY created, id").fetchall():
        h, evs = _hyp(r), _evidence_rows(db, r["id"])
        why = {e.retracts: e for e in evs if e.retracts is not None}
        rows = [[str(e.id), e.run_id, e.notebook or "", "" if e.seed is None else str(e.seed), f"{e.value:.4g}",
                 ("pass" if e.passed else "FAIL") if e.id not in why
                 else f"retracted by #{why[e.id].id}: {why[e.id].notes}"] for e in evs if e.retracts is None]
        n, k = _counts(db, h.id)
        out.append((h, _decide(h, n, k), n, k, rows))
    return out


def _about(h: Hypothesis) -> list[tuple[str, str]]:
    return [("Claim", h.claim), ("Prediction", h.prediction), ("Falsifier", h.falsifier or "(none given)"),
            ("Method", h.method or "(none given)"), ("Rule", h.rule_text),
            ("Declared", f"{h.created[:19]} by {h.author or 'unknown'}"
             + (f"; tags: {', '.join(h.tags)}" if h.tags else ""))]


def _md_cell(s: Any) -> str:
    return str(s).replace("\\", "\\\\").replace("|", "\\|").replace("`", "'").replace("\n", " ")


def _md_table(head: list[str], rows: list[list[Any]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows])


def _md_section(h, v, n, k, rows) -> str:
    about = "\n".join(f"- **{key}:** {_md_cell(val)}" for key, val in _about(h))
    table = _md_table(_EV_HEAD, rows) if rows else "_No evidence yet._"
    return f"## {h.id}: {v}\n\n{about}\n\n{table}\n"


def _markdown(report) -> str:
    counts = {v: sum(r[1] == v for r in report) for v in ("supported", "refuted", "inconclusive")}
    summary = ", ".join(f"{c} {v}" for v, c in counts.items())
    table = _md_table(["id", "verdict", "evidence", "pass", "prediction", "claim"],
                      [[h.id, f"**{v}**", n, k, h.prediction, h.claim] for h, v, n, k, _ in report])
    return "\n".join([f"# Hypothesis ledger\n\n{len(report)} hypotheses: {summary}.\n\n{table}\n"]
                     + [_md_section(*r) for r in report])


def _html_table(head: list[str], rows: list[list[Any]]) -> str:
    e = html.escape
    return ("<table><tr>" + "".join(f"<th>{e(str(c))}</th>" for c in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def _html(report) -> str:
    e = html.escape
    body = [_html_table(["id", "verdict", "evidence", "pass", "prediction", "claim"],
                        [[h.id, v, n, k, h.prediction, h.claim] for h, v, n, k, _ in report])]
    for h, v, _n, _k, rows in report:
        about = "".join(f"<dt>{e(key)}</dt><dd>{e(val)}</dd>" for key, val in _about(h))
        body.append(f"<h2>{e(h.id)}: {e(v)}</h2><dl>{about}</dl>"
                    + (_html_table(_EV_HEAD, rows) if rows else "<p><em>No evidence yet.</em></p>"))
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.2em .5em}dt{font-weight:bold}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Hypothesis ledger</title>"
            f"<style>{style}</style></head><body><h1>Hypothesis ledger</h1>{''.join(body)}</body></html>\n")


def _jsonl(db) -> str:
    lines = [{"kind": "ledger", "schema_version": SCHEMA_VERSION, "exported": _now()}]
    for r in db.execute("SELECT * FROM hypotheses ORDER BY created, id").fetchall():
        lines.append({"kind": "hypothesis", **dataclasses.asdict(_hyp(r))})
    evs = _evidence_rows(db)
    uid = {e.id: e.uid for e in evs}
    for e in evs:
        d = dataclasses.asdict(e)
        del d["verdict"]
        lines.append({"kind": "evidence", **d, "retracts_uid": uid.get(e.retracts)})
    return "".join(json.dumps(x, sort_keys=True) + "\n" for x in lines)


def export(format: str = "md", path=None) -> str:
    """Render the ledger as ``"md"`` (for a pull request), ``"html"`` (standalone page) or ``"jsonl"`` (lossless)."""
    if format not in ("md", "html", "jsonl"):
        raise ConfigError(f"unknown export format {format!r}; use md, html or jsonl")
    with _open(path) as db:
        return _jsonl(db) if format == "jsonl" else (_markdown if format == "md" else _html)(_report(db))


def import_jsonl(src, path=None) -> dict[str, int]:
    """Import a ``jsonl`` export (idempotent: records already present are skipped); all or nothing.

    Returns:
        How many hypotheses and evidence records were added.

    Raises:
        NotFoundError: ``src`` does not exist. CorruptError: a malformed line.
        MismatchError: a hypothesis conflicts with the one in the ledger.
    """
    try:
        lines = Path(src).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise NotFoundError(f"import file {str(src)!r} does not exist") from None
    items = []
    for n, line in enumerate(lines, 1):
        try:
            d = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            d = {}
        if d is not None and (not isinstance(d, dict) or d.get("kind") not in ("ledger", "hypothesis", "evidence")):
            raise CorruptError(f"{src}:{n} is not a ledger record; import only files made by 'export --format jsonl'")
        if d and d["kind"] == "ledger" and d.get("schema_version", 0) > SCHEMA_VERSION:
            raise MismatchError(f"{src} comes from ledger schema {d['schema_version']}; upgrade lora_lens to import it")
        items += [(n, d)] if d else []
    added = {"hypotheses": 0, "evidence": 0}
    with _open(path, create=True, write=True) as db:
        for n, d in items:
            try:
                if d["kind"] == "hypothesis":
                    h = _make(**{f.name: d[f.name] for f in dataclasses.fields(Hypothesis)})
                    added["hypotheses"] += _insert_or_check(db, h) is h
                elif d["kind"] == "evidence" and not db.execute("SELECT 1 FROM evidence WHERE uid = ?",
                                                                (d["uid"],)).fetchone():
                    retracts = None
                    if d["retracts_uid"]:
                        retracts = db.execute("SELECT id FROM evidence WHERE uid = ?", (d["retracts_uid"],)).fetchone()
                        if retracts is None:
                            raise KeyError(d["retracts_uid"])
                        retracts = retracts[0]
                    value = None if retracts else _number(d["value"], f"{src}:{n} value")
                    ctx = RunContext(d["run_id"], None, d["notebook"], d["params"])
                    _insert_evidence(db, _get(db, d["hypothesis_id"]), ctx, d["seed"], d["metric"], value,
                                     d["artifacts"], d["notes"], retracts, d["created"], d["uid"], d["git_commit"])
                    added["evidence"] += 1
            except (KeyError, TypeError, IndexError) as exc:
                raise CorruptError(f"{src}:{n} is missing or has a bad field ({exc!r}); nothing was imported") from None
    return added


# ----------------------------------------------------------------------------------------------- plots
_COLORS = {"supported": "#2a9d4b", "refuted": "#d62728", "inconclusive": "#8c8c8c"}


def _plot_one(ax, h: Hypothesis, v: str, ev) -> None:
    ev = ev[ev["retracts"].isna()].reset_index(drop=True)
    for label, mask, style in [("pass", ev["passed"] & ~ev["retracted"], dict(c=_COLORS["supported"], marker="o")),
                               ("fail", ~ev["passed"].astype(bool) & ~ev["retracted"],
                                dict(c=_COLORS["refuted"], marker="X")),
                               ("retracted", ev["retracted"], dict(facecolors="none", edgecolors="grey", marker="o"))]:
        if mask.any():
            ax.scatter(ev.index[mask], ev["value"][mask], s=50, label=label, zorder=3, **style)
    if h.comparator == "between":
        ax.axhspan(*h.threshold, color=_COLORS["supported"], alpha=0.12, label=f"predicted: {h.prediction}")
    else:
        ax.axhline(h.threshold, color="black", ls="--", lw=1, label=f"predicted: {h.prediction}")
    runs = [f"#{i}\n{r if len(r) <= 16 else r[:15] + '…'}" for i, r in zip(ev["id"], ev["run_id"])]
    ax.set_xticks(range(len(ev)), runs, fontsize=7)
    ax.set(title=f"{h.id}: {v}", xlabel="evidence # and run, in recorded order", ylabel=h.metric)
    ax.legend(fontsize=8, loc="best")


def plot_evidence(id: str | None = None, ax=None, path=None):
    """Evidence values per run against the predicted threshold; ``id=None`` draws one panel per hypothesis.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    if id is not None:
        with _open(path) as db:
            h = _get(db, id)
            v = _decide(h, *_counts(db, id))
        fig = ax.figure if ax is not None else plt.subplots(figsize=(7, 4))[0]
        _plot_one(ax if ax is not None else fig.axes[0], h, v, evidence(id, path=path))
        fig.tight_layout()
        return fig
    if ax is not None:
        raise ConfigError("plot_evidence(None) draws one panel per hypothesis; pass an id to draw into ax")
    hs, ev = hypotheses(path), evidence(path=path)
    cols = max(1, min(3, len(hs)))
    rows = max(1, math.ceil(len(hs) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for a in axes.flat[len(hs):]:
        a.set_axis_off()
    if hs.empty:
        axes[0, 0].text(0.5, 0.5, "no hypotheses declared yet", ha="center", va="center")
    for a, hid, v in zip(axes.flat, hs["id"], hs["verdict"]):
        _plot_one(a, hypothesis(hid, path), v, ev[ev["hypothesis_id"] == hid])
    fig.tight_layout()
    return fig


def plot_timeline(ax=None, path=None):
    """Verdict of every hypothesis over time: one row each, coloured by verdict, a dot at every change.

    Returns:
        The matplotlib figure.
    """
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    sns.set_theme(style="whitegrid")
    hist = history(path=path)
    if ax is None:
        ax = plt.subplots(figsize=(8, 1.8 + 0.45 * hist["hypothesis_id"].nunique()))[1]
    hist["created"] = pd.to_datetime(hist["created"], utc=True, format="ISO8601")
    if len(hist):
        last = hist["created"].max()
        end = last + max((last - hist["created"].min()) * 0.05, pd.Timedelta(milliseconds=1))
    ids = list(dict.fromkeys(hist["hypothesis_id"]))
    for y, hid in enumerate(ids):
        h = hist[hist["hypothesis_id"] == hid].reset_index(drop=True)
        for i, row in h.iterrows():
            stop = h["created"][i + 1] if i + 1 < len(h) else end
            ax.hlines(y, row["created"], stop, color=_COLORS[row["verdict"]], lw=6)
            ax.plot(row["created"], y, "o", color=_COLORS[row["verdict"]], mec="black", zorder=3)
    ax.set_yticks(range(len(ids)), ids)
    ax.set_ylim(-0.7, len(ids) - 0.3)
    if ids:
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
    else:  # no history: say so instead of drawing an empty 1970 time axis
        ax.set_xticks([])
        ax.text(0.5, 0.5, "no hypotheses declared yet", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="time (UTC)", ylabel="hypothesis", title="Verdicts over time")
    ax.legend(handles=[plt.Line2D([], [], color=c, lw=6, label=v) for v, c in _COLORS.items()], fontsize=8,
              loc="upper left", bbox_to_anchor=(1, 1))
    ax.figure.tight_layout()
    return ax.figure


# ----------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """``lora-lens ledger`` command line; returns the exit status (2 on error, message on stderr)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ledger", default=argparse.SUPPRESS, help="ledger file (default: $LORA_LENS_LEDGER, "
                        "else runs/ledger.sqlite)")
    parser = argparse.ArgumentParser(prog="lora-lens ledger", parents=[common],
                                     description="Inspect, export and import the hypothesis ledger.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", parents=[common], help="hypotheses with verdicts")
    sub.add_parser("show", parents=[common], help="one hypothesis with its evidence and history").add_argument("id")
    exp = sub.add_parser("export", parents=[common], help="render as md, html or jsonl")
    exp.add_argument("--format", choices=["md", "jsonl", "html"], default="md")
    exp.add_argument("--out", help="write to this file instead of stdout")
    sub.add_parser("import", parents=[common], help="import a jsonl export").add_argument("file")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code in (0, None) else 2
    path = getattr(args, "ledger", None)
    try:
        if args.command == "list":
            hs = hypotheses(path)
            print(f"{ledger_path(path)}: no hypotheses" if hs.empty else
                  hs[["id", "verdict", "n_evidence", "n_pass", "prediction"]].to_string(index=False))
        elif args.command == "show":
            with _open(path) as db:
                _get(db, args.id)
                print(next(_md_section(*r) for r in _report(db) if r[0].id == args.id))
            for _, r in history(args.id, path).iterrows():
                cause = "declared" if math.isnan(r["evidence_id"]) else f"evidence #{int(r['evidence_id'])}"
                print(f"{r['created'][:19]}  {r['verdict']:<12} ({cause})")
        elif args.command == "export":
            text = export(args.format, path)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(text, encoding="utf-8")
            else:
                sys.stdout.write(text)
        else:
            added = import_jsonl(args.file, path)
            print(f"imported {added['hypotheses']} hypotheses, {added['evidence']} evidence records "
                  f"into {ledger_path(path)}")
    except (LoraLensError, sqlite3.Error, OSError) as exc:
        print(f"lora-lens ledger: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
