"""ipywidgets factories over pure callbacks.

Each factory returns a widget whose ``.state`` dict holds what it currently shows, so tests (and curious users) can
set a control's ``.value`` headless and read the result. No notebook cell depends on anyone touching a widget.
"""

from __future__ import annotations

import ipywidgets as w
import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import display

from lora_lens.lab.probes import next_token_logits
from lora_lens.lab.tokenizer import token_id
from lora_lens.lens.attribution import ComponentMask
from lora_lens.workshop import plots

__all__ = ["PROBE_COLUMNS", "ablation_slider", "ablation_view", "attribution_picker", "attribution_view",
           "probe_browser", "probe_view"]

PROBE_COLUMNS = ["set", "prompt", "expected", "base_answer", "adapted_answer", "p_expected_base",
                 "p_expected_adapted", "changed"]


def probe_view(tables: dict, key, probe_set: str = "all", changed_only: bool = False, n: int = 20) -> pd.DataFrame:
    """The pure callback behind :func:`probe_browser`: probe answers of one adapter, base vs adapted.

    Args:
        tables: ``{key: DataFrame}`` of :meth:`lora_lens.lab.probes.Evaluation.table` outputs.
        key: Which adapter (a key of ``tables``).
        probe_set: A probe set name, or ``"all"``.
        changed_only: Keep only probes whose top answer changed.
        n: At most this many rows.
    """
    df = tables[key]
    if probe_set != "all":
        df = df[df["set"] == probe_set]
    if changed_only:
        df = df[df["changed"]]
    return df[[c for c in PROBE_COLUMNS if c in df.columns]].head(n).reset_index(drop=True)


def probe_browser(tables: dict, n: int = 20) -> w.VBox:
    """Pick an adapter (e.g. task × rank) and a probe set; see each probe's answer before and after the adapter.

    Args:
        tables: ``{key: DataFrame}``; keys are shown as the adapter choices (tuples are joined with " · ").
        n: Rows shown.

    Returns:
        A ``VBox``; its ``.state["table"]`` is the DataFrame on display.
    """
    keys = list(tables)
    label = {(" · ".join(map(str, k)) if isinstance(k, tuple) else str(k)): k for k in keys}
    pick = w.Dropdown(options=list(label), description="adapter")
    sets = sorted({s for t in tables.values() for s in t["set"].unique()})
    which = w.Dropdown(options=["all"] + sets, description="probe set")
    changed = w.Checkbox(value=False, description="changed answers only")
    out = w.Output()
    box = w.VBox([w.HBox([pick, which, changed]), out])
    box.state = {}

    def refresh(_=None):
        box.state["table"] = probe_view(tables, label[pick.value], which.value, changed.value, n)
        out.clear_output(wait=True)
        with out:
            display(box.state["table"])

    for control in (pick, which, changed):
        control.observe(refresh, names="value")
    refresh()
    return box


def attribution_view(attributions: list, index: int) -> pd.DataFrame:
    """The pure callback behind :func:`attribution_picker`: one probe's token attributions (base, adapted, diff).

    Args:
        attributions: :class:`lora_lens.lens.attribution.TokenAttribution` objects.
        index: Which one.
    """
    return attributions[index].frame()


def attribution_picker(attributions: list, labels: list[str] | None = None) -> w.VBox:
    """Pick a probe; see its base / adapted / difference token heatmaps.

    Args:
        attributions: :class:`lora_lens.lens.attribution.TokenAttribution` objects.
        labels: Dropdown labels (default: ``prompt → target``).

    Returns:
        A ``VBox``; ``.state`` holds ``index``, ``frame`` (the attribution table on display) and ``top`` (the
        top token of the difference).
    """
    labels = labels or [f"{a.prompt} → {a.target}" for a in attributions]
    pick = w.Dropdown(options=[(lab, i) for i, lab in enumerate(labels)], description="probe",
                      layout=w.Layout(width="90%"))
    out = w.Output()
    box = w.VBox([pick, out])
    box.state = {}

    def refresh(_=None):
        box.state.update(index=pick.value, frame=attribution_view(attributions, pick.value),
                         top=attributions[pick.value].top())
        out.clear_output(wait=True)
        with out:
            fig = plots.token_heatmaps(attributions[pick.value])
            display(fig)
            plt.close(fig)

    pick.observe(refresh, names="value")
    box.refresh = refresh
    refresh()
    return box


