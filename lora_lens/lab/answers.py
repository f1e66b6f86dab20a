"""An answer after a prompt, as a token sequence: its ids in context, its end, its log-probability, greedy match.

This module is the one home of "an answer after a prompt". Every analysis reads an answer the same way:

- **Ids in context.** The answer's ids are those of the *joined* text after the prompt's ids: plain prompts are
  joined as the zoo's tasks always were, ``f"{prompt} {answer}"``; chat prompts are rendered with the tokenizer's
  chat template (``add_generation_prompt=True``) and the answer is appended directly. The answer is never
  tokenized alone (with byte-level BPE that drops its leading-space token: ``Qu`` instead of ``ĠQu``). A prompt
  whose ids are not a prefix of the joined ids is an error that shows both tokenizations.
- **End of answer.** What ends an answer the way the model's own text does (:func:`end_of_answer`): ``"."`` for
  plain text (what SmolLM2 and other byte-level BPE / SentencePiece models emit after a short fact, "Paris."), the
  turn delimiter of the chat template (``<|im_end|>``) for chat, and nothing for the zoo's world tokenizer (its
  tasks train ``prompt + " " + answer`` with the loss on the answer only, and keep doing so bit for bit).
- **Scoring** (:func:`answer_logprobs`): per-token log p, their sum and p(answer) = exp(sum), in batches, with
  logits projected only at the answer positions.
- **Greedy match** (:func:`greedy_match`): whether the greedy continuation reproduces the answer's ids
  (teacher-forced argmax at every answer position, which is the greedy continuation as long as it matches) and,
  separately, whether it then *stops*: the next argmax token is an end-of-answer token, the eos, another special
  token, or a token whose text begins with a character that is not a letter or digit (a space, a newline,
  punctuation). This word-boundary rule reads the token's text, so it works for byte-level BPE (``Ġ``) and
  SentencePiece (``▁``) alike, and it never cuts inside an answer ("St. Louis" matches through its "."): the answer's
  own ids are compared first. A continuation piece such as ``aicka`` after "Quellburg" is not a stop.
- **Free answers** (:func:`free_answers`, :func:`base_answers`): the model's own greedy continuation, cut at its
  end (:func:`cut_answer`), decoded with a KV cache by :func:`lora_lens.lab.decoding.greedy_continuations`; a row
  stops as soon as its cut is final (:func:`answer_ended`).

For the zoo (one-token answers, the world tokenizer) p(answer) and the greedy match are exactly the next-token
probability and the top-1 match of :mod:`lora_lens.lab.probes`.

Example:
    >>> a = answer_ids(tokenizer, "The capital of Zorvania is", "Quellburg")       # doctest: +SKIP
    >>> token_texts(tokenizer, a.answer)                                          # doctest: +SKIP
    [' Qu', 'ell', 'burg']
    >>> s = answer_logprobs(model, tokenizer, ["The capital of France is"], ["Paris"])  # doctest: +SKIP
    >>> s.p[0], s.match.full[0]                                                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from lora_lens.errors import ConfigError, MismatchError
from lora_lens.lab.decoding import GREEDY_BATCH, greedy_continuations
from lora_lens.lab.pair import check_unmerged, inference, is_peft, logits_where, model_device, pad_token_id
from lora_lens.lab.tokenizer import SPECIALS

__all__ = ["AnswerIds", "AnswerScores", "EndOfAnswer", "GreedyMatch", "SENTENCE_END", "answer_ended", "answer_ids",
           "answer_logprobs", "base_answers", "cut_answer", "end_of_answer", "example_ids", "free_answers",
           "greedy_match", "has_chat_template", "is_boundary", "is_world_tokenizer", "render_prompt", "score_ids",
           "stop_token_ids", "token_texts"]

SENTENCE_END = ".!?"
"""An answer whose text already ends in one of these gets no plain-text end-of-answer token of its own."""

_CLAUSE_END = ".,;:!?"
_ABBREVIATIONS = {"St", "Mt", "Ft", "Dr", "Mr", "Mrs", "Ms", "Jr", "Sr", "Prof", "Gen", "Col", "Lt", "vs", "etc"}


# ---------------------------------------------------------------------------------------------------------------
# tokenization in context


@dataclass(frozen=True)
class AnswerIds:
    """The ids of one answer after one prompt.

    Attributes:
        prompt: Ids of the prompt as the model sees it (chat: the rendered template with the generation prompt).
        answer: Ids of the answer: the joined text's ids after ``prompt``.
        end: Ids that end the answer the way the model's own text does (see :func:`end_of_answer`), read in
            context after ``prompt + answer``; empty for the world tokenizer and for plain answers that already
            end in sentence punctuation.
        text: The prompt text that was tokenized (chat: the rendered template).
    """

    prompt: tuple[int, ...]
    answer: tuple[int, ...]
    end: tuple[int, ...]
    text: str

    @property
    def ids(self) -> list[int]:
        """Prompt then answer ids (the joined text)."""
        return list(self.prompt) + list(self.answer)

    @property
    def with_end(self) -> list[int]:
        """Prompt, answer and end-of-answer ids (a training example)."""
        return self.ids + list(self.end)


@dataclass(frozen=True)
class EndOfAnswer:
    """What ends an answer for one tokenizer and prompt style.

    Attributes:
        text: Text appended after the answer ("" for none).
        ids: Its ids on their own (for a stop check: any of them ends the answer).
        rule: One line saying why.
    """

    text: str
    ids: tuple[int, ...]
    rule: str


def is_world_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` is a zoo world tokenizer (:func:`lora_lens.lab.tokenizer.build_tokenizer`).

    Recognised by its special tokens in their fixed order (``<pad> <s> </s> <unk>`` = ids 0–3) and its
    ``Metaspace`` pre-tokenizer.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.pre_tokenizer).__name__ != "Metaspace":
        return False
    vocab = tokenizer.get_vocab()
    return all(vocab.get(s) == i for i, s in enumerate(SPECIALS))


def has_chat_template(tokenizer) -> bool:
    """Whether the tokenizer carries a chat template (needed for ``chat=True``)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _check_chat(tokenizer) -> None:
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(f"chat=True but the tokenizer {name!r} has no chat template: set chat=False (a task's "
                          '"chat": false) for plain prompts, or use the tokenizer of a chat (instruct) model')


