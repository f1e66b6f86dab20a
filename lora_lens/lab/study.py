"""Recipes the notebooks call: train an adapter on any base for any task, evaluate it, and cache it for later notebooks.

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

from lora_lens.errors import ConfigError, CorruptError, NotFoundError
from lora_lens.lab import parallel
from lora_lens.lab.adapters import MANIFEST, check_adapter_dir, load_adapter, read_manifest, save_adapter
from lora_lens.lab.probes import Evaluation, evaluate
from lora_lens.lab.real_models import is_real_model, real_model_path
from lora_lens.lab.task_file import problem_message
from lora_lens.lab.tasks import check_task, fill_base_answers
from lora_lens.lab.train import LoraSpec, check_spec, default_spec, train_lora
from lora_lens.lab.world import TASKS, Task, make_task
from lora_lens.lab.zoo import Pretrained, cache_dir, load_model
from lora_lens.utils import file_lock, stable_hash, write_json

__all__ = ["DEFAULT_SEEDS", "Fit", "base_identity", "base_label", "check_data_task", "check_sources", "fit_adapter",
           "results_table", "seed_list", "spec_kind", "train_adapter"]

DEFAULT_SEEDS = 3
"""Seeds of a notebook's headline numbers on the zoo when its ``seeds`` parameter is ``None``."""


@dataclass
class Fit:
    """A trained (or cached, or given) adapter on a base, with its evaluation.

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

    @property
    def rank(self) -> int:
        """The adapter's LoRA rank (as :class:`lora_lens.lens.inspect_adapter.OpenAdapter` has it)."""
        return self.spec.rank


def check_sources(base_model: str = "", family: str = "llama", adapter: str = "", task_file: str = "",
                  default_family: str = "llama", family_name: str = "family", base_name: str = "base_model") -> bool:
    """Check a notebook's model, adapter and task parameters before anything runs; True for a real (non-zoo) base.

    Args:
        base_model: A hub name, a model folder or ``smollm2-135m``; "" for the zoo ``family``.
        family: The zoo family parameter.
        adapter: A PEFT LoRA folder to study instead of training one; "" to train.
        task_file: A JSONL task file; "" for the synthetic world's tasks.
        default_family: The notebook's default ``family`` (a non-default one together with ``base_model`` is an
            error: which model is meant?).
        family_name: The notebook's name of the zoo parameter, for the messages (notebook 06: ``families``).
        base_name: The notebook's name of the ``base_model`` parameter, for the messages (notebook 06:
            ``base_models``).

    Raises:
        ConfigError: ``base_model`` with a non-default ``family``; ``base_model`` or ``adapter`` without a
            ``task_file``; a ``task_file`` without ``base_model`` (a zoo model reads only its world's words).
        NotFoundError: A file or folder parameter that does not exist (named).
    """
    if base_model and family != default_family:
        raise ConfigError(f"base_model={base_model!r} and {family_name}={family!r} are both given: set {family_name} "
                          f"back to {default_family!r} (it is ignored with a base_model) or base_model=\"\" for the "
                          "zoo")
    looks_local = base_model.startswith((".", "/", "~")) or base_model.count("/") > 1
    for name, value, must in (("base_model", base_model, looks_local), ("adapter", adapter, bool(adapter)),
                              ("task_file", task_file, bool(task_file))):
        if must and not Path(value).expanduser().exists():
            raise NotFoundError(f"{name}={value!r} does not exist: check the path"
                                + (" (or give a hub name / smollm2-135m)" if name == "base_model" else ""))
    if task_file and not base_model:
        raise ConfigError(f"task_file={task_file!r} needs {base_name}: a zoo model reads only its world's words; give "
                          f"the model{'s' if base_name.endswith('s') else ''} the task is for (e.g. {base_name}="
                          + ('["smollm2-135m"]' if base_name.endswith("s") else '"smollm2-135m"') + ")")
    for name, value in (("base_model", base_model), ("adapter", adapter)):
        if value and not task_file:
            raise ConfigError(f"{name}={value!r} needs a task_file (a JSONL task, e.g. examples/smollm2_facts.jsonl): "
                              "the synthetic world's tasks belong to the zoo models")
    return bool(base_model)


