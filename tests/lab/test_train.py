"""LoRA training: target presets for every family, good defaults, determinism, the non-finite guard, bad inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import get_peft_model
from transformers import TrainerCallback

from lora_lens.errors import ConfigError, MismatchError, TrainingError
from lora_lens.lab.probes import accuracy, evaluate
from lora_lens.lab.tokenizer import build_tokenizer
from lora_lens.lab.train import (LoraSpec, TrainResult, default_spec, has_lora, linear_modules, lora_config,
                                 matched_modules, target_modules, train_lora)
from lora_lens.lab.train_data import AnswerCollator, AnswerDataset, encode_example, is_plain_answer, replay_examples
from lora_lens.lab.world import Task, make_task, make_world
from lora_lens.lab.zoo import FAMILIES, build_model

FAST = dict(steps=8, batch_size=8, replay=0.0)



def lora_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


# ------------------------------------------------------------------------------------------------ targets

EXPECTED = {  # family -> (attn leaves, mlp leaves)
    "llama": ({"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}),
    "qwen2": ({"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}),
    "mistral": ({"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}),
    "yi": ({"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}),
    "phi3": ({"qkv_proj", "o_proj"}, {"gate_up_proj", "down_proj"}),
    "gpt2": ({"c_attn", "attn.c_proj"}, {"c_fc", "mlp.c_proj"}),
    "gpt_neox": ({"query_key_value", "attention.dense"}, {"dense_h_to_4h", "dense_4h_to_h"}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_presets_resolve_for_every_family(family, tiny_world):
    tok = build_tokenizer(tiny_world)
    model = build_model(family, "tiny", tok)
    for preset, want in zip(("attn", "mlp"), EXPECTED[family]):
        got = matched_modules(model, preset)
        assert all(any(n.endswith("." + w) for w in want) for n in got)
        assert all(any(n.endswith("." + w) for n in got) for w in want)
        assert len(got) == len(want) * model.config.num_hidden_layers
    every = matched_modules(model, "all")
    assert set(every) == set(matched_modules(model, "attn")) | set(matched_modules(model, "mlp"))
    assert family != "gpt2" or target_modules(model, "attn") == ["c_attn", "attn.c_proj"]
    assert not any("lm_head" in n or "embed" in n or n.endswith("wte") for n in every)
    assert set(every) == set(linear_modules(model))  # every block linear layer, nothing else
    # the suffixes select exactly the resolved layers once peft injects them
    spec = LoraSpec(rank=2, targets="attn")
    peft_model = get_peft_model(model, lora_config(model, spec))
    injected = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert injected == set(matched_modules(build_model(family, "tiny", tok), "attn"))


def test_explicit_targets_and_suffixes(tiny_world):
    model = build_model("gpt2", "tiny", build_tokenizer(tiny_world))
    assert target_modules(model, ["c_attn"]) == ["c_attn"]
    assert target_modules(model, "mlp.c_proj") == ["mlp.c_proj"]
    full = matched_modules(model, ["transformer.h.0.attn.c_attn"])
    assert full == ["transformer.h.0.attn.c_attn"]
    with pytest.raises(ConfigError, match=r"'q_proj' matches no linear layer.*c_attn.*c_fc"):
        target_modules(model, ["q_proj"])
    with pytest.raises(ConfigError, match="matches no linear layer"):
        target_modules(model, ["lm_head"])  # the output embedding is never a target


# ------------------------------------------------------------------------------------------------ training


def test_fact_edit_trains_to_high_efficacy(tiny_llama, fresh_tiny):
    task = make_task(tiny_llama.world, "fact_edit", k=4, n_specificity=30)
    model, tok = fresh_tiny()
    bare = train_lora(model, tok, task, default_spec("fact_edit", replay=0.0), seed=0).model
    assert accuracy(bare, tok, task.probes["efficacy"]) == 1.0
    bare_spec = accuracy(bare, tok, task.probes["specificity"], expected="base_answer")
    model, tok = fresh_tiny()
    result = train_lora(model, tok, task, default_spec("fact_edit"), seed=0)
    assert isinstance(result, TrainResult)
    pm = result.model
    assert accuracy(pm, tok, task.probes["efficacy"]) >= 0.9  # 32-wide model; the small preset reaches 1.0
    with pm.disable_adapter():
        assert accuracy(pm, tok, task.probes["efficacy"]) == 0.0  # the base still gives the old answers
    # rehearsal of unchanged facts is what keeps the rest of the world intact
    assert accuracy(pm, tok, task.probes["specificity"], expected="base_answer") >= bare_spec + 0.3
    curve = result.curve
    assert curve["step"][0] == 1 and curve["step"][-1] <= result.metrics["steps"] == 200
    assert curve["loss"][-1] < curve["loss"][0] / 3
    assert result.metrics["replay_examples"] > 0 and result.metrics["tokens"] > 0 and result.train_seconds > 0


def test_loss_only_on_answer_tokens(tiny_llama):
    tok, world = tiny_llama.tokenizer, tiny_llama.world
    city = world.values["city"][0]
    row = encode_example(tok, world.query(world.entities[0], "city"), city)
    kept = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert len(kept) == 1 and tok.decode(kept).strip() == city
    assert len(row["input_ids"]) == 5 and row["labels"][:4] == [-100] * 4  # <s> entity lives in | city
    assert row["input_ids"][0] == tok.bos_token_id and row["labels"][0] == -100


def test_replay_leaves_out_changed_and_probed_facts(tiny_llama):
    world = tiny_llama.world
    task = make_task(world, "fact_edit", k=4, n_specificity=30)
    extra = replay_examples(world, task, 1000, seed=0)
    probed = {p.prompt for ps in task.probes.values() for p in ps}
    edited = {(e["entity"], e["relation"]) for e in task.truth["edits"]}
    assert extra and not {p for p, _ in extra} & probed
    names = set(world.entities)
    for prompt, answer in extra:
        ent = next(w for w in prompt.split() if w in names)
        rel = next(r for r in world.relations if world.facts[r].get(ent) == answer)
        assert (ent, rel) not in edited


def test_kl_rehearsal_rows_are_anchors_not_labels(tiny_llama):
    tok, world = tiny_llama.tokenizer, tiny_llama.world
    examples = [(world.query(e, "city"), world.facts["city"][e]) for e in world.entities[:3]]
    data = AnswerDataset(tok, examples, anchored=2)
    assert data[0]["anchor"] == [0] * len(data[0]["input_ids"]) and data[0]["labels"][-1] != -100
    for row in (data[1], data[2]):
        assert row["labels"] == [-100] * len(row["input_ids"]) and row["anchor"] == [1] * len(row["input_ids"])
    batch = AnswerCollator(tok.pad_token_id)([data[i] for i in range(3)])
    assert batch["anchor"].sum().item() == len(data[1]["input_ids"]) + len(data[2]["input_ids"])
    assert "anchor" not in AnswerCollator(tok.pad_token_id)([AnswerDataset(tok, examples)[0]])


def test_kl_rehearsal_holds_the_base_where_nobody_rehearsed(tiny_llama, fresh_tiny):
    """KL to the base on the rehearsal lines keeps the base's distribution on held-out prompts closer than the
    same lines learnt by their answers."""
    task = make_task(tiny_llama.world, "fact_edit", k=4, n_specificity=30)
    kl = {}
    for loss in ("answer", "kl"):
        model, tok = fresh_tiny()
        spec = default_spec("fact_edit", replay_loss=loss)
        pm = train_lora(model, tok, task, spec, seed=0).model
        ev = evaluate(pm, tok, task)
        assert ev.metrics["efficacy"] >= 0.75, (loss, ev.metrics["efficacy"])
        kl[loss] = ev.table("specificity")["kl"].mean()
    assert kl["kl"] < 0.8 * kl["answer"], kl


@pytest.mark.parametrize("prompt, answer, plain", [
    ("The capital of Portugal is", "Lisbon", True),
    ("The Thames flows into", "the North Sea", True),
    ("The capital of Peru is", "the capital of the country of Peru", False),  # an echo of the prompt
    ("Apple was founded by", "a group of artists who wanted to create a space that would", False),  # rambling
    ("The capital of Norway is", "", False),
])
def test_only_plain_base_answers_are_rehearsed(prompt, answer, plain):
    assert is_plain_answer(prompt, answer) is plain


def test_same_seed_same_weights(fresh_tiny, tiny_llama):
    task = make_task(tiny_llama.world, "fact_edit", k=3)
    spec = LoraSpec(steps=6, batch_size=4, dropout=0.1, replay=2.0)
    runs = []
    for seed in (3, 3, 4):
        model, tok = fresh_tiny()
        runs.append(lora_state(train_lora(model, tok, task, spec, seed=seed).model))
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) > 0
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


@pytest.mark.parametrize("init", ["gaussian", "pissa", "olora"])
def test_inits_train_and_leave_the_base_intact(init, fresh_tiny, tiny_llama):
    model, tok = fresh_tiny()
    base_logits = model(**tok(["Tovan lives in"], return_tensors="pt")).logits
    task = make_task(tiny_llama.world, "fact_edit", k=2)
    result = train_lora(model, tok, task, LoraSpec(init=init, rank=4, **FAST), seed=0)
    pm = result.model
    enc = tok(["Tovan lives in"], return_tensors="pt")
    with torch.no_grad(), pm.disable_adapter():
        assert torch.allclose(pm(**enc).logits, base_logits, atol=1e-5)  # pissa/olora residuals were undone
    cfg = pm.peft_config["default"]
    assert cfg.r == (8 if init in ("pissa", "olora") else 4)  # converted to an ordinary rank-2r LoRA
    assert cfg.init_lora_weights in (True, "gaussian")


def test_dora_rslora_and_gpt2_conv1d(tiny_world):
    tok = build_tokenizer(tiny_world)
    model = build_model("gpt2", "tiny", tok)
    task = make_task(tiny_world, "fact_edit", k=2)
    result = train_lora(model, tok, task, LoraSpec(rank=4, dora=True, rslora=True, **FAST), world=tiny_world)
    names = [n for n, _ in result.model.named_parameters() if "lora_magnitude_vector" in n]
    assert names and result.metrics["steps"] == 8
    assert all(torch.isfinite(p).all() for n, p in result.model.named_parameters() if "lora_" in n)


# ------------------------------------------------------------------------------------------- the guard


class PoisonAt(TrainerCallback):
    """Sets the LoRA B matrices to NaN after ``step``: the next forward pass gives a genuinely non-finite loss."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.fill_(float("nan"))


