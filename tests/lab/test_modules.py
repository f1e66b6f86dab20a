"""Tests of module naming: one classifier for training targets, energy tables and the cross-family shared types."""

from __future__ import annotations

import warnings

import pytest
from peft import LoraConfig, get_peft_model

from lora_lens.errors import ConfigError
from lora_lens.lab.modules import (KINDS, MODULE_TYPES, SHARED_TYPES, layer_index, lora_layers, module_kind,
                                   module_role, module_type, shared_type)
from lora_lens.lab.tokenizer import build_tokenizer
from lora_lens.lab.train import linear_modules, matched_modules, target_modules
from lora_lens.lab.zoo import FAMILIES, build_model
from lora_lens.lens import delta


@pytest.fixture(scope="module")
def tok(tiny_world):
    return build_tokenizer(tiny_world)


def test_module_type_names():
    cases = {"model.layers.3.self_attn.q_proj": "attn_q", "transformer.h.0.attn.c_attn": "attn_qkv",
             "transformer.h.0.attn.c_proj": "attn_o", "transformer.h.11.mlp.c_proj": "mlp_down",
             "transformer.h.0.mlp.c_fc": "mlp_up", "gpt_neox.layers.2.attention.dense": "attn_o",
             "gpt_neox.layers.2.mlp.dense_h_to_4h": "mlp_up", "gpt_neox.layers.2.mlp.dense_4h_to_h": "mlp_down",
             "model.layers.0.mlp.gate_up_proj": "mlp_gate_up", "model.layers.0.self_attn.qkv_proj": "attn_qkv",
             "model.layers.0.block_sparse_moe.experts.3.w2": "mlp_down", "lm_head": "lm_head",
             "model.layers.0.something": "other",
             # T5-style feed-forward, InternLM2 attention output, a mixture-of-experts router
             "encoder.block.0.layer.1.DenseReluDense.wi": "mlp_up",
             "encoder.block.0.layer.1.DenseReluDense.wo": "mlp_down",
             "model.layers.0.attention.wo": "attn_o", "model.layers.0.attention.wqkv": "attn_qkv",
             "model.layers.0.block_sparse_moe.gate": "mlp_other",
             "model.layers.0.self_attn.q_a_proj": "attn_other"}
    assert {n: module_type(n) for n in cases} == cases
    assert set(cases.values()) <= set(MODULE_TYPES)
    assert layer_index("model.layers.0.block_sparse_moe.experts.3.w2") == 0
    assert layer_index("lm_head") is None


def test_kind_shared_type_and_role_follow_the_type():
    for t in MODULE_TYPES:
        assert module_kind(t) in KINDS and shared_type(t) in SHARED_TYPES
        assert module_kind(t) == (t.split("_")[0] if t.startswith(("attn_", "mlp_")) else "other")
        if shared_type(t) != "other":
            assert shared_type(t).split("_")[0] == module_kind(t)
    assert module_kind("encoder.block.0.layer.1.DenseReluDense.wi") == "mlp"       # "mlp" to train and to delta
    assert shared_type("gpt_neox.layers.0.attention.query_key_value") == "attn_in"
    assert shared_type("transformer.h.0.mlp.c_proj") == "mlp_out"
    assert module_role("attn_o") == "write" and module_role("mlp_up") == "read" and module_role("embed") is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_targets_and_energy_tables_agree(family, tok):
    """The modules ``targets="attn"``/``"mlp"`` train are the ones the energy tables call attention / MLP."""
    model = build_model(family, "tiny", tok, seed=0)
    layers = linear_modules(model)
    assert {info["kind"] for info in layers.values()} <= {"attn", "mlp"}
    for name, info in layers.items():
        assert info["kind"] == module_kind(name) == module_kind(module_type(name))
        assert shared_type(name) != "other"
    attn, mlp = matched_modules(model, "attn"), matched_modules(model, "mlp")
    assert attn and mlp and not set(attn) & set(mlp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                 # peft's Conv1D fan_in_fan_out notice
        pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=target_modules(model, "all")))
    summ = delta.summary(pm, intruders=False)
    kinds = dict(zip(summ["module"], summ["module_type"].map(module_kind)))
    assert sorted(n for n, k in kinds.items() if k == "attn") == sorted(attn)
    assert sorted(n for n, k in kinds.items() if k == "mlp") == sorted(mlp)
    assert set(delta.energy_by(summ, "module_type")["module_type"]) <= set(MODULE_TYPES) - {"other"}


def test_lora_layers(tok):
    model = build_model("llama", "tiny", tok, seed=0)
    with pytest.raises(ConfigError, match="no LoRA layers"):
        lora_layers(model)
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "down_proj"]))
    layers = lora_layers(pm)
    assert list(layers) == [n for n, _ in pm.get_base_model().named_modules() if n in layers]
    assert {module_type(n) for n in layers} == {"attn_q", "mlp_down"}
    assert lora_layers(pm, "default").keys() == layers.keys() == lora_layers(pm.base_model).keys()
    with pytest.raises(ConfigError, match="available adapters: \\['default'\\]"):
        lora_layers(pm, "other")
