"""Progress you can see while ``lora-lens run`` works: notebook, section, and step / ETA of long loops.

The plumbing is a small JSON-lines file per running notebook, named by ``$LORA_LENS_PROGRESS`` (the runner sets it
for each notebook's worker and kernel, :func:`env_for`):

* the worker process (papermill) appends ``{"kind": "cell", "cell": i, "section": "## 2 · …"}`` when a cell starts
  (:func:`instrument_papermill`; the section is the last markdown heading above the cell);
* the kernel appends ``{"kind": "step", "desc": "pretrain", "n": 340, "total": 1000, "eta": 71.2}`` from long loops
  (:func:`lora_lens.utils.progress_bar` wraps its bar in :class:`lora_lens.events.Tracker` when the variable is
  set; at most one event a second). The kernel side lives in :mod:`lora_lens.events`, low in the house, so that
  every room can report progress; this module is the runner's side.

The runner's :class:`View` tails the files and renders one line: rewritten in place in a terminal, printed as plain
lines (when something changed, and at least every :data:`HEARTBEAT` seconds) otherwise. :func:`filter_stderr`
hides the kernel's transport warnings ("Kernel is running over TCP without encryption" …).
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, TextIO

from lora_lens.events import ENV, emit

__all__ = ["HEARTBEAT", "HIDDEN_STDERR", "TICK", "View", "env_for", "filter_stderr", "instrument_papermill",
           "progress_dir", "read_state", "render", "resume_hint", "section_of"]

HEARTBEAT = 10.0
"""Seconds between plain progress lines when the output is not a terminal."""
TICK = 1.0
"""Seconds between redraws."""
HIDDEN_STDERR = (re.compile(r"running over TCP without encryption"), re.compile(r"CurveZMQ"),
                 re.compile(r"^\s*warn\(\s*$"), re.compile(r"kernel_manager-provisioned"))
"""Kernel stderr lines that are never shown (jupyter_client / ipykernel transport warnings)."""


def progress_dir(run_dir: Path) -> Path:
    """Where a run's progress files live: a temporary folder (the run folder holds only results)."""
    import hashlib
    import tempfile

    digest = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"lora-lens-progress-{digest}"


def env_for(run_dir: Path, stem: str) -> dict[str, str]:
    """The variable that points a notebook's worker and kernel at its progress file."""
    folder = progress_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.jsonl"
    path.unlink(missing_ok=True)
    return {ENV: str(path)}


def section_of(cells: list, index: int) -> str:
    """The last markdown heading at or above cell ``index`` (without the ``#``), or ``""``."""
    for cell in reversed(cells[: index + 1]):
        if cell.get("cell_type") == "markdown":
            heads = [ln.lstrip("#").strip() for ln in cell.get("source", "").splitlines() if ln.startswith("#")]
            if heads:
                return heads[-1]
    return ""


def instrument_papermill() -> None:
    """In a worker process: make papermill emit a ``cell`` event (with the section) when each cell starts."""
    from papermill.engines import NotebookExecutionManager

    if getattr(NotebookExecutionManager.cell_start, "_lora_lens", False):
        return
    original = NotebookExecutionManager.cell_start

    def cell_start(self, cell, cell_index=None, **kwargs):
        if cell_index is not None:
            emit({"kind": "cell", "cell": cell_index, "cells": len(self.nb.cells),
                  "section": section_of(self.nb.cells, cell_index)})
        return original(self, cell, cell_index, **kwargs)

    cell_start._lora_lens = True
    NotebookExecutionManager.cell_start = cell_start


def filter_stderr(hidden: Iterable[re.Pattern] = HIDDEN_STDERR) -> None:
    """In a worker process: route file descriptor 2 (inherited by the kernel) through a filter that drops
    ``hidden`` lines and forwards the rest to the original stderr."""
    hidden = list(hidden)
    original = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def pump():
        with os.fdopen(read_fd, "rb") as src, os.fdopen(original, "wb", buffering=0) as dst:
            for line in src:
                if not any(p.search(line.decode("utf-8", "replace")) for p in hidden):
                    dst.write(line)

    threading.Thread(target=pump, name="lora-lens-stderr", daemon=True).start()


