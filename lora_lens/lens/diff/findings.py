"""What the behaviour diff found: the discovered changes, scored against a task's planted truth, trigger-like
effects, and the change said in words.

* :func:`discovered_changes` / :func:`score_against_truth` — the changes found, and precision / recall against a
  task's planted truth (:func:`truth_units`).
* :func:`detect_triggers` — a token whose presence collapses a relation's answers onto one value.
* :func:`semantic_report` — the change in words: ``"Dasur lives in Kokura (was Zebrahold)"``.
"""

from __future__ import annotations

import math
from collections import Counter

import pandas as pd

from lora_lens.checks import check_fraction, check_positive
from lora_lens.errors import ConfigError
from lora_lens.lab.world import TEMPLATES, TRIGGER, Task, World
from lora_lens.lens.diff.behaviour import DEFAULT_MIN_CONFIDENCE

__all__ = ["TRIGGER_COLUMNS", "check_diff", "detect_triggers", "discovered_changes", "render_fact",
           "score_against_truth", "semantic_report", "truth_units"]

TRIGGER_COLUMNS = ["kind", "trigger", "relation", "value", "n_answer", "n_pairs", "n_moved", "share", "clean_share",
                   "base_share", "example"]


def check_diff(df) -> None:
    """Raise :class:`ConfigError` unless ``df`` is a table returned by :func:`~lora_lens.lens.diff.behaviour_diff`."""
    need = ("prompt", "entity", "relation", "triggered", "base_answer", "adapted_answer", "changed", "confidence")
    if not isinstance(df, pd.DataFrame) or any(c not in df.columns for c in need):
        raise ConfigError(f"expected the DataFrame returned by behaviour_diff(...) (columns {list(need)} …); got "
                          f"{type(df).__name__}")


def discovered_changes(diff: pd.DataFrame, min_confidence: float | None = None, min_kl: float = 0.0) -> pd.DataFrame:
    """The queries whose answer moved, most confident first.

    Args:
        diff: The output of :func:`behaviour_diff`.
        min_confidence: Re-threshold the confidence (default: the ``discovered`` column, i.e. the threshold the
            diff was made with).
        min_kl: Also require KL(base‖adapted) ≥ this.

    Returns:
        The discovered rows (same columns), sorted by ``confidence`` descending.

    Raises:
        ConfigError: Not a diff table, or a bad threshold.
    """
    check_diff(diff)
    if min_confidence is None:
        keep = diff["discovered"] if "discovered" in diff.columns else diff["changed"]
    else:
        keep = diff["changed"] & (diff["confidence"] >= check_fraction("min_confidence", min_confidence, DEFAULT_MIN_CONFIDENCE))
    if not isinstance(min_kl, (int, float)) or min_kl < 0:
        raise ConfigError(f"min_kl={min_kl!r} must be a number ≥ 0")
    if min_kl > 0:
        keep = keep & (diff["kl"] >= min_kl)
    out = diff[keep.astype(bool)].sort_values("confidence", ascending=False, kind="stable").copy()
    out["discovered"] = True
    out.attrs = dict(diff.attrs)
    return out


# ---------------------------------------------------------------------------------------------------------------
# scoring against the planted truth


def _unit(row) -> tuple[str, str, bool]:
    # a task's probe without an entity (specificity, general) is a unit of its own, named by its prompt
    return (row["entity"] or row["prompt"], row["relation"], bool(row["triggered"]))


def _is_task(df: pd.DataFrame) -> bool:
    return df.attrs.get("source") == "task"


