"""Figures for the notebooks (seaborn/matplotlib). Every function takes an optional ``ax`` and returns the figure."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

sns.set_theme(style="whitegrid", context="notebook")


def _axes(ax, ncols: int = 1, size=(6.4, 4.0)):
    if ax is not None:
        return ax.figure, ax
    fig, axes = plt.subplots(1, ncols, figsize=(size[0] * ncols, size[1]), constrained_layout=True)
    return fig, axes


def pretraining_curves(curves: dict[str, dict], ax=None):
    """Loss and fact accuracy against training step, one line per family.

    Args:
        curves: ``{family: Pretrained.curves}``.
        ax: Optional pair of axes ``(loss_ax, accuracy_ax)``.
    """
    fig, (ax_loss, ax_acc) = _axes(ax, ncols=2)
    palette = dict(zip(curves, sns.color_palette("tab10", len(curves))))
    for fam, c in curves.items():
        ax_loss.plot(c["loss_step"], c["loss"], label=fam, color=palette[fam], lw=1.5)
        ax_acc.plot(c["eval_step"], c["fact_accuracy"], label=fam, color=palette[fam], lw=2, marker="o", ms=3)
    ax_loss.set(yscale="log", xlabel="training step", ylabel="loss (log scale)", title="Pretraining loss")
    ax_acc.set(xlabel="training step", ylabel="fact accuracy", ylim=(0, 1.02), title="Facts known (exact answer)")
    ax_acc.axhline(0.95, color="grey", ls="--", lw=1)
    ax_acc.text(ax_acc.get_xlim()[0], 0.955, " 0.95 target", color="grey", va="bottom", fontsize=9)
    ax_loss.legend(title="family", fontsize=9)
    return fig


def family_scores(table: pd.DataFrame, ax=None):
    """Grouped bars: fact accuracy (seen templates) and paraphrase accuracy (held-out templates) per family.

    Args:
        table: One row per family with columns ``family``, ``fact_accuracy``, ``paraphrase_accuracy``.
    """
    fig, ax = _axes(ax, size=(max(6.0, 1.1 * len(table)), 4.0))
    long = table.melt(id_vars="family", value_vars=["fact_accuracy", "paraphrase_accuracy"], var_name="probe",
                      value_name="accuracy")
    long["probe"] = long["probe"].map({"fact_accuracy": "facts (training templates)",
                                       "paraphrase_accuracy": "paraphrases (held-out templates)"})
    sns.barplot(long, x="family", y="accuracy", hue="probe", ax=ax, palette=["#4C72B0", "#DD8452"])
    for container in ax.containers:
        ax.bar_label(container, fmt="%.2f", fontsize=8, padding=2)
    ax.set(ylim=(0, 1.12), xlabel="", ylabel="accuracy", title="What each pretrained family knows")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
    return fig


def learning_curves(curves: dict[str, dict], ax=None):
    """Training loss (answer tokens only) against step, one line per adapter.

    Args:
        curves: ``{label: {"step": [...], "loss": [...]}}``.
    """
    fig, ax = _axes(ax)
    for label, c in curves.items():
        ax.plot(c["step"], c["loss"], label=label, lw=2)
    ax.set(yscale="log", xlabel="training step", ylabel="loss on the answer token (log)", title="LoRA learning curves")
    ax.legend(fontsize=9)
    return fig


def tradeoff(table: pd.DataFrame, x: str = "specificity", y: str = "efficacy", hue: str = "targets",
             size: str = "rank", ax=None):
    """Efficacy against specificity (or any two metrics), one point per adapter, labelled by rank.

    The top-right corner is the goal: the edit took (efficacy) and nothing else moved (specificity).
    """
    fig, ax = _axes(ax, size=(6.4, 4.8))
    sns.scatterplot(table, x=x, y=y, hue=hue, size=size, sizes=(60, 300), ax=ax, alpha=0.8, legend="brief")
    for _, row in table.iterrows():
        ax.annotate(f"r={row[size]}", (row[x], row[y]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    lo_x, lo_y = min(0.8, table[x].min() - 0.02), min(0.8, table[y].min() - 0.02)
    ax.set(xlim=(lo_x, 1.01), ylim=(lo_y, 1.01), xlabel=f"{x} (unchanged facts kept)",
           ylabel=f"{y} (edited facts learned)", title="Edit success against collateral damage")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    return fig
