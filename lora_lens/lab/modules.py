"""Module naming: the one classifier of a model's modules and the one enumerator of its LoRA layers.

Every analysis that asks "is this attention or MLP, does it read or write the residual stream, which layer is it
in?" asks here, so training targets (``targets="attn"`` / ``"mlp"``), the weight-space energy tables and the
cross-family comparison classify a module the same way:

* :func:`module_type` — a fine, normalised type from the dotted path (``attn_q`` … ``mlp_down``, ``embed``,
  ``lm_head``, ``other``), for any architecture (Llama, Qwen2, Mistral, Phi-3, GPT-2, GPT-NeoX, Falcon, T5-style
  ``wi``/``wo``, InternLM2 ``attention.wo``, mixture-of-experts routers …).
* :func:`module_kind` — its coarse kind, ``attn``, ``mlp`` or ``other`` (what the training presets select).
* :func:`shared_type` — the family-independent type ``attn_in``, ``attn_out``, ``mlp_in``, ``mlp_out`` or
  ``other`` (what the cross-family study aggregates).
* :func:`layer_index` — the transformer block index in a path.
* :func:`lora_layers` — every LoRA layer of a model (optionally only those carrying one adapter), by name
  relative to the unwrapped Hugging Face model (:func:`hf_model`).

Example:
    >>> module_type("model.layers.3.self_attn.o_proj"), module_kind("transformer.h.0.mlp.c_proj")
    ('attn_o', 'mlp')
    >>> shared_type("gpt_neox.layers.0.attention.query_key_value"), layer_index("model.layers.3.mlp.up_proj")
    ('attn_in', 3)
"""

from __future__ import annotations

import re

import torch
from peft.tuners.lora import LoraLayer

from lora_lens.errors import ConfigError

__all__ = ["KINDS", "MODULE_TYPES", "READ_TYPES", "SHARED_TYPES", "WRITE_TYPES", "adapters_of", "hf_model",
           "layer_index", "lora_layers", "module_kind", "module_role", "module_type", "shared_type"]

MODULE_TYPES = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o", "attn_other", "mlp_gate", "mlp_up",
                "mlp_gate_up", "mlp_down", "mlp_other", "embed", "lm_head", "other")
"""Normalised module types. ``attn_other`` / ``mlp_other``: a module inside an attention / MLP block whose own
name is not recognised (a mixture-of-experts router, DeepSeek's ``q_a_proj`` …); ``other`` for anything else."""

KINDS = ("attn", "mlp", "other")
"""Coarse kinds (see :func:`module_kind`)."""

WRITE_TYPES = frozenset({"attn_o", "mlp_down"})
"""Module types whose output is written into the residual stream (read through the unembedding)."""

READ_TYPES = frozenset({"attn_q", "attn_k", "attn_v", "attn_qkv", "mlp_gate", "mlp_up", "mlp_gate_up"})
"""Module types that read the (normalised) residual stream (read through the embedding)."""

SHARED_TYPES = ("attn_in", "attn_out", "mlp_in", "mlp_out", "other")
"""Module types shared by every family (see :func:`shared_type`)."""

_LEAF_TYPES = {
    # llama / qwen2 / mistral / yi / phi3 / opt / falcon / mixtral / bloom / mpt / baichuan / t5 …
    "q_proj": "attn_q", "query": "attn_q", "wq": "attn_q", "q": "attn_q",
    "k_proj": "attn_k", "key": "attn_k", "wk": "attn_k", "k": "attn_k",
    "v_proj": "attn_v", "value": "attn_v", "wv": "attn_v", "v": "attn_v",
    "o_proj": "attn_o", "out_proj": "attn_o", "o": "attn_o",
    "qkv_proj": "attn_qkv", "c_attn": "attn_qkv", "query_key_value": "attn_qkv", "wqkv": "attn_qkv",
    "w_pack": "attn_qkv",
    "gate_proj": "mlp_gate", "w1": "mlp_gate", "wi_0": "mlp_gate",
    "up_proj": "mlp_up", "c_fc": "mlp_up", "dense_h_to_4h": "mlp_up", "fc1": "mlp_up", "fc_in": "mlp_up",
    "w3": "mlp_up", "up_proj_1": "mlp_up", "wi": "mlp_up", "wi_1": "mlp_up",
    "down_proj": "mlp_down", "dense_4h_to_h": "mlp_down", "fc2": "mlp_down", "fc_out": "mlp_down",
    "w2": "mlp_down",
    "gate_up_proj": "mlp_gate_up",
    "lm_head": "lm_head", "embed_out": "lm_head",
    "embed_tokens": "embed", "wte": "embed", "embed_in": "embed", "word_embeddings": "embed",
}
# leaves whose meaning depends on the block they sit in: GPT-2 ``attn.c_proj`` / ``mlp.c_proj``, NeoX/Phi
# ``attention.dense``, InternLM2 ``attention.wo`` / T5 ``DenseReluDense.wo``; the value is the type outside a
# recognised block
_CONTEXT_LEAVES = {"c_proj": "other", "dense": "other", "proj": "other", "out": "other", "wo": "mlp_down"}
# path components (other than the layer itself) that mark a block as attention / MLP
_ATTN_PARTS = re.compile(r"(attn|attention|mixer)", re.I)
_MLP_PARTS = re.compile(r"(mlp|feed_?forward|ffn|moe|experts)", re.I)
_SHARED = {"attn_q": "attn_in", "attn_k": "attn_in", "attn_v": "attn_in", "attn_qkv": "attn_in",
           "attn_o": "attn_out", "mlp_gate": "mlp_in", "mlp_up": "mlp_in", "mlp_gate_up": "mlp_in",
           "mlp_down": "mlp_out"}


