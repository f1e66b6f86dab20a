"""Behaviour evaluation: batched next-token answers on probe sets.

Example:
    >>> logits = next_token_logits(model, tokenizer, ["Dasur lives in"])   # doctest: +SKIP
"""

from __future__ import annotations

import torch

from lora_lens.tokenizer import token_id
from lora_lens.world import Probe


@torch.no_grad()
def next_token_logits(model, tokenizer, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Logits of the token following each prompt, batched with right padding.

    Right padding keeps every real token at its own position, so batched logits equal one-by-one logits
    (absolute-position models such as GPT-2 included).

    Returns:
        Float tensor ``[len(prompts), vocab]`` on the CPU.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True)
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        logits = model(**enc).logits
        last = enc["attention_mask"].sum(1) - 1
        out.append(logits[torch.arange(len(last), device=device), last].float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


def accuracy(model, tokenizer, probes: list[Probe], batch_size: int = 256, expected: str = "answer") -> float:
    """Share of probes whose argmax next token is the expected single-token answer.

    Args:
        expected: ``"answer"`` (after the change) or ``"base_answer"`` (before it).
    """
    if not probes:
        return float("nan")
    logits = next_token_logits(model, tokenizer, [p.prompt for p in probes], batch_size)
    want = torch.tensor([token_id(tokenizer, getattr(p, expected)) for p in probes])
    return (logits.argmax(-1) == want).float().mean().item()
