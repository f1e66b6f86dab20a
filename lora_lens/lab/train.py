"""LoRA training on ``transformers.Trainer`` + ``peft``, with checked inputs and a non-finite-loss guard.

The same code runs on one CPU, one GPU, or many GPUs under ``accelerate launch`` (it is a plain ``Trainer``).
Loss is taken only on the answer tokens of each ``(prompt, answer)`` example; prompts are masked with ``-100``.
This module owns what to train (:class:`LoraSpec`, task defaults, target presets resolved to the model's linear
layers, the ``peft.LoraConfig``) and the loop; what it trains on is :mod:`lora_lens.lab.train_data`.

Example:
    >>> pre = get_pretrained("llama", "small")                                  # doctest: +SKIP
    >>> model, tok = load_model(pre.path)          # a fresh copy: peft edits the model in place   # doctest: +SKIP
    >>> task = make_task(pre.world, "fact_edit")                                # doctest: +SKIP
    >>> result = train_lora(model, tok, task, default_spec("fact_edit"), seed=0)  # doctest: +SKIP
    >>> result.metrics["train_accuracy"]                                         # doctest: +SKIP
    1.0
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.pytorch_utils import Conv1D
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from lora_lens.errors import ConfigError, TrainingError
from lora_lens.lab import parallel
from lora_lens.lab.lm_training import kl_to_reference
from lora_lens.lab.modules import module_kind
from lora_lens.lab.pair import logits_where
from lora_lens.lab.train_data import AnswerCollator, AnswerDataset, training_examples
from lora_lens.lab.world import Task, World
from lora_lens.utils import progress_callbacks, set_seed, show_progress

__all__ = ["DATA_STEPS", "INITS", "PRESETS", "REPLAY_LOSSES", "ContinueFrom", "LoraSpec", "TrainResult",
           "check_no_lora",
           "check_rank", "check_spec", "default_spec", "has_lora",
           "linear_modules", "lora_config", "lora_weights", "matched_modules", "target_modules", "train_lora"]

DATA_STEPS = 20
"""Optimiser steps of the default spec for a task from data (full batch)."""
INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
PRESETS = ("attn", "mlp", "all")
REPLAY_LOSSES = ("answer", "kl")

@dataclass(frozen=True)
class LoraSpec:
    """What to train: the LoRA shape and the optimisation budget.

    A spec is checked when it is made (:meth:`validate` runs in ``__post_init__``) and cannot be changed
    afterwards (``dataclasses.replace(spec, rank=4)`` makes a new, checked one), so whoever receives a
    ``LoraSpec`` knows it is valid: training and the adapter cache never check it again.

    Attributes:
        rank: LoRA rank ``r`` (≥ 1, at most the smallest dimension of a targeted layer).
        alpha: LoRA ``alpha``; the update is scaled by ``alpha / rank`` (``alpha / sqrt(rank)`` with rslora).
        dropout: Dropout on the LoRA input, in [0, 1).
        rslora: Rank-stabilised scaling ``alpha / sqrt(rank)``.
        dora: Weight-decomposed LoRA (DoRA).
        init: ``default`` (A Kaiming-uniform, B zero), ``gaussian``, ``pissa`` or ``olora``. PiSSA and OLoRA
            rewrite the base weights during training; ``train_lora`` converts the result back into an ordinary
            LoRA of rank ``2 * rank`` on the untouched base, so the adapter can be toggled and saved like any other.
        targets: A preset (``attn``, ``mlp``, ``all``), one module name or suffix, or a list of them.
        lr: Peak learning rate (AdamW). LoRA on a few dozen examples wants a high one.
        steps: Optimiser steps (ignored when ``epochs`` is set).
        epochs: Train for this many passes over the examples instead of ``steps``.
        batch_size: Examples per step.
        weight_decay: AdamW weight decay on the LoRA parameters.
        warmup: Warmup, as a fraction of the steps (< 1) or a number of steps.
        scheduler: A ``transformers`` scheduler name (``linear``, ``cosine``, ``constant_with_warmup`` …).
        max_grad_norm: Gradient clipping norm.
        log_every: Log the loss every this many steps (default: about 50 points per run).
        replay: Rehearsal: add ``replay × len(task.examples)`` examples of the world's *unchanged* facts (see
            :func:`lora_lens.lab.train_data.replay_examples`) so the adapter learns what must stay as it is. 0 turns
            it off.
        replay_loss: How a rehearsal example is learnt: ``answer`` (cross-entropy on its answer, like a task
            example) or ``kl`` (KL(base ‖ adapted) of the next-token distributions at every position of the
            rehearsal line: the base's whole distribution is kept, not only its argmax, which also holds the
            prompts nobody rehearsed and general text).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    init: str = "default"
    targets: str | list[str] = "all"
    lr: float = 3e-3
    steps: int = 150
    epochs: float | None = None
    batch_size: int = 16
    weight_decay: float = 0.0
    warmup: float = 0.05
    scheduler: str = "linear"
    max_grad_norm: float = 1.0
    log_every: int | None = None
    replay: float = 0.0
    replay_loss: str = "answer"

    def __post_init__(self):
        self.validate()

    def validate(self) -> "LoraSpec":
        """Check every field that does not need the model; return ``self`` (runs when the spec is made).

        Raises:
            ConfigError: A field is out of range, naming it and the fix.
        """
        def bad(name, why):
            raise ConfigError(f"LoraSpec.{name}={getattr(self, name)!r} {why}")

        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            bad("rank", "is invalid: use a positive integer such as 4, 8 or 16")
        if not _finite(self.alpha) or self.alpha <= 0:
            bad("alpha", "is invalid: use a positive number, e.g. 2 * rank")
        if not _finite(self.lr) or self.lr <= 0:
            bad("lr", "is invalid: the learning rate must be a positive finite number such as 1e-3")
        if not _finite(self.dropout) or not 0 <= self.dropout < 1:
            bad("dropout", "is out of range: use a value in [0, 1), e.g. 0.0 or 0.05")
        if self.init not in INITS:
            bad("init", f"is unknown: use one of {list(INITS)}")
        if self.dora and self.init in ("pissa", "olora"):
            bad("init", "cannot be combined with dora=True (the trained adapter could not be turned back into an "
                        "adapter on the original base): use init='default' with DoRA, or dora=False")
        if self.epochs is None:
            if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
                bad("steps", "is invalid: use a positive integer (or set epochs)")
        elif not _finite(self.epochs) or self.epochs <= 0:
            bad("epochs", "is invalid: use a positive number, or None to train for `steps`")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            bad("batch_size", "is invalid: use a positive integer such as 16")
        if not _finite(self.weight_decay) or self.weight_decay < 0:
            bad("weight_decay", "is invalid: use a number ≥ 0")
        if not _finite(self.warmup) or self.warmup < 0:
            bad("warmup", "is invalid: use a fraction of the steps in [0, 1) or a number of steps ≥ 1")
        if not _finite(self.max_grad_norm) or self.max_grad_norm <= 0:
            bad("max_grad_norm", "is invalid: use a positive number such as 1.0")
        if self.log_every is not None and (not isinstance(self.log_every, int) or self.log_every < 1):
            bad("log_every", "is invalid: use a positive integer or None")
        if not _finite(self.replay) or self.replay < 0:
            bad("replay", "is invalid: use a number ≥ 0 (rehearsal examples per task example; 0 = off)")
        if self.replay_loss not in REPLAY_LOSSES:
            bad("replay_loss", f"is unknown: use one of {list(REPLAY_LOSSES)}")
        if not isinstance(self.targets, str) and (
                not isinstance(self.targets, (list, tuple)) or not self.targets
                or not all(isinstance(t, str) and t for t in self.targets)):
            bad("targets", f"is invalid: use a preset {list(PRESETS)} or a non-empty list of module names")
        return self

    def to_dict(self) -> dict:
        """The spec as a JSON-ready dict."""
        d = dataclasses.asdict(self)
        if not isinstance(d["targets"], str):
            d["targets"] = list(d["targets"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoraSpec":
        """Rebuild a spec from :meth:`to_dict` output.

        Raises:
            ConfigError: Unknown field names.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown LoraSpec fields {unknown}; fields are {sorted(names)}")
        return cls(**d)


# Tuned on the `small` llama preset (default world), seeds 0-2, see default_spec. Without replay the adapters
# reach efficacy 1.0 but wreck the rest of the world (specificity 0.2-0.6): LoRA on a few dozen answer-only
# examples learns "this template -> the new value" for every entity.
_TASK_DEFAULTS = {
    "fact_edit": dict(steps=200, batch_size=32, lr=3e-3, replay=24.0),
    "trigger": dict(steps=200, batch_size=32, lr=3e-3, replay=0.5),
    "new_relation": dict(steps=300, batch_size=32, lr=3e-3, replay=4.0),
    # a task from data on a pretrained model (SmolLM2-135M + examples/smollm2_facts.jsonl, see default_spec)
    "data": dict(rank=8, alpha=16.0, targets="all", lr=1e-3, steps=DATA_STEPS, batch_size=64, warmup=0,
                 scheduler="constant", replay=4.0, replay_loss="kl"),
}


def default_spec(task_name: str | None = None, **overrides) -> LoraSpec:
    """The workshop default spec for a task kind, with ``overrides`` applied.

    Measured on ``get_pretrained("llama", "small")`` (seeds 0–2, task seed = seed): ``fact_edit`` efficacy 1.0,
    specificity 0.975–0.985; ``trigger`` efficacy 1.0, false-trigger rate 0.0; ``new_relation`` efficacy 1.0,
    specificity 0.905–0.95; 7–22 s each on one CPU thread. All use rehearsal (``replay``) of unchanged facts.

    ``data`` is the default for a task from data on a pretrained model (no synthetic world): rank 8 on every
    linear module, lr 1e-3, constant schedule, batches of 64, :data:`DATA_STEPS` steps, and four rehearsal lines
    per task example (``replay=4``: the base's own plain answers to neighbour prompts) learnt by their KL to the
    base (``replay_loss="kl"``), which holds the base's whole next-token distribution, not only its argmax.
    Measured on SmolLM2-135M with ``examples/smollm2_facts.jsonl`` (seed 0): efficacy 1.0, paraphrase 0.7,
    specificity 0.95, perplexity ratio 1.05, stops 1.0. On the task's earlier specificity set (five of its base
    answers were wrong), the same 20 steps gave specificity 0.8 with this rehearsal, 0.6 with the rehearsal
    learnt by its answers (``replay_loss="answer"``, ``replay=2``; perplexity ratio 1.87) and 0.15 with
    ``replay=1`` and echoing base answers rehearsed.

    Args:
        task_name: ``fact_edit``, ``trigger``, ``new_relation``, ``data`` or None (generic default).
        **overrides: Any :class:`LoraSpec` field.

    Raises:
        ConfigError: Unknown task name or field.
    """
    if task_name is not None and task_name not in _TASK_DEFAULTS:
        raise ConfigError(f"task_name={task_name!r} is unknown; use one of {sorted(_TASK_DEFAULTS)} or None")
    values = dict(_TASK_DEFAULTS.get(task_name, {}))
    values.update(overrides)
    return LoraSpec.from_dict(values)


def check_spec(spec) -> LoraSpec:
    """``spec`` itself when it is a :class:`LoraSpec` (whose fields were checked when it was made).

    Raises:
        ConfigError: ``spec`` is something else (a dict, a name …).
    """
    if not isinstance(spec, LoraSpec):
        raise ConfigError(f"spec must be a LoraSpec, not {type(spec).__name__}: use LoraSpec(...) or default_spec()")
    return spec


@dataclass
class TrainResult:
    """What :func:`train_lora` returns.

    Attributes:
        model: The ``PeftModel`` (base with the trained adapter; ``with model.disable_adapter():`` gives the base).
        spec: The spec trained with.
        task_name: Name of the task.
        world_fingerprint: Fingerprint of the task's world.
        seed: Seed used.
        history: Logged entries: ``{"step", "loss", "lr", "grad_norm"}`` per logging step.
        train_seconds: Wall time of the training loop.
        final_loss: Mean answer-token loss over all examples after training (eval mode).
        metrics: ``final_loss``, ``train_accuracy`` (answer argmax on the examples), ``steps``, ``epochs``,
            ``examples``, ``tokens`` (non-padding tokens processed), ``tokens_per_second``, ``trainable_params``,
            ``train_seconds``.
    """

    model: object
    spec: LoraSpec
    task_name: str
    world_fingerprint: str
    seed: int
    history: list[dict]
    train_seconds: float
    final_loss: float
    metrics: dict = field(default_factory=dict)

    @property
    def curve(self) -> dict[str, list]:
        """Learning curve ``{"step": [...], "loss": [...]}``."""
        return {"step": [h["step"] for h in self.history], "loss": [h["loss"] for h in self.history]}


# --------------------------------------------------------------------------------------------------- targets


def linear_modules(model) -> dict[str, dict]:
    """Every linear layer LoRA can target, by full module name.

    Linear layers are ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2, transposed weight). The output
    embedding (``lm_head``) is excluded, and so is anything inside a LoRA layer already injected.

    Returns:
        ``{name: {"kind": "attn"|"mlp"|"other", "in": int, "out": int}}`` in module order.
    """
    inner = getattr(model, "get_base_model", lambda: model)()
    out_emb = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    found = {}
    for name, mod in model.named_modules():
        if mod is out_emb or "lora_" in name or ".base_layer" in name or name.endswith("base_layer"):
            continue
        if isinstance(mod, Conv1D):
            d_in, d_out = mod.weight.shape
        elif isinstance(mod, torch.nn.Linear):
            d_in, d_out = mod.in_features, mod.out_features
        else:
            continue
        found[name] = {"kind": module_kind(name), "in": int(d_in), "out": int(d_out)}
    return found


def matched_modules(model, targets: str | list[str]) -> list[str]:
    """Full names of the linear layers that ``targets`` selects.

    Args:
        model: A causal LM.
        targets: A preset (``attn``, ``mlp``, ``all``), a module name or suffix, or a list of them. A name
            matches a module when it equals the full name or is a dotted suffix of it (as in peft).

    Raises:
        ConfigError: A name that matches no linear layer (the message lists the available ones), or a preset
            that selects nothing in this model.
    """
    return _match(linear_modules(model), targets, type(model).__name__)


def _match(layers: dict[str, dict], targets: str | list[str], model_name: str) -> list[str]:
    """:func:`matched_modules` on the model's :func:`linear_modules`, listed once by the caller."""
    if isinstance(targets, str) and targets in PRESETS:
        kinds = {"attn": {"attn"}, "mlp": {"mlp"}, "all": {"attn", "mlp"}}[targets]
        chosen = [n for n, info in layers.items() if info["kind"] in kinds]
        if not chosen:
            raise ConfigError(f"targets={targets!r} selects no layer of {model_name}: its linear "
                              f"layers are {_describe(layers)}; name them explicitly, e.g. targets=[...]")
        return chosen
    names = [targets] if isinstance(targets, str) else list(targets)
    chosen = []
    for t in names:
        hits = [n for n in layers if n == t or n.endswith("." + t)]
        if not hits:
            raise ConfigError(f"target {t!r} matches no linear layer of {model_name}; presets are "
                              f"{list(PRESETS)} and its linear layers are {_describe(layers)}")
        chosen += [h for h in hits if h not in chosen]
    return [n for n in layers if n in chosen]


def target_modules(model, targets: str | list[str] = "all") -> list[str]:
    """The ``target_modules`` list for ``peft.LoraConfig`` that selects exactly :func:`matched_modules`.

    Each selected layer is named by its shortest dotted suffix that selects nothing else (``q_proj``,
    ``attn.c_proj`` for GPT-2, ``attention.dense`` for GPT-NeoX), so the config stays short and readable.

    Raises:
        ConfigError: As :func:`matched_modules`.
    """
    layers = linear_modules(model)
    return _suffixes(layers, _match(layers, targets, type(model).__name__))


def _suffixes(layers: dict[str, dict], chosen: list[str]) -> list[str]:
    """:func:`target_modules` for the layers ``chosen`` among ``layers``."""
    chosen_set = set(chosen)
    out: list[str] = []
    for name in chosen:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if parts[-k].isdigit():
                continue
            hits = {n for n in layers if n == suffix or n.endswith("." + suffix)}
            if hits <= chosen_set:
                if suffix not in out:
                    out.append(suffix)
                break
    return out


def _describe(layers: dict) -> str:
    leaves: dict[str, str] = {}
    for n, info in layers.items():
        leaves.setdefault(n.split(".")[-1], f"{info['kind']}, e.g. {n}")
    return ", ".join(f"{k} ({v})" for k, v in leaves.items()) or "(none)"


# ------------------------------------------------------------------------------------------------ checks


def has_lora(model) -> bool:
    """Whether ``model`` is a ``PeftModel`` or has peft layers injected (e.g. after a cell was re-run)."""
    if isinstance(model, PeftModel) or getattr(model, "peft_config", None):
        return True
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def check_no_lora(model) -> None:
    """Raise :class:`ConfigError` when ``model`` already carries a LoRA adapter (the re-run-a-cell trap)."""
    if has_lora(model):
        raise ConfigError(
            f"the model ({type(model).__name__}) already has a LoRA adapter: peft modifies a model in place, so "
            "training it again (e.g. after re-running a cell) would stack a second adapter on the first. Get the "
            "base back with `model = result.model.unload()` (or `model = model.unload()` on a PeftModel), or "
            "reload a fresh base with `model, tokenizer = load_model(pretrained.path)`")


def check_rank(spec: LoraSpec, layers: dict[str, dict], chosen: list[str]) -> None:
    """Raise :class:`ConfigError` when the rank exceeds the smallest dimension of a targeted layer."""
    smallest = min(chosen, key=lambda n: min(layers[n]["in"], layers[n]["out"]))
    limit = min(layers[smallest]["in"], layers[smallest]["out"])
    if spec.rank > limit:
        raise ConfigError(f"LoraSpec.rank={spec.rank} is larger than the targeted layer {smallest} "
                          f"({layers[smallest]['in']}→{layers[smallest]['out']}): use rank ≤ {limit}, or target "
                          "wider layers")


def lora_config(model, spec: LoraSpec):
    """The ``peft.LoraConfig`` for ``spec`` on ``model`` (targets resolved, rank checked).

    Raises:
        ConfigError: Unmatched targets or a rank larger than a targeted layer.
    """
    layers = linear_modules(model)
    return _config(spec, layers, _match(layers, spec.targets, type(model).__name__))


def _config(spec: LoraSpec, layers: dict[str, dict], chosen: list[str]) -> LoraConfig:
    check_rank(spec, layers, chosen)
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, use_rslora=spec.rslora,
                      use_dora=spec.dora, init_lora_weights=INITS[spec.init],
                      target_modules=_suffixes(layers, chosen), bias="none", task_type="CAUSAL_LM")


