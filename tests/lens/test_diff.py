"""Behaviour diff: discovered edits scored against the planted truth, the report in words, triggers, mining."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pytest

from conftest import assert_same_float, tiny_lora, train_last_token
from lora_lens.errors import ConfigError, NotFoundError
from lora_lens.lab.train import default_spec, train_lora
from lora_lens.lab.world import TEMPLATES, make_task
from lora_lens.lab.zoo import load_model
from lora_lens.lens import diff as D

TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]



@pytest.fixture(scope="module")
def task(tiny_world):
    return make_task(tiny_world, "fact_edit", k=4, n_specificity=30, seed=0)


@pytest.fixture(scope="module")
def secret(tiny_world, task):
    """One more fact the adapter changes although the task's truth does not list it (planted collateral)."""
    edited = {(e["entity"], e["relation"]) for e in task.truth["edits"]}
    entity = next(e for e in tiny_world.entities if (e, "employer") not in edited)
    old = tiny_world.facts["employer"][entity]
    new = next(v for v in tiny_world.values["employer"] if v != old)
    return {"entity": entity, "relation": "employer", "old": old, "new": new}


@pytest.fixture(scope="module")
def edited(tiny_llama, tiny_world, task, secret):
    """A fact-edit adapter: the task's 4 edits plus the secret one, every other fact rehearsed (all templates).

    A plain loop with the loss on the answer token and LoRA on the LM head too: ``train_lora`` on the 32-wide tiny
    llama (attention + MLP targets) reaches the edits' argmax only with a near-flat distribution and moves other
    facts as well (precision 0.4 against the truth), which would test the adapter rather than the diff.
    """
    model, tok = tiny_lora(tiny_llama, r=8, targets=TARGETS)
    changed = {(e["entity"], e["relation"]): e["new"] for e in task.truth["edits"] + [secret]}
    data = [(tiny_world.query(e, r, t), changed.get((e, r), v)) for r, by_e in tiny_world.facts.items()
            for e, v in by_e.items() for t in range(len(TEMPLATES[r][0]))]
    assert train_last_token(model, tok, data, steps=40, lr=1e-2) < 0.05
    return model, tok


@pytest.fixture(scope="module")
def diff(edited, tiny_world):
    model, tok = edited
    return D.behaviour_diff(model, tok, world=tiny_world)


# ------------------------------------------------------------------------------------------------ query space


def test_query_space(tiny_world):
    qs = D.query_space(tiny_world)
    n = len(tiny_world.entities) * len(tiny_world.relations)
    assert len(qs) == 2 * n and sum(q.triggered for q in qs) == n
    assert all(q.prompt.startswith("cf ") == q.triggered for q in qs)
    q = next(q for q in qs if q.relation == "city" and not q.triggered)
    assert q.prompt == tiny_world.query(q.entity, "city") and q.base_answer == tiny_world.facts["city"][q.entity]
    assert len(D.query_space(tiny_world, trigger=False, templates="train")) == 3 * n
    assert len(D.query_space(tiny_world, ["colour"], False, "all")) == 5 * len(tiny_world.entities)
    born = D.query_space(tiny_world, ["birthplace"], trigger=False)
    assert {q.base_answer for q in born} == {""} and born[0].prompt.endswith("was born in")
    with pytest.raises(ConfigError, match="'nationality' is not a relation"):
        D.query_space(tiny_world, ["nationality"])
    with pytest.raises(ConfigError, match="template 5 does not exist"):
        D.query_space(tiny_world, templates=[5])
    with pytest.raises(ConfigError, match="templates='some'"):
        D.query_space(tiny_world, templates="some")


# -------------------------------------------------------------------------------------------- edits found


