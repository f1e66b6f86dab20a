"""Two adapters compared module by module: the normalised subspace similarity φ (Hu et al. 2021, §7)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from lora_lens.errors import ConfigError, MismatchError
from lora_lens.lens.delta.factors import DTYPE, ModuleDelta, module_deltas, select_module
from lora_lens.lens.delta.spectra import random_like

__all__ = ["SIDES", "phi", "phi_grid", "phi_table", "random_phi"]


# ---------------------------------------------------------------------------------------------------------------
# Subspace similarity between two adapters
# ---------------------------------------------------------------------------------------------------------------

SIDES = ("right", "left", "A")


def _basis(d: ModuleDelta, side: str) -> torch.Tensor:
    if side == "left":
        return d.svd()[0]
    if side == "right":
        return d.svd()[2].T
    if side == "A":
        return torch.linalg.svd(d.A, full_matrices=False)[2].T
    raise ConfigError(f"side={side!r} must be one of {list(SIDES)}")


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
    d1s, d2s = module_deltas(m1, adapter_name), module_deltas(m2, adapter_name)
    d1 = select_module(d1s, module)
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
    d1s, d2s = module_deltas(m1, adapter_name), module_deltas(m2, adapter_name)
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



def random_phi(m1, m2, i: int = 1, j: int = 1, side: str = "right", n_samples: int = 32, seed: int = 0,
               adapter_name: str = "default") -> np.ndarray:
    """The Monte Carlo null of :func:`phi_table`'s mean: φ(i, j) of two *random* adapters of the same shapes and ranks.

    Each sample draws a random twin of each adapter (:func:`lora_lens.lens.delta.random_like`: the same modules and
    ranks, i.i.d. Gaussian factors; φ does not depend on their scale) and takes the mean φ(i, j) over the shared
    modules, exactly as ``phi_table(m1, m2, i, j, side)["phi"].mean()`` does for the trained pair. For Gaussian
    factors the singular vectors are uniformly distributed, so the mean of the samples tends to the mean over the
    modules of max(i, j) / d (d: the input width for ``side="right"``, the output width for ``"left"``): 1/d for
    the top directions.

    Args:
        m1: First adapter (model with LoRA, or list of :class:`ModuleDelta`), e.g. rank 8.
        m2: Second adapter on the same base, e.g. rank 64.
        i, j: Leading directions (clipped to each module's rank, as in :func:`phi_table`).
        side: See :func:`phi` (``"A"`` reads the random A, as ``"right"`` does in distribution).
        n_samples: Pairs of random adapters.
        seed: Seed of the first pair; sample k uses seeds ``2 * (seed + k)`` and ``2 * (seed + k) + 1``.
        adapter_name: Adapter to read from models.

    Returns:
        ``[n_samples]`` array of mean φ(i, j), one per pair of random adapters.

    Raises:
        ConfigError: ``n_samples`` is not a positive integer, or an unknown side.
        MismatchError: As :func:`phi_table`.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ConfigError(f"n_samples={n_samples!r} must be a positive integer (random adapter pairs), e.g. 32")
    if side not in SIDES:
        raise ConfigError(f"side={side!r} must be one of {list(SIDES)}")
    d1s, d2s = module_deltas(m1, adapter_name), module_deltas(m2, adapter_name)
    out = []
    for k in range(n_samples):
        s = 2 * (int(seed) + k)
        out.append(float(phi_table(random_like(d1s, seed=s), random_like(d2s, seed=s + 1), i, j, side)["phi"].mean()))
    return np.asarray(out)