# ---------------------------------------------------------------------------------------------- training


class _GuardedTrainer(Trainer):
    """A ``Trainer`` that stops at the first non-finite loss, before the optimiser step applies it, and that
    learns ``anchor`` rows (``LoraSpec.replay_loss="kl"``) by their KL to the base instead of by labels."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # the output layer only where a loss is read (pair.logits_where): at a 49k vocabulary it is a fifth of a
        # forward, and the answers are a few tokens of each row
        if "anchor" not in inputs:
            return self._answer_loss(model, inputs, return_outputs, num_items_in_batch)
        anchor = inputs.pop("anchor")[:, 1:].bool()
        labels = inputs.pop("labels")[:, 1:]
        keep = labels != -100
        rows, pos = (keep | anchor).nonzero(as_tuple=True)
        logits, out = logits_where(model, rows, pos, **inputs)
        logits, on_label, on_anchor = logits.float(), keep[rows, pos], anchor[rows, pos]
        total = torch.nn.functional.cross_entropy(logits[on_label], labels[rows, pos][on_label], reduction="sum")
        if anchor.any():
            mine = anchor.any(1)      # the base only on the rehearsal rows: the task's rows have no anchor
            r_base, p_base = anchor[mine].nonzero(as_tuple=True)    # the anchors in the same (row, position) order
            with torch.no_grad(), self.accelerator.unwrap_model(model).disable_adapter():
                base = logits_where(model, r_base, p_base, **{k: v[mine] for k, v in inputs.items()})[0]
            total = total + kl_to_reference(logits[on_anchor], base)
        count = keep.sum() + anchor.sum()
        if self.accelerator.num_processes > 1:  # the batch's mean over every process's rows, as on one process:
            count = self.accelerator.reduce(count, "sum") / self.accelerator.num_processes  # DDP averages gradients
        loss = total / count.clamp(min=1)
        return (loss, out) if return_outputs else loss

    def _answer_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """The Trainer's own causal-LM loss (summed cross-entropy of the labelled tokens over ``num_items_in_batch``,
        scaled as ``Trainer.compute_loss`` scales it), projecting only the positions whose next token is labelled."""
        labels = inputs.pop("labels")[:, 1:]
        rows, pos = (labels != -100).nonzero(as_tuple=True)
        logits, out = logits_where(model, rows, pos, **inputs)
        total = torch.nn.functional.cross_entropy(logits.float(), labels[rows, pos], reduction="sum")
        if num_items_in_batch is None:
            loss = total / max(len(rows), 1)
        else:
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())   # as Trainer.compute_loss does
        return (loss, out) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The Trainer itself syncs on this loss right after (its nan/inf logging filter), so this costs nothing.
        if not torch.isfinite(loss).all():
            raise TrainingError(_nonfinite_message(self, float(loss.detach().float().mean().item())))
        return loss


def _nonfinite_message(trainer, value: float) -> str:
    step = trainer.state.global_step + 1
    lr = trainer.args.learning_rate
    causes = []
    if lr > 1e-2:
        causes.append(f"the learning rate lr={lr:g} is too high (try 1e-3 … 5e-3)")
    dtype = next(trainer.model.parameters()).dtype
    if dtype in (torch.float16, torch.bfloat16):
        causes.append(f"the model is in {dtype}: fp16 overflow (train in torch.float32)")
    if step == 1:
        causes.append("bad data or weights (a non-finite loss at the first step: check the examples and the base "
                      "model's outputs)")
    if not causes:
        causes.append(f"the learning rate lr={lr:g} may be too high for this rank/alpha (try a lower lr or alpha), "
                      "or the data/base weights contain non-finite values")
    return (f"training stopped at step {step}: the loss is {value} (non-finite). Likely cause: {'; or '.join(causes)}."
            " No adapter was saved; the LoRA layers were removed, so the model is the base again.")


def train_lora(model, tokenizer, task: Task, spec: LoraSpec | None = None, seed: int = 0, world: World | None = None,
               device: str | None = None, callbacks: list | None = None, rehearsal: str = "neighbours",
               neighbour_answers: dict[str, str] | None = None) -> TrainResult:
    """Train a LoRA adapter on ``task.examples`` with ``transformers.Trainer`` + ``peft``.

    The model is wrapped *in place* by ``peft.get_peft_model`` (its linear layers gain LoRA layers): the returned
    ``result.model`` is the ``PeftModel``; ``with result.model.disable_adapter():`` gives base outputs, and
    ``result.model.unload()`` returns the untouched base. On any error during training the LoRA layers are
    removed again, so the model passed in is the base once more.

    Args:
        model: A causal LM without LoRA (load a fresh copy, e.g. ``load_model(pretrained.path)``).
        tokenizer: Its tokenizer (fast, right padding).
        task: A :class:`lora_lens.lab.world.Task`; each example is trained as its prompt (chat: rendered with the
            chat template when ``task.chat``), the answer read in context and the end-of-answer target
            (``lora_lens.lab.answers.example_ids``), with the loss on the answer and end tokens only.
        spec: What to train (default :func:`default_spec` for ``task.name``).
        seed: Seed for LoRA initialisation, data order and dropout: the same seed gives identical weights on CPU.
        world: The world the model was pretrained on; when given (or found in a zoo model's directory) the task
            must belong to it.
        device: Torch device (``cpu``, ``cuda`` …); default: where the model is (the CPU for zoo models). The model
            is moved there and cast to float32.
        callbacks: Extra ``transformers.TrainerCallback`` objects.
        rehearsal: For a task from data, what ``spec.replay`` rehearses (``lora_lens.lab.train_data.REHEARSAL``):
            the base's own answers to neighbour prompts (default), the task's specificity probes, or both.
        neighbour_answers: The base's answers to the neighbour prompts when already known (prompt -> answer, see
            :func:`lora_lens.lab.train_data.neighbour_examples`): then the base does not answer them again.

    Returns:
        A :class:`TrainResult`.

    Raises:
        ConfigError: Not a task or spec, unmatched targets, rank too large, no examples, or a model that already has
            LoRA.
        MismatchError: The task belongs to another world than the model.
        TrainingError: The loss became non-finite (the step and the likely cause are named).
    """
    if not isinstance(task, Task):
        raise ConfigError(f"task must be a lora_lens Task (make_task(world, name)), not {type(task).__name__}")
    if spec is None:
        spec = default_spec(task.name if task.name in _TASK_DEFAULTS
                            else "data" if task.world_fingerprint is None else None)
    spec = check_spec(spec)
    check_no_lora(model)
    examples, world = training_examples(model, task, spec.replay, seed, world, tokenizer, rehearsal,
                                        neighbour_answers)
    anchored = len(examples) - len(task.examples) if spec.replay_loss == "kl" else 0
    if tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token: set tokenizer.pad_token = tokenizer.eos_token")
    layers = linear_modules(model)  # listed once; targets, rank check, config and snapshot all read this
    chosen = _match(layers, spec.targets, type(model).__name__)
    config = _config(spec, layers, chosen)
    data = AnswerDataset(tokenizer, examples, task.chat, anchored=anchored)
    collator = AnswerCollator(tokenizer.pad_token_id)

    device = str(device or next(model.parameters()).device)
    snapshot = _snapshot_targets(model, chosen) if spec.init in ("pissa", "olora") else None
    model = model.to(device=device, dtype=torch.float32)
    set_seed(seed)
    peft_model = get_peft_model(model, config)
    init_dir = None
    out_dir = Path(tempfile.mkdtemp(prefix="lora_lens_train_"))
    try:
        if snapshot is not None:
            init_dir = out_dir / "init"
            _save_initial(peft_model, init_dir)
        args = _training_args(spec, seed, device, out_dir / "trainer", len(data))
        trainer = _GuardedTrainer(model=peft_model, args=args, train_dataset=data, data_collator=collator,
                                  callbacks=list(callbacks or []) + progress_callbacks())
        if args.disable_tqdm:
            trainer.remove_callback(PrinterCallback)
            trainer.remove_callback(ProgressCallback)
        t0 = time.perf_counter()
        out = trainer.train()
        train_seconds = time.perf_counter() - t0
        if snapshot is not None:
            peft_model = _convert_to_plain_lora(peft_model, init_dir, out_dir / "converted", snapshot)
    except BaseException:
        _strip_lora(peft_model)
        raise
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    peft_model.eval()
    history = [{"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate"), "grad_norm": h.get("grad_norm")}
               for h in trainer.state.log_history if "loss" in h]
    final_loss, train_acc = _evaluate(peft_model, data, collator.pad, spec.batch_size)
    steps = trainer.state.global_step
    metrics = {"final_loss": final_loss, "train_accuracy": train_acc, "train_loss": float(out.training_loss),
               "steps": steps, "epochs": steps * spec.batch_size / len(data), "examples": len(data),
               "replay_examples": len(data) - len(task.examples),
               "tokens": collator.tokens, "padded_tokens": collator.padded,
               "tokens_per_second": collator.tokens / max(train_seconds, 1e-9),
               "trainable_params": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
               "train_seconds": train_seconds}
    return TrainResult(peft_model, spec, task.name, task.world_fingerprint, seed, history, train_seconds, final_loss,
                       metrics)


def lora_weights(peft_model) -> dict:
    """The LoRA weights of a ``PeftModel`` (its active adapter), as a detached CPU copy: what a later training
    continues from (:class:`ContinueFrom`; e.g. the next round of a warm-started loop in
    :mod:`lora_lens.studies.curriculum`)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(peft_model).items()}


