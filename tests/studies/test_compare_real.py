"""The cross-family study on real architectures: small randomly initialised Qwen2 and Mistral models with SmolLM2's
tokenizer (conftest's ``random_real_bases``), the example task from data (marked `real`)."""

from __future__ import annotations

import math

import pytest

from conftest import EXAMPLE_TASK
from lora_lens.errors import ConfigError
from lora_lens.lab.modules import SHARED_TYPES
from lora_lens.studies import compare

FAST = {"steps": 8, "lr": 1e-2}
"""A short schedule: the random bases learn little, the test is about what is measured and how it is compared."""


@pytest.fixture(scope="module")
def real_study(random_real_bases, test_cache):
    bases = [str(random_real_bases[n]) for n in ("qwen2-a", "qwen2-b", "mistral-c")]
    return compare.run_study(base_models=bases, seeds=2, task=str(EXAMPLE_TASK), n_probes=4, ig_steps=4,
                             top_tokens=5, null_samples=4, shuffled=True, cache=test_cache, **FAST)


@pytest.mark.real
@pytest.mark.slow
def test_run_study_on_real_bases(real_study):
    s = real_study
    assert s.families == ["qwen2-a", "qwen2-b", "mistral-c"] and s.size is None
    assert s.architectures == {"qwen2-a": "qwen2", "qwen2-b": "qwen2", "mistral-c": "mistral"}
    assert s.shapes["qwen2-a"] == s.shapes["qwen2-b"] != s.shapes["mistral-c"]
    assert len(set(s.tokenizers.values())) == 1  # one tokenizer: attributions compare token by token
    runs = s.runs
    assert len(runs) == 6 and set(runs["n_layers"]) == {2}
    # every module of both architectures maps onto the four shared types (the one classifier of lab/modules)
    assert set(s.types["shared_type"]) == set(SHARED_TYPES) - {"other"}
    for col in ("upper_share", "mlp_share", "eff_rank_ratio", "null_mlp_share", "mp_eff_rank_ratio", "phi_seeds",
                "null_phi_seeds", "shuffled_mlp_share", "token_agreement", "vocab_overlap", "efficacy"):
        assert runs[col].notna().all(), col
    assert ((runs["mlp_share"] >= 0) & (runs["mlp_share"] <= 1)).all()
    # the shared probes are the task's first n_probes efficacy probes, one multi-token attribution each
    assert len(s.probes) == 4 and all(len(a) == 4 for a in s.attributions.values())
    m = compare.pair_matrix(s, "attribution")
    assert m.notna().all().all() and list(m.index) == s.families
    table = compare.pattern_table(s, n_boot=200)
    assert {"xf-upper-half", "xf-mlp-over-attention", "xf-effective-rank-low", "xf-seeds-share-direction",
            "xf-same-input-tokens"} <= set(table["pattern"])
    assert set(table["family"]) == set(s.families) | {"all"}
    # the example task's probes name their entities: the ranking is scored wherever an adapter changed an answer,
    # and where none did (random bases, eight steps) the study says so instead of a number
    assert runs["entity_top1"].isna().all() == ("entity_top1" in s.skipped)
    if "entity_top1" in s.skipped:
        assert "no probe's answer was changed" in s.skipped["entity_top1"]


@pytest.mark.real
@pytest.mark.slow
def test_portability_between_real_bases_of_one_shape(real_study, test_cache):
    s = real_study
    assert compare.portable_pairs(s) == {"qwen2-a": ["qwen2-b"]}
    port = compare.portability(s.bases["qwen2-a"], s.task, s.spec, seed=0, targets=[s.bases["qwen2-b"]],
                               cache=test_cache)
    assert list(zip(port["target"], port["how"])) == [("same base", "original"), ("qwen2-b", "ported"),
                                                      ("qwen2-b", "retrained")]
    assert set(port["family"]) == {"qwen2-a"} and port["drift"].isna().all()
    summary = compare.portability_summary(port)["qwen2-a"]
    assert set(summary) == {"original_efficacy", "qwen2-b"}
    text = compare.portability_prose(port)
    assert "`qwen2-b` (same architecture and config shape)" in text
    assert f"{summary['qwen2-b']['retrained_efficacy']:.2f} for an adapter trained anew there" in text
    with pytest.raises(ConfigError, match="other parameter names or shapes"):
        compare.portability(s.bases["qwen2-a"], s.task, s.spec, seed=0, targets=[s.bases["mistral-c"]],
                            cache=test_cache)


@pytest.mark.real
@pytest.mark.slow
def test_bases_of_other_tokens_are_not_compared_token_by_token(real_study):
    """Two bases that read the probes as different tokens leave their attribution cell empty."""
    s = real_study
    other = compare.Study(**{**s.__dict__, "tokenizers": {**s.tokenizers, "mistral-c": "other tokens"}})
    m = compare.pair_matrix(other, "attribution")
    assert math.isnan(m.loc["qwen2-a", "mistral-c"]) and math.isnan(m.loc["mistral-c", "qwen2-b"])
    assert not math.isnan(m.loc["qwen2-a", "qwen2-b"]) and not math.isnan(m.loc["mistral-c", "mistral-c"])
