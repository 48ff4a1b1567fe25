"""Serve stage 1a, service: the warm query engine behind `neardup serve`, without HTTP.

- `LiveStore` (live.py) holds the current store generation and reloads each one `neardup update` publishes.
- `Batcher` is the micro-batcher: the decoded images of concurrent requests queue up, and one thread embeds
  what has queued in one model call, waiting (at most `batch_wait_ms`) only while other requests are still
  decoding, so a lone request is never delayed. It searches FAISS with the whole batch too.
- `QueryService` runs a request: decode (threads; a lane of its own for small requests) -> batch -> verify
  (threads), with the CPU work off the caller's event loop, within a budget of decoded pixels and of pairs
  verified. The threads take each client's jobs in turn (fair.py); a cancelled request's queued jobs are
  dropped.
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import DEFAULTS, SERVE
from ..embed.decode import Decoded, open_upright
from ..embed.pipeline import decode_for
from ..errors import DecodeError, NeardupError
from ..features import LocalFeatures
from ..search.query import Answer, Match, QueryResult
from ..search.verify import Verified, rerank, resolve_verify, verify_pairs
from .fair import FairPool
from .live import LiveStore, Served  # noqa: F401 - LiveStore is the service's, re-exported

log = logging.getLogger(__name__)
#: Pairs verified in one job of the verification pool: other clients' jobs run between a request's jobs.
VERIFY_CHUNK = 8


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


class Refused(NeardupError):
    """A request the service will not take now (`status` 503: later, with Retry-After) or ever (413)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def header_pixels(data: bytes) -> int:
    """The pixels a photo will decode to, from its header alone (0 when it has none: decoding says why)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception:  # noqa: BLE001 - any unreadable header: the decode reports it per photo
        return 0
    return int(w) * int(h)


class PixelBudget:
    """The decoded pixels of the queries in progress, counted from the photos' headers before decoding: a
    request over `per_request` is refused (413), one that would take those in progress past `in_flight` waits
    for its client's retry (503); a request of at most `small` is always taken (its decode has its own lane)."""

    def __init__(self, per_request: int, in_flight: int, small: int) -> None:
        self.per_request, self.in_flight, self.small = per_request, in_flight, small
        self.held = 0
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, n: int) -> Iterator[None]:
        if n > self.per_request:
            raise Refused(413, "too_many_pixels", f"the photos decode to {n / 1e6:.0f} MP together; at most "
                          f"{self.per_request / 1e6:.0f} MP a request")
        with self._lock:
            if n > self.small and self.held and self.held + n > self.in_flight:
                raise Refused(503, "overloaded", f"{self.held / 1e6:.0f} MP of photos are being decoded; retry "
                              f"shortly")
            self.held += n
        try:
            yield
        finally:
            with self._lock:
                self.held -= n


