"""The zoo: small models of real architectures, pretrained on the synthetic world and cached on disk.

Families are built from their own transformers config classes (``LlamaConfig``, ``Qwen2Config`` …), so the models
are the real architectures, only small. ``get_pretrained`` trains one until it knows the world and caches it;
``load_model`` loads any Hugging Face causal LM by hub name or local directory.

Example:
    >>> pre = get_pretrained("llama", "tiny", world=make_world(n_entities=20), steps=50)   # doctest: +SKIP
    >>> pre.metrics["fact_accuracy"]                                                        # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import platformdirs
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig,
                          Phi3Config, PreTrainedTokenizerFast, Qwen2Config)

from lora_lens.errors import ConfigError, NotFoundError
from lora_lens.lab import parallel
from lora_lens.lab.lm_training import LineCycle, LMTrainer
from lora_lens.lab.probes import accuracy
from lora_lens.lab.real_models import is_real_model, real_model_path
from lora_lens.lab.tokenizer import build_tokenizer, check_tokenizer
from lora_lens.lab.world import World, make_world
from lora_lens.utils import (atomic_dir, file_lock, progress_bar, quiet_transformers, set_seed, sha256_file,
                             stable_hash, verify_manifest, write_json)

__all__ = ["CACHE_VERSION", "FAMILIES", "MAX_POSITIONS", "PRETRAIN", "SIZES", "Pretrained", "Size", "build_model",
           "cache_dir", "check_family", "get_pretrained", "load_model", "n_params", "pretrain", "resolve_size"]

CACHE_VERSION = 1
MAX_POSITIONS = 64


@dataclass(frozen=True)
class Size:
    """Shape of a model: width, depth, attention heads, key/value heads and MLP width."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


SIZES = {
    "tiny": Size(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64),
    "small": Size(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=256),
    "base": Size(hidden=256, layers=8, heads=8, kv_heads=4, intermediate=768),
}
# pretraining budget per size: steps, batch size, peak learning rate
PRETRAIN = {"tiny": (400, 64, 1e-2), "small": (800, 256, 6e-3), "base": (1500, 256, 2e-3)}


def _rope(theta: float = 10000.0, partial: float | None = None) -> dict:
    rope = {"rope_type": "default", "rope_theta": theta}
    if partial is not None:
        rope["partial_rotary_factor"] = partial
    return rope


def _llama_like(cls, s: Size, **extra):
    return lambda ids: cls(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                           num_key_value_heads=s.kv_heads, intermediate_size=s.intermediate,
                           max_position_embeddings=MAX_POSITIONS, **ids, **extra)