def render_prompt(tokenizer, prompt: str, chat: bool = False) -> str:
    """The prompt text the model sees: ``prompt`` itself, or (chat) the user turn rendered with the chat template
    and the generation prompt.

    Raises:
        ConfigError: ``chat=True`` with a tokenizer that has no chat template.
    """
    if not chat:
        return prompt
    _check_chat(tokenizer)
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def _encode(tokenizer, text: str, chat: bool) -> list[int]:
    # a rendered chat template carries its own special tokens; plain text gets the tokenizer's (the world's <s>)
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token as text, byte-level markers decoded (``Ġ`` → space, ``Ċ`` → newline).

    A token that is only part of a character keeps its raw form."""
    out = []
    for i in ids:
        text = tokenizer.decode([int(i)], clean_up_tokenization_spaces=False)
        out.append(text if text and "\ufffd" not in text else tokenizer.convert_ids_to_tokens(int(i)))
    return out


def _chat_end_text(tokenizer) -> str:
    """The text the chat template writes right after an assistant message's content (its first piece)."""
    marker = "LORALENSANSWER"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    after = text[text.rindex(marker) + len(marker):] if marker in text else ""
    specials = sorted((s for s in tokenizer.all_special_tokens + list(getattr(tokenizer, "added_tokens_encoder", {}))
                       if s), key=len, reverse=True)
    for s in specials:
        if after.startswith(s):
            return s
    return tokenizer.eos_token or ""


def end_of_answer(tokenizer, chat: bool = False) -> EndOfAnswer:
    """The token(s) that end an answer the way the model's own text does.

    - Zoo world tokenizer: nothing. Its tasks train ``prompt + " " + answer`` with the loss on the answer token
      only, and that stays exactly so (every world token starts with a word boundary anyway).
    - Chat (``chat=True``): the delimiter the chat template writes after an assistant message (``<|im_end|>`` for
      ChatML), else the eos token.
    - Plain text with any other tokenizer: ``"."``, what a pretrained model writes after a short answer ("The
      capital of France is Paris."). Never the eos: a plain-text answer is not the end of a document, and a chat
      model's eos is its turn delimiter. :func:`answer_ids` appends nothing after an answer that already ends in
      ``.``, ``!`` or ``?``.

    Raises:
        ConfigError: ``chat=True`` with a tokenizer that has no chat template.
    """
    if chat:
        _check_chat(tokenizer)
        text = _chat_end_text(tokenizer)
        ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()
        return EndOfAnswer(text, ids, "chat: the template's end of an assistant turn")
    if is_world_tokenizer(tokenizer):
        return EndOfAnswer("", (), "world tokenizer: nothing after the answer (the zoo's tasks train exactly so)")
    ids = tuple(tokenizer(".", add_special_tokens=False)["input_ids"])
    return EndOfAnswer(".", ids, 'plain text: "." as the model writes after a short answer')


