"""The iterative loop: LoRA → analysis of its effect → the next layer of data → LoRA …

Round k trains a fresh LoRA adapter on data layers 0…k (or, with ``warm_start``, continues round k−1's adapter on
layer k and a replay of the earlier layers, for a share of the epochs: the default on a task from data). The
analysis then finds which target behaviours still fail (efficacy probes of the task answered wrongly) and which
collateral changes appeared (facts outside the task's truth that the adapter moved, found by the behaviour diff),
and builds layer k+1 from them: every training-template paraphrase of each failing fact with its intended answer,
then *anchor* examples that restate a damaged fact with its original answer. The loop stops when efficacy reaches
the target, or the data token budget or the round limit is spent.

The baseline gets the same per-round token budget but adds random examples of the task's own data each round.
Tokens count the data layers (``prompt answer`` pairs as tokenised), not the rehearsal examples that the training
spec adds to every run alike.

**On a task from data** (no synthetic world; any base: a zoo model, a model folder, a hub name, ``smollm2-135m``)
the same loop takes its general form. The data pool is the task's ``example`` records, grouped by the fact they
teach (:func:`fact_key`: the truth edit whose value is the answer and whose entity the prompt names; without
truth, the answer). Layer 0 is one example per fact; the next layer is the pool's phrasings of every fact whose
efficacy probe still fails (full-answer greedy match), then anchors for collateral damage found by the behaviour
diff on *mined* prompts that no probe uses (:func:`mined_prompts`: the neighbour prompts of
:data:`lora_lens.lab.train_data.NEIGHBOUR_PROMPTS` whose base answer is plain): a prompt whose answer the adapter
moved becomes the anchor ``(prompt, base answer)``. The default spec is ``default_spec("data")``.

Example:
    >>> loop = run_loop(pre, task, strategy="targeted")           # doctest: +SKIP
    >>> base = run_loop(pre, task, strategy="random")             # doctest: +SKIP
    >>> loop.tokens_to_target, base.tokens_to_target              # doctest: +SKIP
    (96, 160)
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from lora_lens import ledger
from lora_lens.errors import ConfigError
from lora_lens.figures import styled
from lora_lens.lab.adapters import load_adapter
from lora_lens.lab.answers import base_answers
from lora_lens.lab.probes import evaluate
from lora_lens.lab.study import check_data_task
from lora_lens.lab.tasks import fill_base_answers
from lora_lens.lab.train import ContinueFrom, LoraSpec, check_spec, default_spec, lora_weights, train_lora
from lora_lens.lab.train_data import NEIGHBOUR_PROMPTS, is_plain_answer, reads_in_context
from lora_lens.lab.world import TEMPLATES, Task, check_task_world
from lora_lens.lab.zoo import Pretrained, load_model
from lora_lens.lens.diff import behaviour_diff, discovered_changes

__all__ = ["LOOP_DEFAULTS", "MINED_ANSWER_TOKENS", "RATIO_CASES", "STRATEGIES", "LoopResult",
           "check_loop_winner", "collateral_facts", "count_tokens", "fact_groups", "fact_key", "initial_layer",
           "lora_weights", "mined_prompts", "neighbour_answers", "next_layer", "plot_rounds", "random_layer",
           "replay_sample", "round_examples", "run_loop", "tokens_to_target_ratio"]

LOOP_DEFAULTS = {"zoo": {"steps": 120, "max_rounds": 5, "warm_start": False},
                 "data": {"epochs": 8, "batch_size": 16, "replay": 2.0, "max_rounds": 3, "warm_start": True,
                          "replay_old": None, "warm_share": 0.5}}
"""Notebook 05's defaults per kind of task: the zoo's (fact-edit spec, 120 steps a round, every round a fresh
adapter on all data so far) and a task from data's (``default_spec("data")`` trained for a number of passes over
each round's data rather than a number of steps, so that a round with more data is not trained less per example
than the one before it; smaller batches and half the rehearsal lines; from round 1 on a round continues from the
previous round's adapter on its new layer and a replay of every earlier example for half the epochs
(``warm_start``, ``replay_old``, ``warm_share``), instead of training a fresh adapter for all the epochs: notebook
05 on SmolLM2 with the example task in minutes on one CPU thread. A replay of as many earlier examples as new ones
at the full epochs, measured on SmolLM2, lost efficacy between rounds (0.65 → 0.60), so every earlier example is
replayed). The keys other than ``max_rounds``, ``warm_start``, ``replay_old`` and ``warm_share`` are
:class:`~lora_lens.lab.train.LoraSpec` fields."""

MINED_ANSWER_TOKENS = 12
"""Greedy tokens read for a mined prompt's answer (base and adapted), as for the rehearsal of neighbour prompts."""

