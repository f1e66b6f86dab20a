"""Independent runs spread over processes (and GPUs): the cross-family study and the seed sweeps.

:func:`run_jobs` calls one module-level function on a list of argument tuples and returns the results in job
order. ``workers=1`` runs them here, one after another (no pool); ``workers=N`` runs them in ``N`` spawned
processes of the standard library's :class:`concurrent.futures.ProcessPoolExecutor`:

* **spawn, not fork**: a forked child inherits torch's thread pools in whatever state they were, which can hang it;
  a spawned one starts clean (and imports torch itself: a pool start costs a few seconds).
* **CPUs shared out**: each worker gets ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` = CPUs // workers (at least 1;
  :func:`thread_env`, unless ``$OMP_NUM_THREADS`` is set, and then that) and ``torch.set_num_threads`` accordingly,
  set before torch does any work — ``N`` workers with one thread per CPU each would oversubscribe the machine and
  be slower than one.
* **devices**: with ``devices=["cuda:0", "cuda:1"]`` worker ``i`` is pinned to ``devices[i % len(devices)]``; for
  ``cuda:N`` it sees only that GPU (``CUDA_VISIBLE_DEVICES``) and :func:`worker_device` tells the job to use
  ``"cuda"``. Outside a pool :func:`worker_device` returns its default.
* **errors name the job**: an exception in a job is re-raised here as :class:`~lora_lens.errors.WorkerError`
  naming the job (its index and arguments) with the worker's traceback; a worker that dies (killed for memory,
  ``os._exit``) is a ``WorkerError`` naming the job it was running and suggesting fewer workers. The other jobs are
  cancelled (running ones stopped).
* **memory**: every worker loads its own copy of what its jobs need (a base model, a task): ``N`` workers need about
  ``N`` times the memory of one run.

**Why a process pool, not accelerate or Ray.** accelerate (``lora-lens train`` under ``accelerate launch``:
:mod:`lora_lens.lab.parallel`) launches data-parallel copies of *one* training that exchange gradients every
step. A study over families and seeds is a list of *independent* runs that share nothing but the cache (whose
entries are written under file locks), so a pool of processes is all it needs, with no new dependency. Ray would
add a cluster runtime (a scheduler, an object store, its own workers) to run a list of jobs on one machine.
**Across machines**: run disjoint seeds on each machine (e.g. ``seeds=[0, 1]`` on one, ``[2, 3]`` on the other),
export each ledger (``lora-lens ledger export --format jsonl``) and merge them with ``lora-lens ledger import``.

Example:
    >>> from lora_lens.workers import run_jobs
    >>> run_jobs(pow, [(2, 3), (3, 2)])
    [8, 9]
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import pickle
import re
import reprlib
import sys
import traceback
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Sequence

from lora_lens.errors import ConfigError, WorkerError

__all__ = ["THREAD_VARS", "check_devices", "check_workers", "run_jobs", "thread_env", "worker_device",
           "worker_index"]

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""The thread-count variables each worker gets (read by OpenMP and MKL when torch loads them)."""

_WORKER: dict[str, Any] = {}
"""This process's place in a pool (``index``, ``device``, the shared ``running`` slots); empty outside a pool."""

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 40, 40, 4, 4, 4


def thread_env(jobs: int) -> dict[str, str]:
    """``OMP_NUM_THREADS`` for processes running at once: the CPUs shared out between ``jobs`` (unless already set).

    Processes running at once with torch's default of one thread per CPU each would oversubscribe the CPUs, and
    spinning threads then slow every process down far more than the parallelism gains. Used for the kernels of
    ``lora-lens run --jobs N`` and for the workers of :func:`run_jobs`.
    """
    if jobs == 1 or os.environ.get("OMP_NUM_THREADS"):
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}


