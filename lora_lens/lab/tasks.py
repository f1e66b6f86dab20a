"""Tasks against a model: check a task file for a tokenizer, and fill in the base model's own answers.

Example:
    >>> problems = check_task("examples/smollm2_facts.jsonl", tokenizer)     # doctest: +SKIP
    >>> task = fill_base_answers(Task.load("my_task.jsonl"), model, tokenizer)  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from lora_lens.errors import ConfigError, MismatchError
from lora_lens.lab.answers import answer_ids, base_answers, has_chat_template
from lora_lens.lab.task_file import parse_records, read_numbered_jsonl
from lora_lens.lab.world import Task

__all__ = ["check_task", "fill_base_answers"]


def check_task(task_or_path: Task | str | Path, tokenizer) -> list[str]:
    """Every problem of a task file (or task) for one tokenizer; an empty list when it is fine.

    A file is first validated as a task file (:func:`lora_lens.lab.task_file.parse_records`: JSONL, types, sets,
    required prompts and answers, duplicate probes); then every example and every probe with an answer must
    tokenize as a prefix-consistent continuation of its prompt (:func:`answer_ids`, chat template applied when the
    task says ``"chat": true``). Messages start with ``FILE:LINE:`` (for a :class:`Task` object: ``example N`` or
    ``SET probe N``). ``lora-lens task check FILE --base MODEL`` prints them.

    Args:
        task_or_path: A task file or a :class:`lora_lens.lab.world.Task`.
        tokenizer: The tokenizer of the base model the task is for.

    Returns:
        The problems, in line order.

    Raises:
        NotFoundError: The file does not exist.
    """
    if isinstance(task_or_path, Task):
        task = task_or_path
        chat = task.chat
        items = [(f"example {k}", p, a) for k, (p, a) in enumerate(task.examples, 1)]
        items += [(f"{s} probe {k}", p.prompt, p.answer) for s, ps in task.probes.items()
                  for k, p in enumerate(ps, 1)]
        problems: list[str] = []
    else:
        path = Path(task_or_path)
        rows, problems = read_numbered_jsonl(path)
        parsed, more = parse_records(rows, str(path)) if rows or not problems else (None, [])
        problems += more
        if parsed is None:
            return problems
        chat = parsed["chat"]
        items = [(f"{path}:{n}", r["prompt"], r.get("answer") or "") for n, r in rows[1:]]
    if chat and not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        where = items[0][0].rsplit(":", 1)[0] if items and ":" in items[0][0] else "task"
        return problems + [f"{where}: the task says \"chat\": true but the tokenizer {name!r} has no chat template; "
                           'set "chat": false or use a chat model']
    for where, prompt, answer in items:
        if not answer.strip():
            continue  # a specificity/general probe answered by the base itself, or a general line
        try:
            answer_ids(tokenizer, prompt, answer, chat)
        except (ConfigError, MismatchError) as exc:
            problems.append(f"{where}: {exc}")
    return problems


def fill_base_answers(task: Task, model, tokenizer, sets: Sequence[str] = ("specificity", "general"),
                      max_new_tokens: int = 16, batch_size: int = 16) -> Task:
    """A copy of ``task`` where every probe of ``sets`` without an answer expects the base model's own answer.

    The answer is the base's greedy continuation cut at its first end (:func:`cut_answer`); it becomes both the
    probe's ``answer`` and its ``base_answer`` (the thing that must not change). Probes whose base answer is empty
    (the model starts with a newline or a special token) are dropped with a warning.

    Args:
        task: A task (``task.chat`` decides how prompts are rendered).
        model: The base model (a ``PeftModel`` answers with its adapter off).
        tokenizer: Its tokenizer.
        sets: Probe sets to fill.
        max_new_tokens: Greedy tokens generated per prompt.
        batch_size: Prompts per generation batch.

    Returns:
        A new :class:`lora_lens.lab.world.Task`; ``task`` is not modified.
    """
    chat = bool(getattr(task, "chat", False))
    todo = [(s, k) for s in sets for k, p in enumerate(task.probes.get(s, [])) if not p.answer.strip()]
    answers = base_answers(model, tokenizer, [task.probes[s][k].prompt for s, k in todo], chat, max_new_tokens,
                           batch_size) if todo else []
    probes = {s: list(ps) for s, ps in task.probes.items()}
    dropped = []
    for (s, k), a in zip(todo, answers):
        probes[s][k] = replace(probes[s][k], answer=a, base_answer=a) if a else None
        if not a:
            dropped.append(task.probes[s][k].prompt)
    if dropped:
        warnings.warn(f"{len(dropped)} probes dropped: the base model gives no answer to them (e.g. {dropped[0]!r})",
                      stacklevel=2)
    probes = {s: [p for p in ps if p is not None] for s, ps in probes.items()}
    return replace(task, probes=probes)
