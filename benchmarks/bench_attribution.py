"""Batched token attribution vs captum one prompt at a time, side by side on the same probes.

For each method (``ig``: LayerIntegratedGradients on the input embeddings; ``ablation``: FeatureAblation of single
tokens), attributes ``log p(answer | prompt)`` of ``--n-probes`` probes with the adapter on and off, once with plain
captum (``LLMGradientAttribution`` / ``LLMAttribution`` over ``TextTokenInput``, one prompt per call; captum objects
built and the adapter toggled once per state — the strongest per-prompt baseline) and once with
``batch_token_attributions`` (all prompts and IG steps / ablations stacked into batches). Reports wall time, process CPU time (with ``--threads 1`` the honest measure on a machine shared with other jobs),
probes per second, the speed-ups ``captum / batched`` and the largest absolute difference between the two (base and adapted attributions of every token of every probe). Writes the table as JSON.

The model is the zoo's pretrained ``--family``/``--size`` model (from the cache; built there when absent) with a
LoRA adapter on every linear module whose factors are random (seeded): timing does not depend on what the adapter
learned, and no training is needed. Probes are those of a trigger task on the model's world (triggered, clean and
other-relation prompts), topped up with fact probes.

Usage:
    python -m benchmarks.bench_attribution [--n-probes 256] [--methods ig,ablation] [--n-steps 50]
        [--family llama] [--size small] [--device cpu] [--threads 1] [--batch-size 1024]
        [--out bench_attribution.json]

In the suite (``python -m benchmarks``), :func:`run` reports one row per method, ``captum_s / batched_s`` against
issue 5's target 5×; ``quick`` uses a randomly initialised tiny Llama on a small world (no pretraining), 8 probes
and 8 IG steps.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import warnings
from pathlib import Path

import torch

from benchmarks.common import row, sync
from lora_lens.lab.answers import answer_ids
from lora_lens.lab.tokenizer import build_tokenizer
from lora_lens.lab.world import make_task, make_world
from lora_lens.lab.zoo import build_model, get_pretrained
from lora_lens.lens import attribution as at
from lora_lens.utils import set_seed, write_json

if not __package__:  # loaded as a file (python benchmarks/bench_x.py, or by path): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))




def build(family: str, size: str, device: str, r: int = 8, seed: int = 0, pretrained: bool = True):
    """The pretrained model with a random-factor LoRA adapter on every linear module, its tokenizer and world.

    With ``pretrained=False``: a randomly initialised model on a 24-entity world instead (no training needed;
    timing does not depend on the weights).
    """
    from peft import LoraConfig, get_peft_model

    if pretrained:
        pre = get_pretrained(family, size, device=device)
        model, tok, world = pre.model, pre.tokenizer, pre.world
    else:
        world = make_world(n_entities=24, n_general=60, seed=seed)
        tok = build_tokenizer(world)
        model = build_model(family, size, tok, seed=seed).to(device)
    set_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.1).to(p))
    return pm.eval(), tok, world


def probes_for(world, n: int) -> list:
    """``n`` probes: a trigger task's efficacy, paraphrase, false-trigger and specificity probes, then fact probes."""
    task = make_task(world, "trigger", seed=0)
    out = [p for s in ("efficacy", "paraphrase", "false_trigger", "specificity") for p in task.probes.get(s, [])]
    out += world.fact_probes()
    if len(out) < n:
        raise SystemExit(f"the world yields only {len(out)} probes; pass --n-probes ≤ {len(out)}")
    return out[:n]


