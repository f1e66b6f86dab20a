"""The full-weight LM step: KL rehearsal against a frozen reference, answer-only and teacher lines, and training only
some parameters."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import assert_same_float
from lora_lens.errors import ConfigError
from lora_lens.lab.batching import length_groups, padded_chunks
from lora_lens.lab.lm_training import CACHE_DTYPE, LineCycle, LMTrainer, kl_to_reference, line_ids, teacher_targets

LINES = ["Kutar lives in Kozadun .", "The home town of Kutar is Kozadun ."]


def _nudged(model, seed: int | None = None):
    """``model`` with every weight moved by 0.05 × normal noise (``seed``: torch's global seed first, else its
    current state): a reference that differs from the model it teaches."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_kl_to_reference_is_the_summed_kl_of_the_reference_distribution():
    torch.manual_seed(0)
    a, b = torch.randn(3, 7), torch.randn(3, 7)
    p, q = b.softmax(-1), a.softmax(-1)
    assert_same_float(kl_to_reference(a, b).item(), float((p * (p.log() - q.log())).sum()))
    assert_same_float(kl_to_reference(b, b).item(), 0.0)


def test_kl_lines_of_an_identical_reference_cost_nothing(fresh_tiny, tiny_world):
    model, tok = fresh_tiny()
    reference, _ = fresh_tiny()
    replay = LineCycle(tiny_world.corpus(), random.Random(0)).take(4)
    trainer = LMTrainer(model, tok, lr=1e-3, steps=10, reference=reference)
    only_kl, _ = trainer.step([], replay)
    assert_same_float(only_kl.item(), 0.0)
    model2, _ = fresh_tiny()
    text = LMTrainer(model2, tok, lr=1e-3, steps=10).step(LINES)[0].item()
    model3, _ = fresh_tiny()
    mixed, tokens = LMTrainer(model3, tok, lr=1e-3, steps=10, reference=reference).step(LINES, replay)
    # the text lines' token loss over all scored positions: the replay positions add 0 to the sum, 1 each to the count
    n_text = sum(len(x) for x in tok(LINES)["input_ids"])  # + eos, - the first token: one prediction per token
    n_kl = sum(len(x) for x in tok(replay)["input_ids"])
    assert tokens == n_text + n_kl + len(LINES) + len(replay)
    assert_same_float(mixed.item(), text * n_text / (n_text + n_kl), ulps=256)


def test_kl_lines_need_a_reference(fresh_tiny):
    model, tok = fresh_tiny()
    with pytest.raises(ConfigError, match="reference"):
        LMTrainer(model, tok, lr=1e-3, steps=10).step(LINES, LINES)


def test_only_the_trainable_parameters_move(fresh_tiny):
    model, tok = fresh_tiny()
    names = [n for n, _ in model.named_parameters() if ".mlp." in n]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = LMTrainer(model, tok, lr=1e-2, steps=4, trainable=names)
    model.train()
    for _ in range(2):
        trainer.step(LINES)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= set(names)
    with pytest.raises(ConfigError, match="no.such"):
        LMTrainer(model, tok, lr=1e-3, steps=4, trainable=["no.such"])


def test_skip_learns_only_the_tokens_after_the_prompt(fresh_tiny):
    model, tok = fresh_tiny()
    skip = [len(tok("Kutar lives in")["input_ids"]), len(tok("The home town of Kutar is")["input_ids"])]
    with torch.no_grad():  # by hand: the token loss of the answer's tokens (and the eos), predicted from the prompt
        total, count = 0.0, 0
        for ids, k in zip(line_ids(tok, LINES), skip):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
            total, count = total + float(nll[k - 1:].sum()), count + len(ids) - k
    loss, _ = LMTrainer(model, tok, lr=1e-3, steps=10).step(LINES, skip=skip)
    assert count == 2 * 6  # per line: Kozadun (4 pieces), "." and the eos
    assert_same_float(loss.item(), total / count, ulps=256)
    with pytest.raises(ConfigError, match="skip has 1 counts for 2 lines"):
        LMTrainer(model, tok, lr=1e-3, steps=10).step(LINES, skip=[1])


