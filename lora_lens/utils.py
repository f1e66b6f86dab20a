"""Small shared helpers: atomic writes, hashing, verified cache folders, seeding, progress bars and locks.

Importing it loads no torch (the ledger, the journal and the runner use it too): torch is imported where it is used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lora_lens.events import ENV, Tracker, trainer_callbacks

__all__ = ["atomic_dir", "file_lock", "quiet_transformers", "set_seed", "sha256_file", "show_progress", "stable_hash",
           "verify_manifest", "write_json"]


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    import torch

    torch.manual_seed(seed)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stable_hash(obj) -> str:
    """A short sha256 of a JSON-serialisable object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` as indented JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def verify_manifest(folder: str | Path, manifest: str) -> str | None:
    """Check a cache folder against the sha256 of every file its JSON ``manifest`` lists (under ``"files"``).

    Returns:
        None when every listed file is there with its sha256; otherwise what is wrong, in words.
    """
    folder = Path(folder)
    try:
        files = json.loads((folder / manifest).read_text())["files"]
        for name, digest in files.items():
            if not (folder / name).is_file():
                return f"{name} is missing"
            if sha256_file(folder / name) != digest:
                return f"{name} does not match its sha256"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"manifest unreadable: {exc}"
    return None


def _jsonable(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    torch = sys.modules.get("torch")  # a torch dtype can only be in obj if torch is loaded
    if isinstance(x, Path) or (torch is not None and isinstance(x, torch.dtype)):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


@contextlib.contextmanager
def atomic_dir(final: str | Path):
    """Yield a temporary folder next to ``final``; on success it is renamed to ``final`` (replacing it).

    On an exception the temporary folder is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the final folder should read like any other
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def file_lock(path: str | Path):
    """Hold an exclusive advisory lock on ``path`` (created if needed) for the duration of the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def show_progress() -> bool:
    """Whether long loops should draw progress bars.

    Bars are drawn in an interactive terminal or Jupyter session, and hidden under ``lora-lens run``/papermill
    (which cannot refresh them) or when ``LORA_LENS_QUIET=1``.
    """
    if os.environ.get("LORA_LENS_QUIET") == "1" or os.environ.get("LORA_LENS_RUN_ID"):
        return False
    return "ipykernel" in sys.modules or sys.stderr.isatty()


def progress_bar(iterable=None, total: int | None = None, desc: str | None = None):
    """A tqdm bar for a long loop, shown when :func:`show_progress` is true; under ``lora-lens run``
    (``$LORA_LENS_PROGRESS`` set) it also reports step and ETA to the runner (:mod:`lora_lens.events`)."""
    bar = tqdm(iterable, total=total, desc=desc, disable=not show_progress())
    if os.environ.get(ENV):
        return Tracker(bar, total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None),
                       desc)
    return bar


def progress_callbacks() -> list:
    """``transformers.Trainer`` callbacks reporting step and ETA under ``lora-lens run`` (else none)."""
    return trainer_callbacks()


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' own progress bars (weight loading/saving) unless :func:`show_progress` is true."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not show_progress():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
