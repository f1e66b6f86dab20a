"""``lora-lens inspect``: a report on any PEFT LoRA adapter of a causal LM — weight space, vocabulary, behaviour.

:func:`inspect_adapter` loads the base (``--base`` or the adapter's ``base_model_name_or_path``) and the adapter
(with :func:`lora_lens.lab.adapters.load_adapter`'s checks), then gathers:

* the adapter's configuration;
* weight space (:mod:`lora_lens.lens.delta`): energy per module type and per layer, the modules with the largest
  ‖ΔW‖_F, effective and stable rank, amplification, intruder dimensions, and the leading write-side directions
  read as tokens;
* behaviour (:mod:`lora_lens.lens.diff`): for a lora_lens zoo base (its folder holds ``world.jsonl``) the diff over the
  world's whole query space, in words, scored against the planted truth when the task can be rebuilt; for any
  other model with a task file (``--task FILE``), the diff of the task's probes (and the mined prompts) with full
  answers — greedy continuations, base vs adapted — in words, grouped by entity, scored against the task's
  ``truth["edits"]`` when it has them; for any model with a prompt file, diff mining (prompts and token positions
  with the largest KL(base‖adapted)).

:class:`~lora_lens.lens.inspect_report.InspectReport` renders it as text, JSON and a standalone HTML page with
figures embedded as base64 PNG; :func:`write_inspect_report` writes ``report.json`` and ``report.html``
atomically.

Example:
    >>> report = inspect_adapter("out/adapters/fact_edit", prompts=["Dasur lives in"])   # doctest: +SKIP
    >>> print(report.text())                                                              # doctest: +SKIP
    >>> write_inspect_report(report, "inspect-fact_edit")                                        # doctest: +SKIP
"""


from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lora_lens.checks import check_positive
from lora_lens.errors import ConfigError, LoraLensError, MismatchError, NotFoundError
from lora_lens.lab.adapters import WEIGHTS, load_adapter, read_config, read_manifest
from lora_lens.lab.tasks import check_task, fill_base_answers
from lora_lens.lab.world import Task, World, check_task_world, make_task
from lora_lens.lab.zoo import load_model
from lora_lens.lens import delta
from lora_lens.lens.diff import (behaviour_diff, detect_triggers, mine_prompts, read_prompts, score_against_truth,
                                 semantic_report)
from lora_lens.lens.inspect_report import InspectReport
from lora_lens.utils import write_json

__all__ = ["CONFIG_KEYS", "REPORT_FILES", "OpenAdapter", "check_out_dir", "default_out_dir", "inspect_adapter",
           "open_adapter", "write_inspect_report"]

REPORT_FILES = ("report.json", "report.html")
CONFIG_KEYS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "init_lora_weights", "target_modules",
               "modules_to_save", "fan_in_fan_out", "bias", "rank_pattern", "alpha_pattern", "task_type",
               "base_model_name_or_path", "peft_version")


# ---------------------------------------------------------------------------------------------------------------
# building the report


def _resolve_base(adapter_dir: Path, config: dict, base) -> str:
    if base:
        return str(base)
    name = config.get("base_model_name_or_path")
    if not name and (adapter_dir / "lora_lens_manifest.json").is_file():
        name = (read_manifest(adapter_dir).get("base") or {}).get("path")
    if not name:
        raise ConfigError(f"{adapter_dir}/adapter_config.json does not name its base model "
                          "(base_model_name_or_path is empty): pass --base NAME_OR_PATH")
    return str(name)


def _zoo_world(base: str, notes: list[str]):
    """The world of a lora_lens zoo base (its folder holds world.jsonl), else None."""
    path = Path(base).expanduser() / "world.jsonl"
    if not path.is_file():
        return None
    try:
        return World.load(path)
    except LoraLensError as exc:
        notes.append(f"the base folder has a world.jsonl that cannot be read ({exc}); no world diff")
        return None


def _zoo_base(base: str) -> bool:
    return (Path(base).expanduser() / "world.jsonl").is_file()