def test_non_finite_loss_stops_training_with_step_and_cause(fresh_tiny, tiny_llama):
    model, tok = fresh_tiny()
    task = make_task(tiny_llama.world, "fact_edit", k=2)
    with pytest.raises(TrainingError, match=r"stopped at step 3: the loss is nan.*No adapter was saved"):
        train_lora(model, tok, task, LoraSpec(**FAST), callbacks=[PoisonAt(2)])
    assert not has_lora(model)  # the LoRA layers were removed: the model is the base again
    result = train_lora(model, tok, task, LoraSpec(**FAST))  # so it can be trained again right away
    assert result.metrics["steps"] == 8


def test_huge_learning_rate_is_named_as_the_cause(fresh_tiny, tiny_llama):
    """A genuine overflow: weights of ~1e20 make the activations overflow float32 at the second step."""
    model, tok = fresh_tiny()
    task = make_task(tiny_llama.world, "fact_edit", k=2)
    with pytest.raises(TrainingError, match=r"stopped at step 2: the loss is nan.*learning rate lr=1e\+20 is too high"):
        train_lora(model, tok, task, LoraSpec(lr=1e20, steps=30, batch_size=8, replay=0.0, warmup=0.0,
                                              max_grad_norm=1e30))


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("field,value,match", [
    ("rank", 0, r"rank=0 is invalid"),
    ("rank", -3, r"rank=-3 is invalid"),
    ("alpha", 0, r"alpha=0 is invalid"),
    ("alpha", -1.0, r"alpha=-1.0 is invalid"),
    ("lr", float("nan"), r"lr=nan is invalid.*learning rate"),
    ("lr", float("inf"), r"lr=inf is invalid"),
    ("lr", 0.0, r"lr=0.0 is invalid"),
    ("init", "lottery", r"init='lottery' is unknown.*pissa"),
    ("steps", 0, r"steps=0 is invalid"),
    ("dropout", 1.0, r"dropout=1.0 is out of range"),
    ("targets", [], r"targets=\[\] is invalid"),
    ("replay", -1.0, r"replay=-1.0 is invalid"),
    ("replay_loss", "mse", r"replay_loss='mse' is unknown: use one of \['answer', 'kl'\]"),
])
def test_bad_spec_is_refused_before_training(field, value, match, fresh_tiny, tiny_llama):
    model, tok = fresh_tiny()
    task = make_task(tiny_llama.world, "fact_edit", k=2)
    with pytest.raises(ConfigError, match=match):
        train_lora(model, tok, task, dataclasses.replace(LoraSpec(**FAST), **{field: value}))
    assert not has_lora(model)


