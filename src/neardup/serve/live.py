"""Serve stage 1, live: the served store — its current generation, and each one `neardup update` publishes.

`LiveStore` holds the current generation (a Searcher over one open Generation: rows, index and local features
of one published manifest) and a thread that watches the manifest. When the nightly job publishes a new
generation, it is loaded beside the old one and the reference is swapped; a request keeps the generation it
started with to its end (work handed to threads holds it too), so every answer comes from one complete
generation and none waits for a reload. A client may pin the generation of its first answer (`use(id)`):
a replaced generation stays open while in use and for `keep_s` after its last use.

A new manifest is opened in a child process first, with a deadline: h5py runs every HDF5 call behind one
process-wide lock (and holds the GIL through many of them), so a damaged file that makes HDF5 hang would
freeze every thread that touches the store, and with the GIL the whole service (health checks and SIGTERM
included); a thread with a timeout cannot help. Only a manifest that opened in the child, unchanged since, is
opened by the service itself.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ..config import DEFAULTS, SERVE
from ..embed.embedders import Embedder
from ..errors import NeardupError, StoreError
from ..fileio import file_sha256
from ..search.query import Searcher
from ..store.generation import Generation
from ..store.meta import StoreMeta

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
    last_used: float = field(default_factory=time.monotonic)

    @property
    def id(self) -> str:
        return self.searcher.generation


def _same_model(a: Searcher, meta: StoreMeta) -> bool:
    def key(m: StoreMeta) -> tuple:
        return (m.model.name, m.model.weights_fingerprint, m.model.dim, m.model.preprocessing, m.model.precision,
                m.model.quantized_file)

    return key(a.meta) == key(meta)


#: Replaced generations kept open while unused (for clients that pinned one), the most recently used.
KEPT_IDLE = 2


class GenerationGone(LookupError):
    """A pinned generation that the service no longer holds."""


#: Run in the child process that opens a new manifest first (`LiveStore.probe`): what the service reads on a load.
_PROBE = ("import sys\nfrom neardup.errors import NeardupError\nfrom neardup.store.generation import Generation\n"
          "try:\n    g = Generation.open(sys.argv[1])\n    g.catalog; g.index\n    g.close()\n"
          "except NeardupError as exc:\n    print(exc, file=sys.stderr)\n    sys.exit(2)\n")


class LiveStore:
    """The served store: its current generation, swapped atomically when a new one is published.

    The watcher notices a new manifest by its inode, size, mtime and digest (a file rewritten in place with
    the same size and time is noticed too). A manifest that does not open (damaged, or naming damaged
    segments) is never served: the last good generation goes on answering and `reload_error` says why. The
    generation served reads from files it holds open, every block checked: a segment rewritten in place
    under it is found on the first read of a changed block, and verification then reads the photos instead."""

    def __init__(self, store: str | os.PathLike[str], *, weights: str | None = None, runtime: str | None = None,
                 embedder: Embedder | None = None, poll_s: float = SERVE.reload_poll_s,
                 local_cache_mb: int = SERVE.local_cache_mb, open_timeout_s: float = SERVE.open_timeout_s,
                 keep_s: float = SERVE.keep_generation_s) -> None:
        self.path = Path(store)
        self.open_timeout_s, self.keep_s = open_timeout_s, keep_s
        self._kept: dict[str, Served] = {}  #: replaced generations still open (in use, or used within keep_s)
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
    def use(self, generation: str | None = None) -> Iterator[Served]:
        """The current generation (or `generation`, while it is held: GenerationGone when it is not), kept
        open until the block ends (also when a newer one is swapped in)."""
        with self._lock:
            gen = self._current
            if generation is not None and generation != gen.id:
                gen = self._kept.get(generation)
                if gen is None:
                    raise GenerationGone(f"generation {generation} is no longer served (now {self._current.id})")
            gen.users += 1
            gen.last_used = time.monotonic()
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
            gen.last_used = time.monotonic()
            done = gen.retired and gen.users == 0 and self._kept.get(gen.id) is not gen
        if done:
            gen.searcher.close()

    def _reap(self) -> None:
        """Close the replaced generations no longer in use nor used within keep_s."""
        now = time.monotonic()
        with self._lock:
            idle = sorted((g for g in self._kept.values() if g.users == 0), key=lambda g: g.last_used)
            # at most KEPT_IDLE of them stay open idle: each holds its index in memory
            gone = [g for i, g in enumerate(idle) if now - g.last_used >= self.keep_s or i < len(idle) - KEPT_IDLE]
            for g in gone:
                del self._kept[g.id]
        for g in gone:
            g.searcher.close()

    def probe(self) -> str | None:
        """Open the manifest in a child process, within open_timeout_s: None when it opened, else why not (the
        child is killed on the deadline, or when the service stops)."""
        child = subprocess.Popen([sys.executable, "-c", _PROBE, str(self.path)], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + self.open_timeout_s
        try:
            while True:
                try:
                    _, err = child.communicate(timeout=0.1)
                    break
                except subprocess.TimeoutExpired:
                    if self._stop.is_set():
                        return "the service is stopping"
                    if time.monotonic() >= deadline:
                        return (f"the new store generation did not open within {self.open_timeout_s:g} s (a damaged "
                                f"manifest that hangs HDF5?); not loaded")
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
        if child.returncode == 0:
            return None
        lines = [line for line in (err or "").strip().splitlines() if line.strip()]
        return lines[-1] if lines else f"the new store generation could not be opened (exit {child.returncode})"

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
        why = self.probe()
        if why is None and self._stat_key() != key:
            return False  # changed while the child opened it: checked again at the next poll
        try:
            if why is not None:
                raise StoreError(why)
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
            self._kept[old.id] = old  # pinned by clients mid-run: closed by _reap once unused for keep_s
        self._reap()
        self.reloads += 1
        log.info("now serving generation %s (%d photos; was %s)", new.id, len(new.searcher.cat), old.id)
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.check()
                self._reap()
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
        with self._lock:
            kept, self._kept = list(self._kept.values()), {}
        for g in kept:
            if g.users == 0:
                g.searcher.close()
        self._current.searcher.close()
