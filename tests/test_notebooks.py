"""Run every notebook of the series with the ``smoke`` preset and check the numbers it records.

Each notebook writes ``summary.json`` into its ``output_dir``; ``CHECKS`` maps its prefix to a function that
asserts on that summary. A notebook without an entry in ``CHECKS`` fails: add a check when adding a notebook
(and its entries in :mod:`lora_lens.presets`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

from lora_lens.runner import run_series

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SERIES = sorted(p for p in NOTEBOOKS.glob("*.ipynb") if re.match(r"^\d{2}_", p.name))


def check_00(summary: dict) -> None:
    """Notebook 00 builds and pretrains a small model per family on the synthetic world."""
    families = summary["families"]
    assert families, "no family in the summary"
    items = families.items() if isinstance(families, dict) else ((f["family"], f) for f in families)
    for family, result in items:
        assert 0.0 <= result["fact_accuracy"] <= 1.0, family
        assert result["params"] > 0, family
        assert result["pretrain_seconds"] > 0, family


CHECKS = {
    "00": check_00,
}


@pytest.mark.slow
@pytest.mark.parametrize("path", SERIES, ids=[p.stem for p in SERIES])
def test_notebook_smoke(path: Path, tmp_path: Path) -> None:
    prefix = path.name[:2]
    check = CHECKS.get(prefix)
    assert check is not None, f"no check for notebook {path.name}: add one to CHECKS in {Path(__file__).name}"
    run_dir = run_series(preset="smoke", only=[prefix], out=tmp_path / "run", notebooks_dir=NOTEBOOKS)
    summary_path = run_dir / path.stem / "summary.json"
    assert summary_path.is_file(), f"{path.name} wrote no summary.json into its output_dir"
    check(json.loads(summary_path.read_text()))


@pytest.mark.parametrize("path", SERIES, ids=[p.stem for p in SERIES])
def test_notebook_is_stored_stripped_with_one_parameters_cell(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), (
        f"{path.name} is stored with outputs; run: nbstripout {path.relative_to(NOTEBOOKS.parent)}"
    )
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one code cell tagged 'parameters', has {len(tagged)}"