STRATEGIES = ("targeted", "random")


@dataclass(eq=False)
class LoopResult:
    """What :func:`run_loop` returns.

    Attributes:
        strategy: ``targeted`` or ``random``.
        target: The efficacy target.
        rounds: One dict per round: ``round``, ``efficacy``, ``paraphrase``, ``specificity``, ``tokens`` (data
            tokens trained on, cumulative), ``examples``, ``added`` / ``added_tokens`` (what the round's layer
            added), ``trained`` / ``trained_tokens`` (the data examples and tokens this round's training passed
            over: all the data so far, or with ``warm_start`` the new layer and its replay), ``failing``
            (efficacy probes still wrong), ``collateral`` (moved facts outside the truth; None on the last round,
            after which no layer is built, and in the random baseline), ``anchors`` (anchor
            examples in the data), ``seconds``.
        tokens_to_target: Data tokens of the first round at or above the target (None if never reached).
        layers: The data layers, each a list of ``(prompt, answer)``.
        round0_weights: With ``warm_start``: round 0's trained LoRA weights (:func:`lora_weights`), from which a
            baseline that reuses this round 0 continues; None otherwise.
    """

    strategy: str
    target: float
    rounds: list[dict] = field(default_factory=list)
    tokens_to_target: int | None = None
    layers: list[list[tuple[str, str]]] = field(default_factory=list)
    round0_weights: dict | None = field(default=None, repr=False)

    def table(self) -> pd.DataFrame:
        """The rounds as a DataFrame, with a ``strategy`` column."""
        return pd.DataFrame(self.rounds).assign(strategy=self.strategy)


def count_tokens(tokenizer, examples: list[tuple[str, str]]) -> int:
    """Tokens of ``prompt answer`` pairs as the tokenizer encodes them (special tokens included)."""
    return sum(len(ids) for ids in tokenizer([f"{p} {a}" for p, a in examples])["input_ids"]) if examples else 0


def _facts(task: Task) -> dict[tuple[str, str, bool], str]:
    """The target behaviours: ``(entity, relation, triggered) -> answer`` of every efficacy probe."""
    return {(p.entity, p.relation, p.triggered): p.answer for p in task.probes.get("efficacy", [])}


def _from_data(task: Task) -> bool:
    return task.world_fingerprint is None


def fact_key(task: Task, prompt: str, answer: str) -> tuple[str, str]:
    """The fact an example or probe of a task from data teaches: ``(entity, answer)`` of the first truth edit whose
    value is ``answer`` and whose entity ``prompt`` names (case-insensitive), else ``("", answer)``."""
    for edit in task.truth.get("edits", []):
        entity, value = str(edit.get("entity", "")), str(edit.get("value", ""))
        if value.strip() == answer.strip() and entity and entity.lower() in prompt.lower():
            return entity, answer
    return "", answer


def fact_groups(task: Task) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """The data pool of a task from data, by fact (:func:`fact_key`): its examples in file order."""
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for prompt, answer in task.examples:
        groups.setdefault(fact_key(task, prompt, answer), []).append((prompt, answer))
    return groups


def initial_layer(task: Task, world=None, per_fact: int = 1) -> list[tuple[str, str]]:
    """Layer 0: each target behaviour with its first ``per_fact`` training templates (a task from data: the first
    ``per_fact`` examples of each fact of :func:`fact_groups`; ``world`` is not needed)."""
    if _from_data(task):
        return [ex for group in fact_groups(task).values() for ex in group[:per_fact]]
    out = []
    for (e, r, trig), answer in _facts(task).items():
        out += [(world.query(e, r, t, trigger=trig), answer) for t in range(min(per_fact, len(TEMPLATES[r][0])))]
    return out


