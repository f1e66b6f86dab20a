"""Run the notebook series with papermill into a fresh run folder.

The series is every ``notebooks/NN_*.ipynb``, executed in order of its two-digit prefix ``NN``. Each notebook gets
its own folder ``<run>/<notebook stem>/``, passed to it as the ``output_dir`` parameter and used as the kernel's
working directory; the executed notebook is written there too. ``<run>/run.json`` records what ran.

Parameters come from three layers, later ones winning: the notebook's own defaults, the preset
(:mod:`lora_lens.workshop.presets`), and explicit overrides (``NAME`` for every notebook that declares it, ``NN.NAME`` for
notebook ``NN`` only). Every name is checked against the parameters the notebooks declare before anything runs.

Scheduling: every notebook runs in its own worker process (spawned) with its own kernel, so ``jobs`` notebooks can
run at once (jupyter_client gives each kernel free ports). A notebook may declare what it needs in its notebook
metadata, ``{"lora_lens": {"needs": ["00"]}}`` (prefixes) or ``{"lora_lens": {"needs": "all"}}`` (every selected
notebook with a lower prefix; the journal declares this, so it runs last). Without a declaration, a notebook needs
``00`` (which pretrains the models the others load from the shared cache) and ``00`` needs nothing. Needs are
about scheduling only: a need that is not selected is ignored, because every notebook can build what it lacks
through the (locked) cache. A notebook starts when everything it needs has finished ``ok``; ties go to the lower
prefix, so ``jobs=1`` runs the series in prefix order. After the first failure no new notebook starts; those
already running finish. With ``jobs > 1`` each kernel gets ``OMP_NUM_THREADS = CPUs // jobs`` (at least 1) unless
``$OMP_NUM_THREADS`` is set, so that parallel notebooks do not oversubscribe the CPUs.

``<run>/run.json`` (written atomically after every change) records per notebook: status, wall seconds, peak RSS of
its kernel (``max_rss_mb``, from ``getrusage(RUSAGE_CHILDREN)`` of its worker), parameters and ``inputs_hash``
(parameters + the notebook file). ``resume=RUN_DIR`` reruns a run folder in place: notebooks that finished ``ok``
with the same ``inputs_hash`` are skipped; failed, pending or changed ones run again, and so does every notebook
that needs one of those (its input may have changed). After every run (also a
failed one) the runner writes ``<run>/index.html`` (:mod:`lora_lens.workshop.report`).

While a notebook runs, the kernel sees the run context in these environment variables:
``LORA_LENS_RUN_ID`` (run folder name), ``LORA_LENS_RUN_DIR`` (absolute run folder), ``LORA_LENS_NOTEBOOK``
(notebook stem), ``LORA_LENS_PARAMS`` (JSON of the parameters passed) and ``LORA_LENS_LEDGER`` (the hypothesis
ledger: ``$LORA_LENS_LEDGER`` when set, else ``ledger.sqlite`` next to the run folder for the default preset and
``ledger-<preset>.sqlite`` for any other, so smoke runs never count as evidence); ``MPLBACKEND`` is set to the inline
backend so that figures land in the executed notebook (and the report) even where ``MPLBACKEND=Agg``.

Example:
    >>> from lora_lens.workshop.runner import run_series
    >>> run_dir = run_series(preset="smoke", only=["00"])  # doctest: +SKIP
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import nbformat  # noqa: E402

from lora_lens.errors import ConfigError, NotebookError, NotFoundError
from lora_lens.workshop import presets
from lora_lens.workshop import progress  # issue 18 hook: progress lines, hidden transport warnings

# nbformat imports jsonschema, which imports the optional rfc3987_syntax (when installed, as jupyter pulls it in)
# for its "iri" format check — 1.6 s of grammar building, paid again in every notebook's worker process. Notebook
# schemas never use that format: mark the module absent in this process (jsonschema then skips the check).
sys.modules.setdefault("rfc3987_syntax", None)



ENV_VARS = ("LORA_LENS_RUN_ID", "LORA_LENS_RUN_DIR", "LORA_LENS_NOTEBOOK", "LORA_LENS_PARAMS", "LORA_LENS_LEDGER")
"""The run context every kernel gets (the ledger path too: each preset records into its own ledger)."""
RESERVED = "output_dir"
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
"""The kernels' matplotlib backend, whatever ``$MPLBACKEND`` says: executed notebooks keep their figures."""
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
    needs: list[str] | str | None = field(default=None)

    @property
    def stem(self) -> str:
        """The file name without ``.ipynb``, also the name of its output folder."""
        return self.path.stem