def _load_data_task(task) -> Task:
    """A task from data for a base that is not a zoo model: a :class:`Task` or a task file."""
    if isinstance(task, Task):
        return task
    path = Path(task).expanduser()
    if not path.is_file():
        raise NotFoundError(f"task file {path} does not exist: pass a JSONL task file (see lora_lens.lab.task_file)")
    return Task.load(path)


def _find_task(adapter_dir: Path, manifest: dict | None, world, task, notes: list[str]):
    """``(task or None, info or None)``: an explicit task file, ADAPTER_DIR/task.jsonl, or the manifest's record."""
    def load(path: Path, source: str):
        try:
            t = Task.load(path)
        except LoraLensError as exc:
            raise ConfigError(f"task file {path} cannot be read ({exc}): pass a file written by "
                              "task.save(path)") from exc
        check_task_world(t, world)
        return t, {"name": t.name, "source": source}

    if task is not None:
        if isinstance(task, Task):
            check_task_world(task, world)
            return task, {"name": task.name, "source": "argument"}
        path = Path(task).expanduser()
        if not path.is_file():
            raise NotFoundError(f"task file {path} does not exist: pass a file written by task.save(path)")
        return load(path, str(path))
    if (adapter_dir / "task.jsonl").is_file():
        return load(adapter_dir / "task.jsonl", str(adapter_dir / "task.jsonl"))
    info = (manifest or {}).get("task") or {}
    name = info.get("name")
    if not name:
        notes.append("the adapter records no task: the diff covers the world's whole query space, unscored")
        return None, None
    if info.get("world_fingerprint") and info["world_fingerprint"] != world.fingerprint():
        notes.append(f"the manifest's task {name!r} belongs to world {info['world_fingerprint']}, not to the base's "
                     f"world {world.fingerprint()}: not scored")
        return None, None
    if "seed" in info:
        t = make_task(world, name, seed=info["seed"], **(info.get("kwargs") or {}))
        return t, {"name": name, "source": f"make_task(world, {name!r}, seed={info['seed']})"}
    notes.append(f"the manifest names task {name!r} but not its seed or arguments, so its planted truth cannot be "
                 "rebuilt: the diff covers the world's whole query space, unscored. To score it, save the task next "
                 "to the adapter (task.save(ADAPTER_DIR/'task.jsonl')) or pass --task FILE")
    return None, {"name": name, "source": "manifest (not rebuilt)"}


@dataclass
class OpenAdapter:
    """A PEFT adapter loaded on its base, with the task it is studied on (what a notebook needs of a fit).

    Attributes:
        model: The ``PeftModel`` (base obtained with ``with model.disable_adapter():``).
        tokenizer: The base's tokenizer.
        task: The task (its specificity / general probes without an answer expect the base's own answer).
        adapter_dir: The adapter folder.
        rank: The adapter's LoRA rank ``r``.
    """

    model: object
    tokenizer: object
    task: Task
    adapter_dir: Path
    rank: int


def open_adapter(base_model: str | Path, adapter: str | Path, task_file: str | Path, device: str = "cpu") -> OpenAdapter:
    """Load a PEFT LoRA ``adapter`` on ``base_model`` (hub name, local folder or ``"smollm2-135m"``) and the task
    file it is studied on — every file checked before the model is loaded, the task against the tokenizer after.

    Raises:
        NotFoundError: No adapter folder / config / weights, or no task file.
        ConfigError: A task that does not fit the tokenizer (every problem with its line).
        MismatchError: The adapter was trained on another base.
    """
    folder = Path(adapter).expanduser()
    config = read_config(folder)
    if not (folder / WEIGHTS).is_file():
        raise NotFoundError(f"{folder} has no {WEIGHTS}: pass a PEFT adapter folder (peft_model.save_pretrained)")
    task = _load_data_task(task_file)
    model, tokenizer = load_model(base_model, device=device)
    problems = check_task(task, tokenizer)
    if problems:
        raise ConfigError(f"task {task.name!r} does not fit the base {base_model}'s tokenizer:\n  "
                          + "\n  ".join(problems[:10]))
    try:
        pm = load_adapter(model, folder)
    except MismatchError as exc:
        raise MismatchError(f"adapter {folder} does not fit the base {base_model}: {exc}") from exc
    # the base answers with the adapter switched off (load_adapter wraps the base in place)
    return OpenAdapter(pm.eval(), tokenizer, fill_base_answers(task, pm, tokenizer), folder, int(config.get("r", 0)))


