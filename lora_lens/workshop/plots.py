"""Figures of the notebook series (seaborn/matplotlib).

The package's one figure convention: every function draws into ``ax=`` when given (a sequence of axes where a
figure has several panels, as documented per function) or into a new figure, and returns the figure. Nothing here
sets a global theme: each function draws under :data:`~lora_lens.figures.FIGURE_STYLE`, and
:func:`~lora_lens.figures.subplots` (re-exported here) makes axes in that style for a figure that a notebook composes from several functions.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from lora_lens.figures import styled, subplots
from lora_lens.lab.modules import MODULE_TYPES

__all__ = ["component_heatmap", "deletion_curves", "discovery_tradeoff", "energy_depth_curves", "family_scores",
           "intruder_curves", "layer_heatmap", "learning_curves", "match_vs_chance", "pattern_forest", "phi_heatmap",
           "portability_bars", "pretraining_curves", "rank_profile", "subplots", "token_heatmaps", "tradeoff"]


def _axes(ax, ncols: int = 1, size=(6.4, 4.0)):
    if ax is not None:
        return ax.figure, ax
    fig, axes = plt.subplots(1, ncols, figsize=(size[0] * ncols, size[1]), constrained_layout=True)
    return fig, axes


@styled
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


@styled
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


@styled
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


@styled
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


# ---------------------------------------------------------------------------------------------------------------
# notebook 02: what changed


@styled
def layer_heatmap(table: pd.DataFrame, value: str, title: str | None = None, fmt: str = ".2f",
                  cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
                  label: str | None = None, ax=None):
    """Heatmap of one per-module quantity: module type (rows) against layer (columns), each cell annotated.

    Works on any table with one row per module and columns ``layer``, ``module_type`` and ``value``, e.g.
    :func:`lora_lens.lens.delta.summary` (``value="energy_share"``) or :func:`lora_lens.lens.delta.phi_table`
    (``value="phi"``). Modules without a layer (embedding, LM head) are left out; several rows in one cell are
    summed for shares (columns ending in ``share``) and averaged otherwise.

    Args:
        table: One row per module.
        value: The column to draw.
        title: Figure title (default: the column name).
        fmt: Format of the annotations.
        cmap: Colour map.
        vmin: Lower end of the colour scale (default: the data's minimum).
        vmax: Upper end (default: the data's maximum).
        label: Colour-bar label (default: the column name).
        ax: Optional matplotlib axes.
    """
    data = table[table["layer"].notna()].astype({"layer": int})
    how = "sum" if value.endswith("share") else "mean"
    grid = data.pivot_table(index="module_type", columns="layer", values=value, aggfunc=how)
    grid = grid.reindex([t for t in MODULE_TYPES if t in grid.index])
    fig, ax = _axes(ax, size=(max(4.0, 1.0 + 0.9 * grid.shape[1]), 0.8 + 0.45 * grid.shape[0]))
    sns.heatmap(grid, annot=True, fmt=fmt, cmap=cmap, vmin=vmin, vmax=vmax, ax=ax, linewidths=0.5,
                annot_kws={"fontsize": 8}, cbar_kws={"label": label or value})
    ax.set(xlabel="layer (input → output)", ylabel="", title=title or value)
    ax.tick_params(axis="y", rotation=0)
    return fig


@styled
def phi_heatmap(grid, title: str | None = None, zoom: int | None = 8, ax=None):
    """The LoRA paper's Figure 3: φ(i, j) between the top-i directions of one adapter and the top-j of another.

    Args:
        grid: ``[max_i, max_j]`` array from :func:`lora_lens.lens.delta.phi_grid` (entry ``[i-1, j-1]`` is φ(i, j)).
        title: Title of the full panel.
        zoom: Also draw the top-left ``zoom × zoom`` corner, annotated (None or a corner as large as the grid:
            one panel only).
        ax: Optional axes: one (full grid only) or a pair ``(full, zoom)``.
    """
    grid = np.asarray(grid, dtype=float)
    ni, nj = grid.shape
    zoom = None if zoom is None or (zoom >= ni and zoom >= nj) else zoom
    if ax is None:
        ncols = 2 if zoom else 1
        fig, axes = plt.subplots(1, ncols, figsize=(5.6 * ncols, 3.6), constrained_layout=True,
                                 width_ratios=[1.6, 1] if zoom else None)
        axes = list(np.atleast_1d(axes))
    else:
        axes = list(ax) if isinstance(ax, (list, tuple)) else [ax]
        fig = axes[0].figure
        zoom = zoom if len(axes) > 1 else None
    im = axes[0].imshow(grid, vmin=0, vmax=1, cmap="magma", aspect="auto", interpolation="nearest",
                        extent=(0.5, nj + 0.5, ni + 0.5, 0.5))
    axes[0].set(xlabel="j (top-j directions of the second adapter)", ylabel="i (top-i of the first adapter)",
                title=title or "subspace similarity φ(i, j)")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].grid(False)
    fig.colorbar(im, ax=axes[-1] if zoom else axes[0], label="φ(i, j)", shrink=0.9)
    if zoom:
        z = grid[:zoom, :zoom]
        zi, zj = z.shape
        axes[1].imshow(z, vmin=0, vmax=1, cmap="magma", interpolation="nearest",
                       extent=(0.5, zj + 0.5, zi + 0.5, 0.5))
        for i in range(zi):
            for j in range(zj):
                axes[1].text(j + 1, i + 1, f"{z[i, j]:.2f}", ha="center", va="center", fontsize=7,
                             color="black" if z[i, j] > 0.6 else "white")
        axes[1].set(xlabel="j", ylabel="i", title=f"zoom: i, j ≤ {zoom}", xticks=range(1, zj + 1),
                    yticks=range(1, zi + 1))
        axes[1].grid(False)
    return fig


@styled
def rank_profile(summaries: dict, ax=None):
    """Effective (entropy) and stable rank of every module against the adapter's nominal rank.

    Args:
        summaries: ``{nominal rank: lora_lens.lens.delta.summary(...)}``.
        ax: Optional axes.
    """
    fig, ax = _axes(ax, size=(6.0, 4.2))
    ranks = sorted(summaries)
    rng = np.random.default_rng(0)
    colours = {"effective_rank": "#4C72B0", "stable_rank": "#DD8452"}
    names = {"effective_rank": "effective rank (entropy)", "stable_rank": "stable rank ‖ΔW‖²_F/‖ΔW‖²₂"}
    for col, shift in (("effective_rank", 0.93), ("stable_rank", 1.07)):
        for k, r in enumerate(ranks):
            y = summaries[r][col].to_numpy(dtype=float)
            x = r * shift * np.exp(rng.uniform(-0.04, 0.04, len(y)))
            ax.scatter(x, y, s=14, alpha=0.6, color=colours[col], label=names[col] if k == 0 else None)
            ax.plot([r * shift / 1.1, r * shift * 1.1], [y.mean()] * 2, color=colours[col], lw=2.5)
    xs = np.array([min(ranks) / 1.5, max(ranks) * 1.5])
    ax.plot(xs, xs, color="grey", ls="--", lw=1, label="= nominal rank")
    ax.plot(xs, xs / 2, color="grey", ls=":", lw=1, label="= nominal rank / 2")
    ax.set(xscale="log", yscale="log", xlabel="nominal LoRA rank r", ylabel="rank measure (per module)",
           title="How many directions does the update use?")
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.minorticks_off()
    ax.legend(fontsize=8, loc="upper left")
    return fig


@styled
def energy_depth_curves(energy: pd.DataFrame, ax=None):
    """Share of update energy against relative depth, one line per family (mean over seeds, seeds as thin lines).

    Args:
        energy: Long table ``family, seed, depth, share`` (``lora_lens.studies.compare.Study.energy``).
        ax: Optional axes.
    """
    fig, ax = _axes(ax, size=(7.0, 4.2))
    fams = list(dict.fromkeys(energy["family"]))
    palette = dict(zip(fams, sns.color_palette("tab10", len(fams))))
    for fam in fams:
        e = energy[energy["family"] == fam]
        for _, g in e.groupby("seed"):
            ax.plot(g["depth"], g["share"], color=palette[fam], lw=0.7, alpha=0.35)
        mean = e.groupby("depth")["share"].mean()
        ax.plot(mean.index, mean.to_numpy(), color=palette[fam], lw=2.2, marker="o", ms=4,
                label=f"{fam} ({e['layer'].nunique()} layers)")
    ax.axvline(0.5, color="grey", ls=":", lw=1)
    ax.set(xlabel="relative depth (layer / (layers − 1))", ylabel="share of update energy ‖ΔW‖²_F per layer",
           title="Where the update lives, by relative depth", xlim=(-0.03, 1.03))
    ax.legend(fontsize=8, title="family (mean over seeds)")
    return fig


@styled
def pattern_forest(table: pd.DataFrame, ax=None):
    """Forest plot: each pattern's statistic per family with its bootstrap interval, against its threshold (dashed)
    and beside its null (grey ×, with the null's interval, just below each row) and, where measured, the adapter
    trained on shuffled answers (blue □).

    Args:
        table: :func:`lora_lens.studies.compare.pattern_table` output.
        ax: Optional axes (one per pattern, as an array), else a grid is made.
    """
    pats = list(dict.fromkeys(table["pattern"]))
    if ax is None:
        ncols = min(3, len(pats))
        nrows = -(-len(pats) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 0.5 * table["family"].nunique() * nrows + 1.8
                                                         * nrows), constrained_layout=True, squeeze=False)
        axes = axes.ravel()
        for extra in axes[len(pats):]:
            extra.set_visible(False)
    else:
        axes = np.atleast_1d(ax)
        fig = axes[0].figure
    colours = {"holds": "#2ca02c", "fails": "#d62728", "unclear": "#7f7f7f", "universal": "#2ca02c",
               "none": "#d62728", "some families": "#ff7f0e", "explained by null": "#9467bd"}
    has_null = "null_statistic" in table.columns
    for a, pid in zip(axes, pats):
        t = table[table["pattern"] == pid].reset_index(drop=True)
        y = np.arange(len(t))[::-1]
        labels = []
        for yi, r in zip(y, t.itertuples(index=False)):
            c = colours.get(r.verdict, "black")
            if has_null and np.isfinite(r.null_statistic):
                a.plot([r.null_ci_low, r.null_ci_high], [yi - 0.28] * 2, color="#555555", lw=1.2)
                a.plot([r.null_statistic], [yi - 0.28], marker="x", color="#555555", ms=6, ls="none")
            if has_null and "shuffled_statistic" in t.columns and np.isfinite(r.shuffled_statistic):
                a.plot([r.shuffled_statistic], [yi - 0.28], marker="s", mfc="none", mec="#1f77b4", ms=6, ls="none")
            a.plot([r.ci_low, r.ci_high], [yi, yi], color=c, lw=2.5)
            a.plot([r.statistic], [yi], marker="D" if r.family == "all" else "o", color=c, ms=6)
            vs = f" · null: {r.vs_null}" if has_null and r.vs_null else ""
            labels.append(f"{r.family} · {r.verdict}{vs}")
        a.axvline(t["threshold"].iloc[0], color="black", ls="--", lw=1)
        a.set_yticks(y, labels, fontsize=8)
        a.set_ylim(-0.7, len(t) - 0.4)
        null = ""
        if has_null and t["null"].astype(bool).any():
            null = f"; × null: {' / '.join(dict.fromkeys(n for n in t['null'] if n and ' / ' not in n))}"
            if "shuffled_statistic" in t.columns and np.isfinite(t["shuffled_statistic"]).any():
                null += "; □ shuffled answers"
        a.set_title(f"{t['name'].iloc[0]}\n({t['comparator'].iloc[0]} {t['threshold'].iloc[0]:g}{null})", fontsize=9)
        a.tick_params(axis="x", labelsize=8)
    return fig


@styled
def portability_bars(table: pd.DataFrame, ax=None):
    """Efficacy of an adapter on its own base, ported to other bases, and re-trained there (bars per family).

    Args:
        table: Rows of :func:`lora_lens.studies.compare.portability` (one or more families concatenated).
        ax: Optional axes.
    """
    fig, ax = _axes(ax, size=(max(6.0, 2.2 * table["family"].nunique() + 3), 4.0))
    t = table.assign(setting=table["target"] + " · " + table["how"], label=table["family"])
    order = list(dict.fromkeys(t["setting"]))
    sns.barplot(t, x="label", y="efficacy", hue="setting", hue_order=order, ax=ax,
                palette=sns.color_palette("Set2", len(order)))
    for container in ax.containers:
        ax.bar_label(container, fmt="%.2f", fontsize=8, padding=2)
    ax.set(ylim=(0, 1.15), xlabel="", ylabel="efficacy (edited facts answered)",
           title="Does the adapter still work on another base of its family?")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(3, len(order)), frameon=False)
    return fig


@styled
def intruder_curves(counts: pd.DataFrame, epsilon: float = 0.5, ax=None):
    """Intruder dimensions against the similarity threshold ε, one line per adapter (Shuttleworth et al. 2024).

    Args:
        counts: Long table with columns ``adapter``, ``epsilon`` and ``intruders`` (summed over modules).
        epsilon: The threshold used elsewhere, marked by a vertical line.
        ax: Optional axes.
    """
    fig, ax = _axes(ax, size=(6.0, 3.8))
    sns.lineplot(counts, x="epsilon", y="intruders", hue="adapter", marker="o", ax=ax)
    ax.axvline(epsilon, color="grey", ls="--", lw=1)
    ax.text(epsilon, ax.get_ylim()[1] * 0.95, f" ε = {epsilon}", color="grey", va="top", fontsize=9)
    ax.set(xlabel="ε (a top-10 singular vector of W+ΔW is an intruder if max |cos| with W's is below ε)",
           ylabel="intruder dimensions (all modules)", title="Intruder dimensions against the threshold")
    ax.xaxis.label.set_fontsize(9)
    return fig


@styled
def match_vs_chance(table: pd.DataFrame, ax=None):
    """Share of edited values found among the top tokens of the leading directions, against its chance level.

    Args:
        table: Columns ``top`` (tokens per direction and sign), ``scope`` (which modules were read), ``match``
            (share of edited values among the tokens) and ``chance`` (the share expected if the edited values
            were random values of their relations).
        ax: Optional axes.
    """
    fig, ax = _axes(ax, size=(6.2, 4.0))
    palette = dict(zip(table["scope"].unique(), sns.color_palette("tab10")))
    for scope, g in table.groupby("scope", sort=False):
        g = g.sort_values("top")
        ax.plot(g["top"], g["match"], marker="o", color=palette[scope], lw=2, label=f"{scope}: edited values found")
        ax.plot(g["top"], g["chance"], ls="--", color=palette[scope], lw=1.5, label=f"{scope}: chance")
    ax.set(xscale="log", xlabel="tokens read per direction and sign (log)", ylabel="share of edited values",
           ylim=(0, 1.05), title="Reading directions: signal or a large enough net?")
    ax.set_xticks(sorted(table["top"].unique()), [str(t) for t in sorted(table["top"].unique())])
    ax.minorticks_off()
    ax.legend(fontsize=8, loc="lower right")
    return fig


@styled
def discovery_tradeoff(table: pd.DataFrame, default: float | None = None, ax=None):
    """Precision and recall of the discovered changes against the confidence a moved answer needs.

    Args:
        table: Columns ``min_confidence``, ``precision``, ``recall`` (and optionally ``r_precision``).
        default: Threshold to mark (e.g. the diff's default).
        ax: Optional axes.
    """
    fig, ax = _axes(ax, size=(6.0, 3.8))
    for col, style in (("precision", "-o"), ("recall", "-s"), ("r_precision", ":")):
        if col in table.columns:
            ax.plot(table["min_confidence"], table[col], style, lw=2, ms=4, label=col.replace("_", "-"))
    if default is not None:
        ax.axvline(default, color="grey", ls="--", lw=1)
        ax.text(default, 0.02, f" default {default:g}", color="grey", fontsize=9)
    ax.set(xlabel="confidence a moved answer needs to count as discovered", ylabel="score against the truth",
           ylim=(0, 1.05), title="Discovered changes against the planted edits")
    ax.legend(fontsize=9, loc="best")
    return fig


@styled
def token_heatmaps(attribution, ax=None):
    """Input attribution of one probe: base, adapted and difference (adapter on − off), one heatmap row each.

    Each row has its own symmetric colour scale (red raises the explained ``log p(target)`` or ``p(target)``, blue
    lowers it) and is annotated with its values, so the token that carries the *change* stands out in the difference
    row even when the base and adapted rows are dominated by other tokens; a row whose values are all below a tenth
    of the largest value of the three stays pale.

    Args:
        attribution: A :class:`lora_lens.lens.attribution.TokenAttribution`.
        ax: Optional sequence of three matplotlib axes (base, adapted, difference).
    """
    rows = {"base": attribution.base, "adapted": attribution.adapted, "difference": attribution.difference}
    if ax is None:
        fig, axes = plt.subplots(3, 1, figsize=(max(5.0, 1.0 + 0.9 * len(attribution.tokens)), 3.6),
                                 constrained_layout=True)
    else:
        axes = list(ax)
        fig = axes[0].figure
    overall = max(float(np.abs(np.asarray(v, dtype=float)).max()) for v in rows.values())
    for a, (name, values) in zip(axes, rows.items()):
        v = np.asarray(values, dtype=float)[None, :]
        lim = max(float(np.abs(v).max()), 0.1 * overall, 1e-9)  # a row of near-zeros stays pale
        sns.heatmap(v, annot=True, fmt=".2f", cmap="RdBu_r", vmin=-lim, vmax=lim, ax=a, cbar=False,
                    xticklabels=attribution.tokens, yticklabels=[name], linewidths=0.5, annot_kws={"fontsize": 8})
        a.tick_params(axis="y", rotation=0)
        a.tick_params(axis="x", rotation=0)
    if getattr(attribution, "output", "logprob") == "prob":
        change = f"p {np.exp(attribution.logp_base):.2f} → {np.exp(attribution.logp_adapted):.2f}, attribution of p"
    else:
        change = f"log p {attribution.logp_base:.2f} → {attribution.logp_adapted:.2f}"
    compared = "vs reference prompts" if getattr(attribution, "references", None) else "vs a blank token"
    axes[0].set_title(f"{attribution.prompt!r} → {attribution.target!r}  ({change}; {compared})", fontsize=10)
    return fig


@styled
def component_heatmap(attribution: pd.DataFrame, components, behaviour: str, title: str | None = None, ax=None):
    """Module type × layer heatmap of one behaviour's component attribution (module grain).

    Args:
        attribution: From :func:`lora_lens.lens.attribution.component_attribution` at module grain.
        components: The :class:`~lora_lens.lens.attribution.ComponentSet` it is indexed by.
        behaviour: The column to draw (e.g. ``"efficacy"``).
        title: Figure title (default: the behaviour and the attribution method).
        ax: Optional matplotlib axes.
    """
    table = components.table().join(attribution[[behaviour]])
    lim = max(float(table[behaviour].abs().max()), 1e-9)
    method = attribution.attrs.get("method", "")
    return layer_heatmap(table, behaviour, title=title or f"{behaviour} ({method})", cmap="RdBu_r",
                         vmin=-lim, vmax=lim, label="attribution", ax=ax)


@styled
def deletion_curves(curve: pd.DataFrame, k: int | None = None, ax=None):
    """Share of a behaviour's effect removed by switching off the top-k components vs k random ones.

    Args:
        curve: From :func:`lora_lens.lens.attribution.deletion_curve`.
        k: A chosen k to mark with a vertical line.
        ax: Optional matplotlib axes.
    """
    fig, ax = _axes(ax)
    ax.plot(curve["k"], curve["topk_removed"], marker="o", label="top-k attributed")
    ax.plot(curve["k"], curve["random_removed"], marker="s", color="grey", label="k random")
    ax.fill_between(curve["k"], curve["random_removed"] - curve["random_std"],
                    curve["random_removed"] + curve["random_std"], color="grey", alpha=0.2)
    ax.axhline(0.8, ls=":", color="black", lw=1)
    if k is not None:
        ax.axvline(k, ls="--", color="C3", lw=1, label=f"k = {k}")
    ax.set(xlabel="components switched off (k)", ylabel="share of the effect removed",
           title=f"deletion curve: {curve.attrs.get('behaviour', '')}")
    ax.legend()
    return fig