def ablation_view(peft_model, tokenizer, components, order: list[str], k: int, prompt: str,
                  words: list[str]) -> dict:
    """The pure callback behind :func:`ablation_slider`: switch off the first ``k`` components of ``order``.

    Args:
        peft_model: A ``peft.PeftModel``.
        tokenizer: Its tokenizer.
        components: A :class:`lora_lens.lens.attribution.ComponentSet`.
        order: Component names, most attributed first.
        k: How many to switch off.
        prompt: The prompt shown.
        words: Answers whose probabilities are shown (e.g. the new and the old answer).

    Returns:
        ``{"k", "off" (names switched off), "answer" (top next token), "probs" ({word: p})}``.
    """
    off = list(order[:k])
    names = components.names
    values = torch.tensor([0.0 if n in off else 1.0 for n in names], dtype=torch.float32)
    with ComponentMask(peft_model, components, values):
        probs = next_token_logits(peft_model, tokenizer, [prompt])[0].softmax(-1)
    answer = tokenizer.decode([int(probs.argmax())]).strip()
    return {"k": k, "off": off, "answer": answer,
            "probs": {word: float(probs[token_id(tokenizer, word)]) for word in words}}


def ablation_slider(peft_model, tokenizer, components, attribution: pd.DataFrame, behaviour: str, prompt: str,
                    words: list[str]) -> w.VBox:
    """A slider that switches off the top-k attributed components and shows the answer and probabilities live.

    Args:
        peft_model: A ``peft.PeftModel``.
        tokenizer: Its tokenizer.
        components: The :class:`lora_lens.lens.attribution.ComponentSet` the attribution is indexed by.
        attribution: From :func:`lora_lens.lens.attribution.component_attribution`.
        behaviour: The column whose top components are switched off first.
        prompt: The prompt shown.
        words: Answers whose probabilities are shown.

    Returns:
        A ``VBox``; ``.state`` is the latest :func:`ablation_view` result.
    """
    order = list(attribution[behaviour].sort_values(ascending=False).index)
    slider = w.IntSlider(value=0, min=0, max=len(order), description="top-k off")
    out = w.Output()
    box = w.VBox([w.HTML(f"<b>{prompt}</b>"), slider, out])
    box.state = {}

    def refresh(_=None):
        box.state = ablation_view(peft_model, tokenizer, components, order, slider.value, prompt, words)
        out.clear_output(wait=True)
        with out:
            print(f"answer: {box.state['answer']}   " +
                  "   ".join(f"p({k}) = {v:.3f}" for k, v in box.state["probs"].items()))
            print("off:", ", ".join(box.state["off"]) or "nothing")

    slider.observe(refresh, names="value")
    box.refresh = refresh
    refresh()
    return box


# ------------------------------------------------------------------ one widget per analysis notebook 02, 04, 05, 06
def _show_in(out: w.Output, *items) -> None:
    """Replace ``out``'s content with ``items`` (figures are closed after display)."""
    import matplotlib.pyplot as plt

    out.clear_output(wait=True)
    with out:
        for item in items:
            display(item)
            if isinstance(item, plt.Figure):
                plt.close(item)