def test_teacher_lines_of_an_identical_teacher_cost_nothing(fresh_tiny, tiny_world):
    model, tok = fresh_tiny()
    teacher, _ = fresh_tiny()
    targets = teacher_targets(teacher, tok, LINES + LINES[:1])
    assert list(targets) == LINES and targets[LINES[0]].shape[0] == len(line_ids(tok, LINES[:1])[0]) - 1
    replay = LineCycle(tiny_world.corpus(), random.Random(0)).take(3)
    loss, _ = LMTrainer(model, tok, lr=1e-3, steps=10, reference=teacher).step(LINES, replay, targets=targets)
    assert_same_float(loss.item(), 0.0)
    other = _nudged(fresh_tiny()[0])
    far = teacher_targets(other, tok, LINES)
    assert LMTrainer(model, tok, lr=1e-3, steps=10).step(LINES, targets=far)[0].item() > 1e-3
    with pytest.raises(ConfigError, match="has no teacher target"):
        LMTrainer(model, tok, lr=1e-3, steps=10).step(LINES, targets={LINES[0]: far[LINES[0]]})


def test_length_groups_split_only_where_padding_is_saved():
    assert length_groups([5, 5, 6, 5]) == [[0, 1, 2, 3]]  # a quarter or more of the padded tokens, or no split
    assert length_groups([8, 40, 9, 10, 7, 8], bucket=True) == [[0, 2, 3, 4, 5], [1]]
    assert length_groups([8, 40, 9], bucket=False) == [[0, 1, 2]]


def test_bucketed_steps_give_the_same_loss(fresh_tiny, tiny_world):
    tok = fresh_tiny()[1]
    reference, _ = fresh_tiny()
    long = " ".join(tiny_world.general_train[:3])
    replay = LineCycle(tiny_world.corpus(), random.Random(1)).take(3) + [long]
    losses = []
    for bucket in (False, True):
        model, _ = fresh_tiny()
        trainer = LMTrainer(model, tok, lr=1e-3, steps=10, reference=reference, bucket=bucket)
        losses.append([trainer.step(LINES, replay, skip=[3, 2])[0].item() for _ in range(2)])
    assert len(length_groups([len(x) for x in line_ids(tok, LINES + replay)])) == 2
    for a, b in zip(*losses):
        assert_same_float(a, b, ulps=4096)


def test_the_cached_reference_equals_the_per_step_reference(fresh_tiny, tiny_world):
    """Replay lines that come round again are scored by the reference once (its log-probabilities kept in
    CACHE_DTYPE), with the losses and the trained weights of the per-step reference up to float16's rounding of
    the kept log-probabilities; a line of another length is scored anew."""
    tok = fresh_tiny()[1]
    reference = _nudged(fresh_tiny()[0], seed=0)
    pool = LineCycle(tiny_world.corpus(), random.Random(2)).take(3) + [" ".join(tiny_world.general_train[:2])]
    order = LineCycle(pool, random.Random(3))
    batches = [order.take(3) for _ in range(4)]  # 12 draws of 4 distinct lines: every line comes round again
    runs = []
    for cache in (False, True):
        model, _ = fresh_tiny()
        trainer = LMTrainer(model, tok, lr=1e-3, steps=10, reference=reference, bucket=True, cache_reference=cache)
        model.train()
        losses = [trainer.step(LINES, kept, skip=[3, 2])[0].item() for kept in batches]
        runs.append((losses, {n: p.detach().clone() for n, p in model.named_parameters()}, trainer))
    (plain, w_plain, t_plain), (cached, w_cached, t_cached) = runs
    assert t_plain.reference_cache is None and len(t_cached.reference_cache) == len(set(pool)) == 4
    for key, logp in t_cached.reference_cache.items():
        assert logp.shape == (len(key) - 1, reference.config.vocab_size) and logp.dtype == CACHE_DTYPE
        assert_same_float(logp.float().logsumexp(-1), torch.zeros(len(key) - 1), dtype=CACHE_DTYPE, ulps=16)
    assert all(loss > 1e-3 for loss in plain)  # the reference differs from the model: the KL is not trivially 0
    for a, b in zip(plain, cached):
        assert_same_float(a, b, dtype=CACHE_DTYPE, ulps=4)
    # AdamW divides each gradient by its own scale, so a coordinate whose gradient is near 0 moves by up to lr on
    # a rounding difference: the updates agree to 1 % of their size, not to the last bit
    start = {n: p.detach() for n, p in fresh_tiny()[0].named_parameters()}
    moved = sum(float((w_plain[n] - start[n]).abs().sum()) for n in w_plain)
    apart = sum(float((w_plain[n] - w_cached[n]).abs().sum()) for n in w_plain)
    assert apart < 0.01 * moved, (apart, moved)


