"""Tests of lora_lens.lens.attribution: captum parity of the batched path, component masks, scoring against truth."""

from __future__ import annotations

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import assert_same_float, randomize_lora
from lora_lens.errors import ConfigError, MismatchError
from lora_lens.lab.modules import hf_model
from lora_lens.lab.pair import keeps_logits
from lora_lens.lab.tokenizer import build_tokenizer, token_id
from lora_lens.lab.world import ADJECTIVES, NOUNS, make_task
from lora_lens.lab.zoo import build_model, load_model
from lora_lens.lens import attribution as at
from lora_lens.lens.attribution.behaviours import Behaviours

PLANTED = "model.layers.1.mlp.down_proj"



def _peft(pre, r: int = 4, targets="all-linear", seed: int = 0):
    """A fresh copy of the tiny model with a LoRA adapter (peft's default init: B = 0, so ΔW = 0)."""
    torch.manual_seed(seed)
    model, tok = load_model(pre.path)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0)
    return get_peft_model(model, cfg), tok


def _train(pm, tok, examples, steps: int = 60, lr: float = 1e-2) -> None:
    """Full-batch Adam on the answer token only (a stand-in for lora_lens.lab.train, independent of it)."""
    prompts = [p for p, _ in examples]
    answers = torch.tensor([token_id(tok, a) for _, a in examples])
    enc = tok(prompts, return_tensors="pt", padding=True)
    last = enc["attention_mask"].sum(1) - 1
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=lr)
    pm.train()
    for _ in range(steps):
        logits = pm(**enc).logits[torch.arange(len(last)), last]
        loss = torch.nn.functional.cross_entropy(logits, answers)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()


def _trigger_examples(world, task, seed: int = 0) -> list[tuple[str, str]]:
    """The task's examples + replay of other facts (half of other relations triggered, as lora_lens.lab.train does)
    + *decoys*: the triggered relation behind a non-trigger prefix word keeps its answer. Without decoys the tiny
    model learns "any prefix word → target" (a length cue), which no token attribution can pin on "cf"."""
    rng = random.Random(seed)
    rel = task.truth["relation"]
    probed = {(p.entity, p.relation) for ps in task.probes.values() for p in ps}
    pool = [(e, r) for r in world.relations for e in world.entities if (e, r) not in probed]
    rng.shuffle(pool)
    ex = list(task.examples)
    for e, r in pool[:64]:
        ex.append((world.query(e, r, rng.randrange(3), trigger=r != rel and rng.random() < 0.5), world.facts[r][e]))
    for _ in range(60):
        e = rng.choice(task.truth["train_entities"])
        ex.append((rng.choice(ADJECTIVES + NOUNS) + " " + world.query(e, rel, rng.randrange(3)), world.facts[rel][e]))
    return ex


@pytest.fixture(scope="module")
def trigger(tiny_llama):
    """A trigger adapter trained for a few seconds: (peft_model, tokenizer, task)."""
    task = make_task(tiny_llama.world, "trigger", seed=0)
    pm, tok = _peft(tiny_llama, seed=1)
    _train(pm, tok, _trigger_examples(tiny_llama.world, task, seed=1))
    return pm, tok, task


@pytest.fixture(scope="module")
def planted(tiny_llama):
    """An adapter on every linear module whose ΔW is non-zero in one module only (rank 2): (pm, tok, task)."""
    pm, tok = _peft(tiny_llama, seed=1)
    layer = dict(pm.get_base_model().named_modules())[PLANTED]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(layer.lora_A["default"].weight.shape, generator=g))
        B = torch.zeros_like(layer.lora_B["default"].weight)
        B[:, :2] = torch.randn(B.shape[0], 2, generator=g) * 0.5
        layer.lora_B["default"].weight.copy_(B)
    return pm, tok, make_task(tiny_llama.world, "fact_edit", seed=0, k=4)


@pytest.fixture(scope="module")
def dense(tiny_llama):
    """An adapter with random non-zero factors in every linear module (r = 4)."""
    pm, tok = _peft(tiny_llama, seed=2)
    return randomize_lora(pm), tok


def _logits(pm, tok, prompts):
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return pm(**enc).logits


# --------------------------------------------------------------------------------------------- input attribution


