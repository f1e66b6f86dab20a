"""Greedy continuations of token ids with a KV cache: the decoder behind every free answer.

:func:`greedy_continuations` continues a list of id sequences greedily, in batches sorted by length: the batch is
left-padded, position ids follow the attention mask (``cumsum − 1``, so every real token keeps the position it has
alone), the prompt is read in one forward pass that fills the model's KV cache, and each further step is one
forward pass of one new token per row. A row ends at a stop id or when its ``done`` rule says its answer is
complete (:func:`lora_lens.lab.answers.free_answers` passes the cut rule of
:func:`lora_lens.lab.answers.cut_answer`), and ended rows leave the batch and its cache. Logits are projected at
the last position only where the model takes ``logits_to_keep``.

The continuations are those of full forward passes over the whole sequence at every step (what
``tests/lab/test_answers.py`` checks against such a reference, on the zoo and on SmolLM2): the cache changes only
the order of float sums, which could flip an argmax only at an exact near-tie. A model whose forward returns no
cache (a stub) is fed the whole left-padded sequence at every step instead.

Example:
    >>> ids = [tokenizer("The capital of France is")["input_ids"]]                     # doctest: +SKIP
    >>> greedy_continuations(model, ids, pad_id=0, max_new_tokens=4, stop_ids={tokenizer.eos_token_id})
    [[12366, 30, ...]]                                                                 # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from typing import Callable, Collection, Sequence

import torch

from lora_lens.checks import check_positive
from lora_lens.errors import ConfigError
from lora_lens.lab.modules import hf_model
from lora_lens.lab.pair import keeps_logits, model_device

__all__ = ["GREEDY_BATCH", "cache_argument", "greedy_continuations", "returned_cache"]

GREEDY_BATCH = 64
"""Prompts decoded together by default. With a KV cache a step reads one token per row, so a step costs about the
same for 16 rows as for 64 on a CPU (the weights are read once per step either way); the cache itself is small
(SmolLM2-135M: about 46 KB per token and row)."""


def cache_argument(model) -> str:
    """The name of the KV-cache argument of the model's forward: ``cache`` (transformers ≥ 5.2x) or
    ``past_key_values`` (earlier versions and models that keep the old name)."""
    try:
        params = inspect.signature(hf_model(model).forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(out):
    """The KV cache a forward returned (``cache`` or ``past_key_values``, as :func:`cache_argument`), or None."""
    for name in ("cache", "past_key_values"):
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    return None


def greedy_continuations(model, seqs: Sequence[Sequence[int]], pad_id: int, max_new_tokens: int,
                         stop_ids: Collection[int] = (), done: Callable[[list[int]], bool] | None = None,
                         batch_size: int = GREEDY_BATCH) -> list[list[int]]:
    """Greedy continuation of each id sequence, with a KV cache, batched.

    Args:
        model: A causal LM, run as it is (a ``PeftModel`` with its adapter on; wrap the call in
            ``model.disable_adapter()`` for the base). The caller sets eval mode and no-grad (see
            :func:`lora_lens.lab.pair.inference`).
        seqs: Token id sequences (each non-empty), e.g. rendered prompts.
        pad_id: Id placed under mask 0 on the left of shorter rows.
        max_new_tokens: New tokens at most per sequence, ≥ 1.
        stop_ids: Ids that end a continuation (kept as its last token).
        done: Called with a row's new ids after each step; True ends that row (kept as generated so far).
        batch_size: Sequences per batch (sorted by length, so rows of one batch are close in length).

    Returns:
        The new ids of each sequence, in the order of ``seqs``.

    Raises:
        ConfigError: An empty sequence, or a bad ``max_new_tokens``/``batch_size``.
    """
    check_positive("max_new_tokens", max_new_tokens)
    check_positive("batch_size", batch_size)
    seqs = [list(map(int, s)) for s in seqs]
    if any(not s for s in seqs):
        raise ConfigError("an empty id sequence cannot be continued: every sequence needs at least one token "
                          "(a prompt)")
    stop = {int(i) for i in stop_ids}
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list[list[int]] = [[] for _ in seqs]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, new in zip(chunk, _decode_batch(model, [seqs[i] for i in chunk], pad_id, max_new_tokens, stop, done)):
            out[i] = new
    return out


def _decode_batch(model, seqs: list[list[int]], pad_id: int, max_new_tokens: int, stop: set[int],
                  done: Callable[[list[int]], bool] | None) -> list[list[int]]:
    device = model_device(model)
    keep = {"logits_to_keep": 1} if keeps_logits(model) else {}
    cache_name = cache_argument(model)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s):] = torch.tensor(s)
        mask[r, width - len(s):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out: list[list[int]] = [[] for _ in seqs]
    live = torch.arange(len(seqs))          # row of the batch -> index into seqs
    step_ids, step_pos, cache = ids, pos, None
    for _ in range(max_new_tokens):
        kwargs = {cache_name: cache} if cache is not None else {}
        res = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True, **kwargs, **keep)
        nxt = res.logits[:, -1].argmax(-1).cpu()
        cache = returned_cache(res)
        ended = []
        for r, (i, t) in enumerate(zip(live.tolist(), nxt.tolist())):
            out[i].append(int(t))
            ended.append(int(t) in stop or (done is not None and done(out[i])))
        ended_t = torch.tensor(ended)
        if ended_t.all():
            break
        if ended_t.any():
            rows = (~ended_t).nonzero()[:, 0]
            live, nxt, rows_d = live[rows], nxt[rows], rows.to(device)
            ids, mask, pos = ids[rows_d], mask[rows_d], pos[rows_d]
            if cache is not None:
                cache.batch_select_indices(rows_d)
        new = nxt[:, None].to(device)
        ids = torch.cat([ids, new], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
        # with a cache only the new token is read; a model that returned none reads the whole sequence again
        step_ids, step_pos = (new, pos[:, -1:]) if cache is not None else (ids, pos)
    return out