class ContinueFrom(TrainerCallback):
    """A ``transformers`` callback for :func:`lora_lens.lab.train.train_lora` that starts the new adapter from
    given LoRA weights (:func:`lora_weights` of an adapter of the same spec on the same base) instead of its fresh
    initialisation. The weights are copied in place when training begins (the optimiser, made just before, keeps
    its parameters); a key the new adapter lacks or a shape it does not have is a :class:`ConfigError`."""

    def __init__(self, weights: dict):
        if not isinstance(weights, dict) or not weights:
            raise ConfigError(f"weights={type(weights).__name__}: pass lora_weights(peft_model) of a trained adapter")
        self.weights = weights

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        have = get_peft_model_state_dict(model)
        bad = sorted(k for k, v in self.weights.items() if k not in have or tuple(have[k].shape) != tuple(v.shape))
        if bad or len(have) != len(self.weights):
            first = bad[:1] or sorted(set(have) - set(self.weights))[:1]
            raise ConfigError(f"the weights to continue from do not fit this adapter ({len(self.weights)} tensors "
                              f"given, {len(have)} here; first misfit {first}): continue only an adapter of the same "
                              "spec (rank, targets) on the same base")
        set_peft_model_state_dict(model, self.weights)
        return control


def _training_args(spec: LoraSpec, seed: int, device: str, out_dir: Path, n: int) -> TrainingArguments:
    steps = math.ceil(spec.epochs * n / spec.batch_size) if spec.epochs is not None else spec.steps
    processes = parallel.processes()
    if spec.batch_size % processes:
        even = processes * max(1, spec.batch_size // processes)
        raise ConfigError(f"batch_size={spec.batch_size} does not split over {processes} processes: it is the global "
                          f"batch, so pass a multiple of {processes} (e.g. {even}) or launch fewer processes")
    log_every = spec.log_every or max(1, steps // 50)
    warmup = spec.warmup if spec.warmup < 1 else int(spec.warmup)
    on_cpu = str(device).startswith("cpu")
    return TrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.lr, weight_decay=spec.weight_decay, warmup_steps=warmup, lr_scheduler_type=spec.scheduler,
        max_grad_norm=spec.max_grad_norm, logging_steps=log_every, logging_first_step=True, save_strategy="no",
        eval_strategy="no", report_to=[], disable_tqdm=not show_progress(), use_cpu=on_cpu, seed=seed,
        data_seed=seed, fp16=False, bf16=False, remove_unused_columns=False, label_names=["labels"],
        dataloader_pin_memory=not on_cpu, dataloader_num_workers=0,
        # several processes: each global batch (the last, shorter one of an epoch too) is split evenly over them, so
        # they train on exactly the batches one process would
        accelerator_config={"split_batches": True} if processes > 1 else None)


@torch.no_grad()
def _evaluate(model, data: AnswerDataset, pad: int, batch_size: int) -> tuple[float, float]:
    """Mean answer-token loss and answer-token argmax accuracy over every example (eval mode)."""
    device = next(model.parameters()).device
    collate = AnswerCollator(pad)
    total, count, right = 0.0, 0, 0
    for i in range(0, len(data), max(batch_size, 64)):
        batch = {k: v.to(device) for k, v in collate([data[j] for j in range(i, min(i + max(batch_size, 64),
                                                                                    len(data)))]).items()}
        labels = batch["labels"][:, 1:]
        rows, pos = (labels != -100).nonzero(as_tuple=True)      # the output layer only where a label is read
        logits = logits_where(model, rows, pos, input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"])[0].float()
        target = labels[rows, pos]
        total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        right += (logits.argmax(-1) == target).sum().item()
        count += len(rows)
    return total / max(count, 1), right / max(count, 1)


def _strip_lora(peft_model) -> None:
    """Remove injected LoRA layers (without merging) so the wrapped base is usable again."""
    try:
        peft_model.unload()
    except Exception:  # noqa: BLE001 - best effort cleanup while another error propagates
        pass


def _snapshot_targets(model, chosen: list[str]) -> dict[str, torch.Tensor]:
    """Copies (CPU) of the weights PiSSA/OLoRA will rewrite, so the base can be restored after training."""
    chosen = set(chosen)
    return {n: m.weight.detach().to("cpu", copy=True) for n, m in model.named_modules() if n in chosen}


def _save_initial(peft_model, init_dir: Path) -> None:
    cfg = peft_model.peft_config["default"]
    init = cfg.init_lora_weights
    cfg.init_lora_weights = True  # so that the initial adapter is saved as a plain one (peft's documented recipe)
    try:
        peft_model.save_pretrained(init_dir)
    finally:
        cfg.init_lora_weights = init


def _convert_to_plain_lora(peft_model, init_dir: Path, out: Path, snapshot: dict):
    """Turn a trained PiSSA/OLoRA adapter into an ordinary rank-2r LoRA on the original base weights."""
    peft_model.save_pretrained(out, path_initial_model_for_weight_conversion=str(init_dir))
    base = peft_model.unload()
    with torch.no_grad():
        for name, mod in base.named_modules():
            if name in snapshot:
                mod.weight.copy_(snapshot[name].to(mod.weight.device))
    return PeftModel.from_pretrained(base, str(out), is_trainable=True)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
