"""Batched generation with a KV cache vs ``model.generate`` called prompt by prompt, side by side.

Times :func:`lora_lens.studies.generation.generate` (left padding, one forward pass over the whole batch per new
token, KV cache) against a loop of Hugging Face ``model.generate(..., do_sample=False)`` calls, one per prompt, on the same
prompts and the same zoo model (freshly initialised: speed does not depend on training). Greedy outputs are
checked to be equal, and the speed-up ``per-prompt / batched`` is reported. A second row times the contrastive
setting (adapted and base model stepped together, KL per token) against per-prompt ``generate`` of the adapted
model alone, i.e. twice the work for the batched side.

Usage:
    python -m benchmarks.bench_generate [--out bench_generate.json] [--quick] [--threads 1] [--size small]
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import LoraConfig, get_peft_model

from lora_lens.lab.tokenizer import build_tokenizer
from lora_lens.lab.train import target_modules
from lora_lens.lab.world import make_world
from lora_lens.lab.zoo import build_model
from lora_lens.studies.generation import generate
from lora_lens.utils import write_json

TARGET = 5.0
"""Speed-up we expect of batching 64 prompts on a CPU (one forward per step instead of 64)."""


def per_prompt(model, tok, prompts: list[str], n: int, stop_id: int) -> list[list[int]]:
    out = []
    for p in prompts:
        enc = tok(p, return_tensors="pt").to(model.device)
        ids = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=[tok.eos_token_id, stop_id],
                             pad_token_id=tok.pad_token_id)
        out.append(ids[0, enc["input_ids"].shape[1]:].tolist())
    return out


def _timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def run(quick: bool = False, device: str = "cpu", size: str = "small", family: str = "llama",
        threads: int | None = 1) -> dict:
    """Run the benchmark and return ``{"name", "rows": [{comparison, baseline_s, ours_s, ratio, target, note}],
    "meta"}``.

    Args:
        quick: 16 prompts of a tiny model instead of 64 of ``size``.
        device: Torch device of the model.
        size: Zoo size preset of the model.
        family: Zoo family.
        threads: ``torch.set_num_threads`` during the run (None leaves it).
    """
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        world = make_world(n_entities=24 if quick else 200, n_general=60, seed=0)
        tok = build_tokenizer(world)
        size = "tiny" if quick else size
        model = build_model(family, size, tok, seed=0).to(device).eval()
        n_prompts, n_new = (16, 4) if quick else (64, 6)
        prompts = [f"{e} lives in" if i % 2 else f"The favourite colour of {e} is"
                   for i, e in enumerate((world.entities * 4)[:n_prompts])]
        stop_id = tok(" .", add_special_tokens=False)["input_ids"][0]
        with torch.no_grad():
            generate(model, tok, prompts[:2], n_new)                      # warm-up
            ref, t_loop = _timed(lambda: per_prompt(model, tok, prompts, n_new, stop_id))
            ours, t_batch = _timed(lambda: generate(model, tok, prompts, n_new, batch_size=n_prompts))
        equal = ours.tokens == ref
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=target_modules(model, "attn"),
                                                      init_lora_weights=False))
        with torch.no_grad():
            _, t_loop_a = _timed(lambda: per_prompt(peft_model, tok, prompts, n_new, stop_id))
            _, t_pair = _timed(lambda: generate(peft_model, tok, prompts, n_new, batch_size=n_prompts,
                                                base="adapter"))
        rows = [{"comparison": f"greedy, {n_prompts} prompts × {n_new} tokens ({family} {size}): per-prompt "
                               "generate vs batched", "baseline_s": t_loop, "ours_s": t_batch,
                 "ratio": t_loop / t_batch, "target": TARGET,
                 "note": "greedy outputs equal" if equal else "greedy outputs DIFFER"},
                {"comparison": f"contrastive (adapted + base, KL per token) vs per-prompt generate of the adapted "
                               f"model alone, {n_prompts} prompts", "baseline_s": t_loop_a, "ours_s": t_pair,
                 "ratio": t_loop_a / t_pair, "target": None, "note": "batched side does twice the work"}]
        return {"name": "generate", "rows": rows,
                "meta": {"family": family, "size": size, "device": device, "prompts": n_prompts, "new_tokens": n_new,
                         "greedy_outputs_equal": equal, "threads": torch.get_num_threads(), "quick": quick}}
    finally:
        torch.set_num_threads(old)


def main(argv: list[str] | None = None) -> int:
    """Command line: print the rows and write them as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_generate.json", help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="tiny model, 16 prompts")
    ap.add_argument("--size", default="small", help="zoo size preset (default small)")
    ap.add_argument("--family", default="llama", help="zoo family (default llama)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = ap.parse_args(argv)
    result = run(quick=args.quick, device=args.device, size=args.size, family=args.family, threads=args.threads)
    for row in result["rows"]:
        target = f" (target ≥ {row['target']:g})" if row["target"] else ""
        print(f"{row['comparison']}: {row['baseline_s']:.3f} s vs {row['ours_s']:.3f} s → "
              f"×{row['ratio']:.1f}{target}")
    print(f"greedy outputs equal: {result['meta']['greedy_outputs_equal']}")
    write_json(args.out, result)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