def worker_device(default: str = "cpu") -> str:
    """The torch device the current job should use: its worker's device when :func:`run_jobs` was given
    ``devices`` (``"cuda"`` for a ``"cuda:N"``: the worker sees only that GPU), else ``default``."""
    return _WORKER.get("device") or default


def worker_index() -> int | None:
    """This process's index in its :func:`run_jobs` pool (0 … workers − 1); None outside a pool."""
    return _WORKER.get("index")


def check_workers(workers) -> int:
    """``workers`` checked: a positive integer (a study checks it before anything trains).

    Raises:
        ConfigError: A bool, a non-integer or < 1 (the message names the value and the fix).
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers={workers!r} must be a positive integer number of processes: 1 runs every job "
                          "here one after another, e.g. workers=2 runs two at once")
    return workers


def check_devices(devices) -> list[str] | None:
    """``devices`` checked: None or a non-empty list of device strings; returned as a list.

    Raises:
        ConfigError: One string, an empty list or an entry that is not a device string.
    """
    if devices is None:
        return None
    if isinstance(devices, str) or not isinstance(devices, (list, tuple)) or not devices or not all(
            isinstance(d, str) and d.strip() for d in devices):
        raise ConfigError(f"devices={devices!r} must be a non-empty list of torch devices, one per worker in turn, "
                          "e.g. [\"cuda:0\", \"cuda:1\"] (or None: every job on its own device argument)")
    return list(devices)


def _name(fn) -> str:
    return f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', None) or fn!r}"


def _check_fn(fn) -> None:
    """A pool sends ``fn`` by name: it must be a function at the top level of an importable module."""
    if not callable(fn):
        raise ConfigError(f"fn={fn!r} is not callable: pass the function each job calls")
    qualname = getattr(fn, "__qualname__", "") or ""
    if "<lambda>" in qualname or "<locals>" in qualname:
        raise ConfigError(f"fn={_name(fn)} is a lambda or a function defined inside another one, which cannot be sent "
                          "to another process: define it at the top level of a module (or run with workers=1)")
    main = sys.modules.get("__main__")
    if getattr(fn, "__module__", None) == "__main__" and not getattr(main, "__file__", None):
        raise ConfigError(f"fn={_name(fn)} is defined in a notebook or an interactive session, which a worker "
                          "process cannot import: put it in a .py module and import it (or run with workers=1)")
    try:
        pickle.dumps(fn)
    except Exception as exc:  # noqa: BLE001 - any pickling failure means the same thing here
        raise ConfigError(f"fn={_name(fn)} cannot be sent to a worker process ({type(exc).__name__}: {exc}): pass "
                          "a function defined at the top level of a module (or run with workers=1)") from None


def _job_repr(fn, index: int, job: tuple) -> str:
    args = ", ".join(_REPR.repr(a) for a in job)
    text = f"job {index} {getattr(fn, '__qualname__', fn)!s}({args})"
    return text if len(text) <= 200 else text[:197] + "..."


def _check_jobs(jobs) -> list[tuple]:
    if isinstance(jobs, (str, bytes)) or not hasattr(jobs, "__iter__"):
        raise ConfigError(f"jobs={jobs!r} must be a list of argument tuples, e.g. [(0,), (1,)]")
    jobs = list(jobs)
    for i, job in enumerate(jobs):
        if not isinstance(job, (tuple, list)):
            raise ConfigError(f"job {i} is {_REPR.repr(job)}, not a tuple of arguments: pass e.g. [({job!r},)] for "
                              "one argument per job")
    return [tuple(job) for job in jobs]


# ---------------------------------------------------------------------------------------------------------------
# The worker's side
# ---------------------------------------------------------------------------------------------------------------


def _init_worker(counter, running, threads: int, devices: list[str] | None, visible: list[str] | None) -> None:
    """Runs first in every worker, before torch is imported: thread counts, index, device."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    os.environ.pop("LORA_LENS_PROGRESS", None)     # the parent's bar reports the jobs; N workers' bars would mix
    device = None
    if devices:
        device = devices[index % len(devices)]
        m = re.fullmatch(r"cuda:(\d+)", device.strip())
        if m:
            n = int(m.group(1))
            os.environ["CUDA_VISIBLE_DEVICES"] = visible[n] if visible else str(n)
            device = "cuda"
    _WORKER.update(index=index, device=device, running=running)
    import torch

    torch.set_num_threads(threads)


