"""Search, verify jobs: many candidate pairs verified over local worker processes or a Ray cluster.

`duplicates` verifies ~k pairs a photo, every night, over every photo of a catalogue. verify_many splits the
pairs into chunks, sends each with the local features of its photos as arrays (never per-pair objects) to a
spawned worker process (threads.process_pool: every library on one thread) or a Ray task, and puts the
verdicts back in order. A small job stays in the calling process, where starting processes costs more than
it saves. A worker that dies never loses a pair: its unfinished chunks are redone, or the job fails with one
line (WorkerError).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import DEFAULTS, VERIFY, VerifyRule
from ..errors import WorkerError
from ..features import LocalTable
from ..threads import cores, one_thread, process_init, process_pool
from .verify import _FIELDS, Verified, verify_table

if TYPE_CHECKING:
    from ..indexer.ray_job import RayOptions

log = logging.getLogger(__name__)


def verify_many(t: LocalTable, ia: np.ndarray, ib: np.ndarray, rule: VerifyRule = VERIFY, *, screen: bool = False,
                processes: int = DEFAULTS.verify_processes, ray: RayOptions | None = None,
                progress: Callable[[int, int], None] | None = None, min_pairs: int = DEFAULTS.verify_process_min,
                chunk: int = DEFAULTS.verify_chunk) -> Verified:
    """verify_table(t, ia, ib) for a large job (duplicates): its pairs in chunks of `chunk` over `processes` local
    worker processes (0: one per core), or over a Ray cluster with `ray`; a job of fewer than `min_pairs` pairs,
    or one process, runs here. Each chunk travels with the features of its photos as arrays. A worker process
    that dies has its unfinished chunks redone in a new pool (Ray retries a lost task itself); when that keeps
    failing, WorkerError: a pair is never dropped. `progress(done, total)` is called as pairs are verified."""
    ia, ib = np.asarray(ia, np.int64), np.asarray(ib, np.int64)
    m = len(ia)
    procs = cores() if processes <= 0 else int(processes)
    if ray is None and (procs <= 1 or m < min_pairs):
        if progress is None:
            with one_thread():
                return verify_table(t, ia, ib, rule, screen=screen)
        out = Verified.empty(m)
        progress(0, m)
        done = 0
        with one_thread():  # in chunks, to say how far it is
            for c in _chunks(ia, ib, chunk):
                got = verify_table(t, ia[c.pos], ib[c.pos], rule, screen=screen)
                for f in _FIELDS:
                    getattr(out, f)[c.pos] = getattr(got, f)
                done += len(c.pos)
                progress(done, m)
        return out
    chunks = _chunks(ia, ib, chunk)
    parts = _on_ray(t, chunks, rule, screen, ray, progress, m) if ray is not None else \
        _on_processes(t, chunks, rule, screen, procs, progress, m)
    out = Verified.empty(m)
    for c, cols in zip(chunks, parts):
        for f, x in zip(_FIELDS, cols):
            getattr(out, f)[c.pos] = x
    return out


class _Chunk:
    """Pairs verified together: their positions in the job, their photos (rows of the job's table), and each
    pair's photos as indices into those rows."""

    def __init__(self, pos: np.ndarray, rows: np.ndarray, ia: np.ndarray, ib: np.ndarray) -> None:
        self.pos, self.rows, self.ia, self.ib = pos, rows, ia, ib

    def payload(self, t: LocalTable) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """What a worker gets: the features of the chunk's photos only, as arrays, and the pairs."""
        return t.count[self.rows], t.xy[self.rows], t.desc[self.rows], self.ia, self.ib


def _chunks(ia: np.ndarray, ib: np.ndarray, size: int) -> list[_Chunk]:
    """The pairs in chunks of `size`, taken by their first photo, so that a chunk holds few photos, each in
    several of its pairs. A chunk's features are copied only when it is sent (at most a few chunks at once)."""
    order = np.lexsort((np.maximum(ia, ib), np.minimum(ia, ib)))
    out = []
    for s in range(0, len(order), size):
        pos = order[s:s + size]
        rows, inv = np.unique(np.concatenate([ia[pos], ib[pos]]), return_inverse=True)
        out.append(_Chunk(pos, rows, inv[:len(pos)], inv[len(pos):]))
    return out


def _verify_chunk(count: np.ndarray, xy: np.ndarray, desc: np.ndarray, ia: np.ndarray, ib: np.ndarray,
                  rule: VerifyRule, screen: bool) -> tuple[np.ndarray, ...]:
    """One chunk's verdicts, as arrays (in a worker process or a Ray task: every library on one thread)."""
    process_init()
    v = verify_table(LocalTable(count, xy, desc), ia, ib, rule, screen=screen)
    return tuple(getattr(v, f) for f in _FIELDS)


#: Pools started for one job's chunks before a dying worker process fails the job.
POOL_TRIES = 3
#: Chunks sent ahead per worker: the next one waits in its queue while it works; memory stays a few chunks'.
AHEAD = 2


def _on_processes(t: LocalTable, chunks: list[_Chunk], rule: VerifyRule, screen: bool, procs: int,
                  progress: Callable[[int, int], None] | None, total: int) -> list[tuple[np.ndarray, ...]]:
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    results: list[tuple[np.ndarray, ...] | None] = [None] * len(chunks)
    done = 0
    for attempt in range(1, POOL_TRIES + 1):
        todo = [i for i, r in enumerate(results) if r is None]
        workers = min(procs, len(todo))
        try:
            with process_pool(workers) as pool:
                running: dict = {}
                while todo or running:
                    while todo and len(running) < AHEAD * workers:
                        i = todo.pop(0)
                        running[pool.submit(_verify_chunk, *chunks[i].payload(t), rule, screen)] = i
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for f in finished:
                        i = running.pop(f)
                        results[i] = f.result()
                        done += len(chunks[i].pos)
                        if progress is not None:
                            progress(done, total)
            return results  # type: ignore[return-value]  # every slot is filled once no chunk is left
        except BrokenProcessPool:
            left = sum(r is None for r in results)
            if attempt == POOL_TRIES:
                raise WorkerError(f"a verification worker process died {POOL_TRIES} times (killed, or out of "
                                  f"memory?); {left} of {len(chunks)} chunks of pairs were not verified, and no "
                                  f"result was written") from None
            log.warning("a verification worker process died; redoing the %d of %d chunks of pairs it left "
                        "unfinished in new processes", left, len(chunks))
    raise AssertionError("unreachable")


#: Times Ray runs a chunk again whose worker or node was lost, before the job fails.
RAY_RETRIES = 3


def _on_ray(t: LocalTable, chunks: list[_Chunk], rule: VerifyRule, screen: bool, opts: RayOptions,
            progress: Callable[[int, int], None] | None, total: int) -> list[tuple[np.ndarray, ...]]:
    from ..indexer.ray_job import _connect, import_ray

    ray = import_ray()
    started = _connect(ray, opts.address)
    try:
        task = ray.remote(num_cpus=1, max_retries=RAY_RETRIES, retry_exceptions=False)(_verify_chunk)
        ahead = AHEAD * max(1, int(ray.cluster_resources().get("CPU", 1)))
        log.info("verifying %d pairs on Ray: %d chunks", total, len(chunks))
        results: list[tuple[np.ndarray, ...] | None] = [None] * len(chunks)
        todo, done = list(range(len(chunks))), 0
        refs: dict[Any, int] = {}  # a Ray ObjectRef -> its chunk
        while todo or refs:
            while todo and len(refs) < ahead:
                i = todo.pop(0)
                refs[task.remote(*chunks[i].payload(t), rule, screen)] = i
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                i = refs.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # raised by the verification itself: as it is
                    raise exc.as_instanceof_cause() from None
                except ray.exceptions.RayError as exc:  # a worker or node lost more often than Ray retries
                    raise WorkerError(f"Ray lost a verification task {RAY_RETRIES + 1} times "
                                      f"({type(exc).__name__}); no result was written") from None
                done += len(chunks[i].pos)
                if progress is not None:
                    progress(done, total)
        return results  # type: ignore[return-value]  # every slot is filled once no chunk is left
    finally:
        if started:
            ray.shutdown()
