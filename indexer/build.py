"""The indexing job: discover → decode → embed → store → index, incremental and crash-safe.

One operation serves `neardup index` and `neardup update`: files whose size and mtime are unchanged cost a
stat; other files are hashed, and only content never seen before is decoded and embedded. Embeddings are
saved in durable checkpoint chunks while the run goes, so a killed run resumes where it stopped; the
store and index are published with `os.replace`, so readers see the old or the new state, never a mix.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import stat
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .config import DEFAULTS, MODELS
from .decode import Decoded, decode_image, sha256_hex
from .discover import discover
from .embed import Embedder, make_embedder, resolve_weights
from .errors import DecodeError, InputError, StoreError, StoreLockedError, StoreMismatchError
from .index import build_flat_index, index_path, save_index
from .store import Catalog, StoreMeta, atomic_write, check_output_path, read_catalog, remove_stale_temporaries
from .store import write_catalog

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (done, total)


@dataclass
class RunSummary:
    """What an index/update run did."""

    store: str
    model: str
    total: int = 0  #: images in the store after the run
    added: int = 0
    changed: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    touched: int = 0  #: mtime/size changed but identical content: no embedding
    embedded: int = 0  #: images run through the model in this run
    reused: int = 0  #: embeddings taken from the checkpoint of an interrupted run
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    embed_seconds: float = 0.0  #: wall time of the decode+embed phase
    wrote: bool = False

    @property
    def images_per_second(self) -> float:
        """Decode+embed throughput of this run."""
        return self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0


@contextmanager
def writer_lock(store: Path) -> Iterator[None]:
    """Hold an exclusive OS lock for writing `store`; the kernel drops it if the process dies."""
    lock_path = store.with_name(store.name + ".lock")
    fh = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            who = fh.read().strip() or "another process"
            raise StoreLockedError(f"{store} is being written by {who}; try again when it has finished") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"neardup pid {os.getpid()}")
        fh.flush()
        yield
    finally:
        fh.close()  # closing releases the lock; the file stays, harmless, so there is nothing to clean up


class Checkpoint:
    """Durable chunks of embeddings computed by a run, in `<store>.work/`, reused when a run resumes."""

    def __init__(self, store: Path, key: dict[str, object]) -> None:
        self.dir = store.with_name(store.name + ".work")
        self.key = key
        self.known: dict[str, tuple[np.ndarray, int, int]] = {}
        self._chunks = 0
        self._load()

    def _load(self) -> None:
        meta = self.dir / "meta.json"
        if not self.dir.is_dir():
            return
        try:
            same = json.loads(meta.read_text()) == self.key
        except (OSError, ValueError):
            same = False
        if not same:
            log.info("discarding checkpoint of another model/weights in %s", self.dir)
            self.discard()
            return
        for chunk in sorted(self.dir.glob("chunk-*.npz")):
            try:
                with np.load(chunk) as z:
                    for sha, vec, w, h in zip(z["sha256"], z["xb"], z["widths"], z["heights"]):
                        self.known[sha.decode()] = (vec, int(w), int(h))
                self._chunks += 1
            except Exception:  # noqa: BLE001 - a damaged chunk (zip, npy, key errors) only costs re-embedding
                log.warning("ignoring unreadable checkpoint chunk %s", chunk)
        log.info("resuming: %d embeddings from %d checkpoint chunks", len(self.known), self._chunks)

    def save(self, rows: list[tuple[str, np.ndarray, int, int]]) -> None:
        """Durably add one chunk of (sha256, vector, width, height) rows."""
        if not rows:
            return
        self.dir.mkdir(exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(self.key)))

        def write(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, sha256=np.array([r[0] for r in rows], dtype="S64"),
                         xb=np.stack([r[1] for r in rows]).astype(np.float32),
                         widths=np.array([r[2] for r in rows], np.int32),
                         heights=np.array([r[3] for r in rows], np.int32))

        self._chunks += 1
        atomic_write(self.dir / f"chunk-{self._chunks:06d}-{uuid.uuid4().hex[:8]}.npz", write)

    def discard(self) -> None:
        """Remove the checkpoint folder."""
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class _File:
    rel: str
    abs: str
    size: int
    mtime_ns: int


def _prepare(f: _File, known: Callable[[str], bool], params: tuple[int, str, str]) -> tuple[str, Decoded | None]:
    """Worker: read a file once; decode it only when its content has no embedding yet."""
    size, mode, resample = params
    try:
        with open(f.abs, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise DecodeError(f"cannot read: {exc.strerror or exc}") from None
    sha = sha256_hex(data)
    if known(sha):
        return sha, None

    return sha, decode_image(data, size, mode=mode, resample=resample)


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable, items: Sequence, window: int) -> Iterator[tuple]:
    # Like pool.map, but never more than `window` results in memory: decoded pixels are ~150 kB each.
    pending: deque[tuple[object, Future]] = deque()
    it = iter(items)
    for item in it:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            break
    while pending:
        item, fut = pending.popleft()
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(fn, nxt)))
        try:
            yield item, fut.result(), None
        except DecodeError as exc:
            yield item, None, str(exc)
        except Exception as exc:  # a codec bug on one file must not abort a 50k-image job
            yield item, None, f"{type(exc).__name__}: {exc}"


def _scan(roots: Sequence[str | os.PathLike[str]], base: Path,
          failures: list[tuple[str, str]]) -> tuple[list[_File], list[str]]:
    """Image files under roots (paths relative to base), and the folders (relative) that could not be listed."""
    files = []
    unreadable: list[tuple[str, str]] = []
    for p in discover(roots, unreadable=unreadable):
        rel = Path(os.path.relpath(p, base)).as_posix()
        try:
            rel.encode("utf-8")
            st = p.stat()
        except UnicodeEncodeError:
            failures.append((os.fsencode(p).decode("utf-8", "backslashreplace"), "file name is not valid UTF-8"))
            continue
        except OSError as exc:
            failures.append((rel, f"cannot stat: {exc.strerror or exc}"))
            continue
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device named *.jpg would block or read forever
            failures.append((rel, "not a regular file"))
            continue
        files.append(_File(rel, str(p), st.st_size, st.st_mtime_ns))
    blind = []
    for folder, why in unreadable:
        rel = Path(os.path.relpath(os.path.abspath(folder), base)).as_posix()
        failures.append((rel + "/", f"cannot list folder: {why}; its stored images are kept as they were"))
        blind.append(rel + "/")
    return files, blind


def _gone(path: Path) -> bool:
    """True only when the file is really absent (not when a folder on the way cannot be read)."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return False


