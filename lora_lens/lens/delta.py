"""Weight space: what a LoRA adapter changed, read from its low-rank factors.

For every module a LoRA adapter touches, ``lora_modules`` extracts the factors ``B`` (out×r) and ``A`` (r×in), the
scaling (``alpha/r``, or ``alpha/√r`` with rsLoRA, read from the layer itself) and the base weight ``W``, all in the
``[out, in]`` orientation of ``nn.Linear`` — GPT-2's ``Conv1D`` stores ``W`` as ``[in, out]`` (peft's
``fan_in_fan_out``); it is transposed here, so ``W`` and ``ΔW = scaling · B @ A`` always line up.

From there:

* :func:`factor_svd` — the exact singular triplets of ``ΔW`` from the factors (QR of ``B`` and ``Aᵀ``, then an r×r
  SVD), never forming or decomposing the dense matrix.
* :func:`summary` — one row per module: ‖ΔW‖_F, ‖ΔW‖₂ (absolute and relative to ‖W‖), singular values, effective
  rank, stable rank, amplification factor and intruder dimensions; :func:`energy_by` aggregates the share of update
  energy (‖ΔW‖_F²) per layer, relative-depth bin or module type.
* :func:`phi` / :func:`phi_grid` / :func:`phi_table` — subspace similarity between two adapters (Hu et al. 2021, §7).
* :func:`amplification_factor` / :func:`amplification` — ‖ΔW‖_F / ‖UᵀWVᵀ‖_F (Hu et al. 2021, Table 7).
* :func:`intruder_dimensions` — singular vectors of W+ΔW unlike all of W's (Shuttleworth et al. 2024).
* :func:`read_directions` / :func:`directions_table` — singular directions read as vocabulary: write-side modules
  (attention output, MLP down) through the final norm and the unembedding, read-side modules (q/k/v, gate/up)
  through the embedding.

Everything is computed in float32 without autograd, on ``device`` (CPU by default).

Limitations:
    * **DoRA**: ``ΔW`` here is ``scaling · B @ A`` only; the magnitude vector that DoRA applies after normalising the
      columns of ``W + ΔW`` is ignored (rows are flagged ``dora=True`` and a warning is issued).
    * LoRA biases (``lora_bias=True``) and non-linear-layer LoRA (Conv2d …) are not part of ``ΔW``; convolution
      layers are skipped with a warning. LoRA on an embedding is supported: its ``[out, in]`` orientation is
      ``[hidden, vocab]`` (the embedding as a linear map of one-hot inputs).
    * A merged adapter is handled (its ΔW is subtracted from the stored weight to recover ``W``); any *other* merged
      adapter stays part of ``W``.

Example:
    >>> from peft import LoraConfig, get_peft_model                                    # doctest: +SKIP
    >>> pm = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))        # doctest: +SKIP
    >>> df = summary(pm)                                                                # doctest: +SKIP
    >>> energy_by(df, "module_type")                                                    # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from lora_lens.errors import ConfigError, MismatchError

DTYPE = torch.float32

# ---------------------------------------------------------------------------------------------------------------
# Module naming: layer index and normalised module type
# ---------------------------------------------------------------------------------------------------------------

MODULE_TYPES = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_o", "mlp_gate", "mlp_up", "mlp_gate_up",
                "mlp_down", "embed", "lm_head", "other")
"""Normalised module types (``other`` for anything unrecognised)."""

WRITE_TYPES = frozenset({"attn_o", "mlp_down"})
"""Module types whose output is written into the residual stream (read through the unembedding)."""

READ_TYPES = frozenset({"attn_q", "attn_k", "attn_v", "attn_qkv", "mlp_gate", "mlp_up", "mlp_gate_up"})
"""Module types that read the (normalised) residual stream (read through the embedding)."""

_LEAF_TYPES = {
    # llama / qwen2 / mistral / yi / phi3 / opt / falcon / mixtral / bloom / mpt / baichuan …
    "q_proj": "attn_q", "query": "attn_q", "wq": "attn_q",
    "k_proj": "attn_k", "key": "attn_k", "wk": "attn_k",
    "v_proj": "attn_v", "value": "attn_v", "wv": "attn_v",
    "o_proj": "attn_o", "out_proj": "attn_o",
    "qkv_proj": "attn_qkv", "c_attn": "attn_qkv", "query_key_value": "attn_qkv", "wqkv": "attn_qkv",
    "w_pack": "attn_qkv",
    "gate_proj": "mlp_gate", "w1": "mlp_gate",
    "up_proj": "mlp_up", "c_fc": "mlp_up", "dense_h_to_4h": "mlp_up", "fc1": "mlp_up", "fc_in": "mlp_up",
    "w3": "mlp_up", "up_proj_1": "mlp_up",
    "down_proj": "mlp_down", "dense_4h_to_h": "mlp_down", "fc2": "mlp_down", "fc_out": "mlp_down",
    "w2": "mlp_down",
    "gate_up_proj": "mlp_gate_up",
    "lm_head": "lm_head", "embed_out": "lm_head",
    "embed_tokens": "embed", "wte": "embed", "embed_in": "embed", "word_embeddings": "embed",
}
# leaves whose meaning depends on the parent: GPT-2 ``attn.c_proj`` / ``mlp.c_proj``, NeoX/Phi ``attention.dense``
_CONTEXT_LEAVES = {"c_proj", "dense", "proj", "out"}
_ATTN_PARENTS = ("attn", "attention", "self_attn", "self_attention", "mixer")
_MLP_PARENTS = ("mlp", "feed_forward", "ffn", "feedforward")


def module_type(name: str) -> str:
    """Normalised type of a module from its dotted path.

    Args:
        name: Module path, e.g. ``"model.layers.3.self_attn.o_proj"`` or ``"transformer.h.0.attn.c_proj"``.

    Returns:
        One of :data:`MODULE_TYPES` (``attn_q``, ``attn_k``, ``attn_v``, ``attn_qkv``, ``attn_o``, ``mlp_gate``,
        ``mlp_up``, ``mlp_gate_up``, ``mlp_down``, ``embed``, ``lm_head``, ``other``).

    Example:
        >>> module_type("transformer.h.0.mlp.c_proj"), module_type("gpt_neox.layers.1.attention.dense")
        ('mlp_down', 'attn_o')
    """
    parts = name.split(".")
    leaf = parts[-1].lower()
    if leaf in _CONTEXT_LEAVES and len(parts) > 1:
        parent = parts[-2].lower()
        if parent in _ATTN_PARENTS:
            return "attn_o"
        if parent in _MLP_PARENTS:
            return "mlp_down"
        return "other"
    return _LEAF_TYPES.get(leaf, "other")


def layer_index(name: str) -> int | None:
    """The transformer block index in a module path (its first all-digit component), or None."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _role(mtype: str) -> str | None:
    return "write" if mtype in WRITE_TYPES else "read" if mtype in READ_TYPES else None


