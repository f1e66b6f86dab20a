"""Attribution scored against the planted truth: is the top-attributed token the trigger
(:func:`trigger_recovery`) or the edited entity (:func:`entity_recovery`)? Does switching off the top-attributed
components remove the effect faster than random ones (:func:`deletion_curve`)? Which components carry the edit
without the damage (:func:`selectivity`)?
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from lora_lens.errors import ConfigError
from lora_lens.lab.pair import check_peft, frozen, model_device
from lora_lens.lab.world import ADJECTIVES, NOUNS, Task
from lora_lens.lens.attribution.behaviours import Behaviours
from lora_lens.lens.attribution.components import ComponentMask, ComponentSet, LayerCache, check_components
from lora_lens.lens.attribution.references import probe_references
from lora_lens.lens.attribution.tokens import TokenAttribution, batch_token_attributions

__all__ = ["Recovery", "deletion_curve", "deletion_ks", "entity_recovery", "selectivity", "trigger_recovery"]


# ---------------------------------------------------------------------------------------------------------------
# scored against the planted truth
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Recovery:
    """How often attribution found the planted cause.

    Attributes:
        score: Share of the scored probes where the cause ranks first (NaN when none is scored).
        table: One row per probe: prompt, target, expected (the planted token), top (top-attributed token),
            rank (1 = first) of the expected token, hit, the expected token's attribution, ``p_base`` and
            ``p_adapted`` of the target, and ``scored``: whether the probe counts (by default only probes whose
            answer the adapter changed: ``p_adapted ≥ 0.5 > p_base`` — where nothing changed there is no change
            to explain).
        attributions: The :class:`TokenAttribution` of each probe (for heatmaps).
    """

    score: float
    table: pd.DataFrame
    attributions: list[TokenAttribution]

    def __float__(self) -> float:
        return float(self.score)


def _recovery(attrs: list[TokenAttribution], expected: list[list[int]], labels: list[str], by: str,
              changed_only: bool) -> Recovery:
    records = []
    for ta, want, label in zip(attrs, expected, labels):
        order = ta.ranking("difference", by)
        rank = min((order.index(i) + 1 for i in want), default=None)
        p_base, p_adapted = math.exp(ta.logp_base), math.exp(ta.logp_adapted)
        records.append({"prompt": ta.prompt, "target": ta.target, "expected": label, "top": ta.tokens[order[0]],
                        "rank": rank, "hit": rank == 1,
                        "attribution": float(max(ta.difference[i] for i in want)) if want else float("nan"),
                        "p_base": p_base, "p_adapted": p_adapted,
                        "scored": not changed_only or p_adapted >= 0.5 > p_base})
    table = pd.DataFrame(records, columns=["prompt", "target", "expected", "top", "rank", "hit", "attribution",
                                           "p_base", "p_adapted", "scored"])
    scored = table[table["scored"]]
    score = float(scored["hit"].mean()) if len(scored) else float("nan")
    return Recovery(score, table, attrs)


def _word_positions(tokenizer, ta: TokenAttribution, row_ids: list[int], word: str) -> list[int]:
    """Indices into ``ta.tokens`` of the tokens that spell ``word`` in the prompt (first occurrence)."""
    piece = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
    ids = [row_ids[p] for p in ta.positions]
    for s in range(len(ids) - len(piece) + 1):
        if ids[s:s + len(piece)] == piece:
            return list(range(s, s + len(piece)))
    same = [i for i, t in enumerate(ta.tokens) if t == word.strip()]
    if same:
        return same
    # the word at the prompt's start ("Zorvania's capital …"), capitalised, or glued to punctuation: the tokens
    # whose characters overlap its first occurrence (case-insensitive)
    at = ta.prompt.lower().find(word.strip().lower())
    if at < 0 or not getattr(tokenizer, "is_fast", False):
        return []
    span = (at, at + len(word.strip()))
    offsets = tokenizer(ta.prompt, return_offsets_mapping=True)["offset_mapping"]
    return [k for k, p in enumerate(ta.positions) if p < len(offsets) and offsets[p][0] < span[1]
            and offsets[p][1] > span[0]]


def _entities(task: Task, exclude=()) -> list[str]:
    return sorted({p.entity for ps in task.probes.values() for p in ps if p.entity} - set(exclude))


def trigger_recovery(peft_model, tokenizer, task: Task, method: str = "ig", sets: Sequence[str] = ("efficacy",
                     "paraphrase"), n_steps: int = 50, baseline: int | str | None = None, by: str = "signed",
                     batch_size: int = 512, references="counterfactual", n_references: int = 16,
                     seed: int = 0, output: str = "prob", changed_only: bool = True) -> Recovery:
    """Share of triggered probes whose top-attributed token of the *difference* is the trigger.

    Each triggered probe's change of ``p(target)`` (adapter on − off; ``output="logprob"`` for ``log p``) is
    attributed to its tokens with :func:`batch_token_attributions`; a hit is the trigger token
    (``task.truth["trigger"]``) ranking first, scored on the probes whose answer the adapter changed.

    What a token is compared with decides the answer. By default (``references="counterfactual"``) each probe is
    compared with ``n_references`` variants of itself in which the trigger is replaced by another word (the task's
    decoy vocabulary: the adjectives and nouns of the world) *and* the person by another person of the task — so the
    trigger competes with the name for the credit (a probe whose words have no alternative of the same number of
    tokens is left out of the score). ``references=None`` compares every token with the blank
    ``baseline`` token instead: then every token the change needs (trigger, relation words, the final "is") gets
    credit, since the backdoor fires only when all are present.

    Args:
        peft_model: A ``peft.PeftModel`` trained on a trigger task.
        tokenizer: Its tokenizer.
        task: The trigger task.
        method: ``"ig"`` or ``"ablation"``.
        sets: Probe sets whose triggered probes are scored.
        n_steps: IG steps.
        baseline: Blank baseline token when ``references=None`` (see :func:`resolve_baseline`).
        by: Rank tokens by ``"signed"`` attribution (largest increase first) or ``"abs"``.
        batch_size: Sequences per forward pass.
        references: ``"counterfactual"``, None, or one list of reference prompts per scored probe.
        n_references: Counterfactual variants per probe.
        seed: Seed of the counterfactual draws.
        output: The explained quantity, ``"prob"`` (``p(target)``, the default: the change that made the target
            *likely*) or ``"logprob"`` (which also counts moves deep in the tail, e.g. a decoy word lifting the
            target from 1e-7 to 1e-3).
        changed_only: Score only probes whose answer the adapter changed (``p_adapted ≥ 0.5 > p_base``; the table
            keeps every probe, with its ``scored`` flag). False scores every probe.

    Returns:
        A :class:`Recovery`.

    Raises:
        ConfigError: The task has no trigger or no triggered probes in ``sets``; bad references.
    """
    trigger = task.truth.get("trigger")
    probes = [p for s in sets for p in task.probes.get(s, []) if p.triggered]
    if not trigger or not probes:
        raise ConfigError(f"task {task.name!r} has no trigger (truth['trigger']) or no triggered probes in "
                          f"{list(sets)}: use a task from make_task(world, 'trigger')")
    people = _entities(task)
    probes, refs = probe_references(tokenizer, probes, references, n_references, seed,
                               lambda p: {trigger: ADJECTIVES + NOUNS, p.entity: people})
    attrs = batch_token_attributions(peft_model, tokenizer, [p.prompt for p in probes], [p.answer for p in probes],
                                     method=method, n_steps=n_steps, baseline=baseline, batch_size=batch_size,
                                     references=refs, output=output)
    expected = [_word_positions(tokenizer, ta, tokenizer(ta.prompt)["input_ids"], trigger) for ta in attrs]
    return _recovery(attrs, expected, [trigger] * len(attrs), by, changed_only)


def entity_recovery(peft_model, tokenizer, task: Task, method: str = "ig", sets: Sequence[str] = ("efficacy",),
                    n_steps: int = 50, baseline: int | str | None = None, by: str = "signed",
                    batch_size: int = 512, references="counterfactual", n_references: int = 16,
                    seed: int = 0, output: str = "prob", changed_only: bool = True) -> Recovery:
    """Share of fact-edit probes whose edited entity's token ranks first in the difference attribution.

    The explained output is ``p(new answer)`` (``output="logprob"``: its log); for a multi-token entity a hit is any
    of its tokens ranking first; scored on the probes whose answer the adapter changed.
    By default (``references="counterfactual"``) each probe is compared with ``n_references`` copies of itself
    about other people of the task (not edited ones): the question is "does the change belong to this person?" (a
    probe whose name has no other name of the same number of tokens is left out of the score).
    Only the name differs from its references, so a hit means the change is larger for this person than for the
    others (IG: the name's credit is exactly that excess). ``references=None`` compares every token with the blank
    ``baseline`` token: an edit changes the answer only when the name *and* the relation words are present, so the
    relation words share the credit; :func:`reference_prompts` (a background of the task's prompts, every word
    free to differ) sits in between.

    Args:
        peft_model: A ``peft.PeftModel`` trained on a fact-edit task.
        tokenizer: Its tokenizer.
        task: The fact-edit task (its ``efficacy`` probes name the edited entity).
        method: ``"ig"`` or ``"ablation"``.
        sets: Probe sets scored.
        n_steps: IG steps.
        baseline: Blank baseline token when ``references=None``.
        by: ``"signed"`` or ``"abs"``.
        batch_size: Sequences per forward pass.
        references, n_references, seed, output, changed_only: As in :func:`trigger_recovery`.

    Returns:
        A :class:`Recovery`.

    Raises:
        ConfigError: No probes with an entity in ``sets``; bad references.
    """
    probes = [p for s in sets for p in task.probes.get(s, []) if p.entity]
    if not probes:
        raise ConfigError(f"task {task.name!r} has no probes with an entity in {list(sets)}: use a fact-edit task "
                          "(make_task(world, 'fact_edit'))")
    others = _entities(task, exclude={e["entity"] for e in task.truth.get("edits", [])} | {p.entity for p in probes})
    if others:
        def slots(p):
            return {p.entity: others}
    else:
        # a task from data whose every entity is edited: the other entities of the task are the counterfactuals
        # (the target is this probe's answer, which another entity's prompt does not ask for)
        every = _entities(task)

        def slots(p):
            return {p.entity: [e for e in every if e != p.entity]}
    probes, refs = probe_references(tokenizer, probes, references, n_references, seed, slots)
    attrs = batch_token_attributions(peft_model, tokenizer, [p.prompt for p in probes], [p.answer for p in probes],
                                     method=method, n_steps=n_steps, baseline=baseline, batch_size=batch_size,
                                     references=refs, output=output)
    expected = [_word_positions(tokenizer, ta, tokenizer(ta.prompt)["input_ids"], p.entity)
                for ta, p in zip(attrs, probes)]
    return _recovery(attrs, expected, [p.entity for p in probes], by, changed_only)


def deletion_ks(k_max: int, also: Sequence[int] = ()) -> list[int]:
    """The default k grid of :func:`deletion_curve`: 1, 2, 3, 5, 8, 13, 21, … (Fibonacci, dense where curves bend)
    up to ``k_max``, with ``k_max`` itself and every k of ``also`` (at most ``k_max``)."""
    ks, a, b = {k_max}, 1, 2
    while a <= k_max:
        ks.add(a)
        a, b = b, a + b
    return sorted(ks | {int(k) for k in also if 1 <= int(k) <= k_max})


def deletion_curve(peft_model, tokenizer, task: Task, attribution: pd.DataFrame, components: ComponentSet,
                   behaviour: str = "efficacy", k_max: int | None = None, n_random: int = 5, seed: int = 0,
                   max_probes: int | None = None, ks: Sequence[int] | str | None = None,
                   level: float | None = None) -> pd.DataFrame:
    """Switch off the top-k attributed components vs k random ones, for k on a grid up to ``k_max``; share of the
    effect removed.

    effect = metric(adapted) − metric(base); removed = 1 − effect_after / effect_before, where effect_after is
    metric(with those k components off) − metric(base). 1 = the whole effect gone, 0 = nothing removed. Top-k are
    the components with the largest attribution to ``behaviour`` (most positive first); the random curve averages
    ``n_random`` draws of k distinct components per k (``numpy`` generator seeded with ``seed``). The draws at a k
    are those of a curve over every k (k = 1 … k_max, in order), whichever k are evaluated: a row does not depend
    on the grid. Each evaluation reuses the blocks below the lowest block it switches off (:class:`LayerCache`).

    Args:
        peft_model: A ``peft.PeftModel``.
        tokenizer: Its tokenizer.
        task: The task.
        attribution: From :func:`component_attribution` (or :func:`lora_branch_attribution` at module grain) over
            ``components``.
        components: The component set the attribution is indexed by.
        behaviour: The metric whose effect is deleted.
        k_max: Largest k (default ``min(10, n_components)``).
        n_random: Random draws per k.
        seed: Seed of the random draws.
        max_probes: At most this many probes per set.
        ks: The k evaluated: None (default) the grid :func:`deletion_ks` (1, 2, 3, 5, 8, 13, … and ``k_max``),
            ``"all"`` every k from 1 to ``k_max``, or a list (``k_max`` is added).
        level: Also find the smallest k whose top-k remove at least this share exactly: the top-k of every k
            between the grid points around the first one that reaches it are tried, and the first k that reaches it
            gets a row too (None: the grid only).

    Returns:
        DataFrame with one row per k evaluated (ascending): ``k``, ``topk_removed``, ``random_removed`` (mean),
        ``random_std``, ``topk_metric``, ``random_metric`` (mean), and ``topk`` (the names switched off).
        ``df.attrs`` holds ``behaviour``, ``adapted``, ``base`` and ``effect``.

    Raises:
        ConfigError: An empty component set; an attribution not indexed by the components; a behaviour missing
            from it; a bad ``k_max`` / ``n_random`` / ``ks`` / ``level``; an adapter with no effect on ``behaviour``.
    """
    components = check_components(components)
    check_peft(peft_model, tokenizer)
    if behaviour not in attribution.columns:
        raise ConfigError(f"behaviour={behaviour!r} is not a column of the attribution; columns are "
                          f"{list(attribution.columns)}")
    missing = [n for n in components.names if n not in attribution.index]
    if missing:
        raise ConfigError(f"the attribution has no row for components {missing[:4]}: attribute the same "
                          "component set you pass here")
    n = len(components)
    k_max = min(10, n) if k_max is None else k_max
    if isinstance(k_max, bool) or not isinstance(k_max, int) or not 1 <= k_max <= n:
        raise ConfigError(f"k_max={k_max!r} must be an integer from 1 to the number of components ({n})")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 1:
        raise ConfigError(f"n_random={n_random!r} must be a positive integer, e.g. 5")
    if ks is None:
        grid = deletion_ks(k_max)
    elif isinstance(ks, str):
        if ks != "all":
            raise ConfigError(f"ks={ks!r} must be None (the default grid), 'all' or a list of k from 1 to {k_max}")
        grid = list(range(1, k_max + 1))
    else:
        bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= k_max]
        if bad or not len(ks):
            raise ConfigError(f"ks={list(ks)!r} must be a non-empty list of integers from 1 to k_max={k_max}")
        grid = sorted({int(k) for k in ks} | {k_max})
    if level is not None and (isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level <= 1):
        raise ConfigError(f"level={level!r} must be None or a share of the effect in (0, 1], e.g. 0.8")
    ev = Behaviours(tokenizer, task, [behaviour], max_probes, model_device(peft_model))
    scores = attribution.loc[components.names, behaviour].to_numpy(dtype=float)
    order = np.argsort(-scores, kind="stable")
    rng = np.random.default_rng(seed)
    draws = {k: [rng.choice(n, size=k, replace=False) for _ in range(n_random)] for k in range(1, k_max + 1)}
    rows: dict[int, dict] = {}
    with frozen(peft_model), torch.no_grad():
        with peft_model.disable_adapter():
            base = float(ev(peft_model)[0, 0])
        with ComponentMask(peft_model, components) as mask, LayerCache(peft_model, components) as cache:
            with cache.record():
                adapted = float(ev(peft_model)[0, 0])
            effect = adapted - base
            if abs(effect) < 1e-8:
                raise ConfigError(f"the adapter does not change {behaviour!r} (adapted {adapted:.4g} = base "
                                  f"{base:.4g}): there is no effect to delete")

            def metric_without(idx) -> float:
                idx = [int(i) for i in idx]
                m = torch.ones(n)
                m[idx] = 0.0
                mask.set(m)
                with cache.reuse(cache.start(idx)):
                    return float(ev(peft_model)[0, 0])

            def row(k: int, top: float | None = None) -> dict:
                top = metric_without(order[:k]) if top is None else top
                rand = [metric_without(d) for d in draws[k]]
                removed = [1.0 - (r - base) / effect for r in rand]
                return {"k": k, "topk_removed": 1.0 - (top - base) / effect,
                        "random_removed": float(np.mean(removed)), "random_std": float(np.std(removed)),
                        "topk_metric": top, "random_metric": float(np.mean(rand)),
                        "topk": [components.names[i] for i in order[:k]]}

            for k in grid:
                rows[k] = row(k)
            if level is not None:
                reached = [k for k in grid if rows[k]["topk_removed"] >= level]
                if reached:
                    below = max((k for k in grid if k < reached[0]), default=0)
                    for k in range(below + 1, reached[0]):         # top-k only, up to the first k that reaches it
                        top = metric_without(order[:k])
                        if 1.0 - (top - base) / effect >= level:
                            rows[k] = row(k, top)
                            break
    df = pd.DataFrame([rows[k] for k in sorted(rows)])
    df.attrs.update({"behaviour": behaviour, "adapted": adapted, "base": base, "effect": effect})
    return df


def selectivity(attribution: pd.DataFrame, edit: str = "efficacy", damage: str = "specificity") -> pd.DataFrame:
    """Per component: the share of the edit effect it carries vs the share of the specificity damage it carries.

    edit_share = attribution[edit] / (edit metric adapted − base); damage_share = −attribution[damage] /
    (damage metric base − adapted), i.e. the share of the *loss* on the must-not-change probes. With Shapley values
    each column sums to 1 over components. selectivity = edit_share − damage_share: high = carries the edit without
    the damage. A damage share is NaN when the adapter changes the damage metric by less than 1e-6 (no damage).

    Args:
        attribution: From :func:`component_attribution` (its ``attrs`` hold the adapted and base metric values).
        edit: Behaviour column of the edit (``"efficacy"`` or ``"trigger"``).
        damage: Behaviour column of the damage (``"specificity"``; higher = better, so a loss is damage).

    Returns:
        DataFrame, index = components: ``edit``, ``damage`` (raw attributions), ``edit_share``, ``damage_share``,
        ``selectivity``; sorted by ``selectivity``, largest first.

    Raises:
        ConfigError: A column is missing, or the attribution lacks its ``adapted``/``base`` values.
    """
    for col in (edit, damage):
        if col not in attribution.columns:
            raise ConfigError(f"{col!r} is not a column of the attribution ({list(attribution.columns)}): attribute "
                              "both behaviours, e.g. component_attribution(..., behaviours=['efficacy', "
                              "'specificity'])")
    adapted, base = attribution.attrs.get("adapted"), attribution.attrs.get("base")
    if not adapted or not base:
        raise ConfigError("the attribution has no attrs['adapted'] / attrs['base']: pass the DataFrame returned by "
                          "component_attribution(...) unchanged")
    edit_total = adapted[edit] - base[edit]
    damage_total = base[damage] - adapted[damage]
    out = pd.DataFrame({"edit": attribution[edit], "damage": attribution[damage]})
    out["edit_share"] = out["edit"] / edit_total if abs(edit_total) > 1e-6 else float("nan")
    out["damage_share"] = -out["damage"] / damage_total if abs(damage_total) > 1e-6 else float("nan")
    out["selectivity"] = out["edit_share"] - out["damage_share"].fillna(0.0)
    return out.sort_values("selectivity", ascending=False)

