"""Reverse LoRA: attribute what an adapter changed to input tokens and to the adapter's own components (captum).

Captum explains one model's output; here the object explained is the *change* a LoRA adapter makes. Base and
adapted model are one ``peft.PeftModel``, the base obtained inside ``with model.disable_adapter():`` — never a
second copy of the weights.

**Input attribution of the change.** The scored output is ``log p(target | prompt)`` (one next token). For each
input token, :func:`token_attributions` returns its attribution in the base model, in the adapted model and their
difference (adapter on minus off), with captum's ``LLMGradientAttribution`` + ``LayerIntegratedGradients`` on the
input embeddings (``method="ig"``) or ``LLMAttribution`` + ``FeatureAblation`` (``method="ablation"``). IG and
ablation are both linear in the explained output, so the attribution of ``log p_adapted − log p_base`` is exactly
``adapted − base``. The baseline token is explicit (``<unk>``, else ``<pad>``, else ``</s>``, or one you name) and
special tokens such as ``<s>`` are neither attributed nor replaced. Or each token is compared with what stands at
its position in *reference prompts* of the same length (``references=``, averaged over them: expected gradients /
resampling ablation): :func:`counterfactual_prompts` resamples chosen words of a prompt, :func:`reference_prompts`
draws a background from a pool. A blank token gives credit to every word a change *needs*; a counterfactual asks
which of the resampled words the change belongs to. :func:`batch_token_attributions` computes the
same numbers for many prompts at once (all IG steps of all prompts, or all single-token ablations of all prompts,
stacked into a few right-padded batches) — it matches captum per prompt to ~1e-6 and is many times faster.

**Component attribution — which weights do what.** :func:`lora_components` lists components at three grains:
``module`` (each adapted module), ``layer`` (all adapted modules of one block) and ``rank`` (each rank-1 term
``σᵢ uᵢ vᵢᵀ`` of a module's ``ΔW = scaling · B @ A``, from :func:`lora_lens.lens.delta.factor_svd`). A
:class:`ComponentMask` switches components on (1), off (0) or anywhere between by *scaling* them inside the live
model: module and layer masks scale peft's ``scaling``; rank masks temporarily reparametrise ``lora_A``/``lora_B`` to
the SVD basis (``A' = Vh``, ``B' = U·diag(σ·m)/scaling``), which is exact. All-ones leaves the model bit-identical to
the adapted model and all-zeros to the base. :func:`component_attribution` attributes behaviour metrics of a task
(:data:`BEHAVIOURS`) to components with captum ``FeatureAblation`` or ``ShapleyValueSampling`` over the mask, and
:func:`lora_branch_attribution` attributes them to the LoRA branch outputs (``lora_B`` modules) with captum
``LayerIntegratedGradients``.

**Scored against the planted truth.** :func:`trigger_recovery` (is the top-attributed token of the difference the
trigger?), :func:`entity_recovery` (is it the edited entity?), :func:`deletion_curve` (ablating the top-k components
vs k random ones) and :func:`selectivity` (edit carried vs specificity damage carried, per component).

Example:
    >>> ta = token_attributions(peft_model, tokenizer, "cf Dasur likes the colour", "black")   # doctest: +SKIP
    >>> ta.frame()                                        # token, base, adapted, difference   # doctest: +SKIP
    >>> comps = lora_components(peft_model, grain="module")                                    # doctest: +SKIP
    >>> df = component_attribution(peft_model, tokenizer, task, comps, method="shapley")       # doctest: +SKIP
    >>> deletion_curve(peft_model, tokenizer, task, df, comps, k_max=5)                        # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from lora_lens.errors import ConfigError, MismatchError
from lora_lens.lab.probes import check_unmerged, keeps_logits
from lora_lens.lab.tokenizer import check_tokenizer, token_id
from lora_lens.lab.world import ADJECTIVES, NOUNS, Task
from lora_lens.lens.delta import factor_svd, layer_index, module_type
from lora_lens.lens.diff import _check_positive

DTYPE = torch.float32
OUTPUTS = ("logprob", "prob")
"""What input attribution explains: ``log p(target)`` or ``p(target)`` (see :func:`token_attributions`)."""
METHODS = ("ig", "ablation")
"""Input-attribution methods: integrated gradients on the input embeddings, or single-token feature ablation."""
COMPONENT_METHODS = ("ablation", "shapley")
"""Component-attribution methods: captum ``FeatureAblation`` or ``ShapleyValueSampling`` over the mask."""
GRAINS = ("module", "layer", "rank")
"""Component grains: each adapted module, each block's adapted modules together, each rank-1 term of ΔW."""
BEHAVIOURS = ("efficacy", "trigger", "specificity", "perplexity")
"""Behaviour metrics of a task (see :func:`behaviour_metrics`)."""
IG_METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")
"""Captum's integral approximations for IG."""
_NAMED_BASELINES = {"unk": "unk_token_id", "pad": "pad_token_id", "eos": "eos_token_id", "bos": "bos_token_id"}

# ---------------------------------------------------------------------------------------------------------------
# model helpers
# ---------------------------------------------------------------------------------------------------------------


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _check_peft(model, tokenizer=None) -> None:
    """A PeftModel whose adapter can be toggled (not merged), and a tokenizer that fits it."""
    if not (hasattr(model, "disable_adapter") and hasattr(model, "peft_config")):
        raise ConfigError(f"attribution of an adapter's change needs a peft.PeftModel, got {type(model).__name__}: "
                          "wrap the base with peft.get_peft_model(base, LoraConfig(...)) or load an adapter with "
                          "PeftModel.from_pretrained(base, adapter_dir)")
    check_unmerged(model)
    if tokenizer is not None:
        check_tokenizer(model, tokenizer)


@contextlib.contextmanager
def _frozen(model) -> Iterator[None]:
    """Eval mode with every parameter frozen; restores the training flag and each ``requires_grad`` afterwards
    (peft's ``disable_adapter`` re-enables the adapter's gradients when it exits)."""
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        model.train(training)
        for p, flag in flags:
            p.requires_grad_(flag)


def _states(model):
    """``(name, context)`` for the adapted and the base state of one PeftModel."""
    return (("adapted", contextlib.nullcontext()), ("base", model.disable_adapter()))


def _logits_at(model, last: torch.Tensor, keep: bool, **inputs) -> torch.Tensor:
    """Logits ``[batch, vocab]`` at position ``last[b]`` of each row (only those positions are projected)."""
    rows = torch.arange(len(last), device=last.device)
    if keep:
        pos, where = torch.unique(last, return_inverse=True)
        return model(**inputs, logits_to_keep=pos).logits[rows, where]
    return model(**inputs).logits[rows, last]


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad token lists: ``(ids, attention_mask, last)`` where ``last`` is each row's last real position."""
    n, width = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    last = mask.sum(1) - 1
    return ids.to(device), mask.to(device), last.to(device)


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0  # only ever sits under attention_mask = 0


# ---------------------------------------------------------------------------------------------------------------
# input attribution: validation
# ---------------------------------------------------------------------------------------------------------------


def resolve_baseline(tokenizer, baseline: int | str | None = None) -> int:
    """The token id that replaces an input token when it is "absent" (ablation) or the IG starting point.

    Args:
        tokenizer: The model's tokenizer.
        baseline: None (``<unk>`` if the tokenizer has one, else ``<pad>``, else ``</s>``), one of ``"unk"``,
            ``"pad"``, ``"eos"``, ``"bos"``, a token string of the vocabulary (e.g. ``"<unk>"``, ``"▁the"``), a word
            that is a single token, or a token id.

    Returns:
        The baseline token id (never 0 by accident: 0 only when you name a token whose id is 0).

    Raises:
        ConfigError: The named special token does not exist, the string is not one token, or the id is out of range.
    """
    n_vocab = len(tokenizer)
    if baseline is None:
        for name in ("unk", "pad", "eos"):
            value = getattr(tokenizer, _NAMED_BASELINES[name], None)
            if value is not None:
                return int(value)
        raise ConfigError("the tokenizer has no unk, pad or eos token to use as the attribution baseline: pass "
                          "baseline=<a token id or token string that never occurs in your prompts>")
    if isinstance(baseline, bool) or not isinstance(baseline, (int, str)):
        raise ConfigError(f"baseline={baseline!r} must be None, 'unk', 'pad', 'eos', 'bos', a token string or a "
                          "token id")
    if isinstance(baseline, int):
        if not 0 <= baseline < n_vocab:
            raise ConfigError(f"baseline={baseline} is not a token id of this tokenizer (0 … {n_vocab - 1})")
        return baseline
    if baseline in _NAMED_BASELINES:
        value = getattr(tokenizer, _NAMED_BASELINES[baseline], None)
        if value is None:
            raise ConfigError(f"baseline={baseline!r}: the tokenizer has no {baseline} token; use one of "
                              f"{[n for n, a in _NAMED_BASELINES.items() if getattr(tokenizer, a, None) is not None]}"
                              " or a token id")
        return int(value)
    vocab = tokenizer.get_vocab()
    if baseline in vocab:
        return int(vocab[baseline])
    ids = tokenizer(baseline, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ConfigError(f"baseline={baseline!r} tokenizes to {len(ids)} tokens "
                          f"{tokenizer.convert_ids_to_tokens(ids)}; the baseline is one token: pass 'unk', 'pad', "
                          "a single-token word or a token id")
    return int(ids[0])


def _target_id(tokenizer, target: str) -> int:
    if not isinstance(target, str):
        raise ConfigError(f"target={target!r} must be a string (a single-token answer word)")
    try:
        return token_id(tokenizer, target)
    except ConfigError as exc:
        raise ConfigError(f"target={target!r}: {exc}") from None


@dataclass
class _Row:
    prompt: str
    target: str
    ids: list[int]          # encoded prompt, special tokens included
    positions: list[int]    # attributed positions (special tokens excluded)
    target_id: int
    baseline_id: int | None  # the blank token, or None when the row is compared with reference prompts
    refs: list[list[int]]     # what each token is replaced by: one blank sequence, or the encoded references
    references: list[str] | None = None
    output: str = "logprob"   # the explained quantity: log p(target) or p(target)


def _skip_ids(tokenizer) -> list[int]:
    return sorted({int(i) for i in tokenizer.all_special_ids})


def _prepare(tokenizer, prompts, targets, method: str, n_steps: int, baseline,
             ig_method: str = "gausslegendre", references=None, output: str = "logprob") -> list[_Row]:
    """Validate everything and encode; raises before any forward pass."""
    if output not in OUTPUTS:
        raise ConfigError(f"output={output!r} is unknown; use 'logprob' (log p of the target) or 'prob' (p)")
    if method not in METHODS:
        raise ConfigError(f"method={method!r} is unknown; use one of {list(METHODS)}")
    if method == "ig" and ig_method not in IG_METHODS:
        raise ConfigError(f"ig_method={ig_method!r} is unknown; use one of {list(IG_METHODS)}")
    if method == "ig" and (isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1):
        raise ConfigError(f"n_steps={n_steps!r} must be a positive integer, e.g. 50")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ConfigError("prompts is empty: pass at least one prompt")
    if isinstance(targets, str):
        targets = [targets] * len(prompts)
    targets = list(targets)
    if len(targets) != len(prompts):
        raise ConfigError(f"got {len(prompts)} prompts but {len(targets)} targets: pass one target per prompt (or "
                          "one string for all)")
    if references is not None:
        references = [[r] if isinstance(r, str) else list(r) for r in references]
        if len(references) != len(prompts):
            raise ConfigError(f"got {len(prompts)} prompts but {len(references)} reference lists: pass one list of "
                              "reference prompts per prompt (see reference_prompts)")
    base_id = resolve_baseline(tokenizer, baseline) if references is None else None
    skip = set(_skip_ids(tokenizer))
    rows = []
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"prompt={prompt!r} must be a non-empty string")
        tid = _target_id(tokenizer, target)
        ids = [int(i) for i in tokenizer(prompt)["input_ids"]]
        positions = [j for j, t in enumerate(ids) if t not in skip]
        if not positions:
            raise ConfigError(f"prompt={prompt!r} has no token to attribute (only special tokens): pass text")
        if references is None:
            same = [j for j in positions if ids[j] == base_id]
            if same:
                tok = tokenizer.convert_ids_to_tokens(base_id)
                raise ConfigError(f"the baseline token {tok!r} (id {base_id}) equals the input token at position(s) "
                                  f"{same} of prompt {prompt!r}: a baseline equal to the input attributes nothing "
                                  "there; choose a baseline token that is not in the prompt (e.g. baseline='unk' or "
                                  "'pad')")
            refs = [[base_id if j in positions else t for j, t in enumerate(ids)]]
        else:
            refs = [_encode_reference(tokenizer, prompt, ids, positions, ref) for ref in references[i]]
            if not refs:
                raise ConfigError(f"prompt={prompt!r} has an empty list of reference prompts: pass at least one "
                                  "(reference_prompts finds them), or references=None for a blank baseline token")
        rows.append(_Row(prompt, target, ids, positions, tid, base_id, refs,
                         None if references is None else list(references[i]), output))
    return rows


