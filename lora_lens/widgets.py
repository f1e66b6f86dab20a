"""ipywidgets factories over pure callbacks.

Each factory returns a widget whose ``.state`` dict holds what it currently shows, so tests (and curious users) can
set a control's ``.value`` headless and read the result. No notebook cell depends on anyone touching a widget.
"""

from __future__ import annotations

import ipywidgets as w
import pandas as pd
from IPython.display import display

PROBE_COLUMNS = ["set", "prompt", "expected", "base_answer", "adapted_answer", "p_expected_base",
                 "p_expected_adapted", "changed"]


def probe_view(tables: dict, key, probe_set: str = "all", changed_only: bool = False, n: int = 20) -> pd.DataFrame:
    """The pure callback behind :func:`probe_browser`: probe answers of one adapter, base vs adapted.

    Args:
        tables: ``{key: DataFrame}`` of :meth:`lora_lens.probes.Evaluation.table` outputs.
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