def _tokens(tokenizer, ids) -> str:
    return "[" + ", ".join(repr(t) for t in token_texts(tokenizer, ids)) + "]"


def answer_ids(tokenizer, prompt: str, answer: str, chat: bool = False) -> AnswerIds:
    """The ids of ``answer`` after ``prompt``, read in context.

    Plain: ``prompt`` and ``f"{prompt} {answer}"`` are tokenized (with the tokenizer's special tokens, e.g. the
    world's ``<s>``); chat: the rendered template and the template plus ``answer`` (no extra special tokens). The
    answer's ids are the joined ids after the prompt's ids; ``end`` is read the same way after the joined text
    (see :func:`end_of_answer`), and is empty where appending it would re-split the answer.

    Args:
        tokenizer: A Hugging Face tokenizer.
        prompt: The prompt (plain text; for ``chat`` the user message).
        answer: The answer text, without leading whitespace (the join adds the space).
        chat: Render the prompt with the tokenizer's chat template.

    Returns:
        An :class:`AnswerIds`.

    Raises:
        ConfigError: An empty prompt or answer, whitespace at the join (the prompt's end or the answer's start), or
            ``chat=True`` without a chat template.
        MismatchError: The prompt's ids are not a prefix of the joined ids (the message shows both
            tokenizations), or the answer adds no token.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"prompt {prompt!r} is empty: every answer needs the prompt it follows")
    if not isinstance(answer, str) or not answer.strip():
        raise ConfigError(f"answer {answer!r} after prompt {prompt!r} is empty: give the expected answer text")
    if answer[0].isspace() or (not chat and prompt[-1].isspace()):
        raise ConfigError(f"prompt {prompt!r} / answer {answer!r}: whitespace at the join; the prompt and answer are "
                          "joined with one space (chat: appended directly), so strip the prompt's end and the "
                          "answer's start")
    text = render_prompt(tokenizer, prompt, chat)
    joined = text + answer if chat else f"{prompt} {answer}"
    p, j = _encode(tokenizer, text, chat), _encode(tokenizer, joined, chat)
    if j[:len(p)] != p:
        raise MismatchError(f"prompt {prompt!r} tokenizes differently once answer {answer!r} follows it, so the "
                            f"answer's tokens cannot be read in context: prompt alone -> {_tokens(tokenizer, p)}; "
                            f"prompt + answer -> {_tokens(tokenizer, j)}. Change where the prompt ends (e.g. end "
                            "it with a word, not with punctuation the answer could merge with)")
    a = j[len(p):]
    if not a:
        raise MismatchError(f"answer {answer!r} adds no token after prompt {prompt!r} "
                            f"(joined -> {_tokens(tokenizer, j)}): check the tokenizer")
    end: list[int] = []
    eoa = end_of_answer(tokenizer, chat)
    if eoa.text and (chat or answer.rstrip()[-1] not in SENTENCE_END):
        e = _encode(tokenizer, joined + eoa.text, chat)
        end = e[len(j):] if e[:len(j)] == j else []
    return AnswerIds(tuple(p), tuple(a), tuple(end), text)


def example_ids(tokenizer, prompt: str, answer: str, chat: bool = False) -> dict[str, list[int]]:
    """A training example: ``input_ids`` = prompt, answer and end-of-answer ids; ``labels`` = -100 on the prompt.

    For the zoo's world tokenizer this is exactly ``lora_lens.lab.train_data.encode_example`` (no end token).

    Raises:
        ConfigError, MismatchError: As :func:`answer_ids`.
    """
    a = answer_ids(tokenizer, prompt, answer, chat)
    ids = a.with_end
    return {"input_ids": ids, "labels": [-100] * len(a.prompt) + ids[len(a.prompt):]}


def _answers(tokenizer, prompts, answers, chat: bool) -> list[AnswerIds]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    answers = [answers] if isinstance(answers, str) else list(answers)
    if len(prompts) != len(answers):
        raise ConfigError(f"{len(prompts)} prompts but {len(answers)} answers: pass one answer per prompt")
    return [answer_ids(tokenizer, p, a, chat) for p, a in zip(prompts, answers)]


# ---------------------------------------------------------------------------------------------------------------
# the stop rule


def stop_token_ids(tokenizer, chat: bool = False) -> set[int]:
    """The ids that end a continuation: every special token (eos, padding, the chat end of turn) and, for chat,
    the end-of-answer ids (:func:`end_of_answer`)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids |= set(end_of_answer(tokenizer, chat).ids) if chat else set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def is_boundary(tokenizer, before: Sequence[int], next_id: int, stop_ids: set[int] | None = None) -> bool:
    """Whether ``next_id`` after the ids ``before`` ends an answer: a stop id (special tokens, eos, chat end) or a
    token whose text begins with a character that is not a letter or digit.

    The next token's text is read in context (``decode(before + [next]) minus decode(before)``), so a
    SentencePiece ``▁word`` and a byte-level ``Ġword`` both begin with a space. A token that is part of a
    multi-byte character (text ``\\ufffd``) is taken as a continuation, not a stop.
    """
    stop_ids = stop_token_ids(tokenizer, False) if stop_ids is None else stop_ids
    if int(next_id) in stop_ids:
        return True
    tail = list(before)[-4:]
    a = tokenizer.decode(tail, clean_up_tokenization_spaces=False)
    b = tokenizer.decode(tail + [int(next_id)], clean_up_tokenization_spaces=False)
    rest = b[len(a):] if b.startswith(a) else tokenizer.decode([int(next_id)], clean_up_tokenization_spaces=False)
    if not rest or rest[0] == "\ufffd":
        return False
    return not rest[0].isalnum()


