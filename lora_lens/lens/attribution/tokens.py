"""Input attribution of the change: which prompt tokens drive what a LoRA adapter changed (captum).

The scored output is ``log p(answer | prompt)`` (or ``p(answer)``) of the WHOLE answer — its ids read in context
by :func:`lora_lens.lab.answers.answer_ids` (``f"{prompt} {answer}"`` after the prompt's ids), any number of tokens,
log p summed over them as captum's ``LLMAttribution`` does with a tensor target; :func:`token_attributions`
attributes it to each input token in the base model, in the adapted model and their difference, with captum per
prompt; :func:`batch_token_attributions` computes the same numbers for many prompts at once (all IG steps, or all
single-token ablations, stacked into right-padded batches); :func:`captum_agreement` checks the two agree. A token
is compared with a blank baseline token (:func:`resolve_baseline`) or with reference prompts
(:mod:`lora_lens.lens.attribution.references`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch
from captum.attr import (FeatureAblation, LayerIntegratedGradients, LLMAttribution, LLMGradientAttribution,
                         TextTokenInput)
from captum.attr._utils.approximation_methods import approximation_parameters

from lora_lens.errors import ConfigError, MismatchError
from lora_lens.lab.answers import AnswerIds, answer_ids, score_ids, token_texts
from lora_lens.lab.batching import padded_chunks
from lora_lens.lab.decoding import cache_argument, returned_cache
from lora_lens.lab.pair import adapter_states, check_peft, frozen, logits_where, model_device, pad_ids, pad_token_id

__all__ = ["IG_METHODS", "METHODS", "OUTPUTS", "TokenAttribution", "attributions_frame", "batch_token_attributions",
           "captum_agreement", "resolve_baseline", "target_logprobs", "token_attributions"]

DTYPE = torch.float32
"""The dtype of returned attributions and log-probs (computed in the model's dtype, float64 for a float64 model)."""
OUTPUTS = ("logprob", "prob")
"""What input attribution explains: ``log p(target)`` or ``p(target)`` (see :func:`token_attributions`)."""
METHODS = ("ig", "ablation")
"""Input-attribution methods: integrated gradients on the input embeddings, or single-token feature ablation."""
IG_METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")
"""Captum's integral approximations for IG."""
_NAMED_BASELINES = {"unk": "unk_token_id", "pad": "pad_token_id", "eos": "eos_token_id", "bos": "bos_token_id"}


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


def _target_ids(tokenizer, prompt: str, target: str, chat: bool) -> tuple[int, ...]:
    """The target's ids in context (:func:`lora_lens.lab.answers.answer_ids`): never the target tokenized alone,
    so a continuation piece is never resolved to another id."""
    if not isinstance(target, str) or not target.strip():
        raise ConfigError(f"target={target!r} after prompt {prompt!r} must be a non-empty string (the answer whose "
                          "log p is explained)")
    return answer_ids(tokenizer, prompt, target, chat).answer


@dataclass
class _Row:
    prompt: str
    target: str
    ids: list[int]          # encoded prompt, special tokens included
    positions: list[int]    # attributed positions (special tokens excluded)
    target_ids: tuple[int, ...]  # the answer's ids in context (any length)
    baseline_id: int | None  # the blank token, or None when the row is compared with reference prompts
    refs: list[list[int]]     # what each token is replaced by: one blank sequence, or the encoded references
    references: list[str] | None = None
    output: str = "logprob"   # the explained quantity: log p(target) or p(target)


def _skip_ids(tokenizer) -> list[int]:
    return sorted({int(i) for i in tokenizer.all_special_ids})


def _work_dtype(model) -> torch.dtype:
    """The dtype the IG path and log-softmax run in: the model's input-embedding dtype, at least float32 (a
    float64 model gives float64 attributions: see :func:`captum_agreement`)."""
    return torch.promote_types(model.get_input_embeddings().weight.dtype, torch.float32)


def _prepare(tokenizer, prompts, targets, method: str, n_steps: int, baseline,
             ig_method: str = "gausslegendre", references=None, output: str = "logprob",
             chat: bool = False) -> list[_Row]:
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
        tid = _target_ids(tokenizer, prompt, target, chat)
        ids = list(answer_ids(tokenizer, prompt, target, chat).prompt)
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
    """Attribution of ``log p(target | prompt)`` (the whole answer) to the prompt's tokens, base vs adapted.

    Attributes:
        prompt: The prompt.
        target: The explained answer (any number of tokens).
        method: ``"ig"`` or ``"ablation"``.
        tokens: The attributed tokens as text (special tokens such as ``<s>`` are not attributed).
        positions: Their positions in the encoded prompt (``<s>`` is position 0 for world tokenizers).
        base: Attribution per token in the base model (adapter off), float32 ``[n_tokens]``.
        adapted: Attribution per token in the adapted model.
        logp_base: ``log p(target | prompt)`` of the base model (summed over the answer's tokens).
        logp_adapted: The same for the adapted model.
        baseline_id: The blank baseline token id used (None when compared with reference prompts).
        references: The reference prompts the attribution is averaged over (None for a blank baseline token).
        output: The explained quantity: ``"logprob"`` (``log p(target)``) or ``"prob"`` (``p(target)``).
        target_ids: The answer's ids in context (the whole answer is explained).
        target_tokens: Those ids as text (byte-level markers decoded: ``[' Qu', 'ell', 'burg']``).
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
    target_ids: list[int] | None = None
    target_tokens: list[str] | None = None

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
                            float(logp["adapted"]), row.baseline_id, row.references, row.output,
                            list(row.target_ids), token_texts(tokenizer, row.target_ids))


def target_logprobs(model, tokenizer, seqs: list[list[int]], targets: list, batch_size: int) -> torch.Tensor:
    """``log p(target_i | seq_i)`` of every target — one id or a sequence of ids, log p summed over its tokens —
    scored by :func:`lora_lens.lab.answers.score_ids` (float32, CPU).

    Args:
        model: A causal LM (a PeftModel is scored in its current state).
        tokenizer: Its tokenizer (for the pad id).
        seqs: Token id lists (special tokens included).
        targets: One target per sequence: a token id, or the answer's ids in context.
        batch_size: Sequences per forward pass.
    """
    items = [AnswerIds(tuple(int(i) for i in s), (int(t),) if isinstance(t, int) else tuple(int(i) for i in t), (),
                       "") for s, t in zip(seqs, targets)]
    return torch.tensor(score_ids(model, tokenizer, items, batch_size=batch_size).total, dtype=DTYPE)


# ---------------------------------------------------------------------------------------------------------------
# input attribution: captum, one prompt at a time
# ---------------------------------------------------------------------------------------------------------------


def _captum_one(model, tokenizer, row: _Row, method: str, n_steps: int, ig_method: str) -> torch.Tensor:
    if row.references is not None or row.output == "prob":
        return _captum_baselines(model, row, method, n_steps, ig_method)
    # the answer's in-context ids as a tensor: captum tokenizes a string target alone (drops its leading space)
    target = torch.tensor(list(row.target_ids))
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
            # one forward of prompt+target per perturbation: captum's cached token-by-token path gives wrong log p
            # after the first target token (transformers 5), so forward_in_tokens=False is the reference
            res = LLMAttribution(FeatureAblation(model), tokenizer).attribute(inp, target=target,
                                                                             forward_in_tokens=False)
    return res.seq_attr.detach().to(DTYPE).cpu()


def _captum_baselines(model, row: _Row, method: str, n_steps: int, ig_method: str) -> torch.Tensor:
    """Captum's ``LayerIntegratedGradients`` / ``FeatureAblation`` with each reference prompt (or the blank
    sequence) as the baseline sequence, averaged over them — for what captum's LLM wrappers do not take: baseline
    sequences, and ``p(answer)`` as the explained output. The answer's ids are appended inside the forward (the
    same in input and baseline, so they get no attribution)."""
    n, answer = len(row.ids), list(row.target_ids)

    def log_prob(input_ids):
        tail = torch.tensor([answer[:-1]] * input_ids.shape[0], dtype=input_ids.dtype, device=input_ids.device)
        logits = model(input_ids=torch.cat([input_ids, tail], 1)).logits[:, n - 1:]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        tgt = torch.tensor(answer, device=logits.device)
        out = torch.log_softmax(logits, -1).gather(-1, tgt[None, :, None].expand(len(logits), -1, 1))[..., 0]
        out = out[:, 0] if len(answer) == 1 else out.sum(1)
        return out.exp() if row.output == "prob" else out

    dev = model_device(model)
    ids = torch.tensor([row.ids], device=dev)
    total = torch.zeros(len(row.ids), dtype=DTYPE)
    for ref in row.refs:
        ref_ids = torch.tensor([ref], device=dev)
        if method == "ig":
            lig = LayerIntegratedGradients(log_prob, model.get_input_embeddings())
            attr = lig.attribute(ids, baselines=ref_ids, n_steps=n_steps, method=ig_method).sum(-1)
        else:
            attr = FeatureAblation(log_prob).attribute(ids, baselines=ref_ids)
        total += attr[0, :n].detach().to(DTYPE).cpu()
    return (total / len(row.refs))[row.positions]


def token_attributions(peft_model, tokenizer, prompt: str, target: str, method: str = "ig", n_steps: int = 50,
                       baseline: int | str | None = None, ig_method: str = "gausslegendre",
                       references: Sequence[str] | None = None, output: str = "logprob",
                       chat: bool = False) -> TokenAttribution:
    """Base, adapted and difference attribution of ``log p(target | prompt)`` to the prompt's tokens (captum).

    The target is an answer of any length: its ids are read in context (:func:`lora_lens.lab.answers.answer_ids`,
    ``f"{prompt} {target}"`` after the prompt's ids) and passed to captum as an id tensor, so the explained output is
    log p of the whole answer (the sum over its tokens; ``output="prob"``: p of the whole answer), as captum's
    ``LLMAttribution`` computes it with a multi-token target.

    ``method="ig"``: captum ``LLMGradientAttribution(LayerIntegratedGradients(model, input embeddings))`` — each
    token's embedding is integrated from the baseline token's embedding to its own (``n_steps`` points of
    ``ig_method``), the ``<s>`` embedding is kept. ``method="ablation"``: ``LLMAttribution(FeatureAblation(model))``
    (``forward_in_tokens=False``) — ``log p`` with the prompt minus ``log p`` with that one token replaced by the
    baseline token. Both are run with the adapter on and, inside ``peft_model.disable_adapter()``, off; the
    difference is their subtraction (both methods are linear in the explained output).

    Args:
        peft_model: A ``peft.PeftModel`` (adapter not merged).
        tokenizer: Its tokenizer.
        prompt: Text the model continues.
        target: The answer whose log-probability is explained (any number of tokens, e.g. ``"Quellburg"``).
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
        chat: Render the prompt with the tokenizer's chat template (a task's ``chat``).

    Returns:
        A :class:`TokenAttribution`.

    Raises:
        ConfigError: Not a PeftModel; an empty prompt or target; a baseline token that equals an input token; a
            bad method or ``n_steps``.
        MismatchError: The prompt tokenizes differently once the target follows it (both tokenizations shown).
    """
    check_peft(peft_model, tokenizer)
    (row,) = _prepare(tokenizer, [prompt], [target], method, n_steps, baseline, ig_method,
                      None if references is None else [references], output, chat)
    attr, logp = {}, {}
    with frozen(peft_model):
        for name, ctx in adapter_states(peft_model):
            with ctx:
                attr[name] = _captum_one(peft_model, tokenizer, row, method, n_steps, ig_method)
                logp[name] = target_logprobs(peft_model, tokenizer, [row.ids], [row.target_ids], 1)[0]
    return _result(tokenizer, row, method, attr, logp)


# ---------------------------------------------------------------------------------------------------------------
# input attribution: batched
# ---------------------------------------------------------------------------------------------------------------


IG_TOKENS = 2048
"""Tokens per IG forward/backward (every step of every path counts its padded width): bounds the activations
kept for the backward pass (SmolLM2-135M: ~0.4 MB a token) while keeping the matrix products large."""


def _read_logprobs(model, rows: list[int], pos: list[int], tok: list[int], work: torch.dtype, keep_cache: bool = False,
                   past=None, **inputs) -> tuple[torch.Tensor, object]:
    """``log p(tok[i])`` read at position ``pos[i]`` of batch row ``rows[i]`` — the output layer is applied only at
    those positions — and the model's KV cache (with ``keep_cache=True``; every position kept, no sliding window).

    ``inputs`` go to the model (``input_ids`` or ``inputs_embeds``, ``attention_mask``); ``past`` is a KV cache of
    the positions before them, passed under the model's own cache argument name."""
    from transformers import DynamicCache

    if keep_cache:
        past = DynamicCache()     # plain layers: a sliding-window layer would drop keys
    if past is not None:
        inputs[cache_argument(model)] = past
    inputs["use_cache"] = past is not None
    logits, out = logits_where(model, rows, pos, **inputs)
    t = torch.tensor(tok, device=logits.device)
    lp = torch.log_softmax(logits.to(work), -1).gather(-1, t[:, None])[:, 0]
    return lp, (returned_cache(out) if keep_cache else None)


