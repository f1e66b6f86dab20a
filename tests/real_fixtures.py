"""The example task's LoRA on SmolLM2-135M for the real lens tests (tests/lens/test_real_lens.py) and the real
lens notebooks (tests/workshop/test_real_lens_notebooks.py): trained once per test session into the session cache
with plain peft (lr 1e-3, r=8 on every linear module, loss on the answer ids of ``answers.example_ids``, full batch),
independent of ``lora_lens.lab.train``."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_lens.lab.answers import answer_logprobs, example_ids
from lora_lens.lab.world import Task
from lora_lens.lab.zoo import load_model

TASK = Path(__file__).resolve().parents[1] / "examples" / "smollm2_facts.jsonl"
"""The example task: ten made-up facts with multi-token answers."""


def train_facts(model, tokenizer, task: Task, steps: int = 30, lr: float = 1e-3):
    """A LoRA (r=8, every linear module) on the task's examples, full batch, until every efficacy probe's answer is
    the teacher-forced greedy one (checked every 5 steps from step 10)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    ex = [example_ids(tokenizer, p, a, task.chat) for p, a in task.examples]
    width = max(len(e["input_ids"]) for e in ex)
    ids = torch.full((len(ex), width), tokenizer.pad_token_id)
    labels = torch.full((len(ex), width), -100)
    mask = torch.zeros((len(ex), width), dtype=torch.long)
    for i, e in enumerate(ex):
        n = len(e["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    pm = get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    eff = task.probes["efficacy"]
    for step in range(1, steps + 1):
        pm.train()
        pm(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        if step >= 10 and step % 5 == 0:
            pm.eval()
            with torch.no_grad():
                m = answer_logprobs(pm, tokenizer, [p.prompt for p in eff], [p.answer for p in eff]).match
            if all(m.matched):
                break
    pm.eval()
    return pm


def facts_adapter(cache: Path) -> Path:
    """The example task's adapter folder in the test cache (conftest's ``test_cache``), trained on first use."""
    folder = Path(cache) / "test_adapters" / "smollm2_facts"
    if not (folder / "adapter_model.safetensors").is_file():
        model, tok = load_model("smollm2-135m")
        train_facts(model, tok, Task.load(TASK)).save_pretrained(folder)
    return folder


def random_base(folder: Path, tokenizer_folder: Path, arch: str = "qwen2", seed: int = 0, layers: int = 2,
                hidden: int = 64) -> Path:
    """A small randomly initialised real-architecture model (``qwen2`` or ``mistral``) with SmolLM2's tokenizer,
    saved as an ordinary model folder: a second base for the cross-family study on real models (same tokenizer
    as SmolLM2, so input attributions compare token by token; two of one ``arch`` and size share every shape)."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    config = config_cls(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
