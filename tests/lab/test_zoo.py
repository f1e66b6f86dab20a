"""Tokenizer and zoo: every family builds and learns, the cache is safe, any local HF model loads offline."""

import time

import pytest
import torch
from transformers import AutoTokenizer

from lora_lens import ConfigError, MismatchError, NotFoundError
from lora_lens.lab.tokenizer import build_tokenizer, check_tokenizer, token_id
from lora_lens.lab.zoo import FAMILIES, SIZES, build_model, get_pretrained, load_model, pretrain, resolve_size


@pytest.fixture(scope="module")
def tok(tiny_world):
    return build_tokenizer(tiny_world)


def test_tokenizer_round_trip_and_single_token_words(tiny_world, tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    line = tiny_world.corpus()[0]
    assert again(line)["input_ids"] == tok(line)["input_ids"]
    assert again.decode(again(line)["input_ids"], skip_special_tokens=True) == line
    assert (again.bos_token, again.eos_token, again.pad_token, again.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert tok(line)["input_ids"][0] == tok.bos_token_id
    for word in tiny_world.entities + tiny_world.values["city"]:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1
    assert tok.convert_ids_to_tokens([token_id(tok, tiny_world.entities[0])]) == ["▁" + tiny_world.entities[0]]


def test_tokenizer_bad_input(tiny_world, tok):
    with pytest.raises(ConfigError, match=r"answer 'lives in' tokenizes to 2 tokens"):
        token_id(tok, "lives in")
    with pytest.raises(ConfigError, match="tokenizes to 0 tokens"):
        token_id(tok, "")
    with pytest.raises(ConfigError, match="vocab_size=60 is too small"):
        build_tokenizer(tiny_world, vocab_size=60)
    model = build_model("llama", "tiny", tok)
    model.resize_token_embeddings(len(tok) - 5)
    with pytest.raises(MismatchError, match=r"tokenizer has \d+ tokens but the model's embedding has"):
        check_tokenizer(model, tok)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_builds_and_learns(family, tiny_world, tok):
    model = build_model(family, "tiny", tok, seed=0)
    assert model.config.vocab_size == len(tok)
    out = pretrain(model, tok, tiny_world, steps=60, batch_size=32, lr=1e-2, eval_every=30)
    loss = out["curves"]["loss"]
    assert loss[-1] < 0.6 * loss[0], f"{family} did not learn: {loss[0]:.2f} → {loss[-1]:.2f}"
    assert out["metrics"]["params"] > 0 and 0 <= out["metrics"]["fact_accuracy"] <= 1


def test_same_seed_same_weights(tiny_world, tok):
    def run():
        m = build_model("gpt_neox", "tiny", tok, seed=5)
        pretrain(m, tok, tiny_world, steps=15, batch_size=16, seed=5, eval_every=15)
        return m.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kwargs, match", [
    ({"family": "bert"}, r"family='bert' is unknown"),
    ({"size": "huge"}, r"size='huge' is unknown"),
    ({"hidden": 30}, r"hidden=30 is not divisible by heads=4"),
    ({"kv_heads": 3}, r"heads=4 is not divisible by kv_heads=3"),
    ({"layers": 0}, r"layers=0 must be ≥ 1"),
])
def test_bad_model_config(kwargs, match, tok):
    args = {"family": "llama", "size": "tiny", **kwargs}
    with pytest.raises(ConfigError, match=match):
        build_model(args.pop("family"), args.pop("size"), tok, **args)


def test_unknown_family_fails_before_any_cache_write(tmp_path):
    with pytest.raises(ConfigError, match="family='t5'"):
        get_pretrained("t5", "tiny", cache=tmp_path)
    assert not any(tmp_path.iterdir())


def test_cache_hit_reuses_and_corruption_rebuilds(tiny_world, tmp_path, monkeypatch):
    first = get_pretrained("gpt_neox", "tiny", world=tiny_world, steps=20, cache=tmp_path)
    assert (first.path / "config.json").is_file() and (first.path / "world.jsonl").is_file()
    t0 = time.perf_counter()
    again = get_pretrained("gpt_neox", "tiny", world=tiny_world, steps=20, cache=tmp_path)
    assert again.path == first.path and time.perf_counter() - t0 < 5
    assert again.manifest == first.manifest
    other = get_pretrained("gpt_neox", "tiny", world=tiny_world, steps=21, cache=tmp_path)
    assert other.path != first.path  # the key covers the pretraining budget
    desc, builder = FAMILIES["gpt_neox"]
    monkeypatch.setitem(FAMILIES, "gpt_neox", (desc, lambda s: lambda ids: builder(s)(ids).__class__(
        **{**builder(s)(ids).to_dict(), "use_parallel_residual": False})))
    changed = get_pretrained("gpt_neox", "tiny", world=tiny_world, steps=20, cache=tmp_path)
    assert changed.path != first.path and not changed.model.config.use_parallel_residual  # and the architecture
    monkeypatch.undo()
    weights = first.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
    with pytest.warns(UserWarning, match="corrupt.*model.safetensors does not match its sha256"):
        rebuilt = get_pretrained("gpt_neox", "tiny", world=tiny_world, steps=20, cache=tmp_path)
    assert rebuilt.metrics["fact_accuracy"] == first.metrics["fact_accuracy"]
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_load_model_from_local_dir_offline(tiny_llama, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_llama.model.save_pretrained(tmp_path / "m")
    tiny_llama.tokenizer.save_pretrained(tmp_path / "m")
    model, tok = load_model(tmp_path / "m")
    assert model.dtype == torch.float32 and not model.training
    ids = tok(["Hello"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, tiny_llama.model(ids).logits)


def test_load_model_missing_name_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(NotFoundError, match=r"'Qwen/Qwen2-0.5B' is not available: HF_HUB_OFFLINE=1.*local directory"):
        load_model("Qwen/Qwen2-0.5B")
    assert time.perf_counter() - t0 < 20
    with pytest.raises(NotFoundError, match="does not exist"):
        load_model("./no/such/model")


def test_size_presets_are_valid():
    for name in SIZES:
        resolve_size(name)
    assert SIZES["tiny"].hidden < SIZES["small"].hidden < SIZES["base"].hidden
