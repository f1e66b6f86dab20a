"""Tests of the performance suite ``python -m benchmarks`` / ``lora-lens bench`` (quick, small shapes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROW_KEYS = {"benchmark", "comparison", "baseline_s", "ours_s", "ratio", "target", "note", "result"}


@pytest.fixture
def suite(monkeypatch):
    """``benchmarks.__main__.main``, importable from the repository root."""
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.__main__ import main

    return main


def test_quick_svd_writes_the_table_as_json(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "svd", "--threads", "1",
                           "--out", str(out), "--run", str(_fake_run(tmp_path))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "factor SVD vs dense SVD" in proc.stdout and "matmul peak" in proc.stdout
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["machine"]["threads"] == 1
    assert result["matmul_peak"]["flops_per_s"] > 0
    assert [b["name"] for b in result["benchmarks"]] == ["svd"] and "error" not in result["benchmarks"][0]
    for r in result["rows"]:
        assert ROW_KEYS <= set(r), r
    svd = [r for r in result["rows"] if r["benchmark"] == "svd"]
    assert svd and all(r["ratio"] > 0 and r["target"] == 1.0 and r["result"] in ("pass", "FAIL") for r in svd)
    assert svd[0]["ratio"] == pytest.approx(svd[0]["baseline_s"] / svd[0]["ours_s"])
    (rss,) = [r for r in result["rows"] if r["benchmark"] == "series"]
    assert rss["ratio"] == pytest.approx(4e9 / 2**20 / 900) and "01_b" in rss["note"]


def _fake_run(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"run_id": "r1", "preset": "smoke", "jobs": 1, "notebooks": [
        {"notebook": "00_a", "max_rss_mb": 500.0}, {"notebook": "01_b", "max_rss_mb": 900.0}]}))
    return run


def test_discovery_lists_every_bench_module(suite, capsys):
    assert suite(["--list"]) == 0
    listed = capsys.readouterr().out.split()
    expected = sorted(p.stem[len("bench_"):] for p in (REPO / "benchmarks").glob("bench_*.py"))
    assert [x for x in listed if not x.startswith("benchmarks.")] == expected
    assert {"svd", "train", "attribution"} <= set(expected)


def test_every_bench_module_exposes_run():
    import importlib
    import inspect

    sys.path.insert(0, str(REPO))
    try:
        for path in sorted((REPO / "benchmarks").glob("bench_*.py")):
            module = importlib.import_module(f"benchmarks.{path.stem}")
            assert callable(getattr(module, "run", None)), f"{path.name} has no run(quick) -> dict"
            assert "quick" in inspect.signature(module.run).parameters, path.name
    finally:
        sys.path.remove(str(REPO))


def test_bad_arguments_exit_2(suite, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        suite(["--only", "nope"])
    assert info.value.code == 2 and "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        suite(["--run", str(tmp_path / "missing")])
    assert info.value.code == 2 and "missing" in capsys.readouterr().err


def test_newest_run_with_rss_is_found(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.__main__ import run_rss

    assert run_rss(None, cwd=tmp_path) is None
    _fake_run(tmp_path)
    found = run_rss(None, cwd=tmp_path)
    assert found["peak_mb"] == 900.0 and found["notebook"] == "01_b" and found["run_id"] == "r1"


def test_lora_lens_bench_forwards_to_the_suite(capsys):
    from lora_lens import cli
    assert cli.main(["bench", "--list"]) == 0
    assert "svd" in capsys.readouterr().out


def test_quick_attribution_rows_compare_with_captum(suite, tmp_path, capsys):
    """The attribution rows of the suite on the tiny model: every case (IG and ablation, single- and 3-token
    answers) timed both ways with equal numbers, its FLOPs counted and both paths' FLOP rates against the peak."""
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    try:
        code = suite(["--quick", "--only", "attribution", "--threads", "1", "--out", str(out),
                      "--run", str(_fake_run(tmp_path))])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, capsys.readouterr().err[-2000:]
    result = json.loads(out.read_text())
    (entry,) = result["benchmarks"]
    assert "error" not in entry, entry.get("traceback")
    (details,) = entry["details"]
    cases = details["results"]
    assert [c["case"] for c in cases] == ["ig1", "ig_multi", "ablation1", "ablation_multi"]
    assert [c["answer_tokens"] for c in cases] == [1.0, 3.0, 1.0, 3.0]
    for c in cases:
        assert c["max_abs_diff"] <= 1e-3 < c["max_abs_attribution"]
        assert c["speedup"] == pytest.approx(c["captum_s"] / c["batched_s"])
        assert c["batched_flops"] > 0 and c["flop_ratio"] == pytest.approx(c["captum_flops"] / c["batched_flops"])
        assert c["peak_rss_mb"] > 0
    # one IG over the whole answer where captum runs one per answer token; ablation from the ablated token on
    ig1, ig3, ab1, ab3 = (c["flop_ratio"] for c in cases)
    assert ig3 > 2 * ig1 and ig1 > 1.0 and ab1 > 1.5 and ab3 > 1.2
    rows = [r for r in result["rows"] if r["benchmark"] == "attribution"]
    assert len([r for r in rows if "vs captum" in r["comparison"]]) == 4
    assert all(r["target"] is None and r["result"] == "info" for r in rows)        # quick: no targets
    util = [r for r in rows if r["comparison"].startswith("FLOP utilisation: attribution")]
    assert len(util) == 8 and all(0 < r["ratio"] for r in util)