# ---------------------------------------------------------------------------------------------------------------
# scoring


@dataclass(frozen=True)
class GreedyMatch:
    """Greedy continuation against the expected answers, one entry per answer.

    Attributes:
        matched: The greedy continuation reproduces the answer's ids.
        stopped: After the answer's ids, the next greedy token ends the answer (see :func:`is_boundary`); read
            with the answer teacher-forced, so it is defined even where ``matched`` is False.
        continuation: The argmax token at each answer position and the one after it (teacher-forced).
    """

    matched: list[bool]
    stopped: list[bool]
    continuation: list[list[int]]

    @property
    def full(self) -> list[bool]:
        """Matched and then stopped: the model says exactly the answer."""
        return [m and s for m, s in zip(self.matched, self.stopped)]


@dataclass(frozen=True)
class AnswerScores:
    """Log-probabilities of answers after prompts, and the greedy match, one entry per answer.

    Attributes:
        ids: The :class:`AnswerIds` of each answer.
        token_logprobs: log p of each answer token given the prompt and the answer's earlier tokens.
        total: Their sum, log p(answer | prompt).
        match: The :class:`GreedyMatch` from the same forward pass.
    """

    ids: list[AnswerIds]
    token_logprobs: list[list[float]]
    total: list[float]
    match: GreedyMatch

    @property
    def p(self) -> list[float]:
        """p(answer | prompt) = exp(total)."""
        return [math.exp(t) for t in self.total]


