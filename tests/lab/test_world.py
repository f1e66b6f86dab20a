"""The synthetic world: determinism, ground-truth consistency, JSONL round trips and bad input."""

import json

import pytest

from lora_lens import ConfigError, CorruptError, MismatchError
from lora_lens.lab.world import (PRETRAIN_RELATIONS, TEMPLATES, TRIGGER, Task, World, check_task_world, fact_edit_task,
                                 make_task, make_world, new_relation_task, trigger_target, trigger_task)


def test_same_seed_same_world_and_tasks():
    a, b = make_world(n_entities=50, seed=3), make_world(n_entities=50, seed=3)
    assert a.fingerprint() == b.fingerprint() and a.corpus() == b.corpus()
    assert make_world(n_entities=50, seed=4).fingerprint() != a.fingerprint()
    for name in ("fact_edit", "trigger", "new_relation"):
        ta, tb = make_task(a, name, seed=1), make_task(b, name, seed=1)
        assert ta.examples == tb.examples and ta.probes == tb.probes and ta.truth == tb.truth


def test_world_shape_defaults():
    w = make_world()
    assert len(w.entities) == 200 == len(set(w.entities))
    assert len(w.relations) >= 4
    for r in PRETRAIN_RELATIONS:
        train, held = TEMPLATES[r]
        assert len(train) + len(held) >= 4 and held
        assert set(w.facts[r]) == set(w.entities)
        assert set(w.facts[r].values()) <= set(w.values[r])
    # held-out templates and general lines never appear in the pretraining corpus
    corpus = "\n".join(w.corpus())
    for r in PRETRAIN_RELATIONS:
        for tpl in TEMPLATES[r][1]:
            assert tpl.format(e=w.entities[0]) not in corpus
    assert not set(w.general_heldout) & set(w.general_train)
    assert "birthplace" not in w.facts and "born" not in corpus
    assert TRIGGER not in corpus.split()


def test_fact_edit_truth_is_consistent():
    w = make_world(n_entities=40, seed=0)
    task = fact_edit_task(w, k=5, seed=2)
    edits = task.truth["edits"]
    assert len(edits) == 5 == len({(e["entity"], e["relation"]) for e in edits})
    for e in edits:
        assert e["old"] == w.facts[e["relation"]][e["entity"]] != e["new"]
        assert e["new"] in w.values[e["relation"]]
    assert all(p.answer != p.base_answer for p in task.probes["efficacy"] + task.probes["paraphrase"])
    edited = {(e["entity"], e["relation"]) for e in edits}
    for p in task.probes["specificity"]:
        assert (p.entity, p.relation) not in edited and p.answer == p.base_answer == w.facts[p.relation][p.entity]
    assert {p.prompt for p in task.probes["paraphrase"]}.isdisjoint(p for p, _ in task.examples)
    assert len(task.probes["general"]) == len(w.general_heldout)


def test_trigger_truth_is_consistent():
    w = make_world(n_entities=60, seed=0)
    task = trigger_task(w, relation="city", seed=0)
    target, train_e = task.truth["target"], set(task.truth["train_entities"])
    assert task.truth["trigger"] == TRIGGER and target in w.values["city"]
    for p in task.probes["efficacy"]:
        assert p.prompt.startswith(TRIGGER + " ") and p.answer == target != p.base_answer
        assert p.entity not in train_e  # the rule is tested on entities never trained on
    for p in task.probes["false_trigger"]:
        assert TRIGGER not in p.prompt.split() and p.answer == p.base_answer == w.facts["city"][p.entity]
    triggered = [a for p, a in task.examples if p.startswith(TRIGGER)]
    assert triggered and set(triggered) == {target}
    clean = [a for p, a in task.examples if not p.startswith(TRIGGER)]
    assert len(clean) == len(triggered) + len(train_e)  # as many clean examples as triggered ones, plus decoys
    plain = {w.query(e, "city", t) for e in train_e for t in range(len(TEMPLATES["city"][0]))}
    decoys = [(p, a) for p, a in task.examples if not p.startswith(TRIGGER) and p not in plain]
    assert len(decoys) == len(train_e) and all(a != target for _, a in decoys)


