"""Serve, fair: worker threads that share their time fairly between clients, not first come first served.

A client that queues 16 photos at k=100 (1,600 verifications) ahead of a one-photo query made that query
wait for all of them. A `FairPool` keeps one queue per client and its workers take the next job from each
client in turn (round robin), so a query waits for at most one job of each other client. A job whose future
was cancelled (its request timed out, or its client went away) is dropped unrun: abandoned work stops at the
next job boundary. The threads come from the thread owner (`neardup.threads.thread_pool`), each running FAISS,
OpenCV and BLAS on one thread, as the service runs several pools beside each other.
"""
from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import ExitStack
from functools import partial
from typing import Any, TypeVar

from ..threads import thread_pool

T = TypeVar("T")


class FairPool:
    """`workers` threads running jobs round robin across clients (see the module)."""

    def __init__(self, workers: int, name: str) -> None:
        self.workers = workers
        self._stack = ExitStack()
        self._pool = self._stack.enter_context(thread_pool(workers, name, inner=1))
        self._queues: OrderedDict[str, deque[tuple[Future, Callable[[], Any]]]] = OrderedDict()
        self._running = 0
        self.dropped = 0  #: jobs dropped unrun, their futures cancelled while queued
        self._closed = False
        self._lock = threading.Lock()

    def submit(self, client: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future:
        """Queue `fn(*args, **kwargs)` as a job of `client`; its future (cancel it to drop the job unrun)."""
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the service is closing")
            self._queues.setdefault(client, deque()).append((fut, partial(fn, *args, **kwargs)))
            self._dispatch()
        return fut

    async def run(self, client: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` as a job of `client`, awaited: cancelling the awaiting task drops the job if it
        has not started (asyncio cancels the job's future with it)."""
        return await asyncio.wrap_future(self.submit(client, fn, *args, **kwargs))

    def queued(self) -> int:
        """Jobs waiting for a worker."""
        with self._lock:
            return sum(len(q) for q in self._queues.values())

    def _next(self) -> tuple[Future, Callable[[], Any]] | None:
        while self._queues:
            client, q = next(iter(self._queues.items()))
            job = q.popleft()
            if q:
                self._queues.move_to_end(client)  # its next job after one of every other client's
            else:
                del self._queues[client]
            if job[0].set_running_or_notify_cancel():  # False: cancelled while queued, dropped
                return job
            self.dropped += 1
        return None

    def _dispatch(self) -> None:  # under the lock: hand jobs to free workers, one at a time per worker
        while self._running < self.workers:
            job = self._next()
            if job is None:
                return
            self._running += 1
            self._pool.submit(self._work, *job)

    def _work(self, fut: Future, fn: Callable[[], Any]) -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the request, which answers with it
            fut.set_exception(exc)
        else:
            fut.set_result(result)
        finally:
            with self._lock:
                self._running -= 1
                if not self._closed:
                    self._dispatch()

    def close(self) -> None:
        """Drop the queued jobs and end the threads once the running ones finish."""
        with self._lock:
            self._closed = True
            jobs = [job for q in self._queues.values() for job in q]
            self._queues.clear()
        for fut, _ in jobs:
            fut.cancel()
        self._stack.close()  # waits for the running jobs: each is a bounded piece of work
