"""Training throughput of ``lora_lens.lab.train.train_lora`` vs the plain ``Trainer`` + ``peft`` loop, side by side.

Both runs train the same model (same architecture, same initial weights), on the same examples, with the same LoRA
shape, learning rate, batch size and number of steps. The plain loop is what a user would write from the PEFT and
Transformers docs: ``get_peft_model`` + ``DataCollatorForLanguageModeling(mlm=False)`` + ``Trainer`` with default
arguments. ``train_lora`` adds answer-only labels, the non-finite-loss guard, progress handling and metrics.

Throughput is real (non-padding) tokens per second of the training loop, timed by the same ``TrainerCallback``
(``on_train_begin`` → ``on_train_end``) in both loops; also per second of process CPU time, which a busy shared
machine disturbs less than wall time; and end to end (the whole call: set-up, training and final metrics). Runs
alternate between the two (A B B A …) and the best of ``--repeats`` is the headline: on a shared machine the slower
runs measure the neighbours, not the code. The ratio is ``train_lora / plain`` (≥ 1 means no overhead).

Achieved FLOP/s uses the standard estimate for training with a frozen base:

    FLOPs = T_pad · (2·N + 2·N + 6·N_lora + 12·L·S·d_attn)

with ``N`` the parameters of every matmul of the base (all linear layers incl. the LM head; embeddings lookups
are free), ``2·N`` per token forward, ``2·N`` backward for activation gradients only (frozen weights get no weight
gradient), ``6·N_lora`` for the LoRA factors (forward, activation and weight gradients), and ``12·L·S·d_attn`` for
attention scores and the weighted sum (``S`` the padded sequence length, forward 4·S·d per layer, backward twice
that); ``T_pad`` counts padded tokens, the ones the hardware actually computes. Utilisation is that rate over a
matmul peak measured in the same run (a large float32 ``torch.matmul``: ``2·n³`` FLOPs). That estimate is the plain
loop's work; ``train_lora`` projects logits only where an answer token is read, so each loop's FLOPs are also
*counted* (``torch.utils.flop_counter`` over its untimed warm-up run, per real token) and reported as
``counted_utilisation``: what the loop computes per second against the peak.

``--model smollm2-135m`` trains a real model (the shared cache) on the example task's examples
(``examples/smollm2_facts.jsonl``) under the ``data`` defaults, without rehearsal.

Usage:
    python -m benchmarks.bench_train [--size base] [--steps 30] [--batch-size 32] [--repeats 3] [--device cpu]
                                     [--threads N] [--family llama] [--pretrained] [--model smollm2-135m]
                                     [--out bench_train.json]

In the suite (``python -m benchmarks``), :func:`run` reports the throughput ratio against issue 3's target 0.95
and hands ``train_lora``'s achieved FLOP/s to the suite, which divides it by the matmul peak of the same run;
``quick`` trains the ``tiny`` preset for 3 steps, once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments
from transformers.pytorch_utils import Conv1D

from benchmarks.common import flop_counter, matmul_peak, row, sync
from lora_lens.lab.tokenizer import build_tokenizer
from lora_lens.lab.train import LoraSpec, default_spec, linear_modules, lora_config, matched_modules, train_lora
from lora_lens.lab.train_data import replay_examples
from lora_lens.lab.world import Task, make_task, make_world
from lora_lens.lab.zoo import build_model, get_pretrained, load_model
from lora_lens.utils import write_json

if not __package__:  # loaded as a file (python benchmarks/bench_x.py, or by path): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))




def flops_per_token(model, spec: LoraSpec, seq_len: float) -> dict:
    """The estimate in the module docstring, per padded token, for ``model`` with ``spec``'s LoRA."""
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    layers = linear_modules(model)
    chosen = matched_modules(model, spec.targets)
    n_lora = sum(spec.rank * (layers[n]["in"] + layers[n]["out"]) for n in chosen)
    cfg = model.config
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")
    d_attn = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    attn = 12 * n_layers * seq_len * d_attn
    return {"n_matmul": n_matmul, "n_lora": n_lora, "attention_per_token": attn,
            "per_token": 4 * n_matmul + 6 * n_lora + attn}


