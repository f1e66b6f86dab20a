"""``lora-lens lab``: open the notebook series in JupyterLab, set up like ``lora-lens run``.

JupyterLab starts in the notebooks folder (:func:`lora_lens.workshop.runner.default_notebooks_dir`), on the
``python3`` kernel that every notebook names in its metadata (the one papermill uses under ``lora-lens run``), with
an environment under which the notebooks find what a run finds:

* the model and adapter cache: ``$LORA_LENS_CACHE`` when set, else the user cache dir
  (:func:`lora_lens.lab.zoo.cache_dir`) — the cache ``lora-lens run`` fills, passed explicitly to every kernel;
* the hypothesis ledger: ``$LORA_LENS_LEDGER`` when set, else ``runs/ledger.sqlite`` of the project (the
  ledger ``lora-lens run`` with the default preset writes) — passed explicitly, so it holds for a notebook opened
  from any folder;
* outputs: each notebook's ``output_dir`` parameter (``outputs/NN_name`` next to the notebook); an interactive
  session is no run, so the run variables (``LORA_LENS_RUN_ID`` …) are not set and the ledger records its evidence
  under an ``interactive-…`` run id.

Example:
    >>> from lora_lens.workshop.lab import lab_command
    >>> cmd, env = lab_command(port=8899)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from lora_lens.errors import NotFoundError
from lora_lens.workshop.series import default_notebooks_dir, discover

__all__ = ["KERNEL", "check_kernel", "describe", "lab_command", "lab_environment", "open_lab"]

KERNEL = "python3"
"""The kernel the notebooks name in their metadata, and the one ``lora-lens run`` uses."""


def lab_environment(notebooks_dir: Path, base: dict | None = None) -> dict[str, str]:
    """The ``LORA_LENS_*`` variables a JupyterLab session needs, on top of ``base`` (default ``os.environ``)."""
    from lora_lens.lab.zoo import cache_dir  # imports torch: only when JupyterLab is started

    env = dict(os.environ if base is None else base)
    for name in ("LORA_LENS_RUN_ID", "LORA_LENS_RUN_DIR", "LORA_LENS_NOTEBOOK", "LORA_LENS_PARAMS"):
        env.pop(name, None)  # not a run: the ledger gives interactive evidence its own run id
    env["LORA_LENS_CACHE"] = str(Path(env.get("LORA_LENS_CACHE") or cache_dir()).resolve())
    if env.get("LORA_LENS_LEDGER"):
        ledger = Path(env["LORA_LENS_LEDGER"])
    else:
        project = notebooks_dir.resolve().parent
        ledger = (project if (project / "pyproject.toml").is_file() else Path.cwd()) / "runs" / "ledger.sqlite"
    env["LORA_LENS_LEDGER"] = str(ledger.resolve())
    return env


def lab_command(notebooks_dir: str | os.PathLike | None = None, port: int | None = None, no_browser: bool = False,
                extra: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Return ``(argv, env)`` that start JupyterLab on the series.

    Args:
        notebooks_dir: Folder with ``NN_*.ipynb`` (default: the checkout's ``notebooks/``).
        port: Port (default JupyterLab's, 8888 or the next free one).
        no_browser: Do not open a browser tab.
        extra: More arguments for ``jupyter lab``.

    Raises:
        NotFoundError: no notebooks folder, or the ``python3`` kernel is not installed.
    """

    folder = Path(notebooks_dir).resolve() if notebooks_dir is not None else default_notebooks_dir()
    first = discover(folder)[0]
    argv = [sys.executable, "-m", "jupyter", "lab", f"--ServerApp.root_dir={folder}",
            f"--MappingKernelManager.default_kernel_name={KERNEL}"]
    if port is not None:
        argv.append(f"--port={port}")
    if no_browser:
        argv.append("--no-browser")
    argv += list(extra or [])
    argv.append(first.name)  # opens the first notebook of the series
    return argv, lab_environment(folder)


def check_kernel() -> None:
    """Raise NotFoundError unless the ``python3`` kernel is installed (``python -m ipykernel install``)."""
    from jupyter_client.kernelspec import KernelSpecManager

    if KERNEL not in KernelSpecManager().find_kernel_specs():
        raise NotFoundError(f"the Jupyter kernel {KERNEL!r} is not installed; install it with "
                            "`python -m ipykernel install --user` (or --sys-prefix in a virtual environment)")


def describe(argv: list[str], env: dict[str, str]) -> str:
    """The command as a shell line, with the ``LORA_LENS_*`` variables it sets in front."""
    names = ("LORA_LENS_CACHE", "LORA_LENS_LEDGER")
    return " ".join([*(f"{n}={shlex.quote(env[n])}" for n in names), shlex.join(argv)])


def open_lab(notebooks_dir=None, port=None, no_browser=False, dry_run=False, extra=None) -> int:
    """Start JupyterLab on the series (blocking) and return its exit code; ``dry_run`` prints the command only."""
    argv, env = lab_command(notebooks_dir, port, no_browser, extra)
    print(describe(argv, env), flush=True)
    if dry_run:
        return 0
    check_kernel()
    print(f"kernel: {KERNEL}; models and adapters: {env['LORA_LENS_CACHE']}; ledger: {env['LORA_LENS_LEDGER']}; "
          "outputs: each notebook's output_dir (outputs/NN_name next to the notebook)", flush=True)
    try:
        return subprocess.call(argv, env=env)
    except KeyboardInterrupt:
        return 0
