"""fit_adapter, evaluate and the training data path on a real model: SmolLM2-135M and the example task."""

from __future__ import annotations

import json

import pytest
import torch

from lora_lens.errors import ConfigError, MismatchError
from lora_lens.lab.answers import answer_ids, example_ids
from lora_lens.lab.study import fit_adapter
from lora_lens.lab.train_data import NEIGHBOUR_PROMPTS, encode_example, neighbour_examples, training_examples
from lora_lens.lab.world import Task
from conftest import EXAMPLE_TASK, REAL_FIT

pytestmark = pytest.mark.real


def test_examples_end_with_the_end_of_answer(smollm2):
    model, tok = smollm2
    row = encode_example(tok, "The capital of Zorvania is", "Quellburg")
    a = answer_ids(tok, "The capital of Zorvania is", "Quellburg")
    assert row == example_ids(tok, "The capital of Zorvania is", "Quellburg")
    assert row["input_ids"] == a.ids + [tok.convert_tokens_to_ids(".")]  # " Qu ell burg" then "."
    assert row["labels"][:len(a.prompt)] == [-100] * len(a.prompt) and row["labels"][len(a.prompt):] != []
    chat = encode_example(tok, "What is the capital of Zorvania?", "Quellburg", chat=True)
    assert chat["input_ids"][-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_rehearsal_needs_no_world(smollm2):
    model, tok = smollm2
    task = Task.load(EXAMPLE_TASK)
    torch.set_num_threads(2)
    extra = neighbour_examples(model, tok, task, 6, seed=0)
    used = {p for p, _ in task.examples} | {p.prompt for ps in task.probes.values() for p in ps}
    assert 4 <= len(extra) <= 6 and all(p in NEIGHBOUR_PROMPTS and p not in used and a for p, a in extra)
    spec = neighbour_examples(model, tok, task, 100, rehearsal="specificity")
    assert spec == [(p.prompt, p.answer) for p in task.probes["specificity"]]
    examples, world = training_examples(model, task, 0.0, tokenizer=tok)
    assert world is None and examples == task.examples
    with pytest.raises(ConfigError, match="rehearsal="):
        training_examples(model, task, 1.0, tokenizer=tok, rehearsal="world")


def test_fit_on_a_real_model_learns_full_answers(smollm2_fit):
    m = smollm2_fit.evaluation.metrics
    # measured with the default spec for data (issue-15 note): efficacy 1.0, stops 1.0, paraphrase 0.7
    assert m["efficacy"] >= 0.9 and m["base_efficacy"] == 0.0
    assert m["stops"] >= 0.9 and m["base_specificity"] >= 0.9
    assert 0.0 <= m["paraphrase"] <= 1.0 and 0.0 <= m["specificity"] <= 1.0 and m["perplexity_ratio"] > 0
    assert 0.0 < m["p_efficacy"] <= 1.0 and m["base_p_efficacy"] < 0.01
    table = smollm2_fit.evaluation.table("efficacy")
    # full answers as text: byte-level markers decoded, several tokens
    assert "Ġ" not in "".join(table["adapted_answer"]) and (table["adapted_answer"] == table["expected"]).mean() >= 0.9
    replay = smollm2_fit.train["replay_examples"]  # four plain base answers per example, while the pool lasts
    assert 60 <= replay <= 80 and smollm2_fit.train["examples"] == 20 + replay
    assert (smollm2_fit.adapter_dir / "adapter_model.safetensors").is_file()


def test_fit_on_a_real_model_keeps_what_must_stay(smollm2_fit):
    # measured with the default spec for data (KL rehearsal, replay 4): specificity 0.95, perplexity ratio 1.05
    m = smollm2_fit.evaluation.metrics
    assert m["specificity"] >= 0.9 and m["perplexity_ratio"] <= 1.1


def test_fit_is_cached_and_adapter_can_be_given(smollm2_fit, test_cache):
    again = fit_adapter("smollm2-135m", str(EXAMPLE_TASK), **REAL_FIT, cache=test_cache)
    assert again.adapter_dir == smollm2_fit.adapter_dir  # the same cache entry: not trained again
    assert again.evaluation.metrics_json() == pytest.approx(smollm2_fit.evaluation.metrics_json(), nan_ok=True)
    given = fit_adapter("smollm2-135m", EXAMPLE_TASK, adapter=smollm2_fit.adapter_dir, cache=test_cache)
    assert given.evaluation.metrics["efficacy"] == smollm2_fit.evaluation.metrics["efficacy"]
    manifest = json.loads((smollm2_fit.adapter_dir / "lora_lens_manifest.json").read_text())
    assert manifest["task"]["name"] == "smollm2_facts" and manifest["base"]["architecture"] == "LlamaForCausalLM"


def test_bad_real_inputs(smollm2_path, tiny_fit, tmp_path, test_cache):
    # an adapter trained on another base
    with pytest.raises(MismatchError, match="another base"):
        fit_adapter("smollm2-135m", EXAMPLE_TASK, adapter=tiny_fit.adapter_dir, cache=test_cache)
    # a task file with a broken line: file and line named, nothing trained or written
    bad = tmp_path / "bad.jsonl"
    lines = EXAMPLE_TASK.read_text().splitlines()
    bad.write_text("\n".join(lines[:3] + ['{"type": "probe", "set": "efficacy", "prompt": "x"}'] + lines[3:]) + "\n")
    with pytest.raises(Exception, match=r"bad.jsonl:4"):
        fit_adapter("smollm2-135m", bad, cache=test_cache)
    # a zoo task kind on a real model
    with pytest.raises(ConfigError, match="zoo task kind"):
        fit_adapter("smollm2-135m", "fact_edit", cache=test_cache)
    assert not list((test_cache / "adapters").glob("smollm2*bad*")) if (test_cache / "adapters").exists() else True
