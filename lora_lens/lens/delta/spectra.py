"""One adapter's spectra as tables: per-module norms, ranks, amplification and intruder dimensions
(:func:`summary`), and their aggregation per layer, relative depth or module type (:func:`energy_by`,
:func:`amplification`); and what a random update of the same shapes shows (:func:`random_like`, a random adapter;
:func:`random_lora_ranks`, the sampled ranks of a random rank-r product; :func:`marchenko_pastur_ranks`, their
large-rank limit), the null every rank or energy statement is read against."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from lora_lens.checks import check_positive
from lora_lens.errors import ConfigError
from lora_lens.lens.delta.factors import ModuleDelta, effective_rank, module_deltas, stable_rank

__all__ = ["Intruders", "RankNull", "amplification", "amplification_factor", "energy_by", "intruder_dimensions",
           "marchenko_pastur_ranks", "random_like", "random_lora_ranks", "summary"]


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



# ---------------------------------------------------------------------------------------------------------------
# Random-matrix nulls: what an update of the same shapes shows by chance
# ---------------------------------------------------------------------------------------------------------------


def random_like(target, seed: int = 0, norm: str = "total", adapter_name: str = "default") -> list[ModuleDelta]:
    """A random adapter: the same modules, ranks and base weights, Gaussian factors instead of trained ones.

    Every entry of every ``B`` and ``A`` is drawn i.i.d. from N(0, 1) (seeded), then scaled:

    * ``norm="total"``: one common scale for all modules, so that the total ‖ΔW‖_F² equals the trained adapter's.
      Each module's energy is then what an update of its shape gets by chance (in expectation ∝ out · in · r): the
      null of "this module type / this depth carries more energy";
    * ``norm="module"``: each module scaled to the trained module's ‖ΔW‖_F (energy shares equal the trained ones by
      construction; only the shape of each spectrum is random).

    Ranks, φ and every other scale-free statistic of one module do not depend on ``norm``.

    Args:
        target: A model with a LoRA adapter, or a list of :class:`ModuleDelta` (e.g. from ``lora_modules``).
        seed: Seed of the factors.
        norm: ``"total"`` or ``"module"``.
        adapter_name: Adapter to read when ``target`` is a model.

    Returns:
        A list of :class:`ModuleDelta` (``scaling`` 1.0, ``dora`` False), in the order of ``target``.

    Raises:
        ConfigError: Unknown ``norm``.
    """
    if norm not in ("total", "module"):
        raise ConfigError(f"norm={norm!r} must be 'total' (one scale, total energy matched) or 'module' (each "
                          "module's ‖ΔW‖_F matched)")
    mods = module_deltas(target, adapter_name)
    gen = torch.Generator().manual_seed(int(seed))
    raw = [(torch.randn(d.B.shape, generator=gen), torch.randn(d.A.shape, generator=gen)) for d in mods]
    fro = [float(torch.linalg.vector_norm(d.svd()[1])) for d in mods]
    rfro = [float(torch.linalg.matrix_norm(B @ A)) for B, A in raw]
    if norm == "total":
        total = math.sqrt(sum(f * f for f in rfro))
        scales = [math.sqrt(sum(f * f for f in fro)) / total if total > 0 else 0.0] * len(mods)
    else:
        scales = [f / r if r > 0 else 0.0 for f, r in zip(fro, rfro)]
    return [dataclasses.replace(d, B=B * math.sqrt(c), A=A * math.sqrt(c), scaling=1.0, dora=False, _svd=None)
            for d, (B, A), c in zip(mods, raw, scales)]


class RankNull(NamedTuple):
    """Ranks of a random rank-r update of one shape, as fractions of r: means and 95% ranges over the samples."""

    effective_ratio: float
    effective_low: float
    effective_high: float
    stable_ratio: float
    stable_low: float
    stable_high: float


def random_lora_ranks(out_features: int, in_features: int, rank: int, n_samples: int = 64,
                      seed: int = 0) -> RankNull:
    """Effective and stable rank (as fractions of ``rank``) of ``B @ A`` with Gaussian ``B`` (out×r), ``A`` (r×in).

    The random-matrix expectation for a LoRA update of that shape, sampled with a seeded RNG: the squared singular
    values of each factor follow the Marchenko–Pastur law of its aspect ratio, and those of the product its free
    multiplicative convolution, which has no simple closed form — so it is sampled (exactly, from the r×r core of
    the factors' QR, as :func:`lora_lens.lens.delta.factor_svd` does). :func:`marchenko_pastur_ranks` gives the
    large-r limit when one factor is much longer than the other.

    Args:
        out_features: Rows of ΔW.
        in_features: Columns of ΔW.
        rank: r (at most ``min(out_features, in_features)``).
        n_samples: Random products drawn.
        seed: Seed.

    Returns:
        A :class:`RankNull`.

    Raises:
        ConfigError: A non-positive size, ``rank`` above ``min(out, in)`` or ``n_samples`` < 1.
    """
    for name, v in (("out_features", out_features), ("in_features", in_features), ("rank", rank),
                    ("n_samples", n_samples)):
        check_positive(name, v)
    if rank > min(out_features, in_features):
        raise ConfigError(f"rank={rank} exceeds min(out_features, in_features)={min(out_features, in_features)}: "
                          "a rank-r product needs r ≤ both sides")
    rng = np.random.default_rng(seed)
    eff, stab = [], []
    for _ in range(n_samples):
        rb = np.linalg.qr(rng.standard_normal((out_features, rank)), mode="r")
        ra = np.linalg.qr(rng.standard_normal((in_features, rank)), mode="r")
        s = np.linalg.svd(rb @ ra.T, compute_uv=False)
        eff.append(effective_rank(s) / rank)
        stab.append(stable_rank(s) / rank)
    q = [0.025, 0.975]
    (el, eh), (sl, sh) = np.quantile(eff, q), np.quantile(stab, q)
    return RankNull(float(np.mean(eff)), float(el), float(eh), float(np.mean(stab)), float(sl), float(sh))


def marchenko_pastur_ranks(ratio: float, n_grid: int = 4000) -> tuple[float, float]:
    """Large-rank limit of the effective and stable rank (fractions of r) of an n×r Gaussian matrix, r/n = ``ratio``.

    Its squared singular values, scaled to mean 1, follow the Marchenko–Pastur law on
    ``[(1 − √λ)², (1 + √λ)²]``, λ = ``ratio``. The entropy effective rank ``exp(H(σ/Σσ))`` over r tends to
    ``E[s] · exp(−E[s log s] / E[s])`` with ``s = √x`` under that law (computed by quadrature), the stable rank
    ``Σσ² / σ_max²`` over r to ``1 / (1 + √λ)²``. A LoRA product ``B @ A`` with one factor much longer than the
    other (``in ≫ r``) has the spectrum of the shorter one, so ``ratio = r / out`` there; ``ratio = 1`` (a square
    factor) gives 0.25 for the stable rank.

    Args:
        ratio: λ = r / n in (0, 1].
        n_grid: Quadrature points.

    Returns:
        ``(effective_ratio, stable_ratio)``.

    Raises:
        ConfigError: ``ratio`` outside (0, 1].
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ConfigError(f"ratio={ratio!r} must be r / n in (0, 1] (the short side over the long side)")
    a, b = (1 - math.sqrt(ratio)) ** 2, (1 + math.sqrt(ratio)) ** 2
    theta = (np.arange(n_grid) + 0.5) * math.pi / n_grid  # midpoints: x = m + h cos θ, dx = h sin θ dθ
    m, h = (a + b) / 2, (b - a) / 2
    x = m - h * np.cos(theta)
    weight = h * h * np.sin(theta) ** 2 / (2 * math.pi * ratio * x) * (math.pi / n_grid)  # density · dx
    weight = weight / weight.sum()
    s = np.sqrt(x)
    es = float((weight * s).sum())
    return float(es * math.exp(-float((weight * s * np.log(s)).sum()) / es)), 1.0 / b
