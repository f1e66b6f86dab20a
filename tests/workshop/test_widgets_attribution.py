"""Headless tests of the attribution widgets: set a control's value, read ``.state``."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import randomize_lora
from lora_lens.lab.zoo import load_model
from lora_lens.lens import attribution as at
from lora_lens.workshop import widgets


@pytest.fixture(scope="module")
def dense(tiny_llama):
    """A tiny llama with random non-zero LoRA factors in every linear module (r = 2)."""
    torch.manual_seed(0)
    model, tok = load_model(tiny_llama.path)
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", lora_dropout=0.0))
    return randomize_lora(pm), tok


def test_attribution_picker_shows_the_picked_probe(dense, tiny_world):
    pm, tok = dense
    e = tiny_world.entities
    prompts = [tiny_world.query(e[0], "colour"), tiny_world.query(e[1], "city")]
    targets = [tiny_world.facts["colour"][e[0]], tiny_world.facts["city"][e[1]]]
    attrs = at.batch_token_attributions(pm, tok, prompts, targets, n_steps=4)
    box = widgets.attribution_picker(attrs)
    assert box.state["index"] == 0 and box.state["frame"]["token"].tolist() == attrs[0].tokens
    box.children[0].value = 1
    assert box.state["index"] == 1 and box.state["top"] == attrs[1].top()
    pd.testing.assert_frame_equal(box.state["frame"], attrs[1].frame())


def test_ablation_slider_switches_off_top_components(dense, tiny_world):
    pm, tok = dense
    comps = at.lora_components(pm, grain="layer")
    ranking = pd.DataFrame({"efficacy": [0.1 * i for i in range(len(comps))]}, index=comps.names)
    entity = tiny_world.entities[0]
    prompt, words = tiny_world.query(entity, "colour"), [tiny_world.facts["colour"][entity]]
    box = widgets.ablation_slider(pm, tok, comps, ranking, "efficacy", prompt, words)
    adapted = box.state["probs"][words[0]]
    assert box.state["k"] == 0 and box.state["off"] == []
    slider = box.children[1]
    slider.value = 1
    assert box.state["off"] == [comps.names[-1]]  # the largest attribution goes first
    slider.value = len(comps)
    with pm.disable_adapter():  # everything off = the base model
        base = widgets.ablation_view(pm, tok, comps, [], 0, prompt, words)["probs"][words[0]]
    assert box.state["probs"][words[0]] == pytest.approx(base, abs=1e-5)
    assert abs(base - adapted) > 1e-4, "the random adapter should change the probability"
    # the callback restored the model: nothing switched off again gives the adapted probability
    assert widgets.ablation_view(pm, tok, comps, [], 0, prompt, words)["probs"][words[0]] == pytest.approx(adapted)