def _fill(candidates: list[tuple[str, str]], tokenizer, budget: int) -> list[tuple[str, str]]:
    """Take candidates in order, skipping any that would overflow ``budget`` tokens (at least one is taken)."""
    out, used = [], 0
    for ex in candidates:
        n = count_tokens(tokenizer, [ex])
        if out and used + n > budget:
            continue
        out.append(ex)
        used += n
    return out


def next_layer(evaluation, task: Task, world, collateral: list[tuple[str, str, str]], tokenizer,
               budget: int) -> tuple[list[tuple[str, str]], int]:
    """Layer k+1 of the targeted loop from round k's analysis.

    Args:
        evaluation: Round k's :class:`lora_lens.lab.probes.Evaluation` (its efficacy rows say what fails).
        task: The task (its efficacy probes are the target behaviours).
        world: The world (templates, facts); None for a task from data.
        collateral: ``(entity, relation, original answer)`` of facts the adapter moved outside the truth; for a
            task from data ``(prompt, base answer)`` of mined prompts it moved (:func:`collateral_facts`).
        tokenizer: To count tokens.
        budget: Tokens this layer may add.

    Returns:
        ``(examples, n_anchors)``: the failing prompts with their intended answers, then every training-template
        paraphrase of those behaviours, then anchors (each collateral fact with its original answer), cut to the
        budget. For a task from data: the failing prompts that are pool examples, then every pool example of the
        facts that fail (:func:`fact_groups`), then the anchors ``(prompt, base answer)``.
    """
    rows = evaluation.table("efficacy")
    failing = rows[~rows["adapted_correct"].astype(bool)]
    if _from_data(task):
        groups = fact_groups(task)
        pools = [groups.get(fact_key(task, p, a), []) for p, a in zip(failing["prompt"], failing["expected"])]
        fixes = [(p, a) for (p, a), pool in zip(zip(failing["prompt"], failing["expected"]), pools) if (p, a) in pool]
        fixes = list(dict.fromkeys(fixes + [ex for pool in pools for ex in pool]))
        anchors = [(p, old) for p, old in collateral]
    else:
        fixes = list(zip(failing["prompt"], failing["expected"]))               # the failing prompts first
        for row in failing.itertuples():                                       # then their other paraphrases
            fixes += [(world.query(row.entity, row.relation, t, trigger=row.triggered), row.expected)
                      for t in range(len(TEMPLATES[row.relation][0]))]
        fixes = list(dict.fromkeys(fixes))
        anchors = [(world.query(e, r, t), old) for e, r, old in collateral for t in range(len(TEMPLATES[r][0]))]
    layer = _fill(fixes + anchors, tokenizer, budget)
    anchor_set = set(anchors)
    return layer, sum(ex in anchor_set for ex in layer)


def random_layer(task: Task, used: list[tuple[str, str]], tokenizer, budget: int,
                 rng: random.Random) -> list[tuple[str, str]]:
    """A baseline layer: random examples of the task's own data (unused ones first), up to ``budget`` tokens."""
    used = set(used)
    unused = [ex for ex in task.examples if ex not in used]
    rest = list(task.examples)
    rng.shuffle(unused)
    rng.shuffle(rest)
    return _fill(unused + rest, tokenizer, budget)


def replay_sample(old: list[tuple[str, str]], n: int, seed: int, round_index: int) -> list[tuple[str, str]]:
    """``n`` examples of the earlier data ``old`` (at most all of them, each once), drawn with a seed of its own
    per round: the replay a warm-started round trains on beside its new layer."""
    n = min(max(int(n), 0), len(old))
    return random.Random(f"replay-{seed}-{round_index}").sample(list(old), n) if n else []


