"""The run report's notebook exports and index page load nothing from outside the run folder (no kernel needed)."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import nbformat

from lora_lens.workshop.offline import WIDGET_NOTE, copy_mathjax, export_html
from lora_lens.workshop.report import write_report

PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63f8cfc0f01f0005000201e2e3a1f70000000049454e44ae426082")).decode()


def executed_notebook() -> nbformat.NotebookNode:
    """A notebook as papermill leaves it: a formula, a widget output with its state, a figure, a table."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2,
                                                                            "version_minor": 0}}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Title\n\nLoRA learns $\\Delta W = BA$ and $$\\operatorname{rank}(BA) \\le r$$"),
        nbformat.v4.new_code_cell("widgets.probe_browser(tables)", execution_count=1, outputs=[
            nbformat.v4.new_output("display_data", data={
                "text/plain": "VBox(children=(HBox(...), Output()))",
                "application/vnd.jupyter.widget-view+json": {"model_id": "abc", "version_major": 2,
                                                             "version_minor": 0}})]),
        nbformat.v4.new_code_cell("fig", execution_count=2, outputs=[
            nbformat.v4.new_output("display_data", data={"image/png": PNG, "text/plain": "<Figure>"})]),
        nbformat.v4.new_code_cell("df", execution_count=3, outputs=[
            nbformat.v4.new_output("execute_result", execution_count=3,
                                   data={"text/html": "<table><tr><td>1</td></tr></table>", "text/plain": "1"})]),
    ]
    return nb


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("src", "href") and value is not None:
                self.urls.append((tag, key, value))


def links(page: Path) -> list[tuple[str, str, str]]:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser.urls


def assert_offline(page: Path, root: Path) -> None:
    """Every src/href is relative (and inside ``root``), a fragment or data:; no http(s) loader anywhere."""
    for tag, key, url in links(page):
        assert not re.match(r"^[a-z][a-z0-9+.-]*:", url, re.I) or url.startswith("data:"), (page.name, tag, url)
        assert not url.startswith("//"), (page.name, tag, url)
        if url.startswith("#") or url.startswith("data:"):
            continue
        target = (page.parent / url.split("?")[0].split("#")[0]).resolve()
        assert target.is_relative_to(root.resolve()) and target.exists(), (page.name, url)
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"<(script|link)[^>]+(src|href)=[\"']https?://", text, re.I)
    assert "require.js" not in text and "embed-amd" not in text and "cdn" not in text.lower()


def test_export_loads_only_the_run_folder(tmp_path):
    page = export_html(executed_notebook(), tmp_path / "report" / "nb.html", tmp_path / "report" / "_static")
    assert_offline(page, tmp_path)
    text = page.read_text(encoding="utf-8")
    assert 'src="_static/mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"' in text
    assert WIDGET_NOTE in text and "VBox(children=" in text  # the widget's fallback, not a view
    assert "application/vnd.jupyter.widget-state+json" not in text
    assert "mermaid" not in text.lower()
    static = tmp_path / "report" / "_static" / "mathjax"
    assert (static / "config" / "TeX-AMS-MML_HTMLorMML-full.js").is_file()
    assert (static / "jax" / "output" / "HTML-CSS" / "fonts" / "STIX-Web" / "fontdata.js").is_file()
    assert (static / "fonts" / "HTML-CSS" / "STIX-Web" / "woff").is_dir()
    size = sum(p.stat().st_size for p in static.rglob("*") if p.is_file())
    assert size < 8e6, f"MathJax copy is {size / 1e6:.1f} MB"


def test_copy_mathjax_is_done_once(tmp_path):
    first = copy_mathjax(tmp_path)
    marker = first / "MathJax.js"
    marker.write_text("// kept")
    assert copy_mathjax(tmp_path) == first and marker.read_text() == "// kept"


def test_report_index_and_exports_are_offline(tmp_path):
    run = tmp_path / "run"
    (run / "00_nb").mkdir(parents=True)
    nbformat.write(executed_notebook(), run / "00_nb" / "00_nb.ipynb")
    (run / "00_nb" / "summary.json").write_text(json.dumps({"x": 1}))
    (run / "run.json").write_text(json.dumps({"run_id": "run", "status": "ok", "notebooks": [
        {"notebook": "00_nb", "status": "ok", "seconds": 1.0, "output": "00_nb/00_nb.ipynb"}]}))
    index = write_report(run)
    assert_offline(index, run)
    assert_offline(run / "report" / "00_nb.html", run)
    assert (run / "report" / "_static" / "mathjax" / "MathJax.js").is_file()