def _call(fn: Callable, index: int, job: tuple):
    """Run one job in a worker: ``("ok", result)`` or ``("error", exception or None, type name, message,
    traceback text)`` (the exception itself only when it survives pickling)."""
    running, slot = _WORKER.get("running"), _WORKER.get("index")
    if running is not None:
        running[slot] = index
    try:
        result = fn(*job)
    except BaseException as exc:  # noqa: BLE001 - every failure of a job (sys.exit too) goes back, named
        text = traceback.format_exc()
        try:
            pickle.loads(pickle.dumps(exc))
            sent = exc
        except Exception:  # noqa: BLE001 - an exception that cannot travel goes back as its text
            sent = None
        return ("error", sent, type(exc).__name__, str(exc), text)
    finally:
        if running is not None:
            running[slot] = -1
    return ("ok", result)


# ---------------------------------------------------------------------------------------------------------------
# The parent's side
# ---------------------------------------------------------------------------------------------------------------


def _threads(n: int) -> int:
    value = thread_env(n).get("OMP_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS", "")
    try:
        return max(1, int(value))
    except ValueError:
        return max(1, (os.cpu_count() or 1) // n)


def _visible(devices: list[str] | None) -> list[str] | None:
    """``$CUDA_VISIBLE_DEVICES`` as a list (``cuda:N`` then means its N-th entry), checked against ``devices``."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not devices or raw is None:
        return None
    visible = [v.strip() for v in raw.split(",") if v.strip()]
    for d in devices:
        m = re.fullmatch(r"cuda:(\d+)", d.strip())
        if m and int(m.group(1)) >= len(visible):
            raise ConfigError(f"device {d!r} in devices is not visible: CUDA_VISIBLE_DEVICES={raw!r} shows "
                              f"{len(visible)} GPU(s), numbered cuda:0 … cuda:{max(len(visible) - 1, 0)}")
    return visible


def _stop(executor, futures) -> None:
    """Cancel the jobs not started and stop the workers (a job that is running is not waited for)."""
    for f in futures:
        f.cancel()
    processes = list((getattr(executor, "_processes", None) or {}).values())
    for p in processes:
        if p.is_alive():
            p.terminate()
    executor.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        p.join(timeout=5)


def _failed(fn, index: int, job: tuple, status: tuple, workers: int) -> tuple[WorkerError, BaseException | None]:
    _, exc, kind, message, text = status
    err = WorkerError(f"{_job_repr(fn, index, job)} failed in a worker process with {kind}: {message}\n\n"
                      f"The worker's traceback:\n{text.rstrip()}\n\n(workers={workers}; rerun that job with "
                      "workers=1 to debug it in this process)")
    err.job, err.traceback_text = index, text
    return err, exc


def _died(fn, jobs: list[tuple], running, done: set, workers: int) -> WorkerError:
    busy = [int(i) for i in running if i >= 0 and int(i) not in done]
    reprs = [_job_repr(fn, i, jobs[i]) for i in busy]
    which = (f"while running {reprs[0]}" if len(reprs) == 1 else
             f"while running one of {'; '.join(reprs)}" if reprs else "before it started a job")
    err = WorkerError(f"a worker process died {which} (killed, most often for lack of memory, or it exited): every "
                      f"worker holds its own copy of a run's models, so run with fewer workers (workers={workers} "
                      "now), or workers=1 to see the failure in this process")
    err.job = busy[0] if busy else None
    return err


def run_jobs(fn: Callable, jobs: Sequence[tuple], workers: int = 1, devices: Sequence[str] | None = None,
             desc: str | None = None, on_done: Callable[[int, Any], None] | None = None) -> list:
    """``[fn(*job) for job in jobs]``, in job order, over ``workers`` processes.

    Args:
        fn: What each job calls. With ``workers > 1`` a function defined at the top level of an importable module
            (it is sent to the workers by name); its arguments and result must pickle.
        jobs: Argument tuples, one per job.
        workers: Processes. 1 runs every job here, in order, with no pool (exceptions propagate unchanged);
            ``N > 1`` starts ``min(N, len(jobs))`` spawned worker processes, each with CPUs // N threads.
        devices: Torch devices the workers take in turn (worker ``i``: ``devices[i % len(devices)]``); a job reads
            its own with :func:`worker_device`. Ignored with ``workers=1``.
        desc: Label of the progress bar (default the function's name), advanced as jobs finish.
        on_done: Optional ``on_done(index, result)`` called here as each job finishes (in the order they finish).

    Returns:
        The results, in the order of ``jobs``.

    Raises:
        ConfigError: Bad ``workers``, ``devices`` or ``jobs``; with a pool, an ``fn`` or job arguments that cannot
            be sent to another process — all before anything runs.
        WorkerError: A job raised in a worker (naming the job, its arguments and the worker's traceback; the
            original exception chained), or a worker process died (naming the job it was running).
    """
    workers = check_workers(workers)
    devices = check_devices(devices)
    jobs = _check_jobs(jobs)
    from lora_lens.utils import progress_bar

    if not jobs:
        return []
    if workers == 1:
        results = []
        bar = progress_bar(total=len(jobs), desc=desc or getattr(fn, "__name__", "jobs"))
        try:
            for i, job in enumerate(jobs):
                results.append(fn(*job))
                bar.update()
                if on_done is not None:
                    on_done(i, results[-1])
        finally:
            bar.close()
        return results
    _check_fn(fn)
    for i, job in enumerate(jobs):
        try:
            pickle.dumps(job)
        except Exception as exc:  # noqa: BLE001 - any pickling failure means the same thing here
            raise ConfigError(f"the arguments of {_job_repr(fn, i, job)} cannot be sent to a worker process "
                              f"({type(exc).__name__}: {exc}): pass plain data (names, paths, numbers, dataclasses), "
                              "or run with workers=1") from None
    n = min(workers, len(jobs))
    visible = _visible(devices)
    ctx = multiprocessing.get_context("spawn")
    counter, running = ctx.Value("i", 0), ctx.Array("i", [-1] * n)
    executor = cf.ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_init_worker,
                                      initargs=(counter, running, _threads(n), devices, visible))
    results: list = [None] * len(jobs)
    done: set[int] = set()
    bar = progress_bar(total=len(jobs), desc=desc or getattr(fn, "__name__", "jobs"))
    futures: dict = {}
    try:
        futures = {executor.submit(_call, fn, i, job): i for i, job in enumerate(jobs)}
        for future in cf.as_completed(futures):
            i = futures[future]
            try:
                status = future.result()
            except BrokenProcessPool as exc:
                raise _died(fn, jobs, list(running), done, workers) from exc
            except Exception as exc:  # noqa: BLE001 - e.g. a result that could not be pickled back
                raise WorkerError(f"{_job_repr(fn, i, job=jobs[i])} finished but its result could not be sent back "
                                  f"({type(exc).__name__}: {exc}): return plain data (numbers, arrays, tables)") \
                    from exc
            if status[0] == "error":
                err, cause = _failed(fn, i, jobs[i], status, workers)
                raise err from cause
            results[i] = status[1]
            done.add(i)
            bar.update()
            if on_done is not None:
                on_done(i, results[i])
    except BaseException:
        _stop(executor, futures)
        raise
    finally:
        bar.close()
    executor.shutdown(wait=True)
    return results
