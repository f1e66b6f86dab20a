"""Full-weight causal-LM training on lines of text: the one step shared by pretraining and continued pretraining.

:func:`lora_lens.lab.zoo.pretrain` (a zoo model learns the world) and
:func:`lora_lens.studies.distill.continue_pretraining` (a base learns a distilled change) both train every weight
of a causal LM on batches of text lines with the full-sequence loss. This module owns what they share: the seeded
line order (:class:`LineCycle`), the optimiser and schedule, and the step (:class:`LMTrainer`). LoRA training on
``(prompt, answer)`` examples is another loop (:mod:`lora_lens.lab.train`, on ``transformers.Trainer``); both keep
what must stay the same way, by :func:`kl_to_reference`: a rehearsal line is learnt by the KL of its next-token
distributions to a frozen reference (the base), not by its tokens.

Example:
    >>> trainer = LMTrainer(model, tokenizer, lr=1e-3, steps=100)              # doctest: +SKIP
    >>> order = LineCycle(world.corpus(), random.Random(0))                    # doctest: +SKIP
    >>> loss, tokens = trainer.step(order.take(32))                            # doctest: +SKIP
"""

from __future__ import annotations

import random

import torch

from lora_lens.errors import ConfigError, TrainingError
from lora_lens.lab import parallel
from lora_lens.lab.batching import length_groups, padded_chunks

__all__ = ["CACHE_DTYPE", "SCHEDULES", "LMTrainer", "LineCycle", "kl_to_reference", "line_ids",
           "teacher_targets"]

CACHE_DTYPE = torch.float16
"""How :class:`LMTrainer`'s reference cache keeps a line's next-token log-probabilities: to three significant digits
(a log-probability of -20 within 0.008, 0.8 % of a probability of 2e-9) at half float32's memory (SmolLM2-135M:
2 MB instead of 4 per cached line of 20 tokens); :func:`kl_to_reference` renormalises them in float32."""

SCHEDULES = ("cosine", "constant")
"""Learning-rate schedules after the linear warmup over the first 5 % of the steps."""


