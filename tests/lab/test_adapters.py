"""Adapters: plain-PEFT round trip, manifest, and every load-time check before weights are touched."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model

from lora_lens.errors import ConfigError, CorruptError, MismatchError, NotFoundError, TrainingError
from lora_lens.lab.adapters import (CONFIG, MANIFEST, WEIGHTS, base_fingerprint, load_adapter, load_base_and_adapter,
                                    read_manifest, save_adapter)
from lora_lens.lab.train import LoraSpec, has_lora, lora_config, train_lora
from lora_lens.lab.world import make_task
from lora_lens.lab.zoo import build_model, load_model


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    """A short fact-edit run on the tiny llama, saved once: (result, task, adapter_dir)."""
    model, tok = load_model(tiny_llama.path)
    task = make_task(tiny_llama.world, "fact_edit", k=3, n_specificity=30)
    result = train_lora(model, tok, task, LoraSpec(steps=40, batch_size=8, replay=1.0), seed=0)
    path = save_adapter(result, tmp_path_factory.mktemp("adapters") / "fact_edit", task=task)
    return result, task, path


@pytest.fixture
def copy_of(trained, tmp_path):
    """A scratch copy of the saved adapter, to damage."""
    def make(name="copy"):
        dst = tmp_path / name
        shutil.copytree(trained[2], dst)
        return dst
    return make


def logits(model, tok, prompts):
    with torch.no_grad():
        return model(**tok(prompts, return_tensors="pt", padding=True)).logits


PROMPTS = ["Dasur lives in", "The favourite colour of Solus is", "the old river"]


# ------------------------------------------------------------------------------------------------ round trip


def test_plain_peft_loads_it_with_identical_logits(trained, tiny_llama):
    result, task, path = trained
    assert sorted(p.name for p in path.iterdir()) == sorted([CONFIG, WEIGHTS, MANIFEST])
    config = json.loads((path / CONFIG).read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama.path.resolve())
    tok = tiny_llama.tokenizer
    want = logits(result.model, tok, PROMPTS)
    base, _ = load_model(config["base_model_name_or_path"])
    plain = PeftModel.from_pretrained(base, str(path))  # no lora_lens involved
    assert torch.equal(logits(plain, tok, PROMPTS), want)
    with plain.disable_adapter():
        assert not torch.equal(logits(plain, tok, PROMPTS), want)  # the adapter does change something


def test_load_adapter_and_load_base_and_adapter(trained, tiny_llama):
    result, task, path = trained
    tok = tiny_llama.tokenizer
    want = logits(result.model, tok, PROMPTS)
    base, _ = load_model(tiny_llama.path)
    assert torch.equal(logits(load_adapter(base, path), tok, PROMPTS), want)
    model, tok2 = load_base_and_adapter(path)
    assert isinstance(model, PeftModel) and torch.equal(logits(model, tok2, PROMPTS), want)


def test_manifest_records_base_task_spec_metrics_versions(trained, tiny_llama):
    result, task, path = trained
    m = read_manifest(path)
    base, _ = load_model(tiny_llama.path)
    fp = base_fingerprint(base)
    assert {k: m["base"][k] for k in fp} == fp  # computed on the base weights, adapter excluded
    assert m["base"]["architecture"] == "LlamaForCausalLM" and len(m["base"]["weights_hash"]) == 32
    assert m["base"]["path"] == str(tiny_llama.path.resolve())
    assert m["task"] == {"name": "fact_edit", "world_fingerprint": tiny_llama.world.fingerprint(),
                         "world_seed": tiny_llama.world.seed}
    assert m["spec"]["rank"] == 8 and m["spec"]["steps"] == 40 and m["metrics"]["steps"] == 40
    assert set(m["versions"]) >= {"torch", "transformers", "peft", "lora_lens"}
    assert set(m["files"]) == {CONFIG, WEIGHTS}


def test_save_is_atomic_and_refuses_other_folders(trained, tmp_path):
    result, task, path = trained
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an adapter: refusing to overwrite"):
        save_adapter(result, other)
    assert [p.name for p in other.iterdir()] == ["todo.txt"]
    again = save_adapter(result, tmp_path / "a")
    save_adapter(result, again, task=task)  # an adapter folder is replaced
    assert read_manifest(again)["task"]["name"] == "fact_edit"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "notes"]  # no temp folders left behind
    with pytest.raises(ConfigError, match="needs a peft PeftModel"):
        save_adapter(torch.nn.Linear(2, 2), tmp_path / "b")


def test_non_finite_adapter_is_never_saved(tiny_llama, tmp_path):
    model, _ = load_model(tiny_llama.path)
    pm = get_peft_model(model, lora_config(model, LoraSpec(rank=2)))
    with torch.no_grad():
        next(p for n, p in pm.named_parameters() if "lora_B" in n).fill_(float("inf"))
    with pytest.raises(TrainingError, match="non-finite weights"):
        save_adapter(pm, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------ bad loads


def test_wrong_base_is_refused_before_loading(trained, tiny_llama, tiny_world):
    path = trained[2]
    other = build_model("llama", "tiny", tiny_llama.tokenizer, seed=7)  # same architecture, other weights
    with pytest.raises(MismatchError, match=r"another base: its weights differs.*load_base_and_adapter"):
        load_adapter(other, path)
    assert not has_lora(other)  # nothing was touched
    qwen = build_model("qwen2", "tiny", tiny_llama.tokenizer)
    with pytest.raises(MismatchError, match=r"its architecture differs — adapter 'LlamaForCausalLM', given base "
                                            r"'Qwen2ForCausalLM'.*" + str(tiny_llama.path.name)):
        load_adapter(qwen, path)
    wider = build_model("llama", "tiny", tiny_llama.tokenizer, intermediate=48)
    with pytest.raises(MismatchError, match="its config .* differs"):
        load_adapter(wider, path)
    half, _ = load_model(tiny_llama.path, dtype=torch.bfloat16)
    with pytest.raises(MismatchError, match=r"its dtype differs.*dtype=torch.float32"):
        load_adapter(half, path)


def test_corrupt_weights(copy_of, tiny_llama):
    path = copy_of()
    data = bytearray((path / WEIGHTS).read_bytes())
    data[-5] ^= 0xFF
    (path / WEIGHTS).write_bytes(bytes(data))
    base, _ = load_model(tiny_llama.path)
    with pytest.raises(CorruptError, match=r"adapter_model.safetensors does not match the sha256"):
        load_adapter(base, path)
    assert not has_lora(base)


def test_missing_files_and_folder(copy_of, tiny_llama, tmp_path):
    base, _ = load_model(tiny_llama.path)
    path = copy_of("no_weights")
    (path / WEIGHTS).unlink()
    with pytest.raises(NotFoundError, match="has no adapter_model.safetensors"):
        load_adapter(base, path)
    path = copy_of("no_config")
    (path / CONFIG).unlink()
    with pytest.raises(NotFoundError, match="has no adapter_config.json"):
        load_adapter(base, path)
    with pytest.raises(NotFoundError, match="does not exist"):
        load_adapter(base, tmp_path / "nowhere")
    path = copy_of("broken_json")
    (path / CONFIG).write_text("{not json")
    with pytest.raises(CorruptError, match="is not valid JSON"):
        load_adapter(base, path)


def test_unknown_config_keys_are_named(copy_of, tiny_llama):
    path = copy_of()
    config = json.loads((path / CONFIG).read_text())
    config["lora_turbo"] = True
    config["zeta"] = 3
    (path / CONFIG).write_text(json.dumps(config))
    base, _ = load_model(tiny_llama.path)
    with pytest.raises(ConfigError, match=r"keys this peft version does not know: \['lora_turbo', 'zeta'\]"):
        load_adapter(base, path)


def plain_peft_adapter(base, path, rank=4):
    """What a user with plain PEFT writes: no manifest."""
    pm = get_peft_model(base, lora_config(base, LoraSpec(rank=rank)))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    pm.save_pretrained(path)
    return pm


def test_plain_peft_adapter_loads_with_a_warning(tiny_llama, tmp_path):
    tok = tiny_llama.tokenizer
    pm = plain_peft_adapter(load_model(tiny_llama.path)[0], tmp_path / "plain")
    want = logits(pm, tok, PROMPTS)
    base, _ = load_model(tiny_llama.path)
    with pytest.warns(UserWarning, match="no lora_lens_manifest.json .*only tensor shapes are checked"):
        loaded = load_adapter(base, tmp_path / "plain")
    assert torch.equal(logits(loaded, tok, PROMPTS), want)


def test_rank_and_shape_mismatch(tiny_llama, tmp_path):
    plain_peft_adapter(load_model(tiny_llama.path)[0], tmp_path / "r4", rank=4)
    config = json.loads((tmp_path / "r4" / CONFIG).read_text())
    config["r"] = 8  # config from one adapter, weights from another
    (tmp_path / "r4" / CONFIG).write_text(json.dumps(config))
    base, _ = load_model(tiny_llama.path)
    with pytest.warns(UserWarning), pytest.raises(MismatchError, match=r"rank mismatch at .*r=8 .* rank 4"):
        load_adapter(base, tmp_path / "r4")
    # an adapter made on a wider model: peft itself would raise a size-mismatch traceback
    wider = build_model("llama", "tiny", tiny_llama.tokenizer, intermediate=48)
    plain_peft_adapter(wider, tmp_path / "wide")
    with pytest.warns(UserWarning), pytest.raises(MismatchError, match=r"shape mismatch at .*mlp.*another size"):
        load_adapter(base, tmp_path / "wide")
    assert not has_lora(base)


def test_partial_adapter_file_is_refused(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    plain_peft_adapter(load_model(tiny_llama.path)[0], tmp_path / "partial")
    tensors = load_file(tmp_path / "partial" / WEIGHTS)
    save_file({k: v for k, v in tensors.items() if "layers.1." not in k}, tmp_path / "partial" / WEIGHTS)
    base, _ = load_model(tiny_llama.path)
    with pytest.warns(UserWarning), pytest.raises(MismatchError, match=r"no weights for .* targeted layers"):
        load_adapter(base, tmp_path / "partial")


def test_loading_onto_a_model_that_has_lora(trained, tiny_llama):
    with pytest.raises(ConfigError, match="already has a LoRA adapter"):
        load_adapter(trained[0].model, trained[2])
