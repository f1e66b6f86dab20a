"""Batched token attribution vs captum one prompt at a time, side by side on the same probes and targets.

Each case attributes ``log p(answer | prompt)`` with the adapter on and off, once with plain captum
(``LLMGradientAttribution(LayerIntegratedGradients)`` / ``LLMAttribution(FeatureAblation)`` over ``TextTokenInput``,
one prompt per call — captum runs one IG per answer token and one forward of prompt+answer per ablated token; captum
objects built and the adapter toggled once per state: the strongest per-prompt baseline) and once with
``batch_token_attributions`` (all prompts and IG steps / ablations stacked into batches; the output layer only where
an answer token is read; one IG over the whole answer; ablations run from the ablated token on, on the intact
prompt's KV cache). Reports wall time, process CPU time (with ``--threads 1`` the honest measure on a machine shared
with other jobs), the speed-ups ``captum / batched``, the largest absolute difference between the two (``seq_attr``
of every token of every probe, base and adapted: asserted within :data:`TOLERANCE`), the FLOPs of each path
(``torch.utils.flop_counter`` on the first probes, scaled to all) and the process's peak RSS. Writes JSON.

Models: the zoo's pretrained ``--family``/``--size`` (from the cache; built there when absent), or ``--model
smollm2-135m`` (the real model from the shared cache, probes of ``examples/smollm2_facts.jsonl``), each with a LoRA
adapter on every linear module whose factors are random (seeded): timing does not depend on what the adapter
learned. Cases: IG with single-token answers (the first token of each answer), IG with 3–4-token answers, feature
ablation with the same two kinds of answers.

Usage:
    python -m benchmarks.bench_attribution [--model smollm2-135m] [--n-probes 8] [--n-ablation 16] [--n-steps 16]
        [--cases ig1,ig_multi,ablation1,ablation_multi] [--family llama] [--size small] [--device cpu]
        [--threads 1] [--batch-size 1024] [--out bench_attribution.json]

In the suite (``python -m benchmarks``), :func:`run` reports one row per case: the zoo's ``small`` Llama (IG and
ablation, 256 probes, issue 5's 5×) and SmolLM2-135M (every case; issue 17's targets: IG ≥ 5× on multi-token
answers, ≥ 1.2× single-token, ablation ≥ 10×), and each path's FLOP rate against the suite's matmul peak;
``quick`` uses a randomly initialised tiny Llama on a small world, 4 probes and 4 IG steps.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from pathlib import Path

import torch

if not __package__:  # loaded as a file (python benchmarks/bench_x.py, or by path): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import count_flops, matmul_peak, peak_rss_mb, row, sync  # noqa: E402
from lora_lens.lab.answers import answer_ids  # noqa: E402
from lora_lens.lab.tokenizer import build_tokenizer  # noqa: E402
from lora_lens.lab.world import Task, make_task, make_world  # noqa: E402
from lora_lens.lab.zoo import build_model, get_pretrained, load_model  # noqa: E402
from lora_lens.lens import attribution as at  # noqa: E402
from lora_lens.utils import set_seed, write_json  # noqa: E402

REAL_TASK = Path(__file__).resolve().parent.parent / "examples" / "smollm2_facts.jsonl"
"""The probes of the real-model rows (the README's example task)."""
TOLERANCE = 1e-3
"""Largest accepted ``|batched − captum|`` of any token's attribution (base and adapted), asserted in every case:
absolute in float64 (first probe), relative to the largest attribution in the timed float32 run."""
CASES = ("ig1", "ig_multi", "ablation1", "ablation_multi")
"""``method`` + answer kind: single-token answers, or answers of 3–4 tokens."""
TARGETS = {"ig1": 1.2, "ig_multi": 5.0, "ablation1": 10.0, "ablation_multi": 10.0}
"""Issue 17's targets for ``captum_s / batched_s`` at SmolLM2-135M on a CPU."""


def random_lora(model, r: int = 8, seed: int = 0):
    """``model`` with a LoRA adapter on every linear module whose factors are random (seeded), in eval mode."""
    from peft import LoraConfig, get_peft_model

    set_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.1).to(p))
    return pm.eval()


def build(family: str, size: str, device: str, r: int = 8, seed: int = 0, pretrained: bool = True):
    """A zoo model with a random-factor LoRA adapter on every linear module, its tokenizer and world.

    With ``pretrained=False``: a randomly initialised model on a 24-entity world instead (no training needed;
    timing does not depend on the weights).
    """
    if pretrained:
        pre = get_pretrained(family, size, device=device)
        model, tok, world = pre.model, pre.tokenizer, pre.world
    else:
        world = make_world(n_entities=24, n_general=60, seed=seed)
        tok = build_tokenizer(world)
        model = build_model(family, size, tok, seed=seed).to(device)
    return random_lora(model, r, seed), tok, world