# ---------------------------------------------------------------------------------------------------------------
# Exact SVD from the factors
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def factor_svd(B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0):
    """Exact thin SVD of ``ΔW = scaling · B @ A`` from the factors, without forming ``ΔW``.

    ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (reduced QR), so ``ΔW = Q_B (scaling · R_B R_Aᵀ) Q_Aᵀ``; the small core
    ``M = scaling · R_B R_Aᵀ`` (r×r) has the SVD ``U_m S V_mᵀ``, hence ``U = Q_B U_m`` and ``Vh = V_mᵀ Q_Aᵀ``.
    Cost O((out + in)·r²) instead of O(out·in·min(out, in)) for the dense SVD.

    Args:
        B: ``[out, r]`` factor (peft's ``lora_B.weight``).
        A: ``[r, in]`` factor (peft's ``lora_A.weight``).
        scaling: The adapter scaling (``alpha/r``, or ``alpha/√r`` for rsLoRA).

    Returns:
        ``(U, S, Vh)``: ``U`` ``[out, k]`` and ``Vh`` ``[k, in]`` with orthonormal columns / rows, ``S`` ``[k]``
        descending and non-negative, ``k = min(r, out, in)``, all float32. Directions with σ = 0 (a rank-deficient
        update) are still orthonormal but otherwise arbitrary.

    Raises:
        ConfigError: The factors are not matrices or their inner dimensions differ.

    Example:
        >>> B, A = torch.randn(6, 2), torch.randn(2, 5)
        >>> U, S, Vh = factor_svd(B, A, 0.5)
        >>> bool(torch.allclose(U * S @ Vh, 0.5 * B @ A, atol=1e-5))
        True
    """
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ConfigError(f"factor_svd needs B [out, r] and A [r, in]; got B {tuple(B.shape)} and A "
                          f"{tuple(A.shape)}: pass lora_B.weight and lora_A.weight of the same adapter")
    B = B.detach().to(DTYPE)
    A = A.detach().to(DTYPE)
    qb, rb = torch.linalg.qr(B)                       # [out, kb], [kb, r]
    qa, ra = torch.linalg.qr(A.T)                     # [in, ka], [ka, r]
    core = float(scaling) * (rb @ ra.T)               # [kb, ka]
    um, s, vmh = torch.linalg.svd(core, full_matrices=False)
    return qb @ um, s, vmh @ qa.T