def setup(size: str, family: str, pretrained: bool, task_name: str, model: str | None = None,
          config: dict | None = None):
    """World, tokenizer, a model factory (fresh identical copies) and the training examples.

    ``model``: a real model ``load_model`` takes (e.g. ``smollm2-135m``), trained on the examples of the README's
    example task (``examples/smollm2_facts.jsonl``; no world). ``config`` (with ``model`` for the tokenizer): a
    ``transformers`` config dict (``model_type`` and sizes) built with random weights instead of the real ones
    (timing at a larger real shape, nothing downloaded).
    """
    if model is not None:
        from benchmarks.bench_attribution import REAL_TASK

        _, tok = load_model(model)
        if config is not None:
            factory = lambda: random_model(config)  # noqa: E731
            source = f"{config['model_type']} config {config} (random init: throughput does not depend on weights)"
        else:
            factory = lambda: load_model(model)[0]  # noqa: E731
            source = model
        return None, tok, factory, Task.load(REAL_TASK), source
    if pretrained:
        pre = get_pretrained(family, size)
        world, tok = pre.world, pre.tokenizer
        factory = lambda: load_model(pre.path)[0]  # noqa: E731
        source = str(pre.path)
    else:
        world = make_world()
        tok = build_tokenizer(world)
        factory = lambda: build_model(family, size, tok, seed=0)  # noqa: E731
        source = f"build_model({family!r}, {size!r}, seed=0) (random init: throughput does not depend on weights)"
    task = make_task(world, task_name)
    spec = default_spec(task_name)
    # the same examples for both loops: the task's plus its rehearsal set, fixed here once
    examples = list(task.examples) + replay_examples(world, task, round(spec.replay * len(task.examples)), seed=0)
    task = Task(task.name, task.world_fingerprint, examples, task.probes, task.truth)
    return world, tok, factory, task, source


