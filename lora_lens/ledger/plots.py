"""Figures of the ledger: one hypothesis's evidence against its prediction, and every verdict over time.

Like every figure of the package, each function draws into ``ax=`` when given (a new figure otherwise) and returns
the figure; none sets a global matplotlib theme: :data:`FIGURE_STYLE` applies only while a figure is drawn.
"""

from __future__ import annotations

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import pandas as pd

from lora_lens.figures import FIGURE_STYLE
from lora_lens.ledger.api import evidence, history, hypothesis, verdict
from lora_lens.ledger.store import Hypothesis

__all__ = ["VERDICT_COLORS", "plot_evidence", "plot_timeline"]

VERDICT_COLORS = {"supported": "#2a9d4b", "refuted": "#d62728", "inconclusive": "#8c8c8c"}


def _plot_one(ax, h: Hypothesis, v: str, ev) -> None:
    ev = ev[ev["retracts"].isna()].reset_index(drop=True)
    for label, mask, style in [("pass", ev["passed"] & ~ev["retracted"],
                                dict(c=VERDICT_COLORS["supported"], marker="o")),
                               ("fail", ~ev["passed"].astype(bool) & ~ev["retracted"],
                                dict(c=VERDICT_COLORS["refuted"], marker="X")),
                               ("retracted", ev["retracted"], dict(facecolors="none", edgecolors="grey", marker="o"))]:
        if mask.any():
            ax.scatter(ev.index[mask], ev["value"][mask], s=50, label=label, zorder=3, **style)
    if h.comparator == "between":
        ax.axhspan(*h.threshold, color=VERDICT_COLORS["supported"], alpha=0.12, label=f"predicted: {h.prediction}")
    else:
        ax.axhline(h.threshold, color="black", ls="--", lw=1, label=f"predicted: {h.prediction}")
    runs = [f"#{i}\n{r if len(r) <= 16 else r[:15] + '…'}" for i, r in zip(ev["id"], ev["run_id"])]
    ax.set_xticks(range(len(ev)), runs, fontsize=7)
    ax.set(title=f"{h.id}: {v}", xlabel="evidence # and run, in recorded order", ylabel=h.metric)
    ax.legend(fontsize=8, loc="best")


def plot_evidence(id: str, ax=None, path=None):
    """Evidence values of one hypothesis per run against the predicted threshold (retracted records hollow).

    Args:
        id: Hypothesis id.
        ax: Matplotlib axes to draw into (default: a new figure).
        path: Ledger file (default: :func:`~lora_lens.ledger.store.ledger_path`).

    Returns:
        The matplotlib figure.

    Raises:
        NotFoundError: no ledger, or no hypothesis ``id`` in it.
    """
    h, v, ev = hypothesis(id, path), verdict(id, path), evidence(id, path=path)
    with plt.rc_context(FIGURE_STYLE):
        if ax is None:
            fig, ax = plt.subplots(figsize=(7, 4))
            _plot_one(ax, h, v, ev)
            fig.tight_layout()
        else:
            _plot_one(ax, h, v, ev)
    return ax.figure


def plot_timeline(ax=None, path=None):
    """Verdict of every hypothesis over time: one row each, coloured by verdict, a dot at every change.

    Args:
        ax: Matplotlib axes to draw into (default: a new figure sized to the number of hypotheses).
        path: Ledger file.

    Returns:
        The matplotlib figure.
    """
    with plt.rc_context(FIGURE_STYLE):
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
                ax.hlines(y, row["created"], stop, color=VERDICT_COLORS[row["verdict"]], lw=6)
                ax.plot(row["created"], y, "o", color=VERDICT_COLORS[row["verdict"]], mec="black", zorder=3)
        ax.set_yticks(range(len(ids)), ids)
        ax.set_ylim(-0.7, len(ids) - 0.3)
        if ids:
            ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax.xaxis.get_major_locator()))
        else:  # no history: say so instead of drawing an empty 1970 time axis
            ax.set_xticks([])
            ax.text(0.5, 0.5, "no hypotheses declared yet", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel="time (UTC)", ylabel="hypothesis", title="Verdicts over time")
        ax.legend(handles=[plt.Line2D([], [], color=c, lw=6, label=v) for v, c in VERDICT_COLORS.items()],
                  fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
        ax.figure.tight_layout()
    return ax.figure