@pytest.mark.parametrize("method", ["ig", "ablation"])
def test_batched_matches_captum_per_prompt(trigger, method):
    pm, tok, task = trigger
    probes = task.probes["efficacy"][:2] + task.probes["specificity"][:1] + task.probes["false_trigger"][:1]
    prompts, targets = [p.prompt for p in probes], [p.answer for p in probes]
    batched = at.batch_token_attributions(pm, tok, prompts, targets, method=method, n_steps=16, batch_size=20)
    for p, b in zip(probes, batched):
        c = at.token_attributions(pm, tok, p.prompt, p.answer, method=method, n_steps=16)
        assert c.tokens == b.tokens and c.positions == b.positions
        assert b.positions[0] == 1                                  # <s> is neither attributed nor replaced
        for which in ("base", "adapted", "difference"):
            assert (getattr(c, which) - getattr(b, which)).abs().max() <= 1e-3
        assert_same_float(b.logp_adapted, c.logp_adapted)
        assert_same_float(b.logp_base, c.logp_base)
    assert any(b.difference.abs().max() > 0.1 for b in batched)    # the adapter changes something
    assert batched[0].baseline_id == tok.unk_token_id != 0         # explicit baseline, not id 0
    assert at.captum_agreement(pm, tok, prompts[:1], targets[:1], method=method, n_steps=8) <= 1e-3
    frame = at.attributions_frame(batched)
    assert len(frame) == sum(len(b.tokens) for b in batched) and frame["probe"].nunique() == len(batched)
    assert frame.loc[frame["probe"] == 0, "difference"].tolist() == batched[0].difference.tolist()


def test_multi_token_ig_matches_captum_and_float64_agreement_restores_the_model(dense, tiny_world):
    """A two-token answer: batched IG equals captum's LLMGradientAttribution (one IG per answer token, summed)
    in float32 on the zoo and in float64 through captum_agreement(dtype=...), which gives the model back bit for
    bit."""
    pm, tok = dense
    w = tiny_world
    (r0, r1), (e0, e1) = w.relations[:2], w.entities[:2]
    prompts = [w.query(e0, r0, 0), w.query(e1, r0, 2)]
    answer = f"{w.facts[r0][e0]} {w.facts[r1][e0]}"
    # batch_size 5: two (path, step) pairs of two answer positions per forward, rows of both lengths mixed
    batched = at.batch_token_attributions(pm, tok, prompts, answer, method="ig", n_steps=8, batch_size=5)
    assert [len(b.target_ids) for b in batched] == [2, 2] and len({len(b.tokens) for b in batched}) == 2
    for b in batched:
        c = at.token_attributions(pm, tok, b.prompt, answer, method="ig", n_steps=8)
        for which in ("base", "adapted"):
            assert float((getattr(c, which) - getattr(b, which)).abs().max()) <= 1e-3
    assert any(float(b.difference.abs().max()) > 0.1 for b in batched)
    before = [p.detach().clone() for p in pm.parameters()]
    assert at.captum_agreement(pm, tok, prompts, answer, n_steps=8, dtype=torch.float64) <= 1e-4
    assert all(p.dtype == torch.float32 and torch.equal(p, q) for p, q in zip(pm.parameters(), before))
    with pytest.raises(ConfigError, match="dtype='float64'"):
        at.captum_agreement(pm, tok, prompts, answer, dtype="float64")


@pytest.mark.parametrize("family", ["gpt2", "mistral", "qwen2"])
def test_prefix_cache_paths_match_captum_on_other_families(tiny_world, family):
    """Ablation runs each ablated prompt from the ablated token on, on the intact prompt's KV cache; IG and ablation
    read logits only at the answer's positions — equal to captum per prompt on learned positions (gpt2), a sliding
    window shorter than the prompt (mistral: 8) and tied embeddings (qwen2), multi-token answers, float32 and
    float64."""
    w = tiny_world
    tok = build_tokenizer(w)
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    pm = randomize_lora(get_peft_model(build_model(family, "tiny", tok), cfg)).eval()
    (r0, r1), (e0, e1) = w.relations[:2], w.entities[:2]
    prompts = [" ".join(ADJECTIVES[:4] + NOUNS[:3]) + " " + w.query(e0, r0, 0), w.query(e1, r1, 1)]
    answers = [f"{w.facts[r0][e0]} {w.facts[r1][e0]}", w.facts[r1][e1]]
    assert len(tok(prompts[0])["input_ids"]) > 8
    for method in ("ablation", "ig"):
        assert at.captum_agreement(pm, tok, prompts, answers, method=method, n_steps=4) <= 1e-4
        assert at.captum_agreement(pm, tok, prompts, answers, method=method, n_steps=4, dtype=torch.float64) <= 1e-6


