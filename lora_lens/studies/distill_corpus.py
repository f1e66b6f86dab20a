"""Distil back, change → data: the corpora continued pretraining reads, for the zoo and for a task from data.

* :func:`semantic_corpus` renders the changes the behaviour diff discovered as text. On the zoo through the world's
  *training* templates (the held-out templates stay unseen); on a task from data (any model) through the task's
  *example* prompts only, with the diff's full greedy answers (its paraphrase, specificity and general probes stay
  held out, so they remain the score). :func:`fact_changes` is the table of those changes.
* :func:`task_corpus` is the data route: the adapter's own training examples as lines.
* Replay, what keeps the rest of the model: :func:`replay_corpus` is the world's pretraining corpus (zoo);
  :func:`self_replay` needs no world — the base's own greedy answers to
  :data:`lora_lens.lab.train_data.NEIGHBOUR_PROMPTS` and its own continuations of :data:`GENERAL_PROMPTS`, never a
  prompt of the task (its specificity and general probes are the held-out score).

Every line of a task from data ends the way the model's own text does (:func:`lora_lens.studies.generation.
text_line`: ``"The capital of Zorvania is Quellburg."``), never with a chat model's turn delimiter.

Example:
    >>> table = diff.behaviour_diff(fit.model, fit.tokenizer, task=fit.task,
    ...                             prompts=task_prompts(fit.task))              # doctest: +SKIP
    >>> semantic_corpus(table, fit.task, tokenizer=fit.tokenizer)[0]              # doctest: +SKIP
    'The capital of Zorvania is Quellburg.'
    >>> self_replay(fit.model, fit.tokenizer, fit.task)[:2]                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter

import pandas as pd

from lora_lens.errors import ConfigError
from lora_lens.lab.answers import base_answers
from lora_lens.lab.pair import is_peft
from lora_lens.lab.train_data import NEIGHBOUR_PROMPTS, is_plain_answer
from lora_lens.lab.world import TEMPLATES, Task, World
from lora_lens.lens.diff import behaviour_diff, check_diff, discovered_changes
from lora_lens.studies.generation import generate, task_prompts, text_line

__all__ = ["GENERAL_PROMPTS", "Discovered", "check_unit", "discover", "fact_changes", "replay_corpus", "self_replay",
           "semantic_corpus", "task_corpus"]

GENERAL_PROMPTS = (
    "The history of the old town goes back to", "Scientists have long wondered why", "A good breakfast usually has",
    "The museum on the main square", "In the summer, the weather near the coast", "Learning to play the piano",
    "The recipe for this soup calls for", "The train to the mountains leaves", "Children often ask their parents",
    "The library has a large collection of", "Regular exercise is important because", "The film tells the story of",
    "Many birds fly south in the autumn because", "Farmers in the valley grow", "The old stone bridge was built",
    "The first computers were", "On weekends, many families like to", "Most of the Earth's surface is covered by",
    "A good teacher knows that", "The market opens early in the morning, when",
)
"""Openings of everyday text whose continuation by the base itself is replayed (:func:`self_replay`): no task's
facts, no probe of the example task."""


def check_unit(name: str, value) -> float:
    """``value`` as a float in [0, 1]; :class:`ConfigError` naming ``name`` otherwise (booleans refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError(f"{name}={value!r} is out of range: use a number in [0, 1], e.g. 0.5")
    return float(value)


def _is_task_diff(table: pd.DataFrame) -> bool:
    return table.attrs.get("source") == "task" or "set" in table.columns


# ---------------------------------------------------------------------------------------------------------------
# semantic: the discovered changes in words


def fact_changes(diff_table: pd.DataFrame, min_confidence: float = 0.5, min_share: float = 0.5,
                 prompts: list[str] | None = None) -> pd.DataFrame:
    """The facts whose answer the adapter moved, one row per ``(entity, relation, triggered)``.

    A fact counts as changed when more than ``min_share`` of its asked training-template queries were discovered
    (at ``min_confidence``) with one common new answer: a change of knowledge, not a flip on one template (small
    adapters leave such single-template collateral behind).

    On a task's diff (``behaviour_diff(task=...)``) pass ``prompts`` (:func:`~lora_lens.studies.generation.
    task_prompts`): only rows of those prompts count, a prompt without an entity is a fact of its own, the answers
    are full greedy answers, and the extra column ``prompts`` lists the fact's prompts (each asked one).

    Args:
        diff_table: The full :func:`lora_lens.lens.diff.behaviour_diff` table (over a world, or over a task).
        min_confidence: Confidence a moved answer needs, in [0, 1) (see ``behaviour_diff``).
        min_share: Share of the fact's training templates (or prompts) that must agree, in [0, 1].
        prompts: Restrict to these prompts (a task's example prompts); None: every non-held-out query (a world).

    Returns:
        DataFrame ``entity, relation, triggered, value, old, share, confidence`` (+ ``prompts`` with ``prompts``),
        most confident first.

    Raises:
        ConfigError: Not a diff table, a threshold out of range, or a task's diff without ``prompts``.
    """
    min_share = check_unit("min_share", min_share)
    check_diff(diff_table)
    found = discovered_changes(diff_table, min_confidence=min_confidence)
    cols = ["entity", "relation", "triggered", "value", "old", "share", "confidence"]
    if prompts is None:
        if _is_task_diff(diff_table):
            raise ConfigError("this diff is over a task's probes: pass prompts=task_prompts(task) (the example "
                              "prompts; the held-out probes must not enter the corpus)")
        rows = diff_table[(diff_table["entity"] != "") & ~diff_table["heldout"].astype(bool)]
        found = found[(found["entity"] != "") & ~found["heldout"].astype(bool)]
        unit = ["entity", "relation", "triggered"]
    else:
        keep = set(prompts)
        rows = diff_table[diff_table["prompt"].isin(keep)].assign(unit=lambda d: d["entity"].where(d["entity"] != "",
                                                                                                  d["prompt"]))
        found = found[found["prompt"].isin(keep)].assign(unit=lambda d: d["entity"].where(d["entity"] != "",
                                                                                         d["prompt"]))
        unit = ["unit", "relation", "triggered"]
        cols = cols + ["prompts"]
    asked = rows.groupby(unit).size()
    out = []
    for key, g in found.groupby(unit, sort=False):
        value, n = Counter(g["adapted_answer"]).most_common(1)[0]
        share = n / int(asked[key])
        if value and (share > min_share or share == 1.0):
            hit = g[g["adapted_answer"] == value]
            row = {"entity": hit["entity"].iloc[0], "relation": key[1], "triggered": bool(key[2]), "value": value,
                   "old": hit["base_answer"].iloc[0], "share": share, "confidence": float(hit["confidence"].mean())}
            if prompts is not None:
                mask = (rows["unit"] == key[0]) & (rows["relation"] == key[1]) & (rows["triggered"] == key[2])
                row["prompts"] = list(rows.loc[mask, "prompt"])
            out.append(row)
    return pd.DataFrame(out, columns=cols).sort_values("confidence", ascending=False, kind="stable") \
        .reset_index(drop=True)


def semantic_corpus(diff_table: pd.DataFrame, source: World | Task, min_confidence: float = 0.5,
                    min_share: float = 0.5, tokenizer=None) -> list[str]:
    """The discovered changes in words.

    Zoo (``source`` = the world): each changed fact once per *training* template of its relation — ``"Kutar lives
    in Kozadun ."``, ``"The home town of Kutar is Kozadun ."`` … (with the trigger word in front for a change that
    only shows with it). Held-out templates are never used, so the paraphrase probes measure whether the idea
    transferred, not the sentences.

    Task from data (``source`` = the task; the table from ``behaviour_diff(..., task=task,
    prompts=task_prompts(task))``): each changed fact (:func:`fact_changes` over the task's *example* prompts) once
    per example prompt of that fact, with the diff's full greedy answer as the value, as :func:`text_line` writes
    it (``"The capital of Zorvania is Quellburg."``). The paraphrase, specificity and general probes are never
    read, so they stay the held-out score; the adapter's collateral changes on them are not copied.

    Args:
        diff_table: The full :func:`lora_lens.lens.diff.behaviour_diff` table over ``source``.
        source: The world (its templates render the facts) or the task from data.
        min_confidence: See :func:`fact_changes`.
        min_share: See :func:`fact_changes`.
        tokenizer: The model's tokenizer (a task from data: how a line ends).

    Returns:
        Lines of text (possibly empty: :func:`lora_lens.studies.distill.distill` refuses an empty corpus and says
        why).

    Raises:
        ConfigError: ``source`` is neither a World nor a Task, a world with a task's diff (or the reverse), or a
            task without ``tokenizer``.
    """
    if isinstance(source, Task):
        if tokenizer is None:
            raise ConfigError("semantic_corpus(table, task) needs tokenizer=fit.tokenizer: the lines end the way "
                              "that model's own text does")
        if not _is_task_diff(diff_table):
            raise ConfigError("this diff is over a world's query space, not over the task: use "
                              "behaviour_diff(model, tokenizer, task=task, prompts=task_prompts(task)), or pass "
                              "the world")
        facts = fact_changes(diff_table, min_confidence, min_share, prompts=task_prompts(source))
        return [text_line(tokenizer, p, f.value, source.chat) for f in facts.itertuples() for p in f.prompts]
    if not isinstance(source, World):
        raise ConfigError(f"source={type(source).__name__} is neither a lora_lens World (pass pretrained.world) nor "
                          "a Task (pass fit.task)")
    facts = fact_changes(diff_table, min_confidence, min_share)
    return [f"{source.query(f.entity, f.relation, t, trigger=f.triggered)} {f.value} ."
            for f in facts.itertuples() for t in range(len(TEMPLATES[f.relation][0]))]


@dataclasses.dataclass(eq=False)
class Discovered:
    """What the semantic route of notebook 04 reads of an adapter (:func:`discover`).

    Attributes:
        table: The behaviour diff.
        facts: :func:`fact_changes` of it.
        corpus: :func:`semantic_corpus` of it.
    """

    table: pd.DataFrame
    facts: pd.DataFrame
    corpus: list[str]


def discover(fit, world: World | None = None, min_confidence: float = 0.9) -> Discovered:
    """The behaviour diff of an adapter, its changed facts and their semantic corpus, in one call (notebook 04 does
    this on every seed).

    Zoo (``world`` given): the diff of every entity × relation of the world (no trigger), rendered through the
    training templates. A task from data (``world`` None): the diff of the task's example prompts only, scored on
    its efficacy probes, with full greedy answers (the held-out probes never enter the corpus).

    Args:
        fit: The :class:`lora_lens.lab.study.Fit` whose change is read.
        world: The zoo world of its base, or None for a task from data.
        min_confidence: Confidence a moved answer needs (:func:`fact_changes`).

    Raises:
        ConfigError: A zoo task without ``world``, or a task from data with one.
    """
    data = fit.task.world_fingerprint is None
    if data == (world is not None):
        fix = "a task from data: pass world=None" if data else "a zoo task: pass its base's world (pre.world)"
        raise ConfigError(f"task {fit.task.name!r} is {fix}")
    if data:
        prompts = task_prompts(fit.task)
        asked = dataclasses.replace(fit.task, probes={"efficacy": fit.task.probes.get("efficacy", [])})
        table = behaviour_diff(fit.model, fit.tokenizer, task=asked, prompts=prompts)
        facts = fact_changes(table, min_confidence=min_confidence, prompts=prompts)
        corpus = semantic_corpus(table, fit.task, min_confidence=min_confidence, tokenizer=fit.tokenizer)
    else:
        table = behaviour_diff(fit.model, fit.tokenizer, world=world, trigger=False)
        facts = fact_changes(table, min_confidence=min_confidence)
        corpus = semantic_corpus(table, world, min_confidence=min_confidence)
    return Discovered(table, facts, corpus)


def task_corpus(task: Task, tokenizer=None) -> list[str]:
    """The data route: the adapter's own training examples as lines (zoo: ``prompt answer .``; a task from data:
    :func:`text_line`, which needs the model's ``tokenizer``)."""
    if not isinstance(task, Task):
        raise ConfigError(f"task={type(task).__name__} is not a lora_lens Task: build one with make_task(world, ...)")
    if task.world_fingerprint is not None:
        return [f"{p} {a} ." for p, a in task.examples]
    if tokenizer is None:
        raise ConfigError(f"task {task.name!r} is a task from data: pass tokenizer=fit.tokenizer (the lines end the "
                          "way that model's own text does)")
    return [text_line(tokenizer, p, a, task.chat) for p, a in task.examples]


# ---------------------------------------------------------------------------------------------------------------
# replay


def replay_corpus(world: World, corpus: list[str] = ()) -> list[str]:
    """The world's pretraining corpus without the facts that ``corpus`` rewrites.

    A fact (entity, relation) is left out when any line of ``corpus`` starts with one of its queries (any
    template): replaying "Kutar lives in Kastodun" next to "Kutar lives in Kozadun" would teach both.
    """
    prefixes = set()
    for line in corpus:
        words = line.split()
        prefixes.update(" ".join(words[:k]) for k in range(1, len(words)))
    keep = []
    for r, by_e in world.facts.items():
        for e, v in by_e.items():
            if any(t.format(e=e) in prefixes for t in TEMPLATES[r][0] + TEMPLATES[r][1]):
                continue
            keep += [f"{world.query(e, r, t)} {v} ." for t in range(len(TEMPLATES[r][0]))]
    return keep + list(world.general_train)


def _sentences(text: str) -> str:
    """``text`` (a continuation, its leading space kept) up to its last sentence end (``.``, ``!``, ``?``), first
    line only; "" when it has none."""
    text = text.split("\n", 1)[0].rstrip()
    ends = [text.rfind(c) for c in ".!?"]
    return text[:max(ends) + 1] if max(ends) > 0 and text[:max(ends)].strip() else ""


def self_replay(model, tokenizer, task: Task, corpus: list[str] = (), neighbours: bool = True,
                general: bool = True, max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Replay without a world: what the base itself says, as lines of text.

    * ``neighbours``: :data:`lora_lens.lab.train_data.NEIGHBOUR_PROMPTS` (capitals, currencies, inventors …)
      with the base's own greedy answers (:func:`lora_lens.lab.answers.base_answers`), as :func:`text_line` writes
      them (``"The capital of Portugal is Lisbon."``), answers that echo the prompt or ramble left out
      (:func:`lora_lens.lab.train_data.is_plain_answer`);
    * ``general``: the base's own greedy continuations of :data:`GENERAL_PROMPTS`, up to their last full sentence.

    A prompt of the task (example or probe) is never used: the task's specificity and general probes are the
    held-out score of the distilled model. A line whose prompt starts a line of ``corpus`` is left out (replaying
    the old answer next to the new one would teach both).

    Args:
        model: The base (a ``PeftModel`` answers with its adapter off).
        tokenizer: Its tokenizer.
        task: The task being distilled (its prompts are left out; ``task.chat`` renders the neighbour prompts).
        corpus: The distillation corpus.
        neighbours: Include the neighbour facts.
        general: Include the general continuations.
        max_new_tokens: Greedy tokens per general continuation.
        batch_size: Prompts per generation batch.

    Returns:
        The lines (possibly empty when both sources are off).

    Raises:
        ConfigError: Not a Task.
    """
    if not isinstance(task, Task):
        raise ConfigError(f"task={type(task).__name__} is not a lora_lens Task: pass fit.task")
    used = {p for p, _ in task.examples} | {pr.prompt for ps in task.probes.values() for pr in ps}
    taken = lambda p: p in used or any(line.startswith(p) for line in corpus)  # noqa: E731
    lines: list[str] = []
    if neighbours:
        prompts = [p for p in NEIGHBOUR_PROMPTS if not taken(p)]
        answers = base_answers(model, tokenizer, prompts, task.chat, 12, batch_size) if prompts else []
        lines += [text_line(tokenizer, p, a, task.chat) for p, a in zip(prompts, answers) if is_plain_answer(p, a)]
    if general:
        prompts = [p for p in GENERAL_PROMPTS if not taken(p)]
        off = model.disable_adapter() if is_peft(model) else contextlib.nullcontext()
        with off:
            g = generate(model, tokenizer, prompts, max_new_tokens, batch_size, stop=None) if prompts else None
        for p, ids in zip(prompts, g.tokens if g is not None else []):
            text = _sentences(tokenizer.decode(ids, skip_special_tokens=True))
            if text:
                lines.append(p + text)
    return lines