def effective_rank(s: torch.Tensor | Sequence[float]) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): ``exp(H(p))`` with ``p = σ / Σσ``.

    Equals k for k equal non-zero singular values and 1 for a rank-1 matrix; 0.0 for an all-zero spectrum.
    """
    s = torch.as_tensor(s, dtype=torch.float64).clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(s: torch.Tensor | Sequence[float]) -> float:
    """Stable rank ``‖·‖_F² / ‖·‖₂² = Σσ² / σ_max²`` (0.0 for an all-zero spectrum)."""
    s = torch.as_tensor(s, dtype=torch.float64)
    top = s.abs().max() if s.numel() else torch.tensor(0.0)
    return float((s ** 2).sum() / top ** 2) if top > 0 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ModuleDelta:
    """The update one LoRA adapter makes to one module, in ``[out, in]`` orientation.

    Attributes:
        name: Module path in the (unwrapped) Hugging Face model, e.g. ``"model.layers.0.self_attn.q_proj"``.
        layer: Transformer block index parsed from the name (None for embeddings / the LM head).
        module_type: Normalised type (see :func:`module_type`).
        depth: Relative depth ``layer / (n_layers - 1)`` in [0, 1] (NaN without a layer; 0.0 with one layer).
        B: ``[out, r]`` float32 factor.
        A: ``[r, in]`` float32 factor.
        scaling: ``layer.scaling[adapter]`` (``alpha/r`` or ``alpha/√r`` for rsLoRA).
        W: Base weight, ``[out, in]`` float32 (transposed from the stored ``[in, out]`` for ``fan_in_fan_out``).
        adapter: Adapter name.
        fan_in_fan_out: Whether the stored base weight is ``[in, out]`` (GPT-2 ``Conv1D``).
        dora: Whether the adapter is DoRA (whose magnitude vector ΔW here ignores).
    """

    name: str
    layer: int | None
    module_type: str
    depth: float
    B: torch.Tensor
    A: torch.Tensor
    scaling: float
    W: torch.Tensor
    adapter: str = "default"
    fan_in_fan_out: bool = False
    dora: bool = False
    _svd: tuple | None = field(default=None, repr=False)
    _w_svd: tuple | None = field(default=None, repr=False)

    @property
    def rank(self) -> int:
        """The adapter rank r."""
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)``."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def role(self) -> str | None:
        """``"write"`` (output lands in the residual stream), ``"read"`` (input is the residual stream) or None."""
        return _role(self.module_type)

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """The dense ``ΔW = scaling · B @ A``, ``[out, in]`` float32."""
        return self.scaling * (self.B @ self.A)

    def svd(self):
        """Exact ``(U, S, Vh)`` of ΔW from the factors (cached); see :func:`factor_svd`."""
        if self._svd is None:
            self._svd = factor_svd(self.B, self.A, self.scaling)
        return self._svd

    @torch.no_grad()
    def w_svd(self):
        """Thin SVD ``(U, S, Vh)`` of the base weight W (cached; a dense SVD, the costly part of a summary)."""
        if self._w_svd is None:
            self._w_svd = torch.linalg.svd(self.W, full_matrices=False)
        return self._w_svd


def _hf_model(model):
    """The Hugging Face model inside a PeftModel / LoraModel (or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    if type(model).__name__ == "LoraModel" and hasattr(model, "model"):
        return model.model
    return model


def _n_layers(hf) -> int | None:
    cfg = getattr(hf, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        try:
            cfg = cfg.get_text_config()
        except Exception:  # noqa: BLE001 - some configs raise for odd layouts; fall back to the top-level config
            pass
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _lora_layers(model):
    """Yield ``(name, layer)`` for every LoRA layer, names relative to the unwrapped HF model."""
    from peft.tuners.lora import LoraLayer

    hf = _hf_model(model)
    for name, mod in hf.named_modules():
        if isinstance(mod, LoraLayer):
            yield name, mod


def _adapters_of(layer) -> set[str]:
    return set(getattr(layer, "lora_A", {}).keys()) | set(getattr(layer, "lora_embedding_A", {}).keys())


def _base_weight(layer) -> torch.Tensor:
    base = layer.get_base_layer()
    try:
        from peft.utils.integrations import dequantize_module_weight

        return dequantize_module_weight(base)
    except Exception:  # noqa: BLE001 - older peft / unusual layers: the plain weight is what we need
        return base.weight


@torch.no_grad()
def lora_modules(peft_model, adapter_name: str = "default", device: str | torch.device = "cpu",
                 names: Iterable[str] | None = None) -> list[ModuleDelta]:
    """Extract every module's LoRA update from a model carrying a LoRA adapter.

    Args:
        peft_model: A ``peft.PeftModel`` with a LoRA adapter (e.g. ``PeftModel.from_pretrained(base, adapter_dir)``
            or ``get_peft_model(base, LoraConfig(...))``), a ``LoraModel``, or a model with LoRA layers injected.
        adapter_name: Which adapter to read.
        device: Where the float32 copies of the factors and base weights live.
        names: Optional module names to extract (default: all).

    Returns:
        One :class:`ModuleDelta` per adapted Linear / Conv1D / Embedding module, in model order.

    Raises:
        ConfigError: The model has no LoRA layers, or no adapter called ``adapter_name``.
    """
    layers = list(_lora_layers(peft_model))
    if not layers:
        raise ConfigError(f"{type(peft_model).__name__} has no LoRA layers: pass a peft.PeftModel with a LoRA "
                          "adapter (PeftModel.from_pretrained(base, adapter_dir) or "
                          "get_peft_model(base, LoraConfig(...)))")
    available = set().union(*(_adapters_of(layer) for _, layer in layers))
    if adapter_name not in available:
        raise ConfigError(f"adapter_name={adapter_name!r} is not loaded; available adapters: {sorted(available)}")
    wanted = None if names is None else set(names)
    hf = _hf_model(peft_model)
    n_layers = _n_layers(hf)
    found, skipped = [], []
    for name, layer in layers:
        if wanted is not None and name not in wanted:
            continue
        if adapter_name in getattr(layer, "lora_A", {}):
            A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            if A.dim() != 2 or B.dim() != 2:
                skipped.append(name)
                continue
            fan = bool(getattr(layer, "fan_in_fan_out", False))
        elif adapter_name in getattr(layer, "lora_embedding_A", {}):
            # embedding as a linear map of one-hot inputs: ΔW [hidden, vocab] = B [hidden, r] @ A [r, vocab]
            A, B = layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]
            fan = True
        else:
            continue
        A = A.detach().to(device=device, dtype=DTYPE).clone()
        B = B.detach().to(device=device, dtype=DTYPE).clone()
        scaling = float(layer.scaling[adapter_name])
        W = _base_weight(layer).detach().to(device=device, dtype=DTYPE)
        W = (W.T if fan else W).clone()
        if W.shape != (B.shape[0], A.shape[1]):
            skipped.append(name)
            continue
        if adapter_name in getattr(layer, "merged_adapters", []):
            W -= scaling * (B @ A)
        dora = bool(getattr(layer, "use_dora", {}).get(adapter_name, False))
        li = layer_index(name)
        depth = float("nan") if li is None else (li / (n_layers - 1) if n_layers and n_layers > 1 else 0.0)
        found.append(ModuleDelta(name=name, layer=li, module_type=module_type(name), depth=depth, B=B, A=A,
                                 scaling=scaling, W=W, adapter=adapter_name, fan_in_fan_out=fan, dora=dora))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} LoRA module(s) that are not linear maps (e.g. {skipped[0]}): "
                      "delta analysis covers Linear, Conv1D and Embedding layers", stacklevel=2)
    if any(d.dora for d in found):
        warnings.warn("this is a DoRA adapter: ΔW = scaling·B@A here ignores DoRA's magnitude vector, so norms "
                      "and spectra describe the direction update only", stacklevel=2)
    return found