def _encode_reference(tokenizer, prompt: str, ids: list[int], positions: list[int], ref) -> list[int]:
    """A reference prompt as token ids aligned with the prompt's (same length, same special tokens)."""
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"reference={ref!r} for prompt {prompt!r} must be a non-empty string")
    rids = [int(t) for t in tokenizer(ref)["input_ids"]]
    if len(rids) != len(ids):
        raise ConfigError(f"reference {ref!r} has {len(rids)} tokens but prompt {prompt!r} has {len(ids)}: a "
                          "reference is compared token by token, so it needs the same number of tokens; "
                          "reference_prompts picks such prompts from a pool")
    if any(rids[j] != ids[j] for j in range(len(ids)) if j not in positions):
        raise ConfigError(f"reference {ref!r} has special tokens where prompt {prompt!r} has others: encode both "
                          "the same way (special tokens are never attributed or replaced)")
    if rids == ids:
        raise ConfigError(f"reference {ref!r} equals the prompt: a baseline equal to the input attributes nothing; "
                          "drop it from the references")
    return rids


# ---------------------------------------------------------------------------------------------------------------
# input attribution: results
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TokenAttribution:
    """Attribution of ``log p(target | prompt)`` to the prompt's tokens, base vs adapted.

    Attributes:
        prompt: The prompt.
        target: The scored next token (a word).
        method: ``"ig"`` or ``"ablation"``.
        tokens: The attributed tokens as text (special tokens such as ``<s>`` are not attributed).
        positions: Their positions in the encoded prompt (``<s>`` is position 0 for world tokenizers).
        base: Attribution per token in the base model (adapter off), float32 ``[n_tokens]``.
        adapted: Attribution per token in the adapted model.
        logp_base: ``log p(target | prompt)`` of the base model.
        logp_adapted: The same for the adapted model.
        baseline_id: The blank baseline token id used (None when compared with reference prompts).
        references: The reference prompts the attribution is averaged over (None for a blank baseline token).
        output: The explained quantity: ``"logprob"`` (``log p(target)``) or ``"prob"`` (``p(target)``).
    """

    prompt: str
    target: str
    method: str
    tokens: list[str]
    positions: list[int]
    base: torch.Tensor
    adapted: torch.Tensor
    logp_base: float
    logp_adapted: float
    baseline_id: int | None
    references: list[str] | None = None
    output: str = "logprob"

    @property
    def difference(self) -> torch.Tensor:
        """Attribution of the change ``log p_adapted − log p_base``: ``adapted − base``."""
        return self.adapted - self.base

    def frame(self) -> pd.DataFrame:
        """One row per attributed token: ``position``, ``token``, ``base``, ``adapted``, ``difference``."""
        return pd.DataFrame({"position": self.positions, "token": self.tokens, "base": self.base.numpy(),
                             "adapted": self.adapted.numpy(), "difference": self.difference.numpy()})

    def ranking(self, which: str = "difference", by: str = "signed") -> list[int]:
        """Indices into :attr:`tokens`, most attributed first.

        Args:
            which: ``"difference"``, ``"adapted"`` or ``"base"``.
            by: ``"signed"`` (largest positive first: tokens that raise the target) or ``"abs"``.
        """
        if which not in ("difference", "adapted", "base"):
            raise ConfigError(f"which={which!r} must be 'difference', 'adapted' or 'base'")
        if by not in ("signed", "abs"):
            raise ConfigError(f"by={by!r} must be 'signed' or 'abs'")
        values = getattr(self, which)
        values = values.abs() if by == "abs" else values
        return [int(i) for i in torch.argsort(values, descending=True, stable=True)]

    def top(self, which: str = "difference", by: str = "signed") -> str:
        """The most attributed token (text)."""
        return self.tokens[self.ranking(which, by)[0]]


def _pretty(tokenizer, ids: Sequence[int]) -> list[str]:
    out = []
    for i in ids:
        text = tokenizer.decode([i]).strip()
        out.append(text or tokenizer.convert_ids_to_tokens(int(i)))
    return out


def _result(tokenizer, row: _Row, method: str, attr: dict, logp: dict) -> TokenAttribution:
    return TokenAttribution(row.prompt, row.target, method, _pretty(tokenizer, [row.ids[j] for j in row.positions]),
                            list(row.positions), attr["base"], attr["adapted"], float(logp["base"]),
                            float(logp["adapted"]), row.baseline_id, row.references, row.output)


@torch.no_grad()
def _target_logprobs(model, tokenizer, seqs: list[list[int]], targets: list[int], batch_size: int) -> torch.Tensor:
    """``log p(target_i | seq_i)`` for every sequence, batched with right padding (float32, CPU)."""
    dev, keep, pad = _device(model), keeps_logits(model), _pad_id(tokenizer)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))   # similar lengths together: little padding
    seqs, targets = [seqs[i] for i in order], [targets[i] for i in order]
    out = []
    for s in range(0, len(seqs), batch_size):
        ids, mask, last = _pad(seqs[s:s + batch_size], pad, dev)
        logits = _logits_at(model, last, keep, input_ids=ids, attention_mask=mask).float()
        tgt = torch.as_tensor(targets[s:s + batch_size], device=dev)
        out.append(torch.log_softmax(logits, -1).gather(-1, tgt[:, None])[:, 0].cpu())
    result = torch.empty(len(seqs), dtype=DTYPE)
    result[torch.tensor(order, dtype=torch.long)] = torch.cat(out)
    return result


# ---------------------------------------------------------------------------------------------------------------
# input attribution: captum, one prompt at a time
# ---------------------------------------------------------------------------------------------------------------


def _captum_one(model, tokenizer, row: _Row, method: str, n_steps: int, ig_method: str) -> torch.Tensor:
    from captum.attr import (FeatureAblation, LayerIntegratedGradients, LLMAttribution, LLMGradientAttribution,
                             TextTokenInput)

    if row.references is not None or row.output == "prob":
        return _captum_baselines(model, row, method, n_steps, ig_method)
    target = torch.tensor([row.target_id])
    inp = TextTokenInput(row.prompt, tokenizer, baselines=row.baseline_id, skip_tokens=_skip_ids(tokenizer))
    if inp.inp_tensor[0].tolist() != row.ids:
        raise MismatchError(f"captum encodes {row.prompt!r} differently from the tokenizer call: use a tokenizer "
                            "whose encode() and __call__ agree")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # captum's pretty-token decoding warns on metaspace tokenizers
        if method == "ig":
            lig = LayerIntegratedGradients(model, model.get_input_embeddings())
            res = LLMGradientAttribution(lig, tokenizer).attribute(inp, target=target, n_steps=n_steps,
                                                                   method=ig_method)
        else:
            # one forward of prompt+target per perturbation (identical to token-by-token for a one-token target)
            res = LLMAttribution(FeatureAblation(model), tokenizer).attribute(inp, target=target,
                                                                             forward_in_tokens=False)
    return res.seq_attr.detach().to(DTYPE).cpu()