def module_view(summ: pd.DataFrame, dirs: pd.DataFrame, module: str, top: int = 8) -> dict:
    """The pure callback behind :func:`module_explorer`: one module's spectrum and its directions read as words.

    Args:
        summ: :func:`lora_lens.lens.delta.summary` of the adapter.
        dirs: :func:`lora_lens.lens.delta.directions_table` of the same adapter.
        module: A module name of ``summ``.
        top: Tokens shown per direction and sign.

    Returns:
        ``{"module", "singular_values", "effective_rank", "stable_rank", "energy_share", "words"}``; ``words`` is a
        DataFrame (direction, sign, tokens), empty for a module whose directions were not read (a read-side one).
    """
    row = summ.set_index("module").loc[module]
    d = dirs[(dirs["module"] == module) & (dirs["rank"] < top)]
    words = (d.groupby(["direction", "sign"])["token"].agg(lambda t: " ".join(map(str, t))).rename("tokens")
             .reset_index() if not d.empty else pd.DataFrame(columns=["direction", "sign", "tokens"]))
    return {"module": module, "singular_values": list(row["singular_values"]),
            "effective_rank": float(row["effective_rank"]), "stable_rank": float(row["stable_rank"]),
            "energy_share": float(row["energy_share"]), "words": words}


def module_figure(view: dict, ax=None):
    """Bar chart of a :func:`module_view`'s singular values; returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 2.6), constrained_layout=True)
    s = view["singular_values"]
    ax.bar(range(1, len(s) + 1), s, color="#4c72b0")
    ax.set(xlabel="i", ylabel="σᵢ(ΔW)", title=f"{view['module'].removeprefix('model.')}: effective rank "
           f"{view['effective_rank']:.2f}, {view['energy_share']:.1%} of the energy")
    return fig


def module_explorer(summ: pd.DataFrame, dirs: pd.DataFrame, top: int = 8) -> w.VBox:
    """Pick a module (largest updates first): see its spectrum and its directions read as words.

    Returns:
        A ``VBox``; ``.state`` is the :func:`module_view` on display.
    """
    modules = list(summ.sort_values("energy", ascending=False)["module"])
    pick = w.Dropdown(options=[(m.removeprefix("model."), m) for m in modules], description="module",
                      layout=w.Layout(width="60%"))
    out = w.Output()
    box = w.VBox([pick, out])
    box.state = {}

    def refresh(_=None):
        box.state = module_view(summ, dirs, pick.value, top)
        words = box.state["words"] if not box.state["words"].empty else "(no directions read for this module)"
        _show_in(out, module_figure(box.state), words)

    pick.observe(refresh, names="value")
    box.refresh = refresh
    refresh()
    return box


REPLAY_METRICS = ["transfer_rate", "paraphrase_transfer", "specificity_drop", "perplexity_ratio"]


def replay_view(sweep: pd.DataFrame, replay: float) -> dict:
    """The pure callback behind :func:`replay_slider`: transfer and forgetting at one replay ratio of the sweep.

    Args:
        sweep: One row per replay ratio (``replay`` plus :data:`REPLAY_METRICS` columns), as notebook 04 builds it.
        replay: A value of ``sweep["replay"]``.
    """
    row = sweep.set_index("replay").loc[replay]
    return {"replay": float(replay), **{k: float(row[k]) for k in REPLAY_METRICS if k in row}}


def replay_figure(sweep: pd.DataFrame, replay: float, ax=None):
    """The sweep's transfer rate and specificity drop against replay, with ``replay`` marked; returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 3), constrained_layout=True)
    s = sweep.sort_values("replay")
    ax.plot(s["replay"], s["transfer_rate"], "o-", label="transfer rate")
    ax.plot(s["replay"], s["specificity_drop"], "s--", label="specificity drop (forgetting)")
    ax.axvline(replay, color="grey", lw=1)
    ax.set(xlabel="replay ratio", ylabel="", title=f"replay {replay:g}")
    ax.legend(fontsize=8)
    return fig