def round_examples(layers: list[list[tuple[str, str]]], warm: bool, replay_old: float | None, seed: int,
                   round_index: int) -> list[tuple[str, str]]:
    """The data examples round ``round_index`` trains on, given the layers so far (the last is the new one).

    From scratch (``warm`` False, or round 0): every layer. Continuing the previous round's adapter: the new
    layer, then :func:`replay_sample` of ``round(replay_old × len(new layer))`` examples of the earlier layers, so
    that what was learnt is rehearsed while the round's cost follows its new data, not the whole pool;
    ``replay_old=None``: every earlier example (then the round passes over all the data so far, new layer first).
    """
    if not warm or len(layers) < 2:
        return [ex for layer in layers for ex in layer]
    old = [ex for layer in layers[:-1] for ex in layer]
    if replay_old is None:
        return list(layers[-1]) + old
    return list(layers[-1]) + replay_sample(old, round(replay_old * len(layers[-1])), seed, round_index)


def neighbour_answers(model, tokenizer, task: Task, max_new_tokens: int = MINED_ANSWER_TOKENS) -> dict[str, str]:
    """The base's greedy answers (adapter off) to the :data:`NEIGHBOUR_PROMPTS` that no example or probe of the
    task uses: computed once per loop, they give the mined prompts and every round's rehearsal (the base is the
    same every round)."""
    used = {p for p, _ in task.examples} | {pr.prompt for ps in task.probes.values() for pr in ps}
    prompts = [p for p in NEIGHBOUR_PROMPTS if p not in used]
    answers = base_answers(model, tokenizer, prompts, chat=task.chat, max_new_tokens=max_new_tokens) if prompts else []
    return dict(zip(prompts, answers))


def mined_prompts(model, tokenizer, task: Task, max_new_tokens: int = MINED_ANSWER_TOKENS,
                  answers: dict[str, str] | None = None) -> list[str]:
    """Prompts that watch for collateral damage on a task from data: :data:`NEIGHBOUR_PROMPTS` that no example or
    probe of the task uses, whose base answer (greedy, adapter off) is plain (:func:`is_plain_answer`) and reads
    in context — a fact the base states, which an adapter should leave alone. ``answers``: those base answers when
    already known (:func:`neighbour_answers`); then ``model`` is not run."""
    answers = neighbour_answers(model, tokenizer, task, max_new_tokens) if answers is None else answers
    return [p for p, a in answers.items() if is_plain_answer(p, a) and reads_in_context(tokenizer, p, a, task.chat)]


def collateral_facts(peft_model, tokenizer, world, task: Task, min_confidence: float = 0.5,
                     prompts: list[str] | None = None, answers: dict[str, str] | None = None) -> list[tuple]:
    """Facts the adapter moved that the task does not change: ``(entity, relation, original answer)``.

    For a task from data (``world`` None) the behaviour diff of ``prompts`` (default :func:`mined_prompts`, never
    probes) with full answers: ``(prompt, base answer)`` of each prompt whose plain base answer moved with
    confidence ≥ ``min_confidence``, most confident first. ``answers``: the base's answers when already known
    (:func:`neighbour_answers`): then the base answers only the prompts they lack.
    """
    if _from_data(task):
        prompts = mined_prompts(peft_model, tokenizer, task, answers=answers) if prompts is None else list(prompts)
        if not prompts:
            return []
        table = behaviour_diff(peft_model, tokenizer, task=replace(task, probes={}), prompts=prompts,
                               max_new_tokens=MINED_ANSWER_TOKENS, base_answers=answers)
        found = discovered_changes(table, min_confidence=min_confidence)
        return [(row.prompt, row.base_answer) for row in found.itertuples()
                if is_plain_answer(row.prompt, row.base_answer)
                and reads_in_context(tokenizer, row.prompt, row.base_answer, task.chat)]
    table = behaviour_diff(peft_model, tokenizer, world=world, trigger=False, templates="first")
    truth = {(e, r) for e, r, _ in _facts(task)}
    found = discovered_changes(table, min_confidence=min_confidence)
    return [(row.entity, row.relation, world.facts[row.relation][row.entity]) for row in found.itertuples()
            if (row.entity, row.relation) not in truth and row.relation in world.facts]