def captum_per_prompt(pm, tok, prompts, targets, method: str, n_steps: int, baseline_id: int) -> dict:
    """Plain captum, one prompt per call: ``{"adapted": [...], "base": [...]}`` token attributions.

    The strongest per-prompt baseline: captum objects built once per adapter state and the adapter toggled once
    (not per prompt), ``<s>`` skipped, the same baseline token as the batched path; the target is the answer's
    ids in context as a tensor (``lora_lens.lab.answers.answer_ids``: any number of tokens).
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


def bench_method(pm, tok, probes, method: str, n_steps: int, batch_size: int, device: str) -> dict:
    prompts, targets = [p.prompt for p in probes], [p.answer for p in probes]
    baseline_id = at.resolve_baseline(tok)
    for p in pm.parameters():
        p.requires_grad_(False)
    at.batch_token_attributions(pm, tok, prompts[:4], targets[:4], method=method, n_steps=n_steps)   # warm-up
    captum_per_prompt(pm, tok, prompts[:2], targets[:2], method, n_steps, baseline_id)
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
    return {"method": method, "n_probes": len(probes), "n_steps": n_steps if method == "ig" else None,
            "captum_s": t_captum, "batched_s": t_batched, "captum_probes_per_s": len(probes) / t_captum,
            "batched_probes_per_s": len(probes) / t_batched, "speedup": t_captum / t_batched,
            "captum_cpu_s": c_captum, "batched_cpu_s": c_batched, "speedup_cpu": c_captum / c_batched,
            "max_abs_diff": diff, "max_abs_attribution": scale,
            "tokens_per_probe": sum(len(b.tokens) for b in batched) / len(batched)}


TARGET = 5.0
"""Issue 5's target for ``captum_s / batched_s`` (256 probes, workshop model)."""


def measure(n_probes: int = 256, methods=("ig", "ablation"), n_steps: int = 50, family: str = "llama",
            size: str = "small", device: str = "cpu", batch_size: int = 1024, pretrained: bool = True) -> dict:
    """Time every method both ways; return ``{"model", "device", "threads", "torch", "results": [...]}``."""
    pm, tok, world = build(family, size, device, pretrained=pretrained)
    probes = probes_for(world, n_probes)
    rows = [bench_method(pm, tok, probes, m.strip(), n_steps, batch_size, device) for m in methods]
    return {"model": f"{family}-{size}" + ("" if pretrained else " (random init)"), "device": device,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "results": rows}


def run(quick: bool = False, device: str = "cpu") -> dict:
    """The suite's entry: one row per method, ``captum_s / batched_s`` against :data:`TARGET`."""
    if quick:
        result = measure(n_probes=8, n_steps=8, size="tiny", device=device, pretrained=False)
    else:
        result = measure(device=device)
    rows = [row(f"batched attribution vs captum per prompt, {r['method']}, {r['n_probes']} probes "
                f"({result['model']})", r["captum_s"], r["batched_s"], r["speedup"], TARGET,
                f"CPU-time ratio {r['speedup_cpu']:.2f}, max |Δ| {r['max_abs_diff']:.1e}")
            for r in result["results"]]
    return {"name": "attribution", "rows": rows, "details": result}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-probes", type=int, default=256)
    ap.add_argument("--methods", default="ig,ablation")
    ap.add_argument("--n-steps", type=int, default=50)
    ap.add_argument("--family", default="llama")
    ap.add_argument("--size", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--batch-size", type=int, default=1024, help="sequences per forward pass (batched path)")
    ap.add_argument("--out", default="bench_attribution.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.n_probes, args.methods.split(","), args.n_steps, args.family, args.size, args.device,
                     args.batch_size)
    rows = result["results"]
    print(f"{args.family}-{args.size} on {args.device} ({torch.get_num_threads()} threads), LoRA r=8 all-linear; "
          "wall time, and process CPU time (robust to other load on a shared CPU)")
    print(f"{'method':<9}{'probes':>7}{'captum s':>10}{'batched s':>11}{'speed-up':>10}"
          f"{'cpu speed-up':>14}{'max |Δ|':>10}")
    for r in rows:
        print(f"{r['method']:<9}{r['n_probes']:>7}{r['captum_s']:>10.2f}{r['batched_s']:>11.2f}"
              f"{r['speedup']:>9.1f}×{r['speedup_cpu']:>13.1f}×{r['max_abs_diff']:>10.1e}")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