def replay_slider(sweep: pd.DataFrame) -> w.VBox:
    """Slide over the replay ratios of the sweep: transfer and forgetting at each (no training: the sweep's runs).

    Returns:
        A ``VBox``; ``.state`` is the :func:`replay_view` on display.
    """
    values = sorted(float(x) for x in sweep["replay"])
    slider = w.SelectionSlider(options=values, value=values[0], description="replay")
    out = w.Output()
    box = w.VBox([slider, out])
    box.state = {}

    def refresh(_=None):
        box.state = replay_view(sweep, slider.value)
        _show_in(out, replay_figure(sweep, slider.value), pd.Series(box.state).to_frame("value").round(3))

    slider.observe(refresh, names="value")
    box.refresh = refresh
    refresh()
    return box


def round_view(loops: list, round_: int, examples: int = 5) -> dict:
    """The pure callback behind :func:`round_slider`: every loop's state after round ``round_``.

    Args:
        loops: :func:`lora_lens.studies.curriculum.run_loop` results (e.g. the targeted loop and its baseline).
        round_: Round number (a loop that stopped earlier shows its last round).
        examples: Examples shown of the layer the first loop added in that round.

    Returns:
        ``{"round", "table" (one row per loop), "layer" ([(prompt, answer)] added by the first loop)}``.
    """
    rows = []
    for loop in loops:
        t = loop.table()
        rows.append(t[t["round"] == min(round_, int(t["round"].max()))].iloc[0])
    layers = loops[0].layers
    layer = list(layers[round_])[:examples] if round_ < len(layers) else []
    return {"round": round_, "table": pd.DataFrame(rows).reset_index(drop=True), "layer": layer}


def round_slider(loops: list) -> w.VBox:
    """Slide through the rounds of the loop: efficacy, tokens and what each round's new layer of data holds.

    Returns:
        A ``VBox``; ``.state`` is the :func:`round_view` on display.
    """
    last = max(int(loop.table()["round"].max()) for loop in loops)
    slider = w.IntSlider(value=0, min=0, max=last, description="round")
    out = w.Output()
    box = w.VBox([slider, out])
    box.state = {}

    def refresh(_=None):
        box.state = round_view(loops, slider.value)
        layer = "\n".join(f"  {p} → {a}" for p, a in box.state["layer"]) or "  (no new layer)"
        out.clear_output(wait=True)
        with out:
            display(box.state["table"].round(3))
            print(f"layer {slider.value}, first examples:\n{layer}")

    slider.observe(refresh, names="value")
    box.refresh = refresh
    refresh()
    return box


def pattern_view(table: pd.DataFrame, family: str = "all", pattern: str = "all") -> pd.DataFrame:
    """The pure callback behind :func:`pattern_picker`: rows of a pattern table for a family and/or a pattern.

    Args:
        table: :func:`lora_lens.studies.compare.pattern_table` (``family`` ``"all"`` rows pool the families).
        family: A family, or ``"all"`` for the pooled rows.
        pattern: A pattern id, or ``"all"``.
    """
    t = table[table["family"] == family]
    if pattern != "all":
        t = t[t["pattern"] == pattern]
    cols = [c for c in ["pattern", "family", "statistic", "ci_low", "ci_high", "verdict", "null", "null_statistic",
                        "null_ci_low", "null_ci_high", "vs_null"] if c in t.columns]
    return t[cols].reset_index(drop=True)


def pattern_picker(table: pd.DataFrame) -> w.VBox:
    """Pick a family (or the pooled ``all``) and a pattern: see its statistic, 95% interval and verdict.

    Returns:
        A ``VBox``; ``.state["table"]`` is the :func:`pattern_view` on display.
    """
    families = ["all"] + [f for f in dict.fromkeys(table["family"]) if f != "all"]
    fam = w.Dropdown(options=families, description="family")
    pat = w.Dropdown(options=["all"] + list(dict.fromkeys(table["pattern"])), description="pattern")
    out = w.Output()
    box = w.VBox([w.HBox([fam, pat]), out])
    box.state = {}

    def refresh(_=None):
        box.state["table"] = pattern_view(table, fam.value, pat.value)
        _show_in(out, box.state["table"].style.format(precision=3).hide(axis="index"))

    for control in (fam, pat):
        control.observe(refresh, names="value")
    box.refresh = refresh
    refresh()
    return box