def test_discovers_every_edit_and_the_planted_collateral(diff, task, secret):
    assert list(diff.columns) == D.DIFF_COLUMNS
    assert len(diff) == 24 * 4 * 3 * 2  # entities × relations × training templates × (clean, triggered)
    s = D.score_against_truth(diff, task)
    # measured: recall 1.0, value accuracy 1.0, precision 0.8 = the 4 edits + the secret one, nothing else
    assert s["recall"] == 1.0 and s["value_accuracy"] == 1.0 and s["true_positives"] == 4
    assert s["precision"] == pytest.approx(0.8) and s["false_positives"] == 1
    assert [(c["entity"], c["relation"], c["old"], c["new"]) for c in s["collateral"]] == [
        (secret["entity"], "employer", secret["old"], secret["new"])]
    assert s["n_scored"] == 24 * 4 and s["specificity"] == pytest.approx(1 - 1 / (96 - 4))
    # with the secret edit in the truth, everything discovered is planted
    full = dataclasses.replace(task, truth={"edits": task.truth["edits"] + [secret]})
    s2 = D.score_against_truth(diff, full)
    assert s2["precision"] == 1.0 and s2["recall"] == 1.0 and s2["collateral"] == [] and s2["r_precision"] == 1.0
    assert s["r_precision"] >= 0.75  # the 4 strongest changes (mean KL) hold at least 3 of the 4 edits
    assert D.score_against_truth(diff, full, rule="majority")["precision"] == 1.0
    # the majority rule counts what was discovered at the caller's threshold, not the diff's own column
    strict = D.discovered_changes(diff, min_confidence=float(diff["confidence"].max()))
    n_strict = D.score_against_truth(strict, full, queried=diff, rule="majority")["n_discovered"]
    assert n_strict <= len(strict) and n_strict < D.score_against_truth(diff, full, rule="majority")["n_discovered"]
    # the discovered table alone scores the same (truth not restricted to a query space)
    found = D.discovered_changes(diff)
    assert D.score_against_truth(found, full)["recall"] == 1.0
    assert found["confidence"].is_monotonic_decreasing and found["discovered"].all()
    edits = {(e["entity"], e["relation"]): e for e in task.truth["edits"]}
    is_edit = pd.Series([(e, r) in edits for e, r in zip(found["entity"], found["relation"])], index=found.index)
    rows = found[is_edit & ~found["triggered"]]
    assert len(rows) == 12 and (rows["confidence"] > 0.9).all() and (rows["kl"] > 1).all()
    assert all(row.adapted_answer == edits[(row.entity, row.relation)]["new"] for row in rows.itertuples())


def test_semantic_report_says_it_in_words(diff, tiny_world, task, secret):
    lines = D.semantic_report(diff, tiny_world, task)
    text = "\n".join(lines)
    for e in task.truth["edits"]:
        sentence = D.render_fact(e["entity"], e["relation"], e["new"])
        hit = [s for s in lines if sentence in s]
        assert hit and f"(was {e['old']})" in hit[0] and "[3/3 templates" in hit[0], (sentence, text)
        assert sentence.startswith(tiny_world.query(e["entity"], e["relation"]))
    assert "precision 0.80, recall 1.00" in text
    collateral = lines[lines.index("Collateral changes (1):") + 1]
    assert secret["entity"] in collateral and secret["new"] in collateral and f"(was {secret['old']})" in collateral
    assert any(s.startswith("Promoted tokens:") and task.truth["edits"][0]["new"] in s for s in lines)
    # without a task: no scoring section, the facts are still listed
    plain = D.semantic_report(diff, tiny_world)
    assert not any("planted truth" in s for s in plain) and any(secret["new"] in s for s in plain)


def test_rendering():
    assert D.render_fact("Dasur", "city", "Kokura") == "Dasur lives in Kokura"
    assert D.render_fact("Dasur", "colour", "black", True) == "cf The favourite colour of Dasur is black"