def _sum_per_row(lp: torch.Tensor, rows: list[int], n: int) -> torch.Tensor:
    """The answer's log p per batch row: the sum of its tokens' log p's."""
    return torch.zeros(n, dtype=lp.dtype, device=lp.device).index_add(0, torch.tensor(rows, device=lp.device), lp)


def _reads(n_prompt: int, answer: Sequence[int], offset: int = 0) -> tuple[list[int], list[int]]:
    """Positions reading the answer's tokens after a prompt of ``n_prompt`` ids (shifted by ``-offset``) and the
    tokens read there."""
    return [n_prompt - 1 + t - offset for t in range(len(answer))], list(answer)


def _cache_rows(cache, index: torch.Tensor, length: int):
    """A new KV cache of the batch rows ``index`` of ``cache``, cut to the first ``length`` positions."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(layer.keys[index, :, :length], layer.values[index, :, :length])
                                        for layer in cache.layers])


PAD_FILL = 0.9
"""An IG batch of sequences sorted by length grows only while at least this share of its padded tokens is real
(SmolLM2-135M, 8 prompts of 6–10 tokens: 12 % fewer FLOPs, 16 % less CPU time; ablation batches, one per ablated
position, are not split by it: smaller batches cost it more than the padding)."""


def _batched_ablation(model, tokenizer, rows: list[_Row], batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """For every row and reference: the explained output (``log p`` or ``p`` of the whole answer) intact minus with
    one token replaced by the reference's token there (positions where they agree need no forward pass and add 0),
    averaged over the references.

    An ablated token changes nothing before it, so the intact prompts run once (KV cache kept) and an ablation at
    position ``j`` runs only from ``j`` on, on the intact cache of positions ``< j``; ablations of one position
    (of every prompt and reference) share a batch. The output layer runs only where an answer token is read."""
    work, dev, pad = _work_dtype(model), model_device(model), pad_token_id(tokenizer)
    prob = rows[0].output == "prob"
    attrs = [torch.zeros(len(row.positions), dtype=DTYPE) for row in rows]
    lp0 = torch.zeros(len(rows), dtype=DTYPE)
    seqs = [row.ids + list(row.target_ids[:-1]) for row in rows]
    # blocks of prompts (sorted by length) whose intact KV cache is kept while their ablations run
    order = sorted(range(len(rows)), key=lambda i: len(seqs[i]))
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            block = order[s:s + batch_size]
            ids, mask, _ = pad_ids([seqs[i] for i in block], pad, dev)
            rr, pp, tt = [], [], []
            for b, i in enumerate(block):
                p, t = _reads(len(rows[i].ids), rows[i].target_ids)
                rr, pp, tt = rr + [b] * len(p), pp + p, tt + t
            lp, cache = _read_logprobs(model, rr, pp, tt, work, keep_cache=True, input_ids=ids, attention_mask=mask)
            intact = _sum_per_row(lp, rr, len(block))
            f0 = intact.exp() if prob else intact
            lp0[block] = intact.to(DTYPE).cpu()
            # (block row, row, attributed index, position, replacement token) of every ablation, by position
            jobs = [(b, i, k, j, ref[j]) for b, i in enumerate(block) for ref in rows[i].refs
                    for k, j in enumerate(rows[i].positions) if ref[j] != rows[i].ids[j]]
            jobs.sort(key=lambda x: (x[3], len(seqs[x[1]])))
            for a, e in padded_chunks([len(seqs[x[1]]) - x[3] for x in jobs], batch_size, key=[x[3] for x in jobs]):
                chunk, j = jobs[a:e], jobs[a][3]
                suffix = [[x[4]] + seqs[x[1]][j + 1:] for x in chunk]
                sids, smask, _ = pad_ids(suffix, pad, dev)
                rr, pp, tt = [], [], []
                for c, x in enumerate(chunk):
                    p, t = _reads(len(rows[x[1]].ids), rows[x[1]].target_ids, offset=j)
                    rr, pp, tt = rr + [c] * len(p), pp + p, tt + t
                past = None
                if j:   # the intact prompts' keys and values before j (a mask over them and the suffix)
                    past = _cache_rows(cache, torch.tensor([x[0] for x in chunk], device=dev), j)
                    smask = torch.cat([torch.ones(len(chunk), j, dtype=smask.dtype, device=dev), smask], 1)
                lp, _ = _read_logprobs(model, rr, pp, tt, work, past=past, input_ids=sids, attention_mask=smask)
                f = _sum_per_row(lp, rr, len(chunk))
                f = f.exp() if prob else f
                delta = (f0[[x[0] for x in chunk]] - f).to(DTYPE).cpu()
                for c, (_, i, k, _, _) in enumerate(chunk):
                    attrs[i][k] += delta[c] / len(rows[i].refs)
    return attrs, lp0


def _batched_ig(model, tokenizer, rows: list[_Row], n_steps: int, ig_method: str,
                batch_size: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """IG from every reference (or the blank baseline) of every row; all (row, reference, step) points stacked.

    Each path runs on the prompt followed by the answer's ids but its last (the same in input and baseline, so they
    are constant along the path); the explained output is the sum of log p (or p of the sum) over the answer — one
    IG for the whole answer, where captum runs one per answer token (IG is linear in the explained output, and every
    per-token run of captum integrates along the same path). The output layer runs only where an answer token is
    read; a forward holds at most ``batch_size`` sequences and :data:`IG_TOKENS` tokens."""
    step_sizes_func, alphas_func = approximation_parameters(ig_method)
    work = _work_dtype(model)
    weights = torch.tensor(step_sizes_func(n_steps), dtype=work)
    alphas = alphas_func(n_steps)
    dev, pad = model_device(model), pad_token_id(tokenizer)
    emb = model.get_input_embeddings()
    owner = [r for r, row in enumerate(rows) for _ in row.refs]       # one path per (row, reference)
    tails = [list(rows[r].target_ids[:-1]) for r in owner]
    ids, _, last = pad_ids([rows[r].ids + t for r, t in zip(owner, tails)], pad, dev)
    base_ids, _, _ = pad_ids([ref + list(row.target_ids[:-1]) for row in rows for ref in row.refs], pad, dev)
    with torch.no_grad():
        E, Eb = emb(ids).to(work), emb(base_ids).to(work)
    D = E - Eb                                   # zero at <s>, at pads, the answer and wherever a token is kept
    total = torch.zeros_like(E)
    by_length = sorted(range(len(owner)), key=lambda i: int(last[i]))
    pairs = [(i, k) for i in by_length for k in range(n_steps)]
    for a, e in padded_chunks([int(last[i]) + 1 for i, _ in pairs], batch_size, IG_TOKENS, fill=PAD_FILL):
        chunk = pairs[a:e]
        pi = torch.tensor([i for i, _ in chunk], device=dev)
        ki = torch.tensor([k for _, k in chunk])
        width = int(last[pi].max()) + 1
        a = torch.tensor([alphas[k] for _, k in chunk], dtype=work, device=dev)[:, None, None]
        x = (Eb[pi, :width] + a * D[pi, :width]).detach().requires_grad_(True)
        rr, pp, tt = [], [], []                   # (row in chunk, position, answer token) of every log p read
        for c, (i, _) in enumerate(chunk):
            p, t = _reads(len(rows[owner[i]].ids), rows[owner[i]].target_ids)
            rr, pp, tt = rr + [c] * len(p), pp + p, tt + t
        with torch.enable_grad():
            lp, _ = _read_logprobs(model, rr, pp, tt, work, inputs_embeds=x.to(emb.weight.dtype))
            lp = _sum_per_row(lp, rr, len(chunk))
            (grad,) = torch.autograd.grad((lp.exp() if rows[0].output == "prob" else lp).sum(), x)
        total[:, :width].index_add_(0, pi, grad * weights[ki].to(dev)[:, None, None])
    per_path = (total * D).sum(-1).to(DTYPE).cpu()
    attrs = [torch.zeros(len(row.positions), dtype=DTYPE) for row in rows]
    for i, r in enumerate(owner):
        attrs[r] += per_path[i, rows[r].positions] / len(rows[r].refs)
    lp0 = target_logprobs(model, tokenizer, [r.ids for r in rows], [r.target_ids for r in rows], batch_size)
    return attrs, lp0


def batch_token_attributions(peft_model, tokenizer, prompts: Sequence[str], targets: str | Sequence[str],
                             method: str = "ig", n_steps: int = 50, baseline: int | str | None = None,
                             ig_method: str = "gausslegendre", batch_size: int = 512,
                             references: Sequence[Sequence[str]] | None = None,
                             output: str = "logprob", chat: bool = False) -> list[TokenAttribution]:
    """:func:`token_attributions` for many prompts at once, reproducing captum's per-prompt numbers.

    IG: the interpolated input embeddings of every (prompt, step) pair are stacked into right-padded batches of
    ``batch_size`` sequences (prompts of similar length together; the log-prob is read at each row's last real
    token) and one backward pass per batch gives all gradients; step points and weights are captum's. Ablation: the
    intact prompt and every single-token ablation of every prompt are stacked into batches. Right padding keeps every
    real token at its own position, and under the causal mask no real token attends to a pad, so the numbers equal
    captum's up to rounding: ~1e-5 on the zoo; for IG on a real model in float32 up to ~1e-2, as far as captum's
    own float32 result is from its float64 one (a float64 model gives float64 IG; see :func:`captum_agreement`).

    Speed: both compute less than captum — the output layer only where an answer token is read, one IG over the
    whole answer (captum runs one per answer token), each ablation only from the ablated token on, on the intact
    prompt's KV cache — and in larger batches (captum runs one sequence per ablation). SmolLM2-135M on one CPU
    thread: IG 1.6× captum on single-token answers, 4× on 3–4-token answers, ablation 4–5×; on a GPU, where small
    per-prompt batches leave the device idle, the gain is much larger. See ``benchmarks/bench_attribution.py``.

    Args:
        peft_model: A ``peft.PeftModel`` (adapter not merged).
        tokenizer: Its tokenizer.
        prompts: Prompts.
        targets: One answer per prompt (any number of tokens, read in context), or one string for all.
        method: ``"ig"`` or ``"ablation"``.
        n_steps: IG integration points.
        baseline: Baseline token (see :func:`resolve_baseline`).
        ig_method: Captum's IG approximation method.
        batch_size: Sequences per forward pass.
        references: One list of counterfactual prompts per prompt (see :func:`token_attributions` and
            :func:`reference_prompts`); None for the blank ``baseline`` token.
        output: ``"logprob"`` or ``"prob"`` (see :func:`token_attributions`).
        chat: Render prompts with the chat template (see :func:`token_attributions`).

    Returns:
        One :class:`TokenAttribution` per prompt, in order.

    Raises:
        ConfigError, MismatchError: As :func:`token_attributions`, for the first bad prompt or target; a bad
            ``batch_size``.
    """
    check_peft(peft_model, tokenizer)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer, e.g. 512")
    rows = _prepare(tokenizer, prompts, targets, method, n_steps, baseline, ig_method, references, output, chat)
    attr, logp = {}, {}
    with frozen(peft_model):
        for name, ctx in adapter_states(peft_model):
            with ctx:
                if method == "ig":
                    attr[name], logp[name] = _batched_ig(peft_model, tokenizer, rows, n_steps, ig_method, batch_size)
                else:
                    attr[name], logp[name] = _batched_ablation(peft_model, tokenizer, rows, batch_size)
    return [_result(tokenizer, row, method, {k: attr[k][i] for k in attr}, {k: logp[k][i] for k in logp})
            for i, row in enumerate(rows)]


@contextmanager
def _cast(model, dtype: torch.dtype) -> Iterator[None]:
    """The model's floating-point parameters and buffers in ``dtype`` for the block, each restored to its own
    dtype afterwards (float32 → float64 → float32 is exact, so the model comes back bit for bit)."""
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    saved = [(t, t.dtype) for t in tensors]
    try:
        for t in tensors:
            t.data = t.data.to(dtype)
        yield
    finally:
        for t, old in saved:
            t.data = t.data.to(old)


def captum_agreement(peft_model, tokenizer, prompts: Sequence[str], targets: str | Sequence[str],
                     method: str = "ig", n_steps: int = 50, baseline: int | str | None = None,
                     references: Sequence[Sequence[str]] | None = None, output: str = "logprob",
                     dtype: torch.dtype | None = None) -> float:
    """Largest absolute difference between :func:`batch_token_attributions` and captum per prompt.

    Runs both on the same prompts (base and adapted attributions of every token) — the check behind the claim that
    the batched path reproduces captum. Keep ``prompts`` short: captum runs one prompt at a time.

    In float32, integrated gradients on a real model is only defined up to float32 rounding of its integrand, and
    that integrand can spike along the path (SmolLM2-135M, a made-up four-token answer: ~1e3 at one Gauss-Legendre
    point, rounded there to ~6e-4 relative), so two float32 evaluations that only group the same sums differently —
    the batched path, or captum against its own float64 result — differ by 1e-3 … 4e-2. ``dtype=torch.float64`` runs
    both sides in float64 (the model is cast for the call and restored exactly afterwards): then they agree to ~1e-6,
    which checks the implementation rather than the rounding. Ablation agrees to ~1e-5 in float32.

    Args:
        dtype: None (the model's own dtype) or a floating dtype to run both sides in, e.g. ``torch.float64``.

    Returns:
        ``max |batched − captum|`` over prompts, tokens and both adapter states.

    Raises:
        ConfigError: ``dtype`` is not a floating torch dtype (and as :func:`token_attributions`).
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ConfigError(f"dtype={dtype!r} must be None (the model's dtype) or a floating torch dtype such as "
                          "torch.float64")
    if dtype is not None:
        with _cast(peft_model, dtype):
            return captum_agreement(peft_model, tokenizer, prompts, targets, method=method, n_steps=n_steps,
                                    baseline=baseline, references=references, output=output)
    batched = batch_token_attributions(peft_model, tokenizer, prompts, targets, method=method, n_steps=n_steps,
                                       baseline=baseline, references=references, output=output)
    worst = 0.0
    for b in batched:
        c = token_attributions(peft_model, tokenizer, b.prompt, b.target, method=method, n_steps=n_steps,
                               baseline=baseline, references=b.references, output=output)
        worst = max(worst, float((c.base - b.base).abs().max()), float((c.adapted - b.adapted).abs().max()))
    return worst


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

