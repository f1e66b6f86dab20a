"""Save and load LoRA adapters as ordinary PEFT directories, with a manifest that ties them to their base.

A saved adapter is what ``peft`` writes (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with
plain ``peft.PeftModel.from_pretrained``) plus ``lora_lens_manifest.json``: the base model's fingerprint
(architecture, config hash, weights hash), the task and its world, the training spec, final metrics, library
versions and the sha256 of every adapter file. :func:`load_adapter` checks all of that **before** any weight is
touched, and turns PEFT's size-mismatch tracebacks and silent partial loads into errors that say what to do.

Example:
    >>> result = train_lora(model, tok, task)                               # doctest: +SKIP
    >>> path = save_adapter(result, "out/adapters/fact_edit", task=task)     # doctest: +SKIP
    >>> base, tok = load_model(pretrained.path)                               # doctest: +SKIP
    >>> peft_model = load_adapter(base, path)                                 # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import warnings
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import peft
import safetensors
import torch
import transformers
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors import safe_open
from transformers.pytorch_utils import Conv1D

from lora_lens import __version__
from lora_lens.errors import ConfigError, CorruptError, MismatchError, NotFoundError, TrainingError
from lora_lens.lab.train import LoraSpec, TrainResult, check_no_lora
from lora_lens.lab.zoo import load_model
from lora_lens.utils import atomic_dir, sha256_file, stable_hash, write_json

MANIFEST = "lora_lens_manifest.json"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
FORMAT = "lora_lens.adapter"
FORMAT_VERSION = 1

__all__ = ["CONFIG", "FORMAT", "FORMAT_VERSION", "MANIFEST", "WEIGHTS", "base_fingerprint", "base_params",
           "check_adapter", "check_adapter_dir", "load_adapter", "load_base_and_adapter", "read_config",
           "read_manifest", "save_adapter"]
# config entries that describe how a model runs, not what it is
_RUNTIME_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache", "_attn_implementation",
                 "_attn_implementation_autoset", "output_attentions", "output_hidden_states", "return_dict",
                 "_commit_hash", "_experts_implementation", "architectures"}
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude_vector|"
                       r"lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


# ---------------------------------------------------------------------------------------------- fingerprint


def _base_of(model):
    return model.get_base_model() if isinstance(model, PeftModel) else model


def base_params(model) -> list[tuple[str, torch.Tensor]]:
    """The base model's parameters by their names in the plain base (LoRA parameters left out).

    For a ``PeftModel`` the wrapped layers' ``base_layer`` weights are reported under the original names, so a
    base and the same base wrapped by peft give the same list.
    """
    out = []
    for name, p in _base_of(model).named_parameters():
        if "lora_" in name:
            continue
        out.append((name.replace(".base_layer.", "."), p))
    return sorted(out, key=lambda x: x[0])


def base_fingerprint(model, weights: bool = True) -> dict:
    """What identifies a base model: architecture, model type, config hash, dtype and a hash of its weights.

    Args:
        model: A causal LM or a ``PeftModel`` (the adapter is ignored: its base weights are hashed).
        weights: Also hash every base parameter (deterministic; a few seconds per billion parameters).

    Returns:
        ``{"architecture", "model_type", "config_hash", "dtype", "weights_hash", "n_params"}``.
    """
    base = _base_of(model)
    config = base.config
    cfg = {k: v for k, v in config.to_dict().items() if k not in _RUNTIME_KEYS and not k.startswith("_")}
    params = base_params(model)
    out = {"architecture": (getattr(config, "architectures", None) or [type(base).__name__])[0],
           "model_type": getattr(config, "model_type", None), "config_hash": stable_hash(cfg),
           "dtype": str(params[0][1].dtype).replace("torch.", "") if params else None,
           "n_params": sum(p.numel() for _, p in params), "weights_hash": None}
    if weights:
        h = hashlib.sha256()
        for name, p in params:
            t = p.detach().to("cpu").contiguous()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        out["weights_hash"] = h.hexdigest()[:32]
    return out


def _versions() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "safetensors": safetensors.__version__, "lora_lens": __version__}


# ----------------------------------------------------------------------------------------------------- save


def check_adapter_dir(out_dir: str | Path) -> Path:
    """``out_dir`` resolved, if an adapter may be written there: a new or empty folder, or an adapter folder (which
    is replaced). Call it before a long training run, so that a bad folder is refused before the work.

    Raises:
        ConfigError: ``out_dir`` is a file, or a non-empty folder that is not an adapter.
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"{out} exists and is a file: choose a folder name for the adapter")
        if any(out.iterdir()) and not (out / CONFIG).is_file():
            raise ConfigError(f"{out} is a non-empty folder that is not an adapter: refusing to overwrite it; choose "
                              "another out_dir (e.g. a sub-folder) or empty it first")
    return out


