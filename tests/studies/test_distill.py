"""Distil back: change → data, batched generation, continued pretraining with replay, transfer metrics, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_same_float
from lora_lens.errors import ConfigError, MismatchError
from lora_lens.lab.world import TEMPLATES, make_world
from lora_lens.lab.zoo import Pretrained, build_model, load_model
from lora_lens.lens import diff
from lora_lens.studies import distill
from lora_lens.utils import write_json


@pytest.fixture(scope="module")
def corpus(tiny_fit, tiny_llama):
    table = diff.behaviour_diff(tiny_fit.model, tiny_fit.tokenizer, world=tiny_llama.world)
    return distill.semantic_corpus(table, tiny_llama.world)


def _files(root: Path) -> set[Path]:
    return {p for p in Path(root).rglob("*")}


def test_semantic_corpus_renders_the_edits_through_training_templates(tiny_fit, corpus, tiny_llama):
    world = tiny_llama.world
    assert tiny_fit.evaluation.metrics["efficacy"] >= 0.8
    learned = [e for e in tiny_fit.task.truth["edits"]
               if tiny_fit.evaluation.table("efficacy").query(f"entity == '{e['entity']}' and relation == "
                                                         f"'{e['relation']}'")["adapted_correct"].all()]
    for e in learned:
        for t in range(len(TEMPLATES[e["relation"]][0])):
            assert f"{world.query(e['entity'], e['relation'], t)} {e['new']} ." in corpus
    heldout = [tpl.format(e="").strip() for r in TEMPLATES for tpl in TEMPLATES[r][1]]
    assert not any(h and h in line for line in corpus for h in heldout if len(h) > 8)
    assert distill.task_corpus(tiny_fit.task)[0].endswith(" .")


def test_replay_corpus_leaves_out_rewritten_facts(tiny_llama, corpus):
    world = tiny_llama.world
    replay = distill.replay_corpus(world, corpus)
    e = corpus[0].split(" .")[0]
    assert all(not line.startswith(e.rsplit(" ", 1)[0] + " ") for line in replay)
    assert len(replay) < len(world.corpus()) and set(world.general_train) <= set(replay)


def _hf_greedy(model, tok, prompt, n, stop_id):
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=[tok.eos_token_id, stop_id],
                         pad_token_id=tok.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_batched_generation_equals_per_prompt_generate(tiny_fit, tiny_llama):
    tok = tiny_fit.tokenizer
    prompts = distill.world_prompts(tiny_llama.world)[::37][:10] + ["the old river", "Dasur"]
    stop_id = tok(" .", add_special_tokens=False)["input_ids"][0]
    batched = distill.generate(tiny_fit.model, tok, prompts, max_new_tokens=5, batch_size=5)
    assert batched.tokens == [_hf_greedy(tiny_fit.model, tok, p, 5, stop_id) for p in prompts]
    # absolute positions (GPT-2): left padding must not shift them
    torch.manual_seed(0)
    gpt2 = build_model("gpt2", "tiny", tok, seed=0).eval()
    batched = distill.generate(gpt2, tok, prompts, max_new_tokens=4, batch_size=12)
    assert batched.tokens == [_hf_greedy(gpt2, tok, p, 4, stop_id) for p in prompts]


def test_contrastive_generation_keeps_what_the_adapter_wrote(tiny_fit, tiny_llama):
    tok = tiny_fit.tokenizer
    prompts = distill.world_prompts(tiny_llama.world, trigger=False)
    g = distill.generate(tiny_fit.model, tok, prompts, max_new_tokens=2, base="adapter")
    plain = distill.generate(tiny_fit.model, tok, prompts, max_new_tokens=2)
    assert g.tokens == plain.tokens and all(k >= 0 for ks in g.kl for k in ks)
    lines = distill.contrastive_corpus(tiny_fit.model, tok, prompts, min_kl=1.0, max_new_tokens=2)
    edited = [f"{tiny_llama.world.query(e['entity'], e['relation'], 0)} {e['new']}"
              for e in tiny_fit.task.truth["edits"]]
    assert lines and sum(any(line.startswith(x) for line in lines) for x in edited) >= len(edited) // 2
    amplified = distill.generate(tiny_fit.model, tok, prompts[:20], max_new_tokens=2, base="adapter", alpha=1.0)
    assert len(amplified.tokens) == 20


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_new_tokens=0), ["max_new_tokens=0", "positive"]),
    (dict(max_new_tokens=-3), ["max_new_tokens=-3"]),
    (dict(max_new_tokens=80), ["max_new_tokens=80", "positions"]),
    (dict(alpha=1.0), ["alpha=1.0", "base"]),
    (dict(stop="Zeta Omega"), ["tokens"]),
])
def test_generate_rejects_bad_input(tiny_fit, kwargs, words):
    with pytest.raises(ConfigError) as err:
        distill.generate(tiny_fit.model, tiny_fit.tokenizer, ["Dasur lives in"], **kwargs)
    assert all(w in str(err.value) for w in words)


def test_distill_transfers_and_is_deterministic(tiny_fit, corpus, tiny_llama, test_cache):
    before = _files(test_cache)
    a = distill.distill(tiny_llama, tiny_fit, corpus, replay=0.5, steps=60, batch_size=16, lr=2e-3, seed=3)
    b = distill.distill(tiny_llama, tiny_fit, corpus, replay=0.5, steps=60, batch_size=16, lr=2e-3, seed=3)
    assert a.metrics == b.metrics and a.train["loss"] == b.train["loss"]
    assert a.metrics["transfer_rate"] > 0.5
    for key in ("paraphrase_transfer", "specificity_drop", "perplexity_ratio"):
        assert a.metrics[key] is not None
    assert a.train["replay_share"] == 0.5 and a.train["corpus_lines"] == len(corpus)
    assert _files(test_cache) == before, "distill wrote into the cache"
    # the base of the comparison is untouched
    assert tiny_llama.model.training is False
    merged = distill.merge_route(tiny_llama, tiny_fit)
    assert merged.metrics["transfer_rate"] == pytest.approx(1.0)
    table = distill.transfer_table({"semantic": a, "merge": merged})
    assert list(table["route"]) == ["semantic", "merge"]


@pytest.mark.parametrize("replay", [-0.1, 1.5, True, "half"])
def test_replay_ratio_outside_unit_interval_is_refused(tiny_fit, corpus, tiny_llama, test_cache, replay):
    before = _files(test_cache)
    with pytest.raises(ConfigError) as err:
        distill.distill(tiny_llama, tiny_fit, corpus, replay=replay)
    assert f"replay={replay!r}" in str(err.value) and "[0, 1]" in str(err.value)
    assert _files(test_cache) == before


def test_empty_corpus_says_no_change_was_found(tiny_fit, tiny_llama, test_cache):
    before = _files(test_cache)
    with pytest.raises(ConfigError, match="empty: no change was found"):
        distill.distill(tiny_llama, tiny_fit, [])
    with pytest.raises(ConfigError, match="empty"):
        distill.continue_pretraining(tiny_llama.model, tiny_llama.tokenizer, [])
    assert _files(test_cache) == before


def test_semantic_corpus_of_an_unchanged_model_is_empty(tiny_fit, tiny_llama):
    table = diff.behaviour_diff(tiny_fit.model, tiny_fit.tokenizer, world=tiny_llama.world, trigger=False,
                                templates="first")
    table["changed"] = False
    table["discovered"] = False
    table["confidence"] = 0.0
    assert distill.semantic_corpus(table, tiny_llama.world) == []


def test_adapter_on_another_base_is_refused(tiny_fit, tiny_llama, tmp_path):
    """The merge route checks the adapter's base fingerprint before touching any weight."""
    other = build_model("llama", "tiny", tiny_llama.tokenizer, seed=7)
    path = tmp_path / "other"
    other.save_pretrained(path)
    tiny_llama.tokenizer.save_pretrained(path)
    shutil.copy(tiny_llama.path / "world.jsonl", path / "world.jsonl")
    pre = Pretrained(other.eval(), tiny_llama.tokenizer, tiny_llama.world, "llama", "tiny", path, {"key": "x"})
    with pytest.raises(MismatchError, match="another base"):
        distill.merge_route(pre, tiny_fit)
    # a model of another world cannot take the corpus either (its tokenizer and facts differ)
    world = make_world(n_entities=12, n_general=12, seed=5)
    alien = Pretrained(other, tiny_llama.tokenizer, world, "llama", "tiny", path, {"key": "y"})
    with pytest.raises(MismatchError, match="world"):
        distill.distill(alien, tiny_fit, ["Dasur lives in Kokura ."])


