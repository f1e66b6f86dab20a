"""One adapter's spectra as tables: per-module norms, ranks, amplification and intruder dimensions
(:func:`summary`), and their aggregation per layer, relative depth or module type (:func:`energy_by`,
:func:`amplification`)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from lora_lens.errors import ConfigError
from lora_lens.lens.delta.factors import ModuleDelta, effective_rank, module_deltas, stable_rank

__all__ = ["Intruders", "amplification", "amplification_factor", "energy_by", "intruder_dimensions", "summary"]


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
    for d in module_deltas(peft_model, adapter_name, device):
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