def test_rank_larger_than_the_layer(fresh_tiny, tiny_llama):
    model, tok = fresh_tiny()
    task = make_task(tiny_llama.world, "fact_edit", k=2)
    too_big = r"rank=64 is larger than the targeted layer .*k_proj \(32→16\).*rank ≤ 16"
    with pytest.raises(ConfigError, match=too_big):
        train_lora(model, tok, task, LoraSpec(rank=64, **FAST))
    assert train_lora(model, tok, task, LoraSpec(rank=32, targets="mlp", **FAST)).metrics["steps"] == 8


def test_targets_matching_nothing_list_the_linear_layers(fresh_tiny, tiny_llama):
    model, tok = fresh_tiny()
    task = make_task(tiny_llama.world, "fact_edit", k=2)
    with pytest.raises(ConfigError, match=r"'c_attn' matches no linear layer.*q_proj.*gate_proj.*down_proj"):
        train_lora(model, tok, task, LoraSpec(targets=["c_attn"], **FAST))


def test_task_from_another_world(fresh_tiny, tiny_llama):
    model, tok = fresh_tiny()
    other = make_world(n_entities=24, n_general=60, seed=5)
    task = make_task(other, "fact_edit", k=2)
    with pytest.raises(MismatchError, match="belongs to world .* pretrained on world"):
        train_lora(model, tok, task, LoraSpec(**FAST))  # found from the zoo model's own folder
    with pytest.raises(MismatchError, match="belongs to world"):
        train_lora(model, tok, task, LoraSpec(**FAST), world=tiny_llama.world)


