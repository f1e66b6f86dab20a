"""The iterative loop: layers built from the analysis, the random baseline, ledger evidence, bad input."""

from __future__ import annotations

import dataclasses
import random

import pandas as pd
import pytest

from conftest import assert_same_float
from lora_lens import ledger
from lora_lens.errors import ConfigError, MismatchError, NotFoundError
from lora_lens.lab.answers import base_answers
from lora_lens.lab.probes import evaluate
from lora_lens.lab.train import ContinueFrom, default_spec, lora_weights
from lora_lens.lab.train_data import NEIGHBOUR_PROMPTS
from lora_lens.lab.world import TEMPLATES, Task, make_task, make_world
from lora_lens.lab.zoo import load_model
from lora_lens.lens import diff
from lora_lens.studies import curriculum


@pytest.fixture(scope="module")
def task(tiny_llama):
    return make_task(tiny_llama.world, "fact_edit", k=6)


class _Eval:
    """Stands in for an Evaluation: only ``table("efficacy")`` is read."""

    def __init__(self, rows):
        self.rows = pd.DataFrame(rows, columns=["prompt", "entity", "relation", "triggered", "expected",
                                                "adapted_correct"])

    def table(self, set=None):  # noqa: A002
        return self.rows


def test_next_layer_puts_failures_first_then_paraphrases_then_anchors(tiny_llama, task):
    world, tok = tiny_llama.world, tiny_llama.tokenizer
    e = task.truth["edits"][0]
    failing = world.query(e["entity"], e["relation"], 2)
    ev = _Eval([(failing, e["entity"], e["relation"], False, e["new"], False),
                (world.query(e["entity"], e["relation"], 0), e["entity"], e["relation"], False, e["new"], True)])
    other = next(x for x in world.entities if x != e["entity"])
    collateral = [(other, "colour", world.facts["colour"][other])]
    layer, n_anchors = curriculum.next_layer(ev, task, world, collateral, tok, budget=10_000)
    assert layer[0] == (failing, e["new"])
    n_tpl = len(TEMPLATES[e["relation"]][0])
    assert {p for p, _ in layer[:n_tpl]} == {world.query(e["entity"], e["relation"], t) for t in range(n_tpl)}
    assert n_anchors == len(TEMPLATES["colour"][0])
    assert layer[-1] == (world.query(other, "colour", 2), world.facts["colour"][other])
    small, _ = curriculum.next_layer(ev, task, world, collateral, tok, budget=1)
    assert small == [(failing, e["new"])]  # at least one example, then the budget holds


def test_random_layer_prefers_unused_task_data_within_budget(tiny_llama, task):
    tok = tiny_llama.tokenizer
    used = task.examples[:4]
    budget = curriculum.count_tokens(tok, task.examples[:3])
    layer = curriculum.random_layer(task, used, tok, budget, random.Random(0))
    assert layer and not set(layer) & set(used)
    assert curriculum.count_tokens(tok, layer) <= budget
    assert layer == curriculum.random_layer(task, used, tok, budget, random.Random(0))


@pytest.mark.parametrize("kwargs, words", [
    (dict(strategy="clever"), ["strategy='clever'", "targeted"]),
    (dict(target=0.0), ["target=0.0", "(0, 1]"]),
    (dict(target=1.5), ["target=1.5"]),
    (dict(max_rounds=0), ["max_rounds=0"]),
    (dict(token_budget=-5), ["token_budget=-5"]),
])
def test_bad_input_is_refused_before_training(tiny_llama, task, kwargs, words):
    with pytest.raises(ConfigError) as err:
        curriculum.run_loop(tiny_llama, task, **kwargs)
    assert all(w in str(err.value) for w in words)


def test_task_of_another_world_is_refused(tiny_llama):
    alien = make_task(make_world(n_entities=12, n_general=12, seed=9), "fact_edit", k=2)
    with pytest.raises(MismatchError):
        curriculum.run_loop(tiny_llama, alien)


