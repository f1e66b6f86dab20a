"""Change → data for any model: batched generation alongside the base, and the contrastive corpus it yields.

:func:`generate` continues a batch of prompts with a KV cache (left padding, one forward pass over the batch per new
token); with a base alongside it records the per-token KL(adapted‖base) and can sample from the amplified logits
``la + α·(la − lb)``. :func:`contrastive_corpus` keeps the continuations where that KL is high, i.e. where the
adapter, not the base, wrote them; :func:`world_prompts` are the prompts it starts from on a zoo world,
:func:`task_prompts` on a task from data (its example prompts: the held-out probes stay unseen). The corpus
feeds :func:`lora_lens.studies.distill.distill` like the semantic one (``distill`` re-exports these names).

Where a continuation ends (``stop``): the zoo's world tokenizer stops at a one-token word (``"."``, as always);
any other tokenizer (byte-level BPE, SentencePiece) stops where a given text appears (``"."``, ``"\\n"``) or, with
``stop="answer"``, where the answer ends by the rule of :mod:`lora_lens.lab.answers` (:func:`~lora_lens.lab.answers.
cut_answer`: a special token, a newline, or clause punctuation followed by more text — "St. Louis" stays whole).
:func:`text_line` writes ``prompt`` + ``answer`` as a line that ends the way the model's own plain text does
(``"."``; never the tokenizer's eos, which for a chat model is its turn delimiter).

Example:
    >>> g = generate(fit.model, fit.tokenizer, ["Kutar lives in"], base="adapter")   # doctest: +SKIP
    >>> g.table()[["continuation", "kl_max"]]                                       # doctest: +SKIP
    >>> generate(model, tok, ["The capital of France is"], 16, stop="answer").texts  # doctest: +SKIP
    ['Paris']
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import pandas as pd
import torch

from lora_lens.checks import check_positive
from lora_lens.errors import ConfigError
from lora_lens.lab.answers import (SENTENCE_END, cut_answer, end_of_answer, is_world_tokenizer, render_prompt,
                                    stop_token_ids)
from lora_lens.lab.decoding import cache_argument, returned_cache
from lora_lens.lab.pair import check_base, inference, keeps_logits, model_device
from lora_lens.lab.tokenizer import max_length, token_id
from lora_lens.lab.world import Task, World
from lora_lens.lens.diff import query_space

__all__ = ["ANSWER", "Generation", "contrastive_corpus", "generate", "task_prompts", "text_line", "world_prompts"]

ANSWER = "answer"
"""``stop=ANSWER``: a continuation ends where its answer ends (:func:`lora_lens.lab.answers.cut_answer`)."""


@dataclass(eq=False)
class Generation:
    """Continuations of a batch of prompts.

    Attributes:
        prompts: The prompts, in order.
        tokens: Generated token ids per prompt (up to and including the token that stopped it).
        texts: The continuations as text (special tokens skipped); with ``stop="answer"`` the answer itself
            (:func:`lora_lens.lab.answers.cut_answer`), with a text stop the text up to and including it.
        kl: Per generated token KL(adapted‖base) of the next-token distributions (empty lists without a base).
        seconds: Wall time.
        stopped: Whether each continuation ended by its stop rule (or an end-of-sequence token) before
            ``max_new_tokens``; False where the length limit cut it (an answer cut mid-name).
    """

    prompts: list[str]
    tokens: list[list[int]]
    texts: list[str]
    kl: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0
    stopped: list[bool] = field(default_factory=list)

    def table(self) -> pd.DataFrame:
        """One row per prompt: ``prompt``, ``continuation``, ``n_tokens``, ``kl_max``, ``kl_mean``, ``stopped``."""
        kls = self.kl or [[] for _ in self.prompts]
        return pd.DataFrame({"prompt": self.prompts, "continuation": self.texts,
                             "n_tokens": [len(t) for t in self.tokens],
                             "kl_max": [max(k) if k else math.nan for k in kls],
                             "kl_mean": [sum(k) / len(k) if k else math.nan for k in kls],
                             "stopped": self.stopped or [False] * len(self.prompts)})


class _Stop:
    """Where a continuation ends, for one tokenizer and one ``stop`` argument (see :func:`generate`)."""

    def __init__(self, tokenizer, stop: str | None, chat: bool):
        if stop is not None and (not isinstance(stop, str) or not stop):
            raise ConfigError(f"stop={stop!r} must be None, {ANSWER!r} or a non-empty text such as '.' or '\\n'")
        self.tokenizer, self.stop, self.chat = tokenizer, stop, chat
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        self.world = is_world_tokenizer(tokenizer) and stop != ANSWER
        if self.world:  # the zoo, exactly as always: the eos or a one-token word
            self.ids = eos | ({token_id(tokenizer, stop)} if stop is not None else set())
        else:           # any special token (eos, the chat end of turn, padding) ends a continuation
            self.ids = stop_token_ids(tokenizer, chat)
            if chat:
                self.ids |= set(end_of_answer(tokenizer, chat=True).ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def ended(self, ids: list[int]) -> bool:
        """Whether the continuation ``ids`` (its newest token last) has ended."""
        if ids[-1] in self.ids:
            return True
        if self.world or self.stop is None:
            return False
        text = self._decode(ids)
        if self.stop != ANSWER:
            return self.stop in text
        if "\n" in text:
            return True
        # an end (". " , ", " …) is sure once one more character follows it: "3." may still become "3.14"
        return len(text.strip()) > len(cut_answer(self.tokenizer, ids, self.chat)) + 1

    def text(self, ids: list[int]) -> str:
        """The continuation as text (see :attr:`Generation.texts`)."""
        if self.world or self.stop is None:
            return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        if self.stop == ANSWER:
            return cut_answer(self.tokenizer, ids, self.chat)
        text = self._decode(ids)
        return (text[:text.index(self.stop) + len(self.stop)] if self.stop in text else text).strip()


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 4, batch_size: int = 64, base=None,
             alpha: float = 0.0, temperature: float = 0.0, stop: str | None = ".", seed: int = 0,
             chat: bool = False) -> Generation:
    """Batched generation with a KV cache: left padding, one forward pass over the whole batch per new token.

    Position ids follow the attention mask (``cumsum − 1``), so a left-padded prompt sees the same positions as
    alone: greedy continuations equal ``model.generate`` prompt by prompt (up to float rounding). With a ``base``
    each step also runs the base on its own cache, records KL(adapted‖base) of the next-token distributions, and
    samples from ``la + alpha·(la − lb)`` (logit-difference amplification; ``alpha=0`` is the adapted model).

    Args:
        model: A causal LM (or a ``PeftModel``).
        tokenizer: Its tokenizer (with a pad token).
        prompts: Prompts (non-empty strings).
        max_new_tokens: New tokens at most per prompt, ≥ 1.
        batch_size: Prompts per batch.
        base: ``None``, ``"adapter"`` (the ``PeftModel`` with its adapter switched off) or a separate base model
            sharing the tokenizer.
        alpha: Amplification of the logit difference, ≥ 0 (needs a base when > 0).
        temperature: 0 for greedy, else sampling temperature.
        stop: What ends a continuation besides end-of-sequence. ``"answer"`` (:data:`ANSWER`): the end of the
            answer, by the rule of :func:`lora_lens.lab.answers.cut_answer` (any tokenizer; the texts are the
            answers). Another text: with the zoo's world tokenizer a one-token word (``"."``); with any other
            tokenizer the continuation ends once its text contains ``stop`` (``"."``, ``"\\n"``). None: only
            special tokens end it.
        seed: Sampling seed.
        chat: Render each prompt with the tokenizer's chat template (the user turn, then the generation prompt).

    Returns:
        A :class:`Generation`.

    Raises:
        ConfigError: ``max_new_tokens`` ≤ 0, empty prompts, prompts too long for the model's positions, a bad
            base/alpha/temperature/stop, a ``stop`` word that is not one token of a world tokenizer, or ``chat``
            without a chat template.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r}: the generation length must be a positive integer, "
                          "e.g. 4")
    check_positive("batch_size", batch_size)
    if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ConfigError("prompts must be a non-empty list of non-empty strings, e.g. the world's queries")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ConfigError(f"alpha={alpha!r} must be a number ≥ 0 (0 = no amplification)")
    if alpha and base is None:
        raise ConfigError(f"alpha={alpha} amplifies the adapted − base logits, so it needs a base: pass "
                          "base='adapter' (a PeftModel) or base=<base model>")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ConfigError(f"temperature={temperature!r} must be ≥ 0 (0 = greedy)")
    if tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token: set tokenizer.pad_token = tokenizer.eos_token")
    check_base(model, tokenizer, base)
    rule = _Stop(tokenizer, stop, bool(chat))
    texts_in = [render_prompt(tokenizer, p, True) for p in prompts] if chat else prompts
    special = {} if not chat else {"add_special_tokens": False}  # a rendered template carries its own
    limit = max_length(model, tokenizer)
    longest = max(len(x) for x in tokenizer(texts_in, **special)["input_ids"])
    if limit is not None and longest + max_new_tokens > limit:
        raise ConfigError(f"max_new_tokens={max_new_tokens} with prompts of up to {longest} tokens exceeds the "
                          f"model's {limit} positions: use max_new_tokens ≤ {limit - longest} or shorter prompts")
    device = model_device(model)
    other = base if isinstance(base, torch.nn.Module) else None
    gen = torch.Generator().manual_seed(seed)
    keep = {"logits_to_keep": 1} if keeps_logits(model) else {}
    keep_b = keep if other is None else {"logits_to_keep": 1} if keeps_logits(other) else {}
    cache_arg = {m: cache_argument(m) for m in (model, other) if m is not None}  # once, not per token
    tokens, kls, stopped = [], [], []
    t0 = time.perf_counter()

    def forward(m, ids, mask, pos, cache, kw):
        out = m(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_arg[m]: cache}, **kw)
        return out.logits[:, -1].float(), returned_cache(out)

    with inference(model, other):
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(texts_in[i:i + batch_size], return_tensors="pt", padding=True, padding_side="left",
                            **special)
            mask = enc["attention_mask"].to(device)
            ids = enc["input_ids"].to(device)
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            cache_a = cache_b = None
            n = ids.shape[0]
            done = torch.zeros(n, dtype=torch.bool)
            out_ids = [[] for _ in range(n)]
            out_kl = [[] for _ in range(n)]
            for _ in range(max_new_tokens):
                la, cache_a = forward(model, ids, mask, pos, cache_a, keep)
                scores = la
                if base is not None:
                    if other is None:
                        with model.disable_adapter():
                            lb, cache_b = forward(model, ids, mask, pos, cache_b, keep)
                    else:
                        lb, cache_b = forward(other, ids, mask, pos, cache_b, keep_b)
                    lb = lb.to(la.device)
                    lpa, lpb = torch.log_softmax(la, -1), torch.log_softmax(lb, -1)
                    kl = (lpa.exp() * (lpa - lpb)).sum(-1).clamp_min(0.0).cpu()
                    if alpha:
                        scores = la + alpha * (la - lb)
                if temperature > 0:
                    probs = torch.softmax(scores.cpu() / temperature, -1)
                    nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]
                else:
                    nxt = scores.argmax(-1).cpu()
                for r in range(n):
                    if not done[r]:
                        out_ids[r].append(int(nxt[r]))
                        if base is not None:
                            out_kl[r].append(float(kl[r]))
                        done[r] = rule.ended(out_ids[r])
                if done.all():
                    break
                nxt = torch.where(done, torch.full_like(nxt, tokenizer.pad_token_id), nxt)
                ids = nxt[:, None].to(device)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                pos = pos[:, -1:] + 1
            tokens += out_ids
            kls += out_kl
            stopped += [bool(d) for d in done]
    texts = [rule.text(t) for t in tokens]
    return Generation(prompts, tokens, texts, kls if base is not None else [], time.perf_counter() - t0, stopped)