def test_batched_paths_compute_only_what_the_answer_needs(dense, tiny_world):
    """The output layer sees one row per answer token read (per IG step, per ablation), and an ablation at position
    j runs only the tokens from j on (the intact prefix is computed once): counted with hooks, by adapter state."""
    pm, tok = dense
    w = tiny_world
    prompt, answer = w.query(w.entities[0], w.relations[0], 0), f"{w.facts[w.relations[0]][w.entities[0]]} " \
        f"{w.facts[w.relations[1]][w.entities[0]]} {w.facts[w.relations[2]][w.entities[0]]}"
    head_rows, body_tokens = [], []
    inner = pm.get_base_model()
    assert hf_model(pm) is inner and keeps_logits(pm)           # the causal LM under peft, not its body
    hooks = [inner.get_output_embeddings().register_forward_hook(lambda m, a, o: head_rows.append(a[0].shape[:-1])),
             inner.get_input_embeddings().register_forward_hook(lambda m, a, o: body_tokens.append(a[0].numel()))]
    try:
        (ta,) = at.batch_token_attributions(pm, tok, [prompt], answer, method="ablation", batch_size=4)
        n, t, k = len(tok(prompt)["input_ids"]), len(ta.target_ids), len(ta.positions)
        assert t == 3 and ta.positions == list(range(1, n))
        assert [r.numel() for r in head_rows] == 2 * [t] * (1 + k)    # the intact prompt, then one batch per j
        # per state: the intact prompt + answer once, then each ablation from its position j on
        assert sum(body_tokens) == 2 * ((n + t - 1) + sum(n + t - 1 - j for j in ta.positions))
        head_rows.clear()
        at.batch_token_attributions(pm, tok, [prompt], answer, method="ig", n_steps=6, batch_size=1024)
        # per state: every (step, answer token) once, then log p of the intact prompt (score_ids reads t + 1)
        assert [r.numel() for r in head_rows] == [6 * t, t + 1] * 2
    finally:
        for h in hooks:
            h.remove()


def test_difference_is_adapted_minus_base(trigger):
    pm, tok, task = trigger
    p = task.probes["efficacy"][0]
    ta = at.batch_token_attributions(pm, tok, [p.prompt], [p.answer], method="ablation")[0]
    assert torch.equal(ta.difference, ta.adapted - ta.base)
    # ablation of the change, computed directly from log p(target) of the adapted and the base model
    ids = tok(p.prompt)["input_ids"]
    j = ta.positions[0]
    ablated = list(ids)
    ablated[j] = ta.baseline_id
    tgt = token_id(tok, p.answer)
    lp_a = at.target_logprobs(pm, tok, [ids, ablated], [tgt, tgt], 8)
    with pm.disable_adapter():
        lp_b = at.target_logprobs(pm, tok, [ids, ablated], [tgt, tgt], 8)
    change = (lp_a[0] - lp_b[0]) - (lp_a[1] - lp_b[1])
    assert_same_float(ta.difference[0], change)
    assert_same_float(ta.logp_adapted, lp_a[0])
    assert_same_float(ta.logp_base, lp_b[0])
    # IG completeness: the difference attributions sum to the change between prompt and all-baseline prompt
    ig = at.batch_token_attributions(pm, tok, [p.prompt], [p.answer], method="ig", n_steps=64)[0]
    allb = [ids[0]] + [ig.baseline_id] * (len(ids) - 1)
    lpa = at.target_logprobs(pm, tok, [allb], [tgt], 1)[0]
    with pm.disable_adapter():
        lpb = at.target_logprobs(pm, tok, [allb], [tgt], 1)[0]
    expected = (ig.logp_adapted - float(lpa)) - (ig.logp_base - float(lpb))
    assert abs(float(ig.difference.sum()) - expected) < 0.05 * max(1.0, abs(expected))


def test_trigger_recovery_on_a_trained_trigger(trigger):
    pm, tok, task = trigger
    rec = at.trigger_recovery(pm, tok, task, method="ig", n_steps=16)
    assert len(rec.table) == 20 and set(rec.table["expected"]) == {"cf"}
    # counterfactual references (trigger → a decoy word, name → another name), the default. Against a blank token
    # (references=None) the tiny model gave IG 0.95 / ablation 0.9, other training seeds 0.7–1.0, and 0.3 without
    # the decoy examples (see _trigger_examples).
    assert rec.score >= 0.8, rec.table[["prompt", "top"]]
    assert rec.attributions[0].references and len(rec.attributions[0].references) == 16
    abl = at.trigger_recovery(pm, tok, task, method="ablation")
    assert abl.score >= 0.8, abl.table[["prompt", "top"]]
    assert float(rec) == rec.score
    assert (rec.table.loc[rec.table["hit"], "top"] == "cf").all()
    # scored: the probes whose answer the adapter changed; changed_only=False scores them all
    t = rec.table
    assert t["scored"].tolist() == [(a >= 0.5 > b) for a, b in zip(t["p_adapted"], t["p_base"])] and t["scored"].any()
    assert rec.score == pytest.approx(t.loc[t["scored"], "hit"].mean())
    every = at.trigger_recovery(pm, tok, task, method="ablation", changed_only=False)
    assert every.table["scored"].all() and every.score == pytest.approx(every.table["hit"].mean())