def _deltas(target, adapter_name: str = "default", device="cpu") -> list[ModuleDelta]:
    if isinstance(target, ModuleDelta):
        return [target]
    if isinstance(target, (list, tuple)) and all(isinstance(d, ModuleDelta) for d in target):
        if not target:
            raise ConfigError("the list of ModuleDelta is empty: pass lora_modules(peft_model)")
        return list(target)
    return lora_modules(target, adapter_name, device=device)


def _select(deltas: list[ModuleDelta], module) -> ModuleDelta:
    if isinstance(module, ModuleDelta):
        return module
    if not isinstance(module, str) or not module:
        raise ConfigError(f"module={module!r} must be a module name (e.g. {deltas[0].name!r}) or a ModuleDelta")
    exact = [d for d in deltas if d.name == module]
    hits = exact or [d for d in deltas if d.name.endswith("." + module)]
    if len(hits) == 1:
        return hits[0]
    names = [d.name for d in deltas]
    if not hits:
        raise ConfigError(f"module={module!r} is not an adapted module; adapted modules are "
                          f"{names[:6]}{' …' if len(names) > 6 else ''} ({len(names)} in all)")
    raise ConfigError(f"module={module!r} is ambiguous: it matches {[d.name for d in hits][:6]}; give more of "
                      "the path (e.g. 'layers.0.self_attn.o_proj')")