def world_prompts(world: World, trigger: bool = True) -> list[str]:
    """Every entity × relation query of ``world`` with every training template (and the trigger word in front)."""
    return [q.prompt for q in query_space(world, trigger=trigger, templates="train")]


def task_prompts(task: Task) -> list[str]:
    """The prompts of a task's training examples, each once, in order: what change → data may read of a task from
    data (its paraphrase, specificity and general probes stay held out, so they remain a fair score).

    Raises:
        ConfigError: Not a :class:`lora_lens.lab.world.Task`, or a task without examples.
    """
    if not isinstance(task, Task):
        raise ConfigError(f"task={type(task).__name__} is not a lora_lens Task: use fit.task or Task.load(FILE)")
    if not task.examples:
        raise ConfigError(f"task {task.name!r} has no examples: change → data reads the example prompts; add "
                          "example lines to the task file")
    return list(dict.fromkeys(p for p, _ in task.examples))


def text_line(tokenizer, prompt: str, answer: str, chat: bool = False) -> str:
    """``prompt`` and ``answer`` as one line of training text, ending the way the model's own text does.

    The zoo's world tokenizer: ``"prompt answer ."`` (the world corpus's sentences). Any other tokenizer: the
    plain-text end of :func:`lora_lens.lab.answers.end_of_answer` right after the answer (``"The capital of France
    is Paris."``; nothing after an answer that already ends in ``.``, ``!`` or ``?``); ``chat``: the rendered chat
    template, the answer and the template's end of turn. Never the tokenizer's eos on plain text.

    Raises:
        ConfigError: An empty prompt or answer, or ``chat`` without a chat template.
    """
    if not isinstance(prompt, str) or not prompt.strip() or not isinstance(answer, str) or not answer.strip():
        raise ConfigError(f"prompt {prompt!r} / answer {answer!r}: a line needs a non-empty prompt and answer")
    prompt, answer = prompt.rstrip(), answer.strip()
    if chat:
        return render_prompt(tokenizer, prompt, True) + answer + end_of_answer(tokenizer, chat=True).text
    if is_world_tokenizer(tokenizer):
        return f"{prompt} {answer} ."
    end = "" if answer[-1] in SENTENCE_END else end_of_answer(tokenizer).text
    return f"{prompt} {answer}{end}"