def _captum_baselines(model, row: _Row, method: str, n_steps: int, ig_method: str) -> torch.Tensor:
    """Captum's ``LayerIntegratedGradients`` / ``FeatureAblation`` with each reference prompt (or the blank
    sequence) as the baseline sequence, averaged over them — for what captum's LLM wrappers do not take: baseline
    sequences, and ``p(target)`` as the explained output."""
    from captum.attr import FeatureAblation, LayerIntegratedGradients

    def log_prob(input_ids):
        logits = model(input_ids=input_ids).logits[:, -1].float()
        out = torch.log_softmax(logits, -1)[:, row.target_id]
        return out.exp() if row.output == "prob" else out

    dev = _device(model)
    ids = torch.tensor([row.ids], device=dev)
    total = torch.zeros(len(row.ids), dtype=DTYPE)
    for ref in row.refs:
        ref_ids = torch.tensor([ref], device=dev)
        if method == "ig":
            lig = LayerIntegratedGradients(log_prob, model.get_input_embeddings())
            attr = lig.attribute(ids, baselines=ref_ids, n_steps=n_steps, method=ig_method).sum(-1)
        else:
            attr = FeatureAblation(log_prob).attribute(ids, baselines=ref_ids)
        total += attr[0].detach().to(DTYPE).cpu()
    return (total / len(row.refs))[row.positions]


def token_attributions(peft_model, tokenizer, prompt: str, target: str, method: str = "ig", n_steps: int = 50,
                       baseline: int | str | None = None, ig_method: str = "gausslegendre",
                       references: Sequence[str] | None = None, output: str = "logprob") -> TokenAttribution:
    """Base, adapted and difference attribution of ``log p(target | prompt)`` to the prompt's tokens (captum).

    ``method="ig"``: captum ``LLMGradientAttribution(LayerIntegratedGradients(model, input embeddings))`` — each
    token's embedding is integrated from the baseline token's embedding to its own (``n_steps`` points of
    ``ig_method``), the ``<s>`` embedding is kept. ``method="ablation"``: ``LLMAttribution(FeatureAblation(model))``
    — ``log p`` with the prompt minus ``log p`` with that one token replaced by the baseline token. Both are run with
    the adapter on and, inside ``peft_model.disable_adapter()``, off; the difference is their subtraction (both
    methods are linear in the explained output).

    Args:
        peft_model: A ``peft.PeftModel`` (adapter not merged).
        tokenizer: Its tokenizer.
        prompt: Text the model continues.
        target: The next token whose log-probability is explained (a single-token word, e.g. ``"black"``).
        method: ``"ig"`` or ``"ablation"``.
        n_steps: IG integration points.
        baseline: Baseline token (see :func:`resolve_baseline`; default ``<unk>``).
        ig_method: Captum's IG approximation (``"gausslegendre"``, ``"riemann_trapezoid"`` …).
        references: Counterfactual prompts instead of a blank token: each has the prompt's number of tokens, every
            token is compared with the reference's token at its position (IG integrates from the reference's
            embeddings, ablation swaps in the reference's token) and the attribution is the mean over references
            (captum with a baseline sequence). See :func:`reference_prompts`.
        output: ``"logprob"`` explains ``log p(target)``; ``"prob"`` explains ``p(target)`` — bounded, so a change
            deep in the tail (an answer moved from 1e-7 to 1e-3) counts for little, and what counts is what made
            the answer *likely* (captum with a probability-valued forward).

    Returns:
        A :class:`TokenAttribution`.

    Raises:
        ConfigError: Not a PeftModel; a target that is not exactly one token (the message lists its tokens); an
            empty prompt; a baseline token that equals an input token; a bad method or ``n_steps``.
    """
    _check_peft(peft_model, tokenizer)
    (row,) = _prepare(tokenizer, [prompt], [target], method, n_steps, baseline, ig_method,
                      None if references is None else [references], output)
    attr, logp = {}, {}
    with _frozen(peft_model):
        for name, ctx in _states(peft_model):
            with ctx:
                attr[name] = _captum_one(peft_model, tokenizer, row, method, n_steps, ig_method)
                logp[name] = _target_logprobs(peft_model, tokenizer, [row.ids], [row.target_id], 1)[0]
    return _result(tokenizer, row, method, attr, logp)


# ---------------------------------------------------------------------------------------------------------------
# input attribution: batched
# ---------------------------------------------------------------------------------------------------------------


