"""The ledger's API: declare a hypothesis, record and retract evidence, query, and the verdict rule.

A hypothesis is declared *before* the test; every run then attaches evidence — a measured value whose pass/fail is
computed here from the comparator, never passed in — and the verdict follows from the declared rule
(:func:`decide` over the live evidence's :class:`Tally`; the rules are described in :mod:`lora_lens.ledger`).
Every declaration is validated completely before anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pandas as pd

from lora_lens.errors import ConfigError, MismatchError, NotFoundError
from lora_lens.ledger.store import (COMPARATORS, RULES, Evidence, Hypothesis, RunContext, evidence_from_row,
                                    evidence_records, get_hypothesis, git_commit, hypothesis_from_row, ledger_path,
                                    open_ledger, run_context, utc_now)
from lora_lens.stats import bootstrap_ci

__all__ = ["DEFAULT_LEVEL", "VERDICTS", "Tally", "as_number", "decide", "declare", "evidence", "history",
           "hypotheses", "hypothesis", "insert_evidence", "insert_hypothesis", "make_hypothesis", "record", "retract",
           "tally", "verdict", "verdict_text"]

VERDICTS = ("supported", "refuted", "inconclusive")
DEFAULT_LEVEL = 0.95
"""Coverage of the interval shown beside every verdict, and of ``rule="interval"`` unless it declares a ``level``."""
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_FIXED = ("claim", "falsifier", "metric", "comparator", "threshold", "rule", "min_runs", "fraction", "level")
_N_BOOT, _BOOT_SEED = 2000, 0  # the interval's resamples and seed: fixed, so that a verdict is deterministic


_LIVE = ("hypothesis_id = ? AND retracts IS NULL "  # live = neither a retraction nor retracted
         "AND id NOT IN (SELECT retracts FROM evidence WHERE retracts IS NOT NULL)")


@dataclasses.dataclass(frozen=True)
class Tally:
    """What the verdict rule reads from a hypothesis's live evidence.

    Attributes:
        n: Live records.
        n_pass: Live records that pass the prediction.
        mean: Mean of their measurements (None without live records): a rerun of one configuration and seed
            repeats a measurement, it does not add one (see :func:`measurements`).
        ci_low: Low end of the seeded bootstrap interval of the mean (:func:`lora_lens.stats.bootstrap_ci`).
        ci_high: High end of that interval.
        level: Its coverage: the hypothesis's ``level``, else :data:`DEFAULT_LEVEL`.
        n_measured: Distinct measurements among the live records (what ``rule="interval"`` counts against
            ``min_runs``).
    """

    n: int
    n_pass: int
    mean: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    level: float = DEFAULT_LEVEL
    n_measured: int = 0


def measurements(rows) -> list[float]:
    """One value per distinct measurement among evidence rows (``run_id``, ``params``, ``seed``, ``value``, in
    recording order): rerunning a notebook with the same parameters and seed measures the same thing again.

    The k-th record of seed s in a run repeats the k-th record of seed s in every other run with the same
    parameters (a run that records one value per family or per module records them in the same order each time);
    repeats count once, at the mean of their values, so that two reruns of one seed do not narrow an interval over
    seeds. A record without a seed is a measurement of its own.
    """
    groups, ordinal = {}, {}
    for i, r in enumerate(rows):
        if r["seed"] is None:
            groups[("record", i)] = [r["value"]]
            continue
        within = (r["run_id"], r["params"], r["seed"])
        ordinal[within] = k = ordinal.get(within, -1) + 1
        groups.setdefault((r["params"], r["seed"], k), []).append(r["value"])
    return [sum(v) / len(v) for v in groups.values()]


def tally(db: sqlite3.Connection, h: Hypothesis, interval: bool = True) -> Tally:
    """The live evidence of ``h`` counted, with the mean and its interval over its distinct measurements (unless
    ``interval=False`` and ``h``'s rule does not read it).

    The interval (:func:`lora_lens.stats.bootstrap_ci`, 2000 resamples, seed 0) resamples the measurements in
    sorted order, so it depends only on the live values, not on the order in which runs were recorded or imported.
    """
    rows = db.execute(f"SELECT run_id, params, seed, value, passed FROM evidence WHERE {_LIVE} ORDER BY id",
                      (h.id,)).fetchall()
    n, n_pass, level = len(rows), sum(bool(r["passed"]) for r in rows), h.level or DEFAULT_LEVEL
    values = sorted(measurements(rows))
    if not (rows and (interval or h.rule == "interval")):
        return Tally(n, n_pass, level=level, n_measured=len(values))
    mean, lo, hi = bootstrap_ci(values, n_boot=_N_BOOT, level=level, seed=_BOOT_SEED)
    # a mean of resampled values lies within [min, max]: clip the float rounding of the mean, so that equal values
    # give exactly that value and a value on the threshold stays on it
    return Tally(n, n_pass, mean, max(lo, values[0]), min(hi, values[-1]), level, len(values))


def _interval_verdict(h: Hypothesis, lo: float, hi: float) -> str:
    """Supported when the whole interval ``[lo, hi]`` passes, refuted when none of it does, else inconclusive."""
    if h.comparator == "between":
        a, b = h.threshold
        return "supported" if a <= lo and hi <= b else "refuted" if hi < a or lo > b else "inconclusive"
    near, far = (lo, hi) if h.comparator in (">", ">=") else (hi, lo)  # the end that must clear, the other end
    return "supported" if h.passes(near) else "refuted" if not h.passes(far) else "inconclusive"


def decide(h: Hypothesis, t: Tally) -> str:
    """The verdict rule: ``h``'s verdict given the :class:`Tally` of its live evidence (see the package docs)."""
    if h.rule == "all":
        return "refuted" if t.n_pass < t.n else "supported" if t.n >= h.min_runs else "inconclusive"
    if h.rule == "interval":
        return "inconclusive" if t.n_measured < h.min_runs else _interval_verdict(h, t.ci_low, t.ci_high)
    if t.n < h.min_runs:
        return "inconclusive"
    return "supported" if t.n_pass >= h.fraction * t.n - 1e-9 else "refuted"


def _update_verdict(db: sqlite3.Connection, h: Hypothesis, evidence_id: int | None, when: str) -> str:
    new = decide(h, tally(db, h, interval=False))
    last = db.execute("SELECT verdict FROM verdicts WHERE hypothesis_id = ? ORDER BY id DESC LIMIT 1",
                      (h.id,)).fetchone()
    if last is None or last[0] != new:
        db.execute("INSERT INTO verdicts (hypothesis_id, verdict, evidence_id, created) VALUES (?, ?, ?, ?)",
                   (h.id, new, evidence_id, when))
    return new


# ----------------------------------------------------------------------------------------------- validation
def as_number(x: Any, what: str) -> float:
    """``x`` as a finite float.

    Raises:
        ConfigError: not a number, or not finite (``what`` names it in the message).
    """
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


def make_hypothesis(id, claim, metric, comparator, threshold, falsifier, method, tags, author, rule, min_runs, fraction,
                    created, level=None) -> Hypothesis:
    """Validate a declaration completely before anything is written.

    Raises:
        ConfigError: the first invalid value, with the fix.
    """
    if not isinstance(id, str) or not _SLUG.match(id):
        slug = re.sub(r"[^a-z0-9_-]+", "-", str(id).lower()).strip("-_")[:64] or "h1"
        raise ConfigError(f"hypothesis id {id!r} is not a slug (lowercase letters, digits, '-', '_', at most 64, "
                          f"starting with a letter or digit); try {slug!r}")
    if comparator not in COMPARATORS:
        raise ConfigError(f"unknown comparator {comparator!r}; use one of {', '.join(COMPARATORS)}")
    if comparator == "between":
        if not isinstance(threshold, (tuple, list)) or len(threshold) != 2:
            raise ConfigError(f"comparator 'between' needs threshold=(lo, hi), got {threshold!r}")
        threshold = (as_number(threshold[0], "threshold[0]"), as_number(threshold[1], "threshold[1]"))
        if threshold[0] > threshold[1]:
            raise ConfigError(f"threshold={threshold!r} has lo > hi; pass ({threshold[1]}, {threshold[0]})")
    else:
        threshold = as_number(threshold, "threshold")
    if rule not in RULES:
        raise ConfigError(f"unknown verdict rule {rule!r}; use one of {', '.join(RULES)}")
    min_runs = (3 if rule == "interval" else 1) if min_runs is None else min_runs
    if isinstance(min_runs, bool) or not isinstance(min_runs, int) or min_runs < 1:
        raise ConfigError(f"min_runs={min_runs!r} cannot be evaluated; pass an integer >= 1")
    if rule != "majority" and fraction is not None:
        raise ConfigError(f"fraction={fraction!r} is only used by rule='majority'; drop it or set rule='majority'")
    if rule != "interval" and level is not None:
        raise ConfigError(f"level={level!r} is only used by rule='interval'; drop it or set rule='interval'")
    if rule == "interval":
        if comparator in ("==", "!="):
            raise ConfigError(f"comparator {comparator!r} has no side for an interval to clear; with "
                              "rule='interval' use >, >=, <, <= or between, or keep rule='all'")
        level = DEFAULT_LEVEL if level is None else as_number(level, "level")
        if not 0 < level < 1:
            raise ConfigError(f"level={level!r} cannot be evaluated; pass a coverage in (0, 1), e.g. 0.95")
    if rule == "majority":
        fraction = 0.5 if fraction is None else as_number(fraction, "fraction")
        if not 0 < fraction <= 1:
            raise ConfigError(f"fraction={fraction!r} cannot be evaluated; pass a share in (0, 1], e.g. 0.5")
    if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
        raise ConfigError(f"tags={tags!r} must be a sequence of strings, e.g. ('rank', 'llama')")
    if author is not None:
        _text(author, "author")
    return Hypothesis(id, _text(claim, "claim", True), _text(metric, "metric", True), comparator, threshold,
                      _text(falsifier, "falsifier"), _text(method, "method"), tuple(tags), author, rule, min_runs,
                      fraction, level, created)


def insert_hypothesis(db: sqlite3.Connection, h: Hypothesis) -> Hypothesis:
    """Store ``h`` (verdict: inconclusive), or return the stored one when it is the same declaration.

    Raises:
        MismatchError: the id is stored with another claim, falsifier, prediction or rule.
    """
    row = db.execute("SELECT * FROM hypotheses WHERE id = ?", (h.id,)).fetchone()
    if row is not None:
        old = hypothesis_from_row(row)
        for field in _FIXED:
            if getattr(old, field) != getattr(h, field):
                raise MismatchError(
                    f"hypothesis {h.id!r} was declared with {field}={getattr(old, field)!r}, not "
                    f"{getattr(h, field)!r}; a pre-registered hypothesis cannot change - declare a new id "
                    f"(e.g. {h.id + '-v2'!r}) or restore the original {field}")
        return old
    lo, hi = h.threshold if h.comparator == "between" else (h.threshold, None)
    db.execute("INSERT INTO hypotheses (id, claim, metric, comparator, threshold, threshold_hi, falsifier, method, "
               "tags, author, rule, min_runs, fraction, level, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
               "?, ?)", (h.id, h.claim, h.metric, h.comparator, lo, hi, h.falsifier, h.method,
                         json.dumps(list(h.tags)), h.author, h.rule, h.min_runs, h.fraction, h.level, h.created))
    db.execute("INSERT INTO verdicts (hypothesis_id, verdict, evidence_id, created) VALUES (?, 'inconclusive', "
               "NULL, ?)", (h.id, h.created))
    return h


def insert_evidence(db, h: Hypothesis, ctx: RunContext, seed, metric, value, artifacts, notes, retracts,
                     created, uid, commit) -> Evidence:
    """Append one evidence record (a retraction when ``retracts`` is set) and log the new verdict if it changed.

    The machine and thread count come from ``ctx`` (:func:`~lora_lens.ledger.store.run_context`, or the imported
    record's).
    """
    passed = None if value is None else h.passes(value)
    cur = db.execute(
        "INSERT INTO evidence (hypothesis_id, run_id, notebook, params, seed, git_commit, metric, value, passed, "
        "artifacts, notes, created, retracts, uid, machine, threads) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
        "?, ?, ?)",
        (h.id, ctx.run_id, ctx.notebook, json.dumps(ctx.params, sort_keys=True, default=str), seed, commit, metric,
         value, passed, json.dumps(artifacts), notes, created, retracts, uid, ctx.machine, ctx.threads))
    new = _update_verdict(db, h, cur.lastrowid, created)
    return evidence_from_row(db.execute("SELECT * FROM evidence WHERE id = ?", (cur.lastrowid,)).fetchone(), new)


# ----------------------------------------------------------------------------------------------- notebook API
def declare(id: str, claim: str, metric: str, comparator: str, threshold: float | tuple[float, float],
            falsifier: str = "", method: str = "", tags=(), author: str | None = None, min_runs: int | None = None,
            rule: str = "all", fraction: float | None = None, level: float | None = None, path=None) -> Hypothesis:
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
        min_runs: Live evidence records needed before a verdict other than inconclusive (default 1; 3 for
            ``rule="interval"``).
        rule: ``"all"``, ``"majority"`` or ``"interval"`` (see :mod:`lora_lens.ledger`).
        fraction: Pass share needed by ``"majority"`` (default 0.5).
        level: Coverage of the bootstrap interval of the mean used by ``"interval"`` (default 0.95).
        path: Ledger file (default: see :func:`ledger_path`).

    Returns:
        The stored :class:`Hypothesis`.

    Raises:
        ConfigError: An invalid value (nothing is written).
        MismatchError: The id exists with a different claim, falsifier, prediction or rule.
    """
    author = author if author is not None else os.environ.get("USER") or None
    h = make_hypothesis(id, claim, metric, comparator, threshold, falsifier, method, tags, author, rule, min_runs,
                        fraction, utc_now(), level)
    with open_ledger(path, create=True, write=True) as db:
        return insert_hypothesis(db, h)


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
    value, notes, ctx, file = as_number(value, "value"), _text(notes, "notes"), run_context(), ledger_path(path)
    seed = ctx.params.get("seed") if seed is None and isinstance(ctx.params.get("seed"), int) else seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed={seed!r} must be an integer or None")
    arts = [_artifact(a, file.parent) for a in ([artifacts] if isinstance(artifacts, (str, Path)) else artifacts)]
    with open_ledger(file, write=True) as db:
        h = get_hypothesis(db, id)
        if metric is not None and metric != h.metric:
            raise MismatchError(f"hypothesis {id!r} predicts {h.metric!r}, not {metric!r}; record the declared "
                                "metric or declare a new hypothesis")
        return insert_evidence(db, h, ctx, seed, h.metric, value, arts, notes, None, utc_now(), uuid.uuid4().hex,
                               git_commit())


def retract(evidence_id: int, reason: str, path=None) -> Evidence:
    """Retract a mistaken evidence record by appending a retraction (nothing is deleted).

    Raises:
        ConfigError: Empty reason, or the record is a retraction / already retracted.
        NotFoundError: No such evidence.
    """
    reason, ctx = _text(reason, "reason", True), run_context()
    with open_ledger(path, write=True) as db:
        row = db.execute("SELECT * FROM evidence WHERE id = ?", (evidence_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no evidence with id {evidence_id!r}; see ledger.evidence() for the ids")
        if row["retracts"] is not None:
            raise ConfigError(f"evidence {evidence_id} is itself a retraction; record new evidence instead")
        done = db.execute("SELECT id FROM evidence WHERE retracts = ?", (evidence_id,)).fetchone()
        if done:
            raise ConfigError(f"evidence {evidence_id} was already retracted by evidence {done[0]}")
        return insert_evidence(db, get_hypothesis(db, row["hypothesis_id"]), ctx, None, None, None, [], reason,
                               evidence_id, utc_now(), uuid.uuid4().hex, git_commit())


def hypothesis(id: str, path=None) -> Hypothesis:
    """The declared :class:`Hypothesis` with this id."""
    with open_ledger(path) as db:
        return get_hypothesis(db, id)


def verdict(id: str, path=None) -> str:
    """Current verdict of a hypothesis: ``"supported"``, ``"refuted"`` or ``"inconclusive"``."""
    with open_ledger(path) as db:
        h = get_hypothesis(db, id)
        return decide(h, tally(db, h, interval=False))


def verdict_text(id: str, path=None) -> str:
    """One markdown sentence for a notebook's prose: the verdict of ``id``, its prediction, and the mean and
    interval of the live evidence it was decided on (so the prose is rendered from the ledger, never typed).

    Example: ``"`edit-generalises-seeds`: **supported** (paraphrase >= 0.5; mean 0.93, 95 % interval [0.9, 0.97] over
    3 records)"``.
    """
    with open_ledger(path) as db:
        h = get_hypothesis(db, id)
        t = tally(db, h)
    v = decide(h, t)
    if t.n == 0:
        return f"`{id}`: **{v}** ({h.prediction}; no evidence yet)"
    level = round(100 * (h.level or DEFAULT_LEVEL))
    counted = t.n_measured if h.rule == "interval" else t.n
    what = "measurement" if h.rule == "interval" else "record"
    why = ""
    if v == "inconclusive":
        why = (f"; needs {h.min_runs} {what}s" if counted < h.min_runs else
               "; the interval straddles the threshold" if h.rule == "interval" else "")
    over = f"{counted} {what}{'s' if counted != 1 else ''}"
    if t.n != counted:
        over += f" ({t.n} records: reruns of one seed count once)"
    return (f"`{id}`: **{v}** ({h.prediction}; mean {t.mean:.3g}, {level} % interval [{t.ci_low:.3g}, {t.ci_high:.3g}] "
            f"over {over}{why})")


_H_COLS = ["id", "verdict", "n_evidence", "n_pass", "n_measured", "mean", "ci_low", "ci_high", "prediction", "claim",
           "falsifier", "method", "rule", "min_runs", "fraction", "level", "tags", "author", "created"]
_E_COLS = ["id", "hypothesis_id", "run_id", "notebook", "seed", "metric", "value", "passed", "retracted", "retracts",
           "notes", "params", "artifacts", "git_commit", "machine", "threads", "created", "uid"]


def hypotheses(path=None):
    """All hypotheses with verdict, live evidence counts and the mean of the live values with its bootstrap interval
    (``mean``, ``ci_low``, ``ci_high`` at the hypothesis's ``level``, else 95 %, for every rule), as a DataFrame
    (empty when there is no ledger)."""
    if not ledger_path(path).exists():
        return pd.DataFrame([], columns=_H_COLS)
    with open_ledger(path) as db:
        rows = []
        for r in db.execute("SELECT * FROM hypotheses ORDER BY created, id").fetchall():
            h = hypothesis_from_row(r)
            t = tally(db, h)
            rows.append({**dataclasses.asdict(h), "verdict": decide(h, t), "n_evidence": t.n, "n_pass": t.n_pass,
                         "n_measured": t.n_measured, "mean": t.mean, "ci_low": t.ci_low, "ci_high": t.ci_high,
                         "prediction": h.prediction, "tags": ", ".join(h.tags)})
    return pd.DataFrame(rows, columns=_H_COLS)


def evidence(id: str | None = None, path=None):
    """Evidence records (all, or of one hypothesis) including retractions, with the machine and thread count each
    was recorded on, as a DataFrame."""
    if id is None and not ledger_path(path).exists():
        return pd.DataFrame([], columns=_E_COLS)
    with open_ledger(path) as db:
        evs = evidence_records(db, id)
    gone = {e.retracts for e in evs if e.retracts is not None}
    return pd.DataFrame([{**dataclasses.asdict(e), "retracted": e.id in gone} for e in evs], columns=_E_COLS)


def history(id: str | None = None, path=None):
    """Every change of verdict (hypothesis_id, verdict, evidence_id, created), as a DataFrame."""
    cols = ["hypothesis_id", "verdict", "evidence_id", "created"]
    if id is None and not ledger_path(path).exists():
        return pd.DataFrame([], columns=cols)
    with open_ledger(path) as db:
        if id is not None:
            get_hypothesis(db, id)
        sql = "SELECT * FROM verdicts" + (" WHERE hypothesis_id = ?" if id else "") + " ORDER BY id"
        return pd.DataFrame([{c: r[c] for c in cols} for r in db.execute(sql, (id,) if id else ())], columns=cols)

