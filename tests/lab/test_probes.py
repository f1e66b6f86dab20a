"""Tests of behaviour evaluation: base vs adapted on one PeftModel with the adapter toggled."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from conftest import assert_same_float, tiny_lora, train_last_token
from lora_lens.errors import ConfigError
from lora_lens.lab import probes
from lora_lens.lab.probes import (COMPARE_COLUMNS, TABLE_COLUMNS, accuracy, compare_answers, evaluate,
                                  next_token_logits, perplexity)
from lora_lens.lab.tokenizer import token_id
from lora_lens.lab.world import make_task
from lora_lens.lab.zoo import load_model

TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
BASE_KEYS = ("efficacy", "paraphrase", "specificity", "false_trigger_rate")



@pytest.fixture(scope="module")
def task(tiny_world):
    return make_task(tiny_world, "fact_edit", k=3, n_specificity=40, seed=0)


@pytest.fixture(scope="module")
def trigger(tiny_world):
    return make_task(tiny_world, "trigger", n_specificity=10, seed=0)


@pytest.fixture(scope="module")
def original(tiny_llama):
    """A fresh, never-adapted copy of the tiny base model."""
    model, _ = load_model(tiny_llama.path)
    return model


@pytest.fixture(scope="module")
def fresh(tiny_llama):
    """A PeftModel whose LoRA B matrices are zero (peft's default init): the adapter changes nothing."""
    return tiny_lora(tiny_llama, targets=TARGETS)


@pytest.fixture(scope="module")
def trained(tiny_llama, tiny_world, task):
    """A PeftModel trained on the edits (loss on the answer token only) plus untouched facts to keep."""
    model, tok = tiny_lora(tiny_llama, r=8, targets=TARGETS)
    edited = {(e["entity"], e["relation"]) for e in task.truth["edits"]}
    keep = [(p.prompt, p.answer) for p in tiny_world.fact_probes() if (p.entity, p.relation) not in edited][:60]
    data = task.examples + keep
    loss = train_last_token(model, tok, data, steps=40, lr=1e-2)
    assert loss < 0.1
    return model, tok


def _same(a, b, tol=0.0) -> bool:
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tol


def test_zero_adapter_changes_nothing(fresh, task, trigger):
    model, tok = fresh
    evs = {t.name: evaluate(model, tok, t) for t in (task, trigger)}
    for ev in evs.values():
        m = ev.metrics
        for key in BASE_KEYS:
            assert _same(m[key], m[f"base_{key}"]), key
        assert m["perplexity_adapted"] == m["perplexity_base"] and m["perplexity_ratio"] == 1.0
        kls = [k for k in m if k.startswith("kl_") and m[k] is not None]
        assert len(kls) >= 4 and all(m[k] == 0.0 for k in kls)
        assert m["specificity_agreement"] == 1.0
        assert ev.promoted == [] and ev.suppressed == []
        df = ev.table()
        assert list(df.columns) == TABLE_COLUMNS and len(df) == sum(ev.counts[s] for s in ev.counts if s != "general")
        assert (df["base_answer"] == df["adapted_answer"]).all() and not df["changed"].any()
        assert (df["p_expected_base"] == df["p_expected_adapted"]).all()
    # the pretrained base knows every fact; the edits are new to it
    assert evs["fact_edit"].metrics["base_specificity"] == 1.0 and evs["fact_edit"].metrics["base_efficacy"] == 0.0


def test_trained_adapter_learns_edits(trained, task):
    model, tok = trained
    ev = evaluate(model, tok, task, top_k=5)
    m = ev.metrics
    assert m["efficacy"] == 1.0 > m["base_efficacy"]
    assert m["paraphrase"] > m["base_paraphrase"]
    assert m["kl_efficacy"] > m["kl_specificity"] > 0 and m["kl_general"] > 0
    assert m["perplexity_ratio"] == pytest.approx(m["perplexity_adapted"] / m["perplexity_base"])
    assert m["false_trigger_rate"] is None and m["base_false_trigger_rate"] is None and m["kl_false_trigger"] is None
    new = {e["new"] for e in task.truth["edits"]}
    old = {e["old"] for e in task.truth["edits"]}
    promoted = [t for t, _ in ev.promoted]
    assert new <= set(promoted[:len(new)]), ev.promoted
    assert old & {t for t, _ in ev.suppressed[:len(old)]}, ev.suppressed
    assert all(d > 0 for _, d in ev.promoted) and all(d < 0 for _, d in ev.suppressed)
    assert [d for _, d in ev.promoted] == sorted((d for _, d in ev.promoted), reverse=True)
    eff = ev.table("efficacy")
    assert len(eff) == len(task.probes["efficacy"]) and eff["adapted_correct"].all() and not eff["base_correct"].any()
    assert (eff["base_answer"] == eff["expected_before"]).all() and (eff["adapted_answer"] == eff["expected"]).all()
    assert (eff["p_expected_adapted"] > 0.5).all() and (eff["p_expected_base"] < 0.5).all()


def test_toggle_restores_base(trained, original, task):
    model, tok = trained
    prompts = [p.prompt for ps in task.probes.values() for p in ps]
    want = next_token_logits(original, tok, prompts)
    adapted = next_token_logits(model, tok, prompts)
    grads = [p.requires_grad for p in model.parameters()]
    with model.disable_adapter():
        base = next_token_logits(model, tok, prompts)
    assert_same_float(base, want)
    assert (adapted - want).abs().max() > 1.0
    # evaluate toggles inside and leaves the model as it found it: adapter on, same grads flags, same mode
    model.train()
    ev = evaluate(model, tok, task)
    assert model.training
    model.eval()
    assert [p.requires_grad for p in model.parameters()] == grads
    torch.testing.assert_close(next_token_logits(model, tok, prompts), adapted, rtol=0, atol=0)
    # base-side outputs of evaluate are the original model's, and a separate base model gives the same metrics
    probs = torch.softmax(next_token_logits(original, tok, ev.table()["prompt"].tolist()), -1)
    ids = torch.tensor([token_id(tok, a) for a in ev.table()["expected"]])
    p_orig = probs[torch.arange(len(ids)), ids]
    assert_same_float(torch.tensor(ev.table()["p_expected_base"].tolist()), p_orig)
    other = evaluate(model, tok, task, base=original)
    assert all(_same(v, other.metrics[k], 1e-6) for k, v in ev.metrics.items())


def test_batched_equals_one_by_one(trained, tiny_world):
    model, tok = trained
    small = make_task(tiny_world, "fact_edit", k=2, n_specificity=8, seed=1)
    small = dataclasses.replace(small, probes={**small.probes, "general": small.probes["general"][:6]})
    one = evaluate(model, tok, small, batch_size=1)
    many = evaluate(model, tok, small, batch_size=64)
    assert one.metrics.keys() == many.metrics.keys()
    for k, v in one.metrics.items():
        assert _same(v, many.metrics[k], 1e-5 * max(1.0, abs(v or 0.0))), (k, v, many.metrics[k])
    a, b = one.table(), many.table()
    assert (a["adapted_answer"] == b["adapted_answer"]).all() and (a["base_answer"] == b["base_answer"]).all()
    for col in ("p_expected_base", "p_expected_adapted", "kl"):
        assert (a[col] - b[col]).abs().max() <= 1e-5, col
    assert [t for t, _ in one.promoted] == [t for t, _ in many.promoted]
    assert all(abs(x - y) <= 1e-5 for (_, x), (_, y) in zip(one.promoted, many.promoted))


def test_false_trigger_rate_only_for_trigger_tasks(fresh, trigger, task):
    model, tok = fresh
    m = evaluate(model, tok, trigger).metrics
    assert isinstance(m["false_trigger_rate"], float) and 0.0 <= m["false_trigger_rate"] <= 1.0
    assert m["false_trigger_rate"] == m["base_false_trigger_rate"] == 0.0  # the base never answers the target
    assert m["kl_false_trigger"] == 0.0
    assert evaluate(model, tok, task).metrics["false_trigger_rate"] is None
    # definition: share of clean prompts answered with the target (here pretend the target is a true colour)
    ft = trigger.probes["false_trigger"][:6]
    fake = ft[0].base_answer
    hot = dataclasses.replace(trigger, probes={"false_trigger": ft}, truth={**trigger.truth, "target": fake})
    rate = evaluate(model, tok, hot, base=None).metrics["false_trigger_rate"]
    assert rate == pytest.approx(sum(p.base_answer == fake for p in ft) / len(ft)) and rate > 0


def test_perplexity(original, tiny_llama, tiny_world, trained, monkeypatch):
    tok = tiny_llama.tokenizer
    lines = tiny_world.general_heldout
    ppl = perplexity(original, tok, lines)
    assert math.isfinite(ppl) and 1.0 < ppl < len(tok) / 4
    assert perplexity(original, tok, lines, batch_size=1) == pytest.approx(ppl, rel=1e-5)
    monkeypatch.setattr(probes._sequence_batches, "__defaults__", (1,))  # memory cap: one row per forward
    assert perplexity(original, tok, lines, batch_size=64) == pytest.approx(ppl, rel=1e-5)
    monkeypatch.undo()
    assert perplexity(original, tok, ["the zz qq xx vv ."]) > ppl  # out-of-world text is less likely
    assert math.isnan(perplexity(original, tok, []))
    model, _ = trained
    m = evaluate(model, tok, make_task(tiny_world, "fact_edit", k=3, n_specificity=1)).metrics
    with model.disable_adapter():
        assert perplexity(model, tok, lines) == pytest.approx(m["perplexity_base"], rel=1e-6)
    assert perplexity(model, tok, lines) == pytest.approx(m["perplexity_adapted"], rel=1e-6)
    assert m["perplexity_base"] == pytest.approx(ppl, rel=1e-6)
    with pytest.raises(ConfigError, match="batch_size"):
        perplexity(original, tok, lines, batch_size=0)


def test_missing_sets_and_plain_model(original, tiny_llama, task):
    tok = tiny_llama.tokenizer
    partial = dataclasses.replace(task, probes={"efficacy": task.probes["efficacy"], "specificity": []})
    m = evaluate(original, tok, partial, base=None).metrics
    assert m["efficacy"] == 0.0 and math.isnan(m["paraphrase"]) and math.isnan(m["specificity"])
    assert math.isnan(m["perplexity_adapted"])
    js = evaluate(original, tok, partial, base=None).metrics_json()
    assert js["paraphrase"] is None and js["efficacy"] == 0.0 and json.loads(json.dumps(js, allow_nan=False)) == js
    assert all(m[k] is None for k in ("base_efficacy", "perplexity_base", "perplexity_ratio", "kl_efficacy",
                                      "kl_general", "specificity_agreement", "false_trigger_rate"))
    full = evaluate(original, tok, task, base=None)
    assert full.metrics["specificity"] == 1.0 and full.promoted == [] and full.table()["base_answer"].isna().all()
    assert full.metrics["efficacy"] == pytest.approx(accuracy(original, tok, task.probes["efficacy"]))
    with pytest.raises(ConfigError, match="base=None"):
        evaluate(original, tok, task)  # a plain model has no adapter to toggle


def test_bad_answers_fail_before_any_forward(fresh, task):
    model, tok = fresh
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        # a multi-token answer is fine now; whitespace at the join is not (it cannot be read in context)
        bad = dataclasses.replace(task.probes["efficacy"][0], answer=" Qwzzyplonk")
        broken = dataclasses.replace(task, probes={**task.probes, "efficacy": [bad] + task.probes["efficacy"]})
        with pytest.raises(ConfigError, match="Qwzzyplonk"):
            evaluate(model, tok, broken)
        with pytest.raises(ConfigError, match="top_k"):
            evaluate(model, tok, task, top_k=-1)
        with pytest.raises(ConfigError, match="delta_sets"):
            evaluate(model, tok, task, delta_sets=("efficacyy",))
        with pytest.raises(ConfigError, match="base="):
            evaluate(model, tok, task, base="lora")
        with pytest.raises(ConfigError, match="prompts"):
            compare_answers(model, tok, ["Dasur lives in", ""])
    finally:
        hook.remove()
    assert calls == []


def test_compare_answers(trained, fresh, task):
    edit = task.truth["edits"][0]
    prompt = task.probes["efficacy"][0].prompt
    model, tok = trained
    df = compare_answers(model, tok, [prompt, "Dasur lives in"], top_k=3)
    assert list(df.columns) == COMPARE_COLUMNS and len(df) == 6 and df["rank"].tolist() == [1, 2, 3] * 2
    first = df.iloc[0]
    assert first["adapted_token"] == edit["new"] and first["base_token"] == edit["old"] and first["kl"] > 1.0
    for col in ("p_base", "p_adapted"):
        for _, g in df.groupby("prompt"):
            assert g[col].is_monotonic_decreasing and g[col].sum() <= 1.0 + 1e-6
    z, ztok = fresh
    same = compare_answers(z, ztok, prompt, top_k=2)
    assert (same["base_token"] == same["adapted_token"]).all() and (same["kl"] == 0.0).all()
    alone = compare_answers(z, ztok, prompt, top_k=2, base=None)
    assert alone["base_token"].isna().all() and alone["adapted_token"].tolist() == same["adapted_token"].tolist()


def test_next_token_logits_match_full_forward(original, tiny_llama):
    tok = tiny_llama.tokenizer
    prompts = ["Dasur lives in", "The favourite colour of Dasur is", "the old river"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        full = original(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    last = enc["attention_mask"].sum(1) - 1
    torch.testing.assert_close(next_token_logits(original, tok, prompts, batch_size=2), full[torch.arange(3), last],
                               rtol=0, atol=1e-5)
    assert accuracy(original, tok, tiny_llama.world.fact_probes()) == 1.0
