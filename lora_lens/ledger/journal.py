"""Helpers for the journal notebook (``07_journal``): the ledger as a table, a figure, a summary, and exercises.

Everything here only *reads* the hypothesis ledger (:mod:`lora_lens.ledger`), except the practice ledgers that the
exercises build in a scratch file of their own. A missing ledger is an empty one: a fresh clone renders "no
hypotheses yet" instead of failing.

Exercise checks return a one-line message starting with ``"correct"``, ``"not yet"`` or ``"not attempted"``; they
say whether an answer holds and where to look, never the answer itself.

Example:
    >>> from lora_lens import journal
    >>> journal.summary("/nonexistent/ledger.sqlite")["hypotheses"]
    0
    >>> journal.check_verdicts(None).split(":")[0]
    'not attempted'
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from lora_lens import ledger
from lora_lens.errors import ConfigError, NotFoundError

VERDICTS = ("supported", "refuted", "inconclusive")
_COLORS = {"supported": "#d4efdc", "refuted": "#f8d0d0", "inconclusive": "#e6e6e6"}

# Exercise 1: the practice hypothesis and the five steps whose verdicts the participant predicts.
PRACTICE_STEPS = (("record", 0, 0.96), ("record", 1, 0.93), ("record", 2, 0.97), ("record", 3, 0.85),
                  ("retract", 3, None))
"""(action, seed, efficacy): four records, then the retraction of the seed-3 record."""
_HINTS = {"min_runs": "how many live records does the rule need before it says anything?",
          "fail": "what does the rule say about a single failing record?",
          "retract": "a retracted record no longer counts: which records are live afterwards?"}

# Exercise 3: a practice ledger with one documented mistake among four records (seed, value, notes).
_FORGET = (("practice-forgetting", "Higher rank forgets more: rank 16 loses more general accuracy than rank 2",
            "forgetting_gap", ">", 0.0),
           dict(falsifier="rank 16 forgets no more than rank 2 on any seed", min_runs=3))
_FORGET_RECORDS = ((0, 0.031, "seed 0"), (1, -0.006, "seed 1"),
                   (2, 0.044, "seed 2; NOTE added later: the rank-2 run crashed, so this gap compares rank 16 "
                              "with the rank-2 adapter of seed 0"),
                   (3, 0.027, "seed 3"))


def resolve(ledger_path: str | os.PathLike | None = "") -> Path:
    """The ledger file for a notebook parameter: ``""`` or None means the default (:func:`ledger.ledger_path`)."""
    return ledger.ledger_path(ledger_path or None)


def summary(path=None) -> dict[str, int]:
    """Counts over the whole ledger: hypotheses, each verdict, live evidence and retracted records.

    Returns:
        ``{"hypotheses", "supported", "refuted", "inconclusive", "evidence", "retracted"}``; all zero without a
        ledger. ``evidence`` counts live records (the ones the verdicts use).
    """
    hs, ev = ledger.hypotheses(path), ledger.evidence(path=path)
    out = {"hypotheses": len(hs), **{v: int((hs["verdict"] == v).sum()) for v in VERDICTS}}
    out["evidence"] = int(hs["n_evidence"].sum())
    out["retracted"] = int(ev["retracted"].sum())
    return out


def status(path=None) -> str:
    """One markdown paragraph: where the ledger is and what it holds, or that nothing is recorded yet."""
    where = ledger.ledger_path(path).resolve()
    s = summary(path)
    if not s["hypotheses"]:
        return (f"**No hypotheses recorded yet** in `{where}`. The tables and figures below are empty. Run the "
                "series (`lora-lens run`) or notebooks that declare hypotheses, or point `ledger_path` at a "
                "ledger, and run this notebook again.")
    return (f"Ledger `{where}`: **{s['hypotheses']} hypotheses** with {s['evidence']} live evidence records "
            f"({s['retracted']} retracted) - {s['supported']} supported, {s['refuted']} refuted, "
            f"{s['inconclusive']} inconclusive.")


def verdict_table(path=None, max_hypotheses: int = 30):
    """The hypotheses with their verdicts as a styled DataFrame (verdict cells coloured), in declaration order.

    Args:
        path: Ledger file (default: :func:`ledger.ledger_path`).
        max_hypotheses: Show at most this many rows; the caption says how many are left out.

    Returns:
        A ``pandas.io.formats.style.Styler``; ``.data`` is the underlying DataFrame.
    """
    _check_max(max_hypotheses)
    hs = ledger.hypotheses(path)
    cols = {"id": "id", "verdict": "verdict", "n_evidence": "evidence", "n_pass": "pass",
            "prediction": "prediction", "claim": "claim", "falsifier": "falsifier"}
    table = hs[list(cols)].rename(columns=cols).head(max_hypotheses).reset_index(drop=True)
    caption = f"{len(hs)} hypotheses" + (f" (first {max_hypotheses} shown)" if len(hs) > max_hypotheses else "")
    if hs.empty:
        caption = "No hypotheses recorded yet"
    return (table.style.hide(axis="index").set_caption(caption)
            .map(lambda v: f"background-color: {_COLORS.get(v, 'white')}; font-weight: bold", subset=["verdict"])
            .set_properties(**{"text-align": "left"}))


def plot_evidence(path=None, max_hypotheses: int = 30):
    """One panel per hypothesis (at most ``max_hypotheses``): its evidence per run against the predicted threshold.

    Returns:
        The matplotlib figure (a single panel saying so when nothing is declared).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    _check_max(max_hypotheses)
    ids = list(ledger.hypotheses(path)["id"])
    if len(ids) <= max_hypotheses:
        return ledger.plot_evidence(None, path=path)
    sns.set_theme(style="whitegrid")  # as ledger.plot_evidence does, before the axes exist
    cols = min(3, max_hypotheses)
    rows = math.ceil(max_hypotheses / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[max_hypotheses:]:
        ax.set_axis_off()
    for ax, hid in zip(axes.flat, ids[:max_hypotheses]):
        ledger.plot_evidence(hid, ax=ax, path=path)
    fig.suptitle(f"first {max_hypotheses} of {len(ids)} hypotheses")
    fig.tight_layout()
    return fig


def markdown(path=None) -> str:
    """The ledger's markdown export (as in a pull request), or a short note when there is no ledger yet."""
    if not ledger.ledger_path(path).exists():
        return (f"# Hypothesis ledger\n\n_No hypotheses recorded yet: `{ledger.ledger_path(path)}` does not "
                "exist. Run the series (`lora-lens run`) or a notebook that declares hypotheses, and come back._\n")
    return ledger.export("md", path)


def _check_max(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"max_hypotheses={n!r} must be an integer >= 1, e.g. 30")


# ----------------------------------------------------------------------------------------------- exercises
def _practice_verdicts() -> list[str]:
    """Run the practice steps through a throw-away ledger and return the verdict after each."""
    with tempfile.TemporaryDirectory() as tmp:
        db, out, ids = Path(tmp) / "practice.sqlite", [], {}
        ledger.declare("practice-efficacy", "A rank-4 LoRA learns all ten fact edits", "efficacy", ">=", 0.9,
                       falsifier="efficacy below 0.9 on any seed", min_runs=3, path=db)
        for action, seed, value in PRACTICE_STEPS:
            if action == "record":
                ids[seed] = ledger.record("practice-efficacy", value, seed=seed, path=db).id
            else:
                ledger.retract(ids[seed], "practice", path=db)
            out.append(ledger.verdict("practice-efficacy", path=db))
    return out


def check_verdicts(answer) -> str:
    """Exercise 1: are these the verdicts after each of the :data:`PRACTICE_STEPS`?

    Args:
        answer: A list of five verdicts (``"supported"``, ``"refuted"``, ``"inconclusive"``), or None.
    """
    if answer is None:
        return "not attempted: set my_verdicts to a list of five verdicts, one per step"
    if isinstance(answer, str) or len(answer) != len(PRACTICE_STEPS) or any(a not in VERDICTS for a in answer):
        return f"not yet: give a list of {len(PRACTICE_STEPS)} verdicts, each one of {', '.join(VERDICTS)}"
    truth = _practice_verdicts()
    wrong = [i for i, (a, t) in enumerate(zip(answer, truth)) if a != t]
    if not wrong:
        return "correct: all five verdicts follow from the rule declared before any evidence arrived"
    i = wrong[0]
    kind = "retract" if PRACTICE_STEPS[i][0] == "retract" else "fail" if PRACTICE_STEPS[i][2] < 0.9 else "min_runs"
    return (f"not yet: {len(PRACTICE_STEPS) - len(wrong)} of {len(PRACTICE_STEPS)} right; look again at step "
            f"{i + 1} - {_HINTS[kind]}")


def check_own(hypothesis_id: str | None, path=None) -> str:
    """Exercise 2: is ``hypothesis_id`` a falsifiable, replicated, decided hypothesis in the ledger at ``path``?"""
    if hypothesis_id is None:
        return "not attempted: declare your hypothesis with ledger.declare and set my_hypothesis to its id"
    try:
        h = ledger.hypothesis(hypothesis_id, path)
    except NotFoundError as exc:
        return f"not yet: {exc}"
    if not h.falsifier.strip():
        return "not yet: a hypothesis without a falsifier cannot be wrong; declare a new id with falsifier=..."
    if h.min_runs < 2:
        return "not yet: with min_runs=1 a single run decides; declare a new id that needs at least two runs"
    ev = ledger.evidence(hypothesis_id, path)
    live = ev[ev["retracts"].isna() & ~ev["retracted"]]
    runs = {(r, s) for r, s in zip(live["run_id"], live["seed"].fillna(-1))}
    if len(runs) < 2:
        return (f"not yet: {len(live)} live record(s) from {len(runs)} run/seed; record the same metric from "
                "another seed")
    v = ledger.verdict(hypothesis_id, path)
    if v == "inconclusive":
        return f"not yet: {len(live)} live records, but the rule needs {h.min_runs}; record more runs"
    return f"correct: {hypothesis_id!r} is {v} on {len(live)} live records from {len(runs)} runs/seeds"


def practice_ledger(path) -> Path:
    """Exercise 3: (re)build a practice ledger at ``path`` with four records, one of them a documented mistake.

    An earlier practice ledger at ``path`` is replaced, so a participant can start over.

    Returns:
        ``path`` as a Path.

    Raises:
        ConfigError: ``path`` holds a ledger with other hypotheses (it is never replaced).
    """
    path = Path(path)
    if path.exists() and set(ledger.hypotheses(path)["id"]) - {_FORGET[0][0]}:
        raise ConfigError(f"{str(path)!r} holds other hypotheses; pass a scratch file for the practice ledger, "
                          "e.g. Path(output_dir) / 'practice.sqlite'")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    args, kw = _FORGET
    ledger.declare(*args, **kw, path=path)
    for seed, value, notes in _FORGET_RECORDS:
        ledger.record(args[0], value, seed=seed, notes=notes, path=path)
    return path


def check_retraction(path) -> str:
    """Exercise 3: was exactly the documented mistake in the practice ledger retracted, with a reason?"""
    ev = ledger.evidence(_FORGET[0][0], path)
    retractions = ev[ev["retracts"].notna()]
    if retractions.empty:
        return "not attempted: no record is retracted yet; read the notes column of the evidence table"
    mistake = int(ev[ev["seed"] == 2]["id"].iloc[0])
    hit = set(retractions["retracts"].astype(int))
    if hit != {mistake}:
        return ("not yet: a record that is merely inconvenient is evidence, not a mistake - only retract a record "
                "whose notes document an error; rebuild with journal.practice_ledger(path) and try again")
    return (f"correct: record #{mistake} is retracted and the verdict is now "
            f"{ledger.verdict(_FORGET[0][0], path)!r} - an honest retraction does not have to rescue a claim")
