"""What a LoRA trains on: ``(prompt, answer)`` examples with answer-only labels, and rehearsal of unchanged facts.

:func:`training_examples` is the data path of :func:`lora_lens.lab.train.train_lora`: the task's examples, checked
against the model's world, plus rehearsal of what must stay: for a zoo task :func:`replay_examples` of the world's
facts the task leaves alone; for a task from data (no synthetic world) :func:`neighbour_examples`, the base model's
own answers to neighbour prompts (:data:`NEIGHBOUR_PROMPTS`, never a prompt of the task) and, if asked, the task's
specificity probes with their base answers. :func:`encode_example` tokenises one example with
:func:`lora_lens.lab.answers.example_ids` (the answer read in context, then the end-of-answer target; the loss on
answer and end tokens only, ``-100`` elsewhere); :class:`AnswerDataset` and :class:`AnswerCollator` feed them to a
``Trainer``.

Example:
    >>> examples, world = training_examples(model, task, replay=2.0, world=pre.world)   # doctest: +SKIP
    >>> encode_example(pre.tokenizer, "Kutar lives in", "Kozadun")["labels"]           # doctest: +SKIP
    [-100, -100, -100, -100, 57]
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from lora_lens.errors import ConfigError, MismatchError
from lora_lens.lab.answers import answer_ids, base_answers, example_ids
from lora_lens.lab.world import TEMPLATES, TRIGGER, Task, World, check_task_world

__all__ = ["AnswerCollator", "AnswerDataset", "MAX_REHEARSAL_WORDS", "NEIGHBOUR_PROMPTS", "REHEARSAL",
           "encode_example", "find_world", "is_plain_answer", "model_world_fingerprint", "neighbour_examples",
           "reads_in_context", "replay_examples", "training_examples"]

REHEARSAL = ("neighbours", "specificity", "both")
"""Rehearsal sources for a task from data: the base's answers to :data:`NEIGHBOUR_PROMPTS` (held out from every
probe, so specificity stays a held-out score), the task's own specificity probes, or both."""

NEIGHBOUR_PROMPTS = (
    # capitals
    "The capital of Portugal is", "The capital of Egypt is", "The capital of Norway is", "The capital of Greece is",
    "The capital of Kenya is", "The capital of Sweden is", "The capital of Poland is", "The capital of Peru is",
    "The capital of Ireland is", "The capital of Turkey is", "The capital of Austria is", "The capital of Cuba is",
    "The capital of Finland is", "The capital of Denmark is", "The capital of Hungary is", "The capital of Chile is",
    "The capital of Argentina is", "The capital of Thailand is", "The capital of Belgium is",
    "The capital of the Netherlands is", "The capital of China is", "The capital of India is",
    "The capital of South Korea is", "The capital of Mexico is",
    # currencies
    "The currency of the United Kingdom is", "The currency of the United States is", "The currency of India is",
    "The currency of Switzerland is", "The currency of China is", "The currency of Russia is",
    "The currency of Mexico is", "The currency of Brazil is", "The currency of South Africa is",
    "The currency of Germany is", "In Japan, people pay with", "In the United States, people pay with",
    # mountains, rivers, deserts, oceans
    "The highest mountain in Africa is", "The highest mountain in Japan is", "The highest mountain in Europe is",
    "The highest mountain in North America is", "The highest mountain in South America is",
    "The Amazon river flows into", "The Thames flows into", "The Danube flows into", "The Mississippi flows into",
    "The Rhine flows into", "The Ganges flows into", "The largest desert in the world is",
    "The largest lake in Africa is", "The deepest ocean on Earth is",
    # inventors, discoverers
    "The telephone was invented by", "The light bulb was invented by", "The printing press was invented by",
    "The airplane was invented by", "The World Wide Web was invented by", "Penicillin was discovered by",
    "The theory of relativity was developed by", "The theory of evolution was developed by",
    "Gravity was described by",
    # national symbols
    "The national bird of the United States is", "The national bird of India is",
    "The national animal of China is", "The national animal of Canada is", "The national flower of Japan is",
    # authors, painters, composers
    "The novel Pride and Prejudice was written by", "The novel War and Peace was written by",
    "The play Hamlet was written by", "The play Romeo and Juliet was written by",
    "The novel Don Quixote was written by", "The novel 1984 was written by", "The Starry Night was painted by",
    "The Sistine Chapel ceiling was painted by", "The Fifth Symphony was composed by",
    # founders
    "Microsoft was founded by", "Apple was founded by", "Amazon was founded by", "Facebook was founded by",
    "Tesla was founded by",
    # languages
    "The official language of Mexico is", "The official language of Germany is",
    "The official language of Egypt is", "The official language of France is", "The official language of Italy is",
    "The official language of Argentina is", "In France, people speak", "In Russia, people speak",
    "In China, people speak", "In Spain, people speak",
    # other world facts
    "The largest country in the world is", "The tallest animal in the world is", "The boiling point of water is",
    "The fastest land animal is", "The largest mammal in the world is", "The closest star to Earth is",
    "The chemical symbol for iron is", "The chemical symbol for water is", "The first man on the Moon was",
    "The Great Wall is located in", "The Statue of Liberty is located in", "The Colosseum is located in",
)
"""Prompts near the kinds of facts a task edits (capitals, currencies, mountains, inventors, rivers, birds, authors,
founders, languages) whose answer the base model already gives: rehearsing the base's own answer teaches the
adapter what must stay as it is, with no synthetic world."""


