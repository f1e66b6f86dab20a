"""Run the notebook series with papermill into a run folder, and read a run folder's record (``run.json``).

What the series holds, what each notebook declares and needs and which parameters it gets is
:mod:`lora_lens.workshop.series`; this module executes that plan. Each notebook gets its own folder
``<run>/<notebook stem>/``, passed to it as the ``output_dir`` parameter and used as the kernel's working directory;
the executed notebook is written there too. ``<run>/run.json`` records what ran (:func:`load_run` reads it).

Scheduling: every notebook runs in its own worker process (spawned) with its own kernel, so ``jobs`` notebooks can
run at once (jupyter_client gives each kernel free ports). A notebook starts when everything it needs
(:func:`~lora_lens.workshop.series.dependencies`) has finished ``ok``; ties go to the lower prefix, so ``jobs=1``
runs the series in prefix order. After the first failure no new notebook starts; those already running finish.
With ``jobs > 1`` each kernel gets ``OMP_NUM_THREADS = CPUs // jobs`` (at least 1) unless ``$OMP_NUM_THREADS`` is
set, so that parallel notebooks do not oversubscribe the CPUs (:func:`lora_lens.workers.thread_env`).

``<run>/run.json`` (written atomically after every change) records per notebook: status, wall seconds, peak RSS of
its kernel (``max_rss_mb``, from ``getrusage(RUSAGE_CHILDREN)`` of its worker), parameters and ``inputs_hash``
(parameters + the notebook file). ``resume=RUN_DIR`` reruns a run folder in place: notebooks that finished ``ok``
with the same ``inputs_hash`` are skipped; failed, pending or changed ones run again, and so does every notebook
that needs one of those (its input may have changed). After every run (also a failed one) the runner writes
``<run>/index.html`` (:mod:`lora_lens.workshop.report`).

While a notebook runs, the kernel sees the run context in these environment variables:
``LORA_LENS_RUN_ID`` (run folder name), ``LORA_LENS_RUN_DIR`` (absolute run folder), ``LORA_LENS_NOTEBOOK``
(notebook stem), ``LORA_LENS_PARAMS`` (JSON of the parameters passed) and ``LORA_LENS_LEDGER`` (the hypothesis
ledger: ``$LORA_LENS_LEDGER`` when set, else a file next to the run folder, :func:`ledger_name`: ``ledger.sqlite`` for
the default preset on the default base, ``ledger-<preset>-<base>.sqlite`` otherwise, so that smoke runs never count as
evidence and one base never pools another's); ``MPLBACKEND`` is set to the inline
backend so that figures land in the executed notebook (and the report) even where ``MPLBACKEND=Agg``.

Example:
    >>> from lora_lens.workshop.runner import run_series
    >>> run_dir = run_series(preset="smoke", only=["00"])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import resource
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import nbformat

from lora_lens.errors import ConfigError, NotebookError, NotFoundError
from lora_lens.utils import stable_hash
from lora_lens.workers import thread_env
from lora_lens.workshop import presets, progress
from lora_lens.workshop.execution import poll_shell_in_slices
from lora_lens.workshop.series import (RESERVED, Notebook, declared_needs, declared_parameters, default_notebooks_dir,
                                       dependencies, discover, inputs_hash, plan, select)

__all__ = ["BASE_PARAMETERS", "DEFAULT_JOBS", "ENV_VARS", "INLINE_BACKEND", "NotebookFailed", "ledger_name", "load_run",
           "run_series"]

ENV_VARS = ("LORA_LENS_RUN_ID", "LORA_LENS_RUN_DIR", "LORA_LENS_NOTEBOOK", "LORA_LENS_PARAMS", "LORA_LENS_LEDGER")
"""The run context every kernel gets (the ledger path too: each preset and base records into its own ledger)."""
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
"""The kernels' matplotlib backend, whatever ``$MPLBACKEND`` says: executed notebooks keep their figures."""


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


BASE_PARAMETERS = ("base_model", "family", "size")
"""The run-wide parameters that choose the base model of notebooks 01-05: each choice keeps its own ledger."""


def ledger_name(preset: str, overrides: Mapping[str, Any]) -> str:
    """The ledger file a run records into, next to its run folder (unless ``$LORA_LENS_LEDGER`` is set).

    Runs of the default preset on the default base accumulate evidence in ``ledger.sqlite``. Another preset (smoke:
    tiny models, a test of the code) and another base (``-p base_model=…``, ``-p family=…``, ``-p size=…``) each keep
    their own file, ``ledger-<preset>-<base>.sqlite``: a hypothesis about one base never pools another base's
    evidence, and a quick test run never decides the verdicts of the real experiments. Only run-wide overrides
    count (``01.family=…`` changes one notebook, not the run's base).

    Example:
        >>> ledger_name("workshop", {"base_model": "smollm2-135m", "seed": 3})
        'ledger-smollm2-135m.sqlite'
    """
    parts = [] if preset == presets.DEFAULT_PRESET else [preset]
    for key in BASE_PARAMETERS:
        value = overrides.get(key)
        if value not in (None, ""):
            slug = re.sub(r"[^a-z0-9.]+", "-", str(value).lower()).strip("-.") or key
            # a long local path: its end, and a hash of the whole so that two folders named alike stay apart
            parts.append(slug if len(slug) <= 40 else f"{slug[-31:].lstrip('-.')}-{stable_hash(str(value))[:8]}")
    return f"ledger-{'-'.join(parts)}.sqlite" if parts else "ledger.sqlite"


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a temp file next to ``path``, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=repr) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _failure(nb: Notebook, exc: Exception, executed: Path) -> tuple[str, dict[str, Any]]:
    """The message of a failed notebook and its structured form (cell index, first source line, error)."""
    from papermill.exceptions import PapermillExecutionError  # heavy: only once a notebook has failed

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
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    progress.instrument_papermill()
    progress.filter_stderr()
    poll_shell_in_slices()  # nbclient#312: an untimed wait can miss a widget cell's reply
    t0 = time.perf_counter()
    result: dict[str, Any] = {"status": "ok"}
    try:
        import papermill  # heavy (and imports nbconvert): only in the worker that runs a notebook

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


