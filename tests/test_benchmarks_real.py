"""The real-size rows of the suite (``benchmarks/bench_real.py``) in ``--quick`` mode on the tiny zoo model: every
comparison runs both ways and the equality each one checks holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_quick_real_rows_compare_with_the_plain_loops(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.__main__ import main

    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    monkeypatch.chdir(tmp_path)      # no runs/ here: the series' RSS row says so, nothing else changes
    try:
        code = main(["--quick", "--only", "real", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, capsys.readouterr().err[-2000:]
    result = json.loads(out.read_text())
    (entry,) = result["benchmarks"]
    assert "error" not in entry, entry.get("traceback")
    rows = {r["row"]: r for r in entry["details"]["results"]}
    assert list(rows) == ["components", "mining", "generate", "train", "pretrain"]
    for r in rows.values():
        assert r["ratio"] == pytest.approx(r["baseline_s"] / r["ours_s"]) and r["peak_rss_mb"] > 0
    # the equalities each row asserts before it reports (relative to the largest value, at least 1)
    assert rows["components"]["n"] == 14 and rows["components"]["max_abs_diff"] <= 1e-3
    assert rows["mining"]["max_abs_diff"] <= 1e-3 and rows["generate"]["max_abs_diff"] == 0.0
    assert rows["pretrain"]["max_abs_diff"] <= 1e-3
    train = rows["train"]
    assert train["details"]["summary"]["train_lora"]["tokens"] == train["details"]["summary"]["plain"]["tokens"] > 0
    # train_lora computes less than the plain loop: logits only where an answer token is read
    counted = {k: v["counted_flops_per_token"] for k, v in train["details"]["summary"].items()}
    assert 0 < counted["train_lora"] < counted["plain"]
    suite_rows = [r for r in result["rows"] if r["benchmark"] == "real"]
    assert len([r for r in suite_rows if not r["comparison"].startswith("FLOP utilisation")]) == 5
    assert all(r["target"] is None for r in suite_rows)                      # quick: no targets
    util = [r for r in suite_rows if r["comparison"].startswith("FLOP utilisation")]
    assert len(util) == 2 and all(r["ratio"] > 0 for r in util)


def test_per_row_peak_rss_window():
    import mmap
    import sys

    sys.path.insert(0, str(REPO))
    try:
        from benchmarks.common import peak_rss_mb, reset_peak_rss
    finally:
        sys.path.remove(str(REPO))
    if not reset_peak_rss():
        pytest.skip("this system does not let a process reset its peak RSS (/proc/self/clear_refs)")
    before = peak_rss_mb()                  # the window starts at the current RSS
    block = mmap.mmap(-1, 64 * 2**20)       # 64 MiB of fresh pages (the heap may hold freed, resident memory)
    for at in range(0, len(block), 4096):
        block[at] = 1
    high = peak_rss_mb()
    block.close()
    assert high >= before + 60
    reset_peak_rss()
    assert peak_rss_mb() < high - 30         # the new window forgets the freed block