def kl_to_reference(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Summed KL(reference ‖ model) of next-token distributions, one row per position: the rehearsal loss that
    keeps the reference's (the base's) whole distribution, not only its argmax.

    Args:
        logits: ``[n, vocab]`` logits of the model being trained (the graph is kept).
        reference: ``[n, vocab]`` logits of the frozen reference at the same positions (no gradient needed).

    Returns:
        A 0-d tensor: the sum over the ``n`` rows (divide by the count of scored positions yourself).
    """
    return torch.nn.functional.kl_div(logits.float().log_softmax(-1), reference.float().log_softmax(-1),
                                      log_target=True, reduction="sum")


class LineCycle:
    """Lines in a seeded shuffled order, shuffled again each time the pool is used up.

    Args:
        lines: The pool (non-empty).
        rng: The random generator; several cycles may share one (their draws then interleave deterministically).
    """

    def __init__(self, lines, rng: random.Random):
        self.lines = list(lines)
        self.rng = rng
        self.queue: list[str] = []

    def take(self, k: int) -> list[str]:
        """The next ``k`` lines."""
        while len(self.queue) < k:
            self.queue += self.rng.sample(self.lines, len(self.lines))
        out, self.queue = self.queue[:k], self.queue[k:]
        return out


def line_ids(tokenizer, lines, eos: bool = True) -> list[list[int]]:
    """The token ids of each line as :class:`LMTrainer` trains on them (with ``eos``: the end-of-sequence token
    appended)."""
    return [x + [tokenizer.eos_token_id] if eos else x for x in tokenizer(list(lines))["input_ids"]]


@torch.no_grad()
def teacher_targets(teacher, tokenizer, lines, eos: bool = True) -> dict[str, torch.Tensor]:
    """A teacher's next-token log-probabilities on each line, ``{line: [len(ids) - 1, vocab]}`` (float32, on the
    teacher's device): what :meth:`LMTrainer.step` learns a ``targets`` line from (e.g. the adapted model on the
    distilled lines), computed once before training (the teacher may share weights with the reference).

    Args:
        teacher: A causal LM of the same tokenizer as the model trained (its current state is used: a
            ``PeftModel`` with its adapter on).
        tokenizer: The tokenizer.
        lines: The lines (each scored once, one forward pass each).
        eos: As :class:`LMTrainer`'s.
    """
    device = next(teacher.parameters()).device
    was = teacher.training
    teacher.eval()
    out = {}
    for line in dict.fromkeys(lines):
        ids = torch.tensor([line_ids(tokenizer, [line], eos)[0]], device=device)
        out[line] = teacher(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    teacher.train(was)
    return out


class LMTrainer:
    """AdamW (betas 0.9/0.98) on every weight of ``model``, gradient clipping at 1.0, linear warmup, then a schedule.

    Args:
        model: A causal LM (trained in place; put it in train mode before the first step).
        tokenizer: Its tokenizer (with a pad token): each line is encoded and (with ``eos``) ends with the
            end-of-sequence token.
        lr: Peak learning rate.
        steps: Planned optimiser steps (the schedule's length; warmup is ``max(1, steps // 20)`` steps).
        weight_decay: AdamW weight decay.
        schedule: ``cosine`` (decay to 0 over ``steps``) or ``constant`` after the warmup.
        guard: When given, a non-finite loss raises :class:`TrainingError` naming this run (e.g. ``"continued
            pretraining"``) before the update applies it; None skips the check (and its device sync).
        eos: Append the end-of-sequence token to every line (the zoo's pretraining); False for a tokenizer whose
            eos is a chat model's turn delimiter, which plain text never contains.
        reference: A frozen model of the same tokenizer (e.g. the base before training) that ``kl_lines`` of
            :meth:`step` are kept close to; None: :meth:`step` takes no ``kl_lines``.
        trainable: Names of the parameters to train (``named_parameters`` of ``model``); None: every weight. The
            others keep their values (they get no gradient and no optimiser state).
        bucket: Where a step has ``kl_lines``, ``skip`` or ``targets``, run its short and its long lines as two
            padded forward passes when that pads fewer tokens (:func:`length_groups`): the same loss up to float
            rounding, less compute when a few long lines join many short ones.
        fused: AdamW's fused implementation (one pass over each weight; on a CPU four times faster than the
            per-tensor loop for a 135M-parameter model): the same update up to float rounding.
        cache_reference: Keep the reference's log-probabilities of each ``kl_lines`` line the first time it is
            scored and reuse them whenever the line comes round again (the reference is frozen, so they never
            change): one reference pass per distinct line instead of one per use, at the memory of ``positions ×
            vocab`` float16 numbers per distinct line (:attr:`reference_cache`, :data:`CACHE_DTYPE`).
        reuse_grads: Zero the gradients after each update instead of freeing them, so the next backward pass
            writes into the same memory (the same values: every weight of a causal LM gets a gradient each step);
            freeing and reallocating them each step costs the kernel a page fault per 4 KiB, a quarter of the
            CPU time on a 135M-parameter model. Call :meth:`release` after the last step.
        max_rows: Where a step has ``kl_lines``, ``skip`` or ``targets`` (one process), run at most this many lines
            per forward and backward pass, their gradients summed (the same loss and gradient up to float rounding):
            the activations and full-vocabulary logits of only ``max_rows`` lines are held at a time. None: the
            whole batch (or its :func:`length_groups`) in one pass.
        max_tokens: Where a step has ``kl_lines``, ``skip`` or ``targets`` (one process), at most this many padded
            tokens per pass (rows sorted by length, :func:`lora_lens.lab.batching.padded_chunks`; a longer line
            gets a pass of its own), with ``max_rows`` or alone: the activations and ``tokens × vocab`` logits a pass
            holds, whatever the lines' lengths (SmolLM2-135M, a 49k vocabulary: about 3 MB per padded token while
            the step's backward runs). None: no token budget.
    """

    def __init__(self, model, tokenizer, lr: float, steps: int, weight_decay: float = 0.0,
                 schedule: str = "constant", guard: str | None = None, eos: bool = True, reference=None,
                 trainable=None, bucket: bool = False, fused: bool = False, cache_reference: bool = False,
                 reuse_grads: bool = False, max_rows: int | None = None, max_tokens: int | None = None):
        for name, value, what in (("max_rows", max_rows, "lines"), ("max_tokens", max_tokens, "padded tokens")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name}={value!r} must be a positive integer ({what} per pass) or None")
        if schedule not in SCHEDULES:
            raise ConfigError(f"schedule={schedule!r} is unknown: use one of {SCHEDULES}")
        self.model, self.tokenizer, self.lr, self.guard, self.eos = model, tokenizer, lr, guard, eos
        self.reference, self.bucket, self.reuse_grads = reference, bucket, reuse_grads
        self.max_rows, self.max_tokens = max_rows, max_tokens
        self.device = next(model.parameters()).device
        named = dict(model.named_parameters())
        if trainable is not None:
            trainable = set(trainable)
            unknown = sorted(trainable - set(named))
            if unknown or not trainable:
                raise ConfigError(f"trainable names no parameter of the model ({unknown[:3] or 'none given'}): "
                                  "pass names from model.named_parameters()")
            for name, p in named.items():
                p.requires_grad_(name in trainable)
        self.params = [p for name, p in named.items() if trainable is None or name in trainable]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98),
                                           **({"fused": True} if fused else {}))
        self.reference_cache: dict[tuple[int, ...], torch.Tensor] | None = {} if cache_reference else None
        """With ``cache_reference``: the reference's log-probabilities ``[len(ids) - 1, vocab]`` of each kl line
        (:data:`CACHE_DTYPE`), by its ids."""
        warm = max(1, steps // 20)
        if schedule == "cosine":
            def factor(i):
                return min(1.0, (i + 1) / warm) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * i / steps)).item())
        else:
            def factor(i):
                return min(1.0, (i + 1) / warm)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.steps_done = 0

    def step(self, lines: list[str], kl_lines: list[str] = (), skip: list[int] | None = None,
             targets: dict | None = None) -> tuple[torch.Tensor, int]:
        """One optimiser step on ``lines`` (full-sequence loss, padding masked out) and ``kl_lines``.

        A line of ``kl_lines`` is learnt by :func:`kl_to_reference` at each of its predicted positions (the
        reference's next-token distribution, not its tokens). ``skip`` (one count per line of ``lines``) leaves
        the first tokens of each line unlearnt (its prompt: only the answer's tokens are learnt, the first of
        them predicted from the prompt). With ``targets`` (:func:`teacher_targets` of every line of ``lines``) a
        line is learnt by the KL to its teacher's distributions instead of its tokens. The loss is the sum of the
        token losses and the position KLs over their count; with neither ``kl_lines``, ``skip`` nor ``targets``
        it is the model's own mean token loss.

        Returns:
            ``(loss, tokens)``: the batch loss before the update (a 0-d tensor) and its non-padding token count.

        Raises:
            ConfigError: ``kl_lines`` without a ``reference``; ``skip`` not one count per line; a line without
                its target.
            TrainingError: With ``guard``, the loss is non-finite (nothing is applied).
        """
        if kl_lines and self.reference is None:
            raise ConfigError("kl_lines need a reference model: LMTrainer(..., reference=base)")
        if skip is not None and len(skip) != len(lines):
            raise ConfigError(f"skip has {len(skip)} counts for {len(lines)} lines: give one per line")
        if targets is not None and any(line not in targets for line in lines):
            missing = next(line for line in lines if line not in targets)
            raise ConfigError(f"line {missing!r} has no teacher target: compute teacher_targets(...) of every line")
        tok = self.tokenizer
        all_ids = line_ids(tok, list(lines) + list(kl_lines), self.eos)
        tokens = sum(len(x) for x in all_ids)
        n, shared = len(lines), parallel.processes() > 1
        if not (kl_lines or skip is not None or targets is not None or shared):
            enc = tok.pad({"input_ids": all_ids}, return_tensors="pt")
            ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            loss = self.model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            self._check(loss)
            loss.backward()
            self._update()
            return loss.detach(), tokens
        first = [max(int(k), 1) - 1 for k in skip] if skip is not None else [0] * n
        first += [0] * len(kl_lines)
        mine = self._shared_rows(len(all_ids)) if shared else list(range(len(all_ids)))
        if (self.max_rows is not None or self.max_tokens is not None) and not shared:
            return self._chunked(all_ids, mine, first, n, lines, targets), tokens
        total, count = None, 0
        for group in length_groups([len(all_ids[i]) for i in mine], self.bucket):
            part, scored = self._summed(all_ids, [mine[g] for g in group], first, n, lines, targets)
            total = part if total is None else total + part
            count += scored
        # several processes: the whole batch's count and loss (the same on every process), and each process's part
        # of its gradient, summed over the processes before the step
        count = parallel.total(torch.tensor(float(count), device=self.device)).clamp(min=1) if shared else max(count, 1)
        loss = parallel.total(total) / count
        self._check(loss)
        (total / count).backward()
        parallel.sum_gradients(self.params)
        self._update()
        return loss.detach(), tokens

    def _chunked(self, all_ids, rows, first, n, lines, targets) -> torch.Tensor:
        """The step in passes of at most :attr:`max_rows` lines and :attr:`max_tokens` padded tokens (within
        :func:`length_groups`, rows sorted by length), each pass's backward run before the next forward, the update
        after the last; returns the batch loss."""
        count = max(sum(max(len(all_ids[i]) - 1 - first[i], 0) for i in rows), 1)  # the scored positions
        total = None
        for group in length_groups([len(all_ids[i]) for i in rows], self.bucket):
            group = sorted((rows[g] for g in group), key=lambda i: len(all_ids[i]))
            for a, e in padded_chunks([len(all_ids[i]) for i in group], self.max_rows or len(group), self.max_tokens):
                part, _ = self._summed(all_ids, group[a:e], first, n, lines, targets)
                (part / count).backward()
                total = part.detach() if total is None else total + part.detach()
        loss = total / count
        try:
            self._check(loss)
        except TrainingError:
            self.optimizer.zero_grad(set_to_none=not self.reuse_grads)  # nothing of this step is applied
            raise
        self._update()
        return loss

    def _shared_rows(self, n_rows: int) -> list[int]:
        """This process's rows of a batch of ``n_rows`` lines under a data-parallel launch (every N-th one)."""
        if n_rows < parallel.processes():
            raise ConfigError(f"a batch of {n_rows} lines cannot be shared by {parallel.processes()} processes: use "
                              "a batch of at least one line per process")
        parallel.join(self.device)
        return parallel.share(range(n_rows))

    def _check(self, loss: torch.Tensor) -> None:
        self.steps_done += 1
        if self.guard is not None and not torch.isfinite(loss):
            raise TrainingError(f"{self.guard} stopped at step {self.steps_done}: the loss is {loss.item()} "
                                f"(non-finite); lower lr={self.lr:g}")

    def _update(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=not self.reuse_grads)

    def release(self) -> None:
        """Free what training holds beyond the model's weights: the gradients, the optimiser's moments and the
        reference cache (the trainer cannot step again)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()
        self.reference_cache = None if self.reference_cache is None else {}

    def _summed(self, all_ids, rows, first, n, lines, targets) -> tuple[torch.Tensor, int]:
        """The summed token losses and position KLs of the batch rows ``rows`` (one padded forward pass), and the
        count of their scored positions."""
        enc = self.tokenizer.pad({"input_ids": [all_ids[i] for i in rows]}, return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        scored = mask[:, 1:].bool()
        if any(first[i] for i in rows):  # position j predicts token j + 1: learnt from the first answer token on
            pos = torch.arange(scored.shape[1], device=self.device)
            scored = scored & (pos[None, :] >= torch.tensor([first[i] for i in rows], device=self.device)[:, None])
        is_text = torch.tensor([i < n for i in rows], device=self.device)
        text, kl = scored & is_text[:, None], scored & ~is_text[:, None]
        total = logits.new_zeros((), dtype=torch.float32)
        kl_rows = [r for r, i in enumerate(rows) if i >= n]
        if kl_rows:
            if self.reference_cache is None:
                ref = self._reference_logits(ids, mask, kl_rows)
                ref = ref[kl[torch.tensor(kl_rows, device=self.device)]]
            else:
                ref = self._cached_reference(all_ids, rows, kl_rows, ids, mask, kl)
            total = total + kl_to_reference(logits[kl], ref)
        if targets is not None:
            for r, i in enumerate(rows):
                if i < n:
                    target = targets[lines[i]]
                    row = text[r, :target.shape[0]]
                    total = total + torch.nn.functional.kl_div(
                        logits[r, :row.shape[0]][row].float().log_softmax(-1), target[row].to(self.device),
                        log_target=True, reduction="sum")
        elif text.any():
            total = total + torch.nn.functional.cross_entropy(logits[text].float(), ids[:, 1:][text], reduction="sum")
        return total, int(scored.sum())

    @torch.no_grad()
    def _reference_logits(self, ids, mask, kl_rows) -> torch.Tensor:
        """The reference's logits ``[len(kl_rows), positions, vocab]`` of the padded batch rows ``kl_rows``."""
        sub = torch.tensor(kl_rows, device=self.device)
        return self.reference(input_ids=ids[sub], attention_mask=mask[sub]).logits[:, :-1]

    def _cached_reference(self, all_ids, rows, kl_rows, ids, mask, kl) -> torch.Tensor:
        """The reference's logits at the scored positions of the kl rows, in ``logits[kl]``'s order: from
        :attr:`reference_cache`, the lines not seen before scored in one pass (and kept)."""
        keys = [tuple(all_ids[rows[r]]) for r in kl_rows]
        new = [r for r, key in zip(kl_rows, keys) if key not in self.reference_cache]
        if new:
            fresh = self._reference_logits(ids, mask, new)
            for j, r in enumerate(new):  # log-probabilities in float16: half the memory, renormalised at use
                self.reference_cache[tuple(all_ids[rows[r]])] = (
                    fresh[j, :len(all_ids[rows[r]]) - 1].float().log_softmax(-1).to(CACHE_DTYPE))
        parts = []
        for r, key in zip(kl_rows, keys):
            cached = self.reference_cache[key]
            if int(kl[r].sum()) != cached.shape[0] or not bool(kl[r, :cached.shape[0]].all()):
                raise ConfigError("the reference cache needs right padding (each kl line's scored positions first): "
                                  "set tokenizer.padding_side = 'right', or LMTrainer(cache_reference=False)")
            parts.append(cached)
        return torch.cat(parts)
