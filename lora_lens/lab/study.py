"""Recipes the notebooks call: train an adapter on a zoo model, evaluate it, and cache it for later notebooks.

An adapter is cached like a pretrained model: under ``<cache>/adapters/<key>/``, keyed by the base's cache key, the
task, the spec and the seed, as an ordinary PEFT folder written by :func:`lora_lens.lab.adapters.save_adapter`. So a
workshop participant can open notebook 03 first: the adapter it needs is trained then, and reused afterwards.

Example:
    >>> pre = get_pretrained("llama", "small")                       # doctest: +SKIP
    >>> fit = fit_adapter(pre, "fact_edit", rank=8)                  # doctest: +SKIP
    >>> fit.evaluation.metrics["efficacy"]                           # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lora_lens.errors import CorruptError
from lora_lens.lab.adapters import load_adapter, save_adapter
from lora_lens.lab.probes import Evaluation, evaluate
from lora_lens.lab.train import LoraSpec, check_spec, default_spec, train_lora
from lora_lens.lab.world import Task, make_task
from lora_lens.lab.zoo import Pretrained, cache_dir, load_model
from lora_lens.utils import file_lock, stable_hash, write_json

__all__ = ["Fit", "fit_adapter", "results_table"]


@dataclass
class Fit:
    """A trained (or cached) adapter on a zoo base, with its evaluation.

    Attributes:
        model: The ``PeftModel`` (adapter toggled off with ``with model.disable_adapter():``).
        tokenizer: The base's tokenizer.
        task: The task it was trained on.
        spec: The spec trained with.
        adapter_dir: The cached adapter folder (an ordinary PEFT directory).
        evaluation: Behaviour against the base (:func:`lora_lens.lab.probes.evaluate`).
        train: Training record: ``curve`` (step/loss lists), ``train_seconds`` and the training metrics.
    """

    model: object
    tokenizer: object
    task: Task
    spec: LoraSpec
    adapter_dir: Path
    evaluation: Evaluation
    train: dict


def fit_adapter(pre: Pretrained, task: str | Task, seed: int = 0, spec: LoraSpec | None = None,
                cache: str | Path | None = None, device: str = "cpu", **spec_overrides) -> Fit:
    """Train a LoRA adapter for ``task`` on a fresh copy of ``pre`` — or load it from the adapter cache.

    Args:
        pre: The pretrained base (``zoo.get_pretrained``).
        task: A task name (built from ``pre.world`` with ``seed``) or a :class:`Task`.
        seed: Task, initialisation and data-order seed.
        spec: The spec; default ``default_spec(task name, **spec_overrides)``.
        cache: Cache root (default as :func:`lora_lens.lab.zoo.cache_dir`).
        device: Torch device.
        **spec_overrides: Fields of :class:`LoraSpec` (``rank``, ``targets`` …) applied to the default spec.

    Returns:
        A :class:`Fit`.

    Raises:
        ConfigError: A bad task name, spec or override (before anything is loaded or written).
        MismatchError: ``task`` belongs to another world than ``pre``.
    """
    task = make_task(pre.world, task, seed=seed) if isinstance(task, str) else task
    spec = check_spec(spec) if spec is not None else default_spec(task.name, **spec_overrides)
    key = stable_hash({"base": pre.manifest["key"], "task": task.name, "world": task.world_fingerprint,
                       "truth": task.truth, "examples": stable_hash(task.examples), "spec": spec.to_dict(), "seed": seed})
    root = cache_dir(cache)
    folder = root / "adapters" / f"{pre.family}-{pre.size}-{task.name}-r{spec.rank}-{key}"
    model, tokenizer = load_model(pre.path, device=device)
    with file_lock(root / "locks" / f"{folder.name}.lock"):
        peft_model = None
        if (folder / "lora_lens_train.json").is_file():
            try:
                train = json.loads((folder / "lora_lens_train.json").read_text())
                peft_model = load_adapter(model, folder)
            except (CorruptError, ValueError) as exc:
                warnings.warn(f"cached adapter {folder} is unusable ({exc}); training it again", stacklevel=2)
                shutil.rmtree(folder)
                model, tokenizer = load_model(pre.path, device=device)
        if peft_model is None:
            result = train_lora(model, tokenizer, task, spec, seed=seed, world=pre.world, device=device)
            peft_model = result.model
            train = {"curve": result.curve, "train_seconds": result.train_seconds, **result.metrics}
            save_adapter(result, folder, base_path=pre.path, task=task, world=pre.world)
            task.save(folder / "task.jsonl")  # the planted truth, for `lora-lens inspect` and later notebooks
            # written last: its presence marks a complete entry (save_adapter itself is atomic)
            write_json(folder / "lora_lens_train.json", train)
    evaluation = evaluate(peft_model, tokenizer, task)
    return Fit(peft_model, tokenizer, task, spec, folder, evaluation, train)


def results_table(fits: dict) -> pd.DataFrame:
    """One row per fit: the key (e.g. task, rank, targets) then its main behaviour metrics and training time."""
    rows = []
    for key, fit in fits.items():
        m = fit.evaluation.metrics
        rows.append({**(dict(zip(("task", "rank", "targets"), key)) if isinstance(key, tuple) else {"task": key}),
                     "efficacy": m["efficacy"], "paraphrase": m["paraphrase"], "specificity": m["specificity"],
                     "perplexity_ratio": m["perplexity_ratio"], "false_trigger_rate": m["false_trigger_rate"],
                     "train_seconds": fit.train["train_seconds"],
                     "trainable_params": fit.train.get("trainable_params")})
    return pd.DataFrame(rows)
