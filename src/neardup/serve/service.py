"""Serve stage 1, service: the warm query engine behind `neardup serve`, without HTTP.

- `LiveStore` holds the current store generation (a Searcher over one open Generation: rows, index and local
  features of one published manifest) and a thread that watches the manifest. When the nightly job publishes
  a new generation, it is loaded beside the old one and the reference is swapped; a request keeps the
  generation it started with to its end, so every answer comes from one complete generation and none waits
  for a reload.
- `Batcher` is the micro-batcher: the decoded images of concurrent requests queue up, and one thread embeds
  what has queued in one model call, waiting (at most `batch_wait_ms`) only while other requests are still
  decoding, so a lone request is never delayed. It searches FAISS with the whole batch too.
- `QueryService` runs a request: decode (threads) -> batch -> verify (threads), with the CPU work off the
  caller's event loop.
"""
from __future__ import annotations

import asyncio
import io
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar
from pathlib import Path

import numpy as np

from ..config import DEFAULTS, SERVE
from ..errors import DecodeError, NeardupError
from ..indexer.decode import Decoded, open_upright
from ..indexer.embed import Embedder
from ..indexer.pipeline import decode_for
from ..fileio import file_sha256
from ..search.query import Answer, Searcher
from ..store.generation import Generation
from ..store.meta import StoreMeta
from ..search.verify import resolve_verify

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Served:
    """One published store generation as served: its Searcher (which holds the generation's files open) and
    the requests using it."""

    searcher: Searcher
    loaded_at: float = field(default_factory=time.time)
    users: int = 0
    retired: bool = False

    @property
    def id(self) -> str:
        return self.searcher.generation


def _same_model(a: Searcher, meta: StoreMeta) -> bool:
    m = a.meta
    return (m.model, m.weights_fingerprint, m.dim, m.preprocessing, m.precision, m.quantized_file) == \
        (meta.model, meta.weights_fingerprint, meta.dim, meta.preprocessing, meta.precision, meta.quantized_file)


