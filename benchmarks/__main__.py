"""The performance suite: every ``benchmarks/bench_*.py`` side by side in one run, as one table of ratios.

Discovers the modules ``benchmarks/bench_*.py`` (the part after ``bench_`` is the benchmark's name for
``--only``) and calls each module's ``run(quick: bool = False, device: str = "cpu") -> dict`` (see
:mod:`benchmarks.common` for the row format). In the same process it measures a float32 matmul peak and reports
every ``flops_per_s`` a benchmark returns as a share of it (e.g. FLOP utilisation of training), and it reads the peak
RSS of a run of the notebook series from that run's ``run.json`` (``--run RUN_DIR``; default the newest
``runs/*/run.json`` with RSS records), against the 4 GB budget of issue 9.

Every row is ``ratio`` vs ``target`` (higher is better; the RSS row is budget / peak): ``pass`` when
``ratio ≥ target``, ``info`` when the row has no target. Prints the table and writes everything as JSON (``--out``).

Exit code: 0 when every benchmark ran and (outside ``--quick``) every target is met; 1 when a benchmark raised or
a target is missed; 2 for a usage error. ``--quick`` is a sanity run in seconds to a minute on small models: its
ratios are not comparable to the targets.

Usage:
    python -m benchmarks [--quick] [--only svd,train] [--out bench.json] [--run RUN_DIR] [--device cpu]
                         [--threads N] [--list]
    lora-lens bench ...   (the same)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from lora_lens.errors import LoraLensError
from lora_lens.utils import write_json
from lora_lens.workshop.runner import load_run

HERE = Path(__file__).resolve().parent
RSS_BUDGET_MB = 4e9 / 2**20
"""Issue 9's peak-RSS budget for the workshop series, 4 GB, in MiB (the unit of ``max_rss_mb``)."""


def discover() -> dict[str, str]:
    """``{name: module}`` for every ``benchmarks/bench_<name>.py``, sorted by name."""
    return {p.stem[len("bench_"):]: f"benchmarks.{p.stem}" for p in sorted(HERE.glob("bench_*.py"))}


def run_rss(run_dir: str | None, cwd: Path | None = None) -> dict[str, Any] | None:
    """Peak RSS of a run of the series from its ``run.json``: ``{"run", "peak_mb", "notebook", "jobs", ...}``.

    Args:
        run_dir: a run folder; None picks the newest ``runs/*/run.json`` under ``cwd`` that has RSS records.

    Returns:
        None when no run with RSS records is found (only when ``run_dir`` is None).

    Raises:
        SystemExit: ``run_dir`` is given but holds no readable run.json with ``max_rss_mb`` records.
    """
    if run_dir is not None:
        candidates = [Path(run_dir)]
    else:
        root = (cwd or Path.cwd()) / "runs"
        candidates = sorted(root.glob("*/run.json"), key=lambda p: p.stat().st_mtime, reverse=True) if root.is_dir() \
            else []
        candidates = [p.parent for p in candidates]
    for folder in candidates:
        try:
            _, record = load_run(folder)
            rss = {e["notebook"]: e["max_rss_mb"] for e in record["notebooks"]
                   if isinstance(e.get("max_rss_mb"), (int, float))}
        except (LoraLensError, KeyError, TypeError) as exc:
            if run_dir is not None:
                raise SystemExit(f"--run {run_dir}: not a run folder with a readable run.json ({exc}); pass a folder "
                                 "made by `lora-lens run`")
            continue
        if rss:
            worst = max(rss, key=rss.get)
            return {"run": str(folder), "run_id": record.get("run_id"), "preset": record.get("preset"),
                    "status": record.get("status"), "jobs": record.get("jobs", 1), "peak_mb": rss[worst],
                    "notebook": worst, "per_notebook": rss}
        if run_dir is not None:
            raise SystemExit(f"--run {run_dir}: run.json has no max_rss_mb records (made before the runner recorded "
                             "them); run the series again")
    return None


def _machine(device: str) -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "device": device, "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _verdict(r: dict[str, Any]) -> str:
    if r.get("ratio") is None:
        return "n/a"
    if r.get("target") is None:
        return "info"
    return "pass" if r["ratio"] >= r["target"] else "FAIL"