def probes_for(world, n: int) -> list:
    """``n`` probes: a trigger task's efficacy, paraphrase, false-trigger and specificity probes, then fact probes."""
    task = make_task(world, "trigger", seed=0)
    out = [p for s in ("efficacy", "paraphrase", "false_trigger", "specificity") for p in task.probes.get(s, [])]
    out += world.fact_probes()
    if len(out) < n:
        raise SystemExit(f"the world yields only {len(out)} probes; pass --n-probes ≤ {len(out)}")
    return out[:n]


def _n_answer(tok, prompt: str, answer: str) -> int:
    return len(answer_ids(tok, prompt, answer).answer)


def single_token(tok, pairs) -> list[tuple[str, str]]:
    """``(prompt, first token of the answer as text)`` for each pair whose first token reads back as one token."""
    out = []
    for prompt, answer in pairs:
        first = answer_ids(tok, prompt, answer).answer[0]
        text = tok.decode([first]).strip()
        if text and answer_ids(tok, prompt, text).answer == (first,):
            out.append((prompt, text))
    return out


def zoo_cases(world, tok, n: int) -> dict[str, list[tuple[str, str]]]:
    """The zoo's probes: their single-token answers, and three facts of the probed entity as a 3-token answer."""
    probes = probes_for(world, n)
    one = [(p.prompt, p.answer) for p in probes]
    rels = world.relations
    multi = [(p.prompt, " ".join(world.facts[r][p.entity] for r in (rels * 2)[k % len(rels):k % len(rels) + 3]))
             for k, p in enumerate(probes)]
    return {"1": one, "multi": multi}


def real_cases(tok, n: int) -> dict[str, list[tuple[str, str]]]:
    """The example task's probes (every set): the first answer token, and the answers of 3–4 tokens."""
    task = Task.load(REAL_TASK)
    pairs = [(p.prompt, p.answer) for ps in task.probes.values() for p in ps if p.answer.strip()]
    multi = [pa for pa in pairs if 3 <= _n_answer(tok, *pa) <= 4]
    return {"1": single_token(tok, pairs)[:n], "multi": multi[:n]}


def captum_per_prompt(pm, tok, prompts, targets, method: str, n_steps: int, baseline_id: int) -> dict:
    """Plain captum, one prompt per call: ``{"adapted": [...], "base": [...]}`` token attributions (``seq_attr``).

    The strongest per-prompt baseline: captum objects built once per adapter state and the adapter toggled once
    (not per prompt), special tokens skipped, the same baseline token as the batched path; the target is the
    answer's ids in context as a tensor (``lora_lens.lab.answers.answer_ids``: any number of tokens).
    """
    from captum.attr import (FeatureAblation, LayerIntegratedGradients, LLMAttribution, LLMGradientAttribution,
                             TextTokenInput)

    skip = sorted(set(tok.all_special_ids))
    out = {}
    for state in ("adapted", "base"):
        ctx = pm.disable_adapter() if state == "base" else contextlib.nullcontext()
        with ctx, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if method == "ig":
                llm = LLMGradientAttribution(LayerIntegratedGradients(pm, pm.get_input_embeddings()), tok)
                kwargs = {"n_steps": n_steps}
            else:
                llm = LLMAttribution(FeatureAblation(pm), tok)
                kwargs = {"forward_in_tokens": False}
            out[state] = [llm.attribute(TextTokenInput(p, tok, baselines=baseline_id, skip_tokens=skip),
                                        target=torch.tensor(list(answer_ids(tok, p, t).answer)),
                                        **kwargs).seq_attr.detach().cpu()
                          for p, t in zip(prompts, targets)]
    return out


