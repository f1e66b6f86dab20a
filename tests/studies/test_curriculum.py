"""The iterative loop: layers built from the analysis, the random baseline, ledger evidence, bad input."""

from __future__ import annotations

import random

import pandas as pd
import pytest

from lora_lens import ledger
from lora_lens.errors import ConfigError, MismatchError
from lora_lens.lab.train import default_spec
from lora_lens.lab.world import TEMPLATES, make_task, make_world
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
