"""Run the notebook series with papermill into a fresh run folder.

The series is every ``notebooks/NN_*.ipynb``, executed in order of its two-digit prefix ``NN``. Each notebook gets
its own folder ``<run>/<notebook stem>/``, passed to it as the ``output_dir`` parameter and used as the kernel's
working directory; the executed notebook is written there too. ``<run>/run.json`` records what ran.

Parameters come from three layers, later ones winning: the notebook's own defaults, the preset
(:mod:`lora_lens.presets`), and explicit overrides (``NAME`` for every notebook that declares it, ``NN.NAME`` for
notebook ``NN`` only). Every name is checked against the parameters the notebooks declare before anything runs.

While a notebook runs, the kernel sees the run context in these environment variables:
``LORA_LENS_RUN_ID`` (run folder name), ``LORA_LENS_RUN_DIR`` (absolute run folder), ``LORA_LENS_NOTEBOOK``
(notebook stem) and ``LORA_LENS_PARAMS`` (JSON of the parameters passed).

Example:
    >>> from lora_lens.runner import run_series
    >>> run_dir = run_series(preset="smoke", only=["00"])  # doctest: +SKIP
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import nbformat

from lora_lens import presets
from lora_lens.errors import ConfigError, NotebookError, NotFoundError

ENV_VARS = ("LORA_LENS_RUN_ID", "LORA_LENS_RUN_DIR", "LORA_LENS_NOTEBOOK", "LORA_LENS_PARAMS")
RESERVED = "output_dir"
_NOTEBOOK_RE = re.compile(r"^(\d{2})_.+\.ipynb$")
_KEY_RE = re.compile(r"^(?:(\d{2})\.)?([A-Za-z_]\w*)$")


class NotebookFailed(NotebookError):
    """A notebook raised while executing; the run stopped there.

    Attributes:
        notebook: stem of the notebook that failed.
        executed: path of the executed notebook, kept for inspection.
    """

    def __init__(self, message: str, notebook: str, executed: Path):
        super().__init__(message)
        self.notebook = notebook
        self.executed = executed


@dataclass
class Notebook:
    """One notebook of the series and the parameters its ``parameters`` cell declares."""

    prefix: str
    path: Path
    declared: dict[str, dict[str, Any]]

    @property
    def stem(self) -> str:
        """The file name without ``.ipynb``, also the name of its output folder."""
        return self.path.stem


def default_notebooks_dir() -> Path:
    """Return the ``notebooks/`` folder next to the package source, else ``./notebooks``.

    Raises:
        NotFoundError: if neither folder exists.
    """
    candidates = [Path(__file__).resolve().parent.parent / "notebooks", Path.cwd() / "notebooks"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise NotFoundError(
        f"no notebooks folder found (looked in {', '.join(str(c) for c in candidates)}); "
        "pass the folder with --notebooks DIR"
    )


def discover(notebooks_dir: Path) -> list[Path]:
    """Return the series ``NN_*.ipynb`` in ``notebooks_dir``, sorted by prefix.

    Raises:
        NotFoundError: if the folder does not exist or holds no ``NN_*.ipynb``.
        ConfigError: if two notebooks share a prefix.
    """
    if not notebooks_dir.is_dir():
        raise NotFoundError(f"notebooks folder {notebooks_dir} does not exist; pass an existing folder")
    paths = sorted(p for p in notebooks_dir.iterdir() if _NOTEBOOK_RE.match(p.name))
    if not paths:
        raise NotFoundError(f"no NN_*.ipynb notebooks in {notebooks_dir}")
    prefixes = [p.name[:2] for p in paths]
    duplicates = sorted({x for x in prefixes if prefixes.count(x) > 1})
    if duplicates:
        raise ConfigError(f"notebook prefixes must be unique; {', '.join(duplicates)} used twice in {notebooks_dir}")
    return paths


def declared_parameters(path: Path) -> dict[str, dict[str, Any]]:
    """Return the parameters declared by the notebook's cell tagged ``parameters``.

    Raises:
        NotebookError: if no cell is tagged ``parameters`` or ``output_dir`` is not declared.
    """
    import papermill  # slow import, only needed here and in run_series

    nb = nbformat.read(path, as_version=4)
    if not any("parameters" in cell.get("metadata", {}).get("tags", []) for cell in nb.cells):
        raise NotebookError(
            f"notebook {path.name} has no cell tagged 'parameters'; tag the cell holding its parameters "
            "(cell toolbar -> Tags -> parameters)"
        )
    declared = papermill.inspect_notebook(str(path))
    if RESERVED not in declared:
        raise NotebookError(f"notebook {path.name} must declare `{RESERVED}: str = ...` in its parameters cell")
    return declared


def parse_value(text: str) -> Any:
    """Parse a command-line value as a Python literal, falling back to the raw string.

    Example:
        >>> parse_value("[1, 2]"), parse_value("0.5"), parse_value("tiny")
        ([1, 2], 0.5, 'tiny')
    """
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_assignments(items: Iterable[str]) -> dict[str, Any]:
    """Turn ``["NAME=VALUE", "01.NAME=VALUE"]`` into an overrides dict.

    Raises:
        ConfigError: if an item has no ``=``.
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-p expects NAME=VALUE or NN.NAME=VALUE, got {item!r}")
        overrides[key.strip()] = parse_value(value)
    return overrides