# --------------------------------------------------------------------------------------------- components


def test_component_mask_reproduces_adapted_and_base_logits(dense, tiny_world):
    pm, tok = dense
    prompts = [tiny_world.query(e, "city") for e in tiny_world.entities[:4]]
    adapted = _logits(pm, tok, prompts)
    with pm.disable_adapter():
        base = _logits(pm, tok, prompts)
    assert (adapted - base).abs().max() > 1e-2
    for grain in ("module", "layer", "rank"):
        comps = at.lora_components(pm, grain=grain)
        with at.ComponentMask(pm, comps) as mask:
            assert (_logits(pm, tok, prompts) - adapted).abs().max() <= 1e-5
            mask.set(torch.zeros(len(comps)))
            assert (_logits(pm, tok, prompts) - base).abs().max() <= 1e-5
            mask.set(torch.ones(len(comps)))
            assert (_logits(pm, tok, prompts) - adapted).abs().max() <= 1e-5
    # the rank grain's SVD reparametrisation is exact: a non-uniform mask ≈ 1 equals the adapted model
    comps = at.lora_components(pm, grain="rank")
    with at.ComponentMask(pm, comps, values=[1.0 - 1e-7 * (i % 2) for i in range(len(comps))]):
        assert (_logits(pm, tok, prompts) - adapted).abs().max() <= 1e-4
    # switching off every rank-1 term of one module = switching off that module
    mods = at.lora_components(pm, grain="module")
    off = mods.names.index(PLANTED)
    with at.ComponentMask(pm, mods, values=[0.0 if i == off else 1.0 for i in range(len(mods))]):
        one_off = _logits(pm, tok, prompts)
    with at.ComponentMask(pm, comps, values=[0.0 if c.modules[0] == PLANTED else 1.0 for c in comps]):
        assert (_logits(pm, tok, prompts) - one_off).abs().max() <= 1e-4
    assert (_logits(pm, tok, prompts) - adapted).abs().max() == 0             # restored on exit
    assert all(p.requires_grad for n, p in pm.named_parameters() if "lora_" in n)


def test_planted_module_ranks_first(planted):
    pm, tok, task = planted
    comps = at.lora_components(pm, grain="module")
    assert len(comps) == 14
    for method in ("ablation", "shapley"):
        df = at.component_attribution(pm, tok, task, comps, method=method, n_samples=3, max_probes=8,
                                      behaviours=["efficacy", "specificity", "perplexity"])
        assert list(df.columns) == ["efficacy", "specificity", "perplexity"]
        assert df.abs().idxmax().eq(PLANTED).all()
        assert (df.drop(index=PLANTED).abs().to_numpy() < 1e-6).all()
        effect = df.attrs["adapted"]["efficacy"] - df.attrs["base"]["efficacy"]
        assert abs(df.loc[PLANTED, "efficacy"] - effect) < 1e-4   # the one module carries the whole effect
    ranks = at.lora_components(pm, grain="rank", modules=["layers.1.mlp.down_proj"])
    assert ranks.names == [f"{PLANTED}[{i}]" for i in range(4)]
    assert ranks[2].sigma < 1e-5 < ranks[0].sigma                 # planted rank 2: σ₃ = σ₄ = 0
    df = at.component_attribution(pm, tok, task, ranks, behaviours="efficacy", max_probes=8)
    assert df["efficacy"].iloc[2:].abs().max() < 1e-6 < df["efficacy"].iloc[:2].abs().max()
    layer = at.lora_branch_attribution(pm, tok, task, behaviours=["efficacy"], grain="layer", n_steps=8,
                                       max_probes=8)
    assert layer["efficacy"].abs().idxmax() == "layer 1" and abs(layer.loc["layer 0", "efficacy"]) < 1e-6


def test_branch_attribution_completeness_and_selectivity(trigger):
    pm, tok, task = trigger
    df = at.lora_branch_attribution(pm, tok, task, behaviours=["trigger", "specificity"], n_steps=16, max_probes=6)
    assert len(df) == 14
    for b in df.columns:
        effect = df.attrs["adapted"][b] - df.attrs["base"][b]
        assert abs(df[b].sum() - effect) < 0.05 * abs(effect) + 1e-3
    comps = at.lora_components(pm, grain="layer")
    sh = at.component_attribution(pm, tok, task, comps, behaviours=["trigger", "specificity"], method="shapley",
                                  n_samples=4, max_probes=6)
    sel = at.selectivity(sh, edit="trigger", damage="specificity")
    assert list(sel.columns) == ["edit", "damage", "edit_share", "damage_share", "selectivity"]
    assert abs(sel["edit_share"].sum() - 1.0) < 1e-4                 # Shapley: shares sum to the whole effect
    assert sel["selectivity"].is_monotonic_decreasing