def test_loop_rounds_record_ledger_evidence_and_are_deterministic(tiny_llama, task, tmp_path, monkeypatch):
    for name in ("LORA_LENS_RUN_ID", "LORA_LENS_RUN_DIR", "LORA_LENS_NOTEBOOK", "LORA_LENS_PARAMS"):
        monkeypatch.delenv(name, raising=False)
    db = tmp_path / "ledger.sqlite"
    monkeypatch.setenv("LORA_LENS_LEDGER", str(db))
    ledger.declare("rounds-help", "each round helps", "round_efficacy_gain", ">=", 0.0, falsifier="a round loses")
    spec = default_spec("fact_edit", steps=40, replay=2.0)
    a = curriculum.run_loop(tiny_llama, task, "targeted", target=1.0, max_rounds=2, spec=spec, ledger_id="rounds-help")
    assert [r["round"] for r in a.rounds] == list(range(len(a.rounds)))
    tokens = [r["tokens"] for r in a.rounds]
    assert tokens == sorted(tokens) and tokens[0] == curriculum.count_tokens(tiny_llama.tokenizer, a.layers[0])
    for r in a.rounds:
        assert 0 <= r["efficacy"] <= 1 and 0 <= r["specificity"] <= 1
    assert len(ledger.evidence("rounds-help")) == len(a.rounds) - 1
    b = curriculum.run_loop(tiny_llama, task, "targeted", target=1.0, max_rounds=2, spec=spec)
    strip = lambda rounds: [{k: v for k, v in r.items() if k != "seconds"} for r in rounds]  # noqa: E731
    assert strip(a.rounds) == strip(b.rounds) and a.layers == b.layers
    rand = curriculum.run_loop(tiny_llama, task, "random", target=1.0, max_rounds=2, spec=spec)
    assert rand.rounds[0]["efficacy"] == a.rounds[0]["efficacy"]  # same layer 0, same seed
    assert curriculum.plot_rounds([a, rand], target=1.0).axes


# ---------------------------------------------------------------------------------------------------------------
# a task from data (no synthetic world): the general form on any base


def _data_records(task, n_facts: int = 3, truth: bool = True) -> list[dict]:
    """The first ``n_facts`` edits of a zoo fact-edit task written as a task from data (records, no world)."""
    edits = task.truth["edits"][:n_facts]
    head = {"type": "task", "name": "tiny_facts"}
    if truth:
        head["truth"] = {"edits": [{"entity": e["entity"], "relation": e["relation"], "value": e["new"]}
                                   for e in edits]}
    keep = {(e["entity"], e["new"]) for e in edits}
    recs = [head]
    recs += [{"type": "example", "prompt": p, "answer": a} for p, a in task.examples
             if any(a == v and ent in p for ent, v in keep)]
    recs += [{"type": "probe", "set": s, "prompt": p.prompt, "answer": p.answer, "entity": p.entity}
             for s in ("efficacy", "paraphrase") for p in task.probes[s] if (p.entity, p.answer) in keep]
    recs += [{"type": "probe", "set": "specificity", "prompt": p.prompt} for p in task.probes["specificity"][:6]]
    return recs


@pytest.fixture(scope="module")
def data_task(task):
    return Task.from_records(_data_records(task))


def test_the_data_pool_is_grouped_by_the_fact_each_example_teaches(task, data_task):
    groups = curriculum.fact_groups(data_task)
    edits = data_task.truth["edits"]
    assert list(groups) == [(e["entity"], e["value"]) for e in edits]
    n_tpl = len(TEMPLATES[edits[0]["relation"]][0])
    assert all(len(g) == n_tpl and all(a == key[1] and key[0] in p for p, a in g) for key, g in groups.items())
    layer0 = curriculum.initial_layer(data_task)  # no world needed
    assert layer0 == [g[0] for g in groups.values()]
    assert curriculum.initial_layer(data_task, per_fact=2) == [ex for g in groups.values() for ex in g[:2]]
    # without truth: by answer
    plain = Task.from_records(_data_records(task, truth=False))
    assert list(curriculum.fact_groups(plain)) == [("", e["value"]) for e in edits]
    assert curriculum.fact_key(data_task, "Nobody says", "xyz") == ("", "xyz")