def seed_list(seeds, seed: int = 0, base_model: str = "", adapter: str = "") -> list[int]:
    """The seeds a notebook measures its headline numbers over: ``seed, seed + 1, …`` (``seeds`` of them).

    On the zoo, seed s is the world's seed, the base's pretraining seed and the adapter's seed. With your own
    ``base_model`` and no ``adapter`` it is the adapter's seed only (the base is fixed); with a given ``adapter``
    there is one adapter, so one seed whatever ``seeds`` says (the notebooks print so).

    Args:
        seeds: Number of seeds (an integer >= 1), or ``None``: :data:`DEFAULT_SEEDS` on the zoo, 1 with your own
            model (a real adapter takes minutes to train, so more seeds are asked for explicitly).
        seed: The first seed.
        base_model, adapter: The notebook's parameters of the same names.

    Raises:
        ConfigError: ``seeds`` or ``seed`` not an integer, or ``seeds`` below 1.

    Example:
        >>> seed_list(3, seed=0)
        [0, 1, 2]
    """
    if seeds is None:
        seeds = 1 if base_model or adapter else DEFAULT_SEEDS
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds={seeds!r} must be a positive integer (the number of seeds, e.g. 3) or None for "
                          f"the default ({DEFAULT_SEEDS} on the zoo, 1 with your own model)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed={seed!r} must be an integer, e.g. 0")
    return [seed] if adapter else list(range(seed, seed + seeds))


def base_identity(base) -> dict:
    """What names a base in the adapter cache: a zoo model's cache key, else its resolved folder with the size and
    modification time of every config, tokenizer and weights file (a path fingerprint), or its hub name.

    Args:
        base: A :class:`Pretrained`, a model folder, a hub name or a named real model (``"smollm2-135m"``).
    """
    if isinstance(base, Pretrained):
        return {"zoo": base.manifest["key"]}
    local = Path(str(base)).expanduser()
    if not local.exists() and is_real_model(str(base)):
        local = real_model_path(str(base), cache_dir())
    if local.is_dir():
        files = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(local.iterdir())
                 if f.is_file() and f.suffix in (".json", ".safetensors", ".model", ".jinja", ".txt")}
        return {"path": str(local.resolve()), "files": files}
    return {"hub": str(base)}


def base_label(base) -> str:
    """A short file-name-safe label of a base: ``family-size`` for a zoo model, else the folder or hub name's last
    part (at most 40 characters), e.g. ``smollm2-135m``."""
    if isinstance(base, Pretrained):
        return f"{base.family}-{base.size}"
    name = Path(str(base)).name or str(base)
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:40]


def _resolve_task(base, task, seed: int) -> Task:
    if isinstance(task, Task):
        return task
    if isinstance(task, Path) or (isinstance(task, str) and (task.endswith(".jsonl") or Path(task).exists())):
        return Task.load(task)
    if isinstance(task, str) and isinstance(base, Pretrained):
        return make_task(base.world, task, seed=seed)
    if isinstance(task, str) and task in TASKS:
        raise ConfigError(f"task={task!r} is a zoo task kind, which needs a zoo base (get_pretrained(...)); for the "
                          f"base {base!r} pass a task file (e.g. examples/smollm2_facts.jsonl) or a Task")
    raise ConfigError(f"task={task!r} is neither a Task, a task file nor a zoo task kind {list(TASKS)}: pass a "
                      "JSONL task file path or a Task")


def spec_kind(task: Task) -> str | None:
    """The :func:`lora_lens.lab.train.default_spec` kind of a task: its zoo kind, ``data`` for a task from data (no
    world), None for a world task of another name."""
    if task.name in TASKS:
        return task.name
    return "data" if task.world_fingerprint is None else None


def check_data_task(task: Task, tokenizer, base: str = "") -> None:
    """Refuse a task from data with problems for this tokenizer (:func:`lora_lens.lab.tasks.check_task`), every
    problem listed in one :class:`ConfigError` (naming ``base`` when given)."""
    problems = check_task(task, tokenizer)
    if problems:
        on = f" on base {base!r}" if base else ""
        raise ConfigError(problem_message(f"task {task.name!r}{on}", problems))


