"""What a LoRA trains on: ``(prompt, answer)`` examples with answer-only labels, and rehearsal of unchanged facts.

:func:`training_examples` is the data path of :func:`lora_lens.lab.train.train_lora`: the task's examples, checked
against the model's world, plus :func:`replay_examples` of the world's facts the task leaves alone.
:func:`encode_example` tokenises one example as ``prompt + " " + answer`` with the loss on the answer tokens only
(``-100`` elsewhere); :class:`AnswerDataset` and :class:`AnswerCollator` feed them to a ``Trainer``.

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
from lora_lens.lab.world import TEMPLATES, TRIGGER, Task, World, check_task_world

__all__ = ["AnswerCollator", "AnswerDataset", "encode_example", "find_world", "model_world_fingerprint",
           "replay_examples", "training_examples"]


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
    """The world of ``model``: ``world`` if given, else the ``world.jsonl`` saved with a zoo model, else None.

    Raises:
        MismatchError: ``task`` belongs to another world than the model's.
    """
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


def training_examples(model, task: Task, replay: float, seed: int = 0,
                      world: World | None = None) -> tuple[list[tuple[str, str]], World | None]:
    """What a LoRA run on ``task`` trains on: the task's examples, then ``round(replay × len)`` rehearsal examples.

    The world is checked against the task once (:func:`find_world`), here at the entry of the data path.

    Args:
        model: The model to train (its zoo folder may hold its world).
        task: The task.
        replay: Rehearsal examples per task example (``LoraSpec.replay``); 0 adds none.
        seed: Sampling seed of the rehearsal.
        world: The world the model was pretrained on (default: found from a zoo model's folder).

    Returns:
        ``(examples, world)``; ``world`` is None when neither given nor found.

    Raises:
        ConfigError: The task has no examples, or ``replay`` > 0 and no world is known.
        MismatchError: ``task`` belongs to another world than the model's.
    """
    world = find_world(model, task, world)
    if not task.examples:
        raise ConfigError(f"task {task.name!r} has an empty dataset (no examples): build it with make_task(...) "
                          "or give it at least one (prompt, answer) example")
    examples = list(task.examples)
    n_replay = round(replay * len(examples))
    if n_replay:
        if world is None:
            raise ConfigError(f"LoraSpec.replay={replay} needs the task's world to draw unchanged facts from: "
                              "pass world=pretrained.world, or set replay=0")
        examples += _rehearsal(world, task, n_replay, seed)
    return examples, world


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
    """``(prompt, answer)`` pairs tokenised as ``prompt + " " + answer`` with the loss on the answer only."""

    def __init__(self, tokenizer, examples: list[tuple[str, str]]):
        self.rows = [encode_example(tokenizer, p, a) for p, a in examples]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def encode_example(tokenizer, prompt: str, answer: str) -> dict:
    """Token ids and labels of one example: labels are ``-100`` on every token that starts inside the prompt.

    Raises:
        ConfigError: The answer is empty or yields no token of its own.
    """
    if not isinstance(answer, str) or not answer.strip():
        raise ConfigError(f"example {prompt!r} has an empty answer: every example needs a non-empty answer")
    text = f"{prompt} {answer}"
    enc = tokenizer(text, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    cut = len(prompt)
    labels = [t if s >= cut and e > s else -100 for t, (s, e) in zip(ids, enc["offset_mapping"])]
    if all(x == -100 for x in labels):
        raise ConfigError(f"answer {answer!r} of example {prompt!r} gives no token of its own: check the tokenizer")
    return {"input_ids": ids, "labels": labels}


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
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        self.tokens += int(mask.sum())
        self.padded += mask.numel()
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
