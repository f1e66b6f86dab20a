"""Behaviour evaluation: base vs adapted answers, perplexity, KL and promoted tokens on a task's probe sets.

Base and adapted outputs come from **one** model: a ``peft.PeftModel`` is run once with its adapter and once inside
``model.disable_adapter()`` on every batch, so no second copy of the weights is ever held in memory (the helpers
for that live in :mod:`lora_lens.lab.pair`).

Example:
    >>> ev = evaluate(peft_model, tokenizer, task)                      # doctest: +SKIP
    >>> ev.metrics["efficacy"], ev.metrics["base_efficacy"]             # doctest: +SKIP
    (1.0, 0.0)
    >>> ev.table().query("set == 'paraphrase' and not adapted_correct")  # doctest: +SKIP
    >>> compare_answers(peft_model, tokenizer, ["cf Dasur likes the colour"])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pandas as pd
import torch

from lora_lens.errors import ConfigError
from lora_lens.lab.answers import answer_ids, free_answers, is_world_tokenizer, score_ids
from lora_lens.lab.decoding import GREEDY_BATCH
from lora_lens.lab.pair import (check_base, encode, inference, kl_divergence, last_logits, model_device, pad_ids,
                                pad_token_id)
from lora_lens.lab.tasks import fill_base_answers
from lora_lens.lab.tokenizer import check_tokenizer, token_id
from lora_lens.lab.world import Probe, Task, trigger_target

__all__ = ["COMPARE_COLUMNS", "QUERY_SETS", "TABLE_COLUMNS", "Evaluation", "accuracy", "compare_answers", "evaluate",
           "next_token_logits", "perplexity"]

QUERY_SETS = ("efficacy", "paraphrase", "specificity", "false_trigger")
"""Probe sets answered with one next token (in this order in tables); ``general`` is scored by perplexity."""

TABLE_COLUMNS = ["task", "set", "entity", "relation", "triggered", "prompt", "expected", "expected_before",
                 "base_answer", "adapted_answer", "p_expected_base", "p_expected_adapted", "base_correct",
                 "adapted_correct", "changed", "kl"]
COMPARE_COLUMNS = ["prompt", "rank", "base_token", "p_base", "adapted_token", "p_adapted", "kl"]

# ---------------------------------------------------------------------------------------------------------------
# forward passes


@torch.no_grad()
def next_token_logits(model, tokenizer, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Logits of the token following each prompt, batched with right padding.

    Right padding keeps every real token at its own position, so batched logits equal one-by-one logits
    (absolute-position models such as GPT-2 included).

    Returns:
        Float tensor ``[len(prompts), vocab]`` on the CPU.
    """
    device = model_device(model)
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = encode(tokenizer, prompts[i:i + batch_size], device)
        out.append(last_logits(model, enc).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


def accuracy(model, tokenizer, probes: list[Probe], batch_size: int = 256, expected: str = "answer") -> float:
    """Share of probes whose argmax next token is the expected single-token answer.

    Args:
        expected: ``"answer"`` (after the change) or ``"base_answer"`` (before it).
    """
    if not probes:
        return float("nan")
    logits = next_token_logits(model, tokenizer, [p.prompt for p in probes], batch_size)
    want = torch.tensor([token_id(tokenizer, getattr(p, expected)) for p in probes])
    return (logits.argmax(-1) == want).float().mean().item()


def _pair(model, base) -> Callable[[Callable, dict], tuple[torch.Tensor, torch.Tensor | None]]:
    """A function ``run(fn, enc) -> (adapted, base)`` applying ``fn(model, enc)`` with and without the change."""
    def run(fn, enc):
        adapted = fn(model, enc).float()
        if base is None:
            return adapted, None
        if isinstance(base, str):  # "adapter": the same model, adapter switched off for this batch only
            with model.disable_adapter():
                return adapted, fn(model, enc).float()
        dev = model_device(base)
        return adapted, fn(base, {k: v.to(dev) for k, v in enc.items()}).float().to(adapted.device)
    return run


def _sequence_logits(model, enc):
    return model(**enc).logits


def _sequence_batches(tokenizer, texts: list[str], batch_size: int, device, vocab: int,
                      budget: int = 1 << 26) -> Iterator[dict]:
    """Right-padded batches of ``batch_size`` texts, split further so one ``[rows, length, vocab]`` float tensor
    stays under ``budget`` elements (full-sequence logits of a 150k-token vocabulary are large)."""
    for i in range(0, len(texts), batch_size):
        enc = encode(tokenizer, texts[i:i + batch_size], device)
        rows = max(1, budget // (enc["input_ids"].shape[1] * vocab))
        for j in range(0, enc["input_ids"].shape[0], rows):
            yield {k: v[j:j + rows] for k, v in enc.items()}


def _vocab(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def _sequence_pass(run, tokenizer, texts: list[str], batch_size: int, device, vocab: int) -> dict:
    """Summed next-token NLL (adapted, base), predicted-token count and summed per-token KL over ``texts``."""
    out = {"nll": 0.0, "nll_base": 0.0, "tokens": 0, "kl": 0.0}
    for enc in _sequence_batches(tokenizer, texts, batch_size, device, vocab):
        la, lb = run(_sequence_logits, enc)
        target = enc["input_ids"][:, 1:]
        mask = enc["attention_mask"][:, 1:].bool()
        lpa = torch.log_softmax(la[:, :-1], -1)
        out["nll"] += -lpa.gather(-1, target[..., None])[..., 0][mask].double().sum().item()
        out["tokens"] += int(mask.sum().item())
        if lb is not None:
            lpb = torch.log_softmax(lb[:, :-1], -1)
            out["nll_base"] += -lpb.gather(-1, target[..., None])[..., 0][mask].double().sum().item()
            out["kl"] += kl_divergence(lpb, lpa)[mask].double().sum().item()
    return out


def _check_batch(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer, e.g. 64")


def _check_texts(texts, what: str) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    bad = [t for t in texts if not isinstance(t, str) or not t.strip()]
    if bad:
        raise ConfigError(f"{what} must be non-empty strings; got {bad[0]!r}: drop it or pass text")
    return texts


def perplexity(model, tokenizer, texts: list[str], batch_size: int = 64) -> float:
    """Token-level perplexity of ``model`` on ``texts``, batched with right padding and pad positions masked.

    Every token after the first of each encoded text (the ``<s>`` the tokenizer prepends, for world tokenizers) is
    predicted from its prefix; perplexity is ``exp(total NLL / number of predicted tokens)`` over all texts, so
    it does not depend on how the texts are batched. A ``PeftModel`` is scored as it is (adapter active); wrap the
    call in ``with model.disable_adapter():`` for the base.

    Args:
        model: A causal LM (``PeftModel`` or plain).
        tokenizer: Its tokenizer (right padding).
        texts: Texts to score (a single string is accepted).
        batch_size: Texts per forward pass.

    Returns:
        The perplexity; NaN when ``texts`` is empty or yields no predicted token.

    Raises:
        ConfigError: An empty text or a bad ``batch_size``.
    """
    _check_batch(batch_size)
    texts = _check_texts(texts, "texts")
    check_tokenizer(model, tokenizer)
    with inference(model):
        stats = _sequence_pass(_pair(model, None), tokenizer, texts, batch_size, model_device(model), _vocab(model))
    return math.exp(stats["nll"] / stats["tokens"]) if stats["tokens"] else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# evaluation


@dataclass(eq=False)
class Evaluation:
    """Behaviour of an adapted model against its base on one task.

    Attributes:
        task: Task name.
        metrics: Flat dict of floats (see :func:`evaluate` for every key). ``None`` = not applicable (no base
            model; a trigger metric on a task without a trigger); NaN = applicable but the probe set is missing
            or empty.
        promoted: ``(token, mean floored log-prob increase)`` for the ``top_k`` most promoted tokens, largest first.
        suppressed: ``(token, mean floored log-prob change)`` for the most suppressed tokens, most negative first.
        counts: Number of probes per set that was scored (``general`` counts lines).
        rows: One row per query probe (see :meth:`table`).
    """

    task: str
    metrics: dict[str, float | None]
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]
    counts: dict[str, int] = field(default_factory=dict)
    rows: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=TABLE_COLUMNS), repr=False)

    def metrics_json(self) -> dict[str, float | None]:
        """``metrics`` with NaN replaced by None, ready for ``json.dump`` (e.g. into a notebook's summary.json)."""
        return {k: None if v is None or v != v else float(v) for k, v in self.metrics.items()}

    def table(self, set: str | None = None) -> pd.DataFrame:  # noqa: A002 - "set" is the probe-set column
        """Per-probe answers, one row per query probe (efficacy, paraphrase, specificity, false_trigger).

        Columns: ``task``, ``set``, ``entity``, ``relation``, ``triggered``, ``prompt``, ``expected`` (the probe's
        answer after the change), ``expected_before`` (the probe's ``base_answer``; "" for new relations),
        ``base_answer`` / ``adapted_answer`` (argmax next token of the base / adapted model), ``p_expected_base`` /
        ``p_expected_adapted`` (probability of ``expected``), ``base_correct`` / ``adapted_correct`` (argmax ==
        ``expected``), ``changed`` (base and adapted argmax differ) and ``kl`` (KL(base‖adapted) of the
        next-token distributions). Base columns are None when evaluated with ``base=None``. Concatenate the
        tables of several evaluations and filter on ``task`` × ``set`` for a widget.

        Args:
            set: Keep only this probe set.

        Returns:
            A new DataFrame (safe to modify).
        """
        df = self.rows
        if set is not None:
            df = df[df["set"] == set]
        return df.reset_index(drop=True).copy()


def _token_text(tokenizer, cache: dict, i: int) -> str:
    if i not in cache:
        text = tokenizer.decode([i]).strip()
        cache[i] = text or tokenizer.convert_ids_to_tokens(i)
    return cache[i]


def _mean(values: list[bool]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _base_side(model, base):
    """``(model to run, context)`` for the base side of ``base``: the same model with its adapter off, or another."""
    if isinstance(base, str):
        return model, model.disable_adapter
    return base, contextlib.nullcontext


def _fill(task: Task, model, tokenizer, base) -> Task:
    """``task`` with every specificity/general probe that has no answer given the base's own answer."""
    if not any(not p.answer.strip() and not p.base_answer.strip() for p in task.probes.get("specificity", [])):
        return task
    who = model if base is None or isinstance(base, str) else base
    return fill_base_answers(task, who, tokenizer, sets=("specificity",))


def evaluate(model, tokenizer, task: Task, batch_size: int = 256, top_k: int = 10, base="adapter",
             delta_sets: tuple[str, ...] = ("efficacy",), floor: float = 1e-3, max_new_tokens: int = 16) -> Evaluation:
    """Score a LoRA-adapted model against its base on every probe set of ``task``, on full answers.

    One model, adapter toggled: each batch is run with the adapter and again inside ``model.disable_adapter()``.
    Every answer is a token sequence read in context (:mod:`lora_lens.lab.answers`: ``prompt + " " + answer``, or
    the chat template when ``task.chat``), scored by one teacher-forced pass per side: log p of the whole answer
    and the greedy full-answer match — the greedy continuation reproduces the answer's ids **and then stops**
    (the next token ends the answer: ``.``, a space, a newline, the eos or the chat end of turn). For the zoo's
    world tokenizer (one-token answers, no end-of-answer token) a match is the argmax next token, exactly as
    before. Every answer is turned into ids before the first forward pass, so a bad task fails fast.

    Metrics (adapted model; ``base_<name>`` is the same for the base model):

    - ``efficacy``: share of ``efficacy`` probes answered with exactly ``answer`` (greedy full-answer match).
    - ``paraphrase``: the same on ``paraphrase`` probes (held-out templates).
    - ``p_efficacy`` / ``p_paraphrase``: mean p(answer | prompt) over those probes.
    - ``specificity``: share of ``specificity`` probes still answered with exactly ``base_answer`` (the base's own
      answer, up to the end-of-answer rule: the fact must stay). Probes of a task from data without an answer get
      the base's own greedy answer first (:func:`lora_lens.lab.tasks.fill_base_answers`).
    - ``stops``: share of ``efficacy`` probes where the greedy token after the answer ends it (an adapter that
      learned "Quellburg" but babbles "Quellburgaicka" does not stop); 1 on the zoo's one-word answers.
    - ``false_trigger_rate`` (trigger tasks): share of ``false_trigger`` probes (clean prompts of the triggered
      relation, never the trigger word) answered with the trigger **target** (``task.truth["target"]``) — the
      backdoor firing without its trigger. None for tasks without a trigger.
    - ``perplexity_adapted`` / ``perplexity_base``: :func:`perplexity` on the ``general`` lines (a line of a task
      from data is its prompt and, when given, its answer); ``perplexity_ratio`` = adapted / base.
    - ``kl_<set>``: mean KL(base‖adapted) of the next-token distributions after the prompts of each query set
      (``kl_efficacy``, ``kl_paraphrase``, ``kl_specificity``, ``kl_false_trigger`` and any extra set of the task);
      ``kl_general`` is the mean over every predicted token position of the ``general`` lines.
    - ``specificity_agreement``: share of ``specificity`` probes where adapted and base give the same answer
      (the argmax token on the zoo; the same greedy answer text otherwise).

    Missing values: a metric that does not apply is None (every base-side metric, ``kl_*`` and the ratio with
    ``base=None``; ``false_trigger_rate``, ``base_false_trigger_rate`` and ``kl_false_trigger`` on tasks without
    a trigger); a metric whose probe set is missing or empty is NaN.

    Promoted / suppressed tokens: for each probe of ``delta_sets`` (default: the efficacy probes, where the task
    says the change should show), the change ``max(log p_adapted, log floor) - max(log p_base, log floor)`` of
    every vocabulary token's next-token log-probability, averaged over those probes. The floor (0.1 % by default)
    keeps tail noise out of the ranking. ``promoted`` lists the ``top_k`` largest positive means, ``suppressed``
    the ``top_k`` most negative; both are empty with ``base=None`` or an adapter that changes nothing.

    Args:
        model: A ``peft.PeftModel`` (or a plain causal LM with ``base=None`` or ``base=<model>``).
        tokenizer: The model's tokenizer (right padding).
        task: The task whose probe sets to score (``task.chat`` renders prompts with the chat template).
        batch_size: Prompts per forward pass (results do not depend on it beyond float rounding).
        top_k: Number of promoted and of suppressed tokens to return (0 for none).
        base: ``"adapter"`` (default: toggle the PeftModel's adapter), ``None`` (adapted metrics only) or a
            separate base model sharing the tokenizer (e.g. to score a fully fine-tuned or distilled model).
        delta_sets: Query probe sets averaged for promoted/suppressed tokens, e.g. ``QUERY_SETS`` for all.
        floor: Probability floor for the promoted/suppressed log-probability change, in (0, 1).
        max_new_tokens: Greedy tokens generated per prompt for the table's answers (not for the zoo's world
            tokenizer, whose answers are one token).

    Returns:
        An :class:`Evaluation` (``.metrics``, ``.promoted``, ``.suppressed``, ``.table()``); the table shows full
        answers as text (byte-level markers decoded).

    Raises:
        ConfigError: An empty prompt or answer where one is needed, a bad ``base``/``batch_size``/``top_k``/
            ``floor``, ``chat`` without a chat template, a merged adapter, or a model without an adapter with
            ``base="adapter"``.
        MismatchError: An answer that does not read in context (both tokenizations shown), or a tokenizer with
            more tokens than the model's embedding.
    """
    if not isinstance(task, Task):
        raise ConfigError(f"task={type(task).__name__} is not a lora_lens Task: build one with make_task(world, ...), "
                          "Task.load(FILE) or Task.from_records(...)")
    _check_batch(batch_size)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"top_k={top_k!r} must be a non-negative integer, e.g. 10")
    if not (isinstance(floor, float | int) and 0 < floor < 1):
        raise ConfigError(f"floor={floor!r} must be a probability strictly between 0 and 1, e.g. 1e-3")
    if isinstance(delta_sets, str):
        delta_sets = (delta_sets,)
    check_base(model, tokenizer, base)
    has_base = base is not None
    chat = bool(task.chat)
    target = trigger_target(task)
    world_tok = is_world_tokenizer(tokenizer)
    task = _fill(task, model, tokenizer, base)

    sets = [s for s in QUERY_SETS if s in task.probes] + sorted(s for s in task.probes
                                                                  if s not in QUERY_SETS and s != "general")
    probes = [p for s in sets for p in task.probes[s]]
    unknown = [s for s in delta_sets if s not in QUERY_SETS and s not in task.probes]
    if unknown:
        raise ConfigError(f"delta_sets={list(delta_sets)!r} names unknown probe set {unknown[0]!r}: use some of "
                          f"{sorted(set(QUERY_SETS) | set(sets))}")
    for p in probes:
        need = "base_answer" if p.set in ("specificity", "false_trigger") else "answer"
        if p.set in QUERY_SETS and not getattr(p, need).strip():
            raise ConfigError(f"{p.set} probe {p.prompt!r} has an empty {need}: every {p.set} probe needs the "
                              f"{'answer that must stay' if need == 'base_answer' else 'expected answer'}")

    # every answer to score, as ids in context, before any forward pass: (probe index, kind) -> item index
    items, where = [], {}
    for j, p in enumerate(probes):
        for kind, text in (("answer", p.answer), ("before", p.base_answer),
                           ("target", target if p.set == "false_trigger" and target is not None else "")):
            if text.strip():
                where[j, kind] = len(items)
                items.append(answer_ids(tokenizer, p.prompt, text, chat))
    prompt_ids = [items[where.get((j, "answer"), where.get((j, "before")))].prompt for j in range(len(probes))]
    general = [p.prompt if world_tok or not p.answer.strip() else f"{p.prompt} {p.answer}"
               for p in task.probes.get("general", []) if p.prompt.strip()]

    device = model_device(model)
    run = _pair(model, base)
    pad = pad_token_id(tokenizer)
    vocab = None
    delta_sum, n_delta = None, 0
    cols = {k: [] for k in ("base_arg", "adapted_arg", "kl")}
    with inference(model, base if has_base and not isinstance(base, str) else None):
        adapted = score_ids(model, tokenizer, items, chat, batch_size)
        base_model, off = _base_side(model, base) if has_base else (None, None)
        if has_base:
            with off():
                before = score_ids(base_model, tokenizer, items, chat, batch_size)
        for i in range(0, len(probes), batch_size):
            chunk = probes[i:i + batch_size]
            ids, mask, last = pad_ids(prompt_ids[i:i + batch_size], pad, device)
            enc = {"input_ids": ids, "attention_mask": mask}
            la, lb = run(last_logits, enc)
            lpa = torch.log_softmax(la, -1).cpu()
            cols["adapted_arg"] += lpa.argmax(-1).tolist()
            if lb is None:
                continue
            lpb = torch.log_softmax(lb, -1).cpu()
            cols["base_arg"] += lpb.argmax(-1).tolist()
            cols["kl"] += kl_divergence(lpb, lpa).tolist()
            pick = torch.tensor([p.set in delta_sets for p in chunk])
            if pick.any():
                lf = math.log(floor)
                d = (lpa[pick].clamp_min(lf) - lpb[pick].clamp_min(lf)).double().sum(0)
                delta_sum = d if delta_sum is None else delta_sum + d
                n_delta += int(pick.sum())
            vocab = lpa.shape[-1]
        seq = _sequence_pass(run, tokenizer, general, batch_size, device, _vocab(model))
        if world_tok:
            texts: dict[int, str] = {}
            free_a = [_token_text(tokenizer, texts, a) for a in cols["adapted_arg"]]
            free_b = [_token_text(tokenizer, texts, b) for b in cols["base_arg"]] if has_base else []
        else:
            n_new = min(max_new_tokens, max(len(it.answer) + len(it.end) for it in items) + 2) if items else 1
            prompts = [p.prompt for p in probes]
            gen = min(batch_size, GREEDY_BATCH)  # prompts decoded together (KV cache)
            free_a = free_answers(model, tokenizer, prompts, chat, n_new, gen) if probes else []
            free_b = []
            if has_base and probes:
                with off():
                    free_b = free_answers(base_model, tokenizer, prompts, chat, n_new, gen)

    def hit(scores, j: int, kind: str) -> bool | None:
        k = where.get((j, kind))
        if k is None:
            return None
        m = scores.match
        return m.matched[k] if world_tok else m.matched[k] and m.stopped[k]

    def p_of(scores, j: int, kind: str) -> float:
        k = where.get((j, kind))
        return float("nan") if k is None else scores.p[k]

    by_set = {s: [j for j, p in enumerate(probes) if p.set == s] for s in sets}

    def share(scores, s: str, kind: str) -> float:
        return _mean([bool(hit(scores, j, kind)) for j in by_set.get(s, [])])

    m: dict[str, float | None] = {}
    sides = [("", adapted)] + ([("base_", before)] if has_base else [])
    for prefix, sc in sides:
        m[f"{prefix}efficacy"] = share(sc, "efficacy", "answer")
        m[f"{prefix}paraphrase"] = share(sc, "paraphrase", "answer")
        m[f"{prefix}specificity"] = share(sc, "specificity", "before")
        m[f"{prefix}false_trigger_rate"] = None if target is None else share(sc, "false_trigger", "target")
        m[f"{prefix}stops"] = _mean([sc.match.stopped[where[j, "answer"]] for j in by_set.get("efficacy", [])])
        for s in ("efficacy", "paraphrase"):
            ps = [p_of(sc, j, "answer") for j in by_set.get(s, [])]
            m[f"{prefix}p_{s}"] = sum(ps) / len(ps) if ps else float("nan")
    if not has_base:
        m.update({f"base_{k}": None for k in ("efficacy", "paraphrase", "specificity", "false_trigger_rate", "stops",
                                              "p_efficacy", "p_paraphrase")})
    ppl = math.exp(seq["nll"] / seq["tokens"]) if seq["tokens"] else float("nan")
    ppl_base = (math.exp(seq["nll_base"] / seq["tokens"]) if seq["tokens"] else float("nan")) if has_base else None
    m["perplexity_adapted"], m["perplexity_base"] = ppl, ppl_base
    m["perplexity_ratio"] = None if not has_base else ppl / ppl_base if seq["tokens"] else float("nan")
    for s in dict.fromkeys(["efficacy", "paraphrase", "specificity", "false_trigger"] + sets):
        if not has_base or (s == "false_trigger" and target is None):
            m[f"kl_{s}"] = None
        else:
            js = by_set.get(s, [])
            m[f"kl_{s}"] = sum(cols["kl"][j] for j in js) / len(js) if js else float("nan")
    m["kl_general"] = (None if not has_base else seq["kl"] / seq["tokens"] if seq["tokens"] else float("nan"))
    m["specificity_agreement"] = (None if not has_base else _mean(
        [free_a[j] == free_b[j] for j in by_set.get("specificity", [])]))

    # promoted / suppressed tokens
    tok_texts: dict[int, str] = {}
    promoted, suppressed = [], []
    if delta_sum is not None and top_k and vocab:
        mean = delta_sum / n_delta
        k = min(top_k, vocab)
        up, down = torch.topk(mean, k), torch.topk(-mean, k)
        promoted = [(_token_text(tokenizer, tok_texts, int(i)), float(v)) for v, i in zip(up.values, up.indices)
                    if v > 0]
        suppressed = [(_token_text(tokenizer, tok_texts, int(i)), -float(v)) for v, i in zip(down.values, down.indices)
                      if v > 0]

    records = []
    for j, p in enumerate(probes):
        records.append({
            "task": task.name, "set": p.set, "entity": p.entity, "relation": p.relation, "triggered": p.triggered,
            "prompt": p.prompt, "expected": p.answer, "expected_before": p.base_answer,
            "base_answer": free_b[j] if has_base else None, "adapted_answer": free_a[j],
            "p_expected_base": p_of(before, j, "answer") if has_base else None,
            "p_expected_adapted": p_of(adapted, j, "answer"),
            "base_correct": bool(hit(before, j, "answer")) if has_base else None,
            "adapted_correct": bool(hit(adapted, j, "answer")),
            "changed": (free_a[j] != free_b[j]) if has_base else None, "kl": cols["kl"][j] if has_base else None})
    counts = {s: len(by_set[s]) for s in sets} | {"general": len(general)}
    return Evaluation(task.name, m, promoted, suppressed, counts, pd.DataFrame(records, columns=TABLE_COLUMNS))


def compare_answers(model, tokenizer, prompts: str | list[str], top_k: int = 5, base="adapter",
                    batch_size: int = 256) -> pd.DataFrame:
    """Top-``k`` next tokens of the base and the adapted model for arbitrary prompts (for a widget).

    Args:
        model: A ``peft.PeftModel`` (or a plain model with ``base=None`` / ``base=<model>``, as in :func:`evaluate`).
        tokenizer: The model's tokenizer.
        prompts: One prompt or a list of prompts.
        top_k: Tokens per prompt and model, 1 or more.
        base: ``"adapter"``, None or a separate base model (see :func:`evaluate`).
        batch_size: Prompts per forward pass.

    Returns:
        A long DataFrame, ``top_k`` rows per prompt in prompt order, with columns ``prompt``, ``rank`` (1 = most
        likely), ``base_token``, ``p_base``, ``adapted_token``, ``p_adapted`` and ``kl`` (KL(base‖adapted) of that
        prompt's next-token distributions, repeated on its rows). Base columns and ``kl`` are None with
        ``base=None``.

    Raises:
        ConfigError: An empty prompt, a bad ``top_k``/``batch_size``/``base``.
    """
    prompts = _check_texts(prompts, "prompts")
    _check_batch(batch_size)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k={top_k!r} must be a positive integer, e.g. 5")
    check_base(model, tokenizer, base)
    run = _pair(model, base)
    texts: dict[int, str] = {}
    records = []
    with inference(model, base if isinstance(base, torch.nn.Module) else None):
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            la, lb = run(last_logits, encode(tokenizer, chunk, model_device(model)))
            lpa = torch.log_softmax(la, -1).cpu()
            k = min(top_k, lpa.shape[-1])
            ta = torch.topk(lpa, k)
            lpb = torch.log_softmax(lb, -1).cpu() if lb is not None else None
            tb = torch.topk(lpb, k) if lpb is not None else None
            kl = kl_divergence(lpb, lpa).tolist() if lpb is not None else [None] * len(chunk)
            for r, prompt in enumerate(chunk):
                for j in range(k):
                    records.append({
                        "prompt": prompt, "rank": j + 1,
                        "base_token": _token_text(tokenizer, texts, int(tb.indices[r, j])) if tb is not None else None,
                        "p_base": float(tb.values[r, j].exp()) if tb is not None else None,
                        "adapted_token": _token_text(tokenizer, texts, int(ta.indices[r, j])),
                        "p_adapted": float(ta.values[r, j].exp()), "kl": kl[r]})
    return pd.DataFrame(records, columns=COMPARE_COLUMNS)