def _block_kind(parents: list[str]) -> str | None:
    """``"attn"`` / ``"mlp"`` for the nearest enclosing attention / MLP block, else None."""
    for part in reversed(parents):
        if _ATTN_PARTS.search(part):
            return "attn"
        if _MLP_PARTS.search(part):
            return "mlp"
    return None


def module_type(name: str) -> str:
    """Normalised type of a module from its dotted path.

    A known leaf name decides (``q_proj`` → ``attn_q``); a leaf whose meaning depends on its block (``c_proj``,
    ``dense``, ``wo`` …) is read in the nearest enclosing attention or MLP block; an unknown leaf inside such a
    block is ``attn_other`` / ``mlp_other``.

    Args:
        name: Module path, e.g. ``"model.layers.3.self_attn.o_proj"`` or ``"transformer.h.0.attn.c_proj"``.

    Returns:
        One of :data:`MODULE_TYPES`.

    Example:
        >>> module_type("transformer.h.0.mlp.c_proj"), module_type("gpt_neox.layers.1.attention.dense")
        ('mlp_down', 'attn_o')
    """
    parts = name.split(".")
    leaf = parts[-1].lower()
    block = _block_kind(parts[:-1])
    if leaf in _CONTEXT_LEAVES:
        return {"attn": "attn_o", "mlp": "mlp_down"}.get(block, _CONTEXT_LEAVES[leaf])
    if leaf in _LEAF_TYPES:
        return _LEAF_TYPES[leaf]
    return f"{block}_other" if block else "other"


def module_kind(name: str) -> str:
    """The coarse kind of a module: ``"attn"``, ``"mlp"`` or ``"other"`` (the family of its :func:`module_type`).

    Args:
        name: A module path, or a type of :data:`MODULE_TYPES`.
    """
    kind = (name if name in MODULE_TYPES else module_type(name)).split("_")[0]
    return kind if kind in ("attn", "mlp") else "other"


def shared_type(name: str) -> str:
    """The family-independent type of a module: ``attn_in``, ``attn_out``, ``mlp_in``, ``mlp_out`` or ``other``.

    Args:
        name: A module path (``"model.layers.0.self_attn.qkv_proj"``, ``"transformer.h.1.mlp.c_proj"`` …) or a
            normalised type of :data:`MODULE_TYPES` (``"attn_q"``, ``"mlp_down"`` …).

    Example:
        >>> [shared_type(n) for n in ("gpt_neox.layers.0.attention.query_key_value", "transformer.h.0.mlp.c_proj")]
        ['attn_in', 'mlp_out']
    """
    kind = name if name in MODULE_TYPES else module_type(name)
    return _SHARED.get(kind, "other")


def module_role(mtype: str) -> str | None:
    """``"write"`` (output lands in the residual stream), ``"read"`` (input is the residual stream) or None."""
    return "write" if mtype in WRITE_TYPES else "read" if mtype in READ_TYPES else None


def layer_index(name: str) -> int | None:
    """The transformer block index in a module path (its first all-digit component), or None."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def hf_model(model):
    """The causal LM under peft's wrappers: a ``PeftModel``'s base model, a ``LoraModel``'s (peft's tuner)
    ``.model``; any other model as it is. Module names of :func:`lora_layers` are relative to it, and its
    ``forward`` signature says what the model takes."""
    from peft.tuners.tuners_utils import BaseTuner

    for _ in range(4):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(model, BaseTuner) and isinstance(getattr(model, "model", None), torch.nn.Module):
            # a tuner only: peft also sets ``peft_config`` on the causal LM it wraps, whose ``.model`` is the body
            model = model.model
        else:
            break
    return model


def adapters_of(layer) -> set[str]:
    """The adapter names one LoRA layer carries (Linear/Conv1D ``lora_A`` and Embedding ``lora_embedding_A``)."""
    return set(getattr(layer, "lora_A", {}).keys()) | set(getattr(layer, "lora_embedding_A", {}).keys())


def lora_layers(model, adapter_name: str | None = None) -> dict[str, LoraLayer]:
    """Every LoRA layer of a model, by name relative to the unwrapped Hugging Face model, in model order.

    Args:
        model: A ``peft.PeftModel``, a ``LoraModel`` or a model with LoRA layers injected.
        adapter_name: Only the layers that carry this adapter (None: every LoRA layer).

    Returns:
        ``{module name: LoraLayer}``.

    Raises:
        ConfigError: The model has no LoRA layers, or no layer carries ``adapter_name`` (the message lists the
            adapters that are loaded).
    """
    layers = {name: mod for name, mod in hf_model(model).named_modules() if isinstance(mod, LoraLayer)}
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no LoRA layers: pass a peft.PeftModel with a LoRA adapter "
                          "(PeftModel.from_pretrained(base, adapter_dir) or get_peft_model(base, LoraConfig(...)))")
    if adapter_name is None:
        return layers
    found = {name: layer for name, layer in layers.items() if adapter_name in adapters_of(layer)}
    if not found:
        available = set().union(*(adapters_of(layer) for layer in layers.values()))
        raise ConfigError(f"adapter_name={adapter_name!r} is not loaded; available adapters: {sorted(available)}")
    return found
