"""Tests of the cross-family study: shared module types, bad input, agreement, portability (the patterns and
their nulls: test_patterns.py, test_nulls.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from conftest import EXAMPLE_TASK
from lora_lens.errors import ConfigError, NotFoundError
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


@pytest.mark.parametrize("kwargs, needles", [
    ({"families": ["llama"], "base_models": ["smollm2-135m"]}, ["both given", "not both"]),
    ({"families": None, "base_models": ["smollm2-135m"], "task": "fact_edit"}, ["zoo task kind", "smollm2-135m"]),
    ({"families": None, "base_models": ["llama"], "task": str(EXAMPLE_TASK)}, ["['llama']", "cannot read"]),
    ({"families": None, "base_models": "smollm2-135m", "task": str(EXAMPLE_TASK)}, ["one string", "list"]),
    ({"families": None, "base_models": ["a/b/c", "x/c"], "task": str(EXAMPLE_TASK)}, ["same name 'c'", "once"]),
])
def test_run_study_on_base_models_rejects_bad_input_before_anything_is_written(kwargs, needles, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError) as err:
        compare.run_study(seeds=2, size="tiny", cache=cache, **kwargs)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert not cache.exists()


def test_check_bases_reuses_the_notebook_checks(tmp_path):
    task = str(EXAMPLE_TASK)
    assert compare.check_bases(compare.DEFAULT_FAMILIES, [], "") is False
    assert compare.check_bases(["llama", "gpt2"], [], "") is False
    assert compare.check_bases(compare.DEFAULT_FAMILIES, ["smollm2-135m"], task) is True
    with pytest.raises(ConfigError, match=r"families=\['llama'\] are both given: set families back"):
        compare.check_bases(["llama"], ["smollm2-135m"], task)
    with pytest.raises(ConfigError, match="needs a task_file"):
        compare.check_bases(compare.DEFAULT_FAMILIES, ["smollm2-135m"], "")
    with pytest.raises(ConfigError, match="task_file=.* needs base_models"):
        compare.check_bases(compare.DEFAULT_FAMILIES, [], task)
    with pytest.raises(ConfigError, match="'gpt2' in base_models is a zoo family"):
        compare.check_bases(compare.DEFAULT_FAMILIES, ["gpt2"], task)
    with pytest.raises(NotFoundError, match="base_model=.*does not exist"):
        compare.check_bases(compare.DEFAULT_FAMILIES, [str(tmp_path / "nowhere")], task)
    with pytest.raises(NotFoundError, match="task_file='nope.jsonl' does not exist"):
        compare.check_bases(compare.DEFAULT_FAMILIES, ["smollm2-135m"], "nope.jsonl")
    with pytest.raises(ConfigError, match="repeats"):
        compare.check_bases(["llama", "llama"], [], "")


def test_portable_pairs_groups_real_bases_by_shape():
    study = SimpleNamespace(families=["a", "b", "c", "d", "llama"], shapes={"a": "s1", "b": "s2", "c": "s1",
                                                                            "d": "s2", "llama": "s1"},
                            bases={"a": "/m/a", "b": "/m/b", "c": "/m/c", "d": "/m/d", "llama": "llama"})
    assert compare.portable_pairs(study) == {"a": ["c"], "b": ["d"]}
    study.shapes = {"a": "s1", "b": "s2", "c": "s3", "d": "s4", "llama": "s1"}
    assert compare.portable_pairs(study) == {}


def test_portability_of_a_real_base_needs_targets():
    with pytest.raises(ConfigError, match="give targets"):
        compare.portability("smollm2-135m", task=str(EXAMPLE_TASK))


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


def portability_table(family: str, rows, specificity: float, original: float = 1.0) -> pd.DataFrame:
    """A portability table as :func:`compare.portability` returns it, from ``(target, how, efficacy, drift)`` rows."""
    return pd.DataFrame([{"family": family, "target": t, "how": h, "efficacy": e, "specificity": specificity,
                          "efficacy_ratio": e / original, "drift": d} for t, h, e, d in rows])


def test_portability_summary_reads_the_table():
    rows = [("same base", "original", 1.0, float("nan")), ("other seed", "ported", 0.1, float("nan")),
            ("other seed", "retrained", 0.9, float("nan")), ("continued", "ported", 0.8, 0.05),
            ("continued", "retrained", 1.0, 0.05)]
    table = portability_table("llama", rows, specificity=0.9)
    s = compare.portability_summary(table)["llama"]
    assert s["original_efficacy"] == 1.0 and s["continued_drift"] == 0.05
    assert s["other_seed"] == {"ported_efficacy": 0.1, "efficacy_ratio": 0.1, "ported_specificity": 0.9,
                               "retrained_efficacy": 0.9}
    assert s["continued"]["ported_efficacy"] == 0.8
    # real bases: one target per other checkpoint of the same shapes, no continued base (no drift)
    nan = float("nan")
    real = portability_table("m-a", [("same base", "original", 0.8, nan), ("m-b", "ported", 0.2, nan),
                                     ("m-b", "retrained", 0.9, nan)], specificity=0.95, original=0.8)
    s = compare.portability_summary(real)["m-a"]
    assert set(s) == {"original_efficacy", "m-b"} and s["m-b"]["ported_efficacy"] == 0.2


def test_portability_prose_is_rendered_from_the_table():
    rows = [("same base", "original", 1.0, float("nan")), ("other seed", "ported", 0.0, float("nan")),
            ("other seed", "retrained", 1.0, float("nan")), ("continued", "ported", 0.9, 0.23),
            ("continued", "retrained", 1.0, 0.23)]
    table = portability_table("gpt_neox", rows, specificity=0.95)
    text = compare.portability_prose(table, continue_steps=100)
    assert "**gpt_neox**: the adapter reaches efficacy 1.00 on its own base." in text
    assert ("On a base of the same family pretrained from another seed the unchanged adapter reaches 0.00 (0.00 of "
            "it; specificity 0.95), against 1.00 for an adapter trained anew there") in text
    assert "pretrained 100 steps further (weights moved by 23%) the unchanged adapter reaches 0.90 (0.90 of" in text
    assert "it survives a base that drifts a little, not a base that learned the same facts" in text
    table.loc[table["target"] == "continued", ["efficacy", "efficacy_ratio"]] = 0.1
    assert "less than half of its effect on every other base" in compare.portability_prose(table, 100)
    assert compare.portability_prose(None, skipped="no two bases share a shape") == (
        "**Portability was not measured in this run**: no two bases share a shape.")


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
