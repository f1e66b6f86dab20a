"""Base vs adapted on one PeftModel: its two states, inference without side effects, KL, batched forward passes.

Every comparison of a base model with its adapted self runs on **one** ``peft.PeftModel``: the adapted state is the
model as it is, the base state is the model inside ``model.disable_adapter()`` — no second copy of the weights.
This module owns the helpers every room uses for that:

* checks: :func:`is_peft`, :func:`check_unmerged`, :func:`check_peft`, :func:`check_base` (the ``base=`` argument
  of :func:`lora_lens.lab.probes.evaluate`);
* the two states: :func:`adapter_states`, and context managers that leave the model as they found it
  (:func:`inference` for no-grad passes, :func:`frozen` for attribution with gradients w.r.t. inputs);
* forward passes on right-padded batches (real tokens keep their positions, so batched logits equal one-by-one
  logits): :func:`encode`, :func:`pad_ids`, :func:`pad_token_id`, :func:`logits_where` (the output layer only where
  a log p is read), :func:`logits_at`, :func:`last_logits`, :func:`keeps_logits`, :func:`model_device`;
* :func:`kl_divergence` — KL(base‖adapted) from log-probabilities.

Example:
    >>> with inference(peft_model):                                              # doctest: +SKIP
    ...     for state, ctx in adapter_states(peft_model):
    ...         with ctx:
    ...             logits[state] = last_logits(peft_model, encode(tokenizer, prompts, model_device(peft_model)))
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from typing import Iterator

import torch

from lora_lens.errors import ConfigError
from lora_lens.lab.modules import hf_model
from lora_lens.lab.tokenizer import check_tokenizer

__all__ = ["adapted_view", "adapter_states", "check_base", "check_peft", "check_unmerged", "encode", "frozen",
           "inference", "is_peft", "keeps_logits", "kl_divergence", "last_logits", "logits_at", "logits_where",
           "model_device", "pad_ids", "pad_token_id"]

# ---------------------------------------------------------------------------------------------------------------
# checks


def model_device(model) -> torch.device:
    """The device of the model's (first) parameters."""
    return next(model.parameters()).device


