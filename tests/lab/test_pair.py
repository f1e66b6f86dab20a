"""Tests of the base-vs-adapted helpers on one PeftModel."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import assert_same_float
from lora_lens.errors import ConfigError
from lora_lens.lab.pair import (adapter_states, check_base, check_peft, encode, frozen, inference, kl_divergence,
                                last_logits, logits_at, logits_where, model_device, pad_ids, pad_token_id)
from lora_lens.lab.tokenizer import build_tokenizer
from lora_lens.lab.zoo import build_model


@pytest.fixture(scope="module")
def tok(tiny_world):
    tok = build_tokenizer(tiny_world)
    return tok


@pytest.fixture()
def pm(tok):
    model = build_model("llama", "tiny", tok, seed=0)
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    for layer in (m for n, m in pm.named_modules() if n.endswith("q_proj")):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    return pm


def test_checks(pm, tok):
    plain = build_model("llama", "tiny", tok, seed=0)
    with pytest.raises(ConfigError, match="needs a peft.PeftModel"):
        check_peft(plain, tok)
    with pytest.raises(ConfigError, match="base='adapter' needs a peft.PeftModel"):
        check_base(plain, tok, "adapter")
    with pytest.raises(ConfigError, match="same object"):
        check_base(pm, tok, pm)
    check_peft(pm, tok)
    check_base(pm, tok, "adapter")
    pm.merge_adapter()
    with pytest.raises(ConfigError, match="merged"):
        check_peft(pm)


def test_states_inference_and_kl(pm, tok):
    pm.train()
    flags = [p.requires_grad for p in pm.parameters()]
    enc = encode(tok, ["Tovan lives in", "a"], model_device(pm))
    out = {}
    with inference(pm):
        assert not pm.training and not torch.is_grad_enabled()
        for name, ctx in adapter_states(pm):
            with ctx:
                out[name] = torch.log_softmax(last_logits(pm, enc).float(), -1)
    assert pm.training and [p.requires_grad for p in pm.parameters()] == flags
    assert not torch.equal(out["adapted"], out["base"])
    kl = kl_divergence(out["base"], out["adapted"])
    assert kl.shape == (2,) and bool((kl > 0).all())
    assert bool((kl_divergence(out["base"], out["base"]) == 0).all())
    with frozen(pm):
        assert not any(p.requires_grad for p in pm.parameters())
    assert [p.requires_grad for p in pm.parameters()] == flags


def test_padded_logits_match_one_by_one(pm, tok):
    seqs = [tok("Tovan lives in")["input_ids"], tok("a")["input_ids"]]
    ids, mask, last = pad_ids(seqs, pad_token_id(tok), model_device(pm))
    assert ids.shape == (2, len(seqs[0])) and last.tolist() == [len(seqs[0]) - 1, len(seqs[1]) - 1]
    with inference(pm):
        batched = logits_at(pm, last, input_ids=ids, attention_mask=mask)
        for i, s in enumerate(seqs):
            one = pm(input_ids=torch.tensor([s])).logits[0, -1]
            assert_same_float(batched[i], one)


class _Opaque(torch.nn.Module):
    """A causal LM that hides its output layer (no ``get_output_embeddings``): every position is projected."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **inputs):
        return self.inner(**inputs)


def test_logits_where_projects_only_the_asked_positions(pm, tok):
    seqs = [tok("Tovan lives in the town of")["input_ids"], tok("a b")["input_ids"]]
    ids, mask, _ = pad_ids(seqs, pad_token_id(tok), model_device(pm))
    rows, pos = [0, 0, 1, 0], [1, 4, 2, 1]             # any order, a position twice
    head_rows = []
    hook = pm.get_base_model().get_output_embeddings().register_forward_hook(
        lambda m, a, o: head_rows.append(a[0].shape[:-1].numel()))
    with inference(pm):
        try:
            picked, out = logits_where(pm, rows, pos, input_ids=ids, attention_mask=mask)
        finally:
            hook.remove()
        full = pm(input_ids=ids, attention_mask=mask).logits
        opaque, _ = logits_where(_Opaque(pm), rows, pos, input_ids=ids, attention_mask=mask)
    assert head_rows == [len(rows)] and picked.shape == (len(rows), full.shape[-1])
    assert_same_float(picked, full[rows, pos])
    assert_same_float(opaque, full[rows, pos])
