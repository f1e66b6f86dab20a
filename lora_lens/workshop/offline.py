"""HTML exports of executed notebooks that make no network request.

nbconvert's stock ``lab`` export loads require.js, MathJax and the widget renderer from a CDN. The exports of a run
report are read on workshop laptops that may be offline, so :func:`export_html` uses a small template (it extends
``lab``) that

* loads **MathJax 2** from the run folder: a copy of the MathJax tree that the ``jupyter-server-mathjax`` package
  ships (TeX input, HTML-CSS output with the STIX web fonts — the only ones the package has), made once per run by
  :func:`copy_mathjax` into ``report/_static/mathjax/`` and referenced by a relative URL;
* drops require.js, the widget renderer and mermaid: a widget output shows its ``text/plain`` fallback and the note
  :data:`WIDGET_NOTE`. Every widget cell of the series is followed by a static figure or table that shows the
  same result, so nothing is lost in the report.

Everything else of the page (CSS, images) is inline already, so the export loads only files below its own folder.

Example:
    >>> from lora_lens.workshop.offline import copy_mathjax, export_html
    >>> static = copy_mathjax("runs/x/report/_static")             # doctest: +SKIP
    >>> export_html(nb, "runs/x/report/02_what_changed.html", static)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

from lora_lens.errors import NotFoundError

__all__ = ["MATHJAX_CONFIG", "WIDGET_NOTE", "copy_mathjax", "export_html", "exporter", "mathjax_source",
           "static_widgets"]

WIDGET_NOTE = "interactive widget: open the notebook in JupyterLab"
"""What an export shows in place of a live widget view."""
MATHJAX_CONFIG = "TeX-AMS-MML_HTMLorMML-full"
"""The combined MathJax 2 configuration the exports load (``jupyter-server-mathjax`` has no CHTML build; nbconvert's
default ``TeX-AMS_CHTML-full`` is not in it)."""

# What MathJax needs for TeX -> HTML-CSS with the STIX web fonts, relative to the package's static/ folder. Not
# copied: the SVG output (2.9 MB), the a11y extensions (3.7 MB) and the localisations other than English.
_MATHJAX_PARTS = ("MathJax.js", "LICENSE", f"config/{MATHJAX_CONFIG}.js", "config/Safe.js", "extensions",
                  "jax/input/TeX", "jax/element", "jax/output/HTML-CSS", "fonts/HTML-CSS/STIX-Web",
                  "localization/en")
_SKIP = shutil.ignore_patterns("a11y")
_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

_TEMPLATE = r"""
{%- extends 'lab/index.html.j2' -%}
{#- lora_lens offline export: MathJax from the run folder; no require.js, no widget renderer, no mermaid. -#}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block html_head_js_mathjax -%}
<script type="text/x-mathjax-config">
MathJax.Hub.Config({
  TeX: {equationNumbers: {autoNumber: "AMS", useLabelIds: true}},
  tex2jax: {inlineMath: [['$','$'], ["\\(","\\)"]], displayMath: [['$$','$$'], ["\\[","\\]"]],
            processEscapes: true, processEnvironments: true},
  "HTML-CSS": {availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null,
               linebreaks: {automatic: true},
               // MathJax's placeholder font is url('about:blank'), which Chromium reports as a failed load from a
               // file:// page; it never loads anywhere, and a missing local() font behaves the same, silently.
               styles: {"@font-face": {"font-family": "MathJax_Blank", src: "local('MathJax_Blank_none')"}}},
  displayAlign: 'center', messageStyle: 'none', showMathMenu: false,
  menuSettings: {zoom: "None"}
});
</script>
<script src="{{ resources.mathjax_url }}"></script>
{%- endblock html_head_js_mathjax -%}
"""


def mathjax_source() -> Path:
    """The MathJax 2 tree of the ``jupyter-server-mathjax`` package.

    Raises:
        NotFoundError: the package is not installed.
    """
    try:
        import jupyter_server_mathjax
    except ImportError:
        raise NotFoundError("offline report exports need the package jupyter-server-mathjax (MathJax 2); "
                            "install it with `pip install jupyter-server-mathjax`") from None
    return Path(jupyter_server_mathjax.__file__).resolve().parent / "static"


def copy_mathjax(static_dir: str | os.PathLike) -> Path:
    """Copy what MathJax needs into ``static_dir/mathjax/`` (once: an existing copy is kept) and return that folder.

    Raises:
        NotFoundError: ``jupyter-server-mathjax`` is not installed.
    """
    src, dest = mathjax_source(), Path(static_dir) / "mathjax"
    if (dest / "MathJax.js").is_file():
        return dest
    for part in _MATHJAX_PARTS:
        if (src / part).is_dir():
            shutil.copytree(src / part, dest / part, ignore=_SKIP, dirs_exist_ok=True)
        elif (src / part).is_file():
            (dest / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / part, dest / part)
    return dest


def exporter(mathjax_url: str):
    """An nbconvert ``HTMLExporter`` with the offline template; ``mathjax_url`` is relative to the export."""
    import jinja2
    from nbconvert import HTMLExporter

    return HTMLExporter(template_name="lab", extra_loaders=[jinja2.DictLoader({"lora_lens_offline.j2": _TEMPLATE})],
                        template_file="lora_lens_offline.j2", mathjax_url=mathjax_url)


def static_widgets(nb):
    """Replace every widget view output of ``nb`` (in place) by its ``text/plain`` fallback and :data:`WIDGET_NOTE`;
    drop the saved widget state. Returns ``nb``."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            data = output.get("data") or {}
            if _WIDGET_VIEW in data:
                plain = "".join(data.get("text/plain", ""))
                plain = plain if len(plain) <= 160 else plain[:159] + "…"
                output["data"] = {"text/plain": f"{plain}\n[{WIDGET_NOTE}]" if plain else f"[{WIDGET_NOTE}]"}
    return nb


def export_html(nb, out_html: str | os.PathLike, static_dir: str | os.PathLike) -> Path:
    """Export an executed notebook to ``out_html`` that loads only files from ``static_dir`` (by relative URLs).

    Args:
        nb: An executed ``nbformat`` notebook node (not modified).
        out_html: The page to write.
        static_dir: Folder for MathJax (copied there by :func:`copy_mathjax` unless present); any folder at or
            below the page's folder's parent tree works, the URL is made relative to the page.

    Returns:
        ``out_html`` as a path.
    """
    out_html = Path(out_html)
    mathjax = copy_mathjax(static_dir)
    rel = Path(os.path.relpath(mathjax / "MathJax.js", out_html.parent)).as_posix()
    nb = static_widgets(copy.deepcopy(nb))
    body, _ = exporter(f"{rel}?config={MATHJAX_CONFIG},Safe").from_notebook_node(nb)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(body, encoding="utf-8")
    return out_html