# ---------------------------------------------------------------------------------------------------------------
# Amplification and intruder dimensions
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _projection_norm(d: ModuleDelta) -> float:
    U, _, Vh = d.svd()
    return float(torch.linalg.matrix_norm(U.T @ d.W @ Vh.T))


def amplification_factor(delta: ModuleDelta) -> float:
    """Hu et al. (2021, Table 7) amplification factor ``‖ΔW‖_F / ‖UᵀWVᵀ‖_F`` of one module.

    ``U`` (out×r) and ``Vᵀ`` (in×r) are the top-r left and right singular vectors of ΔW: ``UᵀWVᵀ`` is W projected
    onto ΔW's r-dimensional subspaces. A large factor means ΔW amplifies directions that W barely uses.

    Returns:
        The factor (``inf`` when W has no component in ΔW's subspaces; 0.0 when ΔW = 0).
    """
    _, S, _ = delta.svd()
    num = float(torch.linalg.vector_norm(S))
    den = _projection_norm(delta)
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


class Intruders(NamedTuple):
    """Intruder dimensions of one module: ``count``, their ``indices`` among the top-k, every top-k ``max_cos``."""

    count: int
    indices: list[int]
    max_cos: list[float]


@torch.no_grad()
def intruder_dimensions(delta: ModuleDelta, k: int = 10, epsilon: float = 0.5, side: str = "left") -> Intruders:
    """Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence").

    Their Algorithm 1: take the top-k singular vectors of the fine-tuned ``W + ΔW``; one is an intruder when its
    largest cosine similarity with *all* singular vectors of the pre-trained ``W`` is below ``epsilon``. The paper
    uses the left singular vectors and k = 10 and sweeps ε (intruder counts are shown over a range of ε); the defaults
    here, k = 10 and ε = 0.5, are also the defaults of peft's ``reduce_intruder_dimension``. The cosine is taken in
    absolute value because the sign of a singular vector is arbitrary.

    Args:
        delta: One module's update.
        k: How many leading singular vectors of ``W + ΔW`` to examine (clipped to ``min(out, in)``).
        epsilon: Similarity threshold in (0, 1].
        side: ``"left"`` (paper; output space) or ``"right"`` (input space).

    Returns:
        :class:`Intruders` (count, indices among the top-k, max |cos| of each top-k vector).

    Raises:
        ConfigError: k < 1, epsilon outside (0, 1], or an unknown side.
    """
    if k < 1 or not 0 < epsilon <= 1:
        raise ConfigError(f"k={k}, epsilon={epsilon}: need k ≥ 1 and 0 < epsilon ≤ 1 (paper defaults k=10, "
                          "epsilon≈0.5)")
    if side not in ("left", "right"):
        raise ConfigError(f"side={side!r} must be 'left' (paper) or 'right'")
    U0, _, V0h = delta.w_svd()
    Ut, _, Vth = torch.linalg.svd(delta.W + delta.delta(), full_matrices=False)
    k = min(k, Ut.shape[1])
    if side == "left":
        cos = (Ut[:, :k].T @ U0).abs().max(dim=1).values
    else:
        cos = (Vth[:k] @ V0h.T).abs().max(dim=1).values
    idx = [int(i) for i in torch.nonzero(cos < epsilon).flatten()]
    return Intruders(len(idx), idx, [float(c) for c in cos])


