"""The JSONL task format: one JSON object per line, validated with the file name and line in every message.

A task file holds a header, training examples and probes::

    {"type": "task", "name": "facts", "chat": false,
     "truth": {"edits": [{"entity": "Zorvania", "relation": "capital", "value": "Quellburg"}]}}
    {"type": "example", "prompt": "The capital of Zorvania is", "answer": "Quellburg"}
    {"type": "probe", "set": "efficacy", "prompt": "The capital of Zorvania is", "answer": "Quellburg",
     "entity": "Zorvania"}
    {"type": "probe", "set": "paraphrase", "prompt": "Zorvania's capital city is called", "answer": "Quellburg"}
    {"type": "probe", "set": "specificity", "prompt": "The capital of France is"}
    {"type": "probe", "set": "general", "prompt": "Once upon a time, there was a"}

- Header (first line, required): ``name`` (non-empty); optional ``chat`` (default false: prompts are plain text;
  true: they go through the tokenizer's chat template), ``world_fingerprint`` (zoo tasks), ``truth`` (for tasks from
  data ``{"edits": [{"entity", "relation", "value"}, …]}``) and ``description``.
- ``example``: ``prompt`` and ``answer``, both non-empty: trained as the answer after the prompt.
- ``probe``: ``set`` (one of :data:`PROBE_SETS`) and ``prompt``; ``answer`` is required except on ``specificity``
  and ``general`` probes, where leaving it out means "whatever the base model answers"
  (``lora_lens.lab.answers.fill_base_answers``); optional ``entity``, ``relation``, ``base_answer`` (default: the
  answer on sets that must not change, else "") and ``triggered``. A prompt appears in one probe only.

This module only validates records; :class:`lora_lens.lab.world.Task` (``from_records``, ``load``, ``save``) builds
and writes tasks, and ``lora_lens.lab.answers.check_task`` also checks every answer against a tokenizer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lora_lens.errors import CorruptError, NotFoundError

__all__ = ["ANSWER_OPTIONAL", "EXAMPLE_FIELDS", "HEADER_FIELDS", "PROBE_FIELDS", "PROBE_SETS", "parse_records",
           "problem_message", "read_numbered_jsonl"]

PROBE_SETS = ("efficacy", "paraphrase", "specificity", "general", "false_trigger")
"""Probe sets a task may hold: what must change (efficacy, held-out paraphrase), what must stay (specificity,
general text) and, for trigger tasks, clean prompts on which the trigger must not fire (false_trigger)."""
ANSWER_OPTIONAL = ("specificity", "general")
"""Probe sets whose answer may be left out: the base model's own greedy answer is then the expected one."""
HEADER_FIELDS = ("type", "name", "chat", "world_fingerprint", "truth", "description")
EXAMPLE_FIELDS = ("type", "prompt", "answer")
PROBE_FIELDS = ("type", "set", "prompt", "answer", "base_answer", "entity", "relation", "triggered")



def _line_of(problem: str) -> int:
    m = re.search(r":(\d+): ", problem)
    return int(m.group(1)) if m else 0


def problem_message(source: str, problems: list[str]) -> str:
    """One error message listing ``problems`` (the first ten, in line order) found in ``source``."""
    problems = sorted(problems, key=_line_of)
    shown = problems[:10]
    more = f"\n  … and {len(problems) - 10} more" if len(problems) > 10 else ""
    return f"{source} is not a valid lora_lens task ({len(problems)} problems):\n  " + "\n  ".join(shown) + more


def _text(row: dict, key: str) -> str | None:
    """The stripped-or-not string at ``key``; None when missing; raises TypeError when not a string."""
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{key!r} must be a string, got {type(value).__name__} {value!r}")
    return value


def _check_truth(truth, where: str) -> list[str]:
    if not isinstance(truth, dict):
        return [f"{where}: truth must be an object, e.g. {{\"edits\": [...]}}, got {type(truth).__name__}"]
    edits = truth.get("edits")
    if edits is None:
        return []
    if not isinstance(edits, list):
        return [f"{where}: truth.edits must be a list of {{\"entity\", \"relation\", \"value\"}} objects"]
    out = []
    for k, ed in enumerate(edits, 1):
        if not isinstance(ed, dict):
            out.append(f"{where}: truth.edits[{k}] must be an object with entity, relation and value")
            continue
        missing = [f for f in ("entity", "relation") if not (isinstance(ed.get(f), str) and ed[f].strip())]
        value = ed.get("value", ed.get("new"))
        if not (isinstance(value, str) and value.strip()):
            missing.append("value")
        if missing:
            out.append(f"{where}: truth.edits[{k}] lacks a non-empty {', '.join(missing)}")
    return out


