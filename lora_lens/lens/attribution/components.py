"""An adapter's components and a mask that switches them inside the live model.

:func:`lora_components` lists components at three grains: ``module`` (each adapted module), ``layer`` (all adapted
modules of one block) and ``rank`` (each rank-1 term ``σᵢ uᵢ vᵢᵀ`` of a module's ``ΔW = scaling · B @ A``, from
:func:`lora_lens.lens.delta.factor_svd`). A :class:`ComponentMask` switches components on (1), off (0) or anywhere
between by *scaling* them inside the live model: module and layer masks scale peft's ``scaling``; rank masks
temporarily reparametrise ``lora_A``/``lora_B`` to the SVD basis (``A' = Vh``, ``B' = U·diag(σ·m)/scaling``),
which is exact. All-ones leaves the model bit-identical to the adapted model and all-zeros to the base.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Iterator

import pandas as pd
import torch

from lora_lens.errors import ConfigError, MismatchError
from lora_lens.lab.modules import hf_model, layer_index, lora_layers, module_type
from lora_lens.lens.delta import factor_svd

__all__ = ["GRAINS", "Component", "ComponentMask", "ComponentSet", "LayerCache", "check_components", "lora_components"]

DTYPE = torch.float32
GRAINS = ("module", "layer", "rank")
"""Component grains: each adapted module, each block's adapted modules together, each rank-1 term of ΔW."""


# ---------------------------------------------------------------------------------------------------------------
# components
# ---------------------------------------------------------------------------------------------------------------


