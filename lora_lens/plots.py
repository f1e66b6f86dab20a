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
