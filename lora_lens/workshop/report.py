"""The run report: ``<run>/index.html``, readable without opening a notebook.

Built from what a run folder holds (:mod:`lora_lens.workshop.runner` writes it after every run, also a failed one;
``lora-lens report RUN_DIR`` rebuilds it): the run's preset, overrides and timing; per notebook its status, wall
time, kernel peak RSS, parameters, key numbers from its ``summary.json`` (nested dicts flattened to ``a.b.c``), its
figures (the PNG outputs of the executed notebook, extracted to files) and a link to an HTML export of the executed
notebook (nbconvert); the ledger's hypotheses that this run's run id recorded evidence for, with their verdicts; and
any failure with the notebook, the cell and the error.

Everything the page shows lives in the run folder and is linked relatively, so the folder can be opened from disk,
moved or zipped::

    <run>/index.html
    <run>/report/<notebook>.html        nbconvert export of the executed notebook (images embedded)
    <run>/report/<notebook>/fig-*.png   the notebook's figures
    <run>/report/_static/mathjax/       MathJax 2 for the exports' formulas

The exports make no network request (:mod:`lora_lens.workshop.offline`): CSS and images are inline, MathJax is
copied once into ``<run>/report/_static/mathjax/``, and widget outputs show a note (each widget cell of the series
is followed by a static figure or table).
``report/`` is replaced as a whole and ``index.html`` is written atomically, so a rebuild never leaves a mix.

Example:
    >>> from lora_lens.workshop.report import write_report
    >>> write_report("runs/20260101-120000")  # doctest: +SKIP
    PosixPath('runs/20260101-120000/index.html')
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from pathlib import Path
from typing import Any

import nbformat

from lora_lens import ledger
from lora_lens.utils import atomic_dir
from lora_lens.workshop.offline import export_html as offline_export
from lora_lens.workshop.runner import load_run

__all__ = ["MAX_FIGURES", "MAX_NUMBERS", "export_html", "extract_figures", "flatten", "ledger_rows", "render",
           "write_report"]

MAX_FIGURES = 12
"""Figures shown per notebook on the index page (all of them are in the notebook's export)."""
MAX_NUMBERS = 80
"""Rows of a notebook's flattened ``summary.json`` shown on the index page."""

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_STATUS_COLOUR = {"ok": "#1a7f37", "failed": "#cf222e", "interrupted": "#bc4c00", "running": "#9a6700",
                  "pending": "#6e7781", "incomplete": "#9a6700", "supported": "#1a7f37", "refuted": "#cf222e",
                  "inconclusive": "#6e7781"}


def flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten nested dicts to ``[("a.b", value), ...]``; lists of dicts get ``[i]`` indices, other lists stay.

    Example:
        >>> flatten({"a": {"b": 1, "c": [1, 2]}, "d": [{"e": 0.5}]})
        [('a.b', 1), ('a.c', [1, 2]), ('d[0].e', 0.5)]
    """
    if isinstance(data, dict):
        out: list[tuple[str, Any]] = []
        for key, value in data.items():
            out += flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(data, list) and data and all(isinstance(x, dict) for x in data):
        return [row for i, x in enumerate(data) for row in flatten(x, f"{prefix}[{i}]")]
    return [(prefix, data)]


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        text = ", ".join(_fmt(v) for v in value[:12]) + (f", … ({len(value)} items)" if len(value) > 12 else "")
        return f"[{text}]"
    text = str(value)
    return text if len(text) <= 200 else text[:199] + "…"


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _badge(status: str | None) -> str:
    colour = _STATUS_COLOUR.get(status or "", "#6e7781")
    return f'<span class="badge" style="background:{colour}">{_e(status or "?")}</span>'


def _table(head: list[str], rows: list[list[str]], raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw``."""
    cell = (lambda c: c) if raw else _e
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{''.join(f'<th>{_e(h)}</th>' for h in head)}</tr></thead><tbody>{body}</tbody></table>"


def _caption(cells: list, index: int) -> str:
    """The nearest markdown heading (or first markdown line) above cell ``index``."""
    for cell in reversed(cells[:index]):
        if cell.get("cell_type") == "markdown":
            lines = [ln.strip() for ln in cell.get("source", "").splitlines() if ln.strip()]
            heading = next((ln for ln in lines if ln.startswith("#")), lines[0] if lines else "")
            return heading.lstrip("#").strip()
    return ""


def extract_figures(nb, dest: Path) -> list[dict[str, str]]:
    """Write every ``image/png`` output of a notebook to ``dest/fig-CC-K.png``.

    Returns:
        ``[{"file": name, "caption": heading above the cell, "cell": index}, ...]`` in notebook order.
    """
    figures = []
    for ci, cell in enumerate(nb.cells):
        if cell.get("cell_type") != "code":
            continue
        k = 0
        for output in cell.get("outputs", []):
            data = output.get("data", {}) if isinstance(output, dict) else {}
            png = data.get("image/png")
            if not png:
                continue
            dest.mkdir(parents=True, exist_ok=True)
            name = f"fig-{ci:03d}-{k}.png"
            (dest / name).write_bytes(base64.b64decode(png if isinstance(png, str) else "".join(png)))
            figures.append({"file": name, "caption": _caption(nb.cells, ci), "cell": str(ci)})
            k += 1
    return figures


def export_html(nb, path: Path) -> None:
    """Export an executed notebook to HTML that works offline (:mod:`lora_lens.workshop.offline`)."""
    offline_export(nb, path, path.parent / "_static")


def _error_output(nb) -> str:
    """The traceback of the failing cell of an executed notebook, without ANSI colours (last 40 lines)."""
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            if output.get("output_type") == "error":
                text = _ANSI.sub("", "\n".join(output.get("traceback", [])))
                return "\n".join(text.splitlines()[-40:])
    return ""


def ledger_rows(run_id: str, ledger_file: Path) -> list[dict[str, Any]]:
    """Hypotheses with evidence recorded under ``run_id``: id, claim, prediction, this run's values, verdict.

    Returns an empty list when the ledger file does not exist.
    """
    if not ledger_file.exists():
        return []
    ev = ledger.evidence(path=ledger_file)
    ev = ev[(ev["run_id"] == run_id) & ev["retracts"].isna()]
    if ev.empty:
        return []
    hyps = ledger.hypotheses(path=ledger_file).set_index("id")
    rows = []
    for hid, group in ev.groupby("hypothesis_id", sort=False):
        h = hyps.loc[hid]
        values = [f"{v:.4g} {'pass' if p else 'fail'}{' (retracted)' if r else ''}"
                  for v, p, r in zip(group["value"], group["passed"], group["retracted"])]
        rows.append({"id": hid, "claim": h["claim"], "prediction": h["prediction"],
                     "notebooks": sorted({n for n in group["notebook"] if n}), "values": values,
                     "verdict": h["verdict"], "n_evidence": int(h["n_evidence"]), "n_pass": int(h["n_pass"])})
    return rows


def _seconds(x: Any) -> str:
    if not isinstance(x, (int, float)):
        return "—"
    return f"{x:.1f} s" if x < 120 else f"{x / 60:.1f} min"


def _notebook_section(run_dir: Path, entry: dict, report_dir: Path) -> tuple[str, dict | None]:
    """The HTML section of one notebook and its failure row (None when it did not fail)."""
    stem = entry.get("notebook", "?")
    status = entry.get("status")
    parts = [f'<section id="{_e(stem)}"><h2>{_e(stem)} {_badge(status)}</h2>']
    meta = [f"wall time {_seconds(entry.get('seconds'))}"]
    if entry.get("max_rss_mb") is not None:
        meta.append(f"kernel peak RSS {entry['max_rss_mb']:.0f} MB")
    if entry.get("needs"):
        meta.append(f"needs {', '.join(entry['needs'])}")
    executed = run_dir / entry["output"] if entry.get("output") else None
    nb = None
    if executed is not None and executed.is_file():
        try:
            nb = nbformat.read(executed, as_version=4)
        except Exception as exc:  # noqa: BLE001 - a broken notebook is reported, not fatal
            meta.append(f"executed notebook unreadable: {type(exc).__name__}: {exc}")
    if nb is not None:
        export_html(nb, report_dir / f"{stem}.html")
        meta.append(f'<a href="report/{_e(stem)}.html">notebook (HTML)</a>')
        meta.append(f'<a href="{_e(entry["output"])}">notebook (.ipynb)</a>')
    parts.append(f'<p class="meta">{" · ".join(m if m.startswith("<a") else _e(m) for m in meta)}</p>')

    failure = None
    if status == "failed" or entry.get("error"):
        info = entry.get("failure") or {}
        failure = {"notebook": stem, "cell": info.get("cell"), "source": info.get("source", ""),
                   "error": f"{info.get('ename', '')}: {info.get('evalue', '')}".strip(": ")}
        trace = _error_output(nb) if nb is not None else ""
        parts.append(f'<div class="failure"><p><b>Failed</b></p><pre>{_e(entry.get("error", ""))}</pre>'
                     + (f"<details><summary>traceback</summary><pre>{_e(trace)}</pre></details>" if trace else "")
                     + "</div>")

    params = {k: v for k, v in (entry.get("parameters") or {}).items() if k != "output_dir"}
    if params:
        parts.append("<details><summary>parameters</summary>"
                     + _table(["name", "value"], [[k, _fmt(v)] for k, v in params.items()]) + "</details>")

    summary_path = run_dir / stem / "summary.json"
    if summary_path.is_file():
        try:
            rows = flatten(json.loads(summary_path.read_text(encoding="utf-8")))
        except ValueError as exc:
            parts.append(f"<p>summary.json unreadable: {_e(exc)}</p>")
        else:
            shown = rows[:MAX_NUMBERS]
            more = (f"<p class='meta'>{len(rows) - len(shown)} more in summary.json</p>"
                    if len(rows) > len(shown) else "")
            parts.append("<h3>Key numbers</h3>" + _table(["", "value"], [[k, _fmt(v)] for k, v in shown]) + more)
    elif status == "ok":
        parts.append("<p class='meta'>no summary.json</p>")

    if nb is not None:
        figures = extract_figures(nb, report_dir / stem)
        if figures:
            items = "".join(
                f'<figure><a href="report/{_e(stem)}/{_e(f["file"])}"><img src="report/{_e(stem)}/{_e(f["file"])}" '
                f'alt="{_e(f["caption"])}" loading="lazy"></a><figcaption>{_e(f["caption"])} '
                f'(cell {_e(f["cell"])})</figcaption></figure>'
                for f in figures[:MAX_FIGURES])
            more = (f"<p class='meta'>{len(figures) - MAX_FIGURES} more figures in the notebook export</p>"
                    if len(figures) > MAX_FIGURES else "")
            parts.append(f'<h3>Figures</h3><div class="figs">{items}</div>{more}')
    parts.append("</section>")
    return "".join(parts), failure


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:72rem;padding:0 1rem;
color:#1f2328;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}td,th{border:1px solid #d0d7de;padding:.2rem .5rem;
text-align:left;vertical-align:top}th{background:#f6f8fa}
.badge{color:#fff;border-radius:.8rem;padding:.05rem .55rem;font-size:.8rem;vertical-align:middle}
.meta{color:#57606a;font-size:.9rem}.failure{border-left:4px solid #cf222e;background:#fff5f5;padding:.3rem .8rem}
pre{white-space:pre-wrap;font-size:.85rem}.figs{display:flex;flex-wrap:wrap;gap:1rem}
figure{margin:0;width:22rem}figure img{max-width:100%;border:1px solid #d0d7de}figcaption{font-size:.8rem;color:#57606a}
"""


def render(run_dir: Path, record: dict[str, Any], report_dir: Path) -> str:
    """Build the index page of a run (writing exports and figures into ``report_dir``) and return its HTML."""
    run_id = record.get("run_id", run_dir.name)
    entries = sorted(record.get("notebooks", []), key=lambda e: e.get("notebook", ""))
    sections, failures = [], []
    for entry in entries:
        section, failure = _notebook_section(run_dir, entry, report_dir)
        sections.append(section)
        if failure:
            failures.append(failure)

    total = sum(e["seconds"] for e in entries if isinstance(e.get("seconds"), (int, float)))
    rss = [e["max_rss_mb"] for e in entries if isinstance(e.get("max_rss_mb"), (int, float))]
    overview = [[f'<a href="#{_e(e.get("notebook"))}">{_e(e.get("notebook"))}</a>', _badge(e.get("status")),
                 _e(_seconds(e.get("seconds"))),
                 _e(f"{e['max_rss_mb']:.0f} MB" if isinstance(e.get("max_rss_mb"), (int, float)) else "—"),
                 _e(", ".join(e.get("needs") or []) or "—")] for e in entries]
    attempts = record.get("attempts") or []
    wall = sum(a.get("seconds") or 0 for a in attempts)
    about = [["run id", run_id], ["status", record.get("status", "?")], ["preset", record.get("preset", "?")],
             ["overrides", _fmt(record.get("overrides") or {}) if record.get("overrides") else "—"],
             ["started", record.get("started", "?")], ["finished", record.get("finished", "—")],
             ["wall time (all attempts)", _seconds(wall) if attempts else "—"],
             ["notebook time (sum)", _seconds(total)],
             ["peak kernel RSS (max over notebooks)", f"{max(rss):.0f} MB" if rss else "—"],
             ["jobs", record.get("jobs", 1)], ["attempts", len(attempts) or 1],
             ["notebooks folder", record.get("notebooks_dir", "?")]]

    ledger_file = Path(record.get("ledger") or run_dir.parent / "ledger.sqlite")
    try:
        hyps = ledger_rows(run_id, ledger_file)
        if hyps:
            ledger_html = _table(
                ["hypothesis", "claim", "prediction", "this run", "verdict (all runs)"],
                [[_e(h["id"]), _e(h["claim"]), _e(h["prediction"]),
                  _e("; ".join(h["values"])) + f"<br><span class='meta'>{_e(', '.join(h['notebooks']))}</span>",
                  _badge(h["verdict"]) + f" <span class='meta'>{h['n_pass']}/{h['n_evidence']} pass</span>"]
                 for h in hyps], raw=True)
        else:
            ledger_html = f"<p class='meta'>no evidence recorded under run id {_e(run_id)} in {_e(ledger_file)}</p>"
    except Exception as exc:  # noqa: BLE001 - an unreadable ledger is reported on the page
        ledger_html = f"<p>ledger {_e(ledger_file)} unreadable: {_e(type(exc).__name__)}: {_e(exc)}</p>"

    failure_html = ""
    if failures:
        failure_html = "<h2>Failures</h2>" + _table(
            ["notebook", "cell", "source", "error"],
            [[f["notebook"], "—" if f["cell"] is None else f["cell"], f["source"], f["error"]] for f in failures])
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>lora_lens run {_e(run_id)}</title>"
            f"<style>{_CSS}</style></head><body><h1>lora_lens run {_e(run_id)} {_badge(record.get('status'))}</h1>"
            f"{failure_html}<h2>Run</h2>{_table(['', ''], [[k, _fmt(v)] for k, v in about])}"
            f"<h2>Notebooks</h2>"
            f"{_table(['notebook', 'status', 'wall time', 'kernel peak RSS', 'needs'], overview, raw=True)}"
            f"<h2>Hypotheses touched by this run</h2>{ledger_html}{''.join(sections)}"
            f"<p class='meta'>Built from run.json by lora_lens.workshop.report; rebuild with "
            f"<code>lora-lens report {_e(run_dir)}</code>.</p></body></html>\n")


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write ``<run>/index.html`` and ``<run>/report/`` for a run folder and return the index path.

    Raises:
        NotFoundError: the folder does not exist (nothing is written).
        ConfigError: it is not a run folder (nothing is written).
    """
    path, record = load_run(run_dir)
    with atomic_dir(path / "report") as tmp:
        page = render(path, record, tmp)
    index = path / "index.html"
    part = index.with_name(f".index.html.{os.getpid()}.tmp")
    part.write_text(page, encoding="utf-8")
    os.replace(part, index)
    return index
