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
