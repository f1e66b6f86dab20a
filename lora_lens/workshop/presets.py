"""Parameter presets for running the notebook series.

A preset maps a notebook's two-digit prefix (``"00"``, ``"01"`` …) to the parameter values that override the
notebook's own defaults. This is the only place where run sizes live: notebooks never sniff their environment.

* ``workshop`` — the notebooks' own defaults (what a workshop laptop runs in a few minutes), so mostly empty.
* ``smoke`` — small, fast values for tests and CI (two seeds for the headline numbers of 01–05: below the
  ledger's three for an interval verdict, so a smoke run leaves those claims inconclusive).

Every name in a preset must be a parameter that the notebook declares in its ``parameters`` cell; the runner
refuses a preset with a stale name before anything runs. When a notebook is added to ``notebooks/``, add its
prefix here (an empty dict is fine for ``workshop``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULT_PRESET", "PRESETS"]

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "workshop": {
        "00": {},
        "01": {},
        "02": {},
        "03": {},
        "04": {},
        "05": {},
        "06": {},
        "07": {},
    },
    "smoke": {
        "00": {"families": ["llama", "gpt2"], "size": "tiny", "n_entities": 24},
        "01": {"size": "tiny", "n_entities": 24, "seeds": 2, "rank": 4, "ranks": [1, 4],
               "target_sets": ["attn", "all"]},
        "02": {"size": "tiny", "n_entities": 24, "seeds": 2, "rank": 4, "small_rank": 4, "large_rank": 16,
               "low_rank": 1},
        "03": {"size": "tiny", "n_entities": 24, "seeds": 2, "rank": 4, "n_probes": 16, "ig_steps": 8,
               "shapley_samples": 3, "n_references": 4, "deletion_k": 30},
        "04": {"size": "tiny", "n_entities": 24, "seeds": 2, "rank": 4, "steps": 60, "lr": 0.002,
               "replay_sweep": [0.0, 0.5]},
        "05": {"size": "tiny", "n_entities": 24, "seeds": 2, "rank": 4, "k_edits": 6, "loop_steps": 60,
               "max_rounds": 2},
        "06": {"families": ["llama", "gpt2"], "size": "tiny", "n_entities": 24, "seeds": 2, "rank": 4,
               "steps": 100, "n_probes": 8, "ig_steps": 8, "n_boot": 500, "portability_families": ["llama"],
               "continue_steps": 50},
        "07": {"max_hypotheses": 12},
    },
}
"""Preset name -> notebook prefix -> parameter overrides."""

DEFAULT_PRESET = "workshop"
"""The preset of ``lora-lens run`` without ``--preset``; its runs record into the main ledger."""
