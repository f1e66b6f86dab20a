"""Tests of running independent jobs over several processes (lora_lens.workers): the same results in job order as
inline, CPUs and devices shared out, errors that name the job. Each pool start costs seconds (a spawned worker
imports torch), so the pool tests are few and their jobs tiny."""

from __future__ import annotations

import os
import time

import pytest

from lora_lens.errors import ConfigError, LoraLensError, WorkerError
from lora_lens.workers import run_jobs, thread_env, worker_device, worker_index


def where(x: int, pause: float = 0.0):
    """A job that reports what its process sees (module level: a worker imports it by name)."""
    import torch

    time.sleep(pause)                                       # long enough for both workers to take a job
    return (x * x, torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"), os.environ.get("MKL_NUM_THREADS"),
            os.environ.get("CUDA_VISIBLE_DEVICES"), worker_device("cpu"), worker_index())


def fails_on_one(x: int) -> int:
    if x == 1:
        raise ValueError(f"no good: {x}")
    return x


def dies_on_one(x: int) -> int:
    if x == 1:
        os._exit(3)                                         # as the kernel's OOM killer would end it: no exception
    time.sleep(2.0)
    return x


def test_inline_runs_in_order_here_and_passes_errors_unchanged():
    seen = []
    out = run_jobs(where, [(i,) for i in range(3)], on_done=lambda i, r: seen.append(i))
    assert [r[0] for r in out] == [0, 1, 4] and seen == [0, 1, 2]
    assert {r[5] for r in out} == {"cpu"} and {r[6] for r in out} == {None}        # no pool: the default device
    with pytest.raises(ValueError, match="no good: 1"):
        run_jobs(fails_on_one, [(0,), (1,)])
    assert run_jobs(where, []) == [] and run_jobs(lambda a, b: a + b, [(1, 2)]) == [3]   # inline: any callable


def test_a_pool_gives_the_inline_results_in_order_shares_the_cpus_and_pins_devices(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)          # 8 CPUs over 2 workers: 4 threads each
    jobs = [(i, 0.5) for i in range(4)]
    t0 = time.perf_counter()
    pooled = run_jobs(where, jobs, workers=2, devices=["cuda:0", "cuda:1"])
    seconds = time.perf_counter() - t0
    assert [r[0] for r in pooled] == [r[0] for r in run_jobs(where, jobs)] == [0, 1, 4, 9]
    assert {r[1:4] for r in pooled} == {(4, "4", "4")}
    assert {r[6] for r in pooled} == {0, 1}                  # both workers took jobs
    for _, _, _, _, visible, device, index in pooled:
        assert device == "cuda" and visible == str(index)    # worker i sees GPU i only, as "cuda"
    assert seconds < 60                                      # a pool start costs a few seconds, not more


def test_a_failing_job_is_named_with_its_error_and_traceback():
    with pytest.raises(WorkerError) as info:
        run_jobs(fails_on_one, [(0,), (1,), (2,)], workers=2)
    err = info.value
    assert isinstance(err, LoraLensError) and err.job == 1
    assert "job 1 fails_on_one(1)" in str(err) and "ValueError: no good: 1" in str(err)
    assert "in fails_on_one" in str(err)                     # the worker's traceback text
    assert isinstance(err.__cause__, ValueError) and str(err.__cause__) == "no good: 1"


def test_a_worker_that_dies_is_named_and_fewer_workers_are_suggested():
    with pytest.raises(WorkerError, match=r"died while running .*dies_on_one\(1\).*fewer workers"):
        run_jobs(dies_on_one, [(0,), (1,), (2,)], workers=2)


def _nested():
    def inner(x):
        return x
    return inner


@pytest.mark.parametrize("fn, needle", [(lambda x: x, "lambda"), (_nested(), "inner")])
def test_a_function_a_worker_cannot_import_is_refused_before_anything_runs(fn, needle):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"{needle}.*top level of a module"):
        run_jobs(fn, [(1,), (2,)], workers=2)
    assert time.perf_counter() - t0 < 1.0                     # no pool was started


def test_arguments_that_cannot_travel_are_refused_before_anything_runs():
    with pytest.raises(ConfigError, match=r"arguments of job 1 where\(<function"):
        run_jobs(where, [(1,), (lambda: 0,)], workers=2)


@pytest.mark.parametrize("workers", [0, -1, True, 1.5, "2", None])
def test_bad_workers_are_refused_with_the_fix(workers):
    with pytest.raises(ConfigError, match=rf"workers={workers!r}.*positive integer.*workers=2"):
        run_jobs(where, [(1,)], workers=workers)


@pytest.mark.parametrize("devices", ["cuda:0", [], [""], [0]])
def test_bad_devices_are_refused(devices):
    with pytest.raises(ConfigError, match="devices="):
        run_jobs(where, [(1,)], workers=2, devices=devices)


def test_bad_jobs_and_invisible_devices_are_refused(monkeypatch):
    with pytest.raises(ConfigError, match="job 0 is 5, not a tuple"):
        run_jobs(where, [5])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(ConfigError, match="'cuda:1' in devices is not visible"):
        run_jobs(where, [(1,), (2,)], workers=2, devices=["cuda:0", "cuda:1"])


def test_parallel_processes_share_the_cpus(monkeypatch):
    """Also the kernels of ``lora-lens run --jobs N`` (the runner reads the same thread_env)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert thread_env(1) == {} and thread_env(3) == {"OMP_NUM_THREADS": "2"}
    assert thread_env(16) == {"OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert thread_env(3) == {}  # the user's choice wins
