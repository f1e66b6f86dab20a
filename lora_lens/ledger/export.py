"""Export of the ledger as markdown (for a pull request), standalone HTML or lossless JSON lines, and import.

Every hypothesis is listed with its verdict and the mean of its live values with their bootstrap interval; every
evidence record with the machine and thread count it was recorded on. ``jsonl`` round-trips: :func:`import_jsonl`
of an export adds every record that is not already present (by the evidence's unique id), so importing twice
changes nothing; exports of older ledgers (without ``level``, ``machine``, ``threads``) import too.
"""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path
from typing import Any

from lora_lens.errors import ConfigError, CorruptError, MismatchError, NotFoundError
from lora_lens.ledger.api import Tally, as_number, decide, insert_evidence, insert_hypothesis, make_hypothesis, tally
from lora_lens.ledger.store import (SCHEMA_VERSION, Hypothesis, RunContext, evidence_records, get_hypothesis,
                                    hypothesis_from_row, open_ledger, utc_now)

__all__ = ["export", "export_hypothesis", "import_jsonl"]

_EV_HEAD = ["#", "run", "notebook", "seed", "value", "pass", "threads", "machine"]
_HEAD = ["id", "verdict", "evidence", "pass", "mean [interval]", "prediction", "claim"]
_OPTIONAL = ("level", "machine", "threads")  # fields added by schema v3: absent in older exports


def _report(db) -> list[tuple[Hypothesis, str, Tally, list[list[str]]]]:
    """(hypothesis, verdict, tally of the live evidence, evidence table rows) for every hypothesis."""
    out = []
    for r in db.execute("SELECT * FROM hypotheses ORDER BY created, id").fetchall():
        h, evs = hypothesis_from_row(r), evidence_records(db, r["id"])
        why = {e.retracts: e for e in evs if e.retracts is not None}
        rows = [[str(e.id), e.run_id, e.notebook or "", "" if e.seed is None else str(e.seed), f"{e.value:.4g}",
                 ("pass" if e.passed else "FAIL") if e.id not in why
                 else f"retracted by #{why[e.id].id}: {why[e.id].notes}",
                 "" if e.threads is None else str(e.threads), e.machine or ""] for e in evs if e.retracts is None]
        t = tally(db, h)
        out.append((h, decide(h, t), t, rows))
    return out


def _interval(t: Tally) -> str:
    """``"0.95 [0.93, 0.97]"``, or ``"-"`` without live evidence."""
    return "-" if t.mean is None else f"{t.mean:.4g} [{t.ci_low:.4g}, {t.ci_high:.4g}]"


def _about(h: Hypothesis, t: Tally) -> list[tuple[str, str]]:
    spread = ("no live evidence yet" if t.mean is None else
              f"mean {t.mean:.4g}, {t.level * 100:g}% bootstrap interval [{t.ci_low:.4g}, {t.ci_high:.4g}] "
              f"over {t.n} live run(s), {t.n_pass} passing")
    return [("Claim", h.claim), ("Prediction", h.prediction), ("Falsifier", h.falsifier or "(none given)"),
            ("Method", h.method or "(none given)"), ("Rule", h.rule_text), ("Evidence", spread),
            ("Declared", f"{h.created[:19]} by {h.author or 'unknown'}"
             + (f"; tags: {', '.join(h.tags)}" if h.tags else ""))]


def _md_cell(s: Any) -> str:
    return str(s).replace("\\", "\\\\").replace("|", "\\|").replace("`", "'").replace("\n", " ")


def _md_table(head: list[str], rows: list[list[Any]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows])


def _md_section(h, v, t, rows) -> str:
    about = "\n".join(f"- **{key}:** {_md_cell(val)}" for key, val in _about(h, t))
    table = _md_table(_EV_HEAD, rows) if rows else "_No evidence yet._"
    return f"## {h.id}: {v}\n\n{about}\n\n{table}\n"