def check_out_dir(out: str | Path) -> Path:
    """Validate a report folder before anything is computed: absent, empty, or holding only a previous report.

    Raises:
        ConfigError: ``out`` is a file, or a folder with other files (refused rather than mixed with a report).
    """
    out = Path(out).expanduser()
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out} is a file: choose a folder for report.json and report.html")
        other = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES and not p.name.startswith("."))
        if other:
            raise ConfigError(f"--out {out} already holds other files ({', '.join(other[:3])}"
                              f"{' …' if len(other) > 3 else ''}): refusing to write a report there; choose a new "
                              "or empty folder (a folder with only a previous report.json/report.html is replaced)")
    return out


def default_out_dir(adapter_dir: str | Path) -> Path:
    """``./inspect-<adapter folder name>/`` in the current directory."""
    return Path.cwd() / f"inspect-{Path(adapter_dir).expanduser().resolve().name}"


def inspect_adapter(adapter_dir: str | Path, base: str | Path | None = None, prompts=None, task=None, top: int = 10,
                    device: str = "cpu", batch_size: int = 64, max_new_tokens: int = 16) -> InspectReport:
    """Load an adapter on its base and gather the weight-space and behaviour report.

    Works on any PEFT LoRA adapter of a causal LM. Inputs are checked before the model is loaded (the adapter's
    config and weights file, the prompt file), and the adapter is loaded with
    :func:`lora_lens.lab.adapters.load_adapter`, whose checks turn a base of another architecture or size into an
    error.

    Args:
        adapter_dir: A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
        base: The base model (hub name or local folder); default: the adapter's ``base_model_name_or_path``.
            Loaded with :func:`lora_lens.lab.zoo.load_model` (``HF_HUB_OFFLINE=1`` is honoured).
        prompts: A prompt file path (see :func:`lora_lens.lens.diff.read_prompts`) or a list of prompts, for diff
            mining.
        task: A :class:`lora_lens.lab.world.Task` or a task file to score against; default: ``ADAPTER_DIR/task.jsonl``
            or a task the manifest records with its seed.
        top: Rows of the short tables (modules, prompts, positions, tokens).
        device: Torch device.
        batch_size: Prompts per forward pass.
        max_new_tokens: With a task from data: the longest greedy answer read (base answers of probes without
            one, and the behaviour diff's full answers).

    Returns:
        An :class:`InspectReport`.

    Raises:
        NotFoundError: No adapter folder, config, weights file, base model or prompt file.
        ConfigError: Not a LoRA adapter, no base named, bad prompt file, bad ``top`` or ``max_new_tokens``.
        MismatchError: The base does not fit the adapter (architecture, shapes, weights), or a task of another
            world.
        CorruptError: Damaged adapter files.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ConfigError(f"top={top!r} must be a positive integer, e.g. 10")
    check_positive("max_new_tokens", max_new_tokens)
    folder = Path(adapter_dir).expanduser()
    config = read_config(folder)
    if not (folder / WEIGHTS).is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ConfigError(f"{folder} holds only pickled weights (adapter_model.bin), which lora_lens does not "
                              "load: re-save it with peft_model.save_pretrained(dir, safe_serialization=True)")
        raise NotFoundError(f"{folder} has no {WEIGHTS}: the adapter's weights file is missing; save the adapter "
                            "again (peft_model.save_pretrained(dir))")
    if prompts is not None and isinstance(prompts, (str, Path)):
        prompts = read_prompts(prompts)
    elif prompts is not None:
        prompts = list(prompts)
    manifest = read_manifest(folder) if (folder / "lora_lens_manifest.json").is_file() else None
    base_name = _resolve_base(folder, config, base)
    notes: list[str] = []

    task_data = None
    if task is not None and not _zoo_base(base_name):
        task_data = _load_data_task(task)     # checked before the model is loaded

    model, tokenizer = load_model(base_name, device=device)
    if task_data is not None:
        problems = check_task(task_data, tokenizer)
        if problems:
            raise ConfigError(f"task {task_data.name!r} does not fit the base {base_name}'s tokenizer:\n  "
                              + "\n  ".join(problems[:10]))
        task_data = fill_base_answers(task_data, model, tokenizer, max_new_tokens=max_new_tokens)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pm = load_adapter(model, folder)
        except MismatchError as exc:
            raise MismatchError(f"the base {base_name} does not fit adapter {folder}: {exc}") from exc
        summary = delta.summary(pm)
    notes += sorted({str(w.message) for w in caught if issubclass(w.category, UserWarning)
                     and "fan_in_fan_out" not in str(w.message)})
    hf = pm.get_base_model()
    model_info = {"architecture": (getattr(hf.config, "architectures", None) or [type(hf).__name__])[0],
                  "model_type": getattr(hf.config, "model_type", None),
                  "n_params": int(sum(p.numel() for n, p in pm.named_parameters() if "lora_" not in n)),
                  "lora_params": int(sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n))}
    try:
        directions = delta.directions_table(pm, tokenizer, k=1, top=top, role="write", sign="both")
    except LoraLensError as exc:
        directions = pd.DataFrame()
        notes.append(f"write-side directions could not be read as tokens: {exc}")
    report = InspectReport(
        adapter_dir=str(folder), base=base_name, config={k: config.get(k) for k in CONFIG_KEYS if k in config},
        model=model_info,
        manifest=None if manifest is None else {k: manifest.get(k) for k in ("task", "spec", "metrics", "base")},
        summary=summary, energy_layer=delta.energy_by(summary, "layer"),
        energy_type=delta.energy_by(summary, "module_type"), energy_depth=delta.energy_by(summary, "depth_bin"),
        amplification=delta.amplification(summary), directions=directions, notes=notes, top=top)

    world = _zoo_world(base_name, notes)
    if world is not None:
        task_obj, report.task = _find_task(folder, manifest, world, task, notes)
        relations = list(world.relations)
        if (task_obj is not None and task_obj.name == "new_relation") or (report.task or {}).get("name") == \
                "new_relation":
            relations.append("birthplace")
        report.diff = behaviour_diff(pm, tokenizer, world=world, batch_size=batch_size, relations=relations,
                                     top_k=top)
        report.triggers = detect_triggers(report.diff)
        report.semantic = semantic_report(report.diff, world, task_obj, max_lines=3 * top)
        if task_obj is not None:
            report.score = score_against_truth(report.diff, task_obj)
    if prompts is not None:
        report.mining = mine_prompts(pm, tokenizer, prompts, top=top, batch_size=min(batch_size, 16), top_k=top)
    if world is None and task_data is not None:
        # any model with a task from data: the task's probes (and the mined prompts) with full answers
        mined = None if report.mining is None else list(dict.fromkeys(report.mining.positions["prompt"]))
        report.diff = behaviour_diff(pm, tokenizer, task=task_data, prompts=mined or None, batch_size=batch_size,
                                     max_new_tokens=max_new_tokens)
        report.semantic = semantic_report(report.diff, task=task_data, max_lines=3 * top)
        report.task = {"name": task_data.name, "source": str(task) if not isinstance(task, Task) else "argument"}
        if task_data.truth.get("edits"):
            report.score = score_against_truth(report.diff, task_data)
        else:
            notes.append(f"task {task_data.name!r} has no truth (truth.edits): the diff is reported, not scored")
    if world is None and prompts is None and task_data is None:
        notes.append("no behaviour probes: the base is not a lora_lens zoo model, so pass --prompts FILE (one prompt "
                     "per line) for diff mining")
    return report


def write_inspect_report(report: InspectReport, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``out_dir``, each atomically (temp file, then rename).

    Raises:
        ConfigError: ``out_dir`` is a file or holds other files (see :func:`check_out_dir`).
    """
    out = check_out_dir(out_dir)
    page = report.html()
    data = report.to_json()
    out.mkdir(parents=True, exist_ok=True)
    json_path = write_json(out / "report.json", data)
    html_path = out / "report.html"
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".report.html.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, html_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    mask = os.umask(0)
    os.umask(mask)
    for path in (json_path, html_path):     # temp files are private; a report reads like any other file
        os.chmod(path, 0o666 & ~mask)
    return json_path, html_path