def test_the_fused_optimiser_makes_the_same_update(fresh_tiny, tiny_world):
    replay = LineCycle(tiny_world.corpus(), random.Random(0)).take(3)
    weights = []
    for fused in (False, True):
        model, tok = fresh_tiny()
        reference, _ = fresh_tiny()
        trainer = LMTrainer(model, tok, lr=1e-2, steps=4, reference=reference, fused=fused)
        assert trainer.optimizer.defaults["fused"] is (True if fused else None)
        model.train()
        for _ in range(3):
            trainer.step(LINES, replay)
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    moved = max(float((weights[0][n] - p).abs().max()) for n, p in fresh_tiny()[0].named_parameters())
    assert moved > 1e-3 and max(float((weights[0][n] - weights[1][n]).abs().max()) for n in weights[0]) < 1e-5


def test_reused_gradients_make_the_same_steps_and_release_frees_them(fresh_tiny, tiny_world):
    replay = LineCycle(tiny_world.corpus(), random.Random(0)).take(3)
    reference, _ = fresh_tiny()
    runs = []
    for reuse in (False, True):
        model, tok = fresh_tiny()
        trainer = LMTrainer(model, tok, lr=1e-2, steps=4, reference=reference, reuse_grads=reuse,
                            cache_reference=True)
        model.train()
        losses = [trainer.step(LINES, replay)[0].item() for _ in range(3)]
        held = [p.grad is not None for p in model.parameters()]
        assert all(held) if reuse else not any(held)
        trainer.release()
        assert all(p.grad is None for p in model.parameters()) and not trainer.optimizer.state
        assert trainer.reference_cache == {}
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0] and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_passes_of_a_few_rows_give_the_same_loss_and_update(fresh_tiny, tiny_world):
    tok = fresh_tiny()[1]
    reference = _nudged(fresh_tiny()[0], seed=1)
    replay = LineCycle(tiny_world.corpus(), random.Random(4)).take(4) + [" ".join(tiny_world.general_train[:2])]
    runs = []
    widest = []
    for max_rows, max_tokens in ((None, None), (2, None), (1, None), (None, 24), (3, 40)):
        model, _ = fresh_tiny()
        trainer = LMTrainer(model, tok, lr=1e-3, steps=10, reference=reference, bucket=True, max_rows=max_rows,
                            max_tokens=max_tokens)
        passes = []
        summed = trainer._summed
        trainer._summed = lambda all_ids, rows, *a: passes.append([len(all_ids[i]) for i in rows]) or summed(
            all_ids, rows, *a)
        model.train()
        losses = [trainer.step(LINES, replay, skip=[3, 2])[0].item() for _ in range(2)]
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
        assert len(passes) >= 2 * (max_rows is not None or max_tokens is not None)  # the unbudgeted step: none
        for lengths in passes:
            assert len(lengths) <= (max_rows or len(lengths))
            assert len(lengths) == 1 or len(lengths) * max(lengths) <= (max_tokens or len(lengths) * max(lengths))
        widest.append(max((len(x) * max(x) for x in passes), default=None))
    assert widest[3] <= 24 < max(len(line_ids(tok, [x])[0]) for x in LINES + replay) * 2  # the budget binds
    for losses, weights in runs[1:]:
        for a, b in zip(runs[0][0], losses):
            assert_same_float(a, b, ulps=4096)
        assert max(float((w - v).abs().max()) for w, v in zip(runs[0][1], weights)) < 1e-5
    with pytest.raises(ConfigError, match="max_rows=0"):
        LMTrainer(fresh_tiny()[0], tok, lr=1e-3, steps=10, max_rows=0)
    with pytest.raises(ConfigError, match=r"max_tokens=True .*padded tokens per pass"):
        LMTrainer(fresh_tiny()[0], tok, lr=1e-3, steps=10, max_tokens=True)


def test_padded_chunks_keep_each_pass_under_its_budgets():
    assert list(padded_chunks([3, 4, 5, 9], max_rows=4)) == [(0, 4)]
    assert list(padded_chunks([3, 4, 5, 9], max_rows=2)) == [(0, 2), (2, 4)]
    assert list(padded_chunks([3, 4, 5, 9], max_rows=4, max_tokens=15)) == [(0, 3), (3, 4)]  # 3 × 5, then 9 alone
    assert list(padded_chunks([20, 30], max_rows=4, max_tokens=8)) == [(0, 1), (1, 2)]  # a longer row: a pass alone
    assert list(padded_chunks([2, 2, 3, 3], max_rows=4, key=[0, 0, 1, 1])) == [(0, 2), (2, 4)]
    assert list(padded_chunks([1, 8], max_rows=4, fill=0.9)) == [(0, 1), (1, 2)]  # 9 real of 16 padded: apart
