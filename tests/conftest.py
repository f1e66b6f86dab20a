"""Shared test setup: headless defaults and a factory for tiny fixture notebooks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import nbformat
import pytest

# Harmless defaults, also set by .ci/run: no display, no model hub. Kernels started by papermill inherit them.
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


def write_notebook(path: Path, cells: list[str], parameters: str | None = 'output_dir = "out"\nx = 1') -> Path:
    """Write a notebook whose first code cell is ``parameters`` (tagged), followed by ``cells``.

    Args:
        path: where to write the ``.ipynb``.
        cells: source of the code cells after the parameters cell.
        parameters: source of the parameters cell; None writes a notebook without one (and no tag).

    Returns:
        ``path``.
    """
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells.append(nbformat.v4.new_markdown_cell(f"# {path.stem}"))
    if parameters is not None:
        nb.cells.append(nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}))
    nb.cells.extend(nbformat.v4.new_code_cell(src) for src in cells)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def assert_same_float(actual, expected, dtype=None, ulps: int = 64) -> None:
    """Assert that two computations of the same float(s) agree within a tolerance scaled to dtype and magnitude.

    Two routes to one number (batched vs one by one, captum vs ours, a different thread count) round differently,
    so the tolerance is ``ulps`` machine epsilons of ``dtype`` — the dtype the numbers were *computed* in (default
    float32, the package's compute dtype, even when they arrive as Python or numpy float64) — relative to the
    magnitude of the value and absolute near zero: ``|a - b| <= ulps * eps * max(1, |b|)``.
    """
    import numpy as np
    import torch

    a, b = (x.detach().cpu().double() if isinstance(x, torch.Tensor) else torch.tensor(np.array(x, dtype=np.float64))
            for x in (actual, expected))
    dtype = dtype or torch.float32
    tol = ulps * torch.finfo(dtype).eps
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def randomize_lora(peft_model, seed: int = 1, scale: float = 0.3):
    """Fill every LoRA factor of ``peft_model`` with seeded random values (an adapter that changes everything)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return peft_model


@pytest.fixture
def make_notebook() -> Callable[..., Path]:
    """Factory fixture: ``make_notebook(path, cells, parameters=...)`` writes a fixture notebook."""
    return write_notebook


@pytest.fixture(scope="session", autouse=True)
def test_cache(tmp_path_factory) -> Path:
    """A model cache for this test session only; notebook kernels inherit it through ``LORA_LENS_CACHE``."""
    path = tmp_path_factory.mktemp("lora_lens_cache")
    old = os.environ.get("LORA_LENS_CACHE")
    os.environ["LORA_LENS_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LORA_LENS_CACHE", None)
    else:
        os.environ["LORA_LENS_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_world():
    """A small world (24 entities) that tiny models learn in seconds."""
    from lora_lens.lab.world import make_world

    return make_world(n_entities=24, n_general=60, seed=0)


@pytest.fixture(scope="session")
def tiny_llama(tiny_world, test_cache):
    """A tiny Llama pretrained on ``tiny_world`` (cached for the session). Treat it as read-only."""
    from lora_lens.lab.zoo import get_pretrained

    return get_pretrained("llama", "tiny", world=tiny_world, cache=test_cache)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests use tiny models, which gain nothing from intra-op threads and lose much to spin-waits."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
