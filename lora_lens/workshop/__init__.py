"""The notebook series: the runner and its report, parameter presets, widgets, exercise checks and figures."""

import sys

# nbformat imports jsonschema, which imports the optional rfc3987_syntax (when installed, as jupyter pulls it in)
# for its "iri" format check — 1.6 s of grammar building, paid again in every notebook's worker process. Notebook
# schemas never use that format: mark the module absent in this process (jsonschema then skips the check). It is
# set here, in the room's __init__, so that it runs before any workshop module imports nbformat.
sys.modules.setdefault("rfc3987_syntax", None)

__all__: list[str] = []