class LiveStore:
    """The served store: its current generation, swapped atomically when a new one is published.

    The watcher notices a new manifest by its inode, size, mtime and digest (a file rewritten in place with
    the same size and time is noticed too). A manifest that does not open (damaged, or naming damaged
    segments) is never served: the last good generation goes on answering and `reload_error` says why. The
    generation served reads from files it holds open, every block checked: a segment rewritten in place
    under it is found on the first read of a changed block, and verification then reads the photos instead."""

    def __init__(self, store: str | os.PathLike[str], *, weights: str | None = None, runtime: str | None = None,
                 embedder: Embedder | None = None, poll_s: float = SERVE.reload_poll_s,
                 local_cache_mb: int = SERVE.local_cache_mb) -> None:
        self.path = Path(store)
        self._weights, self._runtime, self._poll_s = weights, runtime, poll_s
        # a cached row holds float32 positions and 32-byte descriptors: 40 bytes a keypoint
        self._cache_rows = (local_cache_mb << 20) // (DEFAULTS.local_keypoints * 40)
        self._lock = threading.Lock()
        self._key = self._stat_key()  # before the load: a publish during it is then seen as a change
        self._current = Served(self._searcher(Generation.open(self.path), embedder))
        self.reloads = 0
        self.reload_error: str | None = None
        self._retry_at, self._backoff = 0.0, 1.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _searcher(self, gen: Generation, embedder: Embedder | None) -> Searcher:
        return Searcher(gen, weights=self._weights, runtime=self._runtime, embedder=embedder, owns=True,
                        local_cache_rows=self._cache_rows)

    def _stat_key(self) -> tuple[object, ...] | None:
        try:
            st = os.stat(self.path)
            digest = file_sha256(self.path)  # a manifest is small: a few kB, more with many tombstones
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, digest)

    @property
    def current(self) -> Served:
        return self._current

    @contextmanager
    def use(self) -> Iterator[Served]:
        """The current generation, kept open until the block ends (also when a newer one is swapped in)."""
        with self._lock:
            gen = self._current
            gen.users += 1
        try:
            yield gen
        finally:
            self.release(gen)

    def acquire(self, gen: Served) -> None:
        """Keep `gen` open for one more user (work handed to a thread, which may outlive its request)."""
        with self._lock:
            gen.users += 1

    def release(self, gen: Served) -> None:
        """One user of `gen` is done; a retired generation is closed when its last user is."""
        with self._lock:
            gen.users -= 1
            done = gen.retired and gen.users == 0
        if done:
            gen.searcher.close()

    def held(self, gen: Served, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """`fn(*args, **kwargs)` with `gen` kept open while it runs (the body of a worker thread's job: a
        request that times out leaves its job running, and the generation must outlive it)."""
        self.acquire(gen)
        try:
            return fn(*args, **kwargs)
        finally:
            self.release(gen)

    def check(self) -> bool:
        """Load and swap in the store's newly published generation, if there is one. True when swapped. After a
        failed load it is tried again, with a growing pause, even if the manifest does not change: the damage
        may have been in a segment, and mended there."""
        key = self._stat_key()
        retry = self.reload_error is not None and time.monotonic() >= self._retry_at
        if key is None or (key == self._key and not retry):
            return False
        old = self._current
        try:
            gen = Generation.open(self.path)
            try:
                reuse = old.searcher.embedder if _same_model(old.searcher, gen.meta) else None
                new = Served(self._searcher(gen, reuse))
            except BaseException:
                gen.close()
                raise
        except NeardupError as exc:
            # keep answering from the old generation; try again when the file changes, or after a pause
            self._backoff = min(2 * self._backoff, 30.0) if self.reload_error else 1.0
            self._retry_at = time.monotonic() + self._backoff
            self._key, self.reload_error = key, str(exc)
            log.warning("serving generation %s still: the new store could not be loaded: %s", old.id, exc)
            return False
        self._key, self.reload_error = key, None
        if new.id == old.id:  # touched, not republished
            new.searcher.close()
            return False
        with self._lock:
            self._current = new
            old.retired = True
            done = old.users == 0
        if done:
            old.searcher.close()
        self.reloads += 1
        log.info("now serving generation %s (%d photos; was %s)", new.id, len(new.searcher.cat), old.id)
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one failed reload
                log.exception("reload check failed")

    def start(self) -> None:
        """Start watching the store file for new generations."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="neardup-reload", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop watching and release the current generation."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._current.searcher.close()


@dataclass
class _Job:
    gen: Served
    pixels: np.ndarray  #: uint8 [m, s, s(, 3)]
    k: int
    future: Future  #: -> (D [m, k], I [m, k])


@dataclass
class BatchStats:
    """What the micro-batcher did: model calls, images embedded, the largest batch."""

    batches: int = 0
    images: int = 0
    largest: int = 0


class Batcher:
    """Micro-batching: embeds and searches the queued images of concurrent requests together (one thread)."""

    def __init__(self, max_batch: int = SERVE.max_batch, wait_ms: float = SERVE.batch_wait_ms) -> None:
        self.max_batch, self.wait_s = max_batch, wait_ms / 1000.0
        self.stats = BatchStats()
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._decoding = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="neardup-batcher", daemon=True)
        self._thread.start()

    @contextmanager
    def decoding(self) -> Iterator[None]:
        """Mark a request as decoding: a batch then waits for it (bounded by wait_ms)."""
        with self._lock:
            self._decoding += 1
        try:
            yield
        finally:
            with self._lock:
                self._decoding -= 1

    def submit(self, gen: Served, pixels: np.ndarray, k: int) -> Future:
        """Queue one request's decoded images; the future gives (D, I) of its rows."""
        fut: Future = Future()
        self._q.put(_Job(gen, pixels, k, fut))
        return fut

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)

    def _gather(self, first: _Job) -> list[_Job]:
        jobs, n = [first], len(first.pixels)
        deadline = time.monotonic() + self.wait_s
        while n < self.max_batch:
            try:
                job = self._q.get_nowait()
            except queue.Empty:
                left = deadline - time.monotonic()
                if self._decoding == 0 or left <= 0:
                    break
                try:
                    job = self._q.get(timeout=min(left, 0.002))
                except queue.Empty:
                    continue
            if job is None:
                self._q.put(None)  # seen again by _run after this batch
                break
            jobs.append(job)
            n += len(job.pixels)
        return jobs

    def _run(self) -> None:
        while True:
            first = self._q.get()
            if first is None:
                return
            jobs = [j for j in self._gather(first) if j.future.set_running_or_notify_cancel()]
            for gen in {id(j.gen): j.gen for j in jobs}.values():  # across a reload: one batch per generation
                group = [j for j in jobs if j.gen is gen]
                try:
                    self._embed_search(gen, group)
                except Exception as exc:  # noqa: BLE001 - handed to the requests, which answer with it
                    for j in group:
                        j.future.set_exception(exc)

    def _embed_search(self, gen: Served, group: list[_Job]) -> None:
        pixels = np.concatenate([j.pixels for j in group])
        D, I = gen.searcher.embed_knn(pixels, max(j.k for j in group))
        self.stats.batches += 1
        self.stats.images += len(pixels)
        self.stats.largest = max(self.stats.largest, len(pixels))
        at = 0
        for j in group:
            m = len(j.pixels)
            j.future.set_result((D[at:at + m, :j.k], I[at:at + m, :j.k]))
            at += m


@dataclass(frozen=True)
class Upload:
    """One uploaded image: the name the client gave it (shown, never used as a path) and its bytes."""

    name: str
    data: bytes


