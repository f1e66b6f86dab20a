"""Progress events of long loops, reported to ``lora-lens run`` while a notebook runs (the kernel's side).

When ``$LORA_LENS_PROGRESS`` names a file (the runner sets it per notebook), long loops append small JSON events to
it: :func:`lora_lens.utils.progress_bar` wraps its bar in :class:`Tracker`, and LoRA training adds
:func:`trainer_callbacks`. The runner's side — tailing the files and drawing one line — is
:mod:`lora_lens.workshop.progress`. Outside a run nothing is written.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

__all__ = ["ENV", "Tracker", "emit", "trainer_callbacks"]

ENV = "LORA_LENS_PROGRESS"
"""The environment variable naming a notebook's progress file."""


def emit(event: dict[str, Any], path: str | None = None) -> None:
    """Append one event (``time`` added) to ``path`` or ``$LORA_LENS_PROGRESS``; nothing when neither is set."""
    path = path or os.environ.get(ENV)
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({**event, "time": time.time()}) + "\n")
    except OSError:
        pass  # progress is a courtesy: never fail a notebook over it


class Tracker:
    """Wrap a tqdm bar (or any iterable) and emit ``step`` events with an ETA, at most one per ``every`` seconds.

    It forwards ``update``, ``set_postfix``, ``set_description`` and ``close`` to the bar and counts the steps.
    """

    def __init__(self, bar, total: int | None = None, desc: str | None = None, every: float = 1.0):
        self.bar, self.desc, self.every = bar, desc or getattr(bar, "desc", "") or "loop", every
        self.total = total if total is not None else getattr(bar, "total", None)
        self.n, self.t0, self._last = 0, time.monotonic(), 0.0

    def __iter__(self):
        for item in self.bar:
            yield item
            self._step(1)
        self.close()

    def __len__(self):
        return len(self.bar)

    def _step(self, k: int, force: bool = False) -> None:
        self.n += k
        now = time.monotonic()
        if force or now - self._last >= self.every:
            self._last = now
            elapsed = now - self.t0
            eta = elapsed / self.n * (self.total - self.n) if self.total and self.n else None
            emit({"kind": "step", "desc": self.desc, "n": self.n, "total": self.total, "elapsed": elapsed,
                  "eta": eta})

    def update(self, k: int = 1):
        self._step(k)
        return self.bar.update(k)

    def set_postfix(self, *args, **kwargs):
        return self.bar.set_postfix(*args, **kwargs)

    def set_description(self, desc: str, *args, **kwargs):
        self.desc = desc
        return self.bar.set_description(desc, *args, **kwargs)

    def close(self):
        self._step(0, force=True)
        emit({"kind": "step_done", "desc": self.desc, "n": self.n})
        return self.bar.close()


def trainer_callbacks(desc: str = "train LoRA") -> list:
    """``transformers`` callbacks that emit ``step`` events of a ``Trainer`` run (none unless ``$LORA_LENS_PROGRESS``
    is set)."""
    if not os.environ.get(ENV):
        return []
    from transformers import TrainerCallback  # only under a run: keeps this module (and utils) light

    class StepEvents(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.last = time.monotonic(), 0.0

        def on_step_end(self, args, state, control, **kwargs):
            now = time.monotonic()
            if now - self.last >= 1.0 or state.global_step == state.max_steps:
                self.last, n, total = now, state.global_step, state.max_steps
                eta = (now - self.t0) / n * (total - n) if n and total else None
                emit({"kind": "step", "desc": desc, "n": n, "total": total, "elapsed": now - self.t0, "eta": eta})

        def on_train_end(self, args, state, control, **kwargs):
            emit({"kind": "step_done", "desc": desc, "n": state.global_step})

    return [StepEvents()]
