"""The ``lora-lens ledger`` command: list, show, export and import the hypothesis ledger.

``lora-lens ledger [--ledger PATH] list | show ID | export --format md|jsonl|html [--out FILE] | import FILE``;
:mod:`lora_lens.cli` hands every argument after ``ledger`` to :func:`ledger_main`.
"""

from __future__ import annotations

import argparse
import math
import sqlite3
import sys
from pathlib import Path

from lora_lens.errors import LoraLensError
from lora_lens.ledger.api import history, hypotheses
from lora_lens.ledger.export import export, export_hypothesis, import_jsonl
from lora_lens.ledger.store import ledger_path

__all__ = ["ledger_main"]


def ledger_main(argv: list[str] | None = None) -> int:
    """``lora-lens ledger`` command line; returns the exit status (2 on error, message on stderr)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ledger", default=argparse.SUPPRESS, help="ledger file (default: $LORA_LENS_LEDGER, "
                        "else runs/ledger.sqlite)")
    parser = argparse.ArgumentParser(prog="lora-lens ledger", parents=[common],
                                     description="Inspect, export and import the hypothesis ledger.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", parents=[common], help="hypotheses with verdicts")
    sub.add_parser("show", parents=[common], help="one hypothesis with its evidence and history").add_argument("id")
    exp = sub.add_parser("export", parents=[common], help="render as md, html or jsonl")
    exp.add_argument("--format", choices=["md", "jsonl", "html"], default="md")
    exp.add_argument("--out", help="write to this file instead of stdout")
    sub.add_parser("import", parents=[common], help="import a jsonl export").add_argument("file")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code in (0, None) else 2
    path = getattr(args, "ledger", None)
    try:
        if args.command == "list":
            hs = hypotheses(path)
            print(f"{ledger_path(path)}: no hypotheses" if hs.empty else
                  hs[["id", "verdict", "n_evidence", "n_pass", "mean", "ci_low", "ci_high", "prediction"]]
                  .to_string(index=False, float_format="{:.4g}".format))
        elif args.command == "show":
            print(export_hypothesis(args.id, path))
            for _, r in history(args.id, path).iterrows():
                cause = "declared" if math.isnan(r["evidence_id"]) else f"evidence #{int(r['evidence_id'])}"
                print(f"{r['created'][:19]}  {r['verdict']:<12} ({cause})")
        elif args.command == "export":
            text = export(args.format, path)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(text, encoding="utf-8")
            else:
                sys.stdout.write(text)
        else:
            added = import_jsonl(args.file, path)
            print(f"imported {added['hypotheses']} hypotheses, {added['evidence']} evidence records "
                  f"into {ledger_path(path)}")
    except (LoraLensError, sqlite3.Error, OSError) as exc:
        print(f"lora-lens ledger: {exc}", file=sys.stderr)
        return 2
    return 0