def default_notebooks_dir() -> Path:
    """Return the ``notebooks/`` folder next to the package source, else ``./notebooks``.

    Raises:
        NotFoundError: if neither folder exists.
    """
    candidates = [Path(__file__).resolve().parents[2] / "notebooks", Path.cwd() / "notebooks"]
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


def declared_needs(path: Path) -> list[str] | str | None:
    """Return what the notebook declares it needs: ``metadata.lora_lens.needs`` (None when not declared).

    Raises:
        NotebookError: if the declaration is not ``"all"`` or a list of two-digit prefixes.
    """
    meta = nbformat.read(path, as_version=4).metadata.get("lora_lens", {})
    needs = meta.get("needs") if isinstance(meta, dict) else None
    if needs is None or needs == "all":
        return needs
    if isinstance(needs, list) and all(isinstance(x, str) and re.fullmatch(r"\d{2}", x) for x in needs):
        return list(needs)
    raise NotebookError(
        f"notebook {path.name}: metadata lora_lens.needs = {needs!r}; use \"all\" or a list of two-digit "
        'prefixes such as ["00", "01"]'
    )


def dependencies(notebooks: list[Notebook], available: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Resolve what each selected notebook waits for (see the module docstring for the rule).

    Args:
        notebooks: the selected notebooks.
        available: every prefix in the notebooks folder (a need outside it is an error); default: the selected.

    Returns:
        prefix -> prefixes (selected ones only) that must finish ``ok`` before it starts.

    Raises:
        ConfigError: a need names a prefix that is not in the folder, or the needs form a cycle.
    """
    selected = [nb.prefix for nb in notebooks]
    known = set(available if available is not None else selected)
    deps: dict[str, list[str]] = {}
    for nb in notebooks:
        if nb.needs == "all":
            wanted = [p for p in selected if p < nb.prefix]
        elif nb.needs is None:
            wanted = ["00"] if nb.prefix != "00" else []
        else:
            missing = [p for p in nb.needs if p not in known]
            if missing:
                raise ConfigError(
                    f"notebook {nb.stem} needs {', '.join(missing)}, which is not in the notebooks folder; "
                    f"fix metadata lora_lens.needs (available: {', '.join(sorted(known))})"
                )
            wanted = list(nb.needs)
        deps[nb.prefix] = [p for p in wanted if p in selected and p != nb.prefix]
    done: set[str] = set()
    while len(done) < len(deps):
        ready = [p for p in deps if p not in done and all(d in done for d in deps[p])]
        if not ready:
            cycle = ", ".join(f"{p} needs {','.join(deps[p])}" for p in deps if p not in done)
            raise ConfigError(f"notebook needs form a cycle ({cycle}); fix metadata lora_lens.needs")
        done.update(ready)
    return deps


def inputs_hash(path: Path, params: Mapping[str, Any]) -> str:
    """A short hash of what determines a notebook's result here: its file's bytes and its parameters."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    blob = json.dumps({"notebook": digest, "parameters": params}, sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _failure(nb: Notebook, exc: Exception, executed: Path) -> tuple[str, dict[str, Any]]:
    """The message of a failed notebook and its structured form (cell index, first source line, error)."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        first = next((line for line in str(exc.source).splitlines() if line.strip()), "").strip()
        # papermill counts the injected-parameters cell; report the index in the source notebook
        param_idx = next(i for i, c in enumerate(nbformat.read(nb.path, as_version=4).cells)
                         if "parameters" in c.get("metadata", {}).get("tags", []))
        index = exc.cell_index - 1 if exc.cell_index > param_idx else exc.cell_index
        where = f"in cell {index} ({first!r}; In [{exc.exec_count}] of the executed notebook)"
        info = {"cell": index, "executed_cell": exc.cell_index, "source": first, "ename": exc.ename,
                "evalue": str(exc.evalue)[:2000]}
    else:
        where = "while executing"
        info = {"cell": None, "executed_cell": None, "source": "", "ename": type(exc).__name__,
                "evalue": str(exc)[:2000]}
    what = f"{info['ename']}: {info['evalue']}"
    return f"notebook {nb.stem} failed {where}: {what}\nexecuted notebook kept at {executed}", info


def _execute(conn, nb: Notebook, executed: str, params: dict, env: dict, verbose: bool) -> None:
    """Worker process: execute one notebook with papermill and send back its outcome.

    Runs in a fresh (spawned) process, so the environment, the kernel and ``getrusage(RUSAGE_CHILDREN)`` belong to
    this notebook alone; the kernel is a child of this process, reaped when papermill shuts it down.
    """
    import resource

    os.environ.update(env)
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # issue 18 hook: Ctrl-C is the parent's to handle
    progress.instrument_papermill()  # issue 18 hook
    progress.filter_stderr()  # issue 18 hook
    from lora_lens.workshop.execution import poll_shell_in_slices  # issue 18 hook: nbclient#312 widget-cell hang
    poll_shell_in_slices()
    t0 = time.perf_counter()
    result: dict[str, Any] = {"status": "ok"}
    try:
        import papermill

        papermill.execute_notebook(
            nb.path, executed, parameters=params, kernel_name="python3",
            progress_bar=verbose, log_output=verbose, cwd=str(Path(executed).parent),
        )
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the parent
        message, info = _failure(nb, exc, Path(executed))
        result = {"status": "failed", "error": message, "failure": info}
    result["seconds"] = round(time.perf_counter() - t0, 3)
    result["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    result["worker_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    conn.send(result)
    conn.close()


def _load_run(resume: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Return ``(run_dir, run.json)`` of an existing run folder, or raise before anything is written."""
    run_dir = Path(resume).resolve()
    if not run_dir.is_dir():
        raise NotFoundError(f"--resume {resume}: no such folder; pass a run folder made by `lora-lens run`")
    path = run_dir / "run.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--resume {resume}: not a run folder ({path.name} missing or unreadable: {exc}); "
            "pass a folder made by `lora-lens run`, or start a new run with --out"
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("notebooks"), list):
        raise ConfigError(f"--resume {resume}: {path} has no 'notebooks' list; it is not a lora-lens run folder")
    return run_dir, record