def is_peft(model) -> bool:
    """Whether ``model`` is a peft model whose adapter can be switched off (``disable_adapter``)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def check_unmerged(model) -> None:
    """Raise :class:`ConfigError` when the adapter is merged into the base weights (toggling would unmerge it)."""
    merged = [n for n, m in model.named_modules() if getattr(m, "merged", False)]
    if merged:
        raise ConfigError(f"the adapter is merged into the base weights ({merged[0]} …), so switching it off would "
                          "silently unmerge it: call model.unmerge_adapter() first")


def check_peft(model, tokenizer=None) -> None:
    """A PeftModel whose adapter can be toggled (not merged), and a tokenizer that fits it (when given).

    Raises:
        ConfigError: Not a PeftModel, a merged adapter, or a tokenizer of another vocabulary.
    """
    if not is_peft(model):
        raise ConfigError(f"attribution of an adapter's change needs a peft.PeftModel, got {type(model).__name__}: "
                          "wrap the base with peft.get_peft_model(base, LoraConfig(...)) or load an adapter with "
                          "PeftModel.from_pretrained(base, adapter_dir)")
    check_unmerged(model)
    if tokenizer is not None:
        check_tokenizer(model, tokenizer)


def check_base(model, tokenizer, base) -> None:
    """Validate a ``base`` argument before any forward pass.

    Args:
        model: The adapted model.
        tokenizer: Its tokenizer.
        base: ``"adapter"`` (toggle the model's own LoRA adapter), None (the adapted model alone) or a separate
            base model.

    Raises:
        ConfigError: An unknown string, ``"adapter"`` on a plain model or a merged adapter, a base that is not a
            torch model or is the model itself, or a tokenizer that does not fit.
    """
    check_tokenizer(model, tokenizer)
    if isinstance(base, str):
        if base != "adapter":
            raise ConfigError(f"base={base!r} is not understood: use 'adapter' (toggle the model's LoRA adapter), "
                              "None (adapted metrics only) or a separate base model")
        if not is_peft(model):
            raise ConfigError(f"base='adapter' needs a peft.PeftModel, got a plain {type(model).__name__} with no "
                              "adapter to toggle: pass base=None to evaluate it alone, or base=<the base model> to "
                              "compare two models")
        check_unmerged(model)
    elif base is not None:
        if not isinstance(base, torch.nn.Module):
            raise ConfigError(f"base={type(base).__name__} is not a model: use 'adapter', None or a torch model")
        if base is model:
            raise ConfigError("base is the same object as model: pass base='adapter' for a PeftModel or base=None")
        check_tokenizer(base, tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# the two states


def adapter_states(model):
    """``(name, context)`` for the adapted and the base state of one PeftModel, in that order."""
    return (("adapted", contextlib.nullcontext()), ("base", model.disable_adapter()))


def adapted_view(model):
    """The adapted state of a PeftModel as a module without the adapter toggle (peft's inner ``LoraModel``, sharing
    every weight): a function that switches a PeftModel's adapter off to read the base
    (``lora_lens.lab.answers.base_answers``) runs on it with the adapter on. A model that is not a PeftModel is
    returned as it is."""
    return model.base_model if is_peft(model) else model


@contextlib.contextmanager
def inference(*models) -> Iterator[None]:
    """Eval mode and no grad; restores training flags and ``requires_grad`` (peft's toggle re-enables grads)."""
    state = [(m, m.training, [(p, p.requires_grad) for p in m.parameters()]) for m in models if m is not None]
    try:
        for m, _, _ in state:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, training, grads in state:
            m.train(training)
            for p, flag in grads:
                p.requires_grad_(flag)


@contextlib.contextmanager
def frozen(model) -> Iterator[None]:
    """Eval mode with every parameter frozen; restores the training flag and each ``requires_grad`` afterwards
    (peft's ``disable_adapter`` re-enables the adapter's gradients when it exits). Gradients w.r.t. inputs still
    flow (integrated gradients)."""
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        model.train(training)
        for p, flag in flags:
            p.requires_grad_(flag)


def kl_divergence(lp_base: torch.Tensor, lp_adapted: torch.Tensor) -> torch.Tensor:
    """KL(base‖adapted) over the last axis, from log-probabilities; exactly 0 where both are equal."""
    return (lp_base.exp() * (lp_base - lp_adapted)).sum(-1).clamp_min(0.0)


# ---------------------------------------------------------------------------------------------------------------
# forward passes on right-padded batches


def keeps_logits(model) -> bool:
    """Whether the causal LM's forward accepts ``logits_to_keep`` (then a decoding step projects only the last
    position)."""
    try:
        return "logits_to_keep" in inspect.signature(hf_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def logits_where(model, rows, pos, **inputs) -> tuple[torch.Tensor, object]:
    """Logits ``[n, vocab]`` at position ``pos[i]`` of batch row ``rows[i]``, and the model's output: the output
    layer runs only on those ``n`` positions (at a 50k vocabulary it is a fifth of a small model's forward).

    The one home of "project only where a log p is read". A pre-hook on the model's ``get_output_embeddings()``
    hands it the picked hidden states, so whatever the causal LM does after its head (a logit scale, soft-capping)
    still applies; a model without that head, or whose head does not receive ``[rows, width, d]``, computes every
    position and the asked ones are picked (same numbers, more work).

    Args:
        model: A causal LM or a peft wrapper of one.
        rows, pos: Equal-length index sequences (or 1-D long tensors) into the batch.
        **inputs: The forward's arguments: ``input_ids`` or ``inputs_embeds``, ``attention_mask``, a KV cache, ...
    """
    dev = model_device(model)
    rows, pos = (torch.as_tensor(v, dtype=torch.long, device=dev) for v in (rows, pos))
    x = inputs["input_ids"] if inputs.get("input_ids") is not None else inputs["inputs_embeds"]
    shape = tuple(x.shape[:2])
    flat = rows * shape[1] + pos
    inner = hf_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    picked = []

    def pick(module, args):
        h = args[0] if args else None
        if picked or not isinstance(h, torch.Tensor) or h.dim() != 3 or tuple(h.shape[:2]) != shape:
            return None
        picked.append(True)
        return (h.reshape(-1, h.shape[-1])[flat][None],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(pick) if head is not None else None
    try:
        out = model(**inputs)
    finally:
        if handle is not None:
            handle.remove()
    logits = out.logits
    return (logits[0] if picked else logits.reshape(-1, logits.shape[-1])[flat]), out


def logits_at(model, last: torch.Tensor, **inputs) -> torch.Tensor:
    """Logits ``[batch, vocab]`` at position ``last[b]`` of each row (only those positions are projected, see
    :func:`logits_where`)."""
    return logits_where(model, torch.arange(len(last), device=last.device), last, **inputs)[0]


def last_logits(model, enc: dict) -> torch.Tensor:
    """Logits ``[batch, vocab]`` at each row's last real token (right padding), on the model's device."""
    return logits_at(model, enc["attention_mask"].sum(1) - 1, **enc)


def encode(tokenizer, texts: list[str], device) -> dict:
    """Right-padded ids and mask (whatever the tokenizer's own padding side: real tokens keep their positions).

    Raises:
        ConfigError: The tokenizer has no pad token.
    """
    if tokenizer.pad_token is None:
        raise ConfigError("the tokenizer has no pad token, so prompts cannot be batched: set "
                          "tokenizer.pad_token = tokenizer.eos_token (lora_lens.lab.zoo.load_model does this)")
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def pad_ids(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token lists: ``(ids, attention_mask, last)`` where ``last`` is each row's last real position."""
    n, width = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    last = mask.sum(1) - 1
    return ids.to(device), mask.to(device), last.to(device)


def pad_token_id(tokenizer) -> int:
    """The id that fills padded positions: pad, else eos, else unk, else 0 (it only ever sits under mask 0)."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0