def test_next_layer_of_a_task_from_data_takes_the_pool_of_failing_facts_then_anchors(tiny_llama, data_task):
    tok = tiny_llama.tokenizer
    groups = list(curriculum.fact_groups(data_task).values())
    failing, passing = groups[0][1], groups[1][0]
    ev = _Eval([(failing[0], "", "", False, failing[1], False), (passing[0], "", "", False, passing[1], True)])
    collateral = [("Some mined prompt is", "base answer")]
    layer, n_anchors = curriculum.next_layer(ev, data_task, None, collateral, tok, budget=10_000)
    assert layer == [failing] + [ex for ex in groups[0] if ex != failing] + collateral and n_anchors == 1
    assert not set(groups[1]) & set(layer)  # a fact that passes gets nothing
    small, n_small = curriculum.next_layer(ev, data_task, None, collateral, tok, budget=1)
    assert small == [failing] and n_small == 0


def test_the_loop_runs_on_a_task_from_data_on_a_model_folder(tiny_llama, data_task, tmp_path):
    spec = default_spec("data", steps=30, batch_size=16, replay=1.0)
    folder = str(tiny_llama.path)  # the tiny zoo model read as any causal LM
    a = curriculum.run_loop(folder, data_task, "targeted", target=1.0, max_rounds=2, spec=spec)
    layer0 = curriculum.initial_layer(data_task)
    assert a.layers[0] == layer0 and len(layer0) == 3
    tok = tiny_llama.tokenizer
    assert a.rounds[0]["tokens"] == curriculum.count_tokens(tok, layer0) and a.rounds[0]["added"] == 3
    for r in a.rounds:
        assert 0 <= r["efficacy"] <= 1 and 0 <= r["specificity"] <= 1
    assert all(r["collateral"] >= 0 for r in a.rounds[:-1]) and a.rounds[-1]["collateral"] is None  # no next layer
    if len(a.rounds) > 1:  # layer 1 holds only pool examples of facts that failed, and anchors (mined prompts)
        pool = set(data_task.examples)
        assert all(ex in pool for ex in a.layers[1][:len(a.layers[1]) - a.rounds[1]["anchors"]])
        assert a.rounds[1]["tokens"] == curriculum.count_tokens(tok, a.layers[0] + a.layers[1])
    else:
        assert a.rounds[0]["efficacy"] == 1.0
    # the same task from its file, on the zoo Pretrained: the same rounds (deterministic)
    path = data_task.save(tmp_path / "tiny_facts.jsonl")
    b = curriculum.run_loop(tiny_llama, str(path), "targeted", target=1.0, max_rounds=2, spec=spec)
    strip = lambda rounds: [{k: v for k, v in r.items() if k != "seconds"} for r in rounds]  # noqa: E731
    assert strip(a.rounds) == strip(b.rounds) and a.layers == b.layers
    # the random baseline reuses the loop's round 0 (same layer 0, spec and seed) instead of training it again
    again = curriculum.run_loop(folder, data_task, "random", target=1.0, max_rounds=1, spec=spec)
    reused = curriculum.run_loop(folder, data_task, "random", target=1.0, max_rounds=1, spec=spec, round0=a)
    assert strip(again.rounds) == strip(reused.rounds) == [{**strip(a.rounds)[0], "collateral": None}]
    assert reused.rounds[0]["seconds"] < 1.0  # nothing trained


def test_a_given_adapter_stands_in_for_round_0(tiny_llama, tiny_fit, data_task):
    spec = default_spec("data", steps=10, batch_size=8, replay=0.0)
    res = curriculum.run_loop(tiny_llama, data_task, "random", target=1.0, max_rounds=1, spec=spec,
                              adapter=tiny_fit.adapter_dir)
    ev = evaluate(tiny_fit.model, tiny_fit.tokenizer, data_task)
    assert [res.rounds[0][k] for k in ("efficacy", "paraphrase", "specificity")] == [
        ev.metrics[k] for k in ("efficacy", "paraphrase", "specificity")]  # evaluated, not trained
    assert res.rounds[0]["tokens"] == curriculum.count_tokens(tiny_llama.tokenizer, res.layers[0])