DEFAULT_JOBS = min(2, os.cpu_count() or 1)
"""``lora-lens run``'s default ``--jobs``: two notebooks at once where there are two CPUs (each notebook spends
seconds starting its kernel and importing torch, which the other one's work overlaps)."""


def _thread_env(jobs: int) -> dict[str, str]:
    """``OMP_NUM_THREADS`` for the kernels: the CPUs shared out between ``jobs`` notebooks (unless already set).

    Notebooks running at once with torch's default of one thread per CPU each would oversubscribe the CPUs, and
    spinning threads then slow every notebook down far more than the parallelism gains.
    """
    if jobs == 1 or os.environ.get("OMP_NUM_THREADS"):
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}


@contextlib.contextmanager
def _run_lock(run_dir: Path):
    """Create ``run_dir`` and hold ``run_dir/.run.lock`` exclusively, so that two runs never write one folder.

    Raises:
        ConfigError: another process holds the lock (e.g. a ``--resume`` of a run that is still going).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".run.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"run folder {run_dir} is in use by another lora-lens run; wait for it to finish, "
                              "or choose another folder") from None
        yield


def _report(run_dir: Path) -> None:
    """Write ``index.html``; a report that cannot be built is a warning, never the run's failure."""
    try:
        from lora_lens.workshop.report import write_report

        print(f"report: {write_report(run_dir)}", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"warning: run report not written ({type(exc).__name__}: {exc}); "
              f"rebuild it with `lora-lens report {run_dir}`", flush=True)