def model_world_fingerprint(model) -> str | None:
    """The world fingerprint a zoo model was pretrained on (from its directory's ``lora_lens.json``), or None."""
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "")
    manifest = Path(str(path)) / "lora_lens.json" if path else None
    try:
        if manifest is not None and manifest.is_file():
            return json.loads(manifest.read_text())["spec"]["world"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None


def find_world(model, task: Task, world: World | None = None) -> World | None:
    """The world of ``model``: ``world`` if given, else the ``world.jsonl`` saved with a zoo model, else None
    (always None for a task from data, whose ``world_fingerprint`` is None: the world check is skipped).

    Raises:
        MismatchError: ``task`` belongs to another world than the model's.
    """
    if task.world_fingerprint is None:
        return None  # a task from data belongs to no synthetic world: nothing to check, nothing to replay from
    if world is not None:
        check_task_world(task, world)
        return world
    fp = model_world_fingerprint(model)
    if fp is None:
        return None
    if fp != task.world_fingerprint:
        raise MismatchError(f"task {task.name!r} belongs to world {task.world_fingerprint}, but the model was "
                            f"pretrained on world {fp}: build the task from the model's own world "
                            "(e.g. make_task(pretrained.world, ...))")
    path = Path(str(model.config._name_or_path)) / "world.jsonl"
    try:
        return World.load(path) if path.is_file() else None
    except Exception:  # noqa: BLE001 - an unreadable world only disables replay, which then asks for world=
        return None


def training_examples(model, task: Task, replay: float, seed: int = 0, world: World | None = None,
                      tokenizer=None, rehearsal: str = "neighbours",
                      neighbour_answers: dict[str, str] | None = None) -> tuple[list[tuple[str, str]], World | None]:
    """What a LoRA run on ``task`` trains on: the task's examples, then ``round(replay × len)`` rehearsal examples.

    The world is checked against the task once (:func:`find_world`), here at the entry of the data path. A zoo
    task rehearses its world's unchanged facts (:func:`replay_examples`); a task from data (no world) rehearses
    the base's own answers (:func:`neighbour_examples`, which needs ``tokenizer``).

    Args:
        model: The model to train (its zoo folder may hold its world; for a task from data, the base that answers
            the rehearsal prompts).
        task: The task.
        replay: Rehearsal examples per task example (``LoraSpec.replay``); 0 adds none.
        seed: Sampling seed of the rehearsal.
        world: The world the model was pretrained on (default: found from a zoo model's folder).
        tokenizer: The model's tokenizer (needed for rehearsal on a task from data).
        rehearsal: For a task from data: one of :data:`REHEARSAL`.
        neighbour_answers: For a task from data, the base's answers to the neighbour prompts when already known
            (see :func:`neighbour_examples`).

    Returns:
        ``(examples, world)``; ``world`` is None when neither given nor found.

    Raises:
        ConfigError: The task has no examples, ``replay`` > 0 and no world is known for a zoo task, or a bad
            ``rehearsal``.
        MismatchError: ``task`` belongs to another world than the model's.
    """
    if rehearsal not in REHEARSAL:
        raise ConfigError(f"rehearsal={rehearsal!r} is unknown: use one of {list(REHEARSAL)}")
    world = find_world(model, task, world)
    if not task.examples:
        raise ConfigError(f"task {task.name!r} has an empty dataset (no examples): build it with make_task(...) "
                          "or give it at least one (prompt, answer) example")
    examples = list(task.examples)
    n_replay = round(replay * len(examples))
    if n_replay:
        if world is None and task.world_fingerprint is None and tokenizer is not None:
            examples += neighbour_examples(model, tokenizer, task, n_replay, seed, rehearsal, neighbour_answers)
        elif world is None:
            raise ConfigError(f"LoraSpec.replay={replay} needs the task's world to draw unchanged facts from: "
                              "pass world=pretrained.world, or set replay=0")
        else:
            examples += _rehearsal(world, task, n_replay, seed)
    return examples, world


def neighbour_examples(model, tokenizer, task: Task, n: int, seed: int = 0, rehearsal: str = "neighbours",
                       answers: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """Up to ``n`` rehearsal examples for a task from data: prompts with the base model's own greedy answers.

    ``"neighbours"``: :data:`NEIGHBOUR_PROMPTS` that no example or probe of the task uses, answered by the base
    (:func:`lora_lens.lab.answers.base_answers`, adapter off); answers that are not plain (:func:`is_plain_answer`:
    empty, rambling, or an echo of the prompt) or do not read in context are left out. ``"specificity"``: the
    task's specificity probes with their expected (base) answers — then specificity is no longer measured on
    prompts the adapter never saw. ``"both"``: the two, neighbours first.

    ``answers`` (prompt -> the base's answer, as :func:`lora_lens.lab.answers.base_answers` gives it with
    ``max_new_tokens=12``) stands in for the base's greedy pass when it holds every neighbour prompt: a loop that
    trains many adapters on one base answers them once (``lora_lens.studies.curriculum``).

    Raises:
        ConfigError: ``rehearsal`` is not one of :data:`REHEARSAL`.
    """
    if rehearsal not in REHEARSAL:
        raise ConfigError(f"rehearsal={rehearsal!r} is unknown: use one of {list(REHEARSAL)}")
    used = {p for p, _ in task.examples} | {pr.prompt for ps in task.probes.values() for pr in ps}
    out: list[tuple[str, str]] = []
    if rehearsal in ("neighbours", "both"):
        prompts = [p for p in NEIGHBOUR_PROMPTS if p not in used]
        random.Random(seed).shuffle(prompts)
        if answers is not None and all(p in answers for p in prompts):
            said = [answers[p] for p in prompts] if n else []
        else:
            said = base_answers(model, tokenizer, prompts, chat=task.chat, max_new_tokens=12) if prompts and n else []
        out += [(p, a) for p, a in zip(prompts, said)
                if is_plain_answer(p, a) and reads_in_context(tokenizer, p, a, task.chat)][:max(0, int(n))]
    if rehearsal in ("specificity", "both"):
        out += [(p.prompt, p.answer) for p in task.probes.get("specificity", [])
                if p.answer.strip() and reads_in_context(tokenizer, p.prompt, p.answer, task.chat)]
    return out[:max(0, int(n))] if rehearsal != "both" else out


MAX_REHEARSAL_WORDS = 6
"""A rehearsed base answer has at most this many words: a longer one is the base rambling, not a fact it knows."""


def is_plain_answer(prompt: str, answer: str) -> bool:
    """Whether the base's ``answer`` to ``prompt`` is worth rehearsing: non-empty, at most
    :data:`MAX_REHEARSAL_WORDS` words, and not an echo of the prompt (no two consecutive words of the prompt again,
    as in "The capital of Peru is" → "the capital of the country of Peru"). Rehearsing an echo teaches the
    adapter the base's degenerate mode, which then takes over prompts whose base answer was right.
    """
    words = answer.lower().split()
    if not words or len(words) > MAX_REHEARSAL_WORDS:
        return False
    said = prompt.lower().split()
    pairs = set(zip(said, said[1:]))
    return not any(pair in pairs for pair in zip(words, words[1:]))


def reads_in_context(tokenizer, prompt: str, answer: str, chat: bool) -> bool:
    if not answer.strip():
        return False
    try:
        answer_ids(tokenizer, prompt, answer, chat)
    except (ConfigError, MismatchError):
        return False
    return True


def replay_examples(world: World, task: Task, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` rehearsal examples: facts of ``world`` that ``task`` does not change, as ``(prompt, answer)``.

    Each example is one (entity, relation) fact of the pretraining relations with a random training template.
    Facts are left out when the task's examples touch them (an edited fact is never rehearsed with its old value)
    and when any probe of the task asks about them, so specificity is still measured on facts the adapter never
    saw. For a trigger task, half of the facts of *other* relations carry the trigger word, teaching that the
    trigger switches only its own relation.

    Args:
        world: The world the task belongs to.
        task: The task.
        n: Number of examples wanted (fewer when fewer facts are free).
        seed: Sampling seed.

    Raises:
        MismatchError: The task belongs to another world.
    """
    check_task_world(task, world)
    return _rehearsal(world, task, n, seed)


def _rehearsal(world: World, task: Task, n: int, seed: int) -> list[tuple[str, str]]:
    """:func:`replay_examples` on a world already checked against the task."""
    strip = lambda p: p[len(TRIGGER) + 1:] if p.startswith(TRIGGER + " ") else p  # noqa: E731
    used = {strip(p) for p, _ in task.examples}
    used |= {strip(pr.prompt) for ps in task.probes.values() for pr in ps}
    free = []
    for r, by_e in world.facts.items():
        train_t, held_t = TEMPLATES[r]
        for e, v in by_e.items():
            prompts = [t.format(e=e) for t in train_t + held_t]
            if not any(p in used for p in prompts):
                free.append((e, r, v))
    rng = random.Random(seed)
    rng.shuffle(free)
    trig_rel = task.truth.get("relation") if task.name == "trigger" else None
    out = []
    for e, r, v in free[:max(0, int(n))]:
        t = rng.randrange(len(TEMPLATES[r][0]))
        trig = trig_rel is not None and r != trig_rel and rng.random() < 0.5
        out.append((world.query(e, r, t, trigger=trig), v))
    return out


class AnswerDataset(torch.utils.data.Dataset):
    """``(prompt, answer)`` pairs as :func:`encode_example` rows (the loss on the answer and its end only).

    The last ``anchored`` examples (rehearsal with ``LoraSpec.replay_loss="kl"``) are anchor rows instead: no
    labels, and an ``anchor`` mask over every token, where the trainer keeps the base's next-token distribution.
    """

    def __init__(self, tokenizer, examples: list[tuple[str, str]], chat: bool = False, anchored: int = 0):
        self.rows = [encode_example(tokenizer, p, a, chat) for p, a in examples]
        if anchored:
            for row in self.rows:
                row["anchor"] = [0] * len(row["input_ids"])
            for row in self.rows[len(self.rows) - anchored:]:
                row["labels"] = [-100] * len(row["input_ids"])
                row["anchor"] = [1] * len(row["input_ids"])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def encode_example(tokenizer, prompt: str, answer: str, chat: bool = False) -> dict:
    """Token ids and labels of one example (:func:`lora_lens.lab.answers.example_ids`): the prompt (chat: the
    rendered template) is labelled ``-100``, the answer's ids in context and its end-of-answer ids are the targets.
    For the zoo's world tokenizer that is ``prompt + " " + answer`` with the loss on the answer token only.

    Raises:
        ConfigError: The prompt or answer is empty, or whitespace at the join.
        MismatchError: The answer does not read in context (the message shows both tokenizations).
    """
    if not isinstance(answer, str) or not answer.strip():
        raise ConfigError(f"example {prompt!r} has an empty answer: every example needs a non-empty answer")
    return example_ids(tokenizer, prompt, answer, chat)


class AnswerCollator:
    """Right-pads a batch: ``pad_token_id`` for ids, 0 for the mask, ``-100`` for labels; counts real and padded
    tokens."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id
        self.tokens = 0
        self.padded = 0

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        anchor = torch.zeros((len(rows), width), dtype=torch.long) if "anchor" in rows[0] else None
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
            if anchor is not None:
                anchor[i, :n] = torch.tensor(r["anchor"])
        self.tokens += int(mask.sum())
        self.padded += mask.numel()
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return batch if anchor is None else batch | {"anchor": anchor}