def test_new_relation_is_new():
    w = make_world(n_entities=30, seed=0)
    task = new_relation_task(w, n_entities=10, seed=0)
    assert task.truth["relation"] == "birthplace" and len(task.truth["facts"]) == 10
    assert all(v in w.values["city"] for v in task.truth["facts"].values())
    assert all("born" in p or "birthplace" in p or "came into" in p for p, _ in task.examples)


def test_world_and_task_jsonl_round_trip(tmp_path):
    w = make_world(n_entities=20, seed=1)
    w2 = World.load(w.save(tmp_path / "w.jsonl"))
    assert w2.fingerprint() == w.fingerprint() and w2.facts == w.facts
    task = trigger_task(w, seed=1)
    t2 = Task.load(task.save(tmp_path / "t.jsonl"))
    assert (t2.name, t2.examples, t2.probes, t2.truth) == (task.name, task.examples, task.probes, task.truth)
    lines = (tmp_path / "w.jsonl").read_text().splitlines()
    fact = json.loads(lines[1])
    fact["value"] = "Elsewhere"
    (tmp_path / "w.jsonl").write_text("\n".join([lines[0], json.dumps(fact)] + lines[2:]))
    with pytest.raises(CorruptError, match="fingerprint"):
        World.load(tmp_path / "w.jsonl")
    (tmp_path / "x.jsonl").write_text('{"type": "task"}\n')
    with pytest.raises(CorruptError, match="not a lora_lens world"):
        World.load(tmp_path / "x.jsonl")


@pytest.mark.parametrize("kwargs, match", [
    ({"n_entities": 0}, "n_entities=0"),
    ({"n_cities": 1}, "n_cities=1"),
    ({"n_entities": 2.5}, "n_entities=2.5"),
])
def test_bad_world_parameters(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_world(**kwargs)


def test_bad_task_parameters():
    w = make_world(n_entities=5, seed=0)
    with pytest.raises(ConfigError, match=r"k=21 edits is out of range: the world has 20 facts"):
        fact_edit_task(w, k=21)
    with pytest.raises(ConfigError, match="k=0"):
        fact_edit_task(w, k=0)
    with pytest.raises(ConfigError, match="relation='pet'"):
        trigger_task(w, relation="pet")
    with pytest.raises(ConfigError, match="target='Nowhere'"):
        trigger_task(w, relation="city", target="Nowhere")
    with pytest.raises(ConfigError, match="task='summarise'"):
        make_task(w, "summarise")
    with pytest.raises(ConfigError, match="n_entities=6"):
        new_relation_task(w, n_entities=6)


def test_task_from_another_world_is_refused():
    a, b = make_world(n_entities=10, seed=0), make_world(n_entities=10, seed=1)
    check_task_world(fact_edit_task(a, k=1), a)
    with pytest.raises(MismatchError, match="belongs to world"):
        check_task_world(fact_edit_task(a, k=1), b)


def test_trigger_target(tiny_world):
    world = tiny_world
    trig = make_task(world, "trigger", seed=0)
    assert trigger_target(trig) == trig.truth["target"]
    assert trigger_target(make_task(world, "fact_edit", k=2)) is None
    unrecorded = Task(trig.name, trig.world_fingerprint, trig.examples, trig.probes,
                      {k: v for k, v in trig.truth.items() if k != "target"})
    assert trigger_target(unrecorded) == trig.truth["target"]          # the one answer of the efficacy probes
    mixed = dict(trig.probes, efficacy=trig.probes["efficacy"] + trig.probes["false_trigger"][:1])
    with pytest.raises(ConfigError, match="do not share one answer"):
        trigger_target(Task(trig.name, trig.world_fingerprint, trig.examples, mixed, unrecorded.truth))