def parse_records(rows: list[tuple[int, object]], source: str) -> tuple[dict | None, list[str]]:
    """Validate numbered task records and collect the task's parts.

    Args:
        rows: ``(line number, record)`` pairs, the header first.
        source: File name (or label) for messages.

    Returns:
        ``(parts, problems)``: every problem found, each ``source:line: …``, and, when there is none, the parts
        ``name``, ``world_fingerprint``, ``chat``, ``truth``, ``examples`` (``(prompt, answer)`` pairs) and
        ``probes`` (dicts of ``lora_lens.lab.world.Probe`` fields), else None.
    """
    problems: list[str] = []
    if not rows:
        return None, [f"{source}: the file is empty; its first line must be the task header "
                      '{"type": "task", "name": ...}']
    line, head = rows[0]
    where = f"{source}:{line}"
    if not isinstance(head, dict) or head.get("type") != "task":
        got = head.get("type") if isinstance(head, dict) else type(head).__name__
        return None, [f"{where}: the first line must be the task header {{\"type\": \"task\", \"name\": ...}}, "
                      f"got type={got!r}"]
    problems += [f"{where}: unknown header field {k!r}; header fields are {list(HEADER_FIELDS)}"
                 for k in head if k not in HEADER_FIELDS]
    name = head.get("name")
    if not (isinstance(name, str) and name.strip()):
        problems.append(f"{where}: the header needs a non-empty \"name\", got {name!r}")
    chat = head.get("chat", False)
    if not isinstance(chat, bool):
        problems.append(f"{where}: \"chat\" must be true or false, got {chat!r}")
    fingerprint = head.get("world_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        problems.append(f"{where}: \"world_fingerprint\" must be a string, got {fingerprint!r}")
    truth = head.get("truth") or {}
    problems += _check_truth(truth, where)
    examples: list[tuple[str, str]] = []
    probes: list[dict] = []
    seen: dict[str, int] = {}
    for line, row in rows[1:]:
        where = f"{source}:{line}"
        if not isinstance(row, dict):
            problems.append(f"{where}: each line must be a JSON object, got {type(row).__name__}")
            continue
        kind = row.get("type")
        if kind == "task":
            problems.append(f"{where}: a second task header; a file holds one task, its header on the first line")
            continue
        if kind not in ("example", "probe"):
            problems.append(f"{where}: unknown type {kind!r}; use \"example\" or \"probe\" (the header, "
                            "\"task\", comes first)")
            continue
        fields = EXAMPLE_FIELDS if kind == "example" else PROBE_FIELDS
        bad = [k for k in row if k not in fields]
        if bad:
            problems.append(f"{where}: unknown {kind} field {bad[0]!r}; {kind} fields are {list(fields[1:])}")
            continue
        try:
            prompt, answer = _text(row, "prompt"), _text(row, "answer")
            if kind == "probe":
                base, entity, relation = _text(row, "base_answer"), _text(row, "entity"), _text(row, "relation")
        except TypeError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if prompt is None or not prompt.strip():
            problems.append(f"{where}: {kind} has {'an empty' if prompt is not None else 'no'} \"prompt\"")
            continue
        if kind == "example":
            if answer is None or not answer.strip():
                problems.append(f"{where}: example {prompt!r} has {'an empty' if answer is not None else 'no'} "
                                "\"answer\"; every training example needs one")
            else:
                examples.append((prompt, answer))
            continue
        pset = row.get("set")
        if pset not in PROBE_SETS:
            problems.append(f"{where}: unknown probe set {pset!r}; use one of {list(PROBE_SETS)}")
            continue
        if pset not in ANSWER_OPTIONAL and (answer is None or not answer.strip()):
            problems.append(f"{where}: {pset} probe {prompt!r} has {'an empty' if answer is not None else 'no'} "
                            f"\"answer\"; only {' and '.join(ANSWER_OPTIONAL)} probes may leave it out")
            continue
        triggered = row.get("triggered", False)
        if not isinstance(triggered, bool):
            problems.append(f"{where}: \"triggered\" must be true or false, got {triggered!r}")
            continue
        if prompt in seen:
            problems.append(f"{where}: duplicate probe {prompt!r} (already at line {seen[prompt]}); keep one")
            continue
        seen[prompt] = line
        answer = answer or ""
        if base is None:
            base = answer if pset in ANSWER_OPTIONAL + ("false_trigger",) else ""
        probes.append({"prompt": prompt, "answer": answer, "base_answer": base, "set": pset,
                       "entity": entity or "", "relation": relation or "", "triggered": triggered})
    if problems:
        return None, problems
    return {"name": name, "world_fingerprint": fingerprint, "chat": chat, "truth": truth, "examples": examples,
            "probes": probes}, problems


def read_numbered_jsonl(path: str | Path) -> tuple[list[tuple[int, object]], list[str]]:
    """``(line number, parsed object)`` for every non-blank line, and a message per line that is not JSON.

    Raises:
        NotFoundError: The file does not exist.
        CorruptError: The file cannot be read as UTF-8 text.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"file {path} does not exist: check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptError(f"cannot read {path}: {exc}") from exc
    rows, problems = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{n}: not JSON ({exc.msg} at column {exc.colno}); a JSONL file holds one JSON "
                            "object per line")
    return rows, problems
