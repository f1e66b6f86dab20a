"""One adapter's update, module by module: the LoRA factors, ΔW and its exact SVD from the factors.

:func:`lora_modules` extracts, for every module a LoRA adapter touches, the factors ``B`` (out×r) and ``A`` (r×in),
the scaling (``alpha/r``, or ``alpha/√r`` with rsLoRA, read from the layer itself) and the base weight ``W``, all in
the ``[out, in]`` orientation of ``nn.Linear`` (GPT-2's ``Conv1D`` weight is transposed here) as a
:class:`ModuleDelta`; :func:`factor_svd` gives the exact singular triplets of ``ΔW = scaling · B @ A`` without
forming it; :func:`effective_rank` and :func:`stable_rank` read a spectrum.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from lora_lens.errors import ConfigError
from lora_lens.lab.modules import hf_model, layer_index, lora_layers, module_role, module_type

__all__ = ["DTYPE", "ModuleDelta", "effective_rank", "factor_svd", "lora_modules", "module_deltas", "select_module",
           "stable_rank"]

DTYPE = torch.float32
"""Every weight-space computation runs in float32."""


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
        return module_role(self.module_type)

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
    layers = lora_layers(peft_model, adapter_name)
    wanted = None if names is None else set(names)
    hf = hf_model(peft_model)
    n_layers = _n_layers(hf)
    found, skipped = [], []
    for name, layer in layers.items():
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


def module_deltas(target, adapter_name: str = "default", device="cpu") -> list[ModuleDelta]:
    """The updates an analysis takes as ``target``: one :class:`ModuleDelta`, a list of them, or a model (extracted
    with :func:`lora_modules`)."""
    if isinstance(target, ModuleDelta):
        return [target]
    if isinstance(target, (list, tuple)) and all(isinstance(d, ModuleDelta) for d in target):
        if not target:
            raise ConfigError("the list of ModuleDelta is empty: pass lora_modules(peft_model)")
        return list(target)
    return lora_modules(target, adapter_name, device=device)


def select_module(deltas: list, module):
    """The one entry of ``deltas`` (anything with a ``name``) that ``module`` names: a full name or a unique dotted
    suffix (a :class:`ModuleDelta` is returned as it is).

    Raises:
        ConfigError: No entry or several entries match (the message lists the candidates).
    """
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

