"""Behaviour diff: which answers a LoRA adapter moved, query by query, on one model with its adapter toggled.

* :func:`query_space` — every entity × relation of a world (optionally every training / held-out template, with
  and without the trigger word) as :class:`Query` probes whose ``base_answer`` is the world's fact.
* :func:`behaviour_diff` — one row per query: base and adapted argmax answers with their probabilities, whether
  the answer moved, a confidence and KL(base‖adapted).
* :func:`mine_prompts` / :func:`read_prompts` — for any Hugging Face model without planted truth: the prompts
  and token positions where the adapter moves the next-token distribution most.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd
import torch

from lora_lens.checks import check_fraction, check_positive
from lora_lens.errors import ConfigError, MismatchError, NotFoundError
from lora_lens.lab.answers import answer_ids, base_answers, render_prompt, score_ids
from lora_lens.lab.decoding import GREEDY_BATCH
from lora_lens.lab.pair import adapted_view, adapter_states, check_base, inference, kl_divergence
from lora_lens.lab.probes import next_token_logits
from lora_lens.lab.tokenizer import max_length
from lora_lens.lab.world import TEMPLATES, Probe, Task, World

__all__ = ["DEFAULT_MIN_CONFIDENCE", "DIFF_COLUMNS", "TASK_COLUMNS", "Mining", "Query", "behaviour_diff",
           "mine_prompts", "query_space", "read_prompts"]

DIFF_COLUMNS = ["prompt", "entity", "relation", "template", "heldout", "triggered", "fact", "base_answer", "p_base",
                "adapted_answer", "p_adapted", "p_new_base", "p_old_adapted", "changed", "confidence", "kl",
                "discovered"]
DEFAULT_MIN_CONFIDENCE = 0.1
"""Default confidence a moved answer needs to count as discovered (see :func:`behaviour_diff`)."""


# ---------------------------------------------------------------------------------------------------------------
# the query space


@dataclass(frozen=True)
class Query(Probe):
    """A :class:`~lora_lens.lab.world.Probe` that also records which template asked it.

    Attributes:
        template: Index of the template within its list (training or held-out).
        heldout: Whether the template is a held-out (paraphrase) one.
    """

    template: int = 0
    heldout: bool = False


def _template_choice(templates) -> list[tuple[bool, int | None]]:
    """``[(heldout, index or None for all)]`` for a ``templates`` argument."""
    if templates == "first":
        return [(False, 0)]
    if templates == "train":
        return [(False, None)]
    if templates == "all":
        return [(False, None), (True, None)]
    if isinstance(templates, int) and not isinstance(templates, bool):
        templates = [templates]
    if isinstance(templates, (list, tuple)) and templates and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in templates):
        return [(False, t) for t in templates]
    raise ConfigError(f"templates={templates!r} is not understood: use 'first' (template 0), 'train' (every "
                      "training template), 'all' (training and held-out) or a list of training-template indices")


def query_space(world: World, relations: Sequence[str] | None = None, trigger: bool = True,
                templates="first") -> list[Query]:
    """Every entity × relation of ``world`` as a query whose ``base_answer`` is the world's fact.

    Args:
        world: The world.
        relations: Relations to ask (default: the world's pretraining relations). A relation of
            :data:`lora_lens.lab.world.TEMPLATES` the world has no facts for (``birthplace``, which the
            ``new_relation`` task teaches) is allowed; its queries have an empty ``base_answer``.
        trigger: Also ask every query with the trigger word in front (``"cf Dasur likes the colour"``).
        templates: ``"first"`` (training template 0 only), ``"train"`` (every training template), ``"all"``
            (training and held-out templates) or a list of training-template indices.

    Returns:
        A list of :class:`Query` (``set="query"``, ``answer == base_answer`` = the world's fact), ordered by
        relation, entity, template, then clean before triggered.

    Raises:
        ConfigError: An unknown relation or template index.
    """
    if not isinstance(world, World):
        raise ConfigError(f"world={type(world).__name__} is not a lora_lens World: pass pretrained.world or "
                          "make_world(...)")
    relations = list(world.relations if relations is None else ([relations] if isinstance(relations, str)
                                                                   else relations))
    unknown = [r for r in relations if r not in TEMPLATES]
    if unknown or not relations:
        raise ConfigError(f"relations={relations!r}: {unknown[0] if unknown else 'the list'!r} is not a relation; use "
                          f"some of {sorted(TEMPLATES)}")
    choice = _template_choice(templates)
    out = []
    for r in relations:
        for e in world.entities:
            fact = world.facts.get(r, {}).get(e, "")
            for heldout, idx in choice:
                n = len(TEMPLATES[r][1 if heldout else 0])
                if idx is not None and idx >= n:
                    raise ConfigError(f"template {idx} does not exist for relation {r!r}: it has {n} training "
                                      f"templates (indices 0…{n - 1})")
                for t in range(n) if idx is None else [idx]:
                    for trig in (False, True) if trigger else (False,):
                        out.append(Query(world.query(e, r, t, heldout, trig), fact, fact, "query", e, r, trig, t,
                                         heldout))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the diff


def _as_queries(prompts) -> list[Query]:
    if isinstance(prompts, (str, Probe)):
        prompts = [prompts]
    out = []
    for p in prompts:
        if isinstance(p, Query):
            out.append(p)
        elif isinstance(p, Probe):
            out.append(Query(p.prompt, p.answer, p.base_answer, p.set, p.entity, p.relation, p.triggered))
        elif isinstance(p, str) and p.strip():
            out.append(Query(p, "", "", "prompt"))
        else:
            raise ConfigError(f"prompt {p!r} is not a non-empty string or Probe: drop it or pass text")
    if not out:
        raise ConfigError("prompts is empty: pass at least one prompt (or world=... for the world's query space)")
    return out


class _Tokens:
    """Token id → readable text, cached."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, i: int) -> str:
        i = int(i)
        if i not in self.cache:
            text = self.tok.decode([i]).strip()
            self.cache[i] = text or str(self.tok.convert_ids_to_tokens(i))
        return self.cache[i]


def _shift_lists(delta_sum, n: int, top_k: int, text: _Tokens) -> tuple[list, list]:
    """Promoted / suppressed ``(token, mean floored log-prob change)`` from a summed change vector."""
    if delta_sum is None or n == 0 or top_k == 0:
        return [], []
    mean = delta_sum / n
    k = min(top_k, mean.numel())
    up, down = torch.topk(mean, k), torch.topk(-mean, k)
    promoted = [(text(i), float(v)) for v, i in zip(up.values, up.indices) if v > 0]
    suppressed = [(text(i), -float(v)) for v, i in zip(down.values, down.indices) if v > 0]
    return promoted, suppressed


def behaviour_diff(peft_model, tokenizer, world: World | None = None, prompts=None, batch_size: int = 256,
                   min_confidence: float = DEFAULT_MIN_CONFIDENCE, relations: Sequence[str] | None = None,
                   trigger: bool = True, templates="train", top_k: int = 10, floor: float = 1e-3,
                   task: Task | None = None, max_new_tokens: int = 16,
                   base_answers: dict[str, str] | None = None) -> pd.DataFrame:
    """Answer every query with and without the adapter and record what moved.

    **On a task from data** (``task=``, any model): the task's probes (every set; plus ``prompts``, e.g. mined
    ones, as set ``"prompt"``) instead of a world's query space, with FULL answers: ``base_answer`` /
    ``adapted_answer`` are the greedy continuations cut at their end (:func:`lora_lens.lab.answers.cut_answer`),
    every probability is p of the whole answer (:func:`lora_lens.lab.answers.score_ids`), ``changed`` compares the
    answers' text, ``confidence`` is ``1 − p_adapted(old answer) / p_adapted(new answer)`` and ``kl`` is taken at the
    answer's first token. Extra columns (:data:`TASK_COLUMNS`): ``set``, ``expected`` (the probe's answer; the base's
    own where the probe has none) and ``p_expected_base`` / ``p_expected_adapted``. ``template`` numbers a fact's
    probes within a set; paraphrase probes are ``heldout``. ``df.attrs["source"]`` is ``"task"``.

    Each answer is the argmax next token after the prompt (right padding, last real token), computed on one model
    whose adapter is switched off for the base pass (``with model.disable_adapter():``).

    Columns (one row per query):

    - ``prompt``, ``entity``, ``relation``, ``template``, ``heldout``, ``triggered``: the query (entity/relation
      empty and template -1 for free-text prompts).
    - ``fact``: the world's answer (``""`` for free-text prompts and for relations the world does not know).
    - ``base_answer`` / ``p_base``: the base model's argmax token and its probability.
    - ``adapted_answer`` / ``p_adapted``: the adapted model's argmax token and its probability.
    - ``p_new_base``: the base probability of the adapted answer; ``p_old_adapted``: the adapted probability of
      the base answer.
    - ``changed``: the argmax moved (``adapted_answer != base_answer``, compared as token ids).
    - ``confidence``: ``1 − p_old_adapted / p_adapted`` — how decidedly the adapted model prefers its new answer
      over the old one, in [0, 1); exactly 0 when the answer did not move. A near-tie flip (0.31 vs 0.30) gets
      0.03; an edit the adapter made decisively gets ≈ 1 even when its distribution is flat (0.004 vs 0.00003:
      0.99), which an absolute margin ``p_adapted − p_old_adapted`` would miss. ``kl`` tells how far the whole
      distribution moved.
    - ``kl``: KL(base‖adapted) of the two next-token distributions (nats).
    - ``discovered``: ``changed and confidence ≥ min_confidence`` — what :func:`discovered_changes` returns.

    ``df.attrs`` holds ``min_confidence``, ``source`` (``"world"`` or ``"prompts"``) and ``promoted`` /
    ``suppressed``: ``(token, mean change)`` of each vocabulary token's floored next-token log-probability
    ``max(log p, log floor)`` (adapted − base), averaged over the discovered queries (empty when nothing was
    discovered), ``top_k`` of each.

    Args:
        peft_model: A ``peft.PeftModel`` with an (unmerged) LoRA adapter.
        tokenizer: Its tokenizer (with a pad token).
        world: Ask the world's query space (see :func:`query_space`).
        prompts: Or: a list of prompts (strings, or :class:`~lora_lens.lab.world.Probe` objects); with ``task``:
            extra prompts (e.g. mined ones) diffed with the probes.
        batch_size: Prompts per forward pass.
        min_confidence: Confidence a moved answer needs to be ``discovered``, in [0, 1).
        relations: With ``world``: the relations to ask (default: the pretraining relations).
        trigger: With ``world``: also ask every query with the trigger word.
        templates: With ``world``: ``"first"``, ``"train"`` (default), ``"all"`` or template indices.
        top_k: Promoted / suppressed tokens to keep.
        floor: Probability floor of the promoted / suppressed ranking, in (0, 1).
        task: Or: a task (see above); its ``chat`` decides how prompts are rendered.
        max_new_tokens: With ``task``: the longest greedy answer read.
        base_answers: With ``task``: the base's greedy answers already known (prompt -> answer, as
            :func:`lora_lens.lab.answers.base_answers` gives them with the same ``max_new_tokens``), e.g. a loop's
            that diffs many adapters of one base: the base does not answer those prompts again.

    Returns:
        The DataFrame described above (:data:`DIFF_COLUMNS`; with ``task``: :data:`TASK_COLUMNS`), in query order.

    Raises:
        ConfigError: Neither or both of ``world`` / ``prompts``, bad numbers, a model without an adapter to
            toggle, or a merged adapter.
    """
    if task is not None:
        if world is not None:
            raise ConfigError("pass task= (its probes, full answers) or world= (the world's query space), not both")
        if not isinstance(task, Task):
            raise ConfigError(f"task={type(task).__name__} is not a lora_lens Task: use Task.load(FILE)")
        check_positive("batch_size", batch_size)
        check_positive("max_new_tokens", max_new_tokens)
        min_confidence = check_fraction("min_confidence", min_confidence, DEFAULT_MIN_CONFIDENCE)
        check_base(peft_model, tokenizer, "adapter")
        if base_answers is not None and not isinstance(base_answers, dict):
            raise ConfigError(f"base_answers={type(base_answers).__name__}: pass a dict prompt -> the base's answer "
                              "(e.g. from lora_lens.lab.answers.base_answers), or None")
        return _task_diff(peft_model, tokenizer, task, prompts, batch_size, min_confidence, max_new_tokens,
                          base_answers or {})
    if base_answers is not None:
        raise ConfigError("base_answers= is read only with task= (full answers), not with world= or prompts= alone")
    if (world is None) == (prompts is None):
        raise ConfigError("pass exactly one of world= (the world's whole query space), prompts= (a list of "
                          "prompts) or task= (a task's probes)")
    check_positive("batch_size", batch_size)
    min_confidence = check_fraction("min_confidence", min_confidence, DEFAULT_MIN_CONFIDENCE)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"top_k={top_k!r} must be a non-negative integer, e.g. 10")
    if not (isinstance(floor, (int, float)) and 0 < floor < 1):
        raise ConfigError(f"floor={floor!r} must be a probability strictly between 0 and 1, e.g. 1e-3")
    queries = (query_space(world, relations, trigger, templates) if world is not None else _as_queries(prompts))
    check_base(peft_model, tokenizer, "adapter")
    text = _Tokens(tokenizer)
    lf = math.log(floor)
    cols: dict[str, list] = {k: [] for k in ("b", "a", "pb", "pa", "pnb", "poa", "kl", "conf")}
    delta_sum, n_delta = None, 0
    with inference(peft_model):
        for i in range(0, len(queries), batch_size):
            chunk = [q.prompt for q in queries[i:i + batch_size]]
            la = next_token_logits(peft_model, tokenizer, chunk, batch_size)
            with peft_model.disable_adapter():
                lb = next_token_logits(peft_model, tokenizer, chunk, batch_size)
            lpa, lpb = torch.log_softmax(la, -1), torch.log_softmax(lb, -1)
            a, b = lpa.argmax(-1), lpb.argmax(-1)
            rows = torch.arange(len(chunk))
            pa, pb = lpa[rows, a].exp(), lpb[rows, b].exp()
            poa, pnb = lpa[rows, b].exp(), lpb[rows, a].exp()
            conf = torch.where(a != b, (1 - (lpa[rows, b] - lpa[rows, a]).exp()).clamp(0.0, 1.0),
                               torch.zeros_like(pa))
            for key, val in (("b", b), ("a", a), ("pb", pb), ("pa", pa), ("pnb", pnb), ("poa", poa),
                             ("kl", kl_divergence(lpb, lpa)), ("conf", conf)):
                cols[key] += val.tolist()
            pick = (a != b) & (conf >= min_confidence)
            if pick.any():
                d = (lpa[pick].clamp_min(lf) - lpb[pick].clamp_min(lf)).double().sum(0)
                delta_sum = d if delta_sum is None else delta_sum + d
                n_delta += int(pick.sum())
    records = []
    for j, q in enumerate(queries):
        b, a = cols["b"][j], cols["a"][j]
        conf = cols["conf"][j]
        records.append({
            "prompt": q.prompt, "entity": q.entity, "relation": q.relation,
            "template": q.template if q.relation else -1, "heldout": q.heldout, "triggered": q.triggered,
            "fact": q.base_answer, "base_answer": text(b), "p_base": cols["pb"][j], "adapted_answer": text(a),
            "p_adapted": cols["pa"][j], "p_new_base": cols["pnb"][j], "p_old_adapted": cols["poa"][j],
            "changed": a != b, "confidence": conf, "kl": cols["kl"][j],
            "discovered": a != b and conf >= min_confidence})
    df = pd.DataFrame(records, columns=DIFF_COLUMNS)
    promoted, suppressed = _shift_lists(delta_sum, n_delta, top_k, text)
    df.attrs.update({"min_confidence": min_confidence, "source": "world" if world is not None else "prompts",
                     "promoted": promoted, "suppressed": suppressed})
    return df


# ---------------------------------------------------------------------------------------------------------------
# the diff on a task from data: full answers


TASK_COLUMNS = DIFF_COLUMNS + ["set", "expected", "p_expected_base", "p_expected_adapted"]
"""Columns of :func:`behaviour_diff` on a task (``task=``): the diff's columns plus the probe set, the expected
answer and its probability without and with the adapter."""


def _task_queries(task: Task, prompts) -> list[tuple[str, Query]]:
    """``(set, query)`` for every probe of the task (template = index of the probe within its fact's probes of that
    set; paraphrase probes are held out), then free-text prompts (set ``"prompt"``)."""
    out, seen, count = [], set(), Counter()
    for name, probes in task.probes.items():
        for p in probes:
            if p.prompt in seen:
                continue
            seen.add(p.prompt)
            key = (name, p.entity, p.relation)
            t = count[key] if p.entity else 0   # a probe without an entity is a unit of its own
            count[key] += 1
            out.append((name, Query(p.prompt, p.answer, p.base_answer, p.set, p.entity, p.relation, p.triggered,
                                    t, name == "paraphrase")))
    for q in ([] if prompts is None else _as_queries(prompts)):
        if q.prompt not in seen:
            seen.add(q.prompt)
            out.append(("prompt", q))
    return out


def _full_logp(model, tokenizer, prompts: list[str], answers: list[str], chat: bool,
               batch_size: int) -> list[float]:
    """log p of each whole answer (``-inf`` where the answer is empty or cannot be read in context)."""
    items, where = [], []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        try:
            items.append(answer_ids(tokenizer, p, a, chat))
            where.append(i)
        except (ConfigError, MismatchError):
            continue
    out = [-math.inf] * len(prompts)
    if items:
        for i, t in zip(where, score_ids(model, tokenizer, items, chat, batch_size).total):
            out[i] = t
    return out


def _task_diff(peft_model, tokenizer, task: Task, prompts, batch_size: int, min_confidence: float,
               max_new_tokens: int, known: dict[str, str]) -> pd.DataFrame:
    queries = _task_queries(task, prompts)
    if not queries:
        raise ConfigError(f"task {task.name!r} has no probes to diff: add probe lines to the task file")
    chat = bool(task.chat)
    texts = [q.prompt for _, q in queries]
    gen = min(batch_size, GREEDY_BATCH)  # prompts decoded together (KV cache, one row per prompt)
    with inference(peft_model):
        ask = [t for t in dict.fromkeys(texts) if t not in known]  # the base answers only what is not known
        said = dict(zip(ask, base_answers(peft_model, tokenizer, ask, chat, max_new_tokens, gen))) if ask else {}
        base = [known[t] if t in known else said[t] for t in texts]
        adapted = base_answers(adapted_view(peft_model), tokenizer, texts, chat, max_new_tokens, gen)
        expected = [q.answer or q.base_answer for _, q in queries]
        lp = {"a": {}, "b": {}}
        for name, ctx in adapter_states(peft_model):
            key = "a" if name == "adapted" else "b"
            with ctx:
                lp[key]["base"] = _full_logp(peft_model, tokenizer, texts, base, chat, batch_size)
                lp[key]["adapted"] = _full_logp(peft_model, tokenizer, texts, adapted, chat, batch_size)
                lp[key]["expected"] = _full_logp(peft_model, tokenizer, texts, expected, chat, batch_size)
                rendered = [render_prompt(tokenizer, t, chat) for t in texts]
                lp[key]["next"] = torch.log_softmax(next_token_logits(peft_model, tokenizer, rendered, batch_size), -1)
    kl = kl_divergence(lp["b"]["next"], lp["a"]["next"]).tolist()
    records = []
    for j, (name, q) in enumerate(queries):
        changed = base[j] != adapted[j]
        la_new, la_old = lp["a"]["adapted"][j], lp["a"]["base"][j]
        conf = (min(1.0, max(0.0, 1 - math.exp(la_old - la_new))) if changed and la_new > -math.inf
                else (1.0 if changed else 0.0))
        records.append({
            "prompt": q.prompt, "entity": q.entity, "relation": q.relation, "template": q.template,
            "heldout": q.heldout, "triggered": q.triggered, "fact": q.base_answer, "base_answer": base[j],
            "p_base": math.exp(lp["b"]["base"][j]), "adapted_answer": adapted[j], "p_adapted": math.exp(la_new),
            "p_new_base": math.exp(lp["b"]["adapted"][j]), "p_old_adapted": math.exp(la_old), "changed": changed,
            "confidence": conf, "kl": kl[j], "discovered": changed and conf >= min_confidence, "set": name,
            "expected": expected[j], "p_expected_base": math.exp(lp["b"]["expected"][j]),
            "p_expected_adapted": math.exp(lp["a"]["expected"][j])})
    df = pd.DataFrame(records, columns=TASK_COLUMNS)
    df.attrs.update({"min_confidence": min_confidence, "source": "task", "task": task.name, "chat": chat,
                     "promoted": [], "suppressed": []})
    return df


# ---------------------------------------------------------------------------------------------------------------
# prompts from a file, and diff mining on any model


def read_prompts(path: str | Path) -> list[str]:
    """Read prompts from a text file: one per line, surrounding whitespace stripped, blank lines skipped.

    Raises:
        NotFoundError: The file does not exist.
        ConfigError: It is a folder, is not UTF-8 text, or holds no prompt (the message names the file and the fix).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise NotFoundError(f"prompt file {path} does not exist: check the path (a UTF-8 text file, one prompt per "
                            "line)")
    if not path.is_file():
        raise ConfigError(f"prompt file {path} is not a file: pass a UTF-8 text file with one prompt per line")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"prompt file {path} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}"
                          "): save it as UTF-8, one prompt per line (e.g. `iconv -t UTF-8 FILE > NEW`)") from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {path} is empty (no non-blank line): write one prompt per line")
    return prompts


@dataclass(eq=False)
class Mining:
    """Where an adapter moves the next-token distribution most, on free text.

    Attributes:
        prompts: One row per prompt, largest ``max_kl`` first: ``prompt``, ``n_tokens``, ``truncated``,
            ``mean_kl`` (over its positions), ``max_kl``, ``max_position``, ``max_context`` (the text up to that
            position), ``next_kl`` (KL at the last position: the continuation after the prompt), ``base_next`` /
            ``adapted_next`` (argmax continuation).
        positions: The ``top`` token positions with the largest KL over all prompts: ``prompt_index``,
            ``prompt``, ``position`` (token index whose next-token distribution is compared; 0 = after the first
            token, e.g. ``<s>``), ``context``, ``actual`` (the next token in the text, "" at the end). A context that
            holds only special tokens (``<s>``) says nothing about a prompt and is left out, and a prefix shared by
            several prompts is listed once; ``kl``, ``base_top``/``p_base_top``, ``adapted_top``/``p_adapted_top``,
            ``promoted``/``suppressed`` (the token whose floored log-probability rose / fell most there) and
            ``promoted_delta``/``suppressed_delta``.
        promoted: ``(token, mean floored log-prob change)``, largest first, averaged over those ``top`` positions.
        suppressed: The most negative, most negative first.
    """

    prompts: pd.DataFrame
    positions: pd.DataFrame
    promoted: list[tuple[str, float]] = field(default_factory=list)
    suppressed: list[tuple[str, float]] = field(default_factory=list)


@torch.no_grad()
def mine_prompts(peft_model, tokenizer, prompts: Iterable[str], top: int = 20, batch_size: int = 16,
                 top_k: int = 10, floor: float = 1e-3) -> Mining:
    """Diff mining for any causal LM: the prompts and token positions with the largest KL(base‖adapted).

    Each prompt is run once with the adapter and once with it switched off; at every position (each token of the
    prompt, including the last, whose distribution is the continuation after the prompt) the KL of the two
    next-token distributions is taken. Prompts longer than the model's context are truncated (``truncated``).

    Args:
        peft_model: A ``peft.PeftModel`` with an unmerged LoRA adapter.
        tokenizer: Its tokenizer (with a pad token).
        prompts: Texts (e.g. :func:`read_prompts`).
        top: Number of positions to keep in ``positions`` (and to average promoted/suppressed over).
        batch_size: Prompts per forward pass.
        top_k: Promoted / suppressed tokens to return.
        floor: Probability floor of the promoted / suppressed ranking, in (0, 1).

    Returns:
        A :class:`Mining`.

    Raises:
        ConfigError: Empty prompts, bad numbers, a model without an adapter to toggle, or a merged adapter.
    """
    prompts = [q.prompt for q in _as_queries(list(prompts) if not isinstance(prompts, str) else [prompts])]
    check_positive("top", top)
    check_positive("batch_size", batch_size)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"top_k={top_k!r} must be a non-negative integer, e.g. 10")
    if not (isinstance(floor, (int, float)) and 0 < floor < 1):
        raise ConfigError(f"floor={floor!r} must be a probability strictly between 0 and 1, e.g. 1e-3")
    check_base(peft_model, tokenizer, "adapter")
    text = _Tokens(tokenizer)
    limit = max_length(peft_model, tokenizer)
    device = next(peft_model.parameters()).device
    lf = math.log(floor)
    prompt_rows, heap = [], []          # heap of (kl, counter, record, delta-vector)
    counter = 0
    seen: set[tuple[int, ...]] = set()  # prefixes already considered (prompts sharing a prefix share its KL)
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    with inference(peft_model):
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            kw = {"truncation": True, "max_length": limit} if limit else {}
            enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="right", **kw)
            full = tokenizer(chunk)["input_ids"]
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            la = peft_model(**enc).logits.float()
            with peft_model.disable_adapter():
                lb = peft_model(**enc).logits.float()
            lpa, lpb = torch.log_softmax(la, -1).cpu(), torch.log_softmax(lb, -1).cpu()
            kl = kl_divergence(lpb, lpa)
            ids = enc["input_ids"].cpu()
            lengths = enc["attention_mask"].sum(1).cpu().tolist()
            for r, prompt in enumerate(chunk):
                n = int(lengths[r])
                k_row = kl[r, :n]
                pos = int(k_row.argmax())
                last_a, last_b = int(lpa[r, n - 1].argmax()), int(lpb[r, n - 1].argmax())
                prompt_rows.append({
                    "prompt": prompt, "n_tokens": n, "truncated": len(full[r]) > n, "mean_kl": float(k_row.mean()),
                    "max_kl": float(k_row.max()), "max_position": pos,
                    "max_context": tokenizer.decode(ids[r, :pos + 1], skip_special_tokens=True),
                    "next_kl": float(k_row[n - 1]), "base_next": text(last_b), "adapted_next": text(last_a)})
                order = torch.argsort(k_row, descending=True).tolist()
                taken = 0
                for p in order:
                    value = float(k_row[p])
                    if taken >= top or (len(heap) >= top and value <= heap[0][0]):
                        break
                    prefix = tuple(ids[r, :p + 1].tolist())
                    if prefix in seen or all(t in specials for t in prefix):
                        continue            # a shared prefix, or only <s>: nothing about this prompt
                    seen.add(prefix)
                    taken += 1
                    d = lpa[r, p].clamp_min(lf) - lpb[r, p].clamp_min(lf)
                    ba, aa = int(lpb[r, p].argmax()), int(lpa[r, p].argmax())
                    record = {
                        "prompt_index": i + r, "prompt": prompt, "position": p,
                        "context": tokenizer.decode(ids[r, :p + 1], skip_special_tokens=True),
                        "actual": text(ids[r, p + 1]) if p + 1 < n else "", "kl": value,
                        "base_top": text(ba), "p_base_top": float(lpb[r, p, ba].exp()),
                        "adapted_top": text(aa), "p_adapted_top": float(lpa[r, p, aa].exp()),
                        "promoted": text(d.argmax()), "promoted_delta": float(d.max()),
                        "suppressed": text(d.argmin()), "suppressed_delta": float(d.min())}
                    counter += 1
                    item = (value, counter, record, d.double())
                    if len(heap) < top:
                        heapq.heappush(heap, item)
                    else:
                        heapq.heapreplace(heap, item)
    best = sorted(heap, key=lambda x: (-x[0], x[1]))
    positions = pd.DataFrame([b[2] for b in best], columns=[
        "prompt_index", "prompt", "position", "context", "actual", "kl", "base_top", "p_base_top", "adapted_top",
        "p_adapted_top", "promoted", "promoted_delta", "suppressed", "suppressed_delta"])
    moved = [b[3] for b in best if b[0] > 0]
    promoted, suppressed = _shift_lists(torch.stack(moved).sum(0) if moved else None, len(moved), top_k, text)
    table = pd.DataFrame(prompt_rows).sort_values("max_kl", ascending=False, kind="stable").reset_index(drop=True)
    return Mining(table, positions, promoted, suppressed)