def build_index(
    roots: Sequence[str | os.PathLike[str]],
    store: str | os.PathLike[str],
    *,
    model: str | None = None,
    weights: str | None = None,
    precision: str = DEFAULTS.precision,
    batch_size: int = DEFAULTS.batch_size,
    prune: bool = False,
    decode_workers: int = DEFAULTS.decode_workers,
    checkpoint_every: int = DEFAULTS.checkpoint_every,
    embedder: Embedder | None = None,
    progress: Progress | None = None,
    require_existing: bool = False,
) -> RunSummary:
    """Index the images under `roots` into the HDF5 store `store` and its FAISS index; return a summary.

    On an existing store this is an incremental update with the store's own model and weights (asking for
    another model is refused). Files that vanished from disk are removed; with `prune`, so are files that
    still exist but are no longer under `roots`. Images that cannot be decoded are listed, never fatal.
    `embedder` injects an embedding method (tests); otherwise one is built from `model`/`weights`.
    """
    t0 = time.perf_counter()
    # resolve(): through a symlinked folder, relative paths and the atomic replace must use the real place
    store = Path(store).expanduser().resolve()
    check_output_path(store)
    if batch_size < 1 or checkpoint_every < 1 or decode_workers < 1:
        raise InputError("batch size, checkpoint interval and decode workers must be at least 1")
    if model is not None and model not in MODELS and embedder is None:
        raise InputError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    with writer_lock(store):
        remove_stale_temporaries(store)
        if store.exists():
            old = read_catalog(store)
            remove_index_files(store, keep=old.meta.index_file)  # orphans of a run killed while publishing
        elif require_existing:
            raise StoreError(f"no store at {store}; create it first with `neardup index`")
        else:
            old = None
        asked = embedder.name if embedder is not None else model
        if old is not None:
            if asked is not None and asked != old.meta.model:
                raise StoreMismatchError(
                    f"{store} was made with model {old.meta.model}; it cannot be updated with {asked} "
                    f"(use another --store)")
            model = old.meta.model
            weights = resolve_weights(model, weights) if weights else old.meta.weights
        else:
            model = asked or DEFAULTS.model
            weights = embedder.weights if embedder is not None else resolve_weights(model, weights)
        summary = RunSummary(store=str(store), model=model)
        base = store.parent
        files, blind = _scan(roots, base, summary.failures)
        old_rows = {p: i for i, p in enumerate(old.paths)} if old is not None else {}

        pending: list[_File] = []
        for f in files:
            i = old_rows.get(f.rel)
            if i is not None and old.sizes[i] == f.size and old.mtimes_ns[i] == f.mtime_ns:
                summary.unchanged += 1
            else:
                pending.append(f)

        vectors: dict[str, tuple[np.ndarray, int, int]] = {}  # content hash -> (vector, width, height)
        if old is not None and pending:  # only new/changed files look content up; a quiet night skips this
            for i, sha in enumerate(old.sha256):
                vectors.setdefault(sha, (old.xb[i], int(old.widths[i]), int(old.heights[i])))
        hashes: dict[str, str] = {}  # rel -> content hash, for pending files that could be read
        checkpoint: Checkpoint | None = None
        if pending:
            emb = embedder or make_embedder(model, weights, precision)
            if old is not None and (emb.weights_fingerprint != old.meta.weights_fingerprint
                                    or emb.dim != old.meta.dim):
                raise StoreMismatchError(
                    f"{store} was made with {old.meta.model} weights {old.meta.weights_fingerprint} "
                    f"(dim {old.meta.dim}); the weights given are {emb.weights_fingerprint} (dim {emb.dim})")
            checkpoint = Checkpoint(store, {"model": emb.name, "weights_fingerprint": emb.weights_fingerprint,
                                            "dim": emb.dim, "preprocessing": emb.preprocessing})
            for sha, row in checkpoint.known.items():
                vectors.setdefault(sha, row)
            from_checkpoint = set(checkpoint.known)
            t_embed = time.perf_counter()
            _embed_pending(pending, emb, vectors, hashes, checkpoint, summary, batch_size, checkpoint_every,
                           decode_workers, progress)
            summary.embed_seconds = time.perf_counter() - t_embed
            summary.reused = sum(1 for f in pending if hashes.get(f.rel) in from_checkpoint)
        else:
            emb = None

        new = _assemble(old, files, hashes, vectors, base, prune, summary, emb, model, weights, blind)
        if new is not None:
            _publish(store, new)
            summary.wrote = True
        elif old is not None and not old.meta.index_file:  # a store written without an index (library use)
            _publish(store, old)
            summary.wrote = True
        elif old is not None and not index_path(store, old.meta.index_file).is_file():
            save_index(build_flat_index(old.xb, old.ids), index_path(store, old.meta.index_file))
        # also a checkpoint left by a run killed after publishing: its work is in the store now
        shutil.rmtree(store.with_name(store.name + ".work"), ignore_errors=True)
        summary.total = len(new) if new is not None else (len(old) if old is not None else 0)
    summary.seconds = time.perf_counter() - t0
    return summary