class QueryService:
    """The served store, the micro-batcher and the thread pools of a `neardup serve` process."""

    def __init__(self, live: LiveStore, *, max_batch: int = SERVE.max_batch,
                 batch_wait_ms: float = SERVE.batch_wait_ms, max_pixels: int = SERVE.max_pixels,
                 thumb_side: int = SERVE.thumb_side, thumb_cache: int = SERVE.thumb_cache) -> None:
        self.live = live
        self.batcher = Batcher(max_batch, batch_wait_ms)
        self.max_pixels, self.thumb_side, self._thumb_cache_size = max_pixels, thumb_side, thumb_cache
        # Decoding and verification run in their own small pools: CPU-bound work beyond the cores only queues,
        # and a bounded pool bounds the memory of full-size decodes.
        self._decode = ThreadPoolExecutor(DEFAULTS.decode_workers, thread_name_prefix="neardup-decode")
        self._verify = ThreadPoolExecutor(DEFAULTS.verify_workers, thread_name_prefix="neardup-verify")
        #: full images and thumbnails (decodes of up to max_pixels: two at a time)
        self.files = ThreadPoolExecutor(2, thread_name_prefix="neardup-files")
        self._thumbs: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()

    def close(self) -> None:
        self.batcher.close()
        self._decode.shutdown(wait=False, cancel_futures=True)
        self._verify.shutdown(wait=False, cancel_futures=True)
        self.files.shutdown(wait=False, cancel_futures=True)
        self.live.stop()

    def _decode_all(self, gen: Served, uploads: Sequence[Upload], local: bool) -> list[Decoded | str]:
        emb = gen.searcher.embedder
        out: list[Decoded | str] = []
        for up in uploads:
            try:
                out.append(decode_for(up.data, emb, local=local, max_pixels=self.max_pixels))
            except DecodeError as exc:
                out.append(str(exc))
        return out

    async def query(self, uploads: Sequence[Upload], k: int = DEFAULTS.k, *, verify: bool | None = None,
                    threshold: float | None = None) -> Answer:
        """Look up uploaded images in the current generation (each image's error, if any, in its result): the
        Searcher's pipeline, with decoding and verification in worker threads and the model call batched."""
        loop = asyncio.get_running_loop()
        with self.live.use() as gen:
            s = gen.searcher
            verify = resolve_verify(verify, s.meta.local_features)
            t = s.gen.threshold(threshold)
            with self.batcher.decoding():
                decoded = await loop.run_in_executor(self._decode, partial(
                    self.live.held, gen, self._decode_all, gen, uploads, s.decode_local(verify)))
            ok = [d for d in decoded if not isinstance(d, str)]
            D, I = np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
            if ok:
                self.live.acquire(gen)  # until the batch is done, whether or not this request waits for it
                fut = self.batcher.submit(gen, np.stack([d.pixels for d in ok]), k)
                fut.add_done_callback(lambda _: self.live.release(gen))
                D, I = await asyncio.wrap_future(fut)
            results = await loop.run_in_executor(self._verify, partial(
                self.live.held, gen, s.results, [up.name for up in uploads], D, I, [d.local for d in ok],
                verify=verify, threshold=t, errors=[d if isinstance(d, str) else None for d in decoded]))
            return Answer(s.gen.path.name, gen.id, len(s.cat), s.meta.model, t, verify, results)

    def image_path(self, gen: Served, id: int) -> Path:
        """The indexed file of catalogue `id`, as it was indexed. Raises LookupError (no such id) or
        FileNotFoundError (moved, or changed on disk since the generation was published)."""
        return self._indexed(gen, id)[1]

    def _indexed(self, gen: Served, id: int) -> tuple[int, Path]:
        s = gen.searcher
        row = int(s.rows_of([id])[0])
        if row < 0:
            raise LookupError(f"no image with id {id} in generation {gen.id}")
        path = s.gen.image_path(row)
        try:
            st = os.stat(path)
        except OSError:
            raise FileNotFoundError(f"image {id} is no longer at its indexed place") from None
        if st.st_size != int(s.cat.sizes[row]) or st.st_mtime_ns != int(s.cat.mtimes_ns[row]):
            raise FileNotFoundError(f"image {id} changed on disk after generation {gen.id} was published "
                                    f"(`neardup update` indexes it again)")
        return row, path

    def thumbnail(self, gen: Served, id: int) -> bytes:
        """A JPEG thumbnail of catalogue `id` (cached by content). Raises LookupError, FileNotFoundError,
        DecodeError."""
        row, path = self._indexed(gen, id)
        key = (gen.searcher.cat.sha256[row], self.thumb_side)
        with self._thumbs_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        img = open_upright(path, self.thumb_side, max_pixels=self.max_pixels)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        with self._thumbs_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > self._thumb_cache_size:
                self._thumbs.popitem(last=False)
        return data