def fit_adapter(pre, task: str | Path | Task, seed: int = 0, spec: LoraSpec | None = None,
                cache: str | Path | None = None, device: str = "cpu", adapter: str | Path | None = None,
                rehearsal: str = "neighbours", **spec_overrides) -> Fit:
    """Train a LoRA adapter for ``task`` on a fresh copy of a base — or load it from the adapter cache.

    Works for any base and any task: a zoo model (:class:`Pretrained`) with a zoo task kind, or any causal LM (a
    local folder, a hub name, ``"smollm2-135m"``) with a task from data (a :class:`Task` or a JSONL task file).
    Probes of a task from data without an answer get the base's own greedy answer first
    (:func:`lora_lens.lab.tasks.fill_base_answers`), and the whole task is checked against the tokenizer before
    anything is trained or written. The cache key holds the base's identity (:func:`base_identity`), the task's
    content (``chat`` included), the spec, the rehearsal source and the seed.

    Args:
        pre: The base: a :class:`Pretrained` (``zoo.get_pretrained``), a model folder, a hub name or a named real
            model.
        task: A zoo task name (zoo bases only, built from ``pre.world`` with ``seed``), a :class:`Task`, or a
            task file path.
        seed: Task, initialisation and data-order seed.
        spec: The spec; default ``default_spec(kind, **spec_overrides)`` (kind ``data`` for a task from data).
        cache: Cache root (default as :func:`lora_lens.lab.zoo.cache_dir`).
        device: Torch device.
        adapter: A trained PEFT LoRA folder to evaluate instead of training one (checked against the base).
        rehearsal: For a task from data, what the rehearsal is drawn from (``train_data.REHEARSAL``).
        **spec_overrides: Fields of :class:`LoraSpec` (``rank``, ``targets`` …) applied to the default spec.

    Returns:
        A :class:`Fit`.

    Raises:
        ConfigError: A bad task name, spec or override, a task with problems for this tokenizer (every problem
            listed), ``chat: true`` without a chat template, or a base that is not a causal LM (before anything
            is written).
        NotFoundError: The base, the task file or the adapter folder does not exist.
        CorruptError: A task file that is not valid (file and line named).
        MismatchError: ``task`` belongs to another world than ``pre``, or ``adapter`` was trained on another base.
    """
    if parallel.processes() > 1:
        raise ConfigError(f"fit_adapter runs in one process (its cache is behind a file lock), not in each of "
                          f"{parallel.processes()} launched ones: train data parallel with train_adapter or "
                          "`lora-lens train`, then pass the folder as adapter=")
    task, spec, source, world, model, tokenizer = _prepared(pre, task, seed, spec, device, spec_overrides)
    data = task.world_fingerprint is None
    if adapter is not None:
        peft_model = load_adapter(model, adapter)
        folder = Path(adapter).expanduser()
        train = (read_manifest(folder).get("metrics") or {}) if (folder / MANIFEST).is_file() else {}
        return Fit(peft_model, tokenizer, task, spec, folder, evaluate(peft_model, tokenizer, task), train)
    ident = {"base": pre.manifest["key"]} if isinstance(pre, Pretrained) else {"base": base_identity(pre)}
    fields = {**ident, "task": task.name, "world": task.world_fingerprint, "truth": task.truth,
              "examples": stable_hash(task.examples), "spec": spec.to_dict(), "seed": seed}
    if data:
        fields |= {"records": stable_hash(task.records()), "chat": task.chat, "rehearsal": rehearsal}
    key = stable_hash(fields)
    root = cache_dir(cache)
    folder = root / "adapters" / f"{base_label(pre)}-{task.name}-r{spec.rank}-{key}"
    with file_lock(root / "locks" / f"{folder.name}.lock"):
        peft_model = None
        if (folder / "lora_lens_train.json").is_file():
            try:
                train = json.loads((folder / "lora_lens_train.json").read_text())
                peft_model = load_adapter(model, folder)
            except (CorruptError, ValueError) as exc:
                warnings.warn(f"cached adapter {folder} is unusable ({exc}); training it again", stacklevel=2)
                shutil.rmtree(folder)
                model, tokenizer = load_model(source, device=device)
        if peft_model is None:
            result = train_lora(model, tokenizer, task, spec, seed=seed, world=world, device=device,
                                rehearsal=rehearsal)
            peft_model, train = result.model, _save_fit(result, folder, pre, task, world)
    evaluation = evaluate(peft_model, tokenizer, task)
    return Fit(peft_model, tokenizer, task, spec, folder, evaluation, train)