def save_adapter(peft_model, out_dir: str | Path, base_path: str | Path | None = None, task=None, spec=None,
                 metrics: dict | None = None, world=None) -> Path:
    """Save an adapter as a plain PEFT directory plus ``lora_lens_manifest.json``; atomic.

    Args:
        peft_model: The ``PeftModel``, or a :class:`lora_lens.lab.train.TrainResult` (its spec and metrics are used
            unless given).
        out_dir: Destination folder. An existing adapter folder is replaced; any other non-empty folder is refused.
        base_path: Where the base model lives (a ``save_pretrained`` folder or hub id); written as
            ``base_model_name_or_path`` so plain PEFT finds it. Default: the folder the base was loaded from
            (for zoo models ``Pretrained.path``).
        task: The :class:`lora_lens.lab.world.Task` trained on (its name and world are recorded); default: the
            task of a ``TrainResult``.
        spec: The :class:`lora_lens.lab.train.LoraSpec` (or a dict).
        metrics: Final metrics (JSON-serialisable).
        world: The task's world (its seed is recorded); default: the ``world.jsonl`` next to a zoo base.

    Returns:
        The adapter folder.

    Raises:
        ConfigError: Not a PeftModel, more than one adapter, or ``out_dir`` is a non-adapter folder.
        TrainingError: The adapter weights are not finite (nothing is written).
    """
    if isinstance(peft_model, TrainResult):
        if task is None:
            task = SimpleNamespace(name=peft_model.task_name, world_fingerprint=peft_model.world_fingerprint)
        spec = peft_model.spec if spec is None else spec
        metrics = peft_model.metrics if metrics is None else metrics
        peft_model = peft_model.model
    if not isinstance(peft_model, PeftModel):
        raise ConfigError(f"save_adapter needs a peft PeftModel (e.g. train_lora(...).model), not "
                          f"{type(peft_model).__name__}")
    names = list(peft_model.peft_config)
    if len(names) != 1:
        raise ConfigError(f"the model has {len(names)} adapters {names}: save_adapter saves exactly one; delete the "
                          "others with peft_model.delete_adapter(name) or save them with peft_model.save_pretrained")
    name = names[0]
    out = check_adapter_dir(out_dir)
    bad = [n for n, p in peft_model.named_parameters() if "lora_" in n and not torch.isfinite(p).all()]
    if bad:
        raise TrainingError(f"the adapter has non-finite weights ({bad[0]} and {len(bad) - 1} more): it was not "
                            "saved; retrain with a lower learning rate")
    base = _base_of(peft_model)
    if base_path is None:
        base_path = getattr(base.config, "_name_or_path", None) or None
    if base_path is not None and Path(str(base_path)).expanduser().exists():
        base_path = Path(str(base_path)).expanduser().resolve()
    if isinstance(spec, LoraSpec):
        spec = spec.to_dict()
    world_info = _task_world(task, world, base_path)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "base": {**base_fingerprint(peft_model), "path": None if base_path is None else str(base_path)},
                "task": world_info, "spec": spec, "metrics": metrics or {}, "versions": _versions()}
    cfg = peft_model.peft_config[name]
    old = cfg.base_model_name_or_path
    cfg.base_model_name_or_path = None if base_path is None else str(base_path)
    try:
        with atomic_dir(out) as tmp:
            peft_model.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True)
            (tmp / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
            src = tmp / name if name != "default" else tmp
            if src != tmp:
                for f in src.iterdir():
                    f.rename(tmp / f.name)
                src.rmdir()
            manifest["files"] = {f: sha256_file(tmp / f) for f in (CONFIG, WEIGHTS)}
            write_json(tmp / MANIFEST, manifest)
    finally:
        cfg.base_model_name_or_path = old
    return out


def _task_world(task, world, base_path) -> dict | None:
    if task is None:
        return None
    info = {"name": getattr(task, "name", str(task)), "world_fingerprint": getattr(task, "world_fingerprint", None),
            "world_seed": None}
    if world is not None and world.fingerprint() == info["world_fingerprint"]:
        info["world_seed"] = world.seed
    elif base_path is not None and (Path(str(base_path)) / "world.jsonl").is_file():
        try:
            with open(Path(str(base_path)) / "world.jsonl", encoding="utf-8") as f:
                head = json.loads(f.readline())
            if head.get("fingerprint") == info["world_fingerprint"]:
                info["world_seed"] = head.get("seed")
        except (OSError, ValueError):
            pass
    return info


# ----------------------------------------------------------------------------------------------------- load


def read_manifest(adapter_dir: str | Path) -> dict:
    """The lora_lens manifest of an adapter folder.

    Raises:
        NotFoundError: No folder, or no manifest (an adapter made by plain PEFT).
        CorruptError: The manifest is not valid JSON or not a lora_lens manifest.
    """
    path = Path(adapter_dir).expanduser() / MANIFEST
    if not path.parent.is_dir():
        raise NotFoundError(f"adapter folder {path.parent} does not exist: check the path")
    if not path.is_file():
        raise NotFoundError(f"{path.parent} has no {MANIFEST}: it was not saved by lora_lens.save_adapter")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptError(f"{path} is not valid JSON ({exc}): save the adapter again with save_adapter") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptError(f"{path} is not a lora_lens adapter manifest (format != {FORMAT!r})")
    return manifest


def read_config(adapter_dir: str | Path) -> dict:
    """``adapter_config.json`` of an adapter folder, with the lora_lens checks on its keys.

    Raises:
        NotFoundError: No folder or no config.
        CorruptError: The config is not valid JSON.
        ConfigError: Not a LoRA adapter, or keys this peft version does not know (named in the message).
    """
    folder = Path(adapter_dir).expanduser()
    if not folder.is_dir():
        raise NotFoundError(f"adapter folder {folder} does not exist: check the path (a folder written by "
                            "save_adapter or peft's save_pretrained)")
    path = folder / CONFIG
    if not path.is_file():
        raise NotFoundError(f"{folder} has no {CONFIG}: it is not a PEFT adapter folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptError(f"{path} is not valid JSON ({exc}): the adapter is damaged; save it again") from exc
    if not isinstance(config, dict):
        raise CorruptError(f"{path} does not hold a JSON object: the adapter is damaged; save it again")
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{path} has peft_type={config.get('peft_type')!r}: lora_lens loads LoRA adapters only")
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ConfigError(f"{path} has keys this peft version does not know: {unknown}. They would be ignored and "
                          "the adapter might behave differently; upgrade peft (the adapter was written by "
                          f"peft {config.get('peft_version', '?')}), or delete those keys if you know they are unused")
    return config


def check_adapter(base_model, adapter_dir: str | Path, verify_weights: bool = True) -> dict:
    """Every check :func:`load_adapter` makes, without loading anything; returns the manifest (or None).

    Order: folder, config (parsable, known keys), weights file, file hashes vs the manifest, base fingerprint vs the
    manifest, then tensor shapes in the safetensors header vs the base's modules. Adapters without a manifest (plain
    PEFT) get a warning and the shape checks.

    Raises:
        NotFoundError: Folder, config or weights file missing.
        CorruptError: A file does not match its sha256, or JSON that does not parse.
        ConfigError: Unknown config keys, or pickled (``.bin``) weights only.
        MismatchError: Another base model, or a rank/shape/module mismatch.
    """
    folder = Path(adapter_dir).expanduser()
    config = read_config(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise ConfigError(f"{folder} holds only pickled weights (adapter_model.bin), which lora_lens does not "
                              "load: re-save it with peft_model.save_pretrained(dir, safe_serialization=True)")
        raise NotFoundError(f"{folder} has no {WEIGHTS}: the weights file is missing; save the adapter again")
    manifest = None
    if (folder / MANIFEST).is_file():
        manifest = read_manifest(folder)
        for name, digest in manifest.get("files", {}).items():
            if not (folder / name).is_file():
                raise NotFoundError(f"{folder / name} is missing (listed in the manifest): save the adapter again")
            if sha256_file(folder / name) != digest:
                raise CorruptError(f"{folder / name} does not match the sha256 in {MANIFEST}: the file is corrupt or "
                                   "was edited; save the adapter again from its PeftModel")
        _check_fingerprint(base_model, manifest, verify_weights)
    else:
        warnings.warn(f"{folder} has no {MANIFEST} (made by plain PEFT?): it cannot be checked against its base; "
                      "only tensor shapes are checked", stacklevel=3)
    _check_shapes(base_model, folder, config)
    return manifest


def _check_fingerprint(base_model, manifest: dict, verify_weights: bool) -> None:
    want = manifest.get("base") or {}
    have = base_fingerprint(base_model, weights=verify_weights and want.get("weights_hash") is not None)
    where = want.get("path")
    hint = (f"load the base it was trained on: `load_base_and_adapter(adapter_dir)` or load_model({str(where)!r})"
            if where else "load the base it was trained on")
    for key, what in (("architecture", "architecture"), ("model_type", "model type"),
                      ("config_hash", "config (layers, widths, vocabulary …)"), ("dtype", "dtype"),
                      ("weights_hash", "weights")):
        if key == "weights_hash" and not verify_weights:
            continue
        if want.get(key) is not None and have.get(key) != want.get(key):
            extra = ""
            if key == "weights_hash":
                extra = (" (same architecture and config, different weights: another pretraining seed or world, "
                         "or a modified or merged copy)")
            if key == "dtype":
                extra = f" (load the base with dtype=torch.{want['dtype']})"
            raise MismatchError(f"this adapter was trained on another base: its {what} differs — adapter "
                                f"{want.get(key)!r}, given base {have.get(key)!r}{extra}. {hint}")


def _module_dims(mod) -> tuple[int, int] | None:
    if isinstance(mod, Conv1D):
        return int(mod.weight.shape[0]), int(mod.weight.shape[1])
    if isinstance(mod, torch.nn.Linear):
        return mod.in_features, mod.out_features
    if isinstance(mod, torch.nn.Embedding):
        return mod.num_embeddings, mod.embedding_dim
    return None


def _check_shapes(base_model, folder: Path, config: dict) -> None:
    check_no_lora(base_model)
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CorruptError(f"{folder / WEIGHTS} is not a readable safetensors file ({exc}): save the adapter "
                           "again") from exc
    modules = dict(base_model.named_modules())
    params = dict(base_model.named_parameters())
    by_module: dict[str, dict[str, list]] = {}
    for key, shape in shapes.items():
        m = _LORA_KEY.match(key)
        if m is None:
            pname = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
            if pname in params and list(params[pname].shape) == shape:
                continue  # modules_to_save / trainable tokens: a full copy of a base parameter
            raise MismatchError(f"adapter tensor {key} {shape} matches nothing in the base "
                                f"({type(base_model).__name__}): the adapter was made for another model")
        by_module.setdefault(m["module"], {})[m["part"]] = shape
    rank_pattern = config.get("rank_pattern") or {}
    r = config.get("r")
    for module, parts in sorted(by_module.items()):
        if module not in modules:
            raise MismatchError(f"the adapter has weights for module {module!r}, which the base "
                                f"({type(base_model).__name__}) does not have: it was made for another architecture")
        dims = _module_dims(modules[module])
        if dims is None:
            raise MismatchError(f"the adapter has LoRA weights for {module!r}, which is a "
                                f"{type(modules[module]).__name__} in the base, not a linear layer")
        d_in, d_out = dims
        a = parts.get("lora_A") or parts.get("lora_embedding_A")
        b = parts.get("lora_B") or parts.get("lora_embedding_B")
        if a is None or b is None:
            raise CorruptError(f"the adapter file has only part of the LoRA pair for {module!r} "
                               f"({sorted(parts)}): the file is incomplete; save the adapter again")
        rank = a[0]
        want_a, want_b = [rank, d_in], [d_out, rank]  # embeddings: d_in = vocabulary, d_out = width
        if a != want_a or b != want_b:
            raise MismatchError(f"shape mismatch at {module}: the adapter has A {a} and B {b}, but the base layer is "
                                f"{d_in}→{d_out} (expects A [r, {d_in}], B [{d_out}, r]): the adapter was made for "
                                "a base of another size")
        if not rank_pattern and r is not None and rank != r:
            raise MismatchError(f"rank mismatch at {module}: adapter_config.json says r={r} but the weights have "
                                f"rank {rank}: the config and weights come from different adapters; save it again")
        if "lora_magnitude_vector" in parts and parts["lora_magnitude_vector"] != [d_out]:
            raise MismatchError(f"DoRA magnitude of {module} has shape {parts['lora_magnitude_vector']}, expected "
                                f"[{d_out}]: the adapter was made for a base of another size")
    # every module the config targets must have weights in the file (otherwise peft silently keeps B = 0 there)
    cfg_fields = {f.name for f in dataclasses.fields(LoraConfig)}
    cfg = LoraConfig(**{k: v for k, v in config.items() if k in cfg_fields and k not in ("peft_version",)})
    targeted = [n for n, mod in modules.items() if n and _module_dims(mod) is not None
                and check_target_module_exists(cfg, n)]
    if not targeted and isinstance(config.get("target_modules"), list):
        raise MismatchError(f"the adapter targets {config.get('target_modules')!r}, and no layer of the base "
                            f"({type(base_model).__name__}) matches: it was made for another architecture")
    missing = [n for n in targeted if n not in by_module]
    if missing:
        raise MismatchError(f"the adapter file has no weights for {len(missing)} targeted layers (e.g. "
                            f"{missing[0]!r}): loading would leave them untrained silently; the adapter is incomplete "
                            "or made for another architecture")


def load_adapter(base_model, adapter_dir: str | Path, adapter_name: str = "default", is_trainable: bool = False,
                 verify_weights: bool = True):
    """Load an adapter onto ``base_model`` after checking that it fits.

    Everything is checked before a weight is touched (see :func:`check_adapter`). The base is wrapped in place,
    as peft does; load a fresh copy of the base if you need the original object untouched.

    Args:
        base_model: The base causal LM (without LoRA).
        adapter_dir: A folder written by :func:`save_adapter` or by peft's ``save_pretrained``.
        adapter_name: Name of the adapter inside the returned ``PeftModel``.
        is_trainable: Load with gradients enabled (to continue training).
        verify_weights: Hash the base weights and compare with the manifest (disable for very large bases).

    Returns:
        The ``peft.PeftModel``.

    Raises:
        NotFoundError, CorruptError, ConfigError, MismatchError: See :func:`check_adapter`; ConfigError also when
            ``base_model`` already has LoRA.
    """
    check_no_lora(base_model)
    check_adapter(base_model, adapter_dir, verify_weights=verify_weights)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        model = PeftModel.from_pretrained(base_model, str(Path(adapter_dir).expanduser()), adapter_name=adapter_name,
                                          is_trainable=is_trainable)
    return model.train(is_trainable) if is_trainable else model.eval()


def load_base_and_adapter(adapter_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load an adapter together with its base (from ``base_model_name_or_path``), checked as in :func:`load_adapter`.

    Returns:
        ``(peft_model, tokenizer)``.

    Raises:
        NotFoundError: The adapter or its base cannot be found (pass the base to :func:`load_adapter` instead).
        CorruptError, ConfigError, MismatchError: As :func:`load_adapter`.
    """
    config = read_config(adapter_dir)
    base = config.get("base_model_name_or_path")
    if not base and (Path(adapter_dir).expanduser() / MANIFEST).is_file():
        base = (read_manifest(adapter_dir).get("base") or {}).get("path")
    if not base:
        raise NotFoundError(f"{adapter_dir} does not say where its base model is (no base_model_name_or_path): load "
                            "the base yourself and call load_adapter(base_model, adapter_dir)")
    try:
        model, tokenizer = load_model(base, dtype=dtype, device=device)
    except NotFoundError as exc:
        raise NotFoundError(f"the base of adapter {adapter_dir} ({base}) cannot be loaded: {exc}. Rebuild it (for zoo "
                            "models get_pretrained(...) with the same family, size and world) or pass the base to "
                            "load_adapter(base_model, adapter_dir)") from exc
    return load_adapter(model, adapter_dir), tokenizer