def read_state(path: Path) -> dict[str, Any]:
    """Fold a progress file into the notebook's latest state: ``section``, ``cell``, ``cells``, ``step``."""
    state: dict[str, Any] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return state
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue  # a line being written
        if ev.get("kind") == "cell":
            state.update(cell=ev.get("cell"), cells=ev.get("cells"), section=ev.get("section") or "")
            state.pop("step", None)
        elif ev.get("kind") == "step":
            state["step"] = ev
        elif ev.get("kind") == "step_done":
            state.pop("step", None)
    return state


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def render(stem: str, state: dict[str, Any], elapsed: float) -> str:
    """One notebook's progress as text, e.g. ``00_world_and_zoo 2m05s · 5 · Pretraining … · pretrain 340/1000 ETA 1m11s``."""
    parts = [f"{stem} {_duration(elapsed)}"]
    if state.get("cell") is not None and state.get("cells"):
        parts.append(f"cell {state['cell'] + 1}/{state['cells']}")
    if state.get("section"):
        parts.append(state["section"][:48])
    step = state.get("step")
    if step:
        total = f"/{step['total']}" if step.get("total") else ""
        eta = f" ETA {_duration(step['eta'])}" if step.get("eta") is not None else ""
        parts.append(f"{step.get('desc', 'loop')} {step['n']}{total}{eta}")
    return " · ".join(parts)


class View:
    """Render the running notebooks' progress to ``stream``: one updating line on a terminal, plain lines else."""

    def __init__(self, run_dir: Path, stream: TextIO | None = None, tty: bool | None = None,
                 heartbeat: float = HEARTBEAT):
        self.folder = progress_dir(run_dir)
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.heartbeat = heartbeat
        self.started: dict[str, float] = {}
        self._last_text, self._last_print, self._width = "", 0.0, 0

    def line(self, stems: Iterable[str], now: float | None = None) -> str:
        """The progress line of the notebooks ``stems`` now running."""
        now = time.monotonic() if now is None else now
        texts = []
        for stem in stems:
            self.started.setdefault(stem, now)
            texts.append(render(stem, read_state(self.folder / f"{stem}.jsonl"), now - self.started[stem]))
        return " | ".join(texts)

    def tick(self, stems: Iterable[str], now: float | None = None) -> None:
        """Redraw (terminal) or print a plain line when it changed or :attr:`heartbeat` seconds passed."""
        now = time.monotonic() if now is None else now
        text = self.line(list(stems), now)
        if not text:
            return
        if self.tty:
            cols = 200
            try:
                cols = os.get_terminal_size(self.stream.fileno()).columns
            except (OSError, ValueError, AttributeError):
                pass
            text = text[: max(20, cols - 1)]
            self.stream.write("\r\x1b[K" + text)
            self._width = len(text)
            self.stream.flush()
        else:
            changed = _strip_clock(text) != _strip_clock(self._last_text)
            if (changed and now - self._last_print >= 2.0) or now - self._last_print >= self.heartbeat:
                print(f"  … {text}", file=self.stream, flush=True)
                self._last_print = now
        self._last_text = text

    def clear(self) -> None:
        """Before a normal line is printed: wipe the updating line (terminal only)."""
        if self.tty and self._width:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._width = 0

    def done(self, stem: str) -> None:
        self.started.pop(stem, None)


def _strip_clock(text: str) -> str:
    return re.sub(r"\d+m\d{2}s|\b\d+s\b", "", text)


def resume_hint(run_dir: Path) -> str:
    """What to tell a user who pressed Ctrl-C."""
    return (f"\ninterrupted: notebooks that finished are kept in {run_dir}; continue with\n"
            f"  lora-lens run --resume {run_dir}")