def _prepared(pre, task, seed: int, spec: LoraSpec | None, device: str, spec_overrides: dict):
    """The task, spec, model source, world, model and tokenizer of one fit, checked before anything is trained."""
    task = _resolve_task(pre, task, seed)
    spec = check_spec(spec) if spec is not None else default_spec(spec_kind(task), **spec_overrides)
    source = pre.path if isinstance(pre, Pretrained) else pre
    world = pre.world if isinstance(pre, Pretrained) else None
    model, tokenizer = load_model(source, device=device)
    if task.world_fingerprint is None:
        check_data_task(task, tokenizer)
        task = fill_base_answers(task, model, tokenizer, sets=("specificity",))
    return task, spec, source, world, model, tokenizer


def _save_fit(result, folder: Path, pre, task: Task, world) -> dict:
    """Write a trained adapter as a complete adapter folder; returns its training record."""
    train = {"curve": result.curve, "train_seconds": result.train_seconds, **result.metrics}
    save_adapter(result, folder, base_path=pre.path if isinstance(pre, Pretrained) else None, task=task, world=world)
    task.save(folder / "task.jsonl")  # the planted truth, for `lora-lens inspect` and later notebooks
    # written last: its presence marks a complete entry (save_adapter itself is atomic)
    write_json(folder / "lora_lens_train.json", train)
    return train


def train_adapter(pre, task: str | Path | Task, out: str | Path, seed: int = 0, spec: LoraSpec | None = None,
                  device: str = "cpu", rehearsal: str = "neighbours", **spec_overrides) -> Path:
    """Train a LoRA adapter for ``task`` on a base and save it to ``out`` — on one process or data parallel.

    The same recipe as :func:`fit_adapter` (same task checks, spec and rehearsal), without the adapter cache, so
    that it can run under ``accelerate launch`` (or ``torchrun``) on several processes: each process trains on its
    share of every batch (``spec.batch_size`` is the global batch), gradients are averaged over the processes, and
    only the main process writes ``out``. With the same seed the adapter equals the one-process adapter up to
    the float rounding of the gradient all-reduce — as long as every batch is full: an epoch's last, shorter batch
    is topped up by accelerate with the epoch's first examples (its ``even_batches`` rule), so where the number of
    training rows is not a multiple of the batch the runs differ by those repeats. ``lora-lens train`` is the
    command for it.

    Args:
        pre: The base, as for :func:`fit_adapter`.
        task: A task file, a :class:`Task`, or a zoo task kind for a :class:`Pretrained` base.
        out: The adapter folder to write (an ordinary PEFT directory plus ``task.jsonl`` and
            ``lora_lens_train.json``); it must not exist or be empty, or be an adapter folder (replaced).
        seed: Initialisation and data-order seed.
        spec: The spec (default ``default_spec(kind, **spec_overrides)``).
        device: Torch device of each process.
        rehearsal: For a task from data, what the rehearsal is drawn from.
        **spec_overrides: Fields of :class:`LoraSpec`.

    Returns:
        ``out`` (on every process; written by the main one).

    Raises:
        As :func:`fit_adapter`, before anything is trained; ConfigError also when ``out`` is a file or a folder
        with other content (:func:`lora_lens.lab.adapters.check_adapter_dir`), or the batch does not split evenly
        over the processes.
    """
    out = check_adapter_dir(out)
    task, spec, _, world, model, tokenizer = _prepared(pre, task, seed, spec, device, spec_overrides)
    result = train_lora(model, tokenizer, task, spec, seed=seed, world=world, device=device, rehearsal=rehearsal)
    if parallel.is_main_process():
        _save_fit(result, out, pre, task, world)
    return out


def results_table(fits: dict) -> pd.DataFrame:
    """One row per fit: the key (e.g. task, rank, targets) then its main behaviour metrics and training time."""
    rows = []
    for key, fit in fits.items():
        m = fit.evaluation.metrics
        rows.append({**(dict(zip(("task", "rank", "targets"), key)) if isinstance(key, tuple) else {"task": key}),
                     "efficacy": m["efficacy"], "paraphrase": m["paraphrase"], "specificity": m["specificity"],
                     "perplexity_ratio": m["perplexity_ratio"], "stops": m.get("stops"),
                     "false_trigger_rate": m["false_trigger_rate"], "train_seconds": fit.train.get("train_seconds"),
                     "trainable_params": fit.train.get("trainable_params")})
    return pd.DataFrame(rows)