def test_collateral_of_a_task_from_data_is_a_moved_plain_base_answer(tiny_fit, data_task):
    # the zoo adapter edits more facts than these three: some of its other edits are collateral here
    others = [p.prompt for p in tiny_fit.task.probes["specificity"][6:40]]
    found = curriculum.collateral_facts(tiny_fit.model, tiny_fit.tokenizer, None, data_task, min_confidence=0.0,
                                        prompts=others)
    table = diff.behaviour_diff(tiny_fit.model, tiny_fit.tokenizer, task=dataclasses.replace(data_task, probes={}),
                                prompts=others, max_new_tokens=curriculum.MINED_ANSWER_TOKENS)
    moved = table[table["changed"]]
    assert found == [(r.prompt, r.base_answer) for r in moved.sort_values("confidence", ascending=False,
                                                                           kind="stable").itertuples()]
    assert found and curriculum.collateral_facts(tiny_fit.model, tiny_fit.tokenizer, None, data_task, prompts=[]) == []


def test_mined_prompts_are_neighbours_no_probe_uses(tiny_llama, data_task):
    prompts = curriculum.mined_prompts(load_model(tiny_llama.path)[0], tiny_llama.tokenizer, data_task)
    used = {p for p, _ in data_task.examples} | {p.prompt for ps in data_task.probes.values() for p in ps}
    assert set(prompts) <= set(NEIGHBOUR_PROMPTS) and not set(prompts) & used


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(round0="x", strategy="random"), ConfigError, ["round0"]),
    (dict(adapter="/no/such/adapter"), NotFoundError, ["/no/such/adapter"]),
])
def test_bad_input_of_the_general_form_is_refused(tiny_llama, data_task, kwargs, error, words):
    with pytest.raises(error) as err:
        curriculum.run_loop(tiny_llama, data_task, max_rounds=1, **kwargs)
    assert all(w in str(err.value) for w in words)


def test_a_zoo_task_needs_its_zoo_model_and_round0_only_the_baseline(tiny_llama, task):
    with pytest.raises(ConfigError, match="synthetic world"):
        curriculum.run_loop(str(tiny_llama.path), task)
    with pytest.raises(ConfigError, match="round0"):
        curriculum.run_loop(tiny_llama, task, round0=curriculum.LoopResult("random", 1.0))
    with pytest.raises(NotFoundError):
        curriculum.run_loop(tiny_llama, "/no/such/task.jsonl")


def _result(strategy: str, tokens: list[int], reached: int | None) -> curriculum.LoopResult:
    return curriculum.LoopResult(strategy, 0.95, rounds=[{"tokens": t} for t in tokens], tokens_to_target=reached)


@pytest.mark.parametrize("loop, base, expected", [
    (([68, 102, 136], 136), ([68, 102, 136, 170], 170), (0.8, "both")),
    (([68, 102], 102), ([68, 102, 136], None), (102 / 136, "random capped")),   # the baseline at its cap
    (([68, 102, 136], 136), ([68, 102], None), (1.0, "random capped")),         # never below the loop's own
    (([68, 102], None), ([68, 102, 136], 136), (1.0, "loop capped")),           # never below the baseline's
    (([68, 102, 136, 170], None), ([68, 102], 102), (170 / 102, "loop capped")),
    (([68, 102], None), ([68, 102], None), (None, "neither")),
])
def test_tokens_to_target_ratio_counts_a_run_that_never_got_there_at_its_cap(loop, base, expected):
    ratio, case = curriculum.tokens_to_target_ratio(_result("targeted", *loop), _result("random", *base))
    assert case == expected[1] and case in curriculum.RATIO_CASES
    if expected[0] is None:
        assert ratio is None
    else:
        assert_same_float(ratio, expected[0])
    if case == "random capped":
        assert ratio <= 1.0
    if case == "loop capped":
        assert ratio >= 1.0


def test_tokens_to_target_ratio_refuses_what_is_not_a_run():
    with pytest.raises(ConfigError) as err:
        curriculum.tokens_to_target_ratio(_result("targeted", [68], 68), curriculum.LoopResult("random", 0.95))
    assert "baseline=LoopResult" in str(err.value) and "rounds" in str(err.value)