def test_a_zoo_model_of_another_family_keeps_the_world_tokenizer(tiny_llama, tmp_path):
    """Cross-family distillation needs the same words as tokens: a qwen2 zoo folder loads the world tokenizer."""
    qwen = build_model("qwen2", "tiny", tiny_llama.tokenizer, seed=0)
    qwen.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    write_json(tmp_path / "lora_lens.json", {"family": "qwen2"})
    _, tok = load_model(tmp_path)
    text = [f"{tiny_llama.world.entities[0]} likes the colour brown ."]
    assert tok(text)["input_ids"] == tiny_llama.tokenizer(text)["input_ids"]


def test_bench_generate_quick_reports_rows():
    from benchmarks import bench_generate

    result = bench_generate.run(quick=True)
    assert result["name"] == "generate" and result["meta"]["greedy_outputs_equal"]
    for row in result["rows"]:
        assert set(row) == {"comparison", "baseline_s", "ours_s", "ratio", "target", "note"}
        assert row["baseline_s"] > 0 and row["ours_s"] > 0 and row["ratio"] == row["baseline_s"] / row["ours_s"]


def test_kl_replay_and_trained_modules_are_validated_before_training(tiny_fit, corpus, tiny_llama, test_cache):
    before = _files(test_cache)
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    with pytest.raises(ConfigError, match="replay_loss='kl'.*reference"):
        distill.continue_pretraining(model, tok, corpus, corpus, replay_loss="kl")
    with pytest.raises(ConfigError, match="replay_loss='tokens' is unknown"):
        distill.distill(tiny_llama, tiny_fit, corpus, replay_loss="tokens")
    with pytest.raises(ConfigError, match="trained='lora' is unknown"):
        distill.distill(tiny_llama, tiny_fit, corpus, trained="lora")
    assert _files(test_cache) == before and all(p.requires_grad for p in model.parameters())
    zoo = distill.DISTILL_DEFAULTS["zoo"]
    assert (zoo["replay"], zoo["replay_loss"], zoo["trained"]) == (0.5, "text", "all")