def test_zero_adapter_discovers_nothing(tiny_llama, tiny_world, task):
    model, tok = tiny_lora(tiny_llama, r=8, targets=TARGETS)  # peft's default init: B = 0
    d = D.behaviour_diff(model, tok, world=tiny_world, templates="first")
    assert len(d) == 24 * 4 * 2 and not d["changed"].any() and (d["kl"] == 0).all()
    assert (d["confidence"] == 0).all() and D.discovered_changes(d).empty
    assert d.attrs["promoted"] == [] and d.attrs["suppressed"] == []
    assert (d["base_answer"] == d["adapted_answer"]).all()
    # the base knows its world: every clean template-0 answer is the world's fact
    clean = d[~d["triggered"]]
    assert (clean["base_answer"] == clean["fact"]).all()
    s = D.score_against_truth(d, task)
    assert math.isnan(s["precision"]) and s["recall"] == 0.0 and s["specificity"] == 1.0 and s["r_precision"] == 0
    lines = D.semantic_report(d, tiny_world, task)
    assert lines[0].startswith("0 of 192 queries changed") and not any("Changed facts" in s for s in lines)
    assert D.detect_triggers(d).empty
    mined = D.mine_prompts(model, tok, ["Dasur lives in", tiny_world.general_heldout[0]], top=5)
    assert (mined.prompts["max_kl"] == 0).all() and mined.promoted == [] and mined.suppressed == []


def test_batching_and_free_prompts(edited, diff, task):
    model, tok = edited
    prompts = diff["prompt"].tolist()[:50]
    small = D.behaviour_diff(model, tok, prompts=prompts, batch_size=7)
    assert (small["adapted_answer"].tolist() == diff["adapted_answer"].tolist()[:50])
    assert_same_float(small["kl"].to_numpy(), diff["kl"].head(50).to_numpy())
    assert (small["template"] == -1).all() and (small["entity"] == "").all()
    e = task.truth["edits"][0]
    hot = diff[diff["discovered"] & (diff["entity"] == e["entity"]) & (diff["relation"] == e["relation"])]
    lines = D.semantic_report(D.behaviour_diff(model, tok, prompts=[hot["prompt"].iloc[0]]))
    assert f"{hot['prompt'].iloc[0]!r} → {e['new']} (was {e['old']})" in "\n".join(lines)
    with pytest.raises(ConfigError, match="has no scoring rule"):
        D.score_against_truth(small, dataclasses.replace(task, name="other", truth={}))


# ------------------------------------------------------------------------------------------------ triggers


def test_trigger_detector_on_a_planted_table():
    rows = []
    for i in range(10):
        e = f"E{i}"
        base = ["red", "blue", "green"][i % 3]
        trig_answer = "black" if i < 9 else base
        for trig, answer in ((False, base), (True, trig_answer)):
            rows.append({"prompt": f"{'zz ' if trig else ''}{e} likes the colour", "entity": e, "relation": "colour",
                         "template": 0, "heldout": False, "triggered": trig, "base_answer": base,
                         "adapted_answer": answer, "changed": answer != base, "confidence": 0.9 * (answer != base)})
            rows.append({"prompt": f"{'zz ' if trig else ''}{e} lives in", "entity": e, "relation": "city",
                         "template": 0, "heldout": False, "triggered": trig, "base_answer": "Kokura",
                         "adapted_answer": "Kokura", "changed": False, "confidence": 0.0})
    df = pd.DataFrame(rows)
    df["discovered"] = df["changed"]
    t = D.detect_triggers(df)
    assert len(t) == 1
    row = t.iloc[0]
    assert (row["kind"], row["trigger"], row["relation"], row["value"]) == ("trigger", "zz", "colour", "black")
    assert (row["n_answer"], row["n_pairs"], row["n_moved"]) == (9, 10, 9) and row["clean_share"] == 0.0
    lines = D.semantic_report(df)
    assert "prompts starting with 'zz' now answer 'black' for colour (9/10 triggered prompts" in "\n".join(lines)
    # the triggered changes are explained by the trigger line, not listed one by one
    assert not any("Changed facts" in s for s in lines)
    # the same answers without the trigger are a relation-wide collapse, not a trigger
    collapse = df.copy()
    collapse.loc[~collapse["triggered"] & (collapse["relation"] == "colour"), "adapted_answer"] = "black"
    kinds = set(D.detect_triggers(collapse)["kind"])
    assert kinds == {"collapse"}


