"""Singular directions of ΔW read as vocabulary: write-side modules through the final norm and the unembedding,
read-side modules through the block's input norm and the embedding (:func:`read_directions`,
:func:`directions_table`)."""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd
import torch
from torch import nn

from lora_lens.errors import ConfigError
from lora_lens.lab.modules import READ_TYPES, WRITE_TYPES, hf_model, lora_layers
from lora_lens.lens.delta.factors import DTYPE, ModuleDelta, lora_modules, select_module

__all__ = ["Direction", "directions_table", "final_norm", "read_directions"]


# ---------------------------------------------------------------------------------------------------------------
# Reading directions as words
# ---------------------------------------------------------------------------------------------------------------


class Direction(NamedTuple):
    """One singular direction of ΔW read as vocabulary.

    Attributes:
        index: Direction index (0 = largest singular value).
        sigma: Its singular value.
        tokens: The ``top`` tokens (strings with a tokenizer, else token ids), best first.
        scores: Their scores (logit contribution of the unit direction for write-side modules, alignment with the
            normalised embedding for read-side modules).
        sign: ``"+"`` or ``"-"``: which sign of the (sign-arbitrary) singular vector was read.
        via: ``"unembedding"`` (write side, left singular vector u) or ``"embedding"`` (read side, right singular
            vector v).
    """

    index: int
    sigma: float
    tokens: list
    scores: list[float]
    sign: str
    via: str


_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm", "ln_out")
_ATTN_NORMS = ("input_layernorm", "ln_1", "attention_norm", "ln_attn", "pre_attention_layernorm", "norm1",
               "self_attn_layer_norm")
_MLP_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "ffn_norm", "ln_mlp", "norm2",
              "final_layer_norm")


def _plain(module):
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _gain_center(norm) -> tuple[torch.Tensor | None, bool]:
    """A norm's elementwise gain (None when it has none) and whether it centres (LayerNorm vs RMSNorm)."""
    if norm is None:
        return None, False
    cls = type(norm).__name__
    w = getattr(norm, "weight", None)
    g = None if not isinstance(w, torch.Tensor) else w.detach().to(DTYPE).cpu()
    if g is not None and "gemma" in cls.lower():
        g = 1.0 + g                                   # Gemma's RMSNorm scales by (1 + weight)
    center = isinstance(norm, nn.LayerNorm) or ("LayerNorm" in cls and "RMS" not in cls)
    return g, center


def _apply_norm(x: torch.Tensor, g, center: bool, normalise: bool) -> torch.Tensor:
    """``g ⊙ n(x)`` on the last axis: centre (LayerNorm), optionally scale to unit RMS, multiply by the gain."""
    if center:
        x = x - x.mean(dim=-1, keepdim=True)
    if normalise:
        x = x / x.pow(2).mean(dim=-1, keepdim=True).clamp_min(1e-12).sqrt()
    return x * g if g is not None else x


def final_norm(model):
    """The final norm before the unembedding (``norm``, ``ln_f``, ``final_layer_norm`` …), or None."""
    hf = hf_model(model)
    inner = getattr(hf, "base_model", hf)
    for obj in (inner, hf):
        for name in _FINAL_NORMS:
            m = getattr(obj, name, None)
            if isinstance(m, nn.Module):
                return m
    return None


def _pre_norm(hf, d: ModuleDelta):
    """The norm whose output module ``d`` reads (the block's attention or MLP input norm), or None."""
    if d.layer is None:
        return None
    parts = d.name.split(".")
    block_path = ".".join(parts[:parts.index(str(d.layer)) + 1])
    try:
        block = hf.get_submodule(block_path)
    except AttributeError:
        return None
    order = _ATTN_NORMS if d.module_type.startswith("attn_") else _MLP_NORMS + _ATTN_NORMS
    for name in order:
        m = getattr(block, name, None)
        if isinstance(m, nn.Module):
            return m
    return None


def _token_strings(tokenizer, ids: list[int]) -> list:
    if tokenizer is None:
        return ids
    return [tokenizer.decode([i]).strip() or tokenizer.convert_ids_to_tokens(i) for i in ids]