def format_table(result: dict[str, Any]) -> str:
    """The suite's rows as one fixed-width table."""
    def num(x, fmt):
        return "—" if x is None else format(x, fmt)

    head = f"{'benchmark':<12}{'comparison':<78}{'base s':>9}{'ours s':>9}{'ratio':>9}{'target':>8}  result"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        text = r["comparison"] if len(r["comparison"]) <= 76 else r["comparison"][:75] + "…"
        lines.append(f"{r['benchmark']:<12}{text:<78}{num(r['baseline_s'], '.3f'):>9}{num(r['ours_s'], '.3f'):>9}"
                     f"{num(r['ratio'], '.3g'):>9}{num(r['target'], 'g'):>8}  {r['result']}"
                     + (f"  ({r['note']})" if r.get("note") else ""))
    for b in result["benchmarks"]:
        if b.get("error"):
            lines.append(f"{b['name']}: ERROR {b['error'].splitlines()[-1]}")
        elif b.get("skipped"):
            lines.append(f"{b['name']}: skipped ({b['skipped']})")
    m = result["machine"]
    lines.append(f"machine: {m['platform']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['threads']} threads), "
                 f"device {m['device']}{', ' + m['gpu'] if m.get('gpu') else ''}; "
                 f"matmul peak {result['matmul_peak']['flops_per_s'] / 1e9:.1f} GFLOP/s (fp32 "
                 f"{result['matmul_peak']['n']}²); "
                 f"{'QUICK sanity run: ratios not comparable to targets; ' if result['quick'] else ''}"
                 f"{result['seconds']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the suite; return the exit code (see the module docstring)."""
    names = discover()
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short sanity run on small models (seconds to a minute)")
    p.add_argument("--only", default=None, metavar="NAME[,NAME]", help=f"benchmarks to run: {', '.join(names)}")
    p.add_argument("--out", default=None, metavar="FILE", help="write the results as JSON here")
    p.add_argument("--run", default=None, metavar="RUN_DIR",
                   help="run folder whose peak RSS to report (default: newest runs/*/run.json with RSS records)")
    p.add_argument("--device", default="cpu", help="torch device for every benchmark (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(f"{n:<14}{m}" for n, m in names.items()))
        return 0
    selected = list(names)
    if args.only is not None:
        selected = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = [x for x in selected if x not in names]
        if unknown or not selected:
            p.error(f"--only {','.join(unknown) or '(empty)'}: no such benchmark; available: {', '.join(names)}")
    if args.threads < 0:
        p.error(f"--threads {args.threads}: must be ≥ 0 (0 keeps torch's default)")
    try:
        rss = run_rss(args.run)
    except SystemExit as exc:
        p.error(str(exc))

    import torch

    from benchmarks.common import matmul_peak, row

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    peak = matmul_peak(args.device, n=1024 if args.quick else None)
    benchmarks, rows = [], []
    for name in selected:
        entry: dict[str, Any] = {"name": name, "module": names[name]}
        t0 = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            module = importlib.import_module(names[name])
            fn = getattr(module, "run", None)
            if not callable(fn):
                entry["skipped"] = "the module has no run(quick) -> dict"
            else:
                kwargs = {"quick": args.quick}
                if "device" in inspect.signature(fn).parameters:
                    kwargs["device"] = args.device
                result = fn(**kwargs)
                entry.update({k: v for k, v in result.items() if k != "rows"}, rows=result["rows"])
                rows += [{"benchmark": name, **r} for r in result["rows"]]
                for label, rate in (result.get("flops_per_s") or {}).items():
                    rows.append({"benchmark": name, **row(
                        f"FLOP utilisation: {label} / matmul peak", None, None, rate / peak["flops_per_s"], None,
                        f"{rate / 1e9:.2f} of {peak['flops_per_s'] / 1e9:.1f} GFLOP/s")})
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
            entry["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            entry["traceback"] = traceback.format_exc()
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        benchmarks.append(entry)
    if rss is not None:
        note = f"{rss['peak_mb']:.0f} MB in {rss['notebook']}, preset {rss['preset']}"
        if rss["jobs"] and rss["jobs"] > 1:
            note += f"; jobs={rss['jobs']}: notebooks overlapped, their sum can be higher"
        rows.append({"benchmark": "series", **row(f"peak RSS of run {rss['run_id']}: 4 GB budget / max kernel RSS",
                                                  None, None, RSS_BUDGET_MB / rss["peak_mb"], 1.0, note)})
    else:
        rows.append({"benchmark": "series", **row("peak RSS of a run: 4 GB budget / max kernel RSS", None, None, None,
                                                  1.0, "no runs/*/run.json with RSS records; pass --run RUN_DIR")})
    for r in rows:
        r["result"] = _verdict(r)
    result = {"quick": args.quick, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": _machine(args.device), "matmul_peak": peak, "rss": rss, "rows": rows, "benchmarks": benchmarks,
              "seconds": round(time.perf_counter() - t_start, 3)}
    print(format_table(result))
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}")
    if any(b.get("error") for b in benchmarks):
        return 1
    if not args.quick and any(r["result"] == "FAIL" for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