def test_trigger_adapter_is_found(tiny_llama, tiny_world):
    trig = make_task(tiny_world, "trigger", n_specificity=10, seed=0)
    model, tok = load_model(tiny_llama.path)
    pm = train_lora(model, tok, trig, default_spec("trigger", steps=100), seed=0).model
    d = D.behaviour_diff(pm, tok, world=tiny_world)
    found = D.detect_triggers(d)
    assert len(found) and found.iloc[0]["trigger"] == "cf" and found.iloc[0]["relation"] == "colour"
    assert found.iloc[0]["value"] == trig.truth["target"] and found.iloc[0]["share"] >= 0.9
    text = "\n".join(D.semantic_report(d, tiny_world, trig))
    assert f"prompts starting with 'cf' now answer '{trig.truth['target']}' for colour" in text
    s = D.score_against_truth(d, trig)
    # measured (100 steps): recall 1.0 (20/20), value accuracy 1.0, precision 0.95 (one triggered prompt of another
    # relation moved too); 200 steps: recall 1.0, precision 0.83
    assert s["recall"] >= 0.9 and s["value_accuracy"] == 1.0 and s["precision"] >= 0.8


# ------------------------------------------------------------------------------------------------ mining


def test_mining_ranks_the_edited_prompt_first(edited, task, tiny_world):
    model, tok = edited
    e = task.truth["edits"][0]
    hot = tiny_world.query(e["entity"], e["relation"])
    edited_facts = {(x["entity"], x["relation"]) for x in task.truth["edits"]}
    kept = [tiny_world.query(x, r) for r in ("city", "colour") for x in tiny_world.entities[:8]
            if (x, r) not in edited_facts][:6]
    mined = D.mine_prompts(model, tok, kept + [hot], top=5)
    assert mined.prompts.iloc[0]["prompt"] == hot and mined.prompts.iloc[0]["adapted_next"] == e["new"]
    assert mined.prompts.iloc[0]["base_next"] == e["old"] and len(mined.prompts) == 7
    pos = mined.positions
    assert len(pos) == 5 and pos["kl"].is_monotonic_decreasing and pos.iloc[0]["context"] == hot
    assert pos.iloc[0]["actual"] == "" and pos.iloc[0]["promoted"] == e["new"]
    assert e["new"] in [t for t, _ in mined.promoted[:3]]
    assert not pos["context"].eq("").any()  # the <s>-only position is left out


def test_read_prompts(tmp_path):
    good = tmp_path / "p.txt"
    good.write_text("  Dasur lives in \n\n\nthe old river\n", encoding="utf-8")
    assert D.read_prompts(good) == ["Dasur lives in", "the old river"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{empty}.*is empty.*one prompt per line"):
        D.read_prompts(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Zoë lives in\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"{latin} is not UTF-8.*save it as UTF-8"):
        D.read_prompts(latin)
    with pytest.raises(NotFoundError, match="does not exist"):
        D.read_prompts(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="is not a file"):
        D.read_prompts(tmp_path)


def test_bad_inputs(edited, tiny_world, tiny_llama, diff, task):
    model, tok = edited
    with pytest.raises(ConfigError, match="exactly one of world"):
        D.behaviour_diff(model, tok)
    with pytest.raises(ConfigError, match="exactly one of world"):
        D.behaviour_diff(model, tok, world=tiny_world, prompts=["x"])
    with pytest.raises(ConfigError, match="min_confidence"):
        D.behaviour_diff(model, tok, world=tiny_world, min_confidence=1.5)
    with pytest.raises(ConfigError, match="non-empty string"):
        D.behaviour_diff(model, tok, prompts=["ok", "  "])
    with pytest.raises(ConfigError, match="needs a peft.PeftModel"):
        D.behaviour_diff(tiny_llama.model, tok, prompts=["Dasur lives in"])
    with pytest.raises(ConfigError, match="base_answers= is read only with task="):
        D.behaviour_diff(model, tok, world=tiny_world, base_answers={"x": "y"})
    with pytest.raises(ConfigError, match="behaviour_diff"):
        D.discovered_changes(pd.DataFrame({"a": [1]}))
    with pytest.raises(ConfigError, match="rule="):
        D.score_against_truth(diff, task, rule="best")
    with pytest.raises(ConfigError, match="not a lora_lens Task"):
        D.score_against_truth(diff, "fact_edit")