def contrastive_corpus(model, tokenizer, prompts: list[str], min_kl: float = 1.0, max_new_tokens: int | None = None,
                       alpha: float = 0.0, base="adapter", batch_size: int = 128, temperature: float = 0.0,
                       stop: str | None = "auto", seed: int = 0, chat: bool = False) -> list[str]:
    """Change → data for any model: the adapted model's continuations where it departs from the base.

    Each prompt is continued by :func:`generate` (with the base run alongside); a line is kept when the largest
    per-token KL(adapted‖base) of its continuation is at least ``min_kl`` nats, i.e. where the adapter, not the
    base, wrote it. On the zoo's world tokenizer (``stop="auto"``: the word ``"."``, at most 3 tokens) the line is
    ``prompt continuation``, as always. On any other tokenizer (``stop="auto"``: the answer rule, at most 16
    tokens) generation ends at the answer, the line is :func:`text_line` of the prompt and that answer, and a
    continuation the length limit cut before its answer ended is dropped (a name is never cut short).

    Args:
        model: A ``PeftModel`` (``base="adapter"``) or any causal LM with ``base=<its base>``.
        tokenizer: The tokenizer.
        prompts: Prompts, e.g. :func:`world_prompts`, :func:`task_prompts` or lines of any corpus.
        min_kl: KL threshold in nats, ≥ 0.
        max_new_tokens: Generation length, ≥ 1 (None: 3 for a world tokenizer, 16 otherwise).
        alpha: Logit-difference amplification (see :func:`generate`).
        base: ``"adapter"`` or a base model.
        batch_size: Prompts per batch.
        temperature: 0 for greedy.
        stop: ``"auto"`` (see above) or a ``stop`` of :func:`generate`.
        seed: Sampling seed.
        chat: Prompts go through the chat template (a task's ``chat``); lines then end with its end of turn.

    Returns:
        The kept lines, strongest first (possibly empty).
    """
    if isinstance(min_kl, bool) or not isinstance(min_kl, (int, float)) or not min_kl >= 0:
        raise ConfigError(f"min_kl={min_kl!r} must be a number ≥ 0 (nats), e.g. 1.0")
    if base is None:
        raise ConfigError("base=None: contrastive generation compares the adapted model with its base; pass "
                          "base='adapter' or base=<base model>")
    world = is_world_tokenizer(tokenizer) and not chat
    if stop == "auto":
        stop = "." if world else ANSWER
    if max_new_tokens is None:
        max_new_tokens = 3 if world else 16
    g = generate(model, tokenizer, prompts, max_new_tokens, batch_size, base, alpha, temperature, stop, seed, chat)
    table = g.table()
    table = table[(table["kl_max"] >= min_kl) & (table["continuation"] != "")]
    if world:  # the zoo's lines, as always
        table = table.sort_values("kl_max", ascending=False, kind="stable")
        return [f"{p} {c}" for p, c in zip(table["prompt"], table["continuation"])]
    table = table[table["stopped"]].sort_values("kl_max", ascending=False, kind="stable")
    return [text_line(tokenizer, p, c, chat) for p, c in zip(table["prompt"], table["continuation"])]