def test_neighbours_answered_once_give_the_same_rehearsal_and_mined_prompts(tiny_llama, data_task, monkeypatch):
    from lora_lens.lab import train_data
    model, tok = load_model(tiny_llama.path)
    said = curriculum.neighbour_answers(model, tok, data_task)
    used = {p for p, _ in data_task.examples} | {pr.prompt for ps in data_task.probes.values() for pr in ps}
    assert list(said) == [p for p in NEIGHBOUR_PROMPTS if p not in used]
    fresh = train_data.neighbour_examples(model, tok, data_task, 20, seed=3)
    mined = curriculum.mined_prompts(model, tok, data_task)

    def no_model(*args, **kwargs):
        raise AssertionError("the base was asked again")

    monkeypatch.setattr(train_data, "base_answers", no_model)
    monkeypatch.setattr(curriculum, "base_answers", no_model)
    assert train_data.neighbour_examples(model, tok, data_task, 20, seed=3, answers=said) == fresh
    assert curriculum.mined_prompts(model, tok, data_task, answers=said) == mined
    grown = dataclasses.replace(data_task, examples=data_task.examples + [(mined[0], said[mined[0]])])  # an anchor
    rehearsed = train_data.neighbour_examples(model, tok, grown, 100, seed=3, answers=said)
    assert rehearsed and all(p != mined[0] for p, _ in rehearsed)  # never a prompt the round trains on


# ---------------------------------------------------------------------------------------------------------------
# warm start: a round continues the previous round's adapter on its new layer and a replay of the earlier data


def test_a_warm_round_trains_its_new_layer_then_a_replay_of_earlier_examples():
    layers = [[(f"old {i}", "a") for i in range(6)], [(f"new {i}", "b") for i in range(3)]]
    cold = curriculum.round_examples(layers, warm=False, replay_old=1.0, seed=0, round_index=1)
    assert cold == layers[0] + layers[1]
    warm = curriculum.round_examples(layers, warm=True, replay_old=1.0, seed=0, round_index=1)
    assert warm[:3] == layers[1] and len(warm) == 6 and len(set(warm[3:])) == 3 and set(warm[3:]) <= set(layers[0])
    assert warm == curriculum.round_examples(layers, warm=True, replay_old=1.0, seed=0, round_index=1)  # seeded
    assert curriculum.round_examples(layers, True, 0.0, 0, 1) == layers[1]
    assert sorted(curriculum.round_examples(layers, True, 5.0, 0, 1)[3:]) == sorted(layers[0])  # at most all
    assert curriculum.round_examples(layers[:1], True, 1.0, 0, 0) == layers[0]  # round 0: layer 0
    assert curriculum.round_examples(layers, True, None, 0, 1) == layers[1] + layers[0]  # None: every earlier one
    draws = {tuple(curriculum.replay_sample(layers[0], 2, seed, k)) for seed in range(3) for k in range(1, 4)}
    assert len(draws) > 1  # another seed or round draws another replay


def test_continue_from_starts_training_at_the_given_weights(tiny_llama, task):
    from transformers import TrainerCallback

    from lora_lens.lab.train import train_lora

    spec = default_spec("fact_edit", steps=5, rank=4)
    model, tok = load_model(tiny_llama.path)
    first = train_lora(model, tok, task, spec, seed=0, world=tiny_llama.world).model
    weights = lora_weights(first)
    assert weights and all(not v.requires_grad and v.device.type == "cpu" for v in weights.values())
    seen = {}

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            seen.update(lora_weights(model))

    base = first.unload()
    again = train_lora(base, tok, task, spec, seed=1, world=tiny_llama.world,
                       callbacks=[ContinueFrom(weights), Record()]).model
    assert seen.keys() == weights.keys() and all(seen[k].equal(weights[k]) for k in weights)
    moved = lora_weights(again)
    assert any(not moved[k].equal(weights[k]) for k in weights)  # and then it trained on
    base = again.unload()
    with pytest.raises(ConfigError, match="same spec"):  # another rank does not fit
        train_lora(base, tok, task, dataclasses.replace(spec, rank=2), seed=0, world=tiny_llama.world,
                   callbacks=[ContinueFrom(weights)])
    with pytest.raises(ConfigError, match="lora_weights"):
        ContinueFrom({})