def _plain(value: Any, where: str) -> Any:
    """Return ``value`` as JSON-like data (tuples become lists) or raise ConfigError."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, where) for k, v in value.items()}
    raise ConfigError(f"{where}: value {value!r} is not a string, number, bool, None, list or dict")


def _allowed(notebooks: list[Notebook]) -> str:
    lines = []
    for nb in notebooks:
        names = ", ".join(n for n in nb.declared if n != RESERVED) or "-"
        lines.append(f"  {nb.prefix} ({nb.stem}): {names}")
    return "allowed names per notebook:\n" + "\n".join(lines)


def plan(
    notebooks: list[Notebook], preset: str, overrides: Mapping[str, Any]
) -> list[tuple[Notebook, dict[str, Any]]]:
    """Resolve the parameters for each notebook, checking every name first.

    Returns:
        ``(notebook, parameters)`` pairs; ``output_dir`` is added later by :func:`run_series`.

    Raises:
        ConfigError: unknown preset, stale preset name, unknown or malformed override name, bad value.
    """
    if preset not in presets.PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(sorted(presets.PRESETS))}")
    table = presets.PRESETS[preset]
    by_prefix = {nb.prefix: nb for nb in notebooks}
    resolved: dict[str, dict[str, Any]] = {nb.prefix: {} for nb in notebooks}
    for nb in notebooks:
        for name, value in table.get(nb.prefix, {}).items():
            if name not in nb.declared or name == RESERVED:
                raise ConfigError(
                    f"preset {preset!r} sets {name!r} for notebook {nb.stem}, which does not declare it; "
                    f"fix lora_lens/presets.py\n{_allowed([nb])}"
                )
            resolved[nb.prefix][name] = _plain(value, f"preset {preset!r} {nb.prefix}.{name}")
    # plain names first, then NN.NAME so that the targeted value wins
    for key in sorted(overrides, key=lambda k: "." in k):
        match = _KEY_RE.match(key)
        if not match:
            raise ConfigError(f"bad parameter name {key!r}; use NAME or NN.NAME (NN = notebook prefix)")
        prefix, name = match.groups()
        if name == RESERVED:
            raise ConfigError(f"{RESERVED} is set by the runner; choose the run folder with --out instead")
        value = _plain(overrides[key], f"-p {key}")
        if prefix is not None:
            nb = by_prefix.get(prefix)
            if nb is None:
                raise ConfigError(
                    f"-p {key}: notebook {prefix} is not selected; selected: {', '.join(by_prefix)}"
                )
            if name not in nb.declared:
                raise ConfigError(f"-p {key}: notebook {nb.stem} does not declare {name!r}\n{_allowed([nb])}")
            resolved[prefix][name] = value
        else:
            targets = [nb for nb in notebooks if name in nb.declared]
            if not targets:
                raise ConfigError(f"-p {key}: no selected notebook declares {name!r}\n{_allowed(notebooks)}")
            for nb in targets:
                resolved[nb.prefix][name] = value
    return [(nb, resolved[nb.prefix]) for nb in notebooks]


def _select(paths: list[Path], only: Iterable[str | int] | None) -> list[Path]:
    if only is None:
        return paths
    available = {p.name[:2]: p for p in paths}
    wanted = [str(x).strip().zfill(2) for x in only if str(x).strip()]
    unknown = [x for x in wanted if x not in available]
    if unknown or not wanted:
        raise ConfigError(
            f"--only {','.join(unknown) or '(empty)'}: no such notebook; available: {', '.join(available)}"
        )
    return [p for p in paths if p.name[:2] in wanted]


def _resolve_run_dir(out: str | os.PathLike | None) -> Path:
    if out is not None:
        run_dir = Path(out).resolve()
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise ConfigError(f"run folder {run_dir} already exists and is not empty; choose a new --out")
        return run_dir
    base = Path.cwd() / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a temp file next to ``path``, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=repr) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _failure_message(nb: Notebook, exc: Exception, executed: Path) -> str:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        first = next((line for line in str(exc.source).splitlines() if line.strip()), "")
        # papermill counts the injected-parameters cell; report the index in the source notebook
        param_idx = next(i for i, c in enumerate(nbformat.read(nb.path, as_version=4).cells)
                         if "parameters" in c.get("metadata", {}).get("tags", []))
        index = exc.cell_index - 1 if exc.cell_index > param_idx else exc.cell_index
        where = f"in cell {index} ({first.strip()!r}; In [{exc.exec_count}] of the executed notebook)"
        what = f"{exc.ename}: {exc.evalue}"
    else:
        where, what = "while executing", f"{type(exc).__name__}: {exc}"
    return f"notebook {nb.stem} failed {where}: {what}\nexecuted notebook kept at {executed}"


def run_series(
    preset: str = presets.DEFAULT_PRESET,
    overrides: Mapping[str, Any] | None = None,
    only: Iterable[str | int] | None = None,
    out: str | os.PathLike | None = None,
    notebooks_dir: str | os.PathLike | None = None,
    verbose: bool = False,
) -> Path:
    """Execute the notebook series into a fresh run folder.

    Args:
        preset: name of a preset in :data:`lora_lens.presets.PRESETS`.
        overrides: ``{"NAME": value, "NN.NAME": value}``; NAME applies to every selected notebook declaring it.
        only: notebook prefixes to run (``["00", "02"]``); all when None.
        out: run folder; must not exist or be empty. Default ``runs/<YYYYmmdd-HHMMSS>/`` in the current directory.
        notebooks_dir: folder with ``NN_*.ipynb``; default from :func:`default_notebooks_dir`.
        verbose: stream the notebooks' cell output and a progress bar.

    Returns:
        The run folder (absolute).

    Raises:
        ConfigError: bad preset, parameter name or value, ``--only`` prefix or run folder (nothing is written).
        NotFoundError: no notebooks found (nothing is written).
        NotebookError: a notebook is malformed (nothing is written).
        NotebookFailed: a notebook raised while running; the run stops there, its executed notebook is kept.
    """
    import papermill

    folder = Path(notebooks_dir).resolve() if notebooks_dir is not None else default_notebooks_dir()
    paths = _select(discover(folder), only)
    notebooks = [Notebook(p.name[:2], p, declared_parameters(p)) for p in paths]
    steps = plan(notebooks, preset, dict(overrides or {}))
    run_dir = _resolve_run_dir(out)

    run_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "run_id": run_dir.name,
        "preset": preset,
        "overrides": dict(overrides or {}),
        "notebooks_dir": str(folder),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "status": "running",
        "notebooks": [
            {"notebook": nb.stem, "status": "pending", "seconds": None, "parameters": params} for nb, params in steps
        ],
    }
    _write_json(run_dir / "run.json", record)
    for i, ((nb, params), entry) in enumerate(zip(steps, record["notebooks"]), start=1):
        nb_dir = run_dir / nb.stem
        nb_dir.mkdir()
        executed = nb_dir / nb.path.name
        params = {RESERVED: str(nb_dir), **params}
        entry.update(status="running", parameters=params, output=str(executed.relative_to(run_dir)))
        _write_json(run_dir / "run.json", record)
        print(f"[{i}/{len(steps)}] {nb.stem} ...", flush=True)
        env = {
            "LORA_LENS_RUN_ID": run_dir.name,
            "LORA_LENS_RUN_DIR": str(run_dir),
            "LORA_LENS_NOTEBOOK": nb.stem,
            "LORA_LENS_PARAMS": json.dumps(params),
        }
        t0 = time.perf_counter()
        try:
            with _environ(env):
                papermill.execute_notebook(
                    str(nb.path), str(executed), parameters=params, kernel_name="python3",
                    progress_bar=verbose, log_output=verbose, cwd=str(nb_dir),
                )
        except BaseException as exc:
            entry.update(status="failed", seconds=round(time.perf_counter() - t0, 3))
            record.update(status="failed" if isinstance(exc, Exception) else "interrupted",
                          finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            if isinstance(exc, Exception):
                entry["error"] = _failure_message(nb, exc, executed)
            _write_json(run_dir / "run.json", record)
            if isinstance(exc, Exception):
                raise NotebookFailed(entry["error"], nb.stem, executed) from exc
            raise
        entry.update(status="ok", seconds=round(time.perf_counter() - t0, 3))
        _write_json(run_dir / "run.json", record)
        print(f"[{i}/{len(steps)}] {nb.stem} ok in {entry['seconds']:.1f} s", flush=True)
    record.update(status="ok", finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    _write_json(run_dir / "run.json", record)
    print(f"run folder: {run_dir}", flush=True)
    return run_dir
