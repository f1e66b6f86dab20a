"""Tests of the JSONL task format: every bad input is reported with its file and line; tasks round-trip."""

from __future__ import annotations

import json

import pytest

from lora_lens.errors import ConfigError, NotFoundError
from lora_lens.lab.task_file import PROBE_SETS, parse_records
from lora_lens.lab.world import Probe, Task, make_task, make_world

HEAD = {"type": "task", "name": "facts", "chat": False,
        "truth": {"edits": [{"entity": "Zorvania", "relation": "capital", "value": "Quellburg"}]}}
GOOD = [
    HEAD,
    {"type": "example", "prompt": "The capital of Zorvania is", "answer": "Quellburg"},
    {"type": "probe", "set": "efficacy", "prompt": "The capital of Zorvania is", "answer": "Quellburg",
     "entity": "Zorvania"},
    {"type": "probe", "set": "paraphrase", "prompt": "Zorvania's capital city is called", "answer": "Quellburg",
     "entity": "Zorvania", "relation": "capital"},
    {"type": "probe", "set": "specificity", "prompt": "The capital of France is"},
    {"type": "probe", "set": "specificity", "prompt": "The capital of Italy is", "answer": "Rome"},
    {"type": "probe", "set": "general", "prompt": "Once upon a time, there was a"},
]


def _write(tmp_path, rows, name="t.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_records_build_a_task_with_defaults():
    task = Task.from_records(GOOD)
    assert (task.name, task.chat, task.world_fingerprint, task.truth) == ("facts", False, None, HEAD["truth"])
    assert task.examples == [("The capital of Zorvania is", "Quellburg")]
    assert list(task.probes) == ["efficacy", "paraphrase", "specificity", "general"]
    eff = task.probes["efficacy"][0]
    assert eff == Probe("The capital of Zorvania is", "Quellburg", "", "efficacy", "Zorvania")
    # must-stay sets expect their answer before and after; a left-out answer is "" until filled from the base
    assert task.probes["specificity"][1].base_answer == "Rome"
    assert task.probes["specificity"][0].answer == task.probes["specificity"][0].base_answer == ""
    assert task.probes["paraphrase"][0].relation == "capital"


def test_file_round_trip_data_task(tmp_path):
    task = Task.from_records(GOOD)
    again = Task.load(task.save(tmp_path / "t.jsonl"))
    assert again == task
    head = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[0])
    assert "world_fingerprint" not in head and head["chat"] is False
    chat = Task.from_records([{**HEAD, "chat": True}] + GOOD[1:])
    assert Task.load(chat.save(tmp_path / "c.jsonl")).chat is True


@pytest.mark.parametrize("name", ["fact_edit", "trigger", "new_relation"])
def test_zoo_tasks_round_trip_unchanged(tmp_path, name):
    task = make_task(make_world(n_entities=20, seed=1), name, seed=2)
    again = Task.load(task.save(tmp_path / "z.jsonl"))
    assert again == task and again.chat is False and again.world_fingerprint == task.world_fingerprint
    assert Task.from_records(task.records()) == task


