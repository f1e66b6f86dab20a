"""What a notebook will cost on this machine: minutes, and which models come from the cache or are trained now.

The reference is the README's Performance section: the workshop series took 10.6 min with ``--jobs 1`` (models
cached, adapters trained) on a 2-core x86-64 CPU whose float32 matmul peak measured 79–119 GFLOP/s, and pretraining
one ``small`` zoo family took 53–135 s. The split of the series time over the notebooks (:data:`REFERENCE_MINUTES`)
is an estimate, not a measurement per notebook. :func:`cost_note` scales the reference by a 0.2-second matmul
measurement of this machine against :data:`REFERENCE_GFLOPS`, and checks the model cache
(:func:`lora_lens.lab.zoo.cache_dir`) for the bases the notebook loads.

Example:
    >>> from lora_lens.workshop.costs import cost_note
    >>> print(cost_note("01", families=["llama"], size="small", n_entities=200, seed=0))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lora_lens.lab.world import make_world

__all__ = ["NO_MODEL", "PRETRAIN_SECONDS", "REFERENCE_GFLOPS", "REFERENCE_MINUTES", "cached_families", "cost_note",
           "machine_gflops"]

REFERENCE_GFLOPS = 100.0
"""Matmul peak of the reference machine (fp32, 2048², the README's 79–119 GFLOP/s)."""
REFERENCE_MINUTES = {"00": 0.5, "01": 4.6, "02": 3.3, "03": 4.4, "04": 2.1, "05": 4.5, "06": 1.3, "07": 0.3}
"""Estimated minutes per notebook at the workshop preset with every base cached (sum 21.0 min: the measured 10.6 min
of the series with one seed, with 01-03 scaled by their measured ratio three seeds / one seed on a shared 2-core
machine, 2026-12-01: 01 639 / 278 s = 2.30, 02 147 / 63 s = 2.33, 03 313 / 176 s = 1.78; 04's two more seeds each
rerun only the semantic route — one diff and one distillation of 100 steps, of the notebook's five — so 1.5 min ×
(1 + 2 × 0.2), an estimate: its smoke run with two seeds took 164 s on the shared machine, 2026-12-02; 05 runs the
loop and its baseline once per seed: three times its one-seed 1.5 min; measured 2026-12-02 under load 3.4-4.9:
14.2 min wall, 9.1 min CPU, with one of its three bases pretrained in the run; 02's φ sweep adds its 50-step
condition, six short trainings: 136 s on the shared machine under load ~7, 2026-12-02, so about 1 min more)."""
NO_MODEL = ("07",)
"""Notebooks that load no model (the journal): their cost does not scale with the machine's matmul speed."""
PRETRAIN_SECONDS = (53, 135)
"""Measured range for pretraining one ``small`` family on the reference machine (README)."""


def machine_gflops(seconds: float = 0.2) -> float:
    """A quick float32 matmul throughput measurement of this machine (GFLOP/s)."""
    import torch  # here, not at the top: the journal's cost note loads no torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 1024**3 * n / (time.perf_counter() - t0) / 1e9


def cached_families(families: list[str], size: str, n_entities: int, seed: int,
                    cache: str | Path | None = None) -> dict[str, bool]:
    """Whether a pretrained base of each family (this size and world) is in the model cache."""
    from lora_lens.lab.zoo import cache_dir  # the zoo loads torch: only for a notebook that loads a model

    fingerprint = make_world(n_entities=n_entities, seed=seed).fingerprint()
    models = cache_dir(cache) / "models"
    found = {}
    for family in families:
        found[family] = False
        for manifest in models.glob(f"{family}-{size}-*/lora_lens.json"):
            try:
                if json.loads(manifest.read_text(encoding="utf-8"))["spec"]["world"] == fingerprint:
                    found[family] = True
                    break
            except (OSError, ValueError, KeyError):
                continue
    return found


def cost_note(prefix: str, families: list[str] | None = None, size: str = "small", n_entities: int = 200,
              seed: int = 0, cache: str | Path | None = None, seeds: list[int] | None = None) -> str:
    """A few lines for a notebook's first cell: expected minutes here, and which bases are cached or trained now.

    Args:
        prefix: The notebook's two-digit prefix.
        families: The zoo families it loads (none for the journal).
        size, n_entities, seed: The notebook's parameters of the same names.
        cache: Model cache (default ``$LORA_LENS_CACHE`` or the user cache dir).
        seeds: The seeds whose bases it loads (one world and base per seed, see
            :func:`lora_lens.lab.study.seed_list`); default ``[seed]``.
    """
    if prefix in NO_MODEL:
        return (f"This notebook loads no model and trains nothing: about {REFERENCE_MINUTES[prefix] * 60:.0f} s on "
                "any machine (reading the ledger and drawing its figures).")
    speed = machine_gflops()
    scale = REFERENCE_GFLOPS / max(speed, 1e-3)
    minutes = REFERENCE_MINUTES.get(prefix, 1.0) * scale
    lines = [f"This machine: {speed:.0f} GFLOP/s (reference {REFERENCE_GFLOPS:.0f}), so about "
             f"{minutes:.1f} min for this notebook with its bases cached"
             + ("" if size == "small" else f" (the reference is size 'small'; this is {size!r})") + "."]
    if families:
        seeds = [seed] if seeds is None else list(seeds)
        have, missing = [], []
        for s in seeds:
            tag = "" if len(seeds) == 1 else f" seed {s}"
            for f, ok in cached_families(list(families), size, n_entities, s, cache).items():
                (have if ok else missing).append(f + tag)
        if have:
            lines.append(f"From the cache: {', '.join(have)} ({size}).")
        if missing:
            lo, hi = (x * scale / 60 for x in PRETRAIN_SECONDS)
            lines.append(f"Pretrained now (not in the cache): {', '.join(missing)}, about {lo:.0f}–{hi:.0f} min "
                         "each at size 'small'.")
        lines.append("Adapters are trained now unless an identical one is in the adapter cache (then seconds).")
    return "\n".join(lines)