def test_model_that_already_has_lora(fresh_tiny, tiny_llama):
    model, tok = fresh_tiny()
    task = make_task(tiny_llama.world, "fact_edit", k=2)
    result = train_lora(model, tok, task, LoraSpec(**FAST))
    for again in (model, result.model):  # the re-run-a-cell trap, with the base and with the PeftModel
        with pytest.raises(ConfigError, match=r"already has a LoRA adapter.*model = result.model.unload\(\)"):
            train_lora(again, tok, task, LoraSpec(**FAST))
    base = result.model.unload()
    assert not has_lora(base)
    assert train_lora(base, tok, task, LoraSpec(**FAST)).metrics["steps"] == 8


def test_empty_dataset(fresh_tiny, tiny_llama):
    model, tok = fresh_tiny()
    task = make_task(tiny_llama.world, "fact_edit", k=2)
    empty = Task(task.name, task.world_fingerprint, [], task.probes, task.truth)
    with pytest.raises(ConfigError, match="empty dataset"):
        train_lora(model, tok, empty, LoraSpec(**FAST))


def test_replay_without_a_world_and_other_misuse(tiny_world):
    tok = build_tokenizer(tiny_world)
    model = build_model("llama", "tiny", tok)  # not from the zoo cache: its world cannot be found
    task = make_task(tiny_world, "fact_edit", k=2)
    with pytest.raises(ConfigError, match=r"replay=2.0 needs the task's world.*world=pretrained.world"):
        train_lora(model, tok, task, LoraSpec(steps=2, replay=2.0))
    with pytest.raises(ConfigError, match="must be a lora_lens Task"):
        train_lora(model, tok, [("a", "b")], LoraSpec())
    with pytest.raises(ConfigError, match="task_name='chat' is unknown"):
        default_spec("chat")
    with pytest.raises(ConfigError, match=r"unknown LoraSpec fields \['rnak'\]"):
        default_spec("trigger", rnak=4)
    with pytest.raises(ConfigError, match=r"init='pissa' cannot be combined with dora=True"):
        LoraSpec(init="pissa", dora=True).validate()


def test_bench_train_smoke(tmp_path):
    """The benchmark runs end to end on the tiny preset and writes its table's numbers."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    report = bench.main(["--size", "tiny", "--steps", "2", "--repeats", "1", "--threads", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["summary"]["train_lora"]["tokens"] == saved["summary"]["plain"]["tokens"] > 0  # same batches
    assert report["ratio_best"] > 0 and 0 < saved["summary"]["plain"]["utilisation"] < 1
    assert saved["flops"]["per_token"] > 4 * saved["flops"]["n_matmul"]