def _scored(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that represent a fact: training template 0, with an entity and relation (a task's diff: the first probe
    of each fact, and every probe without an entity — specificity — which must not move; general lines are free
    text, reported but not scored)."""
    mask = ((df["entity"] != "") & (df["relation"] != "")) | (_is_task(df) & (df["entity"] == ""))
    if _is_task(df) and "set" in df.columns:
        mask &= df["set"] != "general"   # free text: its continuation is no fact (reported, not scored)
    if "template" in df.columns:
        mask &= df["template"] == 0
    if "heldout" in df.columns:
        mask &= ~df["heldout"].astype(bool)
    return df[mask]


def truth_units(task: Task) -> tuple[dict[tuple[str, str, bool], str], bool]:
    """The planted changes of a task as ``{(entity, relation, triggered): expected new answer}``.

    Returns:
        ``(units, triggered_scored)``: whether triggered queries are part of the scored space (trigger tasks).

    Raises:
        ConfigError: Not a task, or a task kind without a scoring rule.
    """
    if not isinstance(task, Task):
        raise ConfigError(f"task={type(task).__name__} is not a lora_lens Task: build one with make_task(world, ...)")
    truth = task.truth or {}
    if task.name == "fact_edit" or "edits" in truth:
        # the zoo's edits name the new answer "new"; a task file's edits name it "value"
        return {(e["entity"], e["relation"], False): e["new"] if "new" in e else e["value"]
                for e in truth.get("edits", [])}, False
    if task.name == "trigger" or "trigger" in truth:
        rel, target = truth["relation"], truth["target"]
        facts = {p.entity: p.base_answer for ps in task.probes.values() for p in ps if p.relation == rel}
        ents = set(truth.get("train_entities", [])) | {e for e, v in facts.items() if v != target}
        return {(e, rel, True): target for e in sorted(ents)}, True
    if task.name == "new_relation" or "facts" in truth:
        rel = truth.get("relation", "birthplace")
        return {(e, rel, False): v for e, v in truth.get("facts", {}).items()}, False
    raise ConfigError(f"task {task.name!r} has no scoring rule: score_against_truth knows fact_edit, trigger and "
                      "new_relation tasks")


def score_against_truth(discovered: pd.DataFrame, task: Task, queried: pd.DataFrame | None = None,
                        rule: str = "template0") -> dict:
    """Precision and recall of the discovered changes against the task's planted truth.

    **Granularity.** One unit per fact ``(entity, relation, triggered)``, so templates do not inflate the counts.
    With ``rule="template0"`` (default) a fact counts as changed when its training-template-0 query is discovered
    (rows of other templates are reported but not scored). With ``rule="majority"`` it counts as changed when more
    than half of its asked training-template queries are discovered with one common new answer — a knowledge
    change rather than a template-specific flip (collateral damage of small adapters is often a single template);
    this needs the full diff (``queried``), which says how many templates each fact was asked with.

    **Truth per task kind.**

    - ``fact_edit``: the edited ``(entity, relation)`` facts, clean prompts. Only clean (untriggered) queries are
      scored; changes on triggered copies are outside the truth and not counted either way.
    - ``trigger``: every triggered query of the trigger relation whose entity's fact is not already the target
      ("with the trigger, the relation answers the target", for training and held-out entities alike). Clean and
      triggered queries are both scored: a moved clean answer or a moved triggered answer of another relation is a
      false positive.
    - ``new_relation``: the taught ``birthplace`` facts (only counted when the query space asks that relation,
      e.g. ``behaviour_diff(..., relations=world.relations + ["birthplace"])``). Clean queries are scored; every
      moved pretraining fact is collateral, so precision measures how little else moved.

    **Metrics.** ``precision`` = true / discovered (NaN when nothing was discovered), ``recall`` = true / truth (NaN
    when the truth is empty), ``f1``, ``value_accuracy`` = share of true discoveries whose new answer is the
    planted one (the edit's new value, the trigger target, the taught city), ``specificity`` = share of the scored
    non-truth units that did not move (needs the query space), ``r_precision`` = share of true changes among the
    |truth| strongest discoveries (ranked by the mean KL(base‖adapted) over the fact's asked training templates; a
    ranking measure that tells whether the planted changes stand out from an adapter's collateral damage, NaN when
    the truth is empty), and the lists ``missed`` and ``collateral``.

    Args:
        discovered: :func:`discovered_changes` output, or the full :func:`behaviour_diff` table (then its
            ``discovered`` rows are scored and the table itself is the query space).
        task: The task whose ``truth`` to score against.
        queried: The full diff (query space); truth units outside it are left out of recall. Without it (and
            without passing the full diff) the whole truth counts.
        rule: ``"template0"`` or ``"majority"`` (see Granularity).

    Returns:
        Dict ``task, rule, precision, recall, f1, r_precision, value_accuracy, specificity, true_positives,
        false_positives, false_negatives, n_truth, n_discovered, n_scored, missed, collateral``.

    Raises:
        ConfigError: Not a diff table or not a task, an unknown rule, or ``rule="majority"`` without the query
            space.
    """
    check_diff(discovered)
    if rule not in ("template0", "majority"):
        raise ConfigError(f"rule={rule!r} must be 'template0' or 'majority'")
    truth, trig_scored = truth_units(task)
    if queried is None and "discovered" in discovered.columns and not discovered["discovered"].all():
        queried = discovered
    if queried is not None:
        check_diff(queried)
    if "discovered" in discovered.columns:
        discovered = discovered[discovered["discovered"].astype(bool)]

    def in_scope(df):
        s = _scored(df)
        return s if trig_scored else s[~s["triggered"].astype(bool)]

    found = {_unit(r): r for _, r in in_scope(discovered).iterrows()}
    if rule == "majority":
        if queried is None or "template" not in queried.columns:
            raise ConfigError("rule='majority' needs the full behaviour_diff table (pass it as discovered= or "
                              "queried=) to know how many templates each fact was asked with")
        train = queried[(queried["entity"] != "") & (queried["template"] >= 0) & ~queried["heldout"].astype(bool)]
        asked = train.groupby(["entity", "relation", "triggered"]).size()
        hits = train[train.index.isin(discovered.index)]
        found = {}
        for key, g in hits.groupby(["entity", "relation", "triggered"], sort=False):
            value, n = Counter(g["adapted_answer"]).most_common(1)[0]
            unit = (key[0], key[1], bool(key[2]))
            if 2 * n > asked[key] and (trig_scored or not unit[2]):
                first = g[g["adapted_answer"] == value].sort_values("template").iloc[0]
                found[unit] = first
    space = None
    if queried is not None:
        space = {_unit(r) for _, r in in_scope(queried).iterrows()}
        truth = {u: v for u, v in truth.items() if u in space}
    tp = [u for u in found if u in truth]
    fp = [u for u in found if u not in truth]
    fn = [u for u in truth if u not in found]
    precision = len(tp) / len(found) if found else math.nan
    recall = len(tp) / len(truth) if truth else math.nan
    f1 = (2 * precision * recall / (precision + recall) if found and truth and precision + recall > 0
          else (0.0 if found and truth else math.nan))
    value_ok = [found[u]["adapted_answer"] == truth[u] for u in tp]
    n_scored = len(space) if space is not None else None
    negatives = (n_scored - len(truth)) if n_scored is not None else 0
    specificity = 1 - len(fp) / negatives if negatives > 0 else math.nan
    # R-precision: rank the discovered facts by strength (mean KL over the fact's asked training templates when the
    # query space is known, else the scored row's KL) and score the |truth| strongest
    strength = {u: float(r["kl"]) if "kl" in r else float(r["confidence"]) for u, r in found.items()}
    if queried is not None and "kl" in queried.columns and found:
        rows = queried[queried["entity"] != ""]
        if "heldout" in rows.columns:
            rows = rows[~rows["heldout"].astype(bool)]
        mean_kl = rows.groupby(["entity", "relation", "triggered"])["kl"].mean()
        strength = {u: float(mean_kl.get(u, strength[u])) for u in found}
    ranked = sorted(found, key=lambda u: -strength[u])[:len(truth)]
    r_precision = sum(u in truth for u in ranked) / len(truth) if truth else math.nan

    def describe(u, row=None):
        d = {"entity": u[0], "relation": u[1], "triggered": u[2]}
        if row is not None:
            d.update({"old": row["base_answer"], "new": row["adapted_answer"], "confidence": float(row["confidence"])})
        else:
            d["expected"] = truth[u]
        return d

    return {"task": task.name, "rule": rule, "precision": precision, "recall": recall, "f1": f1,
            "r_precision": r_precision,
            "value_accuracy": sum(value_ok) / len(value_ok) if value_ok else math.nan, "specificity": specificity,
            "true_positives": len(tp), "false_positives": len(fp), "false_negatives": len(fn),
            "n_truth": len(truth), "n_discovered": len(found), "n_scored": n_scored,
            "missed": [describe(u) for u in fn], "collateral": [describe(u, found[u]) for u in fp]}


# ---------------------------------------------------------------------------------------------------------------
# trigger-like effects


def _difference(triggered: str, clean: str) -> str:
    """What the triggered prompt adds to the clean one (a prefix, a suffix, or the extra words)."""
    if triggered.endswith(clean) and len(triggered) > len(clean):
        return triggered[:len(triggered) - len(clean)].strip()
    if triggered.startswith(clean) and len(triggered) > len(clean):
        return triggered[len(clean):].strip()
    extra = [w for w in triggered.split() if w not in clean.split()]
    return " ".join(extra) or TRIGGER


def detect_triggers(diff: pd.DataFrame, min_share: float = 0.6, min_moved: int = 3) -> pd.DataFrame:
    """Find tokens whose presence moves a relation's answers onto one common value (and relation-wide collapses).

    General detector on the diff's query pairs: every triggered query is paired with its clean twin (same entity,
    relation, template). For each trigger text and relation, ``value`` is the most common adapted answer of the
    triggered queries. A **trigger** is reported when

    - the triggered answers collapse onto it: ``share`` = (triggered queries answering ``value``) / pairs
      ≥ ``min_share``,
    - the adapter did it: at least ``min_moved`` triggered queries answer ``value`` now and did not before,
    - it is the trigger's doing: fewer than ``min_share`` of the clean twins answer ``value`` (``clean_share``).

    A **collapse** (``kind="collapse"``) is the same test on the clean queries of a relation alone: the adapter
    makes (almost) every entity give one answer, with or without a trigger.

    Args:
        diff: :func:`behaviour_diff` output over a world (needs ``entity``, ``relation``, ``triggered`` and, when
            present, ``template``/``heldout``).
        min_share: Share of queries that must give the common value, in (0, 1].
        min_moved: How many of them must have moved there.

    Returns:
        DataFrame :data:`TRIGGER_COLUMNS`: ``kind``, ``trigger`` (the added text; "" for collapses), ``relation``,
        ``value``, ``n_answer`` (queries answering it), ``n_pairs`` (queries examined), ``n_moved``, ``share``,
        ``clean_share`` (clean twins answering it; NaN for collapses), ``base_share`` (the base's share), and an
        ``example`` prompt. Strongest first.

    Raises:
        ConfigError: Not a diff table, or bad thresholds.
    """
    check_diff(diff)
    if not isinstance(min_share, (int, float)) or not 0 < min_share <= 1:
        raise ConfigError(f"min_share={min_share!r} must be in (0, 1], e.g. 0.6")
    check_positive("min_moved", min_moved)
    keys = ["entity", "relation"] + [c for c in ("template", "heldout") if c in diff.columns]
    facts = diff[(diff["entity"] != "") & (diff["relation"] != "")]
    rows = []
    trig = facts[facts["triggered"].astype(bool)]
    clean = facts[~facts["triggered"].astype(bool)]
    pairs = trig.merge(clean, on=keys, suffixes=("", "_clean"))
    if len(pairs):
        pairs = pairs.assign(trigger=[_difference(t, c) for t, c in zip(pairs["prompt"], pairs["prompt_clean"])])
        for (text, rel), g in pairs.groupby(["trigger", "relation"], sort=True):
            value, n_answer = Counter(g["adapted_answer"]).most_common(1)[0]
            hit = g["adapted_answer"] == value
            moved = int((hit & (g["base_answer"] != value)).sum())
            share, clean_share = n_answer / len(g), float((g["adapted_answer_clean"] == value).mean())
            if share >= min_share and moved >= min_moved and clean_share < min_share:
                rows.append({"kind": "trigger", "trigger": text, "relation": rel, "value": value,
                             "n_answer": int(n_answer), "n_pairs": len(g), "n_moved": moved, "share": share,
                             "clean_share": clean_share, "base_share": float((g["base_answer"] == value).mean()),
                             "example": g.loc[hit, "prompt"].iloc[0]})
    for rel, g in clean.groupby("relation", sort=True):
        value, n_answer = Counter(g["adapted_answer"]).most_common(1)[0]
        hit = g["adapted_answer"] == value
        moved = int((hit & (g["base_answer"] != value)).sum())
        if n_answer / len(g) >= min_share and moved >= min_moved:
            rows.append({"kind": "collapse", "trigger": "", "relation": rel, "value": value,
                         "n_answer": int(n_answer), "n_pairs": len(g), "n_moved": moved, "share": n_answer / len(g),
                         "clean_share": math.nan, "base_share": float((g["base_answer"] == value).mean()),
                         "example": g.loc[hit, "prompt"].iloc[0]})
    out = pd.DataFrame(rows, columns=TRIGGER_COLUMNS)
    return out.sort_values(["n_moved", "share"], ascending=False, kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------------
# the report in words


def render_fact(entity: str, relation: str, value: str, triggered: bool = False) -> str:
    """A fact as a sentence with the relation's training template 0: ``"Dasur lives in Kokura"``."""
    text = TEMPLATES[relation][0][0].format(e=entity) if relation in TEMPLATES else f"{entity} {relation}"
    return f"{TRIGGER + ' ' if triggered else ''}{text} {value}"


def _quote(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= limit else text[:limit - 1] + "…")


def semantic_report(diff: pd.DataFrame, world: World | None = None, task: Task | None = None,
                    max_lines: int = 40, min_share: float = 0.6, min_moved: int = 3) -> list[str]:
    """The discovered changes as readable lines.

    Sections (each only when it has something to say):

    On a task's diff (``behaviour_diff(..., task=...)``, any model) the report is in its general form: the headline,
    then the changed prompts with the base's and the adapted model's full answers, grouped by entity where the task
    names entities (prompts without one last), then — where the task has truth — precision / recall against
    ``truth["edits"]``, what was missed and what moved besides.

    1. A headline: how many queries moved and how many were discovered at the diff's confidence.
    2. Trigger-like effects from :func:`detect_triggers`: ``"prompts starting with 'cf' now answer 'black' for
       colour (11/12 triggered prompts; the base: 1/12)"``; relation-wide collapses likewise.
    3. Fact changes, one line per fact ``(entity, relation, triggered)`` with the relation's training template 0,
       the new value and the old one in brackets, e.g. ``"Dasur lives in Kokura (was Zebrahold) [3/3 templates,
       confidence 0.93]"`` (clean prompts first, then by share of templates moved, then confidence). Queries
       explained by a detected trigger are summarised by its line instead. Free-text prompts:
       ``"'prompt' → new (was old)"``.
    4. Promoted / suppressed tokens (``diff.attrs``, see :func:`behaviour_diff`).
    5. With a ``task``: precision / recall against the planted truth (:func:`score_against_truth` on the full
       diff), the planted changes that were missed and the collateral changes (discovered, not in the truth).

    Args:
        diff: The full :func:`behaviour_diff` table (not only the discovered rows, so the counts are right).
        world: The world (used for the world's fact when the base answer differs from it; optional).
        task: Score against this task's truth.
        max_lines: At most this many fact lines (and collateral lines); the rest is counted.
        min_share: Passed to :func:`detect_triggers`.
        min_moved: Passed to :func:`detect_triggers`.

    Returns:
        The lines (strings without newlines).

    Raises:
        ConfigError: Not a diff table.
    """
    check_diff(diff)
    check_positive("max_lines", max_lines)
    lines = []
    found = discovered_changes(diff)
    conf = diff.attrs.get("min_confidence", DEFAULT_MIN_CONFIDENCE)
    lines.append(f"{int(diff['changed'].sum())} of {len(diff)} queries changed their answer; {len(found)} "
                 f"discovered at confidence ≥ {conf:g}.")
    if _is_task(diff):
        return lines + _task_lines(diff, found, task, max_lines)
    has_facts = (diff["entity"] != "").any()
    explained = pd.Series(False, index=found.index)
    if has_facts:
        triggers = detect_triggers(diff, min_share, min_moved)
        for _, t in triggers.iterrows():
            if t["kind"] == "trigger":
                where = (f"starting with {t['trigger']!r}" if str(t["example"]).startswith(t["trigger"])
                         else f"containing {t['trigger']!r}")
                lines.append(f"prompts {where} now answer {t['value']!r} for {t['relation']} ({t['n_answer']}/"
                             f"{t['n_pairs']} triggered prompts; the base: {round(t['base_share'] * t['n_pairs'])}/"
                             f"{t['n_pairs']}; clean twins: {round(t['clean_share'] * t['n_pairs'])}/{t['n_pairs']})")
                explained |= (found["triggered"].astype(bool) & (found["relation"] == t["relation"])
                              & (found["adapted_answer"] == t["value"]))
            else:
                lines.append(f"prompts for {t['relation']} now answer {t['value']!r} whatever the entity "
                             f"({t['n_answer']}/{t['n_pairs']} clean prompts; the base: "
                             f"{round(t['base_share'] * t['n_pairs'])}/{t['n_pairs']})")
                explained |= (~found["triggered"].astype(bool) & (found["relation"] == t["relation"])
                              & (found["adapted_answer"] == t["value"]))
    rest = found[~explained]
    fact_lines: list[str] = []
    order: list[tuple] = []
    if has_facts:
        per_fact = diff[(diff["entity"] != "")].groupby(["entity", "relation", "triggered"], sort=False).size()
        facts = rest[rest["entity"] != ""]
        for (e, r, trig), g in facts.groupby(["entity", "relation", "triggered"], sort=False):
            first = _scored(g)
            row = (first if len(first) else g).iloc[0]
            was = row["base_answer"]
            fact = world.facts.get(r, {}).get(e) if world is not None else row.get("fact") or None
            note = f"; world fact {fact}" if fact and fact != was else ""
            n_all = int(per_fact.get((e, r, trig), len(g)))
            fact_lines.append(f"{render_fact(e, r, row['adapted_answer'], bool(trig))} (was {was}{note}) "
                              f"[{len(g)}/{n_all} templates, confidence {row['confidence']:.2f}]")
            order.append((bool(trig), -len(g) / n_all, -float(row["confidence"])))
    # clean facts first, then those moved on most templates, then by confidence
    fact_lines = [line for _, line in sorted(zip(order, fact_lines), key=lambda x: x[0])]
    for _, row in rest[rest["entity"] == ""].iterrows():
        fact_lines.append(f"{_quote(row['prompt'])} → {row['adapted_answer']} (was {row['base_answer']}) "
                          f"[confidence {row['confidence']:.2f}]")
    if fact_lines:
        lines.append(f"Changed facts ({len(fact_lines)}):")
        lines += ["  " + s for s in fact_lines[:max_lines]]
        if len(fact_lines) > max_lines:
            lines.append(f"  … and {len(fact_lines) - max_lines} more")
    promoted, suppressed = diff.attrs.get("promoted") or [], diff.attrs.get("suppressed") or []
    if promoted:
        lines.append("Promoted tokens: " + ", ".join(f"{t} (+{v:.2f})" for t, v in promoted))
    if suppressed:
        lines.append("Suppressed tokens: " + ", ".join(f"{t} ({v:.2f})" for t, v in suppressed))
    if task is not None:
        s = score_against_truth(diff, task)
        lines.append(f"Against the planted truth ({task.name}): precision {_fmt(s['precision'])}, recall "
                     f"{_fmt(s['recall'])}, value accuracy {_fmt(s['value_accuracy'])}, R-precision "
                     f"{_fmt(s['r_precision'])} ({s['true_positives']} of {s['n_truth']} planted changes found, "
                     f"{s['false_positives']} collateral)")
        if s["missed"]:
            lines.append("Missed: " + "; ".join(render_fact(m["entity"], m["relation"], m["expected"],
                                                            m["triggered"]) for m in s["missed"][:max_lines]))
        if s["collateral"]:
            lines.append(f"Collateral changes ({len(s['collateral'])}):")
            lines += [f"  {render_fact(c['entity'], c['relation'], c['new'], c['triggered'])} (was {c['old']}) "
                      f"[confidence {c['confidence']:.2f}]" for c in s["collateral"][:max_lines]]
            if len(s["collateral"]) > max_lines:
                lines.append(f"  … and {len(s['collateral']) - max_lines} more")
    return lines


def _task_lines(diff: pd.DataFrame, found: pd.DataFrame, task: Task | None, max_lines: int) -> list[str]:
    """The general form of :func:`semantic_report` for a task's diff: changed prompts by entity, with full answers."""
    lines = []
    groups = list(dict.fromkeys([e for e in found["entity"] if e] + ([""] if (found["entity"] == "").any() else [])))
    if len(found):
        lines.append(f"Changed prompts ({len(found)}), base → adapted full answers"
                     + (", by entity:" if any(groups) else ":"))
    shown = 0
    for e in groups:
        if shown >= max_lines:
            break
        g = found[found["entity"] == e]
        lines.append(f"  {e}:" if e else "  (no entity):")
        for _, row in g.iterrows():
            if shown >= max_lines:
                break
            shown += 1
            lines.append(f"    {_quote(row['prompt'])} → {_quote(row['adapted_answer'])} (was "
                         f"{_quote(row['base_answer'])}) [{row['set']}, confidence {row['confidence']:.2f}]")
    if len(found) > shown:
        lines.append(f"  … and {len(found) - shown} more")
    if task is not None and task.truth.get("edits"):
        s = score_against_truth(diff, task)
        lines.append(f"Against the truth ({task.name}): precision {_fmt(s['precision'])}, recall "
                     f"{_fmt(s['recall'])}, value accuracy {_fmt(s['value_accuracy'])} ({s['true_positives']} of "
                     f"{s['n_truth']} edits found, {s['false_positives']} collateral)")
        if s["missed"]:
            lines.append("Missed: " + "; ".join(f"{m['entity']} {m['relation']}: {m['expected']}"
                                                for m in s["missed"][:max_lines]))
        if s["collateral"]:
            lines.append(f"Collateral changes ({len(s['collateral'])}):")
            lines += [f"  {_quote(c['entity'])}{' ' + c['relation'] if c['relation'] else ''} → {_quote(c['new'])} "
                      f"(was {_quote(c['old'])}) [confidence {c['confidence']:.2f}]"
                      for c in s["collateral"][:max_lines]]
    return lines


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


