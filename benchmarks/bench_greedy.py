"""Greedy answers with a KV cache vs a full forward pass per new token, side by side.

The baseline is the decoder ``lora_lens.lab.answers`` had before (:func:`uncached_greedy`, kept here as the
baseline only): every new token is one forward pass over the whole right-padded sequence. Ours is
:func:`lora_lens.lab.decoding.greedy_continuations` (left padding, the prompt read once into a KV cache, then one
token per row and step, ended rows dropped). Rows, each side by side in one run:

1. the decoder alone: the example task's probe prompts on SmolLM2-135M (batch 16, 16 new tokens, the same stop
   ids on both sides), with the number of identical continuations;
2. :func:`lora_lens.lab.probes.evaluate` on the example task with an adapter fitted on it (free answers of the
   adapted and the base model), before (the baseline decoder at batch 16, continuing to ``max_new_tokens`` or a
   stop id) and after (ours, ending each row where its answer's cut is final);
3. the task's behaviour diff (:func:`lora_lens.lens.diff.behaviour.behaviour_diff` with ``task=``), before and
   after as in 2.

``--quick`` runs row 1 only, on a freshly initialised zoo model (speed does not depend on training).

Usage:
    python -m benchmarks.bench_greedy [--out bench_greedy.json] [--quick] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from lora_lens.lab import answers
from lora_lens.lab.decoding import greedy_continuations
from lora_lens.lab.pair import inference, keeps_logits, model_device, pad_token_id
from lora_lens.utils import write_json

TARGET = 3.0
"""Speed-up we expect of the KV cache at 16 new tokens after ~10-token prompts on a CPU (each step reads one token
instead of the whole sequence; the weights are read once per step either way)."""

EXAMPLE_TASK = Path(__file__).resolve().parent.parent / "examples" / "smollm2_facts.jsonl"


def uncached_greedy(model, seqs: list[list[int]], pad: int, max_new_tokens: int, stop, batch_size: int = 16,
                    ) -> list[list[int]]:
    """The baseline: greedy continuations by full forward passes of the right-padded batch at every new token."""
    device = model_device(model)
    keep = keeps_logits(model)
    result: list[list[int]] = []
    for start in range(0, len(seqs), batch_size):
        chunk = [list(s) for s in seqs[start:start + batch_size]]
        out: list[list[int]] = [[] for _ in chunk]
        live = list(range(len(chunk)))
        for _ in range(max_new_tokens):
            if not live:
                break
            rows = [chunk[i] + out[i] for i in live]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, :len(row)] = torch.tensor(row)
                mask[r, :len(row)] = 1
            last = torch.tensor([len(r) - 1 for r in rows])
            if keep:
                pos, where = torch.unique(last, return_inverse=True)
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                               logits_to_keep=pos.to(device)).logits
                nxt = logits[torch.arange(len(rows)), where.to(logits.device)].argmax(-1).tolist()
            else:
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                nxt = logits[torch.arange(len(rows)), last.to(logits.device)].argmax(-1).tolist()
            for i, t in zip(live, nxt):
                out[i].append(int(t))
            live = [i for i in live if out[i][-1] not in stop]
        result += out
    return result


@contextlib.contextmanager
def uncached_answers():
    """Inside: :mod:`lora_lens.lab.answers` decodes with :func:`uncached_greedy` at batch 16 (the code before)."""
    ours = answers.greedy_continuations

    def before(model, seqs, pad_id, max_new_tokens, stop_ids=(), done=None, batch_size=64):
        return uncached_greedy(model, seqs, pad_id, max_new_tokens, set(stop_ids), 16)

    answers.greedy_continuations = before
    try:
        yield
    finally:
        answers.greedy_continuations = ours


def _timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def _decoder_row(model, seqs, pad, stop, n_new: int, label: str) -> tuple[dict, dict]:
    with inference(model):
        greedy_continuations(model, seqs[:2], pad, 2, stop)                             # warm-up
        ref, t_ref = _timed(lambda: uncached_greedy(model, seqs, pad, n_new, stop, 16))
        ours, t_ours = _timed(lambda: greedy_continuations(model, seqs, pad, n_new, stop, batch_size=16))
    same = sum(a == b for a, b in zip(ours, ref))
    row = {"comparison": f"greedy decoding, {len(seqs)} prompts × {n_new} new tokens, batch 16 ({label}): full "
                         "forward per token vs KV cache", "baseline_s": t_ref, "ours_s": t_ours,
           "ratio": t_ref / t_ours, "target": TARGET,
           "note": f"{same}/{len(seqs)} continuations identical"}
    return row, {"identical": same, "prompts": len(seqs), "new_tokens": n_new}


def run(quick: bool = False, device: str = "cpu", threads: int | None = 1, cache: str | None = None) -> dict:
    """Run the benchmark: ``{"name", "rows": [...], "meta"}``.

    Args:
        quick: Row 1 only, on a tiny freshly initialised zoo Llama.
        device: Torch device.
        threads: ``torch.set_num_threads`` during the run (None leaves it).
        cache: Model/adapter cache root for the SmolLM2 fit (default the package's cache).
    """
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        if quick:
            from lora_lens.lab.tokenizer import build_tokenizer
            from lora_lens.lab.world import make_world
            from lora_lens.lab.zoo import build_model

            world = make_world(n_entities=24, n_general=60, seed=0)
            tok = build_tokenizer(world)
            model = build_model("llama", "tiny", tok, seed=0).to(device)
            prompts = [f"{e} lives in" if i % 2 else f"The favourite colour of {e} is"
                       for i, e in enumerate(world.entities[:16])]
            seqs = [tok(p)["input_ids"] for p in prompts]
            row, meta = _decoder_row(model, seqs, tok.pad_token_id, {tok.eos_token_id}, 8, "zoo llama tiny")
            return {"name": "greedy", "rows": [row], "meta": {**meta, "quick": True, "device": device}}

        from lora_lens.lab.probes import evaluate
        from lora_lens.lab.study import fit_adapter
        from lora_lens.lab.world import Task
        from lora_lens.lens.diff.behaviour import behaviour_diff

        task = Task.load(EXAMPLE_TASK)
        fit = fit_adapter("smollm2-135m", EXAMPLE_TASK, seed=0, steps=20, device=device, cache=cache)
        model, tok = fit.model, fit.tokenizer
        prompts = list(dict.fromkeys(p.prompt for ps in task.probes.values() for p in ps))
        seqs = [tok(answers.render_prompt(tok, p, task.chat))["input_ids"] for p in prompts]
        stop = {tok.eos_token_id, *tok.all_special_ids}
        with model.disable_adapter():
            row1, meta = _decoder_row(model, seqs, pad_token_id(tok), stop, 16, "SmolLM2-135M")
        with uncached_answers():
            ev_before, t_ev0 = _timed(lambda: evaluate(model, tok, task))
            diff_before, t_d0 = _timed(lambda: behaviour_diff(model, tok, task=task))
        ev_after, t_ev1 = _timed(lambda: evaluate(model, tok, task))
        diff_after, t_d1 = _timed(lambda: behaviour_diff(model, tok, task=task))
        same_ev = ev_before.metrics_json() == ev_after.metrics_json()
        cols = ["base_answer", "adapted_answer", "changed"]
        same_diff = diff_before[cols].equals(diff_after[cols])
        rows = [row1,
                {"comparison": f"probes.evaluate, example task ({sum(map(len, task.probes.values()))} probes, "
                               "SmolLM2 + fitted adapter): before vs after", "baseline_s": t_ev0, "ours_s": t_ev1,
                 "ratio": t_ev0 / t_ev1, "target": None,
                 "note": "metrics identical" if same_ev else "metrics DIFFER"},
                {"comparison": "behaviour diff of the example task (task=, SmolLM2 + fitted adapter): before vs after",
                 "baseline_s": t_d0, "ours_s": t_d1, "ratio": t_d0 / t_d1, "target": None,
                 "note": "answers identical" if same_diff else "answers DIFFER"}]
        return {"name": "greedy", "rows": rows,
                "meta": {**meta, "device": device, "threads": torch.get_num_threads(), "quick": False,
                         "evaluate_identical": same_ev, "diff_identical": same_diff}}
    finally:
        torch.set_num_threads(old)


def main(argv: list[str] | None = None) -> int:
    """Command line: print the rows and write them as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_greedy.json", help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="decoder only, tiny zoo model")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--cache", default=None, help="cache root for the SmolLM2 adapter fit")
    args = ap.parse_args(argv)
    result = run(quick=args.quick, device=args.device, threads=args.threads, cache=args.cache)
    for row in result["rows"]:
        target = f" (target ≥ {row['target']:g})" if row["target"] else ""
        print(f"{row['comparison']}: {row['baseline_s']:.3f} s vs {row['ours_s']:.3f} s → "
              f"×{row['ratio']:.2f}{target}; {row['note']}")
    write_json(args.out, result)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
