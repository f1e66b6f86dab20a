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


# ------------------------------------------------------------------------------------------ several processes

STUDY_TINY = dict(families=["llama"], seeds=2, size="tiny", rank=4, steps=30, n_probes=4, ig_steps=4, top_tokens=5,
                  null_samples=4)


def _numbers(study: compare.Study) -> pd.DataFrame:
    """The runs table without what differs between two caches and two clocks (folders, seconds)."""
    return study.runs.drop(columns=["adapter_dir", "train_seconds"])


def test_a_study_over_two_workers_gives_the_numbers_of_one(tiny_llama, tiny_world, tmp_path, monkeypatch):
    """Two caches holding the same tiny base, so that both studies train their adapters (none from the cache); one
    thread everywhere, so that the float rounding is the same in this process and in the workers (~30 s)."""
    import shutil

    import torch

    for name in ("one", "two"):
        shutil.copytree(tiny_llama.path, tmp_path / name / "models" / tiny_llama.path.name)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        two = compare.run_study(world=tiny_world, cache=tmp_path / "two", workers=2, **STUDY_TINY)
        one = compare.run_study(world=tiny_world, cache=tmp_path / "one", **STUDY_TINY)
    finally:
        torch.set_num_threads(threads)
    assert list((tmp_path / "one" / "adapters").iterdir()) and list((tmp_path / "two" / "adapters").iterdir())
    a, b = _numbers(two), _numbers(one)
    assert list(a.columns) == list(b.columns) and a[["family", "seed"]].equals(b[["family", "seed"]])
    numeric = a.select_dtypes("number").columns
    np.testing.assert_allclose(a[numeric].to_numpy(float), b[numeric].to_numpy(float), rtol=1e-5, atol=1e-7)
    assert a.drop(columns=numeric).equals(b.drop(columns=numeric))
    for table in ("energy", "types", "phi"):
        x, y = getattr(two, table), getattr(one, table)
        nums = x.select_dtypes("number").columns
        np.testing.assert_allclose(x[nums].to_numpy(float), y[nums].to_numpy(float), rtol=1e-5, atol=1e-7)
    assert two.tokens == one.tokens


def test_a_study_refuses_bad_workers_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="workers=0"):
        compare.run_study(cache=tmp_path, workers=0, **STUDY_TINY)
    with pytest.raises(ConfigError, match="devices='cuda:0'"):
        compare.run_study(cache=tmp_path, workers=2, devices="cuda:0", **STUDY_TINY)
    assert not (tmp_path / "models").exists()


def test_a_run_sends_back_the_factors_phi_reads_without_the_base_weights(tiny_fit):
    """What a worker returns for φ: the factors and their SVD as arrays (small), φ unchanged."""
    from lora_lens.lens import delta

    mods = delta.lora_modules(tiny_fit.model)
    records = compare._records(mods)
    assert all(set(r) >= {"B", "A", "svd"} and "W" not in r for r in records)
    back = compare._deltas(records)
    assert all(d.W.numel() == 0 for d in back)
    for side in ("left", "right"):
        pd.testing.assert_frame_equal(delta.phi_table(back, back, 1, 1, side=side),
                                      delta.phi_table(mods, mods, 1, 1, side=side))