# ---------------------------------------------------------------------------------------------------------------
# Summary table and aggregation
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def summary(peft_model, adapter_name: str = "default", intruders: bool = True, k: int = 10, epsilon: float = 0.5,
            device: str | torch.device = "cpu") -> pd.DataFrame:
    """One row per adapted module: norms, spectrum, ranks, amplification, intruder dimensions.

    Args:
        peft_model: A model with a LoRA adapter, or a list of :class:`ModuleDelta` from :func:`lora_modules`.
        adapter_name: Which adapter.
        intruders: Count intruder dimensions (needs a dense SVD of ``W + ΔW`` per module; set False to skip).
        k: Intruder top-k.
        epsilon: Intruder similarity threshold.
        device: Device for the computation.

    Returns:
        DataFrame with columns ``module, layer, depth, module_type, role, rank, out_features, in_features, scaling,
        dora, fro, spec, w_fro, w_spec, rel_fro, rel_spec, energy, energy_share, effective_rank, stable_rank,
        proj_fro, amplification, intruders, singular_values``. ``fro``/``spec`` are ‖ΔW‖_F/‖ΔW‖₂, ``rel_*`` divide
        by ‖W‖_F/‖W‖₂, ``energy`` = ‖ΔW‖_F², ``energy_share`` its share of the adapter's total (NaN when ΔW = 0
        everywhere), ``proj_fro`` = ‖UᵀWVᵀ‖_F, ``intruders`` a count (-1 when not computed), ``singular_values``
        a list of the r singular values of ΔW.
    """
    rows = []
    for d in _deltas(peft_model, adapter_name, device):
        _, S, _ = d.svd()
        _, SW, _ = d.w_svd()
        fro, spec = float(torch.linalg.vector_norm(S)), float(S[0]) if S.numel() else 0.0
        w_fro, w_spec = float(torch.linalg.vector_norm(SW)), float(SW[0])
        proj = _projection_norm(d)
        rows.append({
            "module": d.name, "layer": d.layer, "depth": d.depth, "module_type": d.module_type, "role": d.role,
            "rank": d.rank, "out_features": d.shape[0], "in_features": d.shape[1], "scaling": d.scaling,
            "dora": d.dora, "fro": fro, "spec": spec, "w_fro": w_fro, "w_spec": w_spec,
            "rel_fro": fro / w_fro if w_fro > 0 else math.nan, "rel_spec": spec / w_spec if w_spec > 0 else math.nan,
            "energy": fro ** 2, "effective_rank": effective_rank(S), "stable_rank": stable_rank(S),
            "proj_fro": proj, "amplification": amplification_factor(d),
            "intruders": intruder_dimensions(d, k, epsilon).count if intruders else -1,
            "singular_values": [float(x) for x in S],
        })
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")
    total = df["energy"].sum()
    df.insert(df.columns.get_loc("energy") + 1, "energy_share", df["energy"] / total if total > 0 else math.nan)
    return df


_NEEDED = ("module", "layer", "depth", "module_type", "energy")


def _check_summary(df) -> None:
    if not isinstance(df, pd.DataFrame) or any(c not in df.columns for c in _NEEDED):
        raise ConfigError(f"expected the DataFrame returned by summary(peft_model) (columns {list(_NEEDED)} …); "
                          f"got {type(df).__name__}")


def energy_by(df: pd.DataFrame, by: str = "layer", bins: int = 4) -> pd.DataFrame:
    """Share of update energy (‖ΔW‖_F²) per layer, relative-depth bin or module type.

    Args:
        df: The output of :func:`summary`.
        by: ``"layer"`` (also reports each layer's relative depth), ``"depth_bin"`` (``bins`` equal bins of
            relative depth over [0, 1], so models of different depth compare) or ``"module_type"``.
        bins: Number of depth bins for ``by="depth_bin"``.

    Returns:
        DataFrame with the group column, ``energy``, ``share`` (sums to 1; NaN when the adapter is all zero) and
        ``n_modules`` (plus ``depth`` for ``by="layer"``). Modules without a layer (embedding, LM head) form their
        own row (``layer``/``depth_bin`` = NA).

    Raises:
        ConfigError: Unknown ``by``, ``bins`` < 1, or not a summary table.
    """
    _check_summary(df)
    if by not in ("layer", "depth_bin", "module_type"):
        raise ConfigError(f"by={by!r} must be 'layer', 'depth_bin' or 'module_type'")
    if bins < 1:
        raise ConfigError(f"bins={bins} must be ≥ 1")
    work = df.copy()
    if by == "depth_bin":
        edges = np.linspace(0.0, 1.0, bins + 1)
        labels = [f"{a:.2f}–{b:.2f}" for a, b in zip(edges[:-1], edges[1:])]
        work["depth_bin"] = pd.cut(work["depth"], edges, labels=labels, include_lowest=True)
    agg = {"energy": ("energy", "sum"), "n_modules": ("module", "count")}
    if by == "layer":
        agg["depth"] = ("depth", "first")
    out = work.groupby(by, dropna=False, observed=False, sort=True).agg(**agg).reset_index()
    total = out["energy"].sum()
    out["share"] = out["energy"] / total if total > 0 else math.nan
    cols = [by] + (["depth"] if by == "layer" else []) + ["energy", "share", "n_modules"]
    return out[cols]


