"""The ``lora-lens`` command.

Subcommands:
    run      execute the notebook series into a fresh run folder (see :mod:`lora_lens.runner`).
    ledger   the hypothesis ledger; every argument after ``ledger`` goes to :func:`lora_lens.ledger.main`.

Exit codes: 0 success, 1 a notebook failed while running, 2 any other lora_lens error or a usage error.

Example:
    $ lora-lens run --preset smoke --only 00 -p seed=1
"""

from __future__ import annotations

import argparse
import sys

from lora_lens import __version__
from lora_lens.errors import LoraLensError
from lora_lens.presets import DEFAULT_PRESET, PRESETS
from lora_lens.runner import NotebookFailed, parse_assignments, run_series


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-lens", description="Study what a LoRA adapter does to a causal LM.")
    parser.add_argument("--version", action="version", version=f"lora-lens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="execute the notebook series into a fresh run folder")
    run.add_argument(
        "--preset", default=DEFAULT_PRESET,
        help=f"parameter preset: {', '.join(sorted(PRESETS))} (default {DEFAULT_PRESET})",
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
    run.add_argument("-v", "--verbose", action="store_true", help="stream cell output from the notebooks")
    run.set_defaults(handler=_run)

    sub.add_parser("ledger", add_help=False, help="hypothesis ledger (lora-lens ledger --help)")
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
    )
    return 0


def _ledger(argv: list[str]) -> int:
    from lora_lens import ledger

    return int(ledger.main(argv) or 0)


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
        parser = _build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return args.handler(args)
    except NotebookFailed as exc:
        print(f"lora-lens: error: {exc}", file=sys.stderr)
        return 1
    except LoraLensError as exc:
        print(f"lora-lens: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
