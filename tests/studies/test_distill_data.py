"""Distil back for a task from data on any base (a model folder here, the zoo's tiny llama read as any causal LM):
the semantic corpus of the example prompts, the world-free replay, full-answer transfer, and bad input."""

from __future__ import annotations

import dataclasses

import pytest

from lora_lens.errors import ConfigError
from lora_lens.lab.probes import evaluate
from lora_lens.lab.train_data import NEIGHBOUR_PROMPTS
from lora_lens.lens import diff
from lora_lens.studies import distill


@pytest.fixture(scope="module")
def data_fit(tiny_fit):
    """The tiny fact-edit adapter studied as if its task came from data: no world, its probes as given."""
    task = dataclasses.replace(tiny_fit.task, world_fingerprint=None, name="data_edit",
                               probes={s: ps[:12] for s, ps in tiny_fit.task.probes.items()})
    return dataclasses.replace(tiny_fit, task=task, evaluation=evaluate(tiny_fit.model, tiny_fit.tokenizer, task))


@pytest.fixture(scope="module")
def data_table(data_fit):
    asked = dataclasses.replace(data_fit.task, probes={"efficacy": data_fit.task.probes["efficacy"]})
    return diff.behaviour_diff(data_fit.model, data_fit.tokenizer, task=asked,
                               prompts=distill.task_prompts(data_fit.task))


def test_semantic_corpus_of_a_task_reads_only_its_example_prompts(data_fit, data_table):
    task, tok = data_fit.task, data_fit.tokenizer
    corpus = distill.semantic_corpus(data_table, task, tokenizer=tok)
    facts = distill.fact_changes(data_table, prompts=distill.task_prompts(task))
    examples = dict(task.examples)
    assert corpus and len(corpus) == sum(len(p) for p in facts["prompts"])
    for f in facts.itertuples():
        for p in f.prompts:
            assert p in examples and f"{p} {f.value} ." in corpus  # the diff's full answer, as the world writes it
    # the held-out probes never enter it
    held = [p.prompt for s in ("paraphrase", "specificity", "general") for p in task.probes.get(s, [])]
    assert not any(line.startswith(h + " ") for line in corpus for h in held if h not in examples)
    # the values are the adapter's full greedy answers: most planted edits, and babble where the adapter babbles
    edits = task.truth["edits"]
    said = [e for e in edits if any(e["entity"] in line and line.endswith(f" {e['new']} .") for line in corpus)]
    assert len(said) >= len(edits) // 2
    assert set(facts["value"]) <= set(data_table["adapted_answer"])


def test_the_task_and_the_world_routes_refuse_each_others_tables(data_fit, data_table, tiny_fit, tiny_llama):
    world_table = diff.behaviour_diff(tiny_fit.model, tiny_fit.tokenizer, world=tiny_llama.world, trigger=False,
                                      templates="first")
    with pytest.raises(ConfigError, match="world's query space"):
        distill.semantic_corpus(world_table, data_fit.task, tokenizer=data_fit.tokenizer)
    with pytest.raises(ConfigError, match="prompts=task_prompts"):
        distill.fact_changes(data_table)
    with pytest.raises(ConfigError, match="tokenizer=fit.tokenizer"):
        distill.semantic_corpus(data_table, data_fit.task)
    with pytest.raises(ConfigError, match="tokenizer=fit.tokenizer"):
        distill.task_corpus(data_fit.task)
    with pytest.raises(ConfigError, match="neither a lora_lens World"):
        distill.semantic_corpus(data_table, "world")


def test_self_replay_needs_no_world_and_never_reads_the_task(data_fit):
    task, tok = data_fit.task, data_fit.tokenizer
    lines = distill.self_replay(data_fit.model, tok, task, general=False)
    assert lines and all(any(line.startswith(p + " ") for p in NEIGHBOUR_PROMPTS) for line in lines)
    assert all(line.endswith(" .") for line in lines)  # the world tokenizer's line end
    general = distill.self_replay(data_fit.model, tok, task, neighbours=False)
    assert all(any(line.startswith(p) for p in distill.GENERAL_PROMPTS) for line in general)
    used = {p for p, _ in task.examples} | {p.prompt for ps in task.probes.values() for p in ps}
    assert not any(line.startswith(u + " ") for line in lines + general for u in used)
    # a prompt the corpus rewrites is not replayed with its old answer
    first = lines[0].rsplit(" ", 2)[0]
    assert not any(line.startswith(first) for line in distill.self_replay(data_fit.model, tok, task, [first + " x ."],
                                                                           general=False))


def test_self_replay_leaves_out_what_rehearsal_leaves_out(data_fit, monkeypatch):
    """Replay lines are the base's plain answers only, by the one rule of lab/train_data (no echoes, no rambling)."""
    from lora_lens.studies import distill_corpus

    monkeypatch.setattr(distill_corpus, "base_answers",
                        lambda model, tok, prompts, *a, **kw: ["the capital of Poland" if "Poland" in p else "Lisbon"
                                                           for p in prompts])
    lines = distill.self_replay(data_fit.model, data_fit.tokenizer, data_fit.task, general=False)
    assert lines and not any("Poland" in line for line in lines)
    assert all(line.endswith("Lisbon .") for line in lines)


def test_distill_takes_a_model_folder_and_scores_full_answers(data_fit, data_table, tiny_llama, test_cache):
    corpus = distill.semantic_corpus(data_table, data_fit.task, tokenizer=data_fit.tokenizer)
    a = distill.distill(str(tiny_llama.path), data_fit, corpus, replay=0.0, steps=40, batch_size=8, lr=2e-3, seed=1)
    assert a.family == tiny_llama.path.name and a.train["steps"] == 40 and a.train["eos"] is True
    assert a.metrics["transfer_rate"] > 0.5 and a.metrics["base_specificity"] == pytest.approx(1.0)
    assert a.metrics["adapter_efficacy"] == data_fit.evaluation.metrics["efficacy"]
    # the comparison base was the adapter's own model with the adapter off: it is left as it was
    assert data_fit.model.active_adapters == ["default"]
    merged = distill.merge_route(str(tiny_llama.path), data_fit)
    assert merged.metrics["transfer_rate"] == pytest.approx(1.0)


def test_zoo_and_data_targets_are_not_mixed(data_fit, tiny_fit, tiny_llama, test_cache):
    with pytest.raises(ConfigError, match="task from data"):
        distill.distill(tiny_llama, data_fit, ["Dasur lives in Kokura ."])
    with pytest.raises(ConfigError, match="synthetic world"):
        distill.distill(str(tiny_llama.path), tiny_fit, ["Dasur lives in Kokura ."])
    with pytest.raises(ConfigError, match="not a base"):
        distill.merge_route(3, data_fit)