class QueryService:
    """The served store, the micro-batcher and the thread pools of a `neardup serve` process."""

    def __init__(self, live: LiveStore, *, max_batch: int = SERVE.max_batch,
                 batch_wait_ms: float = SERVE.batch_wait_ms, max_pixels: int = SERVE.max_pixels,
                 thumb_side: int = SERVE.thumb_side, thumb_cache: int = SERVE.thumb_cache,
                 max_request_pixels: int = SERVE.max_request_pixels,
                 max_inflight_pixels: int = SERVE.max_inflight_pixels,
                 small_request_pixels: int = SERVE.small_request_pixels,
                 max_verify_pairs: int = SERVE.max_verify_pairs) -> None:
        self.live = live
        self.batcher = Batcher(max_batch, batch_wait_ms)
        self.max_pixels, self.thumb_side, self._thumb_cache_size = max_pixels, thumb_side, thumb_cache
        self.max_verify_pairs = max_verify_pairs
        self.pixels = PixelBudget(max_request_pixels, max_inflight_pixels, small_request_pixels)
        # Decoding and verification run in their own small pools: CPU-bound work beyond the cores only queues,
        # and a bounded pool bounds the memory of full-size decodes. Small requests (a few ordinary photos)
        # decode in a lane of their own: a burst of huge uploads cannot hold up a one-photo query. Each pool
        # takes its clients' jobs in turn (fair.py): one photo's decode, a few pairs' verification.
        self._decode = FairPool(DEFAULTS.decode_workers, "neardup-decode")
        self._decode_small = FairPool(1, "neardup-decode-small")
        self._verify = FairPool(DEFAULTS.verify_workers, "neardup-verify")
        #: full images and thumbnails (decodes of up to the indexer's pixel limit: two at a time)
        self.files = FairPool(2, "neardup-files")
        self._thumbs: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()

    def close(self) -> None:
        self.batcher.close()
        for pool in (self.files, self._verify, self._decode_small, self._decode):  # last made, first closed:
            pool.close()  # each restores the BLAS threads it found
        self.live.stop()

    def work(self) -> dict[str, int]:
        """The worker pools' queues: jobs waiting, and jobs dropped unrun (their requests cancelled)."""
        pools = {"decode": self._decode, "decode_small": self._decode_small, "verify": self._verify,
                 "files": self.files}
        return {**{f"{name}_queued": p.queued() for name, p in pools.items()},
                "dropped": sum(p.dropped for p in pools.values())}

    def _decode_one(self, gen: Served, up: Upload, local: bool) -> Decoded | str:
        try:
            return decode_for(up.data, gen.searcher.embedder, local=local, max_pixels=self.max_pixels)
        except DecodeError as exc:
            return str(exc)

    def _verify_some(self, gen: Served, feats: LocalFeatures | None, ids: list[int]) -> Verified:
        s = gen.searcher
        rows = s.rows_of(ids)
        return verify_pairs([feats] * len(ids), s._row_features(rows), workers=1)

    def verify_budget(self, photos: int, k: int) -> int:
        """Candidates verified per photo of a request of `photos` photos: all k, or an equal share of the
        request's `max_verify_pairs` (at least one). The others are judged by the threshold, as unverified."""
        return max(1, min(k, self.max_verify_pairs // max(1, photos)))

    async def query(self, uploads: Sequence[Upload], k: int = DEFAULTS.k, *, verify: bool | None = None,
                    threshold: float | None = None, client: str = "", generation: str | None = None) -> Answer:
        """Look up uploaded images in the current generation (or `generation` while it is held; else Refused
        409), each image's error, if any, in its result: the Searcher's pipeline, with decoding and verification
        in worker threads shared fairly between clients (by `client`: the address), the model call batched."""
        pixels = sum(header_pixels(up.data) for up in uploads)
        with self.live.use(generation) as gen, self.pixels.hold(pixels):
            s = gen.searcher
            verify = resolve_verify(verify, s.meta.local_features)
            t = s.gen.threshold(threshold)
            lane = self._decode_small if pixels <= self.pixels.small else self._decode
            local = s.decode_local(verify)
            with self.batcher.decoding():
                decoded = await asyncio.gather(*(lane.run(client, self.live.held, gen, self._decode_one, gen, up,
                                                          local) for up in uploads))
            ok = [d for d in decoded if not isinstance(d, str)]
            D, I = np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
            if ok:
                self.live.acquire(gen)  # until the batch is done, whether or not this request waits for it
                fut = self.batcher.submit(gen, np.stack([d.pixels for d in ok]), k)
                fut.add_done_callback(lambda _: self.live.release(gen))
                D, I = await asyncio.wrap_future(fut)
            found = s.neighbours(D, I)
            if verify:
                budget = self.verify_budget(len(ok), k)
                found = await asyncio.gather(*(self._verified(client, gen, m, d.local, budget)
                                               for m, d in zip(found, ok)))
            results, it, reviewed = [], iter(found), bool(s.decisions.state().current)
            for up, d in zip(uploads, decoded):  # matches marked with the decisions on them and the photo
                digest = hashlib.sha256(up.data).hexdigest() if reviewed and not isinstance(d, str) else None
                results.append(QueryResult(up.name, error=d, threshold=t) if isinstance(d, str) else
                               QueryResult(up.name, s.reviewed(next(it), digest), verified=verify, threshold=t))
            return Answer(s.gen.path.name, gen.id, len(s.cat), s.meta.model.name, t, verify, results, s.meta.model.weights)

    async def _verified(self, client: str, gen: Served, matches: list[Match], feats: LocalFeatures | None,
                        budget: int) -> list[Match]:
        """One photo's matches, its first `budget` verified (VERIFY_CHUNK pairs a job, so that other clients'
        jobs come between) and re-ranked as Searcher.verify does; the others after them, unverified."""
        head, tail = matches[:budget], matches[budget:]
        if not head:
            return matches
        parts = await asyncio.gather(*(
            self._verify.run(client, self.live.held, gen, self._verify_some, gen, feats,
                             [m.id for m in head[at:at + VERIFY_CHUNK]]) for at in range(0, len(head), VERIFY_CHUNK)))
        v = Verified(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Verified)))
        ranked = rerank(np.array([m.score for m in head]), v)
        # a photo too plain to judge: verified None (the global threshold decides, see QueryResult.found)
        head = [replace(head[i], rank=r + 1, verified=bool(v.verified[i]) if v.judged[i] else None,
                        inliers=int(v.inliers[i]) if v.judged[i] else None)
                for r, i in enumerate(ranked.tolist())]
        return head + [replace(m, rank=len(head) + j + 1) for j, m in enumerate(tail)]

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
        # any photo the indexer took (Pillow's limit, not the uploads' --max-pixels): a JPEG decodes at a reduced
        # scale (draft), other formats at their size, two at a time (the files pool)
        img = open_upright(path, self.thumb_side)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        with self._thumbs_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > self._thumb_cache_size:
                self._thumbs.popitem(last=False)
        return data