def _check_round0(round0, layer0_tokens: int) -> dict | None:
    if round0 is None:
        return None
    if not isinstance(round0, LoopResult) or not round0.rounds:
        raise ConfigError(f"round0={type(round0).__name__}: pass the LoopResult of a run of the same task, spec and "
                          "seed (its round 0 is reused), or None")
    if round0.rounds[0]["tokens"] != layer0_tokens:
        raise ConfigError(f"round0 trained on {round0.rounds[0]['tokens']} data tokens in round 0, this run's layer 0 "
                          f"has {layer0_tokens}: reuse round 0 only of a run of the same task and base")
    return round0.rounds[0]


def run_loop(pre, task: Task | str | Path, strategy: str = "targeted", target: float = 0.95, max_rounds: int = 4,
             token_budget: int | None = None, round_tokens: int | None = None, schedule: list[int] | None = None,
             spec: LoraSpec | None = None,
             anchors: bool = True, seed: int = 0, device: str = "cpu", ledger_id: str | None = None,
             adapter: str | Path | None = None, round0: LoopResult | None = None,
             round_share: float | None = None, warm_start: bool = False, replay_old: float | None = 1.0,
             warm_share: float = 1.0) -> LoopResult:
    """Run the loop (or its random baseline) on a base.

    Args:
        pre: The base: a zoo :class:`~lora_lens.lab.zoo.Pretrained` (:func:`lora_lens.lab.zoo.get_pretrained`), or
            for a task from data also a model folder, a hub name or ``"smollm2-135m"``; each round trains on a fresh
            copy.
        task: The task whose efficacy probes are the target behaviours (``fact_edit``, ``new_relation``; a trigger
            task works too, its behaviours being the triggered probes), or a task from data (a :class:`Task` of
            ``Task.from_records`` / ``Task.load``, or a JSONL task file): its examples are the data pool.
        strategy: ``targeted`` (the loop) or ``random`` (equal token budget, random task data each round).
        target: Efficacy to reach, in (0, 1].
        max_rounds: Rounds at most, ≥ 1.
        token_budget: Data tokens at most (default: unlimited within ``max_rounds``).
        round_tokens: Tokens each round may add (default: the tokens of layer 0).
        round_share: Or: tokens each round may add as a share of layer 0's tokens, in (0, 1] (at least 1 token).
        schedule: Tokens added per round by another run (``[r["added_tokens"] for r in loop.rounds[1:]]``): the
            baseline then adds as many tokens as the loop did in each round (``round_tokens`` after its end), so
            both are compared at equal data tokens round by round.
        spec: LoRA spec of every round (default :func:`lora_lens.lab.train.default_spec` for the task; ``"data"``
            for a task from data).
        anchors: Add anchor examples for collateral damage (targeted loop); their tokens count like any other.
        seed: Training and sampling seed.
        device: Torch device.
        ledger_id: When given, every round after the first records its efficacy gain as evidence for this
            hypothesis (declared beforehand with :func:`lora_lens.ledger.declare`).
        adapter: A trained PEFT LoRA folder on this base that stands in for round 0 (evaluated, not trained): its
            failing facts and collateral build layer 1; from round 1 on each round trains a fresh adapter on
            layer 0 and the layers so far, as usual. Round 0's tokens are those of layer 0.
        round0: The result of another run of the same task, base, spec and seed (and ``adapter``): its round 0 is
            reused instead of trained again (the random baseline starts where the loop started; with
            ``warm_start`` from its round-0 adapter, kept in ``round0_weights``). Its analysis is not kept, so the
            targeted loop cannot reuse one.
        warm_start: From round 1 on, continue the previous round's adapter (:class:`ContinueFrom`) on the new layer
            plus ``replay_old`` × its size of earlier examples (:func:`round_examples`) instead of training a fresh
            adapter on all data so far: a round then costs its new data, not the pool. ``tokens`` still counts
            every data token trained on so far, and both strategies continue alike. The round after a given
            ``adapter`` trains from scratch on all data so far (that adapter may have another shape).
        replay_old: With ``warm_start``: earlier examples replayed per new example, ≥ 0 (at most all of them);
            None: every earlier example.
        warm_share: With ``warm_start``: the share of the spec's epochs (or steps) a continued round trains, in
            (0, 1]: it starts from what the previous round learnt.

    Returns:
        A :class:`LoopResult`.

    Raises:
        ConfigError: Unknown strategy, a target outside (0, 1], bad round/token limits, a task without efficacy
            probes, a task from data with problems for the tokenizer, a zoo task on a base that is not its zoo
            model, a bad ``replay_old``, or a ``round0`` of another layer 0 or, with ``warm_start``, without its
            round-0 weights (checked before anything is trained).
        MismatchError: The task belongs to another world than ``pre``, or ``adapter`` was trained on another base.
        NotFoundError: The task file or ``adapter`` does not exist.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy={strategy!r} is unknown; use one of {list(STRATEGIES)}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ConfigError(f"target={target!r} must be an efficacy in (0, 1], e.g. 0.95")
    for name, value, optional in (("max_rounds", max_rounds, False), ("token_budget", token_budget, True),
                                  ("round_tokens", round_tokens, True)):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer{' or None' if optional else ''}")
    if round_share is not None and (round_tokens is not None or isinstance(round_share, bool)
                                    or not isinstance(round_share, (int, float)) or not 0 < round_share <= 1):
        raise ConfigError(f"round_share={round_share!r} must be a share of layer 0's tokens in (0, 1], e.g. 0.5, "
                          "given without round_tokens")
    if schedule is not None and (not isinstance(schedule, (list, tuple)) or any(
            isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in schedule)):
        raise ConfigError(f"schedule={schedule!r} must be a list of token counts ≥ 0, one per round after the first")
    if not isinstance(warm_start, bool):
        raise ConfigError(f"warm_start={warm_start!r} must be True (continue the previous round's adapter) or False")
    if replay_old is not None and (isinstance(replay_old, bool) or not isinstance(replay_old, (int, float))
                                   or not 0 <= replay_old < float("inf")):
        raise ConfigError(f"replay_old={replay_old!r} must be a number of earlier examples per new example ≥ 0, "
                          "e.g. 1.0, or None for every earlier example")
    if isinstance(warm_share, bool) or not isinstance(warm_share, (int, float)) or not 0 < warm_share <= 1:
        raise ConfigError(f"warm_share={warm_share!r} must be the share of the spec's epochs a continued round "
                          "trains, in (0, 1], e.g. 0.5")
    if (warm_start and round0 is not None and isinstance(round0, LoopResult) and round0.rounds
            and round0.round0_weights is None and adapter is None):
        raise ConfigError("round0= has no round-0 weights to continue from (it ran without warm_start): run both "
                          "with the same warm_start")
    if isinstance(task, (str, Path)):
        task = Task.load(task)
    if not task.probes.get("efficacy"):
        raise ConfigError(f"task {task.name!r} has no efficacy probes: the loop needs target behaviours to reach")
    if round0 is not None and strategy == "targeted":
        raise ConfigError("round0= reuses another run's round 0 without its analysis: only the random baseline can "
                          "(strategy='random'); run the targeted loop from its own round 0")
    data_task = _from_data(task)
    zoo = isinstance(pre, Pretrained)
    if not data_task and not zoo:
        raise ConfigError(f"task {task.name!r} belongs to a synthetic world, which only its zoo model reads; for the "
                          f"base {pre!r} give a task from data (a JSONL task file or Task.from_records(...))")
    if zoo and not data_task:
        check_task_world(task, pre.world)
    if spec is not None:
        spec = check_spec(spec)
    else:
        spec = default_spec("data" if data_task else task.name)
    world = None if data_task else pre.world
    warm_spec = (spec if warm_share == 1 else replace(spec, epochs=spec.epochs * warm_share) if spec.epochs
                 else replace(spec, steps=max(1, round(spec.steps * warm_share))))  # a continued round's training
    source = pre.path if zoo else pre
    tokenizer, mined, said = (pre.tokenizer, None, None) if zoo and not data_task else (None, None, None)
    base = tok = None
    if data_task:  # checked, base answers filled, neighbours answered once: the base is the same every round
        base, tokenizer = load_model(source, device=device)
        check_data_task(task, tokenizer)
        task = fill_base_answers(task, base, tokenizer, sets=("specificity",))
        said = neighbour_answers(base, tokenizer, task)  # for the mined prompts and every round's rehearsal
        mined = mined_prompts(base, tokenizer, task, answers=said) if strategy == "targeted" else []
        tok = tokenizer
    rng = random.Random(seed)
    layers = [initial_layer(task, world)]
    data = list(layers[0])
    reused = _check_round0(round0, count_tokens(tokenizer, data))
    if round_share is not None:
        round_tokens = max(1, int(round_share * count_tokens(tokenizer, data)))
    round_tokens = round_tokens or count_tokens(tokenizer, data)
    result = LoopResult(strategy, float(target), layers=layers)
    n_anchors = 0
    weights = None  # warm_start: the previous round's trained LoRA weights, which the next round continues
    if reused is not None and warm_start:
        weights = result.round0_weights = round0.round0_weights
    for k in range(max_rounds):
        t0 = time.perf_counter()
        tokens = count_tokens(tokenizer, data)
        if k == 0 and reused is not None:
            rec = {**reused, "collateral": None, "seconds": 0.0}
            m, ev, collateral = {"efficacy": rec["efficacy"]}, None, []
        else:
            if base is None:  # one copy of the base for every round: each round's LoRA is taken off it again
                base, tok = load_model(source, device=device)
            trained = []
            if k == 0 and adapter is not None:
                peft_model = load_adapter(base, adapter)
            else:
                trained = round_examples(layers, weights is not None, replay_old, seed, k)
                peft_model = train_lora(base, tok, replace(task, examples=trained),
                                        spec if weights is None else warm_spec, seed=seed, world=world,
                                        device=device, neighbour_answers=said,
                                        callbacks=[ContinueFrom(weights)] if weights is not None else None).model
            # the adapted side's scores (teacher-forced) are what the loop reads, not the answers' text: one token
            ev = evaluate(peft_model, tok, task, base=None, max_new_tokens=1)
            m = ev.metrics
            last = m["efficacy"] >= target or k + 1 == max_rounds  # no next layer: no collateral to look for
            collateral = (collateral_facts(peft_model, tok, world, task, prompts=mined, answers=said)
                          if strategy == "targeted" and not last else [])
            rec = {"round": k, "efficacy": m["efficacy"], "paraphrase": m["paraphrase"],
                   "specificity": m["specificity"], "tokens": tokens, "examples": len(data), "added": len(layers[-1]),
                   "added_tokens": count_tokens(tokenizer, layers[-1]), "trained": len(trained),
                   "trained_tokens": count_tokens(tokenizer, trained),
                   "failing": int((~ev.table("efficacy")["adapted_correct"].astype(bool)).sum()),
                   "collateral": len(collateral) if strategy == "targeted" and not last else None,
                   "anchors": n_anchors,
                   "seconds": 0.0}
            # a given adapter (round 0) need not have this spec's shape: the round after it trains from scratch
            weights = lora_weights(peft_model) if warm_start and not last and trained else None
            if k == 0:
                result.round0_weights = weights
            base = peft_model.unload()
            del peft_model
        anchored = collateral if anchors else []
        if ledger_id is not None and result.rounds:
            ledger.record(ledger_id, m["efficacy"] - result.rounds[-1]["efficacy"], seed=seed,
                          notes=f"{strategy} round {k}: efficacy {m['efficacy']:.3f} at {tokens} data tokens")
        reached = m["efficacy"] >= target
        if reached and result.tokens_to_target is None:
            result.tokens_to_target = tokens
        budget = schedule[k] if schedule is not None and k < len(schedule) else round_tokens
        budget = budget if token_budget is None else min(budget, token_budget - tokens)
        if reached or k + 1 == max_rounds or budget <= 0:
            rec["seconds"] = time.perf_counter() - t0
            result.rounds.append(rec)
            break
        if strategy == "targeted":
            layer, added_anchors = next_layer(ev, task, world, anchored, tokenizer, budget)
            n_anchors += added_anchors
        else:
            layer = random_layer(task, data, tokenizer, budget, rng)
        rec["seconds"] = time.perf_counter() - t0
        result.rounds.append(rec)
        if not layer:
            break
        layers.append(layer)
        data += layer
    return result


@styled
def plot_rounds(results: list[LoopResult], target: float | None = None, ax=None):
    """Efficacy (solid) and specificity (dashed) against data tokens, one colour per strategy."""
    import matplotlib.pyplot as plt

    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    for i, res in enumerate(results):
        t = res.table()
        colour = f"C{i}"
        ax.plot(t["tokens"], t["efficacy"], marker="o", lw=2, color=colour, label=f"{res.strategy}: efficacy")
        ax.plot(t["tokens"], t["specificity"], marker="s", lw=1.5, ls="--", color=colour,
                label=f"{res.strategy}: specificity")
    if target is not None:
        ax.axhline(target, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="data tokens trained on (cumulative)", ylabel="share of probes", ylim=(-0.05, 1.05),
           title="Loop against random data, round by round")
    ax.legend(fontsize=8)
    return fig


RATIO_CASES = {"both": "both reached the target",
               "random capped": "only the loop reached the target; the baseline counts at its tokens at the cap",
               "loop capped": "only the baseline reached the target; the loop counts at its tokens at the cap",
               "neither": "neither reached the target: no ratio"}
"""The cases of :func:`tokens_to_target_ratio`, with what each means."""


def tokens_to_target_ratio(loop: LoopResult, baseline: LoopResult) -> tuple[float | None, str]:
    """The headline number of the loop: its tokens to target over the random baseline's, and which case it is.

    A run that never reached the target counts at the data tokens of its last round (its tokens at the cap), but
    never at fewer than the other run's tokens to target: a run that did not get there is not said to have needed
    fewer tokens than one that did. So the ratio is ≤ 1 when only the loop reached the target (an upper bound: the
    baseline would have needed more), ≥ 1 when only the baseline did (a lower bound), and None when neither did.

    Args:
        loop: The targeted loop's result.
        baseline: The random baseline's result.

    Returns:
        ``(ratio, case)``: ``case`` is a key of :data:`RATIO_CASES`.

    Raises:
        ConfigError: Not two :class:`LoopResult` objects with rounds.

    Example:
        >>> tokens_to_target_ratio(loop, baseline)                   # doctest: +SKIP
        (0.85, 'both')
    """
    for name, res in (("loop", loop), ("baseline", baseline)):
        if not isinstance(res, LoopResult) or not res.rounds:
            raise ConfigError(f"{name}={type(res).__name__}: pass the LoopResult of run_loop (with its rounds)")
    a, b = loop.tokens_to_target, baseline.tokens_to_target
    if a is not None and b is not None:
        return a / b, "both"
    if a is not None:
        return a / max(baseline.rounds[-1]["tokens"], a), "random capped"
    if b is not None:
        return max(loop.rounds[-1]["tokens"], b) / b, "loop capped"
    return None, "neither"


def check_loop_winner(loop: LoopResult, baseline: LoopResult, answer: str) -> str:
    """Check the notebook-05 exercise: which strategy reached the target with fewer data tokens.

    Args:
        loop: The targeted loop's result.
        baseline: The random baseline's result.
        answer: ``"loop"``, ``"random"``, ``"tie"`` or ``"neither"`` (neither reached the target).

    Returns:
        A sentence saying whether the answer holds.
    """
    a, b = loop.tokens_to_target, baseline.tokens_to_target
    truth = ("neither" if a is None and b is None else "loop" if b is None or (a is not None and a < b)
             else "random" if a is None or b < a else "tie")
    if answer not in ("loop", "random", "tie", "neither"):
        return f"answer={answer!r}: use 'loop', 'random', 'tie' or 'neither'."
    if answer == truth:
        return "Yes. Now look at the rounds table: which kind of example made the difference?"
    return "Not what this run shows: compare tokens_to_target of both results (None = never reached)."
