"""The ``lora-lens`` command.

Subcommands:
    run      execute the notebook series into a fresh run folder, ``--jobs N`` at once, or ``--resume`` one
             (see :mod:`lora_lens.workshop.runner`); writes ``index.html`` into the run folder.
    lab      open the series in JupyterLab with the run's kernel, caches and ledger (:mod:`lora_lens.workshop.lab`).
    report   rebuild a run folder's ``index.html`` (see :mod:`lora_lens.workshop.report`).
    bench    the performance suite; every argument after ``bench`` goes to ``python -m benchmarks``
             (a checkout's ``benchmarks/`` folder).
    inspect  report on any PEFT LoRA adapter of a causal LM: weight space, vocabulary, behaviour (see
             :mod:`lora_lens.lens.inspect_adapter`); writes report.json and report.html.
    train    train a LoRA adapter on a base for a task file and save it (:func:`lora_lens.lab.study.train_adapter`);
             the same command data parallel: ``accelerate launch --multi_gpu --num_processes N -m lora_lens.cli
             train ...`` (on CPUs too: each process takes its share of every batch, gloo backend).
    task     ``task check FILE --base MODEL``: every problem of a JSONL task file for a model's tokenizer, one
             ``FILE:LINE: message`` a line; exit 1 when there is any (see :func:`lora_lens.lab.tasks.check_task`).
    ledger   the hypothesis ledger; every argument after ``ledger`` goes to
             :func:`lora_lens.ledger.command.ledger_main`.

Exit codes: 0 success, 1 a notebook failed while running (or ``task check`` found problems), 2 any other lora_lens
error or a usage error.

Example:
    $ lora-lens run --preset smoke --only 00 -p seed=1
    $ lora-lens run --jobs 3 --resume runs/20260101-120000
    $ lora-lens report runs/20260101-120000
    $ lora-lens lab --dry-run
    $ lora-lens inspect out/adapters/fact_edit --prompts prompts.txt --out inspect-fact_edit
    $ lora-lens task check examples/smollm2_facts.jsonl --base smollm2-135m
    $ lora-lens train smollm2-135m examples/smollm2_facts.jsonl --out adapters/facts --set steps=20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_lens import __version__
from lora_lens.errors import LoraLensError, NotFoundError
from lora_lens.workshop.presets import DEFAULT_PRESET, PRESETS
from lora_lens.workshop.runner import DEFAULT_JOBS, NotebookFailed, run_series
from lora_lens.workshop.series import parse_assignments

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-lens", description="Study what a LoRA adapter does to a causal LM.")
    parser.add_argument("--version", action="version", version=f"lora-lens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="execute the notebook series into a fresh run folder")
    run.add_argument(
        "--preset", default=None,
        help=f"parameter preset: {', '.join(sorted(PRESETS))} (default {DEFAULT_PRESET}; with --resume the "
        "recorded one)",
    )
    run.add_argument(
        "-p", "--param", action="append", default=[], metavar="[NN.]NAME=VALUE",
        help="override a notebook parameter; VALUE is a Python literal or a plain string; "
        "NN.NAME targets notebook NN only (repeatable)",
    )
    run.add_argument(
        "--only", action="append", default=None, metavar="NN[,NN...]",
        help="run only these notebook prefixes, e.g. 00,02 (repeatable)",
    )
    run.add_argument("--out", default=None, metavar="DIR", help="run folder (default runs/<YYYYmmdd-HHMMSS>)")
    run.add_argument("--notebooks", default=None, metavar="DIR", help="folder holding NN_*.ipynb")
    run.add_argument("-j", "--jobs", type=int, default=DEFAULT_JOBS, metavar="N",
                     help="run up to N notebooks at once when what they need is done (default: 2, or 1 on a "
                     f"one-CPU machine; here {DEFAULT_JOBS})")
    run.add_argument("--resume", default=None, metavar="RUN_DIR",
                     help="complete RUN_DIR in place: skip notebooks done with the same parameters, rerun failed or "
                     "changed ones (preset, overrides, selection default to the recorded ones)")
    run.add_argument("-v", "--verbose", action="store_true", help="stream cell output from the notebooks")
    run.set_defaults(handler=_run)

    lab = sub.add_parser("lab", help="open the notebook series in JupyterLab (kernel, caches and ledger as under run)")
    lab.add_argument("--notebooks", default=None, metavar="DIR", help="folder holding NN_*.ipynb")
    lab.add_argument("--port", type=int, default=None, help="port (default JupyterLab's)")
    lab.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    lab.add_argument("--dry-run", action="store_true", help="print the command and its environment, start nothing")
    lab.set_defaults(handler=_lab)

    rep = sub.add_parser("report", help="rebuild RUN_DIR/index.html from a run folder")
    rep.add_argument("run_dir", metavar="RUN_DIR", help="a run folder made by `lora-lens run`")
    rep.set_defaults(handler=_report)

    insp = sub.add_parser(
        "inspect", help="report what a PEFT LoRA adapter changed (tables; report.json and report.html)",
        description="Report on any PEFT LoRA adapter of a causal LM: adapter config, weight-space energy per module "
        "type and layer, top modules by ||dW||, effective rank, amplification, intruder dimensions, directions "
        "read as tokens, promoted/suppressed tokens; for a lora_lens zoo base the behaviour diff over its world "
        "(scored against the planted truth when the task is known); for any other model with --task FILE, the "
        "task's probes with full answers (greedy continuations, base vs adapted), in words by entity and scored "
        "against the task's truth; with --prompts, diff mining by KL.")
    insp.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="PEFT adapter folder (adapter_config.json + "
                      "adapter_model.safetensors)")
    insp.add_argument("--base", default=None, metavar="NAME_OR_PATH",
                      help="base model (hub name or local folder); default: the adapter's base_model_name_or_path")
    insp.add_argument("--prompts", default=None, metavar="FILE",
                      help="UTF-8 text file, one prompt per line, for diff mining (largest KL(base||adapted))")
    insp.add_argument("--task", default=None, metavar="FILE",
                      help="JSONL task file to diff and score against (any base: its probes with full answers, "
                      "scored against truth.edits); default for a zoo base ADAPTER_DIR/task.jsonl or the manifest")
    insp.add_argument("--out", default=None, metavar="DIR",
                      help="report folder (default ./inspect-<adapter folder name>/)")
    insp.add_argument("--top", type=int, default=10, metavar="N", help="rows in the short tables (default 10)")
    insp.add_argument("--device", default="cpu", help="torch device (default cpu)")
    insp.set_defaults(handler=_inspect)

    task = sub.add_parser("task", help="task files: `task check FILE --base MODEL`")
    task_sub = task.add_subparsers(dest="task_command", metavar="ACTION", required=True)
    check = task_sub.add_parser("check", help="list every problem of a JSONL task file for a model (FILE:LINE)")
    check.add_argument("file", metavar="FILE", help="the JSONL task file")
    check.add_argument("--base", required=True, metavar="MODEL",
                       help="the base model: a folder, a hub name or smollm2-135m (its tokenizer and chat template)")
    check.set_defaults(handler=_task_check)

    train = sub.add_parser(
        "train", help="train a LoRA adapter for a task file and save it (under accelerate launch: data parallel)",
        description="Train a LoRA adapter on BASE for the task in TASK_FILE with the notebooks' recipe (the task "
        "checked against the base first; default spec for the task, overridden by --set) and save it as a PEFT "
        "folder with task.jsonl and lora_lens_train.json. Run it under `accelerate launch --multi_gpu "
        "--num_processes N -m lora_lens.cli train ...` (or torchrun) to train data parallel: the batch size is the "
        "global batch, and the main process writes OUT.")
    train.add_argument("base", metavar="BASE", help="the base model: a folder (a zoo model's cache folder too), a hub "
                       "name or smollm2-135m")
    train.add_argument("task_file", metavar="TASK_FILE", help="JSONL task file (see README 'Your own model')")
    train.add_argument("--out", required=True, metavar="DIR", help="adapter folder to write (new or empty)")
    train.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed (default 0)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                       help="a LoraSpec field, e.g. --set rank=4 --set steps=40 (repeatable)")
    train.add_argument("--device", default="cpu", help="torch device of each process (default cpu)")
    train.set_defaults(handler=_train)

    sub.add_parser("ledger", add_help=False, help="hypothesis ledger (lora-lens ledger --help)")
    sub.add_parser("bench", add_help=False, help="performance suite (lora-lens bench --help)")
    return parser


def _run(args: argparse.Namespace) -> int:
    only = None
    if args.only is not None:
        only = [part for item in args.only for part in item.split(",") if part.strip()]
    run_series(
        preset=args.preset,
        overrides=parse_assignments(args.param),
        only=only,
        out=args.out,
        notebooks_dir=args.notebooks,
        verbose=args.verbose,
        jobs=args.jobs,
        resume=args.resume,
    )
    return 0


def _lab(args: argparse.Namespace) -> int:
    from lora_lens.workshop.lab import open_lab

    return open_lab(args.notebooks, args.port, args.no_browser, args.dry_run)


def _report(args: argparse.Namespace) -> int:
    from lora_lens.workshop.report import write_report

    print(write_report(args.run_dir))
    return 0


def _bench(argv: list[str]) -> int:
    """Run ``python -m benchmarks`` of this checkout in-process."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "__main__.py").is_file():
        raise NotFoundError(f"no benchmarks/ folder next to the package ({root}); `lora-lens bench` needs a "
                            "checkout of the repository (run it there, or `python -m benchmarks` from its root)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.__main__ import main as bench_main

    return int(bench_main(argv) or 0)


def _inspect(args: argparse.Namespace) -> int:
    from lora_lens.lens.inspect_adapter import check_out_dir, default_out_dir, inspect_adapter, write_inspect_report

    out = check_out_dir(args.out if args.out is not None else default_out_dir(args.adapter_dir))
    report = inspect_adapter(args.adapter_dir, base=args.base, prompts=args.prompts, task=args.task, top=args.top,
                             device=args.device)
    json_path, html_path = write_inspect_report(report, out)
    print(report.text(), end="")
    print(f"\nwrote {json_path}\n      {html_path}")
    return 0


def _task_check(args: argparse.Namespace) -> int:
    from lora_lens.lab.tasks import check_task
    from lora_lens.lab.zoo import load_model

    if not Path(args.file).is_file():
        raise NotFoundError(f"task file {args.file} does not exist: check the path")
    _, tokenizer = load_model(args.base)
    problems = check_task(args.file, tokenizer)
    for problem in problems:
        print(problem)
    print(f"{args.file}: {len(problems)} problem{'s' * (len(problems) != 1)} for {args.base}",
          file=sys.stderr if problems else sys.stdout)
    return 1 if problems else 0


def _train(args: argparse.Namespace) -> int:
    from lora_lens.lab.parallel import is_main_process
    from lora_lens.lab.study import train_adapter

    if not Path(args.task_file).is_file():
        raise NotFoundError(f"task file {args.task_file} does not exist: check the path")
    out = train_adapter(args.base, args.task_file, args.out, seed=args.seed, device=args.device,
                        **parse_assignments(args.overrides))
    if is_main_process():
        print(f"wrote {out}")
    return 0


def _ledger(argv: list[str]) -> int:
    from lora_lens.ledger.command import ledger_main
    return int(ledger_main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Run the ``lora-lens`` command line and return its exit code.

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        0 on success, 1 when a notebook failed, 2 for any other lora_lens error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "ledger":
            return _ledger(argv[1:])
        if argv and argv[0] == "bench":
            return _bench(argv[1:])
        parser = _build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return args.handler(args)
    except KeyboardInterrupt:  # the runner has said how to --resume
        return 130
    except NotebookFailed as exc:
        print(f"lora-lens: error: {exc}", file=sys.stderr)
        return 1
    except LoraLensError as exc:
        print(f"lora-lens: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
