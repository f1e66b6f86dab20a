"""``lora-lens inspect``: a report on any PEFT LoRA adapter of a causal LM — weight space, vocabulary, behaviour.

:func:`inspect_adapter` loads the base (``--base`` or the adapter's ``base_model_name_or_path``) and the adapter
(with :func:`lora_lens.lab.adapters.load_adapter`'s checks), then gathers:

* the adapter's configuration;
* weight space (:mod:`lora_lens.lens.delta`): energy per module type and per layer, the modules with the largest
  ‖ΔW‖_F, effective and stable rank, amplification, intruder dimensions, and the leading write-side directions
  read as tokens;
* behaviour (:mod:`lora_lens.lens.diff`): for a lora_lens zoo base (its folder holds ``world.jsonl``) the diff over the
  world's whole query space, in words, scored against the planted truth when the task can be rebuilt; for any
  model with a prompt file, diff mining (prompts and token positions with the largest KL(base‖adapted)).

:class:`InspectReport` renders it as text (:meth:`~InspectReport.text`), JSON (:meth:`~InspectReport.to_json`) and
a standalone HTML page with figures embedded as base64 PNG (:meth:`~InspectReport.html`); :func:`write_report`
writes ``report.json`` and ``report.html`` atomically.

Example:
    >>> report = inspect_adapter("out/adapters/fact_edit", prompts=["Dasur lives in"])   # doctest: +SKIP
    >>> print(report.text())                                                              # doctest: +SKIP
    >>> write_report(report, "inspect-fact_edit")                                        # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lora_lens.errors import ConfigError, LoraLensError, MismatchError, NotFoundError

REPORT_FILES = ("report.json", "report.html")
CONFIG_KEYS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init_lora_weights", "target_modules",
               "modules_to_save", "fan_in_fan_out", "bias", "rank_pattern", "alpha_pattern", "task_type",
               "base_model_name_or_path", "peft_version")


# ---------------------------------------------------------------------------------------------------------------
# the report


@dataclass(eq=False)
class InspectReport:
    """Everything ``lora-lens inspect`` found about one adapter.

    Attributes:
        adapter_dir: The adapter folder.
        base: The base model (name or path) it was loaded on.
        config: The adapter's ``adapter_config.json`` entries of interest (:data:`CONFIG_KEYS`).
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
                    "discovered": _records(self.diff[self.diff["discovered"]])},
                "score": self.score, "triggers": None if self.triggers is None else _records(self.triggers),
                "semantic_report": self.semantic,
                "mining": None if self.mining is None else {
                    "prompts": _records(self.mining.prompts), "positions": _records(self.mining.positions),
                    "promoted": self.mining.promoted, "suppressed": self.mining.suppressed},
                "promoted": self.promoted(), "suppressed": self.suppressed()},
            "notes": self.notes}
        return _clean(out)

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
            out += ["Behaviour over the world's query space"] + ["  " + s for s in self.semantic[:3 * n + 10]] + [""]
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
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots()


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
        from matplotlib.ticker import MaxNLocator

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
# building the report


def _resolve_base(adapter_dir: Path, config: dict, base) -> str:
    if base:
        return str(base)
    name = config.get("base_model_name_or_path")
    if not name and (adapter_dir / "lora_lens_manifest.json").is_file():
        from lora_lens.lab.adapters import read_manifest

        name = (read_manifest(adapter_dir).get("base") or {}).get("path")
    if not name:
        raise ConfigError(f"{adapter_dir}/adapter_config.json does not name its base model "
                          "(base_model_name_or_path is empty): pass --base NAME_OR_PATH")
    return str(name)


def _zoo_world(base: str, notes: list[str]):
    """The world of a lora_lens zoo base (its folder holds world.jsonl), else None."""
    from lora_lens.lab.world import World

    path = Path(base).expanduser() / "world.jsonl"
    if not path.is_file():
        return None
    try:
        return World.load(path)
    except LoraLensError as exc:
        notes.append(f"the base folder has a world.jsonl that cannot be read ({exc}); no world diff")
        return None


