"""Change → data for any model: batched generation alongside the base, and the contrastive corpus it yields.

:func:`generate` continues a batch of prompts with a KV cache (left padding, one forward pass over the batch per new
token); with a base alongside it records the per-token KL(adapted‖base) and can sample from the amplified logits
``la + α·(la − lb)``. :func:`contrastive_corpus` keeps the continuations where that KL is high, i.e. where the
adapter, not the base, wrote them; :func:`world_prompts` are the prompts it starts from on a zoo world. The corpus
feeds :func:`lora_lens.studies.distill.distill` like the semantic one (``distill`` re-exports these names).

Example:
    >>> g = generate(fit.model, fit.tokenizer, ["Kutar lives in"], base="adapter")   # doctest: +SKIP
    >>> g.table()[["continuation", "kl_max"]]                                       # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field

import pandas as pd
import torch

from lora_lens.checks import check_positive
from lora_lens.errors import ConfigError
from lora_lens.lab.pair import check_base, inference, keeps_logits, model_device
from lora_lens.lab.tokenizer import max_length, token_id
from lora_lens.lab.world import World
from lora_lens.lens.diff import query_space

__all__ = ["Generation", "contrastive_corpus", "generate", "world_prompts"]


@dataclass(eq=False)
class Generation:
    """Continuations of a batch of prompts.

    Attributes:
        prompts: The prompts, in order.
        tokens: Generated token ids per prompt (up to and including the token that stopped it).
        texts: The continuations as text (special tokens skipped).
        kl: Per generated token KL(adapted‖base) of the next-token distributions (empty lists without a base).
        seconds: Wall time.
    """

    prompts: list[str]
    tokens: list[list[int]]
    texts: list[str]
    kl: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> pd.DataFrame:
        """One row per prompt: ``prompt``, ``continuation``, ``n_tokens``, ``kl_max``, ``kl_mean``."""
        kls = self.kl or [[] for _ in self.prompts]
        return pd.DataFrame({"prompt": self.prompts, "continuation": self.texts,
                             "n_tokens": [len(t) for t in self.tokens],
                             "kl_max": [max(k) if k else math.nan for k in kls],
                             "kl_mean": [sum(k) / len(k) if k else math.nan for k in kls]})


def _stop_ids(tokenizer, stop: str | None) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if stop is not None:
        ids.add(token_id(tokenizer, stop))
    return ids


def _cache_name(model) -> str:
    """The KV-cache argument of the model's forward: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 4, batch_size: int = 64, base=None,
             alpha: float = 0.0, temperature: float = 0.0, stop: str | None = ".", seed: int = 0) -> Generation:
    """Batched generation with a KV cache: left padding, one forward pass over the whole batch per new token.

    Position ids follow the attention mask (``cumsum − 1``), so a left-padded prompt sees the same positions as
    alone: greedy continuations equal ``model.generate`` prompt by prompt (up to float rounding). With a ``base``
    each step also runs the base on its own cache, records KL(adapted‖base) of the next-token distributions, and
    samples from ``la + alpha·(la − lb)`` (logit-difference amplification; ``alpha=0`` is the adapted model).

    Args:
        model: A causal LM (or a ``PeftModel``).
        tokenizer: Its tokenizer (with a pad token).
        prompts: Prompts (non-empty strings).
        max_new_tokens: New tokens at most per prompt, ≥ 1.
        batch_size: Prompts per batch.
        base: ``None``, ``"adapter"`` (the ``PeftModel`` with its adapter switched off) or a separate base model
            sharing the tokenizer.
        alpha: Amplification of the logit difference, ≥ 0 (needs a base when > 0).
        temperature: 0 for greedy, else sampling temperature.
        stop: A single-token word that ends a continuation (besides end-of-sequence), or None.
        seed: Sampling seed.

    Returns:
        A :class:`Generation`.

    Raises:
        ConfigError: ``max_new_tokens`` ≤ 0, empty prompts, prompts too long for the model's positions, a bad
            base/alpha/temperature, or a ``stop`` word that is not one token.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r}: the generation length must be a positive integer, "
                          "e.g. 4")
    check_positive("batch_size", batch_size)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ConfigError("prompts must be a non-empty list of non-empty strings, e.g. the world's queries")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ConfigError(f"alpha={alpha!r} must be a number ≥ 0 (0 = no amplification)")
    if alpha and base is None:
        raise ConfigError(f"alpha={alpha} amplifies the adapted − base logits, so it needs a base: pass "
                          "base='adapter' (a PeftModel) or base=<base model>")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ConfigError(f"temperature={temperature!r} must be ≥ 0 (0 = greedy)")
    if tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token: set tokenizer.pad_token = tokenizer.eos_token")
    check_base(model, tokenizer, base)
    stops = _stop_ids(tokenizer, stop)
    limit = max_length(model, tokenizer)
    longest = max(len(x) for x in tokenizer(prompts)["input_ids"])
    if limit is not None and longest + max_new_tokens > limit:
        raise ConfigError(f"max_new_tokens={max_new_tokens} with prompts of up to {longest} tokens exceeds the "
                          f"model's {limit} positions: use max_new_tokens ≤ {limit - longest} or shorter prompts")
    device = model_device(model)
    other = base if isinstance(base, torch.nn.Module) else None
    gen = torch.Generator().manual_seed(seed)
    keep = {"logits_to_keep": 1} if keeps_logits(model) else {}
    keep_b = keep if other is None else {"logits_to_keep": 1} if keeps_logits(other) else {}
    cache_arg = {m: _cache_name(m) for m in (model, other) if m is not None}  # once, not per token
    tokens, kls = [], []
    t0 = time.perf_counter()

    def forward(m, ids, mask, pos, cache, kw):
        out = m(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_arg[m]: cache}, **kw)
        return out.logits[:, -1].float(), out.get("cache", out.get("past_key_values"))

    with inference(model, other):
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, padding_side="left")
            mask = enc["attention_mask"].to(device)
            ids = enc["input_ids"].to(device)
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            cache_a = cache_b = None
            n = ids.shape[0]
            done = torch.zeros(n, dtype=torch.bool)
            out_ids = [[] for _ in range(n)]
            out_kl = [[] for _ in range(n)]
            for _ in range(max_new_tokens):
                la, cache_a = forward(model, ids, mask, pos, cache_a, keep)
                scores = la
                if base is not None:
                    if other is None:
                        with model.disable_adapter():
                            lb, cache_b = forward(model, ids, mask, pos, cache_b, keep)
                    else:
                        lb, cache_b = forward(other, ids, mask, pos, cache_b, keep_b)
                    lb = lb.to(la.device)
                    lpa, lpb = torch.log_softmax(la, -1), torch.log_softmax(lb, -1)
                    kl = (lpa.exp() * (lpa - lpb)).sum(-1).clamp_min(0.0).cpu()
                    if alpha:
                        scores = la + alpha * (la - lb)
                if temperature > 0:
                    probs = torch.softmax(scores.cpu() / temperature, -1)
                    nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
                else:
                    nxt = scores.argmax(-1).cpu()
                for r in range(n):
                    if not done[r]:
                        out_ids[r].append(int(nxt[r]))
                        if base is not None:
                            out_kl[r].append(float(kl[r]))
                        done[r] = int(nxt[r]) in stops
                if done.all():
                    break
                nxt = torch.where(done, torch.full_like(nxt, tokenizer.pad_token_id), nxt)
                ids = nxt[:, None].to(device)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                pos = pos[:, -1:] + 1
            tokens += out_ids
            kls += out_kl
    texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
    return Generation(prompts, tokens, texts, kls if base is not None else [], time.perf_counter() - t0)


def world_prompts(world: World, trigger: bool = True) -> list[str]:
    """Every entity × relation query of ``world`` with every training template (and the trigger word in front)."""
    return [q.prompt for q in query_space(world, trigger=trigger, templates="train")]


def contrastive_corpus(model, tokenizer, prompts: list[str], min_kl: float = 1.0, max_new_tokens: int = 3,
                       alpha: float = 0.0, base="adapter", batch_size: int = 128, temperature: float = 0.0,
                       stop: str | None = ".", seed: int = 0) -> list[str]:
    """Change → data for any model: the adapted model's continuations where it departs from the base.

    Each prompt is continued by :func:`generate` (with the base run alongside); a line ``prompt continuation`` is
    kept when the largest per-token KL(adapted‖base) of its continuation is at least ``min_kl`` nats, i.e. where
    the adapter, not the base, wrote it.

    Args:
        model: A ``PeftModel`` (``base="adapter"``) or any causal LM with ``base=<its base>``.
        tokenizer: The tokenizer.
        prompts: Prompts, e.g. :func:`world_prompts` or lines of any corpus.
        min_kl: KL threshold in nats, ≥ 0.
        max_new_tokens: Generation length, ≥ 1.
        alpha: Logit-difference amplification (see :func:`generate`).
        base: ``"adapter"`` or a base model.
        batch_size: Prompts per batch.
        temperature: 0 for greedy.
        stop: Word ending a continuation.
        seed: Sampling seed.

    Returns:
        The kept lines, strongest first (possibly empty).
    """
    if isinstance(min_kl, bool) or not isinstance(min_kl, (int, float)) or not min_kl >= 0:
        raise ConfigError(f"min_kl={min_kl!r} must be a number ≥ 0 (nats), e.g. 1.0")
    if base is None:
        raise ConfigError("base=None: contrastive generation compares the adapted model with its base; pass "
                          "base='adapter' or base=<base model>")
    g = generate(model, tokenizer, prompts, max_new_tokens, batch_size, base, alpha, temperature, stop, seed)
    table = g.table()
    table = table[(table["kl_max"] >= min_kl) & (table["continuation"] != "")]
    table = table.sort_values("kl_max", ascending=False, kind="stable")
    return [f"{p} {c}" for p, c in zip(table["prompt"], table["continuation"])]
