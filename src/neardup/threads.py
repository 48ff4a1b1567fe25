"""Bottom layer: the one owner of thread counts (FAISS/OpenMP, OpenCV, ONNX Runtime, BLAS).

neardup parallelises over photos and pairs: decoding, verification and serving run in pools of workers. A
worker that also starts an inner team of its own (FAISS's OpenMP team, OpenBLAS's threads, OpenCV's pool)
oversubscribes the cores, and on a busy machine the teams' idle threads spin against each other. So:

- the process runs its own heavy calls (a batched FAISS search, the model) on `cores()` threads (OpenMP's
  default; ONNX Runtime's sessions are given `cores()`);
- every worker of a pool of more than one runs each library on one thread. OpenMP's thread count is a
  per-thread setting: `faiss.omp_set_num_threads` in the caller does not reach a pool's threads, so each worker
  sets its own (`worker_init`, the pools' initializer); BLAS and OpenCV have one process-wide setting, lowered
  while a pool runs (`pool_limits`);
- a worker process (verification over processes, Ray) starts with every library on one thread
  (`process_init`, which also sets the environment its own children inherit);
- a thread that makes many small calls itself (verification without a pool: one FAISS Hamming search of a few
  hundred descriptors per pair) runs FAISS on one thread while it does (`one_thread`): waking a team costs
  more than such a call, and on a busy machine the team's threads spin waiting for each other.

`seen()` reports what the calling thread would run with: tests assert it inside the workers.
"""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from types import ModuleType

#: Environment variable that caps the threads neardup uses (default: the cores this process may run on).
THREADS_ENV = "NEARDUP_THREADS"
#: The environment variables that size the libraries' own teams when they start (set in worker processes).
_TEAM_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPENCV_FOR_THREADS_NUM")


def cores() -> int:
    """Threads this process may use: NEARDUP_THREADS when set (>= 1), else the CPUs it is allowed to run on."""
    text = os.environ.get(THREADS_ENV, "").strip()
    if text:
        try:
            return max(1, int(text))
        except ValueError:
            pass  # a bad value is ignored, as the libraries ignore a bad OMP_NUM_THREADS
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def inner_threads(workers: int) -> int:
    """Threads each of `workers` workers may give a library call: all of them for a lone worker, else one."""
    return cores() if workers <= 1 else 1


def _set_faiss(n: int) -> None:
    import faiss

    faiss.omp_set_num_threads(int(n))  # OpenMP: the calling thread's own setting


def _set_opencv(n: int) -> None:
    import cv2

    cv2.setNumThreads(int(n))


def opencv() -> ModuleType:  # cv2, imported lazily: only indexing and verification need it
    """OpenCV, on one thread: neardup runs it per photo and parallelises over photos."""
    import cv2

    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
    return cv2


def worker_init(threads: int = 1) -> None:
    """Initializer of a pool's worker thread: this thread's OpenMP team (FAISS) of `threads`."""
    _set_faiss(threads)


def process_init() -> None:
    """Initializer of a worker process: every library on one thread, in it and in anything it starts."""
    for name in _TEAM_ENV:
        os.environ[name] = "1"
    _set_faiss(1)
    _set_opencv(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)  # kept for the process's life: no context to exit
    except ImportError:  # pragma: no cover - a dependency; OPENBLAS_NUM_THREADS covers a library not yet loaded
        pass


@contextmanager
def pool_limits(workers: int) -> Iterator[None]:
    """While a pool of `workers` (> 1) runs: BLAS on one thread (a process-wide setting, restored after)."""
    if workers <= 1:
        yield
        return
    # loaded first: threadpoolctl limits only the BLAS libraries already loaded, and FAISS and OpenCV each bring
    # an OpenBLAS of their own
    import faiss  # noqa: F401 - imported for its OpenBLAS, which the limits then reach
    from threadpoolctl import threadpool_limits

    opencv()

    with threadpool_limits(1, user_api="blas"):
        yield


@contextmanager
def thread_pool(workers: int, name: str, *, inner: int | None = None) -> Iterator[ThreadPoolExecutor]:
    """A pool of `workers` threads, each on one thread of every library when there are several (all of
    `cores()` for a lone worker), with BLAS limited while it runs. Ends its threads on exit. `inner=1` puts a
    lone worker on one thread too: for a pool that runs beside other pools (the service's)."""
    inner = inner_threads(workers) if inner is None else max(1, int(inner))
    with pool_limits(2 if inner == 1 else 1), ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name,
                                                                 initializer=worker_init, initargs=(inner,)) as pool:
        yield pool


@contextmanager
def one_thread() -> Iterator[None]:
    """The calling thread's FAISS (OpenMP) on one thread while the block runs, then its setting again: for many
    small calls (a pair's k-NN), where a team of threads costs more than it does, and on a busy machine a
    team's idle threads spin against the other processes."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@contextmanager
def process_pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    """A pool of `workers` fresh processes (spawned: no copy of this process's threads), each running every
    library on one thread (process_init). Ends its processes on exit."""
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=process_init) as pool:
        yield pool


def seen() -> dict[str, int]:
    """Threads the calling thread would run each library with: `faiss` (its OpenMP setting), `opencv`, and
    `blas` (the most of any BLAS loaded; 0 when none is)."""
    import cv2
    import faiss

    try:
        from threadpoolctl import threadpool_info

        blas = max((int(i["num_threads"]) for i in threadpool_info() if i.get("user_api") == "blas"), default=0)
    except ImportError:  # pragma: no cover
        blas = 0
    return {"faiss": int(faiss.omp_get_max_threads()), "opencv": int(cv2.getNumThreads()), "blas": blas}
