"""Progress under ``lora-lens run``: the events a notebook writes, and the line the runner renders from them."""

from __future__ import annotations

import io
import json

import pytest

from conftest import write_notebook
from lora_lens import events
from lora_lens.utils import progress_bar, progress_callbacks
from lora_lens.workshop import presets, progress
from lora_lens.workshop.runner import run_series

LOOP = """\
import time
from lora_lens.utils import progress_bar, progress_callbacks
for i in progress_bar(range(30), desc="pretrain"):
    time.sleep(0.05)
"""


def test_render_and_fold_events(tmp_path):
    path = tmp_path / "nb.jsonl"
    events.emit({"kind": "cell", "cell": 4, "cells": 20, "section": "5 · Pretraining"}, str(path))
    events.emit({"kind": "step", "desc": "pretrain", "n": 340, "total": 1000, "eta": 71.2}, str(path))
    state = progress.read_state(path)
    assert state["section"] == "5 · Pretraining" and state["step"]["n"] == 340
    line = progress.render("00_world", state, 125)
    assert line == "00_world 2m05s · cell 5/20 · 5 · Pretraining · pretrain 340/1000 ETA 1m11s"
    events.emit({"kind": "step_done", "desc": "pretrain", "n": 1000}, str(path))
    assert "step" not in progress.read_state(path)
    with open(path, "a") as f:
        f.write('{"kind": "step", "n": 3')  # a line being written is skipped
    assert "step" not in progress.read_state(path)


def test_view_plain_lines_at_least_every_heartbeat_and_terminal_line(tmp_path):
    folder = progress.progress_dir(tmp_path)
    folder.mkdir(exist_ok=True)
    events.emit({"kind": "cell", "cell": 0, "cells": 3, "section": "Goal"}, str(folder / "01_x.jsonl"))
    out = io.StringIO()
    view = progress.View(tmp_path, stream=out, tty=False, heartbeat=10)
    for t in range(0, 31):  # 30 s with nothing new: a line at 0, 10, 20, 30 s
        view.tick(["01_x"], now=1000.0 + t)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and all("01_x" in ln and "Goal" in ln for ln in lines)
    term = io.StringIO()
    view = progress.View(tmp_path, stream=term, tty=True)
    view.tick(["01_x"], now=5.0)
    view.clear()
    assert term.getvalue().startswith("\r\x1b[K01_x") and term.getvalue().endswith("\r\x1b[K")


def test_tracker_emits_steps_with_eta(tmp_path, monkeypatch):
    monkeypatch.setenv(events.ENV, str(tmp_path / "p.jsonl"))
    bar = progress_bar(range(5), desc="train")
    assert isinstance(bar, events.Tracker)
    assert list(bar) == [0, 1, 2, 3, 4]
    written = [json.loads(ln) for ln in (tmp_path / "p.jsonl").read_text().splitlines()]
    steps = [e for e in written if e["kind"] == "step"]
    assert steps[0]["n"] == 1 and steps[0]["total"] == 5 and steps[-1]["n"] == 5 and steps[-1]["eta"] == 0
    assert written[-1]["kind"] == "step_done"


def test_runner_plumbing_sections_steps_and_no_transport_warnings(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(presets, "PRESETS", {"workshop": {}, "smoke": {}})
    monkeypatch.setenv("LORA_LENS_LEDGER", str(tmp_path / "ledger.sqlite"))
    path = write_notebook(tmp_path / "nbs" / "00_loop.ipynb", ["y = 2", LOOP])
    import nbformat
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(3, nbformat.v4.new_markdown_cell("## 1 · The loop"))
    nbformat.write(nb, path)
    run = run_series(notebooks_dir=tmp_path / "nbs", out=tmp_path / "run")
    events = [json.loads(ln) for ln in (progress.progress_dir(run) / "00_loop.jsonl").read_text().splitlines()]
    cells = [e for e in events if e["kind"] == "cell"]
    assert cells[-1]["section"] == "1 · The loop" and cells[0]["section"] == "00_loop"
    steps = [e for e in events if e["kind"] == "step"]
    assert steps and steps[-1]["n"] == 30 and steps[-1]["desc"] == "pretrain"
    captured = capfd.readouterr()
    assert "without encryption" not in captured.out + captured.err
    assert "00_loop ok" in captured.out


@pytest.mark.parametrize("run_dir", ["runs/x"])
def test_resume_hint(run_dir):
    assert f"lora-lens run --resume {run_dir}" in progress.resume_hint(run_dir)


def test_trainer_callbacks_only_under_a_run(tmp_path, monkeypatch):
    from types import SimpleNamespace


    monkeypatch.delenv(events.ENV, raising=False)
    assert progress_callbacks() == []
    monkeypatch.setenv(events.ENV, str(tmp_path / "t.jsonl"))
    [cb] = progress_callbacks()
    cb.on_train_begin(None, None, None)
    for step in (1, 2):
        cb.on_step_end(None, SimpleNamespace(global_step=step, max_steps=2), None)
    state = progress.read_state(tmp_path / "t.jsonl")
    assert state["step"]["n"] == 2 and state["step"]["total"] == 2 and state["step"]["desc"] == "train LoRA"
    cb.on_train_end(None, SimpleNamespace(global_step=2), None)
    assert "step" not in progress.read_state(tmp_path / "t.jsonl")