def random_model(config: dict, seed: int = 0):
    """A causal LM of ``config`` (a ``transformers`` config as a dict with ``model_type``) with seeded random
    weights, float32, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


class _Timer:
    """A ``TrainerCallback`` timing the training loop (wall and process CPU time), identical in both loops; with
    ``count``, it counts the loop's FLOPs instead (``torch.utils.flop_counter``: the matrix products of forward and
    backward as they run, from ``on_train_begin`` to ``on_train_end``; slower, so such a run is not timed)."""

    def __init__(self, device: str, count: bool = False):
        timer = self
        timer.flops = None

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                if count:
                    timer.counter = flop_counter()
                    timer.counter.__enter__()
                sync(device)
                timer.t0, timer.c0 = time.perf_counter(), time.process_time()

            def on_train_end(self, args, state, control, **kw):
                sync(device)
                timer.wall, timer.cpu = time.perf_counter() - timer.t0, time.process_time() - timer.c0
                if count:
                    timer.counter.__exit__(None, None, None)
                    timer.flops = int(timer.counter.get_total_flops())

        self.callback = _CB()


def run_lora_lens(factory, tok, task, world, spec: LoraSpec, device: str, count: bool = False) -> dict:
    model = factory()
    timer = _Timer(device, count)
    t0 = time.perf_counter()
    result = train_lora(model, tok, task, spec, seed=0, world=world, device=device, callbacks=[timer.callback])
    total = time.perf_counter() - t0
    return {"train_seconds": timer.wall, "cpu_seconds": timer.cpu, "total_seconds": total,
            "tokens": result.metrics["tokens"], "padded_tokens": result.metrics["padded_tokens"],
            "steps": result.metrics["steps"], "flops": timer.flops,
            "final_train_loss": result.history[-1]["loss"] if result.history else None}


class _Counting:
    """Wraps a collator and counts real and padded tokens (the same count ``train_lora`` keeps)."""

    def __init__(self, inner):
        self.inner, self.tokens, self.padded, self.batches = inner, 0, 0, 0

    def __call__(self, rows):
        batch = self.inner(rows)
        self.tokens += int(batch["attention_mask"].sum())
        self.padded += batch["attention_mask"].numel()
        self.batches += 1
        return batch


def run_plain(factory, tok, task, spec: LoraSpec, device: str, target_modules: list[str], count: bool = False) -> dict:
    """The obvious loop from the PEFT / Transformers docs."""
    t0 = time.perf_counter()
    model = factory()
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                                             target_modules=target_modules, task_type="CAUSAL_LM"))
    data = [tok(f"{p} {a}") for p, a in task.examples]
    collator = _Counting(DataCollatorForLanguageModeling(tok, mlm=False))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=spec.steps, per_device_train_batch_size=spec.batch_size,
                                 learning_rate=spec.lr, report_to=[], save_strategy="no", seed=0,
                                 use_cpu=device.startswith("cpu"), disable_tqdm=True, logging_steps=10)
        timer = _Timer(device, count)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator,
                          callbacks=[timer.callback])
        trainer.train()
        t2 = time.perf_counter()
    return {"train_seconds": timer.wall, "cpu_seconds": timer.cpu, "total_seconds": t2 - t0, "tokens": collator.tokens,
            "padded_tokens": collator.padded, "steps": trainer.state.global_step, "flops": timer.flops,
            "final_train_loss": ([h["loss"] for h in trainer.state.log_history if "loss" in h] or [None])[-1]}


def measure(size: str = "base", family: str = "llama", task_name: str = "fact_edit", steps: int = 30,
            batch_size: int | None = None, repeats: int = 3, device: str = "cpu", pretrained: bool = False,
            model: str | None = None, config: dict | None = None) -> dict:
    """Train both loops ``repeats`` times each (after a warm-up) and return the report (see the module docstring).

    ``model`` / ``config``: a real model (or a random one of a real shape), see :func:`setup`; the task is then
    the example task's examples under the ``data`` defaults.
    """
    os.environ.setdefault("LORA_LENS_QUIET", "1")
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()

    world, tok, factory, task, source = setup(size, family, pretrained, task_name, model, config)
    task_name = "data" if model is not None else task_name
    spec = default_spec(task_name, steps=steps, replay=0.0, log_every=10,
                        **({"batch_size": batch_size} if batch_size else {}))
    probe_model = factory()
    targets = lora_config(probe_model, spec).target_modules
    targets = sorted(targets) if not isinstance(targets, str) else targets

    # warm-up (allocator, kernels, first-call overheads), FLOPs counted (torch.utils.flop_counter: forward and
    # backward as run), then alternate A B B A …
    warm = LoraSpec(**{**spec.to_dict(), "steps": 2})
    counted = {"plain": run_plain(factory, tok, task, warm, device, targets, count=True),
               "train_lora": run_lora_lens(factory, tok, task, world, warm, device, count=True)}
    runs = {"train_lora": [], "plain": []}
    for i in range(repeats):
        order = ("train_lora", "plain") if i % 2 == 0 else ("plain", "train_lora")
        for name in order:
            if name == "train_lora":
                runs[name].append(run_lora_lens(factory, tok, task, world, spec, device))
            else:
                runs[name].append(run_plain(factory, tok, task, spec, device, targets))
    peak = matmul_peak(device)

    summary = {}
    for name, rs in runs.items():
        tps = [r["tokens"] / r["train_seconds"] for r in rs]
        e2e = [r["tokens"] / r["total_seconds"] for r in rs]
        cpu = [r["tokens"] / r["cpu_seconds"] for r in rs]
        summary[name] = {"tokens_per_s_best": max(tps), "tokens_per_s_median": statistics.median(tps),
                         "tokens_per_cpu_s_best": max(cpu), "tokens_per_cpu_s_median": statistics.median(cpu),
                         "end_to_end_tokens_per_s_best": max(e2e), "tokens": rs[0]["tokens"],
                         "train_seconds_best": min(r["train_seconds"] for r in rs),
                         "total_seconds_best": min(r["total_seconds"] for r in rs), "steps": rs[0]["steps"]}
    plain = runs["plain"][0]
    seq = plain["padded_tokens"] / (plain["steps"] * spec.batch_size)
    fl = flops_per_token(probe_model, spec, seq)
    padded_per_real = plain["padded_tokens"] / plain["tokens"]
    for name in summary:
        rate = summary[name]["tokens_per_s_best"] * padded_per_real * fl["per_token"]
        summary[name]["flops_per_s"] = rate
        summary[name]["utilisation"] = rate / peak["flops_per_s"]
        cpu_rate = summary[name]["tokens_per_cpu_s_best"] * padded_per_real * fl["per_token"]
        summary[name]["utilisation_per_cpu_s"] = cpu_rate / peak["flops_per_s"]  # meaningful with --threads 1
        # what the loop actually computes, counted on its warm-up run (train_lora projects fewer logits)
        per_real = counted[name]["flops"] / counted[name]["tokens"]
        summary[name]["counted_flops_per_token"] = per_real
        summary[name]["counted_flops_per_s"] = summary[name]["tokens_per_s_best"] * per_real
        summary[name]["counted_utilisation"] = summary[name]["counted_flops_per_s"] / peak["flops_per_s"]
    ratio = summary["train_lora"]["tokens_per_s_best"] / summary["plain"]["tokens_per_s_best"]
    ratio_median = summary["train_lora"]["tokens_per_s_median"] / summary["plain"]["tokens_per_s_median"]
    ratio_cpu = summary["train_lora"]["tokens_per_cpu_s_best"] / summary["plain"]["tokens_per_cpu_s_best"]
    name = model + (" (random init, larger shape)" if config else "") if model else f"{family}-{size}"
    report = {"meta": {"name": name, "size": size, "family": family, "task": task_name, "model": source,
                       "device": device,
                       "threads": torch.get_num_threads(), "steps": steps, "batch_size": spec.batch_size,
                       "examples": len(task.examples), "repeats": repeats, "spec": spec.to_dict(),
                       "torch": torch.__version__, "transformers": transformers.__version__},
              "flops": {**fl, "mean_padded_seq_len": seq, "padded_per_real_token": padded_per_real,
                        "formula": "T_pad * (4*N_matmul + 6*N_lora + 12*L*S*d_attn)"},
              "matmul_peak": peak, "summary": summary, "ratio_best": ratio, "ratio_median": ratio_median,
              "ratio_cpu_time_best": ratio_cpu,
              "runs": runs}
    return report


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="base", help="zoo size preset (default base)")
    p.add_argument("--family", default="llama")
    p.add_argument("--task", default="fact_edit")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=None, help="default: the task's default spec")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--pretrained", action="store_true", help="use the cached pretrained model (built if absent)")
    p.add_argument("--model", default=None, help="a real model instead of the zoo's, e.g. smollm2-135m")
    p.add_argument("--out", default="bench_train.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    report = measure(a.size, a.family, a.task, a.steps, a.batch_size, a.repeats, a.device, a.pretrained, a.model)
    write_json(a.out, report)
    print(format_table(report))
    return report


TARGET = 0.95
"""Issue 3's target for the throughput ratio ``train_lora / plain`` (best wall-clock tokens/s)."""


