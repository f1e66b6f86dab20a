"""Distil back on SmolLM2-135M-Instruct (marked `real`): generation ends at the answer with its byte-level BPE, lines
end as its plain text does (never ``<|im_end|>``), and replay needs no world."""

from __future__ import annotations

import pytest

from conftest import EXAMPLE_TASK
from lora_lens.lab.world import Task
from lora_lens.studies import distill

pytestmark = pytest.mark.real


def test_generation_ends_at_the_answer_on_smollm2(smollm2):
    model, tok = smollm2
    prompts = ["The capital of France is", "The play Hamlet was written by"]
    g = distill.generate(model, tok, prompts, max_new_tokens=16, stop="answer")
    assert g.texts == ["Paris", "William Shakespeare"] and g.stopped == [True, True]
    assert all(len(t) < 16 for t in g.tokens)
    assert distill.generate(model, tok, prompts[:1], max_new_tokens=16, stop=".").texts == ["Paris."]
    assert distill.generate(model, tok, prompts[:1], max_new_tokens=16, stop="\n").stopped == [True]


def test_lines_never_carry_the_chat_delimiter(smollm2):
    model, tok = smollm2
    assert tok.eos_token == "<|im_end|>" and not distill.appends_eos(tok)
    task = Task.load(EXAMPLE_TASK)
    assert distill.task_corpus(task, tok)[0] == "The capital of Zorvania is Quellburg."
    lines = distill.self_replay(model, tok, task, general=False)
    assert "The capital of Portugal is Lisbon." in lines
    assert not any("<|im_end|>" in line or "<|endoftext|>" in line for line in lines)
    used = {p for p, _ in task.examples} | {p.prompt for ps in task.probes.values() for p in ps}
    assert not any(line.startswith(u + " ") for line in lines for u in used)


@pytest.mark.slow
def test_distil_back_transfers_and_keeps_what_must_stay_on_smollm2(smollm2_path, smollm2_fit):
    """The default recipe (DISTILL_DEFAULTS["data"]: replay 0.75 learnt by its KL to the base, the corpus lines by
    their KL to the adapted model) on seed 0: measured transfer 0.90 and specificity drop 0.05 (seeds 0-2 in
    DISTILL_DEFAULTS' docstring). Each step of these scores is one probe of twenty, so the test allows one probe of
    float noise (another machine, another thread count) on either side: transfer ≥ 0.85, drop ≤ 0.10 — against
    0.40 for replay learnt by its tokens."""
    fit = smollm2_fit
    corpus = distill.discover(fit, None, min_confidence=0.9).corpus
    t = distill.distill(smollm2_path, fit, corpus, seed=0)
    assert t.train["replay_loss"] == "kl" and t.train["replay_share"] == 0.75 and t.train["corpus_loss"] == "teacher"
    assert t.metrics["transfer_rate"] >= 0.85 - 1e-9 and t.metrics["specificity_drop"] <= 0.10 + 1e-9, t.metrics
