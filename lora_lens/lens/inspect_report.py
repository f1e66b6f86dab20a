"""The ``lora-lens inspect`` report and its renderings: text, JSON, a standalone HTML page with figures
(:class:`InspectReport`), and the report's figures (:func:`plot_energy`, :func:`plot_spectra`: each takes an
optional ``ax=`` and returns the figure; no global theme is set).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lora_lens.figures import styled

__all__ = ["InspectReport", "plot_energy", "plot_spectra"]


# ---------------------------------------------------------------------------------------------------------------
# the report


@dataclass(eq=False)
class InspectReport:
    """Everything ``lora-lens inspect`` found about one adapter.

    Attributes:
        adapter_dir: The adapter folder.
        base: The base model (name or path) it was loaded on.
        config: The adapter's ``adapter_config.json`` entries of interest (:data:`lora_lens.lens.inspect_adapter.CONFIG_KEYS`).
        model: ``architecture``, ``model_type``, ``n_params`` of the base, ``lora_params`` of the adapter.
        manifest: The lora_lens manifest's ``task``/``spec``/``metrics`` (None for a plain PEFT adapter).
        summary: :func:`lora_lens.lens.delta.summary` (one row per adapted module).
        energy_layer, energy_type, energy_depth: :func:`lora_lens.lens.delta.energy_by` per layer / module type /
            relative-depth bin.
        amplification: Pooled amplification factor (:func:`lora_lens.lens.delta.amplification`).
        directions: :func:`lora_lens.lens.delta.directions_table` for the write-side modules (may be empty).
        diff: The behaviour diff over the world's query space (None without a world).
        score: :func:`lora_lens.lens.diff.score_against_truth` (None without a task).
        triggers: :func:`lora_lens.lens.diff.detect_triggers` (None without a world).
        semantic: :func:`lora_lens.lens.diff.semantic_report` lines (empty without a world).
        mining: :class:`lora_lens.lens.diff.Mining` over the prompt file (None without prompts).
        task: How the task was found (``{"name", "source"}``) or None.
        notes: Things the reader should know (warnings, what could not be done and why).
        top: How many rows the short tables show.
    """

    adapter_dir: str
    base: str
    config: dict
    model: dict
    manifest: dict | None
    summary: pd.DataFrame
    energy_layer: pd.DataFrame
    energy_type: pd.DataFrame
    energy_depth: pd.DataFrame
    amplification: float
    directions: pd.DataFrame
    diff: pd.DataFrame | None = None
    score: dict | None = None
    triggers: pd.DataFrame | None = None
    semantic: list[str] = field(default_factory=list)
    mining: object | None = None
    task: dict | None = None
    notes: list[str] = field(default_factory=list)
    top: int = 10

    # ---- derived tables

    def module_types(self) -> pd.DataFrame:
        """Energy share, module count, mean effective rank and intruders per module type."""
        s = self.summary
        agg = s.groupby("module_type", sort=True).agg(
            n_modules=("module", "count"), mean_rank=("rank", "mean"), mean_effective_rank=("effective_rank", "mean"),
            mean_rel_fro=("rel_fro", "mean"), intruders=("intruders", "sum")).reset_index()
        return self.energy_type[["module_type", "share"]].merge(agg, on="module_type")

    def top_modules(self, n: int | None = None) -> pd.DataFrame:
        """The ``n`` modules with the largest ‖ΔW‖_F."""
        cols = ["module", "module_type", "layer", "rank", "fro", "rel_fro", "spec", "effective_rank", "stable_rank",
                "amplification", "intruders", "energy_share"]
        return self.summary.sort_values("fro", ascending=False)[cols].head(n or self.top).reset_index(drop=True)

    def promoted(self) -> list[tuple[str, float]]:
        """Promoted tokens: from the world diff when there is one, else from diff mining."""
        if self.diff is not None and self.diff.attrs.get("promoted"):
            return list(self.diff.attrs["promoted"])
        return list(self.mining.promoted) if self.mining is not None else []

    def suppressed(self) -> list[tuple[str, float]]:
        """Suppressed tokens (see :meth:`promoted`)."""
        if self.diff is not None and self.diff.attrs.get("suppressed"):
            return list(self.diff.attrs["suppressed"])
        return list(self.mining.suppressed) if self.mining is not None else []

    def direction_words(self, n: int | None = None) -> pd.DataFrame:
        """Top tokens of the leading direction of the ``n`` most energetic write-side modules, one row per sign."""
        d = self.directions
        if d is None or d.empty:
            return pd.DataFrame(columns=["module", "sigma", "sign", "tokens"])
        order = self.summary.sort_values("energy", ascending=False)["module"].tolist()
        keep = [m for m in order if m in set(d["module"])][:n or self.top]
        rows = []
        for m in keep:
            for sign, g in d[(d["module"] == m) & (d["direction"] == 0)].groupby("sign", sort=True):
                g = g.sort_values("rank")
                rows.append({"module": m, "sigma": float(g["sigma"].iloc[0]), "sign": sign,
                             "tokens": " ".join(str(t) for t in g["token"].head(8))})
        return pd.DataFrame(rows, columns=["module", "sigma", "sign", "tokens"])

    # ---- renderings

    def to_json(self) -> dict:
        """The full report as a JSON-ready dict (NaN → null)."""
        s = self.summary
        out = {
            "format": "lora_lens.lens.inspect_adapter", "version": 1, "adapter_dir": self.adapter_dir, "base": self.base,
            "config": self.config, "model": self.model, "manifest": self.manifest, "task": self.task,
            "weights": {
                "modules": _records(s), "energy_by_layer": _records(self.energy_layer),
                "energy_by_module_type": _records(self.energy_type), "energy_by_depth": _records(self.energy_depth),
                "amplification": self.amplification, "intruders": int(s["intruders"].clip(lower=0).sum()),
                "mean_effective_rank": float(s["effective_rank"].mean()), "directions": _records(self.directions)},
            "behaviour": {
                "diff": None if self.diff is None else {
                    "n_queries": len(self.diff), "n_changed": int(self.diff["changed"].sum()),
                    "n_discovered": int(self.diff["discovered"].sum()),
                    "min_confidence": self.diff.attrs.get("min_confidence"),
                    "discovered": _records(self.diff[self.diff["discovered"]]),
                    "source": self.diff.attrs.get("source"), "answers": _records(self.answers())},
                "score": self.score, "triggers": None if self.triggers is None else _records(self.triggers),
                "semantic_report": self.semantic,
                "mining": None if self.mining is None else {
                    "prompts": _records(self.mining.prompts), "positions": _records(self.mining.positions),
                    "promoted": self.mining.promoted, "suppressed": self.mining.suppressed},
                "promoted": self.promoted(), "suppressed": self.suppressed()},
            "notes": self.notes}
        return _clean(out)

    @property
    def from_task(self) -> bool:
        """Whether the behaviour diff is over a task's probes (any model, full answers)."""
        return self.diff is not None and self.diff.attrs.get("source") == "task"

    def answers(self) -> pd.DataFrame:
        """A task diff's probes with the base's and the adapted model's full answers (empty without one)."""
        cols = ["set", "prompt", "expected", "base_answer", "adapted_answer", "changed", "p_expected_base",
                "p_expected_adapted"]
        if not self.from_task:
            return pd.DataFrame(columns=cols)
        return self.diff[cols].reset_index(drop=True)

    def text(self) -> str:
        """A concise plain-text report (tables) for the terminal."""
        n = self.top
        out = [f"lora-lens inspect: {self.adapter_dir}", f"base: {self.base} ({self.model.get('architecture')}, "
               f"{self.model.get('n_params'):,} parameters; adapter {self.model.get('lora_params'):,} LoRA parameters "
               f"in {len(self.summary)} modules)", ""]
        cfg = {k: v for k, v in self.config.items() if v not in (None, {}, [], "") and k != "base_model_name_or_path"}
        out += ["Adapter config", _text_table(pd.DataFrame([{"key": k, "value": _short(v)} for k, v in cfg.items()])),
                ""]
        if self.manifest and self.manifest.get("task"):
            out += [f"Trained by lora_lens on task {self.manifest['task'].get('name')!r}", ""]
        out += ["Weight space: energy (‖ΔW‖_F²) per module type", _text_table(self.module_types()), "",
                "Energy per layer", _text_table(self.energy_layer), "",
                f"Top {n} modules by ‖ΔW‖_F", _text_table(self.top_modules()), "",
                f"Amplification (pooled ‖ΔW‖_F / ‖UᵀWVᵀ‖_F): {_num(self.amplification)}; intruder dimensions: "
                f"{int(self.summary['intruders'].clip(lower=0).sum())}; mean effective rank: "
                f"{_num(self.summary['effective_rank'].mean())}", ""]
        words = self.direction_words(min(n, 6))
        if len(words):
            out += ["Leading write-side directions read as tokens", _text_table(words), ""]
        if self.semantic:
            title = ("Behaviour on the task's probes (full answers: greedy continuations, base vs adapted)"
                     if self.from_task else "Behaviour over the world's query space")
            out += [title] + ["  " + s for s in self.semantic[:3 * n + 10]] + [""]
        if self.from_task:
            out += ["Full answers per probe (base vs adapted)", _text_table(self.answers()), ""]
        if self.score is not None:
            keys = ["precision", "recall", "f1", "r_precision", "value_accuracy", "specificity", "true_positives",
                    "false_positives", "false_negatives"]
            out += [f"Against the planted truth ({self.score['task']}, rule {self.score['rule']})",
                    _text_table(pd.DataFrame([{k: self.score[k] for k in keys}])), ""]
        if self.mining is not None:
            cols = ["prompt", "n_tokens", "mean_kl", "max_kl", "next_kl", "base_next", "adapted_next"]
            out += [f"Diff mining: prompts by largest KL(base‖adapted) (top {n})",
                    _text_table(self.mining.prompts[cols].head(n)), "",
                    f"Token positions with the largest KL (top {n})",
                    _text_table(self.mining.positions[["context", "actual", "kl", "base_top", "adapted_top",
                                                       "promoted", "suppressed"]].head(n)), ""]
            # (the world diff's promoted / suppressed tokens are in the semantic report above)
            if self.mining.promoted:
                out.append("Promoted at those positions: " + ", ".join(f"{t} (+{v:.2f})"
                                                                      for t, v in self.mining.promoted[:n]))
            if self.mining.suppressed:
                out.append("Suppressed at those positions: " + ", ".join(f"{t} ({v:.2f})"
                                                                        for t, v in self.mining.suppressed[:n]))
        if self.notes:
            out += ["", "Notes"] + [f"  - {s}" for s in self.notes]
        return "\n".join(out).rstrip() + "\n"

    def figures(self) -> dict:
        """The report's figures: ``{"energy_by_depth", "energy_by_module_type", "spectra"}`` → matplotlib Figure."""
        return {"energy_by_depth": plot_energy(self.energy_layer, "layer"),
                "energy_by_module_type": plot_energy(self.energy_type, "module_type"),
                "spectra": plot_spectra(self.summary, top=self.top)}

    def html(self) -> str:
        """A standalone HTML page (figures as base64 PNG, every text escaped)."""
        e = html.escape
        n = self.top
        parts = [f"<h1>lora-lens inspect: {e(self.adapter_dir)}</h1>",
                 f"<p>Base <code>{e(self.base)}</code> ({e(str(self.model.get('architecture')))}, "
                 f"{self.model.get('n_params'):,} parameters); adapter: {self.model.get('lora_params'):,} LoRA "
                 f"parameters in {len(self.summary)} modules.</p>",
                 "<h2>Adapter config</h2>",
                 _html_table(pd.DataFrame([{"key": k, "value": _short(v, 200)} for k, v in self.config.items()]))]
        if self.manifest:
            parts += ["<h2>lora_lens manifest</h2>", f"<pre>{e(json.dumps(_clean(self.manifest), indent=1))}</pre>"]
        parts += ["<h2>Weight space</h2>",
                  f"<p>Amplification (pooled): {e(_num(self.amplification))}; intruder dimensions: "
                  f"{int(self.summary['intruders'].clip(lower=0).sum())}; mean effective rank: "
                  f"{e(_num(self.summary['effective_rank'].mean()))}.</p>"]
        for name, fig in self.figures().items():
            parts.append(f'<figure><img alt="{e(name)}" src="data:image/png;base64,{_png(fig)}">'
                         f"<figcaption>{e(name.replace('_', ' '))}</figcaption></figure>")
        parts += ["<h3>Energy per module type</h3>", _html_table(self.module_types()),
                  "<h3>Energy per layer</h3>", _html_table(self.energy_layer),
                  "<h3>Energy per relative depth</h3>", _html_table(self.energy_depth),
                  f"<h3>Top {n} modules by ‖ΔW‖<sub>F</sub></h3>", _html_table(self.top_modules()),
                  "<h3>All modules</h3>",
                  _html_table(self.summary.drop(columns=["singular_values"]))]
        words = self.direction_words()
        if len(words):
            parts += ["<h3>Leading write-side directions read as tokens</h3>", _html_table(words)]
        parts.append("<h2>Behaviour</h2>")
        if self.semantic:
            parts.append("<ul>" + "".join(f"<li>{e(s)}</li>" for s in self.semantic) + "</ul>")
        if self.from_task:
            parts += ["<h3>Full answers per probe (greedy continuations, base vs adapted)</h3>",
                      _html_table(self.answers())]
        if self.score is not None:
            keys = ["task", "rule", "precision", "recall", "f1", "r_precision", "value_accuracy", "specificity",
                    "true_positives", "false_positives", "false_negatives", "n_truth", "n_discovered", "n_scored"]
            parts += ["<h3>Against the planted truth</h3>", _html_table(pd.DataFrame([{k: self.score[k]
                                                                                       for k in keys}]))]
        if self.triggers is not None and len(self.triggers):
            parts += ["<h3>Trigger-like effects</h3>", _html_table(self.triggers)]
        if self.diff is not None:
            cols = ["prompt", "base_answer", "adapted_answer", "p_adapted", "confidence", "kl"]
            parts += ["<h3>Discovered changes</h3>", _html_table(self.diff[self.diff["discovered"]]
                                                                 .sort_values("confidence", ascending=False)[cols])]
        if self.mining is not None:
            parts += ["<h3>Diff mining: prompts by largest KL(base‖adapted)</h3>", _html_table(self.mining.prompts),
                      "<h3>Token positions with the largest KL</h3>", _html_table(self.mining.positions)]
        for title, toks in (("Promoted tokens", self.promoted()), ("Suppressed tokens", self.suppressed())):
            if toks:
                parts += [f"<h3>{title}</h3>", _html_table(pd.DataFrame(toks, columns=["token", "mean change"]))]
        if self.notes:
            parts += ["<h2>Notes</h2>", "<ul>" + "".join(f"<li>{e(s)}</li>" for s in self.notes) + "</ul>"]
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;font-size:12px;margin:.5em 0}"
                 "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}th{background:#f3f3f3}"
                 "figure{display:inline-block;margin:.5em}img{max-width:520px}pre{background:#f7f7f7;padding:.5em;"
                 "overflow:auto}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>lora-lens inspect: "
                f"{e(Path(self.adapter_dir).name)}</title><style>{style}</style></head><body>\n"
                + "\n".join(parts) + "\n</body></html>\n")