def run(quick: bool = False, device: str = "cpu") -> dict:
    """The suite's entry: the throughput ratio as a row, and ``train_lora``'s FLOP/s for the utilisation row."""
    report = measure(size="tiny", steps=3, repeats=1, device=device) if quick else measure(device=device)
    s, m = report["summary"], report["meta"]
    rows = [row(f"train_lora vs plain Trainer+peft, tokens/s ({m['name']}, {m['steps']} steps)",
                s["plain"]["train_seconds_best"], s["train_lora"]["train_seconds_best"], report["ratio_best"],
                TARGET, f"median {report['ratio_median']:.3f}, per CPU-s {report['ratio_cpu_time_best']:.3f}")]
    return {"name": "train", "rows": rows, "details": report,
            "flops_per_s": {f"train_lora training ({m['name']})": s["train_lora"]["flops_per_s"]}}


def format_table(report: dict) -> str:
    """A plain-text table of the headline numbers."""
    m, s = report["meta"], report["summary"]
    lines = [f"bench_train: {m['name']} on {m['device']} ({m['threads']} threads), task {m['task']}, "
             f"{m['steps']} steps × batch {m['batch_size']}, best of {m['repeats']}",
             f"{'loop':<12}{'tokens/s':>10}{'median':>10}{'per CPU-s':>11}{'end-to-end':>12}{'GFLOP/s':>9}"
             f"{'of peak':>9}{'counted':>9}{'of peak':>9}"]
    for name in ("train_lora", "plain"):
        r = s[name]
        lines.append(f"{name:<12}{r['tokens_per_s_best']:>10.0f}{r['tokens_per_s_median']:>10.0f}"
                     f"{r['tokens_per_cpu_s_best']:>11.0f}{r['end_to_end_tokens_per_s_best']:>12.0f}"
                     f"{r['flops_per_s'] / 1e9:>9.2f}{100 * r['utilisation']:>8.1f}%"
                     f"{r['counted_flops_per_s'] / 1e9:>9.2f}{100 * r['counted_utilisation']:>8.1f}%")
    lines.append(f"ratio train_lora / plain: {report['ratio_best']:.3f} (best wall), {report['ratio_median']:.3f} "
                 f"(median wall), {report['ratio_cpu_time_best']:.3f} (best per CPU-second)")
    lines.append(f"matmul peak {report['matmul_peak']['flops_per_s'] / 1e9:.1f} GFLOP/s (fp32 "
                 f"{report['matmul_peak']['n']}²); FLOPs = {report['flops']['formula']} (the plain loop's work); "
                 "counted: torch.utils.flop_counter on each loop's warm-up run (what it computes)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
