"""Helpers shared by the benchmarks: device sync, the matmul peak and the row format of the suite.

Every ``benchmarks/bench_*.py`` module exposes ``run(quick: bool = False, device: str = "cpu") -> dict`` returning
``{"name": str, "rows": [row, ...], ...}`` where a row is made by :func:`row`. ``"flops_per_s": {label: rate}``
in that dict asks the suite to report ``rate`` as a share of the matmul peak it measured in the same run.
"""

from __future__ import annotations

import functools
import resource
import time
from typing import Any

import torch


def sync(device: str) -> None:
    """Wait for queued GPU work (no-op on CPU), so that wall-clock timings are honest."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str = "cpu", n: int | None = None, repeats: int = 5) -> dict:
    """Best float32 ``torch.matmul`` rate on ``device``: ``{"n", "seconds", "flops_per_s"}``.

    ``2·n³`` FLOPs per product, best of ``repeats`` after one warm-up; ``n`` defaults to 8192 on CUDA, 2048 on
    CPU. Cached per process (on the resolved size), so every benchmark of one suite run divides by the same peak.
    """
    return _matmul_peak(device, n or (8192 if device.startswith("cuda") else 2048), repeats)


@functools.lru_cache(maxsize=None)
def _matmul_peak(device: str, n: int, repeats: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=torch.float32).to(device)
    b = torch.randn(n, n, generator=g, dtype=torch.float32).to(device)
    torch.matmul(a, b)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return {"n": n, "seconds": best, "flops_per_s": 2 * n ** 3 / best, "device": device,
            "threads": torch.get_num_threads()}


def row(comparison: str, baseline_s: float | None, ours_s: float | None, ratio: float | None,
        target: float | None, note: str = "") -> dict[str, Any]:
    """One line of the suite's table: passes when ``ratio >= target`` (no target: information only)."""
    return {"comparison": comparison, "baseline_s": baseline_s, "ours_s": ours_s, "ratio": ratio, "target": target,
            "note": note}


class _Global:
    """Stands in for FlopCounterMode's module tracker (its backward hooks break ``torch.autograd.grad``)."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def flop_counter():
    """A ``torch.utils.flop_counter.FlopCounterMode`` that works under ``torch.autograd.grad`` (no module tracker):
    ``with flop_counter() as c: ...; c.get_total_flops()``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _Global()
    return counter


def count_flops(fn) -> int:
    """Floating-point operations of ``fn()`` (matrix products and attention, forward and backward;
    ``torch.utils.flop_counter``)."""
    with flop_counter() as counter:
        fn()
    return int(counter.get_total_flops())


def _status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` field (``VmHWM``, ``VmRSS``) in MiB, None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """The process's peak resident set size since the last :func:`reset_peak_rss` (else since it started), MiB."""
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: ``5`` into ``/proc/self/clear_refs`` resets ``VmHWM`` to the current
    RSS), so that :func:`peak_rss_mb` measures one benchmark row; False where the system does not allow it (then the
    peak is the process's so far: an upper bound)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_mb("VmHWM"), _status_mb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 16     # the window did start at the current RSS