def amplification(target, by: str | None = None, adapter_name: str = "default"):
    """Amplification factor aggregated over modules, pooled: ``sqrt(Σ‖ΔW‖_F²) / sqrt(Σ‖UᵀWVᵀ‖_F²)``.

    Pooling treats the adapter as one block-diagonal update, so large modules weigh in proportion to their energy
    (the per-module factors are in ``summary(...)["amplification"]``).

    Args:
        target: A :func:`summary` DataFrame, a model with a LoRA adapter, or a list of :class:`ModuleDelta`.
        by: None for one number, or ``"layer"``, ``"module_type"`` for one per group.
        adapter_name: Adapter to read when ``target`` is a model.

    Returns:
        A float, or a DataFrame with the group column and ``amplification`` when ``by`` is given.
    """
    df = target if isinstance(target, pd.DataFrame) else summary(target, adapter_name, intruders=False)
    _check_summary(df)
    if by is None:
        den = float((df["proj_fro"] ** 2).sum())
        return math.sqrt(df["energy"].sum() / den) if den > 0 else math.inf
    if by not in ("layer", "module_type"):
        raise ConfigError(f"by={by!r} must be None, 'layer' or 'module_type'")
    g = df.groupby(by, dropna=False, sort=True)
    out = (g["energy"].sum() / (g["proj_fro"].apply(lambda x: float((x ** 2).sum())))).pow(0.5)
    return out.rename("amplification").reset_index()


# ---------------------------------------------------------------------------------------------------------------
# Subspace similarity between two adapters
# ---------------------------------------------------------------------------------------------------------------

_SIDES = ("right", "left", "A")


def _basis(d: ModuleDelta, side: str) -> torch.Tensor:
    if side == "left":
        return d.svd()[0]
    if side == "right":
        return d.svd()[2].T
    if side == "A":
        return torch.linalg.svd(d.A, full_matrices=False)[2].T
    raise ConfigError(f"side={side!r} must be one of {list(_SIDES)}")


def _check_pair(d1: ModuleDelta, d2: ModuleDelta) -> None:
    if d1.name != d2.name or d1.shape != d2.shape:
        raise MismatchError(f"cannot compare module {d1.name!r} {d1.shape} with module {d2.name!r} {d2.shape}: φ "
                            "compares the same module of two adapters on the same base model; pass the same "
                            "module name for both")


@torch.no_grad()
def phi(delta1: ModuleDelta, delta2: ModuleDelta, i: int = 1, j: int = 1, side: str = "right") -> float:
    """Normalised subspace similarity φ(i, j) = ‖U₁[:, :i]ᵀ U₂[:, :j]‖_F² / min(i, j) (Hu et al. 2021, §7).

    It is 1 when one top subspace contains the other and 0 when they are orthogonal.

    Args:
        delta1: A module's update from the first adapter (e.g. r = 8).
        delta2: The same module's update from the second adapter (e.g. r = 64, or another seed).
        i: Leading directions of ``delta1`` (1 ≤ i ≤ its rank).
        j: Leading directions of ``delta2``.
        side: Which singular vectors: ``"right"`` (default; ΔW's right singular vectors, the input side — the
            paper uses the right singular vectors of A, i.e. this side), ``"left"`` (ΔW's left singular vectors,
            the output side) or ``"A"`` (right singular vectors of the factor A alone, exactly as in the paper;
            same span as ``"right"`` when B has full rank but ordered by A's own spectrum).

    Returns:
        φ in [0, 1].

    Raises:
        MismatchError: The two updates are on different modules or shapes (the message names both).
        ConfigError: i or j out of range, or an unknown side.
    """
    _check_pair(delta1, delta2)
    b1, b2 = _basis(delta1, side), _basis(delta2, side)
    if not 1 <= i <= b1.shape[1] or not 1 <= j <= b2.shape[1]:
        raise ConfigError(f"i={i}, j={j} out of range: need 1 ≤ i ≤ {b1.shape[1]} and 1 ≤ j ≤ {b2.shape[1]} "
                          f"(the ranks of the two updates of {delta1.name})")
    m = b1[:, :i].T @ b2[:, :j]
    return float((m ** 2).sum() / min(i, j))


