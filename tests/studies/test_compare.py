"""Tests of the cross-family study: shared module types, bad input, agreement, portability (the patterns and
their nulls: test_patterns.py, test_nulls.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from lora_lens.errors import ConfigError
from lora_lens.lab.tokenizer import build_tokenizer
from lora_lens.lab.train import matched_modules
from lora_lens.lab.zoo import FAMILIES, build_model, load_model
from lora_lens.studies import compare
from lora_lens.utils import write_json


# ------------------------------------------------------------------------------------------ shared module types
@pytest.mark.parametrize("name, expected", [
    ("model.layers.0.self_attn.q_proj", "attn_in"),
    ("model.layers.0.self_attn.qkv_proj", "attn_in"),
    ("transformer.h.0.attn.c_attn", "attn_in"),
    ("gpt_neox.layers.0.attention.query_key_value", "attn_in"),
    ("model.layers.0.self_attn.o_proj", "attn_out"),
    ("transformer.h.0.attn.c_proj", "attn_out"),
    ("gpt_neox.layers.0.attention.dense", "attn_out"),
    ("model.layers.0.mlp.gate_proj", "mlp_in"),
    ("model.layers.0.mlp.gate_up_proj", "mlp_in"),
    ("transformer.h.0.mlp.c_fc", "mlp_in"),
    ("gpt_neox.layers.0.mlp.dense_h_to_4h", "mlp_in"),
    ("model.layers.0.mlp.down_proj", "mlp_out"),
    ("transformer.h.0.mlp.c_proj", "mlp_out"),
    ("gpt_neox.layers.0.mlp.dense_4h_to_h", "mlp_out"),
    ("lm_head", "other"),
    ("mlp_down", "mlp_out"),          # a normalised type maps too
])
def test_shared_type_maps_family_specific_names(name, expected):
    assert compare.shared_type(name) == expected


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_maps_onto_all_four_shared_types(family, tiny_world):
    model = build_model(family, "tiny", build_tokenizer(tiny_world))
    types = {compare.shared_type(n) for n in matched_modules(model, "all")}
    assert types == {"attn_in", "attn_out", "mlp_in", "mlp_out"}, family


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, needles", [
    ({"families": ["llama", "bert"]}, ["'bert'", "llama"]),
    ({"families": []}, ["families=[]", "llama"]),
    ({"families": "llama"}, ["'llama'", "list"]),
    ({"families": ["llama", "llama"]}, ["repeats", "once"]),
    ({"seeds": 1}, ["seeds=1", "at least 2"]),
    ({"seeds": [0, 0]}, ["seeds=[0, 0]", "distinct"]),
    ({"seeds": 2.5}, ["seeds=2.5", "integer"]),
    ({"size": "huge"}, ["size='huge'", "tiny"]),
    ({"n_probes": 0}, ["n_probes=0", "positive"]),
    ({"null_samples": 0}, ["null_samples=0", "positive"]),
    ({"shuffled": "yes"}, ["shuffled='yes'", "True or False"]),
])
def test_run_study_rejects_bad_input_before_anything_is_written(kwargs, needles, tmp_path):
    args = {"families": ["llama", "gpt2"], "seeds": 2, "size": "tiny", **kwargs}
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError) as err:
        compare.run_study(cache=cache, **args)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert not cache.exists()


def test_portability_rejects_the_base_seed_before_anything_is_written():
    pre = SimpleNamespace(manifest={"spec": {"seed": 0}})
    with pytest.raises(ConfigError, match="other_seed=0 is the base's own"):
        compare.portability(pre, task=None, other_seed=0)
    with pytest.raises(ConfigError, match="continue_steps=0"):
        compare.portability(pre, task=None, continue_steps=0)


def test_attribution_agreement():
    a = [np.array([0.1, 0.5, 2.0]), np.array([1.0, 0.0, -1.0, 3.0])]
    assert compare.attribution_agreement(a, a) == pytest.approx(1.0)
    assert compare.attribution_agreement(a, [-x for x in a]) == pytest.approx(-1.0)
    with pytest.raises(ConfigError, match="different probes"):
        compare.attribution_agreement(a, a[:1])


def test_portability_summary_reads_the_table():
    rows = [("same base", "original", 1.0, float("nan")), ("other seed", "ported", 0.1, float("nan")),
            ("other seed", "retrained", 0.9, float("nan")), ("continued", "ported", 0.8, 0.05),
            ("continued", "retrained", 1.0, 0.05)]
    table = pd.DataFrame([{"family": "llama", "target": t, "how": h, "efficacy": e, "specificity": 0.9,
                           "efficacy_ratio": e / 1.0, "drift": d} for t, h, e, d in rows])
    s = compare.portability_summary(table)["llama"]
    assert s["original_efficacy"] == 1.0 and s["continued_drift"] == 0.05
    assert s["other_seed"] == {"ported_efficacy": 0.1, "efficacy_ratio": 0.1, "ported_specificity": 0.9,
                               "retrained_efficacy": 0.9}
    assert s["continued"]["ported_efficacy"] == 0.8


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_a_zoo_entry_loads_with_the_world_tokenizer(family, tiny_world, tmp_path):
    """AutoTokenizer would pick Qwen2Tokenizer for a qwen2 entry, which splits world words: compare needs the same
    tokens in every family."""
    tok = build_tokenizer(tiny_world)
    build_model(family, "tiny", tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    write_json(tmp_path / "lora_lens.json", {"family": family})
    _, loaded = load_model(tmp_path)
    words = " ".join(sorted(tiny_world.values["profession"]))
    assert loaded(words)["input_ids"] == tok(words)["input_ids"]