@torch.no_grad()
def read_directions(peft_model, module, k: int = 3, top: int = 10, tokenizer=None, sign: str = "auto",
                    through_norm: bool = True, adapter_name: str = "default") -> list[Direction]:
    """Read the leading singular directions of one module's ΔW as tokens.

    * **Write-side** modules (attention output ``o_proj``/``c_proj``/``dense``, MLP ``down_proj``/``c_proj``/
      ``dense_4h_to_h``) add ``σ (vᵀx) u`` to the residual stream: the left singular vector u is read like the logit
      lens, ``scores = W_U · (g ⊙ c(u))`` with ``W_U`` the unembedding (``get_output_embeddings()``, tied or not),
      ``g`` the final norm's gain and ``c`` its centring (LayerNorm only; the norm's positive scale and its bias do
      not change which tokens rank first).
    * **Read-side** modules (q/k/v/qkv, gate/up/gate_up) respond to ``vᵀx`` where x is the block's normalised
      input: the right singular vector v is scored against what each token's embedding looks like after that norm,
      ``scores_t = (g ⊙ n(E_t)) · v`` (``E`` = ``get_input_embeddings()``, ``n`` = centre + unit RMS).

    The sign of a singular vector is arbitrary (``σ u vᵀ = σ (−u)(−v)ᵀ``); which sign a given input activates is
    decided by ``vᵀx``. ``sign="auto"`` reads the sign whose best token stands out most from the vocabulary mean,
    ``"both"`` returns both readings.

    Args:
        peft_model: Model with a LoRA adapter (the readout matrices come from its base model).
        module: Module name (unique suffix is enough) or a :class:`ModuleDelta` of this model.
        k: Number of leading directions.
        top: Tokens per direction.
        tokenizer: To turn token ids into strings (None returns ids).
        sign: ``"auto"``, ``"+"``, ``"-"`` or ``"both"``.
        through_norm: Apply the norm's gain/centring (False: raw ``W_U·u`` / ``E·v``).
        adapter_name: Adapter to read.

    Returns:
        A list of :class:`Direction` ``(index, sigma, tokens, scores, sign, via)``, by direction then sign.

    Raises:
        ConfigError: Unknown module, sign or k/top, a module that is neither write- nor read-side, or a module whose
            residual-side dimension does not match the embedding width.
    """
    if sign not in ("auto", "+", "-", "both"):
        raise ConfigError(f"sign={sign!r} must be 'auto', '+', '-' or 'both'")
    if k < 1 or top < 1:
        raise ConfigError(f"k={k}, top={top}: both must be ≥ 1")
    hf = hf_model(peft_model)
    if isinstance(module, ModuleDelta):
        d = module
    else:
        names = list(lora_layers(peft_model))
        target = select_module([_NameOnly(n) for n in names], module).name
        d = lora_modules(peft_model, adapter_name, names=[target])[0]
    role = d.role
    if role is None:
        raise ConfigError(f"module {d.name!r} has type {d.module_type!r}, neither write-side ({sorted(WRITE_TYPES)}) "
                          f"nor read-side ({sorted(READ_TYPES)}): it has no residual-stream reading")
    U, S, Vh = d.svd()
    if role == "write":
        out_emb = hf.get_output_embeddings()
        if out_emb is None:
            raise ConfigError(f"{type(hf).__name__} has no output embeddings (get_output_embeddings() is None): "
                              "write-side directions need an LM head")
        readout = _plain(out_emb).weight.detach().to(DTYPE).cpu()           # [vocab, d]
        g, center = _gain_center(final_norm(hf)) if through_norm else (None, False)
        vecs, via = U.T.cpu(), "unembedding"                                 # [k, d]
        width = d.shape[0]
    else:
        emb = _plain(hf.get_input_embeddings()).weight.detach().to(DTYPE).cpu()   # [vocab, d]
        g, center = _gain_center(_pre_norm(hf, d)) if through_norm else (None, False)
        readout = _apply_norm(emb, g, center, normalise=True) if through_norm else emb
        g, center = None, False                       # already folded into the readout
        vecs, via = Vh.cpu(), "embedding"
        width = d.shape[1]
    if width != readout.shape[1]:
        raise ConfigError(f"module {d.name!r} ({role}-side) has residual dimension {width} but the "
                          f"{via} has width {readout.shape[1]}: it does not act on the residual stream")
    result = []
    for idx in range(min(k, vecs.shape[0])):
        v = _apply_norm(vecs[idx], g, center, normalise=False)
        s = readout @ v
        signs = ["+", "-"] if sign == "both" else [sign]
        if sign == "auto":
            c = s - s.mean()
            signs = ["+" if c.max() >= (-c).max() else "-"]
        for sg in signs:
            sc = s if sg == "+" else -s
            vals, ids = torch.topk(sc, min(top, sc.numel()))
            result.append(Direction(idx, float(S[idx]), _token_strings(tokenizer, ids.tolist()),
                                    [float(x) for x in vals], sg, via))
    return result


class _NameOnly:
    """Stand-in with a ``name`` so :func:`select_module` can resolve a module name without extracting weights."""

    def __init__(self, name: str):
        self.name = name


def directions_table(peft_model, tokenizer=None, k: int = 1, top: int = 10, role: str | None = "write",
                     sign: str = "both", through_norm: bool = True, adapter_name: str = "default") -> pd.DataFrame:
    """:func:`read_directions` for every adapted module of a role, as one long table.

    Args:
        peft_model: Model with a LoRA adapter.
        tokenizer: To turn ids into strings (None keeps ids).
        k: Leading directions per module.
        top: Tokens per direction.
        role: ``"write"``, ``"read"`` or None for both.
        sign: See :func:`read_directions` (default ``"both"``: an edit's new value usually sits on one sign and the
            old value on the other).
        through_norm: See :func:`read_directions`.
        adapter_name: Adapter to read.

    Returns:
        DataFrame ``module, layer, module_type, role, direction, sigma, sign, rank, token, score``
        (``rank`` 0 = top token of that direction and sign).

    Raises:
        ConfigError: Unknown role.
    """
    if role not in ("write", "read", None):
        raise ConfigError(f"role={role!r} must be 'write', 'read' or None")
    rows = []
    for d in lora_modules(peft_model, adapter_name):
        if d.role is None or (role is not None and d.role != role):
            continue
        for dirn in read_directions(peft_model, d, k, top, tokenizer, sign, through_norm, adapter_name):
            for rank, (tok, score) in enumerate(zip(dirn.tokens, dirn.scores)):
                rows.append({"module": d.name, "layer": d.layer, "module_type": d.module_type, "role": d.role,
                             "direction": dirn.index, "sigma": dirn.sigma, "sign": dirn.sign, "rank": rank,
                             "token": tok, "score": score})
    cols = ["module", "layer", "module_type", "role", "direction", "sigma", "sign", "rank", "token", "score"]
    return pd.DataFrame(rows, columns=cols)
