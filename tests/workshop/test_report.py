"""Tests of the run report (``index.html``) and ``lora-lens report``, on tiny fixture notebooks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import write_notebook
from lora_lens import cli
from lora_lens.errors import ConfigError, NotFoundError
from lora_lens.workshop import presets
from lora_lens.workshop.report import flatten, write_report
from lora_lens.workshop.runner import NotebookFailed, run_series

FIGURE = """\
import json, pathlib
import matplotlib.pyplot as plt
from IPython.display import display
fig, ax = plt.subplots(figsize=(2, 2))
ax.plot([0, 1], [0, x])
display(fig)
plt.close(fig)
"""
SUMMARY = """\
pathlib.Path(output_dir, "summary.json").write_text(json.dumps(
    {"efficacy": 0.987654, "per_family": {"llama": {"acc": 1.0}, "gpt2": {"acc": 0.5}}, "ranks": [1, 4]}))
"""
LEDGER = """\
from lora_lens import ledger
ledger.declare("slope-positive", "The line goes up", "slope", ">", 0, falsifier="a flat line")
ledger.record("slope-positive", float(x))
"""


@pytest.fixture(autouse=True)
def _fixture_presets(monkeypatch, tmp_path):
    monkeypatch.setattr(presets, "PRESETS", {"workshop": {}, "smoke": {}})
    monkeypatch.setenv("LORA_LENS_LEDGER", str(tmp_path / "ledger.sqlite"))


@pytest.fixture(scope="module")
def failed_run(tmp_path_factory) -> Path:
    """A run of three notebooks: one with a figure, summary and ledger record, one failing, one never started."""
    import os

    tmp = tmp_path_factory.mktemp("report")
    old = os.environ.get("LORA_LENS_LEDGER")
    os.environ["LORA_LENS_LEDGER"] = str(tmp / "ledger.sqlite")
    folder = tmp / "nbs"
    write_notebook(folder / "00_good.ipynb", ["# Setup", FIGURE + SUMMARY, LEDGER],
                   parameters='output_dir = "o"\nx = 2')
    write_notebook(folder / "01_bad.ipynb", ["y = 1", "raise KeyError('missing thing')"])
    write_notebook(folder / "02_later.ipynb", ["y = 3"])
    try:
        with pytest.raises(NotebookFailed):
            run_series(notebooks_dir=folder, out=tmp / "run")
    finally:
        if old is None:
            os.environ.pop("LORA_LENS_LEDGER", None)
        else:
            os.environ["LORA_LENS_LEDGER"] = old
    return tmp / "run"


def test_failed_run_gets_a_report_with_everything(failed_run):
    page = (failed_run / "index.html").read_text()
    # run, notebooks, timing
    assert "lora_lens run run" in page and "workshop" in page
    for stem in ("00_good", "01_bad", "02_later"):
        assert f'id="{stem}"' in page
    assert "wall time" in page and "kernel peak RSS" in page
    # key numbers, flattened
    assert "per_family.llama.acc" in page and "0.9877" in page and "[1, 4]" in page
    # failure with notebook, cell and error
    assert "Failures" in page and "KeyError" in page and "missing thing" in page
    assert "raise KeyError(&#x27;missing thing&#x27;)" in page
    # ledger evidence of this run
    assert "slope-positive" in page and "The line goes up" in page and "supported" in page
    # every local link resolves inside the run folder; no absolute paths in links
    links = re.findall(r'(?:href|src)="([^"#]+)"', page)
    assert links, page[:500]
    for link in links:
        assert not link.startswith(("/", "http")), link
        assert (failed_run / link).is_file(), link
    assert any(link.endswith(".png") for link in links)
    assert "report/00_good.html" in links and "report/01_bad.html" in links
    export = (failed_run / "report" / "00_good.html").read_text()
    assert "data:image/png;base64" in export  # images embedded in the export
    assert not re.search(r'<link[^>]+href="http', export)  # CSS inline: readable offline
    assert not list(failed_run.glob(".*.tmp")) and not list(failed_run.glob(".report.*"))


def test_report_command_rebuilds_and_refuses_bad_folders(failed_run, tmp_path, capsys):
    (failed_run / "index.html").unlink()
    assert cli.main(["report", str(failed_run)]) == 0
    assert (failed_run / "index.html").is_file()
    assert str(failed_run / "index.html") in capsys.readouterr().out
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert cli.main(["report", str(tmp_path / "plain")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert list((tmp_path / "plain").iterdir()) == []
    with pytest.raises(NotFoundError):
        write_report(tmp_path / "nowhere")
    (tmp_path / "plain" / "run.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="notebooks"):
        write_report(tmp_path / "plain")


def test_report_after_success_lists_ok_notebooks(tmp_path):
    folder = tmp_path / "nbs"
    write_notebook(folder / "00_a.ipynb", ["pass"])
    run_dir = run_series(notebooks_dir=folder, out=tmp_path / "run")
    page = (run_dir / "index.html").read_text()
    assert "Failures" not in page and "00_a" in page and "no summary.json" in page
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "ok"


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": [{"e": 0.5}], "f": []}) == [
        ("a.b", 1), ("a.c", [1, 2]), ("d[0].e", 0.5), ("f", [])]
    assert flatten(3) == [("", 3)]
