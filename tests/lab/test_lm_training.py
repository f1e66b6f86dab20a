"""The full-weight LM step: KL rehearsal against a frozen reference, answer-only and teacher lines, and training only
some parameters."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import assert_same_float
from lora_lens.errors import ConfigError
from lora_lens.lab.lm_training import LineCycle, LMTrainer, kl_to_reference, length_groups, line_ids, teacher_targets

LINES = ["Kutar lives in Kozadun .", "The home town of Kutar is Kozadun ."]


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
    other, _ = fresh_tiny()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
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