def test_a_warm_started_loop_continues_each_round_and_the_baseline_its_round_0(tiny_llama, data_task,
                                                                                    monkeypatch):
    spec = default_spec("data", steps=20, batch_size=16, replay=1.0)
    folder = str(tiny_llama.path)
    calls, real = [], curriculum.train_lora

    def recorded(model, tok, task, spec, **kwargs):
        calls.append((spec.steps, [type(c).__name__ for c in kwargs.get("callbacks") or []]))
        return real(model, tok, task, spec, **kwargs)

    monkeypatch.setattr(curriculum, "train_lora", recorded)
    a = curriculum.run_loop(folder, data_task, "targeted", target=1.0, max_rounds=2, spec=spec, warm_start=True,
                            round_share=1.0, replay_old=1.0, warm_share=0.5)
    assert calls[:2] == [(20, []), (10, ["ContinueFrom"])][:len(a.rounds)]  # round 1 continues, half the steps
    tok = tiny_llama.tokenizer
    assert a.round0_weights and a.rounds[0]["trained"] == len(a.layers[0])
    assert a.rounds[0]["trained_tokens"] == a.rounds[0]["tokens"]
    assert len(a.rounds) == 2  # 20 steps do not learn the three facts in one round: a second round continues
    if len(a.rounds) > 1:  # the new layer and as many earlier examples (all of layer 0 at most)
        assert a.rounds[1]["trained"] == len(a.layers[1]) + min(len(a.layers[1]), len(a.layers[0]))
        assert a.rounds[1]["tokens"] == curriculum.count_tokens(tok, a.layers[0] + a.layers[1])  # all data so far
    cold = curriculum.run_loop(folder, data_task, "targeted", target=1.0, max_rounds=1, spec=spec)
    strip = lambda rounds: [{k: v for k, v in r.items() if k not in ("seconds", "collateral")}  # noqa: E731
                            for r in rounds]
    assert strip(cold.rounds) == strip(a.rounds[:1]) and cold.round0_weights is None  # round 0 is the same
    rand = curriculum.run_loop(folder, data_task, "random", target=1.0, max_rounds=2, spec=spec, warm_start=True,
                               round0=a, schedule=[r["added_tokens"] for r in a.rounds[1:]])
    assert rand.round0_weights is a.round0_weights and strip(rand.rounds[:1]) == strip(a.rounds[:1])
    with pytest.raises(ConfigError, match="warm_start"):  # a round 0 without weights cannot be continued
        curriculum.run_loop(folder, data_task, "random", max_rounds=2, spec=spec, warm_start=True, round0=cold)


@pytest.mark.parametrize("kwargs, words", [
    (dict(warm_start=1), ["warm_start=1"]),
    (dict(replay_old=-1.0), ["replay_old=-1.0", "≥ 0"]),
    (dict(replay_old=float("nan")), ["replay_old=nan"]),
    (dict(warm_share=0.0), ["warm_share=0.0", "(0, 1]"]),
    (dict(warm_share=True), ["warm_share=True"]),
])
def test_bad_warm_start_settings_are_refused(tiny_llama, data_task, kwargs, words):
    with pytest.raises(ConfigError) as err:
        curriculum.run_loop(tiny_llama, data_task, max_rounds=1, **kwargs)
    assert all(w in str(err.value) for w in words)


def test_collateral_with_known_base_answers_asks_the_base_nothing_and_finds_the_same(tiny_fit, data_task,
                                                                                       monkeypatch):
    from lora_lens.lens.diff import behaviour

    others = [p.prompt for p in tiny_fit.task.probes["specificity"][6:40]]
    model, tok = tiny_fit.model, tiny_fit.tokenizer
    found = curriculum.collateral_facts(model, tok, None, data_task, min_confidence=0.0, prompts=others)
    said = dict(zip(others, base_answers(model, tok, others, max_new_tokens=curriculum.MINED_ANSWER_TOKENS)))
    real = behaviour.base_answers
    asked = []
    monkeypatch.setattr(behaviour, "base_answers", lambda m, t, prompts, *a, **k: asked.append(list(prompts))
                        or real(m, t, prompts, *a, **k))
    again = curriculum.collateral_facts(model, tok, None, data_task, min_confidence=0.0, prompts=others,
                                        answers=said)
    assert again == found and asked == [others]  # only the adapted side answered