def _find_task(adapter_dir: Path, manifest: dict | None, world, task, notes: list[str]):
    """``(task or None, info or None)``: an explicit task file, ADAPTER_DIR/task.jsonl, or the manifest's record."""
    from lora_lens.lab.world import Task, check_task_world, make_task

    def load(path: Path, source: str):
        try:
            t = Task.load(path)
        except LoraLensError as exc:
            raise ConfigError(f"task file {path} cannot be read ({exc}): pass a file written by "
                              "task.save(path)") from exc
        check_task_world(t, world)
        return t, {"name": t.name, "source": source}

    if task is not None:
        if isinstance(task, Task):
            check_task_world(task, world)
            return task, {"name": task.name, "source": "argument"}
        path = Path(task).expanduser()
        if not path.is_file():
            raise NotFoundError(f"task file {path} does not exist: pass a file written by task.save(path)")
        return load(path, str(path))
    if (adapter_dir / "task.jsonl").is_file():
        return load(adapter_dir / "task.jsonl", str(adapter_dir / "task.jsonl"))
    info = (manifest or {}).get("task") or {}
    name = info.get("name")
    if not name:
        notes.append("the adapter records no task: the diff covers the world's whole query space, unscored")
        return None, None
    if info.get("world_fingerprint") and info["world_fingerprint"] != world.fingerprint():
        notes.append(f"the manifest's task {name!r} belongs to world {info['world_fingerprint']}, not to the base's "
                     f"world {world.fingerprint()}: not scored")
        return None, None
    if "seed" in info:
        t = make_task(world, name, seed=info["seed"], **(info.get("kwargs") or {}))
        return t, {"name": name, "source": f"make_task(world, {name!r}, seed={info['seed']})"}
    notes.append(f"the manifest names task {name!r} but not its seed or arguments, so its planted truth cannot be "
                 "rebuilt: the diff covers the world's whole query space, unscored. To score it, save the task next "
                 "to the adapter (task.save(ADAPTER_DIR/'task.jsonl')) or pass --task FILE")
    return None, {"name": name, "source": "manifest (not rebuilt)"}


def check_out_dir(out: str | Path) -> Path:
    """Validate a report folder before anything is computed: absent, empty, or holding only a previous report.

    Raises:
        ConfigError: ``out`` is a file, or a folder with other files (refused rather than mixed with a report).
    """
    out = Path(out).expanduser()
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out} is a file: choose a folder for report.json and report.html")
        other = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES and not p.name.startswith("."))
        if other:
            raise ConfigError(f"--out {out} already holds other files ({', '.join(other[:3])}"
                              f"{' …' if len(other) > 3 else ''}): refusing to write a report there; choose a new "
                              "or empty folder (a folder with only a previous report.json/report.html is replaced)")
    return out


def default_out_dir(adapter_dir: str | Path) -> Path:
    """``./inspect-<adapter folder name>/`` in the current directory."""
    return Path.cwd() / f"inspect-{Path(adapter_dir).expanduser().resolve().name}"