def test_kl_replay_starts_at_zero_and_transfers(tiny_fit, corpus, tiny_llama):
    # only replay lines, learnt by their KL to the base the copy starts from: the first loss is 0 (up to rounding)
    still = distill.distill(tiny_llama, tiny_fit, corpus, replay=1.0, steps=3, batch_size=8, lr=2e-3,
                            replay_loss="kl")
    assert still.train["replay_loss"] == "kl" and still.train["replay_share"] == 1.0
    assert_same_float(still.train["loss"][0], 0.0)
    run = distill.distill(tiny_llama, tiny_fit, corpus, replay=0.5, steps=60, batch_size=16, lr=2e-3, seed=3,
                          replay_loss="kl")
    assert run.metrics["transfer_rate"] > 0.5
    prose = distill.forgetting_prose(run)
    assert f"{run.metrics['specificity_drop']:.3f}" in prose and "KL to the base" in prose
    assert ("holds" in prose) == (run.metrics["specificity_drop"] <= 0.05)


def test_answer_skips_leave_out_each_line_s_prompt(tiny_fit, corpus):
    tok = tiny_fit.tokenizer
    prompts = distill.task_prompts(tiny_fit.task)
    skips = distill.answer_skips(tok, corpus, prompts, eos=True)
    for line, k in skips.items():
        prompt = max((p for p in prompts if line.startswith(p)), key=len, default=None)
        assert k == (0 if prompt is None else len(tok(prompt)["input_ids"])), line
    assert any(k > 0 for k in skips.values())
    assert distill.answer_skips(tok, ["Nobody knows this ."], prompts) == {"Nobody knows this .": 0}


def test_corpus_losses_are_validated_before_training(tiny_fit, corpus, tiny_llama, test_cache):
    before = _files(test_cache)
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    with pytest.raises(ConfigError, match="corpus_loss='tokens' is unknown"):
        distill.distill(tiny_llama, tiny_fit, corpus, corpus_loss="tokens")
    with pytest.raises(ConfigError, match="corpus_loss='answer'.*pass prompts"):
        distill.continue_pretraining(model, tok, corpus, corpus_loss="answer")
    with pytest.raises(ConfigError, match="corpus_loss='teacher'.*pass teacher"):
        distill.continue_pretraining(model, tok, corpus, corpus_loss="teacher")
    with pytest.raises(ConfigError, match="corpus_loss='teacher' learns replay by its KL"):
        distill.continue_pretraining(model, tok, corpus, corpus, replay=0.5, corpus_loss="teacher", teacher=model)
    assert _files(test_cache) == before and all(p.requires_grad for p in model.parameters())
    assert distill.DISTILL_DEFAULTS["zoo"]["corpus_loss"] == "text"


@pytest.mark.parametrize("corpus_loss", ["answer", "teacher"])
def test_answer_and_teacher_losses_transfer(tiny_fit, corpus, tiny_llama, corpus_loss):
    run = distill.distill(tiny_llama, tiny_fit, corpus, replay=0.5, steps=60, batch_size=16, lr=2e-3, seed=3,
                          replay_loss="kl", corpus_loss=corpus_loss)
    assert run.train["corpus_loss"] == corpus_loss and run.metrics["transfer_rate"] > 0.5, run.metrics
    # the answer loss scores fewer positions than the whole line: its first loss is not the text loss's
    text = distill.distill(tiny_llama, tiny_fit, corpus, replay=0.5, steps=1, batch_size=16, lr=2e-3, seed=3,
                           replay_loss="kl")
    assert run.train["loss"][0] != text.train["loss"][0]


def test_discover_is_the_notebook_s_semantic_corpus(tiny_fit, corpus, tiny_llama):
    found = distill.discover(tiny_fit, tiny_llama.world, min_confidence=0.5)  # the world's queries without trigger
    assert found.corpus and set(found.corpus) <= set(corpus) and len(found.facts) > 0
    assert found.corpus == distill.semantic_corpus(found.table, tiny_llama.world, min_confidence=0.5)
    with pytest.raises(ConfigError, match="a zoo task: pass its base's world"):
        distill.discover(tiny_fit, None)