# ---------------------------------------------------------------------------------------------------------------
# figures


def _new_axes(ax, size=(6.4, 3.6)):
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots()


@styled
def plot_energy(energy: pd.DataFrame, by: str = "layer", ax=None):
    """Bar chart of the share of update energy per layer (relative depth) or module type.

    Args:
        energy: :func:`lora_lens.lens.delta.energy_by` output.
        by: Its group column (``"layer"``, ``"depth_bin"`` or ``"module_type"``).
        ax: Optional matplotlib axes.

    Returns:
        The figure.
    """
    fig, ax = _new_axes(ax)
    labels = ["none" if pd.isna(v) else str(v) for v in energy[by]]
    share = energy["share"].fillna(0.0).to_numpy(dtype=float)
    ax.bar(range(len(labels)), share, color="#4c72b0")
    ax.set_xticks(range(len(labels)), labels, rotation=45 if by == "module_type" else 0, ha="right"
                  if by == "module_type" else "center")
    title = {"layer": "Update energy by depth (layer)", "module_type": "Update energy by module type",
             "depth_bin": "Update energy by relative depth"}.get(by, f"Update energy by {by}")
    ax.set(ylabel="share of ‖ΔW‖_F²", title=title, ylim=(0, max(1e-9, float(share.max(initial=0))) * 1.1))
    return fig