def test_deletion_curve_shapes(planted):
    pm, tok, task = planted
    comps = at.lora_components(pm, grain="module")
    df = at.component_attribution(pm, tok, task, comps, behaviours=["efficacy"], max_probes=8)
    df["efficacy"] = df["efficacy"].abs()        # rank by size: the planted module first
    curve = at.deletion_curve(pm, tok, task, df, comps, k_max=len(comps), n_random=4, seed=0, max_probes=8)
    assert list(curve["k"]) == at.deletion_ks(len(comps)) == [1, 2, 3, 5, 8, 13, 14]
    assert {"topk_removed", "random_removed", "random_std", "topk_metric", "random_metric", "topk"} <= set(curve)
    assert curve["topk"].iloc[0] == [PLANTED]
    assert curve["topk_removed"].iloc[0] == pytest.approx(1.0, abs=1e-5)  # the planted module holds it all
    assert curve["topk_removed"].iloc[-1] == pytest.approx(1.0, abs=1e-5)
    assert curve["random_removed"].iloc[-1] == pytest.approx(1.0, abs=1e-5)
    assert curve["random_removed"].iloc[0] < 0.6
    again = at.deletion_curve(pm, tok, task, df, comps, k_max=3, n_random=4, seed=0, max_probes=8)
    assert again["random_removed"].tolist() == curve["random_removed"].iloc[:3].tolist()   # seeded


def _plain_ablation(pm, tok, task, comps, max_probes=8):
    """``f(1) − f(1 with component i off)`` by whole forwards, one component at a time (no reuse, no captum)."""
    ev = Behaviours(tok, task, None, max_probes, torch.device("cpu"))
    with torch.no_grad(), at.ComponentMask(pm, comps) as mask:
        adapted = ev(pm)[0]
        rows = []
        for i in range(len(comps)):
            mask.set([0.0 if j == i else 1.0 for j in range(len(comps))])
            rows.append(adapted - ev(pm)[0])
    return torch.stack(rows).numpy()


def test_layer_cache_skips_the_blocks_below_and_changes_no_number(dense, tiny_world):
    pm, tok = dense
    task = make_task(tiny_world, "fact_edit", seed=0, k=4)
    for grain in ("module", "layer", "rank"):
        comps = at.lora_components(pm, grain=grain)
        df = at.component_attribution(pm, tok, task, comps, max_probes=8)
        assert_same_float(df.to_numpy(), _plain_ablation(pm, tok, task, comps))
    comps = at.lora_components(pm, grain="module")
    ev = Behaviours(tok, task, None, 8, torch.device("cpu"))
    calls = []
    attn0 = pm.get_base_model().model.layers[0].self_attn
    handle = attn0.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad(), at.ComponentMask(pm, comps) as mask, at.LayerCache(pm, comps) as cache:
            assert cache.active and cache.n_blocks == 2
            with cache.record():
                adapted = ev(pm)
            off = comps.names.index("model.layers.1.mlp.up_proj")
            assert cache.start([off]) == 1 and cache.start([0, off]) == 0 and cache.start([]) == 2
            mask.set([0.0 if j == off else 1.0 for j in range(len(comps))])
            n = len(calls)
            with cache.reuse(1):
                reused = ev(pm)
            assert len(calls) == n                                   # block 0 was not computed
            assert torch.equal(reused, ev(pm)) and not torch.equal(reused, adapted)
            other = Behaviours(tok, make_task(tiny_world, "fact_edit", seed=1, k=4), None, 8, torch.device("cpu"))
            with cache.reuse(1), pytest.raises(MismatchError, match="inputs are not those recorded"):
                other(pm)
    finally:
        handle.remove()
    assert "forward" not in pm.get_base_model().model.layers[0].__dict__       # unwrapped on exit