def run_series(
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    only: Iterable[str | int] | None = None,
    out: str | os.PathLike | None = None,
    notebooks_dir: str | os.PathLike | None = None,
    verbose: bool = False,
    jobs: int = 1,
    resume: str | os.PathLike | None = None,
) -> Path:
    """Execute the notebook series into a fresh run folder, or resume one.

    Args:
        preset: name of a preset in :data:`lora_lens.workshop.presets.PRESETS`; default ``workshop`` (the recorded one when
            resuming).
        overrides: ``{"NAME": value, "NN.NAME": value}``; NAME applies to every selected notebook declaring it.
            When resuming, these are applied on top of the recorded overrides.
        only: notebook prefixes to run (``["00", "02"]``); all when None (the recorded selection when resuming).
        out: run folder; must not exist or be empty. Default ``runs/<YYYYmmdd-HHMMSS>/`` in the current directory.
        notebooks_dir: folder with ``NN_*.ipynb``; default from :func:`default_notebooks_dir` (the recorded one
            when resuming).
        verbose: stream the notebooks' cell output and a progress bar.
        jobs: how many notebooks may run at once (each in its own process and kernel), ≥ 1.
        resume: an existing run folder to complete in place: notebooks that finished ``ok`` with the same
            parameters and notebook file are skipped, the others run again. Excludes ``out``.

    Returns:
        The run folder (absolute).

    Raises:
        ConfigError: bad preset, parameter name or value, ``--only`` prefix, run folder, ``jobs``, needs, or a
            ``resume`` folder that is not a run folder (nothing is written).
        NotFoundError: no notebooks found, or the ``resume`` folder does not exist (nothing is written).
        NotebookError: a notebook is malformed (nothing is written).
        NotebookFailed: a notebook raised while running; no new notebook starts, its executed notebook is kept.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs {jobs!r}: must be an integer ≥ 1 (the number of notebooks run at once)")
    previous: dict[str, Any] | None = None
    if resume is not None:
        if out is not None:
            raise ConfigError("--resume and --out exclude each other: --resume RUN_DIR reruns in that folder")
        run_dir, previous = _load_run(resume)
        preset = preset if preset is not None else previous.get("preset", presets.DEFAULT_PRESET)
        overrides = {**previous.get("overrides", {}), **dict(overrides or {})}
        if only is None:
            only = [e.get("prefix") or e["notebook"][:2] for e in previous["notebooks"]] or None
        if notebooks_dir is None and previous.get("notebooks_dir") and Path(previous["notebooks_dir"]).is_dir():
            notebooks_dir = previous["notebooks_dir"]
    preset = preset if preset is not None else presets.DEFAULT_PRESET
    folder = Path(notebooks_dir).resolve() if notebooks_dir is not None else default_notebooks_dir()
    all_paths = discover(folder)
    paths = _select(all_paths, only)
    notebooks = [Notebook(p.name[:2], p, declared_parameters(p), declared_needs(p)) for p in paths]
    deps = dependencies(notebooks, [p.name[:2] for p in all_paths])
    steps = plan(notebooks, preset, dict(overrides or {}))
    if previous is None:
        run_dir = _resolve_run_dir(out)
    # runs of the default preset accumulate evidence in one ledger; other presets (smoke: tiny models) keep their
    # own, so that a quick test run never decides the verdicts of the real experiments
    ledger = os.environ.get("LORA_LENS_LEDGER") or str(
        run_dir.parent / ("ledger.sqlite" if preset == presets.DEFAULT_PRESET else f"ledger-{preset}.sqlite"))

    # the record: entries of this plan in series order, plus untouched entries of an earlier attempt
    old = {e.get("notebook"): e for e in (previous or {}).get("notebooks", [])}
    full = {nb.prefix: (nb, {RESERVED: str(run_dir / nb.stem), **params}) for nb, params in steps}
    digests = {nb.prefix: inputs_hash(nb.path, params) for nb, params in steps}
    rerun = {p for p, (nb, _) in full.items()
             if (old.get(nb.stem) or {}).get("status") != "ok" or old[nb.stem].get("inputs_hash") != digests[p]}
    while True:  # a notebook whose needs run again runs again too: what it builds on may have changed
        more = {p for p in full if p not in rerun and any(d in rerun for d in deps[p])}
        if not more:
            break
        rerun |= more
    entries: dict[str, dict[str, Any]] = {}
    todo: list[tuple[Notebook, dict[str, Any]]] = []
    for p, (nb, params) in full.items():
        if p not in rerun:
            entries[nb.stem] = old[nb.stem]
            continue
        entries[nb.stem] = {"notebook": nb.stem, "prefix": nb.prefix, "needs": deps[nb.prefix], "status": "pending",
                            "seconds": None, "parameters": params, "inputs_hash": digests[p],
                            "output": str((run_dir / nb.stem / nb.path.name).relative_to(run_dir))}
        todo.append((nb, params))
    for stem, prior in old.items():
        entries.setdefault(stem, prior)
    record: dict[str, Any] = {
        **(previous or {}),
        "run_id": run_dir.name,
        "preset": preset,
        "overrides": dict(overrides or {}),
        "notebooks_dir": str(folder),
        "ledger": ledger,
        "jobs": jobs,
        "started": (previous or {}).get("started") or _now(),
        "status": "running",
        "notebooks": [entries[k] for k in sorted(entries)],
    }
    attempt = {"started": _now(), "jobs": jobs, "ran": [nb.stem for nb, _ in todo],
               "reused": [nb.stem for p, (nb, _) in full.items() if p not in rerun]}
    record["attempts"] = [*(previous or {}).get("attempts", []), attempt]

    with _run_lock(run_dir):
        _write_json(run_dir / "run.json", record)
        for stem in attempt["reused"]:
            print(f"{stem}: done earlier with the same parameters, skipped", flush=True)

        threads = _thread_env(jobs)
        ctx = multiprocessing.get_context("spawn")
        ok = {stem[:2] for stem, e in entries.items() if e["status"] == "ok"}  # prefixes finished ok
        pending = list(todo)
        running: dict[str, tuple[Any, Any, Notebook, Path]] = {}
        results: dict[str, dict[str, Any]] = {}
        first_failure: NotebookFailed | None = None
        t_run = time.perf_counter()
        n_total, n_started = len(todo), 0
        view = progress.View(run_dir)  # issue 18 hook
        try:
            while pending or running:
                while first_failure is None and len(running) < jobs:
                    nxt = next(((nb, params) for nb, params in pending if all(d in ok for d in deps[nb.prefix])), None)
                    if nxt is None:
                        break
                    nb, params = nxt
                    pending.remove(nxt)
                    nb_dir = run_dir / nb.stem
                    if nb_dir.exists():  # an earlier attempt's output of a notebook that runs again
                        shutil.rmtree(nb_dir)
                    nb_dir.mkdir()
                    executed = nb_dir / nb.path.name
                    env = {"LORA_LENS_RUN_ID": run_dir.name, "LORA_LENS_RUN_DIR": str(run_dir),
                           "LORA_LENS_NOTEBOOK": nb.stem, "LORA_LENS_PARAMS": json.dumps(params),
                           "LORA_LENS_LEDGER": ledger, "MPLBACKEND": INLINE_BACKEND, **threads,
                           **progress.env_for(run_dir, nb.stem)}  # issue 18 hook
                    recv, send = ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=_execute, args=(send, nb, str(executed), params, env, verbose),
                                       name=f"lora-lens-{nb.stem}", daemon=False)
                    proc.start()
                    send.close()
                    running[nb.stem] = (proc, recv, nb, executed)
                    entries[nb.stem].update(status="running", started=_now())
                    _write_json(run_dir / "run.json", record)
                    n_started += 1
                    view.clear()  # issue 18 hook
                    print(f"[{n_started}/{n_total}] {nb.stem} ...", flush=True)
                if not running:
                    break  # a failure stopped new starts (or nothing is startable)
                waitables = [r[1] for r in running.values()] + [r[0].sentinel for r in running.values()]
                if not multiprocessing.connection.wait(waitables, timeout=progress.TICK):  # issue 18 hook
                    view.tick(running)
                    continue
                view.clear()
                for stem, (proc, recv, nb, executed) in list(running.items()):
                    if recv.poll():
                        try:
                            results[stem] = recv.recv()
                        except EOFError:
                            pass
                    if proc.is_alive():
                        continue
                    proc.join()
                    recv.close()
                    del running[stem]
                    entry = entries[stem]
                    res = results.pop(stem, None) or {
                        "status": "failed", "seconds": None,
                        "error": f"notebook {stem}: its worker process died (exit code {proc.exitcode}) without a "
                                 f"result, e.g. killed for memory; executed notebook (if any) at {executed}",
                        "failure": {"cell": None, "ename": "WorkerDied", "evalue": f"exit code {proc.exitcode}"}}
                    entry.update(res, finished=_now())
                    if entry["status"] == "ok":
                        ok.add(nb.prefix)
                        print(f"{stem} ok in {entry['seconds']:.1f} s (kernel peak RSS {entry['max_rss_mb']:.0f} MB)",
                              flush=True)
                    else:
                        print(f"{stem} FAILED", flush=True)
                        if first_failure is None:
                            first_failure = NotebookFailed(entry["error"], stem, executed)
                    _write_json(run_dir / "run.json", record)
        except BaseException as exc:
            view.clear()  # issue 18 hook
            for stem, (proc, _recv, _nb, _executed) in running.items():
                proc.terminate()
                proc.join(10)
                entries[stem].update(status="interrupted", finished=_now())
            record.update(status="interrupted", finished=_now())
            attempt.update(status="interrupted", finished=record["finished"],
                           seconds=round(time.perf_counter() - t_run, 3))
            _write_json(run_dir / "run.json", record)
            _report(run_dir)
            if isinstance(exc, KeyboardInterrupt):  # issue 18 hook
                print(progress.resume_hint(run_dir), flush=True)
            raise
        complete = all(e["status"] == "ok" for e in entries.values())
        record.update(status="failed" if first_failure else "ok" if complete else "incomplete", finished=_now())
        attempt.update(status=record["status"], finished=record["finished"],
                       seconds=round(time.perf_counter() - t_run, 3))
        _write_json(run_dir / "run.json", record)
        _report(run_dir)
        if first_failure is not None:
            raise first_failure
        print(f"run folder: {run_dir}", flush=True)
        print(f"ledger: {ledger}  (lora-lens ledger --ledger {ledger} export --format md)", flush=True)
        return run_dir