@torch.no_grad()
def phi_grid(m1, m2, module, max_i: int | None = None, max_j: int | None = None, side: str = "right",
             adapter_name: str = "default") -> np.ndarray:
    """φ(i, j) for all ``1 ≤ i ≤ max_i``, ``1 ≤ j ≤ max_j`` on one module: the LoRA paper's Figure 3 heatmap.

    Args:
        m1: First adapter: a model with LoRA, or a list of :class:`ModuleDelta`.
        m2: Second adapter (same base model).
        module: Module name (a unique suffix such as ``"layers.1.self_attn.q_proj"`` is enough) or a ModuleDelta.
        max_i: Rows (default: the first adapter's rank).
        max_j: Columns (default: the second adapter's rank).
        side: See :func:`phi`.
        adapter_name: Adapter to read from models.

    Returns:
        ``[max_i, max_j]`` float array; entry ``[i-1, j-1]`` is φ(i, j).

    Raises:
        MismatchError: The module is not adapted in the second adapter, or its shape differs.
    """
    d1s, d2s = _deltas(m1, adapter_name), _deltas(m2, adapter_name)
    d1 = _select(d1s, module)
    d2 = next((d for d in d2s if d.name == d1.name), None)
    if d2 is None:
        raise MismatchError(f"module {d1.name!r} of the first adapter is not adapted in the second adapter "
                            f"(its modules: {[d.name for d in d2s][:6]} …): compare adapters that target the same "
                            "modules")
    _check_pair(d1, d2)
    b1, b2 = _basis(d1, side), _basis(d2, side)
    max_i = b1.shape[1] if max_i is None else max_i
    max_j = b2.shape[1] if max_j is None else max_j
    if not 1 <= max_i <= b1.shape[1] or not 1 <= max_j <= b2.shape[1]:
        raise ConfigError(f"max_i={max_i}, max_j={max_j} out of range: need ≤ {b1.shape[1]} and ≤ {b2.shape[1]} "
                          f"(the ranks of the two updates of {d1.name})")
    cum = ((b1[:, :max_i].T @ b2[:, :max_j]) ** 2).cumsum(0).cumsum(1)       # [i, j] = Σ_{≤i, ≤j}
    idx_i = torch.arange(1, max_i + 1, dtype=DTYPE)[:, None]
    idx_j = torch.arange(1, max_j + 1, dtype=DTYPE)[None, :]
    return (cum / torch.minimum(idx_i, idx_j)).cpu().numpy()


def phi_table(m1, m2, i: int = 1, j: int = 1, side: str = "right", adapter_name: str = "default") -> pd.DataFrame:
    """φ(i, j) for every module the two adapters share, one row per module.

    Args:
        m1: First adapter (model with LoRA, or list of :class:`ModuleDelta`).
        m2: Second adapter on the same base.
        i: Leading directions of the first adapter (clipped to each module's rank).
        j: Leading directions of the second.
        side: See :func:`phi`.
        adapter_name: Adapter to read from models.

    Returns:
        DataFrame ``module, layer, depth, module_type, rank1, rank2, phi``.

    Raises:
        MismatchError: The adapters target different module sets (the message names modules only in one of them)
            or a module's shape differs.
    """
    d1s, d2s = _deltas(m1, adapter_name), _deltas(m2, adapter_name)
    n1, n2 = {d.name: d for d in d1s}, {d.name: d for d in d2s}
    if set(n1) != set(n2):
        only1, only2 = sorted(set(n1) - set(n2)), sorted(set(n2) - set(n1))
        raise MismatchError(f"the adapters target different modules: only in the first {only1[:4]}, only in the "
                            f"second {only2[:4]}; compare adapters with the same target_modules (or use phi_grid on "
                            "one shared module)")
    rows = []
    for name, d1 in n1.items():
        d2 = n2[name]
        _check_pair(d1, d2)
        ii, jj = min(i, _basis(d1, side).shape[1]), min(j, _basis(d2, side).shape[1])
        rows.append({"module": name, "layer": d1.layer, "depth": d1.depth, "module_type": d1.module_type,
                     "rank1": d1.rank, "rank2": d2.rank, "phi": phi(d1, d2, ii, jj, side)})
    df = pd.DataFrame(rows)
    df["layer"] = df["layer"].astype("Int64")
    return df


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
    hf = _hf_model(model)
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
    hf = _hf_model(peft_model)
    if isinstance(module, ModuleDelta):
        d = module
    else:
        names = [n for n, _ in _lora_layers(peft_model)]
        if not names:
            raise ConfigError(f"{type(peft_model).__name__} has no LoRA layers: pass a peft.PeftModel with a LoRA "
                              "adapter")
        target = _select([_NameOnly(n) for n in names], module).name
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
    """Stand-in with a ``name`` so :func:`_select` can resolve a module name without extracting weights."""

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