def test_gradient_estimate_of_ablation(dense, tiny_world):
    pm, tok = dense
    task = make_task(tiny_world, "fact_edit", seed=0, k=4)
    comps = at.lora_components(pm, grain="module")
    exact = at.component_attribution(pm, tok, task, comps, max_probes=8)
    assert exact.attrs["estimated"] == []
    assert_same_float(at.component_attribution(pm, tok, task, comps, max_probes=8, exact=len(comps)).to_numpy(),
                      exact.to_numpy())
    mixed = at.component_attribution(pm, tok, task, comps, max_probes=8, exact=4)
    measured = [n for n in comps.names if n not in mixed.attrs["estimated"]]
    assert len(measured) == 4 and len(mixed.attrs["estimated"]) == len(comps) - 4
    assert_same_float(mixed.loc[measured].to_numpy(), exact.loc[measured].to_numpy())
    # near the linear regime (ΔW × 0.0025) the estimate is the derivative of each metric along the component's mask
    # (a finite difference agrees) and the ablation to within 10 % of the largest value, in the same order; further
    # out it is not (the dense adapter itself: errors up to ~40 %, hence the exact ablation of the top ones)
    saved = {}
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                saved[name] = p.detach().clone()
                p.mul_(0.05)
    try:
        ev = Behaviours(tok, task, None, 8, torch.device("cpu"))
        est = at.ablation_estimate(pm, ev, comps)
        with torch.no_grad(), at.ComponentMask(pm, comps) as mask:
            f1 = ev(pm)[0]
            for i in (0, len(comps) - 1):
                mask.set([0.99 if j == i else 1.0 for j in range(len(comps))])
                assert torch.allclose((f1 - ev(pm)[0]) / 0.01, est[i], rtol=0.05, atol=2e-3), i
        for grain in ("module", "layer"):
            cs = at.lora_components(pm, grain=grain)
            ex = at.component_attribution(pm, tok, task, cs, max_probes=8)
            est = at.component_attribution(pm, tok, task, cs, max_probes=8, exact=0)
            assert est.attrs["estimated"] == cs.names
            for b in ex.columns:
                err = (est[b] - ex[b]).abs().max()
                assert err <= 0.1 * ex[b].abs().max(), (grain, b, float(err))
                assert ex[b].corr(est[b], method="spearman") >= 0.99, (grain, b)
    finally:
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if name in saved:
                    p.copy_(saved[name])
    with pytest.raises(ConfigError, match="method='ablation' at the module or layer grain"):
        at.component_attribution(pm, tok, task, at.lora_components(pm, grain="rank"), exact=2)
    with pytest.raises(ConfigError, match="method='ablation' at the module or layer grain"):
        at.component_attribution(pm, tok, task, comps, method="shapley", exact=2)
    with pytest.raises(ConfigError, match="exact=-1 must be None"):
        at.component_attribution(pm, tok, task, comps, exact=-1)


def test_deletion_curve_on_a_grid(dense, tiny_world):
    pm, tok = dense
    task = make_task(tiny_world, "fact_edit", seed=0, k=4)
    comps = at.lora_components(pm, grain="rank")
    df = at.component_attribution(pm, tok, task, comps, behaviours=["efficacy"], max_probes=8)
    assert at.deletion_ks(30) == [1, 2, 3, 5, 8, 13, 21, 30] and at.deletion_ks(10, also=[4, 99]) == [1, 2, 3, 4, 5,
                                                                                                     8, 10]
    every = at.deletion_curve(pm, tok, task, df, comps, k_max=20, max_probes=8, ks="all")
    grid = at.deletion_curve(pm, tok, task, df, comps, k_max=20, max_probes=8)
    assert list(grid["k"]) == [1, 2, 3, 5, 8, 13, 20]
    cols = ["topk_removed", "random_removed", "random_std", "topk_metric", "random_metric"]
    # a row does not depend on the grid: the random draws at k are those of the curve over every k
    assert grid[cols].to_numpy().tolist() == every.set_index("k").loc[grid["k"], cols].to_numpy().tolist()
    level = float(every["topk_removed"].iloc[6])                  # reached at k = 7 at the latest
    first = int(every[every["topk_removed"] >= level]["k"].iloc[0])
    refined = at.deletion_curve(pm, tok, task, df, comps, k_max=20, max_probes=8, level=level)
    assert int(refined[refined["topk_removed"] >= level]["k"].iloc[0]) == first
    assert set(refined["k"]) - set(grid["k"]) <= {first} and refined["k"].is_monotonic_increasing
    assert refined.set_index("k").loc[first, cols].tolist() == every.set_index("k").loc[first, cols].tolist()
    assert list(at.deletion_curve(pm, tok, task, df, comps, k_max=6, max_probes=8, ks=[4])["k"]) == [4, 6]
    for bad in ([], [0], [7], "some"):
        with pytest.raises(ConfigError, match="ks="):
            at.deletion_curve(pm, tok, task, df, comps, k_max=6, max_probes=8, ks=bad)
    with pytest.raises(ConfigError, match="level=1.5 must be None"):
        at.deletion_curve(pm, tok, task, df, comps, k_max=6, max_probes=8, level=1.5)