def update_index(roots: Sequence[str | os.PathLike[str]], store: str | os.PathLike[str], **kwargs) -> RunSummary:
    """Incrementally update an existing store (see build_index); refuses when the store does not exist."""
    return build_index(roots, store, require_existing=True, **kwargs)


def _embed_pending(pending: list[_File], emb: Embedder, vectors: dict, hashes: dict[str, str],
                   checkpoint: Checkpoint, summary: RunSummary, batch_size: int, checkpoint_every: int,
                   decode_workers: int, progress: Progress | None) -> None:
    params = (emb.input_size, emb.input_mode, emb.resample)
    batch: list[tuple[str, Decoded]] = []
    unsaved: list[tuple[str, np.ndarray, int, int]] = []
    queued: set[str] = set()  # content already in the current batch: identical new files embed once
    done = 0

    def flush_batch() -> None:
        nonlocal unsaved
        if not batch:
            return
        xb = emb.embed(np.stack([d.pixels for _, d in batch]))
        for (sha, d), vec in zip(batch, xb):
            vectors[sha] = (vec, d.width, d.height)
            unsaved.append((sha, vec, d.width, d.height))
        summary.embedded += len(batch)
        batch.clear()
        queued.clear()

    known = lambda sha: sha in vectors or sha in queued  # noqa: E731 - read by worker threads
    with ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="neardup-decode") as pool:
        for f, result, error in _bounded_map(pool, lambda f: _prepare(f, known, params), pending,
                                             window=batch_size * 2 + decode_workers):
            done += 1
            if error is not None:
                summary.failures.append((f.rel, error))
            else:
                sha, decoded = result
                hashes[f.rel] = sha
                if decoded is not None and sha not in vectors and sha not in queued:
                    batch.append((sha, decoded))
                    queued.add(sha)
            if len(batch) >= batch_size:
                flush_batch()
                if len(unsaved) >= batch_size * checkpoint_every:
                    checkpoint.save(unsaved)
                    unsaved = []
            if progress is not None:
                progress(done, len(pending))
        flush_batch()
    checkpoint.save(unsaved)