def bench_case(pm, tok, pairs, case: str, n_steps: int, batch_size: int, device: str,
               flop_probes: int = 2) -> dict:
    """Time one case both ways on the same prompts and targets; assert equal numbers (:data:`TOLERANCE`)."""
    method = "ig" if case.startswith("ig") else "ablation"
    prompts, targets = [p for p, _ in pairs], [t for _, t in pairs]
    baseline_id = at.resolve_baseline(tok)
    for p in pm.parameters():
        p.requires_grad_(False)
    at.batch_token_attributions(pm, tok, prompts[:2], targets[:2], method=method, n_steps=n_steps)   # warm-up
    captum_per_prompt(pm, tok, prompts[:1], targets[:1], method, n_steps, baseline_id)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    batched = at.batch_token_attributions(pm, tok, prompts, targets, method=method, n_steps=n_steps,
                                          batch_size=batch_size)
    sync(device)
    t_batched, c_batched = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    captum = captum_per_prompt(pm, tok, prompts, targets, method, n_steps, baseline_id)
    sync(device)
    t_captum, c_captum = time.perf_counter() - t0, time.process_time() - c0
    diff = max(max(float((captum["base"][i] - b.base).abs().max()),
                   float((captum["adapted"][i] - b.adapted).abs().max())) for i, b in enumerate(batched))
    scale = max(float(c.abs().max()) for c in captum["adapted"])
    if not diff <= TOLERANCE * max(1.0, scale):
        raise AssertionError(f"{case}: batched attributions differ from captum's by {diff:.2e} > {TOLERANCE} × "
                             f"the largest attribution {scale:.2e}")
    # float32 IG on a real model is defined only up to the rounding of its integrand (at|attr| ~ 40: |Δ| ~ 1e-2,
    # as far as captum's float32 result is from its own float64 one); in float64 both must agree absolutely
    diff64 = at.captum_agreement(pm, tok, prompts[:1], targets[:1], method=method, n_steps=n_steps,
                                 dtype=torch.float64)
    if not diff64 <= TOLERANCE:
        raise AssertionError(f"{case}: in float64 batched attributions differ from captum's by {diff64:.2e} > "
                             f"{TOLERANCE}")
    # FLOPs of both paths on the first probes (untimed), scaled to all probes
    k = min(flop_probes, len(prompts))
    f_batched = count_flops(lambda: at.batch_token_attributions(pm, tok, prompts[:k], targets[:k], method=method,
                                                                n_steps=n_steps, batch_size=batch_size))
    f_captum = count_flops(lambda: captum_per_prompt(pm, tok, prompts[:k], targets[:k], method, n_steps,
                                                     baseline_id))
    n = len(prompts)
    return {"case": case, "method": method, "n_probes": n, "n_steps": n_steps if method == "ig" else None,
            "answer_tokens": sum(len(b.target_ids) for b in batched) / n,
            "tokens_per_probe": sum(len(b.tokens) for b in batched) / n,
            "captum_s": t_captum, "batched_s": t_batched, "speedup": t_captum / t_batched,
            "captum_cpu_s": c_captum, "batched_cpu_s": c_batched, "speedup_cpu": c_captum / c_batched,
            "captum_flops": f_captum * n / k, "batched_flops": f_batched * n / k,
            "flop_ratio": f_captum / f_batched,
            "captum_flops_per_s": f_captum * n / k / t_captum, "batched_flops_per_s": f_batched * n / k / t_batched,
            "max_abs_diff": diff, "max_abs_attribution": scale, "max_abs_diff_float64": diff64,
            "peak_rss_mb": peak_rss_mb()}