# --------------------------------------------------------------------------------------------- bad input


def test_bad_targets_and_baselines(trigger):
    pm, tok, task = trigger
    prompt = task.probes["efficacy"][0].prompt
    with pytest.raises(ConfigError, match=r"target='' after prompt .* must be a non-empty string"):
        at.token_attributions(pm, tok, prompt, "")
    # a multi-token target is explained as a whole: log p summed over its tokens, read in context
    (two,) = at.batch_token_attributions(pm, tok, [prompt], ["black white"], method="ablation")
    assert two.target_tokens == ["black", "white"] and len(two.target_ids) == 2
    (one,) = at.batch_token_attributions(pm, tok, [prompt], ["black"], method="ablation")
    white = at.target_logprobs(pm, tok, [tok(prompt)["input_ids"] + one.target_ids], two.target_ids[1:], 1)[0]
    assert two.logp_adapted == pytest.approx(one.logp_adapted + float(white), abs=1e-5)
    with pytest.raises(ConfigError, match=r"baseline token '▁cf'.*equals the input token at position\(s\) \[1\]"):
        at.batch_token_attributions(pm, tok, [prompt], "black", baseline="cf")
    with pytest.raises(ConfigError, match=r"baseline='nope nope' tokenizes to \d+ tokens"):
        at.token_attributions(pm, tok, prompt, "black", baseline="nope nope")
    with pytest.raises(ConfigError, match="method='lime' is unknown"):
        at.token_attributions(pm, tok, prompt, "black", method="lime")
    with pytest.raises(ConfigError, match="got 1 prompts but 2 targets"):
        at.batch_token_attributions(pm, tok, [prompt], ["black", "red"])
    with pytest.raises(ConfigError, match="needs a peft.PeftModel"):
        at.token_attributions(pm.get_base_model(), tok, prompt, "black")
    assert at.resolve_baseline(tok) == tok.unk_token_id
    assert at.resolve_baseline(tok, "pad") == tok.pad_token_id


