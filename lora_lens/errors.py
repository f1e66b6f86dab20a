"""Exceptions raised by lora_lens.

Every error a user can cause raises a subclass of :class:`LoraLensError` whose message names the bad value and
says how to fix it. They also subclass the matching built-in (``ValueError``, ``FileNotFoundError`` …) so that
generic ``except`` clauses keep working.
"""

__all__ = ["ConfigError", "CorruptError", "LoraLensError", "MismatchError", "NotFoundError", "NotebookError",
           "TrainingError", "WorkerError"]


class LoraLensError(Exception):
    """Base class of every error lora_lens raises on purpose."""


class ConfigError(LoraLensError, ValueError):
    """A parameter, configuration or specification is invalid."""


class NotFoundError(LoraLensError, FileNotFoundError):
    """A file, model, adapter or cache entry that was asked for does not exist."""


class MismatchError(LoraLensError, ValueError):
    """Two things that must fit together do not (adapter vs base, tokenizer vs model, task vs world)."""


class CorruptError(LoraLensError, ValueError):
    """A stored artifact failed its integrity check."""


class TrainingError(LoraLensError, RuntimeError):
    """Training had to stop (for example on a non-finite loss)."""


class NotebookError(LoraLensError, RuntimeError):
    """A notebook of the series failed or is malformed."""


class WorkerError(LoraLensError, RuntimeError):
    """A job run in a worker process failed, or the worker died (:func:`lora_lens.workers.run_jobs`)."""
