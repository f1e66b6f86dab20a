"""``lora-lens inspect``: any PEFT LoRA adapter (a family outside the zoo, plain PEFT), zoo adapters, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import OPTConfig, OPTForCausalLM

from lora_lens.cli import main
from lora_lens.errors import ConfigError
from lora_lens.lab.adapters import save_adapter
from lora_lens.lab.tokenizer import build_tokenizer
from lora_lens.lab.train import default_spec, train_lora
from lora_lens.lab.world import make_task
from lora_lens.lab.zoo import load_model
from lora_lens.lens import inspect_adapter as I

OPT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]



@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _opt(tok, hidden: int = 32, seed: int = 0):
    cfg = OPTConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2, ffn_dim=2 * hidden,
                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=hidden,
                    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    return OPTForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def foreign(tmp_path_factory, tiny_world):
    """A tiny random OPT (not a zoo family) saved with a tokenizer, and a plain-PEFT LoRA with non-zero B."""
    root = tmp_path_factory.mktemp("foreign")
    tok = build_tokenizer(tiny_world)
    model = _opt(tok)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=OPT_TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    pm.save_pretrained(root / "adapter")
    modules = sorted(n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")
                     and n.split(".")[-1] in OPT_TARGETS)
    prompts = root / "prompts.txt"
    prompts.write_text("Dasur lives in\n\nthe old river follows the\nThe <script>alert(1)</script> colour of\n",
                       encoding="utf-8")
    return root, modules


def test_plain_peft_adapter_on_a_family_outside_the_zoo(foreign, tmp_path, capsys, monkeypatch):
    root, modules = foreign
    out = tmp_path / "report"
    rc = main(["inspect", str(root / "adapter"), "--base", str(root / "base"), "--prompts", str(root / "prompts.txt"),
               "--out", str(out), "--top", "5"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "OPTForCausalLM" in printed and "Top 5 modules" in printed and "Diff mining" in printed
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    rows = data["weights"]["modules"]
    assert len(modules) == 12 and sorted(r["module"] for r in rows) == modules
    assert all(r["fro"] > 0 and r["rank"] == 4 and len(r["singular_values"]) == 4 for r in rows)
    assert {r["module_type"] for r in rows} == {"attn_q", "attn_k", "attn_v", "attn_o", "mlp_up", "mlp_down"}
    assert sum(r["share"] for r in data["weights"]["energy_by_module_type"]) == pytest.approx(1.0)
    assert data["weights"]["amplification"] > 0 and data["config"]["r"] == 4
    mining = data["behaviour"]["mining"]
    assert len(mining["prompts"]) == 3 and all(r["max_kl"] > 0 for r in mining["prompts"])
    assert 0 < len(mining["positions"]) <= 5 and all(p["kl"] > 0 for p in mining["positions"])
    assert data["behaviour"]["diff"] is None and data["behaviour"]["score"] is None
    assert any("no lora_lens_manifest.json" in n for n in data["notes"])
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count("<img") == 3 and "data:image/png;base64," in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # default --out: ./inspect-<adapter folder name>/ in the current directory
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", str(root / "adapter"), "--base", str(root / "base")]) == 0
    data = json.loads((tmp_path / "inspect-adapter" / "report.json").read_text(encoding="utf-8"))
    assert data["behaviour"]["mining"] is None and any("--prompts FILE" in n for n in data["notes"])


def test_zoo_adapter_reports_precision_and_recall(tiny_llama, tiny_world, tmp_path, capsys):
    task = make_task(tiny_world, "fact_edit", k=4, n_specificity=30, seed=0)
    model, tok = load_model(tiny_llama.path)
    result = train_lora(model, tok, task, default_spec("fact_edit", steps=100), seed=0)
    adapter = save_adapter(result, tmp_path / "adapter", task=task)
    # the manifest records the task's name but not its seed: the world diff is made, unscored, and says why
    assert main(["inspect", str(adapter), "--out", str(tmp_path / "r1")]) == 0
    data = json.loads((tmp_path / "r1" / "report.json").read_text(encoding="utf-8"))
    assert data["behaviour"]["score"] is None and data["behaviour"]["diff"]["n_queries"] == 24 * 4 * 3 * 2
    assert any("cannot be rebuilt" in n and "--task" in n for n in data["notes"])
    capsys.readouterr()
    # with the task saved next to the adapter it is scored
    task.save(adapter / "task.jsonl")
    assert main(["inspect", str(adapter), "--out", str(tmp_path / "r2")]) == 0
    printed = capsys.readouterr().out
    score = json.loads((tmp_path / "r2" / "report.json").read_text(encoding="utf-8"))["behaviour"]["score"]
    assert score["task"] == "fact_edit" and score["n_truth"] == 4
    assert 0 <= score["precision"] <= 1 and 0 <= score["recall"] <= 1
    assert "Against the planted truth (fact_edit" in printed and "precision" in printed
    lines = json.loads((tmp_path / "r2" / "report.json").read_text())["behaviour"]["semantic_report"]
    assert any(task.truth["edits"][0]["entity"] in s and "(was " in s for s in lines)
    assert "<li>" in (tmp_path / "r2" / "report.html").read_text(encoding="utf-8")


def test_base_that_does_not_match(foreign, tiny_world, tmp_path, capsys):
    root, _ = foreign
    tok = build_tokenizer(tiny_world)
    wide = _opt(tok, hidden=48)
    wide.save_pretrained(tmp_path / "wide")
    tok.save_pretrained(tmp_path / "wide")
    rc = main(["inspect", str(root / "adapter"), "--base", str(tmp_path / "wide"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit" in err and "shape mismatch" in err and "48" in err
    assert not (tmp_path / "r").exists()


def test_adapter_without_weights_and_other_bad_input(foreign, tmp_path, capsys):
    root, _ = foreign
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(root / "adapter" / "adapter_config.json", bare)
    rc = main(["inspect", str(bare), "--base", str(root / "base"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "adapter_model.safetensors" in err and str(bare) in err
    assert main(["inspect", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Zoë lives in\n".encode("latin-1"))
    assert main(["inspect", str(root / "adapter"), "--base", str(root / "base"), "--prompts", str(latin),
                 "--out", str(tmp_path / "r")]) == 2
    assert f"{latin} is not UTF-8" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine", encoding="utf-8")
    assert main(["inspect", str(root / "adapter"), "--base", str(root / "base"), "--out", str(busy)]) == 2
    assert "refusing" in capsys.readouterr().err and sorted(p.name for p in busy.iterdir()) == ["notes.txt"]
    with pytest.raises(ConfigError, match="is a file"):
        I.check_out_dir(latin)
    # this plain-PEFT adapter was made from a model built in memory: its config names no base, so --base is needed
    assert json.loads((root / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    assert main(["inspect", str(root / "adapter"), "--out", str(tmp_path / "r")]) == 2
    assert "pass --base" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