def load_run(run_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """Return ``(run_dir, run.json)`` of a run folder made by :func:`run_series`; raises before anything is written.

    Raises:
        NotFoundError: the folder does not exist.
        ConfigError: it holds no readable ``run.json`` with a ``notebooks`` list (not a run folder).
    """
    path = Path(run_dir).resolve()
    if not path.is_dir():
        raise NotFoundError(f"run folder {run_dir} does not exist; pass a folder made by `lora-lens run`")
    try:
        record = json.loads((path / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{run_dir} is not a run folder (run.json missing or unreadable: {exc}); pass a folder "
                          "made by `lora-lens run`, or start a new run with --out") from None
    if not isinstance(record, dict) or not isinstance(record.get("notebooks"), list):
        raise ConfigError(f"{path / 'run.json'} has no 'notebooks' list; it is not a lora-lens run folder")
    return path, record


DEFAULT_JOBS = min(2, os.cpu_count() or 1)
"""``lora-lens run``'s default ``--jobs``: two notebooks at once where there are two CPUs (each notebook spends
seconds starting its kernel and importing torch, which the other one's work overlaps)."""


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
        # the report pulls in nbconvert: imported only when a run ends, so that importing the runner (lora-lens
        # run, every worker process) stays light
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
        preset: name of a preset in :data:`lora_lens.workshop.presets.PRESETS`; default ``workshop`` (the recorded
            one when resuming).
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
        run_dir, previous = load_run(resume)
        preset = preset if preset is not None else previous.get("preset", presets.DEFAULT_PRESET)
        overrides = {**previous.get("overrides", {}), **dict(overrides or {})}
        if only is None:
            only = [e.get("prefix") or e["notebook"][:2] for e in previous["notebooks"]] or None
        if notebooks_dir is None and previous.get("notebooks_dir") and Path(previous["notebooks_dir"]).is_dir():
            notebooks_dir = previous["notebooks_dir"]
    preset = preset if preset is not None else presets.DEFAULT_PRESET
    folder = Path(notebooks_dir).resolve() if notebooks_dir is not None else default_notebooks_dir()
    all_paths = discover(folder)
    paths = select(all_paths, only)
    notebooks = [Notebook(p.name[:2], p, declared_parameters(p), declared_needs(p)) for p in paths]
    deps = dependencies(notebooks, [p.name[:2] for p in all_paths])
    steps = plan(notebooks, preset, dict(overrides or {}))
    if previous is None:
        run_dir = _resolve_run_dir(out)
    ledger = os.environ.get("LORA_LENS_LEDGER") or str(run_dir.parent / ledger_name(preset, overrides or {}))

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

        threads = thread_env(jobs)
        ctx = multiprocessing.get_context("spawn")
        ok = {stem[:2] for stem, e in entries.items() if e["status"] == "ok"}  # prefixes finished ok
        pending = list(todo)
        running: dict[str, tuple[Any, Any, Notebook, Path]] = {}
        results: dict[str, dict[str, Any]] = {}
        first_failure: NotebookFailed | None = None
        t_run = time.perf_counter()
        n_total, n_started = len(todo), 0
        view = progress.View(run_dir)
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
                           **progress.env_for(run_dir, nb.stem)}
                    recv, send = ctx.Pipe(duplex=False)
                    proc = ctx.Process(target=_execute, args=(send, nb, str(executed), params, env, verbose),
                                       name=f"lora-lens-{nb.stem}", daemon=False)
                    proc.start()
                    send.close()
                    running[nb.stem] = (proc, recv, nb, executed)
                    entries[nb.stem].update(status="running", started=_now())
                    _write_json(run_dir / "run.json", record)
                    n_started += 1
                    view.clear()
                    print(f"[{n_started}/{n_total}] {nb.stem} ...", flush=True)
                if not running:
                    break  # a failure stopped new starts (or nothing is startable)
                waitables = [r[1] for r in running.values()] + [r[0].sentinel for r in running.values()]
                if not multiprocessing.connection.wait(waitables, timeout=progress.TICK):
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
            view.clear()
            for stem, (proc, _recv, _nb, _executed) in running.items():
                proc.terminate()
                proc.join(10)
                entries[stem].update(status="interrupted", finished=_now())
            record.update(status="interrupted", finished=_now())
            attempt.update(status="interrupted", finished=record["finished"],
                           seconds=round(time.perf_counter() - t_run, 3))
            _write_json(run_dir / "run.json", record)
            _report(run_dir)
            if isinstance(exc, KeyboardInterrupt):
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