def _assemble(old: Catalog | None, files: list[_File], hashes: dict[str, str], vectors: dict, base: Path,
              prune: bool, summary: RunSummary, emb: Embedder | None, model: str, weights: str,
              blind: list[str]) -> Catalog | None:
    """The new catalog, or None when it would equal the old one."""
    old_rows = {p: i for i, p in enumerate(old.paths)} if old is not None else {}
    current = {f.rel for f in files}
    next_id = old.meta.next_id if old is not None else 0
    claimed: set[int] = set()
    # Rows of the old store whose file is gone: a new path with the same content is that file, moved.
    gone_by_sha: dict[str, list[int]] = {}
    if old is not None:
        for i, p in enumerate(old.paths):
            if p not in current and not p.startswith(tuple(blind)) and _gone(base / p):
                gone_by_sha.setdefault(old.sha256[i], []).append(i)

    rows: list[tuple[int, str, int, int, str, np.ndarray, int, int]] = []
    for f in files:
        i = old_rows.get(f.rel)
        if i is not None and f.rel not in hashes and old.sizes[i] == f.size and old.mtimes_ns[i] == f.mtime_ns:
            claimed.add(i)
            rows.append((int(old.ids[i]), f.rel, f.size, f.mtime_ns, old.sha256[i], old.xb[i],
                         int(old.widths[i]), int(old.heights[i])))
            continue
        sha = hashes.get(f.rel)
        if sha is None or sha not in vectors:  # unreadable or undecodable: listed in failures
            continue
        vec, w, h = vectors[sha]
        if i is not None:
            claimed.add(i)
            if old.sha256[i] == sha:
                summary.touched += 1
            else:
                summary.changed += 1
            rows.append((int(old.ids[i]), f.rel, f.size, f.mtime_ns, sha, vec, w, h))
            continue
        moved_from = gone_by_sha.get(sha)
        if moved_from:
            j = moved_from.pop(0)
            claimed.add(j)
            summary.moved += 1
            rows.append((int(old.ids[j]), f.rel, f.size, f.mtime_ns, sha, vec, w, h))
            continue
        summary.added += 1
        rows.append((next_id, f.rel, f.size, f.mtime_ns, sha, vec, w, h))
        next_id += 1

    failed = {p for p, _ in summary.failures}
    if old is not None:
        for i, p in enumerate(old.paths):
            if i in claimed or p in failed:
                continue
            # kept: under a folder that could not be listed this time (not known to be gone), or still on
            # disk but outside the folders given this time
            if not p.startswith(tuple(blind)) and (prune or _gone(base / p)):
                summary.removed += 1
                continue
            rows.append((int(old.ids[i]), p, int(old.sizes[i]), int(old.mtimes_ns[i]), old.sha256[i],
                         old.xb[i], int(old.widths[i]), int(old.heights[i])))
        dropped_failed = sum(1 for i, p in enumerate(old.paths) if p in failed and i not in claimed)
        summary.removed += dropped_failed
        nothing_changed = not (summary.added or summary.changed or summary.moved or summary.removed
                               or summary.touched) and sorted(summary.failures) == sorted(old.failures)
        if nothing_changed:
            return None
        meta = old.meta
    else:
        if emb is None:
            reasons = "; ".join(f"{p}: {r}" for p, r in summary.failures[:3])
            raise InputError(f"nothing could be indexed ({reasons})")
        meta = StoreMeta(model=model, weights=weights, weights_fingerprint=emb.weights_fingerprint, dim=emb.dim,
                         input_size=emb.input_size, preprocessing=emb.preprocessing)
    rows.sort(key=lambda r: r[1])
    d = meta.dim
    return Catalog(
        meta=replace(meta, next_id=next_id),
        ids=np.array([r[0] for r in rows], np.int64), paths=[r[1] for r in rows],
        sizes=np.array([r[2] for r in rows], np.int64), mtimes_ns=np.array([r[3] for r in rows], np.int64),
        sha256=[r[4] for r in rows], widths=np.array([r[6] for r in rows], np.int32),
        heights=np.array([r[7] for r in rows], np.int32),
        xb=np.stack([r[5] for r in rows]).astype(np.float32) if rows else np.zeros((0, d), np.float32),
        failures=sorted(summary.failures))