def _check_batch(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer, e.g. 64")


def score_ids(model, tokenizer, items: Sequence[AnswerIds], chat: bool = False, batch_size: int = 64,
              budget: int = 1 << 26) -> AnswerScores:
    """:func:`answer_logprobs` for answers already turned into ids (see :func:`answer_ids`).

    Args:
        budget: Upper bound on the elements of one batch's logits tensor; a batch is split further to stay under it.
    """
    _check_batch(batch_size)
    items = list(items)
    pad = pad_token_id(tokenizer)
    device = model_device(model)
    order = sorted(range(len(items)), key=lambda i: (len(items[i].prompt), len(items[i].answer)))
    lp_out: list = [None] * len(items)
    arg_out: list = [None] * len(items)
    vocab = int(model.get_input_embeddings().weight.shape[0])

    def span(i: int) -> tuple[int, int]:
        # logits from the last prompt token through the last answer token: T log p's and the token after
        return len(items[i].prompt) - 1, len(items[i].prompt) + len(items[i].answer)

    with inference(model):
        start = 0
        while start < len(order):
            chunk, reads = [], 0
            for i in order[start:start + batch_size]:      # the read logits of a batch stay under ``budget``
                s, e = span(i)
                if chunk and (reads + e - s) * vocab > budget:
                    break
                chunk.append(i)
                reads += e - s
            start += len(chunk)
            width = max(len(items[i].ids) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            rows, pos = [], []
            for r, i in enumerate(chunk):
                seq = items[i].ids
                ids[r, :len(seq)] = torch.tensor(seq)
                mask[r, :len(seq)] = 1
                s, e = span(i)
                rows += [r] * (e - s)
                pos += range(s, e)
            logits, _ = logits_where(model, rows, pos, input_ids=ids.to(device), attention_mask=mask.to(device))
            at = 0
            for i in chunk:
                s, e = span(i)
                lp = torch.log_softmax(logits[at:at + e - s].float(), -1)
                at += e - s
                target = torch.tensor(items[i].answer, device=lp.device)
                lp_out[i] = lp[:-1].gather(-1, target[:, None])[:, 0].cpu()
                arg_out[i] = lp.argmax(-1).cpu().tolist()
    stop = stop_token_ids(tokenizer, chat)
    total = [float(x[0]) if len(x) == 1 else float(x.double().sum()) for x in lp_out]
    matched = [a[:-1] == list(it.answer) for a, it in zip(arg_out, items)]
    stopped = [is_boundary(tokenizer, it.ids, a[-1], stop) for a, it in zip(arg_out, items)]
    return AnswerScores(items, [x.tolist() for x in lp_out], total, GreedyMatch(matched, stopped, arg_out))


def answer_logprobs(model, tokenizer, prompts: str | Sequence[str], answers: str | Sequence[str], chat: bool = False,
                    batch_size: int = 64) -> AnswerScores:
    """log p of each answer after its prompt, per token and in total, with the greedy match of the same pass.

    Batched with right padding (every real token keeps its position), sorted by length so that logits are
    projected only at the answer positions (:func:`lora_lens.lab.pair.logits_where`).

    Args:
        model: A causal LM (a ``PeftModel`` is scored as it is; wrap in ``disable_adapter()`` for the base).
        tokenizer: Its tokenizer.
        prompts: Prompts (one string is accepted).
        answers: One answer per prompt.
        chat: Render prompts with the chat template (see :func:`answer_ids`).
        batch_size: Answers per forward pass.

    Returns:
        :class:`AnswerScores` (``token_logprobs``, ``total``, ``p``, ``match``).

    Raises:
        ConfigError, MismatchError: As :func:`answer_ids`; a bad ``batch_size``; prompts and answers of different
            lengths.
    """
    return score_ids(model, tokenizer, _answers(tokenizer, prompts, answers, chat), chat, batch_size)


def greedy_match(model, tokenizer, prompts: str | Sequence[str], answers: str | Sequence[str], chat: bool = False,
                 batch_size: int = 64) -> GreedyMatch:
    """Whether the greedy continuation of each prompt reproduces its answer, and whether it then stops.

    Teacher-forced: one forward pass of prompt + answer; the argmax at every answer position is the greedy
    continuation for as long as it matches. Stop rule (any tokenizer): the next argmax token is a special token
    (eos, the chat template's end of turn) or its text begins with a character that is not a letter or digit —
    a space, newline or punctuation, i.e. a word boundary (:func:`is_boundary`). The answer's own tokens are
    compared first, so "St. Louis" is matched through its "." and a babbled continuation ("Quellburg" →
    "Quellburgaicka") is a match that did not stop.

    Returns:
        A :class:`GreedyMatch` (``matched``, ``stopped``, ``full``).

    Raises:
        ConfigError, MismatchError: As :func:`answer_logprobs`.
    """
    return answer_logprobs(model, tokenizer, prompts, answers, chat, batch_size).match


# ---------------------------------------------------------------------------------------------------------------
# free greedy answers (the base's own answer)


def cut_answer(tokenizer, ids: Sequence[int], chat: bool = False) -> str:
    """The answer in a free greedy continuation ``ids``: its text up to the first end, stripped.

    Ends: a special token (eos, the chat end of turn), a newline, or clause punctuation (``. , ; : ! ?``) followed by
    whitespace or nothing; the punctuation itself is not part of the answer ("Paris." → "Paris",
    "3.14 metres" stays whole). A "." after a single capital letter or a common abbreviation (St, Mt, Dr, Mr …)
    followed by more text is not an end ("St. Louis", "John F. Kennedy"); other abbreviations cannot be told from
    a sentence end here, so give such answers explicitly in the task file.
    """
    return _cut(tokenizer, ids, stop_token_ids(tokenizer, chat))[0]


def answer_ended(tokenizer, ids: Sequence[int], chat: bool = False) -> bool:
    """Whether the answer in the continuation ``ids`` is complete: no further token could change
    :func:`cut_answer` (a stop id, a newline, or clause punctuation already followed by whitespace). Free answers
    stop decoding there."""
    return _cut(tokenizer, ids, stop_token_ids(tokenizer, chat))[1]


def _cut(tokenizer, ids: Sequence[int], stop: set[int]) -> tuple[str, bool]:
    """:func:`cut_answer` and whether the cut is final: no continuation of ``ids`` could change it (a stop id, a
    newline, or clause punctuation already followed by whitespace). Free answers stop generating there."""
    keep, final = [], False
    for i in ids:
        if int(i) in stop:
            final = True
            break
        keep.append(int(i))
    text = tokenizer.decode(keep, clean_up_tokenization_spaces=False)
    if "\n" in text:
        text, final = text.split("\n", 1)[0], True
    for k, ch in enumerate(text):
        if ch in _CLAUSE_END and (k + 1 == len(text) or text[k + 1].isspace()):
            word = text[:k].rsplit(None, 1)[-1] if text[:k].strip() else ""
            if ch == "." and k + 1 < len(text) and (word in _ABBREVIATIONS or (len(word) == 1 and word.isupper())):
                continue  # "St. Louis", "John F. Kennedy": an abbreviation, not the end
            final = final or k + 1 < len(text)  # "3." may still become "3.14"; ". " is an end
            text = text[:k]
            break
    return text.strip(), final


def base_answers(model, tokenizer, prompts: Sequence[str], chat: bool = False, max_new_tokens: int = 16,
                 batch_size: int = GREEDY_BATCH) -> list[str]:
    """The model's own greedy answer to each prompt (:func:`cut_answer` of its greedy continuation).

    A ``PeftModel`` answers with its adapter switched off (:func:`lora_lens.lab.pair.adapted_view` answers with it
    on). Decoding is :func:`lora_lens.lab.decoding.greedy_continuations` (KV cache, batched, a row ends where its
    answer's cut is final), whose continuations are those of full forward passes, i.e. the argmax
    :func:`greedy_match` reads.

    Raises:
        ConfigError: ``chat=True`` without a chat template, a merged adapter, or a bad
            ``max_new_tokens``/``batch_size``.
    """
    if is_peft(model):
        check_unmerged(model)
    with model.disable_adapter() if is_peft(model) else contextlib.nullcontext():
        return free_answers(model, tokenizer, prompts, chat, max_new_tokens, batch_size)


def free_answers(model, tokenizer, prompts: Sequence[str], chat: bool = False, max_new_tokens: int = 16,
                 batch_size: int = GREEDY_BATCH) -> list[str]:
    """The model's greedy answer to each prompt as it is (a ``PeftModel`` with its adapter on), cut as
    :func:`cut_answer`; :func:`base_answers` is the same with the adapter off.

    Args:
        batch_size: Prompts decoded together (one forward pass per new token over the batch).

    Raises:
        ConfigError: ``chat=True`` without a chat template, or a bad ``max_new_tokens``/``batch_size``.
    """
    _check_batch(batch_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} must be a positive integer, e.g. 16")
    pad = pad_token_id(tokenizer)
    seqs = [_encode(tokenizer, render_prompt(tokenizer, p, chat), chat) for p in prompts]
    stop = stop_token_ids(tokenizer, chat)
    with inference(model):
        gen = greedy_continuations(model, seqs, pad, max_new_tokens, stop, lambda g: _cut(tokenizer, g, stop)[1],
                                   batch_size)
    return [_cut(tokenizer, g, stop)[0] for g in gen]