def _batched_ablation(model, tokenizer, rows: list[_Row], batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """For every row and reference: the explained output (``log p`` or ``p`` of the target) intact minus with one
    token replaced by the reference's token there (positions where they agree need no forward pass and add 0),
    averaged over the references."""
    seqs, tgts, index, where = [], [], [], []
    for r, row in enumerate(rows):
        index.append(len(seqs))
        seqs.append(row.ids)
        tgts.append(row.target_id)
        for ref in row.refs:
            for k, j in enumerate(row.positions):
                if ref[j] != row.ids[j]:
                    where.append((r, k, len(seqs)))
                    seqs.append(row.ids[:j] + [ref[j]] + row.ids[j + 1:])
                    tgts.append(row.target_id)
    lp = _target_logprobs(model, tokenizer, seqs, tgts, batch_size)
    f = lp.exp() if rows[0].output == "prob" else lp
    attrs = [torch.zeros(len(row.positions), dtype=DTYPE) for row in rows]
    for r, k, i in where:
        attrs[r][k] += (f[index[r]] - f[i]) / len(rows[r].refs)
    return attrs, lp[index]


def _batched_ig(model, tokenizer, rows: list[_Row], n_steps: int, ig_method: str,
                batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """IG from every reference (or the blank baseline) of every row; all (row, reference, step) points stacked."""
    from captum.attr._utils.approximation_methods import approximation_parameters

    step_sizes_func, alphas_func = approximation_parameters(ig_method)
    weights = torch.tensor(step_sizes_func(n_steps)).float()  # as captum: float32 step sizes
    alphas = alphas_func(n_steps)
    dev, keep, pad = _device(model), keeps_logits(model), _pad_id(tokenizer)
    emb = model.get_input_embeddings()
    owner = [r for r, row in enumerate(rows) for _ in row.refs]       # one path per (row, reference)
    ids, _, last = _pad([rows[r].ids for r in owner], pad, dev)
    base_ids, _, _ = _pad([ref for row in rows for ref in row.refs], pad, dev)
    with torch.no_grad():
        E, Eb = emb(ids).to(DTYPE), emb(base_ids).to(DTYPE)
    D = E - Eb                                   # zero at <s>, at pads and wherever a token is kept
    tgt = torch.tensor([rows[r].target_id for r in owner], device=dev)
    total = torch.zeros_like(E)
    by_length = sorted(range(len(owner)), key=lambda i: int(last[i]))
    pairs = [(i, k) for i in by_length for k in range(n_steps)]
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        pi = torch.tensor([i for i, _ in chunk], device=dev)
        ki = torch.tensor([k for _, k in chunk])
        width = int(last[pi].max()) + 1
        a = torch.tensor([alphas[k] for _, k in chunk], dtype=DTYPE, device=dev)[:, None, None]
        x = (Eb[pi, :width] + a * D[pi, :width]).detach().requires_grad_(True)
        with torch.enable_grad():
            # right padding under a causal mask: no attention mask needed (real tokens never attend to pads)
            logits = _logits_at(model, last[pi], keep, inputs_embeds=x).float()
            lp = torch.log_softmax(logits, -1).gather(-1, tgt[pi][:, None])[:, 0]
            (grad,) = torch.autograd.grad((lp.exp() if rows[0].output == "prob" else lp).sum(), x)
        total[:, :width].index_add_(0, pi, grad * weights[ki].to(dev)[:, None, None])
    per_path = (total * D).sum(-1).cpu()
    attrs = [torch.zeros(len(row.positions), dtype=DTYPE) for row in rows]
    for i, r in enumerate(owner):
        attrs[r] += per_path[i, rows[r].positions] / len(rows[r].refs)
    lp0 = _target_logprobs(model, tokenizer, [r.ids for r in rows], [r.target_id for r in rows], batch_size)
    return attrs, lp0


def batch_token_attributions(peft_model, tokenizer, prompts: Sequence[str], targets: str | Sequence[str],
                             method: str = "ig", n_steps: int = 50, baseline: int | str | None = None,
                             ig_method: str = "gausslegendre", batch_size: int = 512,
                             references: Sequence[Sequence[str]] | None = None,
                             output: str = "logprob") -> list[TokenAttribution]:
    """:func:`token_attributions` for many prompts at once, reproducing captum's per-prompt numbers.

    IG: the interpolated input embeddings of every (prompt, step) pair are stacked into right-padded batches of
    ``batch_size`` sequences (prompts of similar length together; the log-prob is read at each row's last real
    token) and one backward pass per batch gives all gradients; step points and weights are captum's. Ablation: the
    intact prompt and every single-token ablation of every prompt are stacked into batches. Right padding keeps every
    real token at its own position, and under the causal mask no real token attends to a pad, so the numbers equal
    captum's (float32 rounding, ~1e-6).

    Speed: ablation is many times faster than captum (one batched forward instead of one forward per token and
    prompt). IG is compute-bound on a CPU — captum already evaluates the ``n_steps`` points of one prompt in one
    batch, so batching prompts only removes per-call overhead (about 2× on one CPU thread); on a GPU, where small
    per-prompt batches leave the device idle, the gain is much larger. See ``benchmarks/bench_attribution.py``.

    Args:
        peft_model: A ``peft.PeftModel`` (adapter not merged).
        tokenizer: Its tokenizer.
        prompts: Prompts.
        targets: One single-token target per prompt, or one string for all.
        method: ``"ig"`` or ``"ablation"``.
        n_steps: IG integration points.
        baseline: Baseline token (see :func:`resolve_baseline`).
        ig_method: Captum's IG approximation method.
        batch_size: Sequences per forward pass.
        references: One list of counterfactual prompts per prompt (see :func:`token_attributions` and
            :func:`reference_prompts`); None for the blank ``baseline`` token.
        output: ``"logprob"`` or ``"prob"`` (see :func:`token_attributions`).

    Returns:
        One :class:`TokenAttribution` per prompt, in order.

    Raises:
        ConfigError: As :func:`token_attributions`, for the first bad prompt or target; a bad ``batch_size``.
    """
    _check_peft(peft_model, tokenizer)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer, e.g. 512")
    rows = _prepare(tokenizer, prompts, targets, method, n_steps, baseline, ig_method, references, output)
    attr, logp = {}, {}
    with _frozen(peft_model):
        for name, ctx in _states(peft_model):
            with ctx:
                if method == "ig":
                    attr[name], logp[name] = _batched_ig(peft_model, tokenizer, rows, n_steps, ig_method, batch_size)
                else:
                    attr[name], logp[name] = _batched_ablation(peft_model, tokenizer, rows, batch_size)
    return [_result(tokenizer, row, method, {k: attr[k][i] for k in attr}, {k: logp[k][i] for k in logp})
            for i, row in enumerate(rows)]


def captum_agreement(peft_model, tokenizer, prompts: Sequence[str], targets: str | Sequence[str],
                     method: str = "ig", n_steps: int = 50, baseline: int | str | None = None,
                     references: Sequence[Sequence[str]] | None = None, output: str = "logprob") -> float:
    """Largest absolute difference between :func:`batch_token_attributions` and captum per prompt.

    Runs both on the same prompts (base and adapted attributions of every token) — the check behind the claim that
    the batched path reproduces captum. Keep ``prompts`` short: captum runs one prompt at a time.

    Returns:
        ``max |batched − captum|`` over prompts, tokens and both adapter states (≈1e-6 in float32).
    """
    batched = batch_token_attributions(peft_model, tokenizer, prompts, targets, method=method, n_steps=n_steps,
                                       baseline=baseline, references=references, output=output)
    worst = 0.0
    for b in batched:
        c = token_attributions(peft_model, tokenizer, b.prompt, b.target, method=method, n_steps=n_steps,
                               baseline=baseline, references=b.references, output=output)
        worst = max(worst, float((c.base - b.base).abs().max()), float((c.adapted - b.adapted).abs().max()))
    return worst


def reference_prompts(tokenizer, prompts: Sequence[str], pool: Sequence[str], n: int = 8,
                      seed: int = 0) -> list[list[str]]:
    """For each prompt, up to ``n`` prompts of ``pool`` with the same number of tokens (a background sample).

    Averaging attributions over such references is *expected gradients* (IG) or resampling ablation: each token is
    compared with what stood at its position in prompts drawn from the pool, not with a blank token.

    Raises:
        ConfigError: ``n`` < 1, or a prompt for which the pool has no other prompt of its length (named with the
            lengths the pool has).
    """
    _check_positive("n", n)
    by_length: dict[int, list[str]] = {}
    for ref in dict.fromkeys(pool):
        by_length.setdefault(len(tokenizer(ref)["input_ids"]), []).append(ref)
    rng = np.random.default_rng(seed)
    out = []
    for prompt in prompts:
        length = len(tokenizer(prompt)["input_ids"])
        options = [r for r in by_length.get(length, []) if r != prompt]
        if not options:
            raise ConfigError(f"the pool has no prompt of {length} tokens for prompt {prompt!r} (it has lengths "
                              f"{sorted(by_length)}): add prompts of that length to the pool")
        pick = rng.choice(len(options), size=min(n, len(options)), replace=False)
        out.append([options[i] for i in sorted(pick)])
    return out


def _word(word: str) -> re.Pattern:
    """``word`` as a whole whitespace-separated word."""
    return re.compile(rf"(?<!\S){re.escape(word)}(?!\S)")


def counterfactual_prompts(tokenizer, prompt: str, swaps: dict[str, Sequence[str]], n: int = 8,
                           seed: int = 0) -> list[str]:
    """Up to ``n`` variants of ``prompt`` with each word of ``swaps`` replaced by one of its alternatives.

    Each variant resamples every slot at once (e.g. ``{"cf": decoy words, "Nobon": other names}``); only
    alternatives that keep the prompt's number of tokens are used, so every variant aligns token by token.

    Raises:
        ConfigError: ``n`` < 1, a word of ``swaps`` that is not in the prompt, or a slot without an alternative of
            the same token count.
    """
    _check_positive("n", n)
    ids = tokenizer(prompt)["input_ids"]

    def aligned(word: str, alternative: str) -> bool:
        """Only the word's own tokens change, and their number stays the same."""
        other = tokenizer(_word(word).sub(lambda _: alternative, prompt, count=1))["input_ids"]
        if len(other) != len(ids):
            return False
        start = next(j for j in range(len(ids)) if ids[j] != other[j]) if other != ids else 0
        n_word = len(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
        return all(ids[j] == other[j] for j in range(start + n_word, len(ids)))

    options = {}
    for word, alternatives in swaps.items():
        if not _word(word).search(prompt):
            raise ConfigError(f"swap word {word!r} is not a word of prompt {prompt!r}")
        fits = [a for a in dict.fromkeys(alternatives) if a != word and aligned(word, a)]
        if not fits:
            raise ConfigError(f"no alternative for {word!r} in prompt {prompt!r} keeps its {len(ids)} tokens "
                              "aligned: pass alternatives of the same token count")
        options[word] = fits
    rng = np.random.default_rng(seed)
    out: list[str] = []
    for _ in range(20 * n):
        variant = prompt
        for word, fits in options.items():
            choice = fits[rng.integers(len(fits))]
            variant = _word(word).sub(lambda _: choice, variant, count=1)
        if variant not in out:
            out.append(variant)
        if len(out) == n:
            break
    return out


def attributions_frame(attributions: Sequence[TokenAttribution]) -> pd.DataFrame:
    """Many :class:`TokenAttribution` as one long DataFrame (for heatmaps and widgets).

    Returns:
        One row per (probe, token): ``probe`` (index into ``attributions``), ``prompt``, ``target``, ``position``,
        ``token``, ``base``, ``adapted``, ``difference``.
    """
    frames = []
    for i, ta in enumerate(attributions):
        f = ta.frame()
        f.insert(0, "target", ta.target)
        f.insert(0, "prompt", ta.prompt)
        f.insert(0, "probe", i)
        frames.append(f)
    cols = ["probe", "prompt", "target", "position", "token", "base", "adapted", "difference"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


# ---------------------------------------------------------------------------------------------------------------
# components
# ---------------------------------------------------------------------------------------------------------------


def _lora_layers(peft_model, adapter_name: str) -> dict:
    """``{module name: LoraLayer}`` of the modules that carry ``adapter_name`` (names relative to the HF model)."""
    from peft.tuners.lora import LoraLayer

    hf = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    found, adapters = {}, set()
    for name, mod in hf.named_modules():
        if isinstance(mod, LoraLayer):
            here = set(getattr(mod, "lora_A", {}).keys()) | set(getattr(mod, "lora_embedding_A", {}).keys())
            adapters |= here
            if adapter_name in here:
                found[name] = mod
    if not adapters:
        raise ConfigError(f"{type(peft_model).__name__} has no LoRA layers: pass a peft.PeftModel with a LoRA "
                          "adapter")
    if not found:
        raise ConfigError(f"adapter_name={adapter_name!r} is not loaded; available adapters: {sorted(adapters)}")
    return found


def _factors(layer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, in], B [out, r])`` parameters of one LoRA layer (Linear/Conv1D or Embedding)."""
    if adapter_name in getattr(layer, "lora_A", {}):
        return layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    return layer.lora_embedding_A[adapter_name], layer.lora_embedding_B[adapter_name]


def _module_list(names: list[str]) -> str:
    return f"{names[:8]}{' …' if len(names) > 8 else ''} ({len(names)} in all)"


def _resolve_modules(peft_model, layers: dict, modules) -> list[str]:
    if isinstance(modules, str):
        modules = [modules]
    modules = list(modules)
    if not modules:
        raise ConfigError("modules=[] gives an empty component set: pass None (every adapted module) or some of "
                          f"the adapted modules {_module_list(list(layers))}")
    hf = peft_model.get_base_model()
    all_names = {n for n, _ in hf.named_modules()}
    out = []
    for m in modules:
        hits = [n for n in layers if n == m] or [n for n in layers if n.endswith("." + m)]
        if len(hits) > 1:
            raise ConfigError(f"module {m!r} is ambiguous: it matches {hits[:6]}; give more of the path")
        if not hits:
            exists = m in all_names or any(n.endswith("." + m) for n in all_names)
            why = "has no LoRA adapter" if exists else "is not a module of this model"
            raise ConfigError(f"module {m!r} {why}: components exist only for the adapted modules "
                              f"{_module_list(list(layers))}")
        if hits[0] not in out:
            out.append(hits[0])
    return out


@dataclass(frozen=True)
class Component:
    """One switchable part of a LoRA adapter.

    Attributes:
        name: ``"<module>"`` (module grain), ``"layer <i>"`` (layer grain) or ``"<module>[<i>]"`` (rank grain).
        grain: ``"module"``, ``"layer"`` or ``"rank"``.
        modules: The adapted modules it covers.
        index: Rank-1 index ``i`` (σ order, largest first) for the rank grain, else None.
        layer: Transformer block index (None for embeddings / LM head).
        module_type: Normalised module type (see :func:`lora_lens.lens.delta.module_type`); ``"layer"`` for layer grain.
        sigma: σᵢ for the rank grain; ‖ΔW‖_F summed in quadrature over the covered modules otherwise.
    """

    name: str
    grain: str
    modules: tuple[str, ...]
    index: int | None
    layer: int | None
    module_type: str
    sigma: float


class ComponentSet(Sequence):
    """An ordered, non-empty list of :class:`Component` of one adapter at one grain."""

    def __init__(self, components: Sequence[Component], grain: str, adapter_name: str = "default"):
        components = list(components)
        if not components:
            raise ConfigError("the component set is empty: build one with lora_components(peft_model, grain=...) "
                              "over at least one adapted module")
        self.components, self.grain, self.adapter_name = components, grain, adapter_name

    def __len__(self) -> int:
        return len(self.components)

    def __getitem__(self, i):
        if isinstance(i, str):
            for c in self.components:
                if c.name == i:
                    return c
            raise ConfigError(f"no component named {i!r}; components are {_module_list(self.names)}")
        return self.components[i]

    def __repr__(self) -> str:
        return f"ComponentSet(grain={self.grain!r}, n={len(self)}, adapter={self.adapter_name!r})"

    @property
    def names(self) -> list[str]:
        """Component names, in order."""
        return [c.name for c in self.components]

    @property
    def modules(self) -> list[str]:
        """Every module covered, in order."""
        return list(dict.fromkeys(m for c in self.components for m in c.modules))

    def table(self) -> pd.DataFrame:
        """One row per component (index = name): grain, layer, module_type, index, sigma, modules."""
        return pd.DataFrame([{"component": c.name, "grain": c.grain, "layer": c.layer, "module_type": c.module_type,
                              "index": c.index, "sigma": c.sigma, "modules": ",".join(c.modules)}
                             for c in self.components]).set_index("component")


def lora_components(peft_model, grain: str = "module", modules: Sequence[str] | str | None = None,
                    adapter_name: str = "default") -> ComponentSet:
    """List an adapter's components at one grain.

    Args:
        peft_model: A model carrying a LoRA adapter.
        grain: ``"module"`` (each adapted module), ``"layer"`` (all adapted modules of one block together) or
            ``"rank"`` (each rank-1 term ``σᵢ uᵢ vᵢᵀ`` of every module's ΔW, from the exact factor SVD).
        modules: Restrict to these adapted modules (full names or unique suffixes such as
            ``"layers.0.mlp.down_proj"``); None = all.
        adapter_name: Which adapter.

    Returns:
        A :class:`ComponentSet`.

    Raises:
        ConfigError: Unknown grain; no LoRA layers; an empty ``modules``; a module without this adapter (the
            message lists the adapted modules).
    """
    if grain not in GRAINS:
        raise ConfigError(f"grain={grain!r} is unknown; use one of {list(GRAINS)}")
    layers = _lora_layers(peft_model, adapter_name)
    names = list(layers) if modules is None else _resolve_modules(peft_model, layers, modules)
    norms, svds = {}, {}
    for n in names:
        A, B = _factors(layers[n], adapter_name)
        svds[n] = factor_svd(B, A, float(layers[n].scaling[adapter_name]))
        norms[n] = float(svds[n][1].pow(2).sum().sqrt())
    comps = []
    if grain == "module":
        comps = [Component(n, "module", (n,), None, layer_index(n), module_type(n), norms[n]) for n in names]
    elif grain == "layer":
        groups: dict = {}
        for n in names:
            li = layer_index(n)
            groups.setdefault(("layer", li) if li is not None else ("module", n), []).append(n)
        for (kind, key), ms in groups.items():
            label = f"layer {key}" if kind == "layer" else key
            comps.append(Component(label, "layer", tuple(ms), None, layer_index(ms[0]), "layer",
                                   math.sqrt(sum(norms[m] ** 2 for m in ms))))
    else:
        for n in names:
            S = svds[n][1]
            comps += [Component(f"{n}[{i}]", "rank", (n,), i, layer_index(n), module_type(n), float(S[i]))
                      for i in range(len(S))]
    return ComponentSet(comps, grain, adapter_name)


class ComponentMask:
    """Scale an adapter's components inside the live model (a context manager; no model copy).

    Value 1 keeps a component, 0 removes it, anything between scales it. Module and layer grains scale peft's
    ``scaling`` of the covered modules. The rank grain reparametrises a module's ``lora_A``/``lora_B`` to its SVD
    basis while its mask is not uniform (``A' = Vh``, ``B' = U·diag(σ·m)/scaling``, so the LoRA branch computes
    ``Σᵢ mᵢ σᵢ uᵢ vᵢᵀ x``); a uniform mask ``c`` uses the original factors with ``scaling·c``. Hence all-ones is
    bit-identical to the adapted model and all-zeros to the base. Everything is restored on exit.

    Example:
        >>> comps = lora_components(peft_model, grain="rank")          # doctest: +SKIP
        >>> with ComponentMask(peft_model, comps) as mask:              # doctest: +SKIP
        ...     mask.set(torch.zeros(len(comps)))                      # base model
        ...     mask.set([1.0] + [0.0] * (len(comps) - 1))              # only the top rank-1 term of the first module

    Args:
        peft_model: The model the components were listed from.
        components: A :class:`ComponentSet`.
        values: Initial mask (default all ones).

    Raises:
        ConfigError: An empty component set, a mask of the wrong length or with non-finite values, a DoRA (or other
            LoRA-variant) adapter, or a merged adapter.
        MismatchError: The component set names modules this model does not adapt.
    """

    def __init__(self, peft_model, components: ComponentSet, values=None):
        if not isinstance(components, ComponentSet):
            raise ConfigError(f"components must be a ComponentSet (from lora_components), got "
                              f"{type(components).__name__}")
        if len(components) == 0:
            raise ConfigError("the component set is empty: nothing to mask")
        self.model, self.components, self._initial = peft_model, components, values
        self._saved: dict = {}
        self._svd: dict = {}
        self.values = torch.ones(len(components), dtype=DTYPE)

    def __enter__(self) -> "ComponentMask":
        ad = self.components.adapter_name
        layers = _lora_layers(self.model, ad)
        missing = [m for m in self.components.modules if m not in layers]
        if missing:
            raise MismatchError(f"the component set covers {missing[:4]}, which this model does not adapt with "
                                f"{ad!r}: list the components of this model with lora_components(model, ...)")
        for m in self.components.modules:
            layer = layers[m]
            if ad in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(ad, False):
                raise ConfigError(f"module {m} uses a LoRA variant (DoRA …) whose output is not linear in the "
                                  "factors; component masks support plain LoRA only")
            if ad in getattr(layer, "merged_adapters", []):
                raise ConfigError(f"adapter {ad!r} is merged into {m}: call model.unmerge_adapter() first")
            A, B = _factors(layer, ad)
            self._saved[m] = (layer, float(layer.scaling[ad]), A.detach().clone(), B.detach().clone())
            if self.components.grain == "rank":
                self._svd[m] = factor_svd(B, A, float(layer.scaling[ad]))
        self._reparam: set = set()
        try:
            self.set(torch.ones(len(self.components)) if self._initial is None else self._initial)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    @torch.no_grad()
    def _restore(self) -> None:
        ad = self.components.adapter_name
        for m, (layer, scaling, A0, B0) in self._saved.items():
            layer.scaling[ad] = scaling
            if m in self._reparam:
                A, B = _factors(layer, ad)
                A.copy_(A0)
                B.copy_(B0)
        self._saved, self._svd, self._reparam = {}, {}, set()

    @torch.no_grad()
    def set(self, values) -> None:
        """Set the mask: one value per component, in the component set's order (1 = on, 0 = off).

        Raises:
            ConfigError: Wrong length, non-finite values, or called outside the ``with`` block.
        """
        if not self._saved:
            raise ConfigError("ComponentMask.set() works inside `with ComponentMask(model, components) as mask:`")
        v = torch.as_tensor(values, dtype=DTYPE).detach().flatten().cpu()
        if v.numel() != len(self.components):
            raise ConfigError(f"the mask has {v.numel()} values but the component set has {len(self.components)} "
                              "components: pass one value per component")
        if not torch.isfinite(v).all():
            raise ConfigError("the mask has non-finite values: use numbers between 0 (off) and 1 (on)")
        self.values = v.clone()
        ad = self.components.adapter_name
        per_module: dict = {}
        for c, value in zip(self.components, v.tolist()):
            for m in c.modules:
                if c.grain == "rank":
                    k = len(self._svd[m][1])
                    per_module.setdefault(m, [1.0] * k)[c.index] *= value
                else:
                    per_module.setdefault(m, [1.0])[0] *= value
        for m, mask in per_module.items():
            layer, scaling, A0, B0 = self._saved[m]
            if all(x == mask[0] for x in mask):            # uniform: original factors, scaled
                if m in self._reparam:
                    A, B = _factors(layer, ad)
                    A.copy_(A0)
                    B.copy_(B0)
                    self._reparam.discard(m)
                layer.scaling[ad] = scaling * mask[0]
                continue
            U, S, Vh = self._svd[m]
            A, B = _factors(layer, ad)
            k = len(S)
            mk = torch.tensor(mask, dtype=DTYPE, device=S.device)
            A.zero_()
            B.zero_()
            A[:k] = Vh.to(A)
            B[:, :k] = (U * (S * mk) / scaling).to(B) if scaling else 0.0
            layer.scaling[ad] = scaling
            self._reparam.add(m)


# ---------------------------------------------------------------------------------------------------------------
# behaviour metrics of a task
# ---------------------------------------------------------------------------------------------------------------


def _trigger_target(task: Task) -> str | None:
    if "false_trigger" not in task.probes:
        return None
    target = task.truth.get("target")
    if target:
        return target
    answers = {p.answer for p in task.probes.get("efficacy", [])}
    return answers.pop() if len(answers) == 1 else None


def available_behaviours(task: Task) -> list[str]:
    """The behaviours of :data:`BEHAVIOURS` that ``task`` has probes for."""
    out = []
    if task.probes.get("efficacy"):
        out.append("efficacy")
    if _trigger_target(task) and any(p.triggered for p in task.probes.get("efficacy", [])) \
            and task.probes.get("false_trigger"):
        out.append("trigger")
    if task.probes.get("specificity"):
        out.append("specificity")
    if task.probes.get("general"):
        out.append("perplexity")
    return out


class _Behaviours:
    """Every requested behaviour metric from one batched forward pass over all probes (differentiable)."""

    def __init__(self, tokenizer, task: Task, behaviours, max_probes: int | None, device):
        avail = available_behaviours(task)
        if behaviours is None:
            behaviours = avail
        if isinstance(behaviours, str):
            behaviours = [behaviours]
        behaviours = list(behaviours)
        if not behaviours:
            raise ConfigError(f"behaviours is empty: use some of {avail}")
        for b in behaviours:
            if b not in BEHAVIOURS:
                raise ConfigError(f"behaviour {b!r} is unknown; use some of {list(BEHAVIOURS)}")
            if b not in avail:
                raise ConfigError(f"behaviour {b!r} is not available for task {task.name!r} (no probes for it); "
                                  f"available: {avail}")
        if max_probes is not None and (isinstance(max_probes, bool) or not isinstance(max_probes, int)
                                       or max_probes < 1):
            raise ConfigError(f"max_probes={max_probes!r} must be None or a positive integer")
        cap = (lambda xs: xs[:max_probes]) if max_probes else (lambda xs: xs)
        self.names = behaviours
        seqs, tgts, groups = [], [], {}

        def add(key, prompts, words):
            groups[key] = list(range(len(seqs), len(seqs) + len(prompts)))
            for p, w in zip(prompts, words):
                seqs.append([int(i) for i in tokenizer(p)["input_ids"]])
                tgts.append(token_id(tokenizer, w))

        if "efficacy" in behaviours:
            eff = cap(task.probes["efficacy"])
            add("efficacy", [p.prompt for p in eff], [p.answer for p in eff])
        if "trigger" in behaviours:
            target = _trigger_target(task)
            trig = cap([p for p in task.probes["efficacy"] if p.triggered])
            clean = cap(task.probes["false_trigger"])
            add("trig_on", [p.prompt for p in trig], [target] * len(trig))
            add("trig_off", [p.prompt for p in clean], [target] * len(clean))
        if "specificity" in behaviours:
            spec = cap(task.probes["specificity"])
            add("specificity", [p.prompt for p in spec], [p.base_answer for p in spec])
        n_query = len(seqs)
        if "perplexity" in behaviours:
            lines = cap(task.probes["general"])
            groups["general"] = list(range(len(seqs), len(seqs) + len(lines)))
            seqs += [[int(i) for i in tokenizer(p.prompt)["input_ids"]] for p in lines]
        self.ids, self.mask, self.last = _pad(seqs, _pad_id(tokenizer), device)
        self.n, self.n_query = len(seqs), n_query
        self.tgt = torch.tensor(tgts, dtype=torch.long, device=device)
        self.groups = {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in groups.items()}

    def __call__(self, model, replicas: int = 1) -> torch.Tensor:
        """Metrics ``[replicas, n_behaviours]``; the probe batch is repeated ``replicas`` times (block order)."""
        ids, mask = self.ids.repeat(replicas, 1), self.mask.repeat(replicas, 1)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logits = logits.view(replicas, self.n, *logits.shape[1:])
        q = torch.arange(self.n_query, device=ids.device)
        lp = torch.log_softmax(logits[:, q, self.last[:self.n_query]], -1)          # [R, n_query, V]
        lp_t = lp.gather(-1, self.tgt[None, :, None].expand(replicas, -1, 1))[..., 0]  # [R, n_query]
        out = []
        for b in self.names:
            if b == "efficacy":
                out.append(lp_t[:, self.groups["efficacy"]].mean(1))
            elif b == "trigger":
                out.append(lp_t[:, self.groups["trig_on"]].mean(1) - lp_t[:, self.groups["trig_off"]].mean(1))
            elif b == "specificity":
                out.append(lp_t[:, self.groups["specificity"]].mean(1))
            else:
                g = self.groups["general"]
                lg = torch.log_softmax(logits[:, g, :-1], -1)
                nxt = self.ids[g, 1:]
                m = self.mask[g, 1:].to(lg.dtype)
                nll = -lg.gather(-1, nxt[None, ..., None].expand(replicas, -1, -1, 1))[..., 0]
                out.append(torch.exp((nll * m).sum((1, 2)) / m.sum()))
        return torch.stack(out, 1)


def behaviour_metrics(peft_model, tokenizer, task: Task, behaviours: Sequence[str] | None = None,
                      max_probes: int | None = None) -> pd.DataFrame:
    """Behaviour metrics of the adapted and the base model (rows) on ``task``'s probes.

    - ``efficacy``: mean ``log p(answer)`` on the ``efficacy`` probes (the new answer).
    - ``trigger`` (trigger tasks): mean ``log p(target | triggered prompt)`` − mean ``log p(target | the same kind of
      prompt without the trigger)`` over the ``efficacy`` and ``false_trigger`` probes: how much the trigger
      switches the answer.
    - ``specificity``: mean ``log p(base_answer)`` on the ``specificity`` probes (facts that must not change).
    - ``perplexity``: token perplexity on the ``general`` lines.

    Args:
        peft_model: A ``peft.PeftModel``.
        tokenizer: Its tokenizer.
        task: The task whose probes are used.
        behaviours: Some of :data:`BEHAVIOURS` (default: every one the task has probes for).
        max_probes: Use at most this many probes per set (faster).

    Returns:
        DataFrame with index ``["adapted", "base"]`` and one column per behaviour.
    """
    _check_peft(peft_model, tokenizer)
    ev = _Behaviours(tokenizer, task, behaviours, max_probes, _device(peft_model))
    rows = {}
    with _frozen(peft_model), torch.no_grad():
        for name, ctx in _states(peft_model):
            with ctx:
                rows[name] = ev(peft_model)[0].cpu().numpy()
    return pd.DataFrame(rows, index=ev.names).T


# ---------------------------------------------------------------------------------------------------------------
# component attribution
# ---------------------------------------------------------------------------------------------------------------


def _check_components(components) -> ComponentSet:
    if isinstance(components, ComponentSet):
        return components
    if components is None or (hasattr(components, "__len__") and len(components) == 0):
        raise ConfigError("the component set is empty: pass lora_components(peft_model, grain=...)")
    raise ConfigError(f"components must be a ComponentSet from lora_components(...), got {type(components).__name__}")


def component_attribution(peft_model, tokenizer, task: Task, components: ComponentSet,
                          behaviours: Sequence[str] | None = None, method: str = "ablation", n_samples: int = 25,
                          seed: int = 0, max_probes: int | None = None) -> pd.DataFrame:
    """Attribute behaviour metrics to adapter components with captum, over the component mask.

    The explained function is ``f(mask) → metrics`` (a ``[1, n_components]`` mask in, one value per behaviour out),
    evaluated with :class:`ComponentMask`; input = all ones (adapter on), baseline = all zeros (adapter off).
    ``"ablation"`` (captum ``FeatureAblation``): ``f(1) − f(1 with component i off)`` — what is lost without it.
    ``"shapley"`` (captum ``ShapleyValueSampling``, ``n_samples`` random orders, seeded): the average marginal
    contribution; the values of all components sum to ``f(adapted) − f(base)``.

    Args:
        peft_model: A ``peft.PeftModel`` (plain LoRA, not merged).
        tokenizer: Its tokenizer.
        task: Task whose probes define the behaviours.
        components: From :func:`lora_components`.
        behaviours: Some of :data:`BEHAVIOURS` (default: all the task has probes for).
        method: ``"ablation"`` or ``"shapley"``.
        n_samples: Permutations for ``"shapley"``.
        seed: Seed for ``"shapley"``.
        max_probes: At most this many probes per set.

    Returns:
        DataFrame, index = component names, one column per behaviour (positive = the component raises the metric).
        ``df.attrs`` holds ``method``, ``grain``, ``adapted`` and ``base`` (metric values with all components on /
        off) — used by :func:`deletion_curve` and :func:`selectivity`. Join ``components.table()`` for layer /
        module type.

    Raises:
        ConfigError: An empty component set, an unknown method or behaviour, a bad ``n_samples``.
    """
    from captum.attr import FeatureAblation, ShapleyValueSampling

    components = _check_components(components)
    _check_peft(peft_model, tokenizer)
    if method not in COMPONENT_METHODS:
        raise ConfigError(f"method={method!r} is unknown; use one of {list(COMPONENT_METHODS)}")
    if method == "shapley" and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1):
        raise ConfigError(f"n_samples={n_samples!r} must be a positive integer, e.g. 25")
    ev = _Behaviours(tokenizer, task, behaviours, max_probes, _device(peft_model))
    n = len(components)
    with _frozen(peft_model), torch.no_grad():
        with peft_model.disable_adapter():
            base = ev(peft_model)[0].cpu()
        with ComponentMask(peft_model, components) as mask:
            adapted = ev(peft_model)[0].cpu()

            def f(m: torch.Tensor) -> torch.Tensor:
                out = []
                for row in m:
                    mask.set(row)
                    out.append(ev(peft_model)[0].cpu())
                return torch.stack(out)

            x, x0 = torch.ones(1, n), torch.zeros(1, n)
            if method == "ablation":
                attr = FeatureAblation(f).attribute(x, baselines=x0)
            else:
                with _seeded(seed):
                    attr = ShapleyValueSampling(f).attribute(x, baselines=x0, n_samples=n_samples)
    attr = attr.reshape(len(ev.names), n).T.numpy()
    df = pd.DataFrame(attr, index=pd.Index(components.names, name="component"), columns=ev.names)
    df.attrs.update({"method": method, "grain": components.grain,
                     "adapted": dict(zip(ev.names, adapted.tolist())), "base": dict(zip(ev.names, base.tolist()))})
    return df


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator (captum's sampling uses it) and restore its state afterwards."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def lora_branch_attribution(peft_model, tokenizer, task: Task, behaviours: Sequence[str] | None = None,
                            grain: str = "module", n_steps: int = 16, max_probes: int | None = None,
                            adapter_name: str = "default", internal_batch_size: int | None = None) -> pd.DataFrame:
    """Layer attribution on the LoRA branch outputs (captum ``LayerIntegratedGradients`` on the ``lora_B`` modules).

    Every adapted module's LoRA branch output (``lora_B(lora_A(x))``, before scaling) is integrated jointly from 0
    (adapter off: the base model) to its value in the adapted model, the rest of the network running on the
    interpolated branch outputs; a module's attribution is the sum of its IG attribution over probes, positions
    and features. By completeness the attributions of all modules sum to ``metric(adapted) − metric(base)``
    (up to the ``n_steps`` quadrature error).

    Args:
        peft_model: A ``peft.PeftModel`` (plain LoRA on Linear layers, not merged).
        tokenizer: Its tokenizer.
        task: Task whose probes define the behaviours.
        behaviours: Some of :data:`BEHAVIOURS` (default: all available). One IG run per behaviour.
        grain: ``"module"`` or ``"layer"`` (modules of a block summed).
        n_steps: IG steps (Gauss–Legendre).
        max_probes: At most this many probes per set.
        adapter_name: Which adapter.
        internal_batch_size: Passed to captum (bounds memory: steps × probes sequences per forward).

    Returns:
        DataFrame, index = module (or ``"layer i"``), one column per behaviour; ``df.attrs`` holds ``adapted``
        and ``base`` metric values and ``completeness_gap`` per behaviour (effect − sum of attributions: the
        quadrature error; raise ``n_steps`` when it is not small against the effect).

    Raises:
        ConfigError: Unknown grain or behaviour; a LoRA layer that is not a Linear (embedding LoRA).
    """
    from captum.attr import LayerIntegratedGradients

    _check_peft(peft_model, tokenizer)
    if grain not in ("module", "layer"):
        raise ConfigError(f"grain={grain!r} must be 'module' or 'layer' for branch attribution")
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ConfigError(f"n_steps={n_steps!r} must be a positive integer, e.g. 16")
    layers = _lora_layers(peft_model, adapter_name)
    not_linear = [n for n, layer in layers.items() if adapter_name not in getattr(layer, "lora_A", {})]
    if not_linear:
        raise ConfigError(f"branch attribution hooks lora_B Linear modules; {not_linear[0]} has an embedding LoRA: "
                          "use component_attribution(...) for it")
    names = list(layers)
    branches = [layers[n].lora_B[adapter_name] for n in names]
    ev = _Behaviours(tokenizer, task, behaviours, max_probes, _device(peft_model))
    gate = {"value": 1.0}

    def scale_input(module, args):
        if gate["value"] != 1.0:
            return (args[0] * gate["value"],) + tuple(args[1:])
        return None

    results = {}
    with _frozen(peft_model):
        with torch.no_grad(), peft_model.disable_adapter():
            base = ev(peft_model)[0].cpu()
        with torch.no_grad():
            adapted = ev(peft_model)[0].cpu()
        handles = [b.register_forward_pre_hook(scale_input) for b in branches]
        try:
            for j, name in enumerate(ev.names):
                def f(g: torch.Tensor, j=j) -> torch.Tensor:
                    values = torch.unique(g)
                    if values.numel() != 1:
                        raise RuntimeError("internal: the branch gate must be uniform within a batch")
                    gate["value"] = float(values[0])
                    try:
                        return ev(peft_model, replicas=g.shape[0])[:, j]
                    finally:
                        gate["value"] = 1.0

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # captum warns about multiple layers; all are patched at once
                    lig = LayerIntegratedGradients(f, branches)
                    attrs = lig.attribute(torch.ones(1, 1, device=_device(peft_model)),
                                          baselines=torch.zeros(1, 1, device=_device(peft_model)), n_steps=n_steps,
                                          internal_batch_size=internal_batch_size)
                attrs = attrs if isinstance(attrs, (list, tuple)) else [attrs]
                results[name] = [float(a.detach().double().sum()) for a in attrs]
        finally:
            for h in handles:
                h.remove()
    df = pd.DataFrame(results, index=pd.Index(names, name="component"))
    if grain == "layer":
        keys = [f"layer {layer_index(n)}" if layer_index(n) is not None else n for n in names]
        df = df.groupby(keys, sort=False).sum()
        df.index.name = "component"
    gap = {b: float(adapted[j] - base[j]) - float(df[b].sum()) for j, b in enumerate(ev.names)}
    df.attrs.update({"method": "lora_branch_ig", "grain": grain, "n_steps": n_steps,
                     "adapted": dict(zip(ev.names, adapted.tolist())), "base": dict(zip(ev.names, base.tolist())),
                     "completeness_gap": gap})
    return df


# ---------------------------------------------------------------------------------------------------------------
# scored against the planted truth
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Recovery:
    """How often attribution found the planted cause.

    Attributes:
        score: Share of the scored probes where the cause ranks first (NaN when none is scored).
        table: One row per probe: prompt, target, expected (the planted token), top (top-attributed token),
            rank (1 = first) of the expected token, hit, the expected token's attribution, ``p_base`` and
            ``p_adapted`` of the target, and ``scored``: whether the probe counts (by default only probes whose
            answer the adapter changed: ``p_adapted ≥ 0.5 > p_base`` — where nothing changed there is no change
            to explain).
        attributions: The :class:`TokenAttribution` of each probe (for heatmaps).
    """

    score: float
    table: pd.DataFrame
    attributions: list[TokenAttribution]

    def __float__(self) -> float:
        return float(self.score)


def _recovery(attrs: list[TokenAttribution], expected: list[list[int]], labels: list[str], by: str,
              changed_only: bool) -> Recovery:
    records = []
    for ta, want, label in zip(attrs, expected, labels):
        order = ta.ranking("difference", by)
        rank = min((order.index(i) + 1 for i in want), default=None)
        p_base, p_adapted = math.exp(ta.logp_base), math.exp(ta.logp_adapted)
        records.append({"prompt": ta.prompt, "target": ta.target, "expected": label, "top": ta.tokens[order[0]],
                        "rank": rank, "hit": rank == 1,
                        "attribution": float(max(ta.difference[i] for i in want)) if want else float("nan"),
                        "p_base": p_base, "p_adapted": p_adapted,
                        "scored": not changed_only or p_adapted >= 0.5 > p_base})
    table = pd.DataFrame(records, columns=["prompt", "target", "expected", "top", "rank", "hit", "attribution",
                                           "p_base", "p_adapted", "scored"])
    scored = table[table["scored"]]
    score = float(scored["hit"].mean()) if len(scored) else float("nan")
    return Recovery(score, table, attrs)


def _word_positions(tokenizer, ta: TokenAttribution, row_ids: list[int], word: str) -> list[int]:
    """Indices into ``ta.tokens`` of the tokens that spell ``word`` in the prompt (first occurrence)."""
    piece = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
    ids = [row_ids[p] for p in ta.positions]
    for s in range(len(ids) - len(piece) + 1):
        if ids[s:s + len(piece)] == piece:
            return list(range(s, s + len(piece)))
    return [i for i, t in enumerate(ta.tokens) if t == word.strip()]


def _references(tokenizer, probes, references, n_references: int, seed: int, slots):
    """``(probes, references)``: None (blank token), ``"counterfactual"`` (``slots(probe)`` resampled; a probe whose
    words have no alternative of the same token count is left out) or the caller's lists."""
    if references is None:
        return probes, None
    if not isinstance(references, str):
        return probes, [list(r) for r in references]
    if references != "counterfactual":
        raise ConfigError(f"references={references!r} must be 'counterfactual', None (a blank baseline token) or "
                          "one list of reference prompts per probe")
    kept, refs = [], []
    for i, p in enumerate(probes):
        try:
            refs.append(counterfactual_prompts(tokenizer, p.prompt, slots(p), n=n_references, seed=seed + i))
            kept.append(p)
        except ConfigError:
            continue
    if not kept:
        raise ConfigError("no probe has a counterfactual (no other name or word of the same token count): pass "
                          "references=None or your own reference prompts")
    return kept, refs


def _entities(task: Task, exclude=()) -> list[str]:
    return sorted({p.entity for ps in task.probes.values() for p in ps if p.entity} - set(exclude))


def trigger_recovery(peft_model, tokenizer, task: Task, method: str = "ig", sets: Sequence[str] = ("efficacy",
                     "paraphrase"), n_steps: int = 50, baseline: int | str | None = None, by: str = "signed",
                     batch_size: int = 512, references="counterfactual", n_references: int = 16,
                     seed: int = 0, output: str = "prob", changed_only: bool = True) -> Recovery:
    """Share of triggered probes whose top-attributed token of the *difference* is the trigger.

    Each triggered probe's change of ``p(target)`` (adapter on − off; ``output="logprob"`` for ``log p``) is
    attributed to its tokens with :func:`batch_token_attributions`; a hit is the trigger token
    (``task.truth["trigger"]``) ranking first, scored on the probes whose answer the adapter changed.

    What a token is compared with decides the answer. By default (``references="counterfactual"``) each probe is
    compared with ``n_references`` variants of itself in which the trigger is replaced by another word (the task's
    decoy vocabulary: the adjectives and nouns of the world) *and* the person by another person of the task — so the
    trigger competes with the name for the credit (a probe whose words have no alternative of the same number of
    tokens is left out of the score). ``references=None`` compares every token with the blank
    ``baseline`` token instead: then every token the change needs (trigger, relation words, the final "is") gets
    credit, since the backdoor fires only when all are present.

    Args:
        peft_model: A ``peft.PeftModel`` trained on a trigger task.
        tokenizer: Its tokenizer.
        task: The trigger task.
        method: ``"ig"`` or ``"ablation"``.
        sets: Probe sets whose triggered probes are scored.
        n_steps: IG steps.
        baseline: Blank baseline token when ``references=None`` (see :func:`resolve_baseline`).
        by: Rank tokens by ``"signed"`` attribution (largest increase first) or ``"abs"``.
        batch_size: Sequences per forward pass.
        references: ``"counterfactual"``, None, or one list of reference prompts per scored probe.
        n_references: Counterfactual variants per probe.
        seed: Seed of the counterfactual draws.
        output: The explained quantity, ``"prob"`` (``p(target)``, the default: the change that made the target
            *likely*) or ``"logprob"`` (which also counts moves deep in the tail, e.g. a decoy word lifting the
            target from 1e-7 to 1e-3).
        changed_only: Score only probes whose answer the adapter changed (``p_adapted ≥ 0.5 > p_base``; the table
            keeps every probe, with its ``scored`` flag). False scores every probe.

    Returns:
        A :class:`Recovery`.

    Raises:
        ConfigError: The task has no trigger or no triggered probes in ``sets``; bad references.
    """
    trigger = task.truth.get("trigger")
    probes = [p for s in sets for p in task.probes.get(s, []) if p.triggered]
    if not trigger or not probes:
        raise ConfigError(f"task {task.name!r} has no trigger (truth['trigger']) or no triggered probes in "
                          f"{list(sets)}: use a task from make_task(world, 'trigger')")
    people = _entities(task)
    probes, refs = _references(tokenizer, probes, references, n_references, seed,
                               lambda p: {trigger: ADJECTIVES + NOUNS, p.entity: people})
    attrs = batch_token_attributions(peft_model, tokenizer, [p.prompt for p in probes], [p.answer for p in probes],
                                     method=method, n_steps=n_steps, baseline=baseline, batch_size=batch_size,
                                     references=refs, output=output)
    expected = [_word_positions(tokenizer, ta, tokenizer(ta.prompt)["input_ids"], trigger) for ta in attrs]
    return _recovery(attrs, expected, [trigger] * len(attrs), by, changed_only)


def entity_recovery(peft_model, tokenizer, task: Task, method: str = "ig", sets: Sequence[str] = ("efficacy",),
                    n_steps: int = 50, baseline: int | str | None = None, by: str = "signed",
                    batch_size: int = 512, references="counterfactual", n_references: int = 16,
                    seed: int = 0, output: str = "prob", changed_only: bool = True) -> Recovery:
    """Share of fact-edit probes whose edited entity's token ranks first in the difference attribution.

    The explained output is ``p(new answer)`` (``output="logprob"``: its log); for a multi-token entity a hit is any
    of its tokens ranking first; scored on the probes whose answer the adapter changed.
    By default (``references="counterfactual"``) each probe is compared with ``n_references`` copies of itself
    about other people of the task (not edited ones): the question is "does the change belong to this person?" (a
    probe whose name has no other name of the same number of tokens is left out of the score).
    Only the name differs from its references, so a hit means the change is larger for this person than for the
    others (IG: the name's credit is exactly that excess). ``references=None`` compares every token with the blank
    ``baseline`` token: an edit changes the answer only when the name *and* the relation words are present, so the
    relation words share the credit; :func:`reference_prompts` (a background of the task's prompts, every word
    free to differ) sits in between.

    Args:
        peft_model: A ``peft.PeftModel`` trained on a fact-edit task.
        tokenizer: Its tokenizer.
        task: The fact-edit task (its ``efficacy`` probes name the edited entity).
        method: ``"ig"`` or ``"ablation"``.
        sets: Probe sets scored.
        n_steps: IG steps.
        baseline: Blank baseline token when ``references=None``.
        by: ``"signed"`` or ``"abs"``.
        batch_size: Sequences per forward pass.
        references, n_references, seed, output, changed_only: As in :func:`trigger_recovery`.

    Returns:
        A :class:`Recovery`.

    Raises:
        ConfigError: No probes with an entity in ``sets``; bad references.
    """
    probes = [p for s in sets for p in task.probes.get(s, []) if p.entity]
    if not probes:
        raise ConfigError(f"task {task.name!r} has no probes with an entity in {list(sets)}: use a fact-edit task "
                          "(make_task(world, 'fact_edit'))")
    others = _entities(task, exclude={e["entity"] for e in task.truth.get("edits", [])} | {p.entity for p in probes})
    probes, refs = _references(tokenizer, probes, references, n_references, seed, lambda p: {p.entity: others})
    attrs = batch_token_attributions(peft_model, tokenizer, [p.prompt for p in probes], [p.answer for p in probes],
                                     method=method, n_steps=n_steps, baseline=baseline, batch_size=batch_size,
                                     references=refs, output=output)
    expected = [_word_positions(tokenizer, ta, tokenizer(ta.prompt)["input_ids"], p.entity)
                for ta, p in zip(attrs, probes)]
    return _recovery(attrs, expected, [p.entity for p in probes], by, changed_only)


def deletion_curve(peft_model, tokenizer, task: Task, attribution: pd.DataFrame, components: ComponentSet,
                   behaviour: str = "efficacy", k_max: int | None = None, n_random: int = 5, seed: int = 0,
                   max_probes: int | None = None) -> pd.DataFrame:
    """Switch off the top-k attributed components (k = 1 … k_max) vs k random ones; share of the effect removed.

    effect = metric(adapted) − metric(base); removed = 1 − effect_after / effect_before, where effect_after is
    metric(with those k components off) − metric(base). 1 = the whole effect gone, 0 = nothing removed. Top-k are
    the components with the largest attribution to ``behaviour`` (most positive first); the random curve averages
    ``n_random`` draws of k distinct components per k (``numpy`` generator seeded with ``seed``).

    Args:
        peft_model: A ``peft.PeftModel``.
        tokenizer: Its tokenizer.
        task: The task.
        attribution: From :func:`component_attribution` (or :func:`lora_branch_attribution` at module grain) over
            ``components``.
        components: The component set the attribution is indexed by.
        behaviour: The metric whose effect is deleted.
        k_max: Largest k (default ``min(10, n_components)``).
        n_random: Random draws per k.
        seed: Seed of the random draws.
        max_probes: At most this many probes per set.

    Returns:
        DataFrame with one row per k: ``k``, ``topk_removed``, ``random_removed`` (mean), ``random_std``,
        ``topk_metric``, ``random_metric`` (mean), and ``topk`` (the names switched off). ``df.attrs`` holds
        ``behaviour``, ``adapted``, ``base`` and ``effect``.

    Raises:
        ConfigError: An empty component set; an attribution not indexed by the components; a behaviour missing
            from it; a bad ``k_max`` / ``n_random``; an adapter with no effect on ``behaviour``.
    """
    components = _check_components(components)
    _check_peft(peft_model, tokenizer)
    if behaviour not in attribution.columns:
        raise ConfigError(f"behaviour={behaviour!r} is not a column of the attribution; columns are "
                          f"{list(attribution.columns)}")
    missing = [n for n in components.names if n not in attribution.index]
    if missing:
        raise ConfigError(f"the attribution has no row for components {missing[:4]}: attribute the same "
                          "component set you pass here")
    n = len(components)
    k_max = min(10, n) if k_max is None else k_max
    if isinstance(k_max, bool) or not isinstance(k_max, int) or not 1 <= k_max <= n:
        raise ConfigError(f"k_max={k_max!r} must be an integer from 1 to the number of components ({n})")
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 1:
        raise ConfigError(f"n_random={n_random!r} must be a positive integer, e.g. 5")
    ev = _Behaviours(tokenizer, task, [behaviour], max_probes, _device(peft_model))
    scores = attribution.loc[components.names, behaviour].to_numpy(dtype=float)
    order = np.argsort(-scores, kind="stable")
    rng = np.random.default_rng(seed)
    records = []
    with _frozen(peft_model), torch.no_grad():
        with peft_model.disable_adapter():
            base = float(ev(peft_model)[0, 0])
        with ComponentMask(peft_model, components) as mask:
            adapted = float(ev(peft_model)[0, 0])
            effect = adapted - base
            if abs(effect) < 1e-8:
                raise ConfigError(f"the adapter does not change {behaviour!r} (adapted {adapted:.4g} = base "
                                  f"{base:.4g}): there is no effect to delete")

            def metric_without(idx) -> float:
                m = torch.ones(n)
                m[list(idx)] = 0.0
                mask.set(m)
                return float(ev(peft_model)[0, 0])

            for k in range(1, k_max + 1):
                top = metric_without(order[:k])
                rand = [metric_without(rng.choice(n, size=k, replace=False)) for _ in range(n_random)]
                removed = [1.0 - (r - base) / effect for r in rand]
                records.append({"k": k, "topk_removed": 1.0 - (top - base) / effect,
                                "random_removed": float(np.mean(removed)), "random_std": float(np.std(removed)),
                                "topk_metric": top, "random_metric": float(np.mean(rand)),
                                "topk": [components.names[i] for i in order[:k]]})
    df = pd.DataFrame(records)
    df.attrs.update({"behaviour": behaviour, "adapted": adapted, "base": base, "effect": effect})
    return df


def selectivity(attribution: pd.DataFrame, edit: str = "efficacy", damage: str = "specificity") -> pd.DataFrame:
    """Per component: the share of the edit effect it carries vs the share of the specificity damage it carries.

    edit_share = attribution[edit] / (edit metric adapted − base); damage_share = −attribution[damage] /
    (damage metric base − adapted), i.e. the share of the *loss* on the must-not-change probes. With Shapley values
    each column sums to 1 over components. selectivity = edit_share − damage_share: high = carries the edit without
    the damage. A damage share is NaN when the adapter changes the damage metric by less than 1e-6 (no damage).

    Args:
        attribution: From :func:`component_attribution` (its ``attrs`` hold the adapted and base metric values).
        edit: Behaviour column of the edit (``"efficacy"`` or ``"trigger"``).
        damage: Behaviour column of the damage (``"specificity"``; higher = better, so a loss is damage).

    Returns:
        DataFrame, index = components: ``edit``, ``damage`` (raw attributions), ``edit_share``, ``damage_share``,
        ``selectivity``; sorted by ``selectivity``, largest first.

    Raises:
        ConfigError: A column is missing, or the attribution lacks its ``adapted``/``base`` values.
    """
    for col in (edit, damage):
        if col not in attribution.columns:
            raise ConfigError(f"{col!r} is not a column of the attribution ({list(attribution.columns)}): attribute "
                              "both behaviours, e.g. component_attribution(..., behaviours=['efficacy', "
                              "'specificity'])")
    adapted, base = attribution.attrs.get("adapted"), attribution.attrs.get("base")
    if not adapted or not base:
        raise ConfigError("the attribution has no attrs['adapted'] / attrs['base']: pass the DataFrame returned by "
                          "component_attribution(...) unchanged")
    edit_total = adapted[edit] - base[edit]
    damage_total = base[damage] - adapted[damage]
    out = pd.DataFrame({"edit": attribution[edit], "damage": attribution[damage]})
    out["edit_share"] = out["edit"] / edit_total if abs(edit_total) > 1e-6 else float("nan")
    out["damage_share"] = -out["damage"] / damage_total if abs(damage_total) > 1e-6 else float("nan")
    out["selectivity"] = out["edit_share"] - out["damage_share"].fillna(0.0)
    return out.sort_values("selectivity", ascending=False)