def _yi(s: Size):
    # Yi-6B: Llama architecture, deep and narrow-KV (32 heads, 4 KV heads), rope_theta 5e6
    deep = Size(s.hidden, max(2, round(s.layers * 1.5)), s.heads, max(1, s.heads // 4), s.intermediate)
    return _llama_like(LlamaConfig, deep, rope_parameters=_rope(5e6), tie_word_embeddings=False)


def _mistral(s: Size):
    # Mistral-7B: 32 heads / 8 KV heads, MLP 3.5× wide, rope_theta 1e6, sliding window; the window is scaled to
    # our short prompts (8 tokens) so that it actually limits attention, as 4096 does on long texts
    wide = Size(s.hidden, s.layers, s.heads, max(1, s.heads // 4), int(3.5 * s.hidden))
    return _llama_like(MistralConfig, wide, sliding_window=8, rope_parameters=_rope(1e6), tie_word_embeddings=False)


FAMILIES = {
    "llama": ("Llama: RMSNorm, SwiGLU MLP, rotary, grouped-query attention, untied embeddings",
              lambda s: _llama_like(LlamaConfig, s, tie_word_embeddings=False)),
    "qwen2": ("Qwen2: Llama-like with q/k/v biases and tied embeddings",
              lambda s: _llama_like(Qwen2Config, s, tie_word_embeddings=True)),
    "mistral": ("Mistral: Llama-like with sliding-window attention, 4:1 grouped-query attention, wider MLP",
                _mistral),
    "yi": ("Yi: Llama architecture, deeper, 4:1 grouped-query attention, rope_theta 5e6", _yi),
    "phi3": ("Phi-3: fused qkv_proj and gate_up_proj", lambda s: _llama_like(Phi3Config, s,
                                                                              tie_word_embeddings=False)),
    "gpt2": ("GPT-2: LayerNorm, GELU, learned positions, Conv1D weights (transposed), tied embeddings",
             lambda s: lambda ids: GPT2Config(n_embd=s.hidden, n_layer=s.layers, n_head=s.heads,
                                              n_inner=s.intermediate, n_positions=MAX_POSITIONS,
                                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)),
    "gpt_neox": ("GPT-NeoX (Pythia): parallel attention+MLP, partial rotary, fused query_key_value",
                 lambda s: lambda ids: GPTNeoXConfig(hidden_size=s.hidden, num_hidden_layers=s.layers,
                                                     num_attention_heads=s.heads, intermediate_size=s.intermediate,
                                                     max_position_embeddings=MAX_POSITIONS,
                                                     rope_parameters=_rope(partial=0.25), hidden_dropout=0.0,
                                                     attention_dropout=0.0, tie_word_embeddings=False, **ids)),
}


def resolve_size(size: str | Size, **overrides) -> Size:
    """Look up a size preset and apply overrides; check that the attention arithmetic works.

    Raises:
        ConfigError: Unknown preset, or hidden not divisible by heads, or heads not divisible by kv_heads.
    """
    if isinstance(size, str):
        if size not in SIZES:
            raise ConfigError(f"size={size!r} is unknown; use one of {list(SIZES)} or a Size(...)")
        size = SIZES[size]
    try:
        size = dataclasses.replace(size, **overrides)
    except TypeError as exc:
        raise ConfigError(f"unknown size field in {sorted(overrides)}; fields are "
                          f"{[f.name for f in dataclasses.fields(Size)]}") from exc
    for name in ("hidden", "layers", "heads", "kv_heads", "intermediate"):
        if getattr(size, name) < 1:
            raise ConfigError(f"{name}={getattr(size, name)} must be ≥ 1")
    if size.hidden % size.heads:
        raise ConfigError(f"hidden={size.hidden} is not divisible by heads={size.heads}: choose heads that divide "
                          f"hidden (e.g. {[h for h in (1, 2, 4, 8, 16) if size.hidden % h == 0]})")
    if size.heads % size.kv_heads:
        raise ConfigError(f"heads={size.heads} is not divisible by kv_heads={size.kv_heads}: choose kv_heads that "
                          f"divide heads (e.g. {[k for k in range(1, size.heads + 1) if size.heads % k == 0]})")
    return size


def check_family(family: str) -> None:
    """Raise :class:`ConfigError` when ``family`` is not in the zoo."""
    if family not in FAMILIES:
        raise ConfigError(f"family={family!r} is unknown; use one of {list(FAMILIES)} "
                          "(or load_model(name_or_path) for any Hugging Face model)")


def _special_ids(tokenizer) -> dict:
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def build_model(family: str, size: str | Size, tokenizer, seed: int = 0, **overrides):
    """A freshly initialised float32 model of ``family`` at ``size`` for ``tokenizer``.

    Raises:
        ConfigError: Unknown family or size, or a size whose arithmetic does not work.
    """
    check_family(family)
    s = resolve_size(size, **overrides)
    config = FAMILIES[family][1](s)(_special_ids(tokenizer))
    set_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def n_params(model) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class Pretrained:
    """A pretrained zoo model with its tokenizer, world and cache entry.

    Attributes:
        model: The causal LM (eval mode).
        tokenizer: Its tokenizer.
        world: The world it was pretrained on.
        family: Zoo family name.
        size: Size preset name.
        path: Cache directory (a plain ``save_pretrained`` folder plus ``world.jsonl`` and ``lora_lens.json``).
        manifest: Parameters, metrics and curves recorded at pretraining.
    """

    model: object
    tokenizer: object
    world: World
    family: str
    size: str
    path: Path
    manifest: dict

    @property
    def metrics(self) -> dict:
        """Final metrics: fact_accuracy, paraphrase_accuracy, params, pretrain_seconds, steps."""
        return self.manifest["metrics"]

    @property
    def curves(self) -> dict:
        """Training curves: ``loss`` per logged step and ``fact_accuracy`` per evaluation step."""
        return self.manifest["curves"]


def cache_dir(path: str | Path | None = None) -> Path:
    """The cache root: ``path``, else ``$LORA_LENS_CACHE``, else the user cache dir."""
    return Path(path or os.environ.get("LORA_LENS_CACHE") or platformdirs.user_cache_dir("lora_lens"))


def pretrain(model, tokenizer, world: World, steps: int, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
             eval_every: int = 50, stop_at: float = 0.99) -> dict:
    """Train ``model`` on the world's corpus (full-sequence causal LM loss, AdamW, warmup + cosine decay).

    The step is :class:`lora_lens.lab.lm_training.LMTrainer`'s (weight decay 0.01), on batches of the corpus
    in a seeded shuffled order.

    Stops early once fact accuracy reaches ``stop_at`` at an evaluation step.

    Returns:
        ``{"curves": {...}, "metrics": {...}}`` with loss per 10 steps and fact accuracy per evaluation.
    """
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ConfigError(f"steps={steps}, batch_size={batch_size}, lr={lr}: all must be positive")
    set_seed(seed)
    order = LineCycle(world.corpus(), random.Random(seed))
    probes = world.fact_probes()
    trainer = LMTrainer(model, tokenizer, lr, steps, weight_decay=0.01, schedule="cosine")
    curves = {"loss_step": [], "loss": [], "eval_step": [], "fact_accuracy": []}
    t0 = time.perf_counter()
    model.train()
    bar = progress_bar(range(steps), desc=f"pretrain {type(model).__name__}")
    for step in bar:
        loss, _ = trainer.step(order.take(batch_size))
        if step % 10 == 0:
            curves["loss_step"].append(step)
            curves["loss"].append(round(loss.item(), 5))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            acc = accuracy(model, tokenizer, probes)
            curves["eval_step"].append(step + 1)
            curves["fact_accuracy"].append(acc)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
            model.train()
            if acc >= stop_at:
                break
    model.eval()
    metrics = {"fact_accuracy": curves["fact_accuracy"][-1],
               "paraphrase_accuracy": accuracy(model, tokenizer, world.fact_probes(heldout=True)),
               "params": n_params(model), "pretrain_seconds": round(time.perf_counter() - t0, 3),
               "steps": curves["eval_step"][-1]}
    return {"curves": curves, "metrics": metrics}


def get_pretrained(family: str = "llama", size: str = "small", world: World | None = None, seed: int = 0,
                   steps: int | None = None, cache: str | Path | None = None, rebuild: bool = False,
                   device: str = "cpu") -> Pretrained:
    """Return a model of ``family`` pretrained on ``world``, from the cache or trained now and cached.

    The cache entry is keyed by everything that determines the model (family, size, world, tokenizer,
    pretraining budget, seed). It is written atomically under a lock, and its files are checked against their
    recorded sha256 on load: a corrupt entry is rebuilt with a warning, never used.

    Args:
        family: Zoo family (see ``FAMILIES``).
        size: Size preset (``tiny``, ``small``, ``base``).
        world: The world; default ``make_world(seed=0)``.
        seed: Initialisation and data-order seed.
        steps: Pretraining step budget; default per size (training stops early at 100% fact accuracy).
        cache: Cache root (default ``$LORA_LENS_CACHE`` or the user cache dir).
        rebuild: Ignore and replace an existing entry.
        device: Torch device to train and return the model on.

    Raises:
        ConfigError: Unknown family or size.
    """
    check_family(family)
    resolve_size(size)
    world = world or make_world(seed=0)
    default_steps, batch, lr = PRETRAIN[size]
    steps = default_steps if steps is None else steps
    tokenizer = build_tokenizer(world)
    config = FAMILIES[family][1](SIZES[size])(_special_ids(tokenizer))
    spec = {"family": family, "size": dataclasses.asdict(SIZES[size]), "config": stable_hash(config.to_dict()),
            "world": world.fingerprint(),
            "vocab": stable_hash(tokenizer.get_vocab()), "steps": steps, "batch": batch, "lr": lr, "seed": seed,
            "version": CACHE_VERSION}
    key = stable_hash(spec)
    root = cache_dir(cache)
    entry = root / "models" / f"{family}-{size}-{key}"
    with file_lock(root / "locks" / f"{entry.name}.lock"):
        if entry.exists() and not rebuild:
            problem = verify_manifest(entry, "lora_lens.json")
            if problem is None:
                return _load_entry(entry, family, size, world, device)
            warnings.warn(f"cache entry {entry} is corrupt ({problem}); rebuilding it", stacklevel=2)
            shutil.rmtree(entry)
        if parallel.processes() > 1:  # each process would wait on the others inside the lock
            raise ConfigError(f"the zoo model {family}/{size} is not in the cache {root}: build it once in one process "
                              f"(get_pretrained({family!r}, {size!r}, ...)) before launching {parallel.processes()}")
        model = build_model(family, size, tokenizer, seed=seed).to(device)
        result = pretrain(model, tokenizer, world, steps, batch, lr, seed)
        with atomic_dir(entry) as tmp, quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            world.save(tmp / "world.jsonl")
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
            write_json(tmp / "lora_lens.json", {"spec": spec, "key": key, "family": family, "size": size,
                                                "files": files, **result})
        return _load_entry(entry, family, size, world, device)


def _load_entry(entry: Path, family: str, size: str, world: World, device: str) -> Pretrained:
    model, tokenizer = load_model(entry, device=device)
    manifest = json.loads((entry / "lora_lens.json").read_text())
    return Pretrained(model, tokenizer, world, family, size, entry, manifest)


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load any Hugging Face causal LM and its tokenizer from a local directory or a hub name.

    Args:
        name_or_path: A local ``save_pretrained`` directory, a hub id such as ``Qwen/Qwen2-0.5B``, or a real model
            that installs from the package registry (``REAL_MODELS``: ``"smollm2-135m"``), converted once into
            the cache.
        dtype: Weights dtype (passed explicitly: transformers 5 would otherwise pick ``"auto"``).
        device: Torch device.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode.

    Raises:
        NotFoundError: The directory does not exist, the hub name is not available (offline or unknown), or a
            real model's registry package is not installed.
        ConfigError: The model is not a causal LM (e.g. an encoder such as BERT or T5 without an LM head).
    """
    if is_real_model(name_or_path) and not Path(name_or_path).exists():
        name_or_path = real_model_path(name_or_path, cache_dir())
    src = str(name_or_path)
    local = Path(src).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise NotFoundError(f"{local} has no config.json: pass a folder written by model.save_pretrained(...)")
        src = str(local)
    elif src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise NotFoundError(f"model directory {src!r} does not exist: check the path")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:
        with quiet_transformers():
            try:
                model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, local_files_only=offline)
            except ValueError as exc:
                if "Unrecognized configuration class" not in str(exc) and "AutoModelForCausalLM" not in str(exc):
                    raise
                raise ConfigError(f"model {src!r} is not a causal language model ({exc.args[0].splitlines()[0]}): "
                                  "lora_lens studies causal LMs (Llama, Qwen2, Mistral, GPT-2 …); pass the folder "
                                  "or hub name of one") from exc
        if local.exists() and (local / "lora_lens.json").is_file():
            # a zoo model: its world tokenizer as saved. AutoTokenizer would pick the family's own class from
            # config.json (Qwen2Tokenizer for qwen2), which re-splits the words differently.
            tokenizer = PreTrainedTokenizerFast.from_pretrained(src)
        else:
            tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=offline)
    except OSError as exc:
        how = ("HF_HUB_OFFLINE=1 is set, so nothing is downloaded" if offline
               else "it could not be fetched from the hub")
        raise NotFoundError(
            f"model {src!r} is not available: {how}. Download it where you have network "
            f"(`huggingface-cli download {src}` or `AutoModelForCausalLM.from_pretrained(...).save_pretrained(DIR)`) "
            "and pass the local directory instead") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    check_tokenizer(model, tokenizer)
    return model.to(device).eval(), tokenizer
