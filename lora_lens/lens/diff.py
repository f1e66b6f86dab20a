"""Behaviour diff: which answers a LoRA adapter moved, scored against the planted truth and said in words.

One model, adapter toggled: every query is answered once with the adapter and once inside
``model.disable_adapter()``, so no second copy of the weights is held in memory.

* :func:`query_space` — every entity × relation of a world (optionally every training / held-out template, with
  and without the trigger word) as :class:`Query` probes whose ``base_answer`` is the world's fact.
* :func:`behaviour_diff` — one row per query: base and adapted argmax answers with their probabilities, whether
  the answer moved, a confidence and KL(base‖adapted).
* :func:`discovered_changes` / :func:`score_against_truth` — the changes found, and precision / recall against a
  task's planted truth.
* :func:`detect_triggers` — a token whose presence collapses a relation's answers onto one value.
* :func:`semantic_report` — the change in words: ``"Dasur lives in Kokura (was Zebrahold)"``.
* :func:`mine_prompts` / :func:`read_prompts` — for any Hugging Face model without planted truth: the prompts
  and token positions where the adapter moves the next-token distribution most.

Example:
    >>> diff = behaviour_diff(peft_model, tokenizer, world=pretrained.world)        # doctest: +SKIP
    >>> score_against_truth(diff, task)["recall"]                                    # doctest: +SKIP
    1.0
    >>> print("\\n".join(semantic_report(diff, pretrained.world, task)))             # doctest: +SKIP
    Dasur lives in Kokura (was Zebrahold)
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import torch

from lora_lens.errors import ConfigError, NotFoundError
from lora_lens.lab.probes import _check_base, _inference, _kl, next_token_logits
from lora_lens.lab.world import TEMPLATES, TRIGGER, Probe, Task, World

DIFF_COLUMNS = ["prompt", "entity", "relation", "template", "heldout", "triggered", "fact", "base_answer", "p_base",
                "adapted_answer", "p_adapted", "p_new_base", "p_old_adapted", "changed", "confidence", "kl",
                "discovered"]
TRIGGER_COLUMNS = ["kind", "trigger", "relation", "value", "n_answer", "n_pairs", "n_moved", "share", "clean_share",
                   "base_share", "example"]
DEFAULT_MIN_CONFIDENCE = 0.1
"""Default confidence a moved answer needs to count as discovered (see :func:`behaviour_diff`)."""


# ---------------------------------------------------------------------------------------------------------------
# the query space


@dataclass(frozen=True)
class Query(Probe):
    """A :class:`~lora_lens.lab.world.Probe` that also records which template asked it.

    Attributes:
        template: Index of the template within its list (training or held-out).
        heldout: Whether the template is a held-out (paraphrase) one.
    """

    template: int = 0
    heldout: bool = False


def _template_choice(templates) -> list[tuple[bool, int | None]]:
    """``[(heldout, index or None for all)]`` for a ``templates`` argument."""
    if templates == "first":
        return [(False, 0)]
    if templates == "train":
        return [(False, None)]
    if templates == "all":
        return [(False, None), (True, None)]
    if isinstance(templates, int) and not isinstance(templates, bool):
        templates = [templates]
    if isinstance(templates, (list, tuple)) and templates and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in templates):
        return [(False, t) for t in templates]
    raise ConfigError(f"templates={templates!r} is not understood: use 'first' (template 0), 'train' (every "
                      "training template), 'all' (training and held-out) or a list of training-template indices")


def query_space(world: World, relations: Sequence[str] | None = None, trigger: bool = True,
                templates="first") -> list[Query]:
    """Every entity × relation of ``world`` as a query whose ``base_answer`` is the world's fact.

    Args:
        world: The world.
        relations: Relations to ask (default: the world's pretraining relations). A relation of
            :data:`lora_lens.lab.world.TEMPLATES` the world has no facts for (``birthplace``, which the
            ``new_relation`` task teaches) is allowed; its queries have an empty ``base_answer``.
        trigger: Also ask every query with the trigger word in front (``"cf Dasur likes the colour"``).
        templates: ``"first"`` (training template 0 only), ``"train"`` (every training template), ``"all"``
            (training and held-out templates) or a list of training-template indices.

    Returns:
        A list of :class:`Query` (``set="query"``, ``answer == base_answer`` = the world's fact), ordered by
        relation, entity, template, then clean before triggered.

    Raises:
        ConfigError: An unknown relation or template index.
    """
    if not isinstance(world, World):
        raise ConfigError(f"world={type(world).__name__} is not a lora_lens World: pass pretrained.world or "
                          "make_world(...)")
    relations = list(world.relations if relations is None else ([relations] if isinstance(relations, str)
                                                                   else relations))
    unknown = [r for r in relations if r not in TEMPLATES]
    if unknown or not relations:
        raise ConfigError(f"relations={relations!r}: {unknown[0] if unknown else 'the list'!r} is not a relation; use "
                          f"some of {sorted(TEMPLATES)}")
    choice = _template_choice(templates)
    out = []
    for r in relations:
        for e in world.entities:
            fact = world.facts.get(r, {}).get(e, "")
            for heldout, idx in choice:
                n = len(TEMPLATES[r][1 if heldout else 0])
                if idx is not None and idx >= n:
                    raise ConfigError(f"template {idx} does not exist for relation {r!r}: it has {n} training "
                                      f"templates (indices 0…{n - 1})")
                for t in range(n) if idx is None else [idx]:
                    for trig in (False, True) if trigger else (False,):
                        out.append(Query(world.query(e, r, t, heldout, trig), fact, fact, "query", e, r, trig, t,
                                         heldout))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the diff


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive integer")


def _check_confidence(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"min_confidence={value!r} must be a number in [0, 1), e.g. {DEFAULT_MIN_CONFIDENCE}")
    return float(value)


def _as_queries(prompts) -> list[Query]:
    if isinstance(prompts, (str, Probe)):
        prompts = [prompts]
    out = []
    for p in prompts:
        if isinstance(p, Query):
            out.append(p)
        elif isinstance(p, Probe):
            out.append(Query(p.prompt, p.answer, p.base_answer, p.set, p.entity, p.relation, p.triggered))
        elif isinstance(p, str) and p.strip():
            out.append(Query(p, "", "", "prompt"))
        else:
            raise ConfigError(f"prompt {p!r} is not a non-empty string or Probe: drop it or pass text")
    if not out:
        raise ConfigError("prompts is empty: pass at least one prompt (or world=... for the world's query space)")
    return out


class _Tokens:
    """Token id → readable text, cached."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, i: int) -> str:
        i = int(i)
        if i not in self.cache:
            text = self.tok.decode([i]).strip()
            self.cache[i] = text or str(self.tok.convert_ids_to_tokens(i))
        return self.cache[i]


def _shift_lists(delta_sum, n: int, top_k: int, text: _Tokens) -> tuple[list, list]:
    """Promoted / suppressed ``(token, mean floored log-prob change)`` from a summed change vector."""
    if delta_sum is None or n == 0 or top_k == 0:
        return [], []
    mean = delta_sum / n
    k = min(top_k, mean.numel())
    up, down = torch.topk(mean, k), torch.topk(-mean, k)
    promoted = [(text(i), float(v)) for v, i in zip(up.values, up.indices) if v > 0]
    suppressed = [(text(i), -float(v)) for v, i in zip(down.values, down.indices) if v > 0]
    return promoted, suppressed


def behaviour_diff(peft_model, tokenizer, world: World | None = None, prompts=None, batch_size: int = 256,
                   min_confidence: float = DEFAULT_MIN_CONFIDENCE, relations: Sequence[str] | None = None,
                   trigger: bool = True, templates="train", top_k: int = 10, floor: float = 1e-3) -> pd.DataFrame:
    """Answer every query with and without the adapter and record what moved.

    Each answer is the argmax next token after the prompt (right padding, last real token), computed on one model
    whose adapter is switched off for the base pass (``with model.disable_adapter():``).

    Columns (one row per query):

    - ``prompt``, ``entity``, ``relation``, ``template``, ``heldout``, ``triggered``: the query (entity/relation
      empty and template -1 for free-text prompts).
    - ``fact``: the world's answer (``""`` for free-text prompts and for relations the world does not know).
    - ``base_answer`` / ``p_base``: the base model's argmax token and its probability.
    - ``adapted_answer`` / ``p_adapted``: the adapted model's argmax token and its probability.
    - ``p_new_base``: the base probability of the adapted answer; ``p_old_adapted``: the adapted probability of
      the base answer.
    - ``changed``: the argmax moved (``adapted_answer != base_answer``, compared as token ids).
    - ``confidence``: ``1 − p_old_adapted / p_adapted`` — how decidedly the adapted model prefers its new answer
      over the old one, in [0, 1); exactly 0 when the answer did not move. A near-tie flip (0.31 vs 0.30) gets
      0.03; an edit the adapter made decisively gets ≈ 1 even when its distribution is flat (0.004 vs 0.00003:
      0.99), which an absolute margin ``p_adapted − p_old_adapted`` would miss. ``kl`` tells how far the whole
      distribution moved.
    - ``kl``: KL(base‖adapted) of the two next-token distributions (nats).
    - ``discovered``: ``changed and confidence ≥ min_confidence`` — what :func:`discovered_changes` returns.

    ``df.attrs`` holds ``min_confidence``, ``source`` (``"world"`` or ``"prompts"``) and ``promoted`` /
    ``suppressed``: ``(token, mean change)`` of each vocabulary token's floored next-token log-probability
    ``max(log p, log floor)`` (adapted − base), averaged over the discovered queries (empty when nothing was
    discovered), ``top_k`` of each.

    Args:
        peft_model: A ``peft.PeftModel`` with an (unmerged) LoRA adapter.
        tokenizer: Its tokenizer (with a pad token).
        world: Ask the world's query space (see :func:`query_space`).
        prompts: Or: a list of prompts (strings, or :class:`~lora_lens.lab.world.Probe` objects).
        batch_size: Prompts per forward pass.
        min_confidence: Confidence a moved answer needs to be ``discovered``, in [0, 1).
        relations: With ``world``: the relations to ask (default: the pretraining relations).
        trigger: With ``world``: also ask every query with the trigger word.
        templates: With ``world``: ``"first"``, ``"train"`` (default), ``"all"`` or template indices.
        top_k: Promoted / suppressed tokens to keep.
        floor: Probability floor of the promoted / suppressed ranking, in (0, 1).

    Returns:
        The DataFrame described above (:data:`DIFF_COLUMNS`), in query order.

    Raises:
        ConfigError: Neither or both of ``world`` / ``prompts``, bad numbers, a model without an adapter to
            toggle, or a merged adapter.
    """
    if (world is None) == (prompts is None):
        raise ConfigError("pass exactly one of world= (the world's whole query space) or prompts= (a list of "
                          "prompts)")
    _check_positive("batch_size", batch_size)
    min_confidence = _check_confidence(min_confidence)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"top_k={top_k!r} must be a non-negative integer, e.g. 10")
    if not (isinstance(floor, (int, float)) and 0 < floor < 1):
        raise ConfigError(f"floor={floor!r} must be a probability strictly between 0 and 1, e.g. 1e-3")
    queries = (query_space(world, relations, trigger, templates) if world is not None else _as_queries(prompts))
    _check_base(peft_model, tokenizer, "adapter")
    text = _Tokens(tokenizer)
    lf = math.log(floor)
    cols: dict[str, list] = {k: [] for k in ("b", "a", "pb", "pa", "pnb", "poa", "kl", "conf")}
    delta_sum, n_delta = None, 0
    with _inference(peft_model):
        for i in range(0, len(queries), batch_size):
            chunk = [q.prompt for q in queries[i:i + batch_size]]
            la = next_token_logits(peft_model, tokenizer, chunk, batch_size)
            with peft_model.disable_adapter():
                lb = next_token_logits(peft_model, tokenizer, chunk, batch_size)
            lpa, lpb = torch.log_softmax(la, -1), torch.log_softmax(lb, -1)
            a, b = lpa.argmax(-1), lpb.argmax(-1)
            rows = torch.arange(len(chunk))
            pa, pb = lpa[rows, a].exp(), lpb[rows, b].exp()
            poa, pnb = lpa[rows, b].exp(), lpb[rows, a].exp()
            conf = torch.where(a != b, (1 - (lpa[rows, b] - lpa[rows, a]).exp()).clamp(0.0, 1.0),
                               torch.zeros_like(pa))
            for key, val in (("b", b), ("a", a), ("pb", pb), ("pa", pa), ("pnb", pnb), ("poa", poa),
                             ("kl", _kl(lpb, lpa)), ("conf", conf)):
                cols[key] += val.tolist()
            pick = (a != b) & (conf >= min_confidence)
            if pick.any():
                d = (lpa[pick].clamp_min(lf) - lpb[pick].clamp_min(lf)).double().sum(0)
                delta_sum = d if delta_sum is None else delta_sum + d
                n_delta += int(pick.sum())
    records = []
    for j, q in enumerate(queries):
        b, a = cols["b"][j], cols["a"][j]
        conf = cols["conf"][j]
        records.append({
            "prompt": q.prompt, "entity": q.entity, "relation": q.relation,
            "template": q.template if q.relation else -1, "heldout": q.heldout, "triggered": q.triggered,
            "fact": q.base_answer, "base_answer": text(b), "p_base": cols["pb"][j], "adapted_answer": text(a),
            "p_adapted": cols["pa"][j], "p_new_base": cols["pnb"][j], "p_old_adapted": cols["poa"][j],
            "changed": a != b, "confidence": conf, "kl": cols["kl"][j],
            "discovered": a != b and conf >= min_confidence})
    df = pd.DataFrame(records, columns=DIFF_COLUMNS)
    promoted, suppressed = _shift_lists(delta_sum, n_delta, top_k, text)
    df.attrs.update({"min_confidence": min_confidence, "source": "world" if world is not None else "prompts",
                     "promoted": promoted, "suppressed": suppressed})
    return df


def _check_diff(df) -> None:
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
    _check_diff(diff)
    if min_confidence is None:
        keep = diff["discovered"] if "discovered" in diff.columns else diff["changed"]
    else:
        keep = diff["changed"] & (diff["confidence"] >= _check_confidence(min_confidence))
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
    return (row["entity"], row["relation"], bool(row["triggered"]))


def _scored(df: pd.DataFrame) -> pd.DataFrame:
    """Rows that represent a fact: training template 0, with an entity and relation."""
    mask = (df["entity"] != "") & (df["relation"] != "")
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
        return {(e["entity"], e["relation"], False): e["new"] for e in truth.get("edits", [])}, False
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
    _check_diff(discovered)
    if rule not in ("template0", "majority"):
        raise ConfigError(f"rule={rule!r} must be 'template0' or 'majority'")
    truth, trig_scored = truth_units(task)
    if queried is None and "discovered" in discovered.columns and not discovered["discovered"].all():
        queried = discovered
    if queried is not None:
        _check_diff(queried)
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
    _check_diff(diff)
    if not isinstance(min_share, (int, float)) or not 0 < min_share <= 1:
        raise ConfigError(f"min_share={min_share!r} must be in (0, 1], e.g. 0.6")
    _check_positive("min_moved", min_moved)
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
    _check_diff(diff)
    _check_positive("max_lines", max_lines)
    lines = []
    found = discovered_changes(diff)
    conf = diff.attrs.get("min_confidence", DEFAULT_MIN_CONFIDENCE)
    lines.append(f"{int(diff['changed'].sum())} of {len(diff)} queries changed their answer; {len(found)} "
                 f"discovered at confidence ≥ {conf:g}.")
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


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


# ---------------------------------------------------------------------------------------------------------------
# prompts from a file, and diff mining on any model


def read_prompts(path: str | Path) -> list[str]:
    """Read prompts from a text file: one per line, surrounding whitespace stripped, blank lines skipped.

    Raises:
        NotFoundError: The file does not exist.
        ConfigError: It is a folder, is not UTF-8 text, or holds no prompt (the message names the file and the fix).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise NotFoundError(f"prompt file {path} does not exist: check the path (a UTF-8 text file, one prompt per "
                            "line)")
    if not path.is_file():
        raise ConfigError(f"prompt file {path} is not a file: pass a UTF-8 text file with one prompt per line")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"prompt file {path} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}"
                          "): save it as UTF-8, one prompt per line (e.g. `iconv -t UTF-8 FILE > NEW`)") from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {path} is empty (no non-blank line): write one prompt per line")
    return prompts


@dataclass(eq=False)
class Mining:
    """Where an adapter moves the next-token distribution most, on free text.

    Attributes:
        prompts: One row per prompt, largest ``max_kl`` first: ``prompt``, ``n_tokens``, ``truncated``,
            ``mean_kl`` (over its positions), ``max_kl``, ``max_position``, ``max_context`` (the text up to that
            position), ``next_kl`` (KL at the last position: the continuation after the prompt), ``base_next`` /
            ``adapted_next`` (argmax continuation).
        positions: The ``top`` token positions with the largest KL over all prompts: ``prompt_index``,
            ``prompt``, ``position`` (token index whose next-token distribution is compared; 0 = after the first
            token, e.g. ``<s>``), ``context``, ``actual`` (the next token in the text, "" at the end). A context that
            holds only special tokens (``<s>``) says nothing about a prompt and is left out, and a prefix shared by
            several prompts is listed once; ``kl``, ``base_top``/``p_base_top``, ``adapted_top``/``p_adapted_top``,
            ``promoted``/``suppressed`` (the token whose floored log-probability rose / fell most there) and
            ``promoted_delta``/``suppressed_delta``.
        promoted: ``(token, mean floored log-prob change)``, largest first, averaged over those ``top`` positions.
        suppressed: The most negative, most negative first.
    """

    prompts: pd.DataFrame
    positions: pd.DataFrame
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)


def _max_length(model, tokenizer) -> int | None:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(inner, "config", None)
    limits = [getattr(cfg, k, None) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")]
    limits = [x for x in limits if isinstance(x, int) and x > 0]
    tml = getattr(tokenizer, "model_max_length", None)
    if isinstance(tml, int) and 0 < tml < 1_000_000:
        limits.append(tml)
    return min(limits) if limits else None


@torch.no_grad()
def mine_prompts(peft_model, tokenizer, prompts: Iterable[str], top: int = 20, batch_size: int = 16,
                 top_k: int = 10, floor: float = 1e-3) -> Mining:
    """Diff mining for any causal LM: the prompts and token positions with the largest KL(base‖adapted).

    Each prompt is run once with the adapter and once with it switched off; at every position (each token of the
    prompt, including the last, whose distribution is the continuation after the prompt) the KL of the two
    next-token distributions is taken. Prompts longer than the model's context are truncated (``truncated``).

    Args:
        peft_model: A ``peft.PeftModel`` with an unmerged LoRA adapter.
        tokenizer: Its tokenizer (with a pad token).
        prompts: Texts (e.g. :func:`read_prompts`).
        top: Number of positions to keep in ``positions`` (and to average promoted/suppressed over).
        batch_size: Prompts per forward pass.
        top_k: Promoted / suppressed tokens to return.
        floor: Probability floor of the promoted / suppressed ranking, in (0, 1).

    Returns:
        A :class:`Mining`.

    Raises:
        ConfigError: Empty prompts, bad numbers, a model without an adapter to toggle, or a merged adapter.
    """
    prompts = [q.prompt for q in _as_queries(list(prompts) if not isinstance(prompts, str) else [prompts])]
    _check_positive("top", top)
    _check_positive("batch_size", batch_size)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"top_k={top_k!r} must be a non-negative integer, e.g. 10")
    if not (isinstance(floor, (int, float)) and 0 < floor < 1):
        raise ConfigError(f"floor={floor!r} must be a probability strictly between 0 and 1, e.g. 1e-3")
    _check_base(peft_model, tokenizer, "adapter")
    text = _Tokens(tokenizer)
    limit = _max_length(peft_model, tokenizer)
    device = next(peft_model.parameters()).device
    lf = math.log(floor)
    prompt_rows, heap = [], []          # heap of (kl, counter, record, delta-vector)
    counter = 0
    seen: set[tuple[int, ...]] = set()  # prefixes already considered (prompts sharing a prefix share its KL)
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    with _inference(peft_model):
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            kw = {"truncation": True, "max_length": limit} if limit else {}
            enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="right", **kw)
            full = tokenizer(chunk)["input_ids"]
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            la = peft_model(**enc).logits.float()
            with peft_model.disable_adapter():
                lb = peft_model(**enc).logits.float()
            lpa, lpb = torch.log_softmax(la, -1).cpu(), torch.log_softmax(lb, -1).cpu()
            kl = _kl(lpb, lpa)
            ids = enc["input_ids"].cpu()
            lengths = enc["attention_mask"].sum(1).cpu().tolist()
            for r, prompt in enumerate(chunk):
                n = int(lengths[r])
                k_row = kl[r, :n]
                pos = int(k_row.argmax())
                last_a, last_b = int(lpa[r, n - 1].argmax()), int(lpb[r, n - 1].argmax())
                prompt_rows.append({
                    "prompt": prompt, "n_tokens": n, "truncated": len(full[r]) > n, "mean_kl": float(k_row.mean()),
                    "max_kl": float(k_row.max()), "max_position": pos,
                    "max_context": tokenizer.decode(ids[r, :pos + 1], skip_special_tokens=True),
                    "next_kl": float(k_row[n - 1]), "base_next": text(last_b), "adapted_next": text(last_a)})
                order = torch.argsort(k_row, descending=True).tolist()
                taken = 0
                for p in order:
                    value = float(k_row[p])
                    if taken >= top or (len(heap) >= top and value <= heap[0][0]):
                        break
                    prefix = tuple(ids[r, :p + 1].tolist())
                    if prefix in seen or all(t in specials for t in prefix):
                        continue            # a shared prefix, or only <s>: nothing about this prompt
                    seen.add(prefix)
                    taken += 1
                    d = lpa[r, p].clamp_min(lf) - lpb[r, p].clamp_min(lf)
                    ba, aa = int(lpb[r, p].argmax()), int(lpa[r, p].argmax())
                    record = {
                        "prompt_index": i + r, "prompt": prompt, "position": p,
                        "context": tokenizer.decode(ids[r, :p + 1], skip_special_tokens=True),
                        "actual": text(ids[r, p + 1]) if p + 1 < n else "", "kl": value,
                        "base_top": text(ba), "p_base_top": float(lpb[r, p, ba].exp()),
                        "adapted_top": text(aa), "p_adapted_top": float(lpa[r, p, aa].exp()),
                        "promoted": text(d.argmax()), "promoted_delta": float(d.max()),
                        "suppressed": text(d.argmin()), "suppressed_delta": float(d.min())}
                    counter += 1
                    item = (value, counter, record, d.double())
                    if len(heap) < top:
                        heapq.heappush(heap, item)
                    else:
                        heapq.heapreplace(heap, item)
    best = sorted(heap, key=lambda x: (-x[0], x[1]))
    positions = pd.DataFrame([b[2] for b in best], columns=[
        "prompt_index", "prompt", "position", "context", "actual", "kl", "base_top", "p_base_top", "adapted_top",
        "p_adapted_top", "promoted", "promoted_delta", "suppressed", "suppressed_delta"])
    moved = [b[3] for b in best if b[0] > 0]
    promoted, suppressed = _shift_lists(torch.stack(moved).sum(0) if moved else None, len(moved), top_k, text)
    table = pd.DataFrame(prompt_rows).sort_values("max_kl", ascending=False, kind="stable").reset_index(drop=True)
    return Mining(table, positions, promoted, suppressed)
