"""What the journal notebook (``07_journal``) shows: the ledger's status, verdict counts, a table and figures.

Everything here only *reads* the hypothesis ledger (:mod:`lora_lens.ledger`). A missing ledger is an empty one: a
fresh clone renders "no hypotheses yet" instead of failing. The checks of the notebook's exercises live with all
the others in :mod:`lora_lens.workshop.exercises`.

Example:
    >>> from lora_lens.ledger import journal
    >>> journal.verdict_counts("/nonexistent/ledger.sqlite")["hypotheses"]
    0
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from lora_lens.errors import ConfigError
from lora_lens.figures import FIGURE_STYLE
from lora_lens.ledger import store
from lora_lens.ledger.api import VERDICTS, evidence, hypotheses
from lora_lens.ledger.export import export
from lora_lens.ledger.plots import plot_evidence

__all__ = ["markdown", "plot_evidence_grid", "resolve", "status", "verdict_counts", "verdict_table"]

_COLORS = {"supported": "#d4efdc", "refuted": "#f8d0d0", "inconclusive": "#e6e6e6"}


def resolve(ledger_path: str | os.PathLike | None = "") -> Path:
    """The ledger file for a notebook parameter: ``""`` or None means the default (:func:`ledger.ledger_path`)."""
    return store.ledger_path(ledger_path or None)


def verdict_counts(path=None) -> dict[str, int]:
    """Counts over the whole ledger: hypotheses, each verdict, live evidence and retracted records.

    Returns:
        ``{"hypotheses", "supported", "refuted", "inconclusive", "evidence", "retracted"}``; all zero without a
        ledger. ``evidence`` counts live records (the ones the verdicts use).
    """
    hs, ev = hypotheses(path), evidence(path=path)
    out = {"hypotheses": len(hs), **{v: int((hs["verdict"] == v).sum()) for v in VERDICTS}}
    out["evidence"] = int(hs["n_evidence"].sum())
    out["retracted"] = int(ev["retracted"].sum())
    return out


def status(path=None) -> str:
    """One markdown paragraph: where the ledger is and what it holds, or that nothing is recorded yet."""
    where = store.ledger_path(path).resolve()
    s = verdict_counts(path)
    if not s["hypotheses"]:
        return (f"**No hypotheses recorded yet** in `{where}`. The tables and figures below are empty. Run the "
                "series (`lora-lens run`) or notebooks that declare hypotheses, or point `ledger_path` at a "
                "ledger, and run this notebook again.")
    return (f"Ledger `{where}`: **{s['hypotheses']} hypotheses** with {s['evidence']} live evidence records "
            f"({s['retracted']} retracted) - {s['supported']} supported, {s['refuted']} refuted, "
            f"{s['inconclusive']} inconclusive.")


def verdict_table(path=None, max_hypotheses: int = 30):
    """The hypotheses with their verdicts, evidence counts and the mean of the live values with its bootstrap
    interval (``"0.95 [0.93, 0.97]"``), as a styled DataFrame (verdict cells coloured), in declaration order.

    Args:
        path: Ledger file (default: :func:`ledger.ledger_path`).
        max_hypotheses: Show at most this many rows; the caption says how many are left out.

    Returns:
        A ``pandas.io.formats.style.Styler``; ``.data`` is the underlying DataFrame.
    """
    _check_max(max_hypotheses)
    hs = hypotheses(path)
    hs["interval"] = ["-" if pd.isna(m) else f"{m:.4g} [{lo:.4g}, {hi:.4g}]"
                      for m, lo, hi in zip(hs["mean"], hs["ci_low"], hs["ci_high"])]
    cols = {"id": "id", "verdict": "verdict", "n_evidence": "evidence", "n_pass": "pass",
            "interval": "mean [interval]", "prediction": "prediction", "claim": "claim", "falsifier": "falsifier"}
    table = hs[list(cols)].rename(columns=cols).head(max_hypotheses).reset_index(drop=True)
    caption = f"{len(hs)} hypotheses" + (f" (first {max_hypotheses} shown)" if len(hs) > max_hypotheses else "")
    if hs.empty:
        caption = "No hypotheses recorded yet"
    return (table.style.hide(axis="index").set_caption(caption)
            .map(lambda v: f"background-color: {_COLORS.get(v, 'white')}; font-weight: bold", subset=["verdict"])
            .set_properties(**{"text-align": "left"}))


def plot_evidence_grid(path=None, max_hypotheses: int = 30, fig=None):
    """One panel per hypothesis (at most ``max_hypotheses``): its evidence per run against the predicted threshold.

    Args:
        path: Ledger file (default: :func:`ledger.ledger_path`).
        max_hypotheses: Draw the first this many hypotheses; the title says how many are left out.
        fig: Matplotlib figure to draw the grid into (default: a new one sized to the grid).

    Returns:
        The matplotlib figure (a single panel saying so when nothing is declared).
    """
    _check_max(max_hypotheses)
    ids = list(hypotheses(path)["id"])
    shown = ids[:max_hypotheses]
    cols = max(1, min(3, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    with plt.rc_context(FIGURE_STYLE):
        fig = fig if fig is not None else plt.figure(figsize=(5 * cols, 3.8 * rows))
        axes = fig.subplots(rows, cols, squeeze=False)
        for ax in axes.flat[len(shown):]:
            ax.set_axis_off()
        if not ids:
            axes[0, 0].text(0.5, 0.5, "no hypotheses declared yet", ha="center", va="center")
        for ax, hid in zip(axes.flat, shown):
            plot_evidence(hid, ax=ax, path=path)
        if len(shown) < len(ids):
            fig.suptitle(f"first {max_hypotheses} of {len(ids)} hypotheses")
        fig.tight_layout()
    return fig


def markdown(path=None) -> str:
    """The ledger's markdown export (as in a pull request), or a short note when there is no ledger yet."""
    if not store.ledger_path(path).exists():
        return (f"# Hypothesis ledger\n\n_No hypotheses recorded yet: `{store.ledger_path(path)}` does not "
                "exist. Run the series (`lora-lens run`) or a notebook that declares hypotheses, and come back._\n")
    return export("md", path)


def _check_max(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"max_hypotheses={n!r} must be an integer >= 1, e.g. 30")