def _markdown(report) -> str:
    counts = {v: sum(r[1] == v for r in report) for v in ("supported", "refuted", "inconclusive")}
    summary = ", ".join(f"{c} {v}" for v, c in counts.items())
    table = _md_table(_HEAD, [[h.id, f"**{v}**", t.n, t.n_pass, _interval(t), h.prediction, h.claim]
                              for h, v, t, _ in report])
    return "\n".join([f"# Hypothesis ledger\n\n{len(report)} hypotheses: {summary}.\n\n{table}\n"]
                     + [_md_section(*r) for r in report])


def _html_table(head: list[str], rows: list[list[Any]]) -> str:
    e = html.escape
    return ("<table><tr>" + "".join(f"<th>{e(str(c))}</th>" for c in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows) + "</table>")


def _html(report) -> str:
    e = html.escape
    body = [_html_table(_HEAD, [[h.id, v, t.n, t.n_pass, _interval(t), h.prediction, h.claim]
                                for h, v, t, _ in report])]
    for h, v, t, rows in report:
        about = "".join(f"<dt>{e(key)}</dt><dd>{e(val)}</dd>" for key, val in _about(h, t))
        body.append(f"<h2>{e(h.id)}: {e(v)}</h2><dl>{about}</dl>"
                    + (_html_table(_EV_HEAD, rows) if rows else "<p><em>No evidence yet.</em></p>"))
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:.2em .5em}dt{font-weight:bold}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Hypothesis ledger</title>"
            f"<style>{style}</style></head><body><h1>Hypothesis ledger</h1>{''.join(body)}</body></html>\n")


def _jsonl(db) -> str:
    lines = [{"kind": "ledger", "schema_version": SCHEMA_VERSION, "exported": utc_now()}]
    for r in db.execute("SELECT * FROM hypotheses ORDER BY created, id").fetchall():
        lines.append({"kind": "hypothesis", **dataclasses.asdict(hypothesis_from_row(r))})
    evs = evidence_records(db)
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
    with open_ledger(path) as db:
        return _jsonl(db) if format == "jsonl" else (_markdown if format == "md" else _html)(_report(db))


def export_hypothesis(id: str, path=None) -> str:
    """One hypothesis as its section of the markdown export: claim, prediction, rule, evidence table.

    Raises:
        NotFoundError: no ledger, or no hypothesis ``id`` in it.
    """
    with open_ledger(path) as db:
        get_hypothesis(db, id)
        return next(_md_section(*r) for r in _report(db) if r[0].id == id)


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
    with open_ledger(path, create=True, write=True) as db:
        for n, d in items:
            try:
                if d["kind"] == "hypothesis":
                    h = make_hypothesis(**{f.name: d[f.name] if f.name not in _OPTIONAL else d.get(f.name)
                                           for f in dataclasses.fields(Hypothesis)})
                    added["hypotheses"] += insert_hypothesis(db, h) is h
                elif d["kind"] == "evidence" and not db.execute("SELECT 1 FROM evidence WHERE uid = ?",
                                                                (d["uid"],)).fetchone():
                    retracts = None
                    if d["retracts_uid"]:
                        retracts = db.execute("SELECT id FROM evidence WHERE uid = ?", (d["retracts_uid"],)).fetchone()
                        if retracts is None:
                            raise KeyError(d["retracts_uid"])
                        retracts = retracts[0]
                    value = None if retracts else as_number(d["value"], f"{src}:{n} value")
                    threads = d.get("threads")
                    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)):
                        raise TypeError(f"threads={threads!r} is not an integer")
                    ctx = RunContext(d["run_id"], None, d["notebook"], d["params"], d.get("machine"), threads)
                    insert_evidence(db, get_hypothesis(db, d["hypothesis_id"]), ctx, d["seed"], d["metric"], value,
                                    d["artifacts"], d["notes"], retracts, d["created"], d["uid"], d["git_commit"])
                    added["evidence"] += 1
            except (KeyError, TypeError, IndexError) as exc:
                raise CorruptError(f"{src}:{n} is missing or has a bad field ({exc!r}); nothing was imported") from None
    return added