def inspect_adapter(adapter_dir: str | Path, base: str | Path | None = None, prompts=None, task=None, top: int = 10,
                    device: str = "cpu", batch_size: int = 64) -> InspectReport:
    """Load an adapter on its base and gather the weight-space and behaviour report.

    Works on any PEFT LoRA adapter of a causal LM. Inputs are checked before the model is loaded (the adapter's
    config and weights file, the prompt file), and the adapter is loaded with
    :func:`lora_lens.lab.adapters.load_adapter`, whose checks turn a base of another architecture or size into an
    error.

    Args:
        adapter_dir: A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        base: The base model (hub name or local folder); default: the adapter's ``base_model_name_or_path``.
            Loaded with :func:`lora_lens.lab.zoo.load_model` (``HF_HUB_OFFLINE=1`` is honoured).
        prompts: A prompt file path (see :func:`lora_lens.lens.diff.read_prompts`) or a list of prompts, for diff
            mining.
        task: A :class:`lora_lens.lab.world.Task` or a task file to score against; default: ``ADAPTER_DIR/task.jsonl``
            or a task the manifest records with its seed.
        top: Rows of the short tables (modules, prompts, positions, tokens).
        device: Torch device.
        batch_size: Prompts per forward pass.

    Returns:
        An :class:`InspectReport`.

    Raises:
        NotFoundError: No adapter folder, config, weights file, base model or prompt file.
        ConfigError: Not a LoRA adapter, no base named, bad prompt file, bad ``top``.
        MismatchError: The base does not fit the adapter (architecture, shapes, weights), or a task of another
            world.
        CorruptError: Damaged adapter files.
    """
    from lora_lens.lab.adapters import WEIGHTS, load_adapter, read_config, read_manifest
    from lora_lens.lab.zoo import load_model
    from lora_lens.lens import delta
    from lora_lens.lens.diff import (behaviour_diff, detect_triggers, mine_prompts, read_prompts, score_against_truth,
                                     semantic_report)

    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ConfigError(f"top={top!r} must be a positive integer, e.g. 10")
    folder = Path(adapter_dir).expanduser()
    config = read_config(folder)
    if not (folder / WEIGHTS).is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ConfigError(f"{folder} holds only pickled weights (adapter_model.bin), which lora_lens does not "
                              "load: re-save it with peft_model.save_pretrained(dir, safe_serialization=True)")
        raise NotFoundError(f"{folder} has no {WEIGHTS}: the adapter's weights file is missing; save the adapter "
                            "again (peft_model.save_pretrained(dir))")
    if prompts is not None and isinstance(prompts, (str, Path)):
        prompts = read_prompts(prompts)
    elif prompts is not None:
        prompts = list(prompts)
    manifest = read_manifest(folder) if (folder / "lora_lens_manifest.json").is_file() else None
    base_name = _resolve_base(folder, config, base)
    notes: list[str] = []

    model, tokenizer = load_model(base_name, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pm = load_adapter(model, folder)
        except MismatchError as exc:
            raise MismatchError(f"the base {base_name} does not fit adapter {folder}: {exc}") from exc
        summary = delta.summary(pm)
    notes += sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)
                     and "fan_in_fan_out" not in str(w.message)})
    hf = pm.get_base_model()
    model_info = {"architecture": (getattr(hf.config, "architectures", None) or [type(hf).__name__])[0],
                  "model_type": getattr(hf.config, "model_type", None),
                  "n_params": int(sum(p.numel() for n, p in pm.named_parameters() if "lora_" not in n)),
                  "lora_params": int(sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n))}
    try:
        directions = delta.directions_table(pm, tokenizer, k=1, top=top, role="write", sign="both")
    except LoraLensError as exc:
        directions = pd.DataFrame()
        notes.append(f"write-side directions could not be read as tokens: {exc}")
    report = InspectReport(
        adapter_dir=str(folder), base=base_name, config={k: config.get(k) for k in CONFIG_KEYS if k in config},
        model=model_info,
        manifest=None if manifest is None else {k: manifest.get(k) for k in ("task", "spec", "metrics", "base")},
        summary=summary, energy_layer=delta.energy_by(summary, "layer"),
        energy_type=delta.energy_by(summary, "module_type"), energy_depth=delta.energy_by(summary, "depth_bin"),
        amplification=delta.amplification(summary), directions=directions, notes=notes, top=top)

    world = _zoo_world(base_name, notes)
    if world is not None:
        task_obj, report.task = _find_task(folder, manifest, world, task, notes)
        relations = list(world.relations)
        if (task_obj is not None and task_obj.name == "new_relation") or (report.task or {}).get("name") == \
                "new_relation":
            relations.append("birthplace")
        report.diff = behaviour_diff(pm, tokenizer, world=world, batch_size=batch_size, relations=relations,
                                     top_k=top)
        report.triggers = detect_triggers(report.diff)
        report.semantic = semantic_report(report.diff, world, task_obj, max_lines=3 * top)
        if task_obj is not None:
            report.score = score_against_truth(report.diff, task_obj)
    elif task is not None:
        notes.append(f"--task was given but the base {base_name} is not a lora_lens zoo model (no world.jsonl): "
                     "not scored")
    if prompts is not None:
        report.mining = mine_prompts(pm, tokenizer, prompts, top=top, batch_size=min(batch_size, 16), top_k=top)
    if world is None and prompts is None:
        notes.append("no behaviour probes: the base is not a lora_lens zoo model, so pass --prompts FILE (one prompt "
                     "per line) for diff mining")
    return report


def write_report(report: InspectReport, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``out_dir``, each atomically (temp file, then rename).

    Raises:
        ConfigError: ``out_dir`` is a file or holds other files (see :func:`check_out_dir`).
    """
    from lora_lens.utils import write_json

    out = check_out_dir(out_dir)
    page = report.html()
    data = report.to_json()
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_json(out / "report.json", data)
    html_path = out / "report.html"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".report.html.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, html_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    mask = os.umask(0)
    os.umask(mask)
    for path in (json_path, html_path):     # temp files are private; a report reads like any other file
        os.chmod(path, 0o666 & ~mask)
    return json_path, html_path


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