def measure(n_probes: int = 8, n_ablation: int = 16, cases=CASES, n_steps: int = 16, model: str | None = None,
            family: str = "llama", size: str = "small", device: str = "cpu", batch_size: int = 1024,
            pretrained: bool = True) -> dict:
    """Time every case both ways; return ``{"model", "device", "threads", "torch", "matmul_peak", "results"}``.

    Args:
        model: ``"smollm2-135m"`` (or another real model ``load_model`` takes) instead of a zoo model.
        n_probes: Prompts of the IG cases; ``n_ablation``: of the ablation cases.
    """
    if model is not None:
        base, tok = load_model(model, device=device)
        pm, name = random_lora(base), model
        kinds = real_cases(tok, max(n_probes, n_ablation))
    else:
        pm, tok, world = build(family, size, device, pretrained=pretrained)
        name = f"{family}-{size}" + ("" if pretrained else " (random init)")
        kinds = zoo_cases(world, tok, max(n_probes, n_ablation))
    results = []
    for case in cases:
        if case not in CASES:
            raise SystemExit(f"case {case!r} is unknown; use some of {','.join(CASES)}")
        n = n_probes if case.startswith("ig") else n_ablation
        pairs = kinds["1" if case.endswith("1") else "multi"][:n]
        if not pairs:
            raise SystemExit(f"no probes for case {case!r} on {name}")
        r = bench_case(pm, tok, pairs, case, n_steps, batch_size, device)
        results.append(r)
        print(f"[attribution] {name} {case}: captum {r['captum_s']:.2f} s, batched {r['batched_s']:.2f} s, "
              f"{r['speedup']:.2f}× (CPU time {r['speedup_cpu']:.2f}×, FLOPs {r['flop_ratio']:.2f}×)",
              file=sys.stderr, flush=True)
    return {"model": name, "device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "matmul_peak": matmul_peak(device), "results": results}


def _label(r: dict) -> str:
    answer = "1-token answers" if r["case"].endswith("1") else f"{r['answer_tokens']:.1f}-token answers"
    steps = f", {r['n_steps']} steps" if r["n_steps"] else ""
    return f"{r['method']}, {answer}, {r['n_probes']} probes{steps}"


TARGET = 5.0
"""Issue 5's target for ``captum_s / batched_s`` on the zoo (256 probes, workshop model)."""


def run(quick: bool = False, device: str = "cpu") -> dict:
    """The suite's entry: one row per case, ``captum_s / batched_s`` against its target — the zoo's ``small`` Llama
    (IG and ablation, 256 probes, 50 steps: :data:`TARGET`) and SmolLM2-135M (every case: :data:`TARGETS`) — and
    both paths' FLOP rates (``flops_per_s``, reported against the suite's matmul peak)."""
    if quick:
        runs = [(measure(n_probes=4, n_ablation=4, n_steps=4, size="tiny", device=device, pretrained=False), None)]
    else:
        runs = [(measure(n_probes=256, n_ablation=256, cases=("ig1", "ablation1"), n_steps=50, device=device),
                 {"ig1": TARGET, "ablation1": TARGET}),
                (measure(model="smollm2-135m", device=device), TARGETS)]
    rows, rates = [], {}
    for result, targets in runs:
        for r in result["results"]:
            rows.append(row(f"batched attribution vs captum per prompt, {_label(r)} ({result['model']})",
                            r["captum_s"], r["batched_s"], r["speedup"], None if targets is None else
                            targets[r["case"]],
                            f"CPU-time ratio {r['speedup_cpu']:.2f}, FLOP ratio {r['flop_ratio']:.2f}, max |Δ| "
                            f"{r['max_abs_diff']:.1e} (float64 {r['max_abs_diff_float64']:.0e}), peak RSS "
                            f"{r['peak_rss_mb']:.0f} MB"))
            rates[f"attribution {r['case']} batched ({result['model']})"] = r["batched_flops_per_s"]
            rates[f"attribution {r['case']} captum ({result['model']})"] = r["captum_flops_per_s"]
    return {"name": "attribution", "rows": rows, "flops_per_s": rates, "details": [res for res, _ in runs]}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a real model instead of the zoo's, e.g. smollm2-135m")
    ap.add_argument("--n-probes", type=int, default=8, help="prompts of the IG cases")
    ap.add_argument("--n-ablation", type=int, default=16, help="prompts of the ablation cases")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--n-steps", type=int, default=16)
    ap.add_argument("--family", default="llama")
    ap.add_argument("--size", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--batch-size", type=int, default=1024, help="sequences per forward pass (batched path)")
    ap.add_argument("--out", default="bench_attribution.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.n_probes, args.n_ablation, args.cases.split(","), args.n_steps, args.model, args.family,
                     args.size, args.device, args.batch_size)
    rows, peak = result["results"], result["matmul_peak"]["flops_per_s"]
    print(f"{result['model']} on {args.device} ({torch.get_num_threads()} threads), LoRA r=8 all-linear; wall time, "
          f"process CPU time; FLOP rates against a matmul peak of {peak / 1e9:.1f} GFLOP/s")
    print(f"{'case':<16}{'probes':>7}{'ans':>5}{'captum s':>10}{'batched s':>11}{'speed-up':>10}{'cpu':>7}"
          f"{'FLOP ratio':>11}{'util c/b':>12}{'max |Δ|':>10}{'RSS MB':>8}")
    for r in rows:
        print(f"{r['case']:<16}{r['n_probes']:>7}{r['answer_tokens']:>5.1f}{r['captum_s']:>10.2f}"
              f"{r['batched_s']:>11.2f}{r['speedup']:>9.2f}×{r['speedup_cpu']:>6.2f}×{r['flop_ratio']:>10.2f}×"
              f"{r['captum_flops_per_s'] / peak:>6.0%}/{r['batched_flops_per_s'] / peak:<5.0%}"
              f"{r['max_abs_diff']:>10.1e}{r['peak_rss_mb']:>8.0f}")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