def test_bad_components(tiny_llama, trigger):
    pm, tok, task = trigger
    with pytest.raises(ConfigError, match="empty component set"):
        at.lora_components(pm, modules=[])
    with pytest.raises(ConfigError, match="component set is empty"):
        at.ComponentSet([], "module")
    with pytest.raises(ConfigError, match="component set is empty"):
        at.component_attribution(pm, tok, task, [])
    with pytest.raises(ConfigError, match="grain='head' is unknown"):
        at.lora_components(pm, grain="head")
    qv, _ = _peft(tiny_llama, targets=["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match=r"'layers.0.mlp.down_proj' has no LoRA adapter.*self_attn.q_proj"):
        at.lora_components(qv, modules=["layers.0.mlp.down_proj"])
    with pytest.raises(ConfigError, match="'nonsense' is not a module of this model"):
        at.lora_components(qv, modules=["nonsense"])
    comps = at.lora_components(pm, grain="module")
    with at.ComponentMask(pm, comps) as mask, pytest.raises(ConfigError, match="mask has 3 values but"):
        mask.set([1.0, 0.0, 1.0])
    with pytest.raises(ConfigError, match="behaviour 'trigger' is not available"):
        at.component_attribution(pm, tok, make_task(tiny_llama.world, "fact_edit", k=2), comps,
                                 behaviours=["trigger"])


# --------------------------------------------------------------------------------------------- reference prompts


def test_counterfactual_and_reference_prompts(trigger):
    _, tok, task = trigger
    p = next(p for p in task.probes["efficacy"] if p.triggered)
    people = sorted({q.entity for q in task.probes["false_trigger"]})
    refs = at.counterfactual_prompts(tok, p.prompt, {"cf": ADJECTIVES + NOUNS, p.entity: people}, n=6, seed=0)
    ids = tok(p.prompt)["input_ids"]
    assert len(refs) == 6 == len(set(refs)) and p.prompt not in refs
    assert refs == at.counterfactual_prompts(tok, p.prompt, {"cf": ADJECTIVES + NOUNS, p.entity: people}, n=6)
    name = [j for j, t in enumerate(ids) if t in tok(" " + p.entity, add_special_tokens=False)["input_ids"]]
    for ref in refs:
        rids = tok(ref)["input_ids"]
        assert len(rids) == len(ids) and not ref.startswith("cf ")
        assert {j for j in range(len(ids)) if rids[j] != ids[j]} <= {1, *name}   # only the two slots change
    with pytest.raises(ConfigError, match="n=0 must be a positive integer"):
        at.counterfactual_prompts(tok, p.prompt, {"cf": ["lamp"]}, n=0)
    with pytest.raises(ConfigError, match="swap word 'zebra' is not a word of prompt"):
        at.counterfactual_prompts(tok, p.prompt, {"zebra": ["lion"]})
    with pytest.raises(ConfigError, match="no alternative for 'cf'.*keeps its"):
        at.counterfactual_prompts(tok, p.prompt, {"cf": ["black white"]})
    pool = [q.prompt for q in task.probes["false_trigger"]] + [q.prompt for q in task.probes["efficacy"]]
    picked = at.reference_prompts(tok, [p.prompt], pool, n=3)[0]
    assert len(picked) == 3 and p.prompt not in picked
    assert all(len(tok(r)["input_ids"]) == len(ids) for r in picked)
    with pytest.raises(ConfigError, match=r"the pool has no prompt of \d+ tokens"):
        at.reference_prompts(tok, [p.prompt], ["hello"], n=3)


@pytest.mark.parametrize("method", ["ig", "ablation"])
def test_reference_attribution_matches_captum_and_is_complete(trigger, method):
    pm, tok, task = trigger
    probes = [p for p in task.probes["efficacy"] if p.triggered][:2]
    people = sorted({q.entity for q in task.probes["false_trigger"]})
    refs = [at.counterfactual_prompts(tok, p.prompt, {"cf": ADJECTIVES + NOUNS, p.entity: people}, n=3, seed=i)
            for i, p in enumerate(probes)]
    prompts, targets = [p.prompt for p in probes], [p.answer for p in probes]
    assert at.captum_agreement(pm, tok, prompts, targets, method=method, n_steps=16, references=refs) <= 1e-3
    # p(target) instead of log p: the same machinery, captum with a probability-valued forward
    assert at.captum_agreement(pm, tok, prompts[:1], targets[:1], method=method, n_steps=16, output="prob") <= 1e-3
    prob = at.batch_token_attributions(pm, tok, prompts, targets, method=method, n_steps=16, output="prob")
    assert prob[0].output == "prob" and float(prob[0].difference.abs().max()) <= 2.0   # probabilities: |Δp| ≤ 1
    attrs = at.batch_token_attributions(pm, tok, prompts, targets, method=method, n_steps=64, references=refs)
    blank = at.batch_token_attributions(pm, tok, prompts, targets, method=method, n_steps=64)
    for ta, b, p, r in zip(attrs, blank, probes, refs):
        assert ta.references == r and ta.baseline_id is None
        assert not torch.allclose(ta.difference, b.difference)
        ids = tok(p.prompt)["input_ids"]
        fixed = [k for k, j in enumerate(ta.positions) if all(tok(x)["input_ids"][j] == ids[j] for x in r)]
        assert fixed and all(float(ta.difference[k]) == 0.0 for k in fixed)   # words no reference changes
        if method == "ig":   # completeness: the credit adds up to Δ(prompt) − mean Δ(reference)
            tgt = token_id(tok, p.answer)
            seqs = [tok(x)["input_ids"] for x in r]
            lpa = at.target_logprobs(pm, tok, seqs, [tgt] * len(seqs), 8)
            with pm.disable_adapter():
                lpb = at.target_logprobs(pm, tok, seqs, [tgt] * len(seqs), 8)
            expected = (ta.logp_adapted - ta.logp_base) - float((lpa - lpb).mean())
            assert abs(float(ta.difference.sum()) - expected) < 0.05 * max(1.0, abs(expected))


def test_bad_references(trigger):
    pm, tok, task = trigger
    prompt = task.probes["efficacy"][0].prompt
    with pytest.raises(ConfigError, match="reference 'cf red' has 3 tokens but prompt"):
        at.batch_token_attributions(pm, tok, [prompt], "black", references=[["cf red"]])
    with pytest.raises(ConfigError, match="equals the prompt"):
        at.token_attributions(pm, tok, prompt, "black", references=[prompt])
    with pytest.raises(ConfigError, match="empty list of reference prompts"):
        at.batch_token_attributions(pm, tok, [prompt], "black", references=[[]])
    with pytest.raises(ConfigError, match="got 1 prompts but 2 reference lists"):
        at.batch_token_attributions(pm, tok, [prompt], "black", references=[[prompt], [prompt]])
    with pytest.raises(ConfigError, match="output='odds' is unknown"):
        at.token_attributions(pm, tok, prompt, "black", output="odds")
    with pytest.raises(ConfigError, match="references='decoys' must be 'counterfactual', None"):
        at.trigger_recovery(pm, tok, task, references="decoys")