def _publish(store: Path, cat: Catalog) -> None:
    """Write the index, then the store that names it, then drop older index files."""
    name = f"{store.name}.{uuid.uuid4().hex[:12]}.faiss"
    save_index(build_flat_index(cat.xb, cat.ids), store.parent / name)
    cat.meta = replace(cat.meta, index_file=name)
    write_catalog(store, cat)
    remove_index_files(store, keep=name)


def remove_index_files(store: Path, keep: str) -> None:
    """Delete this store's index files (`<store>.<12 hex>.faiss`) other than `keep`."""
    pattern = re.compile(rf"{re.escape(store.name)}\.[0-9a-f]{{12}}\.faiss")  # ours only, not a sibling store's
    for stale in store.parent.iterdir():
        if pattern.fullmatch(stale.name) and stale.name != keep:
            try:
                stale.unlink()
            except OSError:
                pass


@dataclass
class EmbeddedFiles:
    """Embeddings of loose image files (query photos): xq rows match `paths`; failures are listed."""

    paths: list[str]
    xq: np.ndarray
    failures: list[tuple[str, str]]


def embed_files(paths: Sequence[str | os.PathLike[str]], emb: Embedder, *,
                batch_size: int = DEFAULTS.batch_size,
                decode_workers: int = DEFAULTS.decode_workers) -> EmbeddedFiles:
    """Decode and embed image files in batches with overlapped decoding; undecodable files are listed."""
    files = [_File(str(p), str(p), 0, 0) for p in paths]
    params = (emb.input_size, emb.input_mode, emb.resample)
    ok: list[str] = []
    chunks: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    failures: list[tuple[str, str]] = []
    # one photo (the interactive query) is decoded inline: starting a thread pool costs more than it saves
    with ThreadPoolExecutor(max_workers=decode_workers if len(files) > 1 else 1,
                            thread_name_prefix="neardup-decode") as pool:
        for f, result, error in _bounded_map(pool, lambda f: _prepare(f, lambda _: False, params), files,
                                             window=batch_size * 2 + decode_workers):
            if error is not None:
                failures.append((f.rel, error))
                continue
            ok.append(f.rel)
            batch.append(result[1].pixels)
            if len(batch) >= batch_size:
                chunks.append(emb.embed(np.stack(batch)))
                batch = []
        if batch:
            chunks.append(emb.embed(np.stack(batch)))
    xq = np.concatenate(chunks) if chunks else np.zeros((0, emb.dim), np.float32)
    return EmbeddedFiles(ok, xq, failures)