@styled
def plot_spectra(summary: pd.DataFrame, top: int = 10, ax=None):
    """Singular values of ΔW for the ``top`` modules with the largest ‖ΔW‖_F (log scale).

    Args:
        summary: :func:`lora_lens.lens.delta.summary` output.
        top: Number of modules drawn.
        ax: Optional matplotlib axes.

    Returns:
        The figure.
    """
    fig, ax = _new_axes(ax, (6.4, 4.0))
    drawn = 0
    for _, row in summary.sort_values("fro", ascending=False).head(top).iterrows():
        s = np.asarray(row["singular_values"], dtype=float)
        s = s[s > 0]
        if len(s):
            ax.plot(np.arange(1, len(s) + 1), s, marker="o", ms=3, lw=1,
                    label=".".join(str(row["module"]).split(".")[-4:]))
            drawn += 1
    if drawn:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale("log")
        ax.legend(fontsize=6, loc="upper right")
    else:
        ax.text(0.5, 0.5, "ΔW = 0 everywhere", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="index i", ylabel="σᵢ(ΔW)", title=f"Singular value spectra (top {top} modules by ‖ΔW‖_F)")
    return fig


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")

# ---------------------------------------------------------------------------------------------------------------
# formatting helpers


def _clean(x):
    """JSON-ready: NaN/inf/NA → None, numpy scalars → Python, tuples → lists, keys → str."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return [_clean(v) for v in x.tolist()]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if x is None or isinstance(x, (int, str)):
        return x
    try:
        if pd.isna(x):
            return None
    except (TypeError, ValueError):
        pass
    return str(x)


def _records(df: pd.DataFrame | None) -> list[dict]:
    if df is None:
        return []
    return [_clean(r) for r in df.astype(object).to_dict("records")]


def _num(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a" if x is None or math.isnan(x) else str(x)
    if isinstance(x, (float, np.floating)):
        return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.3e}"
    return str(x)


def _short(v, limit: int = 70) -> str:
    text = v if isinstance(v, str) else json.dumps(_clean(v), ensure_ascii=False)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _cell(v) -> str:
    if isinstance(v, (list, tuple, np.ndarray)):
        return _short(list(v), 60)
    if isinstance(v, (float, np.floating)):
        return _num(float(v))
    try:
        if pd.isna(v):
            return ""
    except (TypeError, ValueError):
        pass
    return str(v)


def _text_table(df: pd.DataFrame) -> str:
    if df is None or df.empty:
        return "  (none)"
    shown = df.copy()
    for c in shown.columns:
        shown[c] = [_short(_cell(v), 60) for v in shown[c]]
    return "\n".join("  " + line for line in shown.to_string(index=False).splitlines())


def _html_table(df: pd.DataFrame) -> str:
    e = html.escape
    if df is None or df.empty:
        return "<p><em>(none)</em></p>"
    head = "".join(f"<th>{e(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{e(_cell(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