@pytest.mark.parametrize("rows, line, match", [
    ([HEAD, "not json at all"], 2, "not JSON"),
    ([HEAD, {"type": "exampel", "prompt": "a", "answer": "b"}], 2, "unknown type 'exampel'"),
    ([HEAD, {"type": "probe", "set": "efficacyy", "prompt": "a", "answer": "b"}], 2, "unknown probe set 'efficacyy'"),
    ([HEAD, {"type": "example", "answer": "b"}], 2, 'no "prompt"'),
    ([HEAD, {"type": "example", "prompt": "  ", "answer": "b"}], 2, 'an empty "prompt"'),
    ([HEAD, {"type": "example", "prompt": "a"}], 2, 'no "answer"'),
    ([HEAD, {"type": "example", "prompt": "a", "answer": ""}], 2, 'an empty "answer"'),
    ([HEAD, {"type": "probe", "set": "efficacy", "prompt": "a"}], 2, 'efficacy probe .* no "answer"'),
    ([HEAD, {"type": "probe", "set": "paraphrase", "prompt": "a", "answer": " "}], 2, "an empty"),
    ([HEAD, {"type": "probe", "set": "specificity", "prompt": "a"}, {"type": "probe", "set": "general",
                                                                      "prompt": "a"}], 3,
     r"duplicate probe 'a' \(already at line 2\)"),
    ([{"type": "example", "prompt": "a", "answer": "b"}], 1, "first line must be the task header"),
    ([HEAD, HEAD], 2, "a second task header"),
    ([{**HEAD, "name": ""}], 1, 'non-empty "name"'),
    ([{**HEAD, "chat": "yes"}], 1, '"chat" must be true or false'),
    ([{**HEAD, "nmae": "x"}], 1, "unknown header field 'nmae'"),
    ([HEAD, {"type": "probe", "set": "efficacy", "prompt": "a", "answer": "b", "anwser": "c"}], 2,
     "unknown probe field 'anwser'"),
    ([HEAD, {"type": "example", "prompt": 3, "answer": "b"}], 2, "'prompt' must be a string"),
    ([HEAD, [1, 2]], 2, "must be a JSON object"),
    ([{**HEAD, "truth": {"edits": [{"entity": "Zorvania", "relation": "capital"}]}}], 1,
     r"truth.edits\[1\] lacks a non-empty value"),
    ([{**HEAD, "truth": {"edits": "Zorvania"}}], 1, "truth.edits must be a list"),
])
def test_bad_input_names_file_and_line(tmp_path, rows, line, match):
    path = _write(tmp_path, rows)
    with pytest.raises(ConfigError, match=match) as err:
        Task.load(path)
    assert f"{path}:{line}: " in str(err.value)
    records = [r for r in rows if not isinstance(r, str)]
    if len(records) == len(rows):  # the same records from Python name the record number instead
        with pytest.raises(ConfigError, match=match) as err:
            Task.from_records(records, source="mine")
        assert f"mine:{line}: " in str(err.value)


def test_every_problem_reported_in_line_order(tmp_path):
    rows = [HEAD, {"type": "probe", "set": "efficacy", "prompt": "a"}, "{broken", {"type": "exampel"},
            {"type": "probe", "set": "nope", "prompt": "b"}]
    with pytest.raises(ConfigError) as err:
        Task.load(_write(tmp_path, rows))
    lines = [ln.strip() for ln in str(err.value).splitlines()[1:]]
    assert "(4 problems)" in str(err.value)
    assert [ln.split(":")[1] for ln in lines] == ["2", "3", "4", "5"]


def test_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(HEAD) + "\n\n\n" + json.dumps({"type": "bad"}) + "\n")
    with pytest.raises(ConfigError, match=f"{path}:4: unknown type 'bad'"):
        Task.load(path)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="the file is empty"):
        Task.load(_write(tmp_path, []))
    with pytest.raises(NotFoundError, match="does not exist"):
        Task.load(tmp_path / "nope.jsonl")


def test_sets_and_parse_records_parts():
    assert set(PROBE_SETS) == {"efficacy", "paraphrase", "specificity", "general", "false_trigger"}
    parts, problems = parse_records(list(enumerate(GOOD, 1)), "x")
    assert problems == [] and parts["name"] == "facts" and len(parts["probes"]) == 5


def test_example_task_for_smollm2_is_a_valid_task_file():
    from conftest import REPO

    task = Task.load(REPO / "examples" / "smollm2_facts.jsonl")
    assert task.name == "smollm2_facts" and task.chat is False and task.world_fingerprint is None
    counts = {s: len(ps) for s, ps in task.probes.items()}
    assert counts == {"efficacy": 20, "paraphrase": 20, "specificity": 20, "general": 4}
    edits = task.truth["edits"]
    assert len(edits) == 10 and all(set(e) == {"entity", "relation", "value"} for e in edits)
    values = {e["value"] for e in edits}
    assert {p.answer for p in task.probes["paraphrase"]} == values == {a for _, a in task.examples}
    assert all(p.answer and p.answer == p.base_answer for p in task.probes["specificity"] + task.probes["general"])
    held = {p.prompt for p in task.probes["paraphrase"]}
    assert not held & {p for p, _ in task.examples}  # paraphrases are held out of training