def _factors(layer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, in], B [out, r])`` parameters of one LoRA layer (Linear/Conv1D or Embedding)."""
    if adapter_name in getattr(layer, "lora_A", {}):
        return layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    return layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]


def _module_list(names: list[str]) -> str:
    return f"{names[:8]}{' …' if len(names) > 8 else ''} ({len(names)} in all)"


def _resolve_modules(peft_model, layers: dict, modules) -> list[str]:
    if isinstance(modules, str):
        modules = [modules]
    modules = list(modules)
    if not modules:
        raise ConfigError("modules=[] gives an empty component set: pass None (every adapted module) or some of "
                          f"the adapted modules {_module_list(list(layers))}")
    hf = hf_model(peft_model)
    all_names = {n for n, _ in hf.named_modules()}
    out = []
    for m in modules:
        hits = [n for n in layers if n == m] or [n for n in layers if n.endswith("." + m)]
        if len(hits) > 1:
            raise ConfigError(f"module {m!r} is ambiguous: it matches {hits[:6]}; give more of the path")
        if not hits:
            exists = m in all_names or any(n.endswith("." + m) for n in all_names)
            why = "has no LoRA adapter" if exists else "is not a module of this model"
            raise ConfigError(f"module {m!r} {why}: components exist only for the adapted modules "
                              f"{_module_list(list(layers))}")
        if hits[0] not in out:
            out.append(hits[0])
    return out


@dataclass(frozen=True)
class Component:
    """One switchable part of a LoRA adapter.

    Attributes:
        name: ``"<module>"`` (module grain), ``"layer <i>"`` (layer grain) or ``"<module>[<i>]"`` (rank grain).
        grain: ``"module"``, ``"layer"`` or ``"rank"``.
        modules: The adapted modules it covers.
        index: Rank-1 index ``i`` (σ order, largest first) for the rank grain, else None.
        layer: Transformer block index (None for embeddings / LM head).
        module_type: Normalised module type (see :func:`lora_lens.lab.modules.module_type`); ``"layer"`` for layer grain.
        sigma: σᵢ for the rank grain; ‖ΔW‖_F summed in quadrature over the covered modules otherwise.
    """

    name: str
    grain: str
    modules: tuple[str, ...]
    index: int | None
    layer: int | None
    module_type: str
    sigma: float


class ComponentSet(Sequence):
    """An ordered, non-empty list of :class:`Component` of one adapter at one grain."""

    def __init__(self, components: Sequence[Component], grain: str, adapter_name: str = "default"):
        components = list(components)
        if not components:
            raise ConfigError("the component set is empty: build one with lora_components(peft_model, grain=...) "
                              "over at least one adapted module")
        self.components, self.grain, self.adapter_name = components, grain, adapter_name

    def __len__(self) -> int:
        return len(self.components)

    def __getitem__(self, i):
        if isinstance(i, str):
            for c in self.components:
                if c.name == i:
                    return c
            raise ConfigError(f"no component named {i!r}; components are {_module_list(self.names)}")
        return self.components[i]

    def __repr__(self) -> str:
        return f"ComponentSet(grain={self.grain!r}, n={len(self)}, adapter={self.adapter_name!r})"

    @property
    def names(self) -> list[str]:
        """Component names, in order."""
        return [c.name for c in self.components]

    @property
    def modules(self) -> list[str]:
        """Every module covered, in order."""
        return list(dict.fromkeys(m for c in self.components for m in c.modules))

    def table(self) -> pd.DataFrame:
        """One row per component (index = name): grain, layer, module_type, index, sigma, modules."""
        return pd.DataFrame([{"component": c.name, "grain": c.grain, "layer": c.layer, "module_type": c.module_type,
                              "index": c.index, "sigma": c.sigma, "modules": ",".join(c.modules)}
                             for c in self.components]).set_index("component")


def lora_components(peft_model, grain: str = "module", modules: Sequence[str] | str | None = None,
                    adapter_name: str = "default") -> ComponentSet:
    """List an adapter's components at one grain.

    Args:
        peft_model: A model carrying a LoRA adapter.
        grain: ``"module"`` (each adapted module), ``"layer"`` (all adapted modules of one block together) or
            ``"rank"`` (each rank-1 term ``σᵢ uᵢ vᵢᵀ`` of every module's ΔW, from the exact factor SVD).
        modules: Restrict to these adapted modules (full names or unique suffixes such as
            ``"layers.0.mlp.down_proj"``); None = all.
        adapter_name: Which adapter.

    Returns:
        A :class:`ComponentSet`.

    Raises:
        ConfigError: Unknown grain; no LoRA layers; an empty ``modules``; a module without this adapter (the
            message lists the adapted modules).
    """
    if grain not in GRAINS:
        raise ConfigError(f"grain={grain!r} is unknown; use one of {list(GRAINS)}")
    layers = lora_layers(peft_model, adapter_name)
    names = list(layers) if modules is None else _resolve_modules(peft_model, layers, modules)
    norms, svds = {}, {}
    for n in names:
        A, B = _factors(layers[n], adapter_name)
        svds[n] = factor_svd(B, A, float(layers[n].scaling[adapter_name]))
        norms[n] = float(svds[n][1].pow(2).sum().sqrt())
    comps = []
    if grain == "module":
        comps = [Component(n, "module", (n,), None, layer_index(n), module_type(n), norms[n]) for n in names]
    elif grain == "layer":
        groups: dict = {}
        for n in names:
            li = layer_index(n)
            groups.setdefault(("layer", li) if li is not None else ("module", n), []).append(n)
        for (kind, key), ms in groups.items():
            label = f"layer {key}" if kind == "layer" else key
            comps.append(Component(label, "layer", tuple(ms), None, layer_index(ms[0]), "layer",
                                   math.sqrt(sum(norms[m] ** 2 for m in ms))))
    else:
        for n in names:
            S = svds[n][1]
            comps += [Component(f"{n}[{i}]", "rank", (n,), i, layer_index(n), module_type(n), float(S[i]))
                      for i in range(len(S))]
    return ComponentSet(comps, grain, adapter_name)


class ComponentMask:
    """Scale an adapter's components inside the live model (a context manager; no model copy).

    Value 1 keeps a component, 0 removes it, anything between scales it. Module and layer grains scale peft's
    ``scaling`` of the covered modules. The rank grain reparametrises a module's ``lora_A``/``lora_B`` to its SVD
    basis while its mask is not uniform (``A' = Vh``, ``B' = U·diag(σ·m)/scaling``, so the LoRA branch computes
    ``Σᵢ mᵢ σᵢ uᵢ vᵢᵀ x``); a uniform mask ``c`` uses the original factors with ``scaling·c``. Hence all-ones is
    bit-identical to the adapted model and all-zeros to the base. Everything is restored on exit.

    Example:
        >>> comps = lora_components(peft_model, grain="rank")          # doctest: +SKIP
        >>> with ComponentMask(peft_model, comps) as mask:              # doctest: +SKIP
        ...     mask.set(torch.zeros(len(comps)))                      # base model
        ...     mask.set([1.0] + [0.0] * (len(comps) - 1))              # only the top rank-1 term of the first module

    Args:
        peft_model: The model the components were listed from.
        components: A :class:`ComponentSet`.
        values: Initial mask (default all ones).

    Raises:
        ConfigError: An empty component set, a mask of the wrong length or with non-finite values, a DoRA (or other
            LoRA-variant) adapter, or a merged adapter.
        MismatchError: The component set names modules this model does not adapt.
    """

    def __init__(self, peft_model, components: ComponentSet, values=None):
        if not isinstance(components, ComponentSet):
            raise ConfigError(f"components must be a ComponentSet (from lora_components), got "
                              f"{type(components).__name__}")
        if len(components) == 0:
            raise ConfigError("the component set is empty: nothing to mask")
        self.model, self.components, self._initial = peft_model, components, values
        self._saved: dict = {}
        self._svd: dict = {}
        self.values = torch.ones(len(components), dtype=DTYPE)

    def __enter__(self) -> "ComponentMask":
        ad = self.components.adapter_name
        layers = lora_layers(self.model, ad)
        missing = [m for m in self.components.modules if m not in layers]
        if missing:
            raise MismatchError(f"the component set covers {missing[:4]}, which this model does not adapt with "
                                f"{ad!r}: list the components of this model with lora_components(model, ...)")
        for m in self.components.modules:
            layer = layers[m]
            if ad in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(ad, False):
                raise ConfigError(f"module {m} uses a LoRA variant (DoRA …) whose output is not linear in the "
                                  "factors; component masks support plain LoRA only")
            if ad in getattr(layer, "merged_adapters", []):
                raise ConfigError(f"adapter {ad!r} is merged into {m}: call model.unmerge_adapter() first")
            A, B = _factors(layer, ad)
            self._saved[m] = (layer, float(layer.scaling[ad]), A.detach().clone(), B.detach().clone())
            if self.components.grain == "rank":
                self._svd[m] = factor_svd(B, A, float(layer.scaling[ad]))
        self._reparam: set = set()
        try:
            self.set(torch.ones(len(self.components)) if self._initial is None else self._initial)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    @torch.no_grad()
    def _restore(self) -> None:
        ad = self.components.adapter_name
        for m, (layer, scaling, A0, B0) in self._saved.items():
            layer.scaling[ad] = scaling
            if m in self._reparam:
                A, B = _factors(layer, ad)
                A.copy_(A0)
                B.copy_(B0)
        self._saved, self._svd, self._reparam = {}, {}, set()

    @torch.no_grad()
    def set(self, values) -> None:
        """Set the mask: one value per component, in the component set's order (1 = on, 0 = off).

        Raises:
            ConfigError: Wrong length, non-finite values, or called outside the ``with`` block.
        """
        if not self._saved:
            raise ConfigError("ComponentMask.set() works inside `with ComponentMask(model, components) as mask:`")
        v = torch.as_tensor(values, dtype=DTYPE).detach().flatten().cpu()
        if v.numel() != len(self.components):
            raise ConfigError(f"the mask has {v.numel()} values but the component set has {len(self.components)} "
                              "components: pass one value per component")
        if not torch.isfinite(v).all():
            raise ConfigError("the mask has non-finite values: use numbers between 0 (off) and 1 (on)")
        self.values = v.clone()
        ad = self.components.adapter_name
        per_module: dict = {}
        for c, value in zip(self.components, v.tolist()):
            for m in c.modules:
                if c.grain == "rank":
                    k = len(self._svd[m][1])
                    per_module.setdefault(m, [1.0] * k)[c.index] *= value
                else:
                    per_module.setdefault(m, [1.0])[0] *= value
        for m, mask in per_module.items():
            layer, scaling, A0, B0 = self._saved[m]
            if all(x == mask[0] for x in mask):            # uniform: original factors, scaled
                if m in self._reparam:
                    A, B = _factors(layer, ad)
                    A.copy_(A0)
                    B.copy_(B0)
                    self._reparam.discard(m)
                layer.scaling[ad] = scaling * mask[0]
                continue
            U, S, Vh = self._svd[m]
            A, B = _factors(layer, ad)
            k = len(S)
            mk = torch.tensor(mask, dtype=DTYPE, device=S.device)
            A.zero_()
            B.zero_()
            A[:k] = Vh.to(A)
            B[:, :k] = (U * (S * mk) / scaling).to(B) if scaling else 0.0
            layer.scaling[ad] = scaling
            self._reparam.add(m)


def check_components(components) -> ComponentSet:
    """``components`` when it is a :class:`ComponentSet`; raise :class:`ConfigError` (saying how to build one)
    otherwise."""
    if isinstance(components, ComponentSet):
        return components
    if components is None or (hasattr(components, "__len__") and len(components) == 0):
        raise ConfigError("the component set is empty: pass lora_components(peft_model, grain=...)")
    raise ConfigError(f"components must be a ComponentSet from lora_components(...), got {type(components).__name__}")



# ---------------------------------------------------------------------------------------------------------------
# the layers below a change, computed once
# ---------------------------------------------------------------------------------------------------------------


class LayerCache:
    """Reuse the transformer blocks below a change: switching off components in block L changes nothing below L.

    Inside ``with LayerCache(peft_model, components) as cache:``, one forward under :meth:`record` stores the output
    of every block; a later forward of the *same inputs* under ``with cache.reuse(start):`` returns the stored
    outputs of blocks ``0 … start − 1`` without computing them and computes blocks ``start …`` as usual. The blocks
    above ``start`` see the very tensor they would have computed, so the result is bit-identical — as long as
    nothing below ``start`` differs from the recorded forward (the caller's contract: the mask differs from the
    recorded one only in components of blocks ≥ ``start``, see :meth:`start`). A forward whose input to the first
    reused block differs from the recorded one raises instead of returning wrong numbers.

    A model whose adapted modules do not sit in one list of blocks (``….layers.<i>.…``) gets no reuse: every
    forward is computed whole (:attr:`active` is False).

    Args:
        peft_model: The model the components were listed from.
        components: A :class:`ComponentSet` (its modules locate the list of blocks).
    """

    def __init__(self, peft_model, components: ComponentSet):
        self.components = components
        self.blocks = _block_list(hf_model(peft_model), components.modules)
        self.active = self.blocks is not None
        self._outputs: dict[int, object] = {}
        self._inputs: dict[int, torch.Tensor] = {}
        self._mode: tuple[str, int] = ("off", 0)
        self._own: list = []

    def __enter__(self) -> "LayerCache":
        if self.active:
            self._own = [block.__dict__.get("forward") for block in self.blocks]
            for i, block in enumerate(self.blocks):
                block.forward = self._wrap(i, block.forward)
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            for block, own in zip(self.blocks, self._own):
                block.__dict__.pop("forward", None)
                if own is not None:
                    block.__dict__["forward"] = own
        self._outputs, self._inputs, self._own = {}, {}, []

    @property
    def n_blocks(self) -> int:
        return len(self.blocks) if self.active else 0

    def start(self, off: Sequence[int]) -> int:
        """The first block a mask that differs from the recorded one in components ``off`` (indices) changes: the
        lowest block among them (0 when one of them is outside the blocks, e.g. an embedding; every block is
        reused when ``off`` is empty)."""
        if not self.active:
            return 0
        layers = [self.components[i].layer for i in off]
        if any(layer is None for layer in layers):
            return 0
        return min(layers, default=self.n_blocks)

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        """The forwards inside store every block's output (and input) for :meth:`reuse`."""
        self._outputs, self._inputs, self._mode = {}, {}, ("record", 0)
        try:
            yield
        finally:
            self._mode = ("off", 0)

    @contextlib.contextmanager
    def reuse(self, start: int) -> Iterator[None]:
        """The forwards inside skip blocks ``0 … start − 1`` (their recorded outputs stand in)."""
        if self.active and start > 0 and not self._outputs:
            raise ConfigError("LayerCache.reuse() needs a recorded forward first: run one under cache.record()")
        self._mode = ("reuse", start if self.active else 0)
        try:
            yield
        finally:
            self._mode = ("off", 0)

    def _wrap(self, i: int, forward):
        def run(*args, **kwargs):
            mode, start = self._mode
            if mode == "record":
                self._inputs[i] = _hidden(args, kwargs)
                self._outputs[i] = out = forward(*args, **kwargs)
                return out
            if mode == "reuse" and i < start:
                if i == 0 and not _same(_hidden(args, kwargs), self._inputs.get(0)):
                    raise MismatchError("LayerCache.reuse(): this forward's inputs are not those recorded; record "
                                        "the forward of these inputs first")
                return self._outputs[i]
            return forward(*args, **kwargs)
        return run


def _hidden(args, kwargs):
    return args[0] if args else kwargs.get("hidden_states")


def _same(a, b) -> bool:
    tensors = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return tensors and a.shape == b.shape and bool(torch.equal(a, b))


def _block_list(hf, modules: Sequence[str]):
    """The ``ModuleList`` of blocks holding every module (``<path>.<i>.…`` with one ``<path>``), else None."""
    paths = set()
    for m in modules:
        parts = m.split(".")
        at = next((j for j, part in enumerate(parts) if part.isdigit()), None)
        if at is None:
            return None
        paths.add(".".join(parts[:at]))
    if len(paths) != 1:
        return None
    try:
        blocks = hf.get_submodule(paths.pop())
    except AttributeError:
        return None
    return blocks if isinstance(blocks, torch.nn.ModuleList) else None
