"""The thread owner (neardup/threads.py): what a worker thread or process really runs each library with.

OpenMP's thread count is a per-thread setting: setting it in the caller never reached a pool's threads, so
every verification worker ran FAISS on a full team of its own. These tests look inside the workers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np

from neardup import threads
from neardup.features import DESC_BYTES, LocalFeatures
from neardup.search import verify, verify_jobs


def _features(seed: int, n: int = 64) -> LocalFeatures:
    rng = np.random.default_rng(seed)
    return LocalFeatures(rng.random((n, 2), dtype=np.float32),
                         rng.integers(0, 256, (n, DESC_BYTES), dtype=np.uint8))


def test_verification_workers_run_one_thread_of_each_library(monkeypatch):
    seen: dict[str, dict[str, int]] = {}
    real = verify.verify_table

    def spy(*args, **kwargs):
        seen[threading.current_thread().name] = threads.seen()
        return real(*args, **kwargs)

    monkeypatch.setattr(verify, "verify_table", spy)
    fa = [_features(i) for i in range(40)]
    fb = [_features(100 + i) for i in range(40)]
    verify.verify_pairs(fa, fb, workers=2)
    workers = {name: s for name, s in seen.items() if name.startswith("neardup-verify")}
    assert workers, f"no pair ran in a verification worker: {sorted(seen)}"
    for name, s in workers.items():
        assert s["faiss"] == 1, (name, s)
        assert s["opencv"] == 1, (name, s)
        assert s["blas"] <= 1, (name, s)


def test_verification_without_a_pool_runs_faiss_on_one_thread_and_restores_it(monkeypatch):
    # issue 29: FAISS's team of cores() threads per pair's Hamming search spun on a busy machine (28x slower)
    seen: list[dict[str, int]] = []
    real = verify.verify_table

    def spy(*args, **kwargs):
        seen.append(threads.seen())
        return real(*args, **kwargs)

    monkeypatch.setattr(verify, "verify_table", spy)
    before = threads.seen()["faiss"]
    verify.verify_pairs([_features(i) for i in range(20)], [_features(50 + i) for i in range(20)], workers=1)
    assert seen and all(s["faiss"] == 1 for s in seen), seen
    assert threads.seen()["faiss"] == before


def test_a_lone_worker_gets_every_core():
    with threads.thread_pool(1, "lone") as pool:
        assert pool.submit(threads.seen).result()["faiss"] == threads.cores()


def test_the_caller_keeps_its_threads_after_a_pool():
    before = threads.seen()
    with threads.thread_pool(2, "two") as pool:
        inside = pool.submit(threads.seen).result()
    assert inside["faiss"] == 1
    assert threads.seen()["faiss"] == before["faiss"]
    assert threads.seen()["blas"] == before["blas"]


def test_neardup_threads_caps_the_cores(monkeypatch):
    monkeypatch.setenv(threads.THREADS_ENV, "1")
    assert threads.cores() == 1
    monkeypatch.setenv(threads.THREADS_ENV, "not a number")
    assert threads.cores() >= 1


def test_a_worker_process_runs_every_library_on_one_thread():
    code = ("import json, numpy; from neardup import threads; threads.process_init(); "
            "import os; print(json.dumps({**threads.seen(), 'env': os.environ['OMP_NUM_THREADS']}))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    assert got == {"faiss": 1, "opencv": 1, "blas": 1, "env": "1"}, got


def _seen_in_a_chunk(seed: int) -> dict[str, int]:
    """In a worker process: verify a chunk of pairs as verify_many does, then report the threads seen."""
    t = verify.pack([_features(seed + i) for i in range(8)])
    verify_jobs._verify_chunk(t.count, t.xy, t.desc, np.arange(4), np.arange(4, 8), verify.VERIFY, True)
    return {**threads.seen(), "pid": os.getpid()}


def test_verification_worker_processes_run_one_thread_of_each_library():
    # the pool verify_many uses for duplicates: spawned processes, each started by process_init
    with threads.process_pool(2) as pool:
        got = [pool.submit(_seen_in_a_chunk, 10 * i).result() for i in range(4)]
    assert {g.pop("pid") for g in got} - {os.getpid()}, "no chunk ran in a worker process"
    for g in got:
        assert g == {"faiss": 1, "opencv": 1, "blas": 1}, g
