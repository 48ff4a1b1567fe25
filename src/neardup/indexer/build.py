"""Index job, build: scan → diff → decode+embed → store → FAISS index, incremental and crash-safe.

One operation serves `neardup index` and `neardup update`: files whose size and mtime are unchanged cost a
stat; other files are hashed, and only content never seen before is decoded and embedded. Embeddings are
saved in durable checkpoint chunks while the run goes, so a killed run resumes where it stopped; the
store and index are published with `os.replace`, so readers see the old or the new state, never a mix.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..config import DEFAULTS, MODELS
from ..errors import InputError, StoreError, StoreMismatchError
from ..fileio import check_output_path
from .checkpoint import Checkpoint
from .diff import assemble, split_unchanged
from .embed import Embedder, make_embedder, resolve_weights
from .faiss_index import build_flat_index, index_intact, save_index
from .files import StoreFiles
from .lock import writer_lock
from .pipeline import Embedded, prepare_all
from .scan import FileRecord, scan
from .store import Catalog, StoreMeta, check_embedder, read_catalog, read_meta, write_catalog

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


@dataclass(frozen=True)
class JobOptions:
    """The knobs of the decode+embed phase."""

    batch_size: int = DEFAULTS.batch_size
    checkpoint_every: int = DEFAULTS.checkpoint_every
    decode_workers: int = DEFAULTS.decode_workers
    max_file_bytes: int = DEFAULTS.max_file_bytes


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
    max_file_bytes: int = DEFAULTS.max_file_bytes,
    embedder: Embedder | None = None,
    progress: Progress | None = None,
    require_existing: bool = False,
) -> RunSummary:
    """Index the images under `roots` into the HDF5 store `store` and its FAISS index; return a summary.

    On an existing store this is an incremental update with the store's own model and weights (asking for
    another model is refused). Files that vanished from disk are removed; with `prune`, so are files that
    still exist but are no longer under `roots`. Images that cannot be decoded are listed, never fatal.
    Files over `max_file_bytes` are listed as skipped without being read.
    `embedder` injects an embedding method (tests); otherwise one is built from `model`/`weights`.
    """
    t0 = time.perf_counter()
    files = _writable(store)
    store = files.store
    opts = JobOptions(batch_size, checkpoint_every, decode_workers, max_file_bytes)
    if min(batch_size, checkpoint_every, decode_workers, max_file_bytes) < 1:
        raise InputError("batch size, checkpoint interval, decode workers and file size limit must be at least 1")
    if model is not None and model not in MODELS and embedder is None:
        raise InputError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    with writer_lock(files):
        files.remove_temporaries()
        if store.exists():
            old = read_catalog(store)  # whole, checksums verified: a damaged store stops here, untouched
            files.remove_index_files(keep=_live_indexes(files, old.meta))  # orphans of a killed publish
        elif require_existing:
            raise StoreError(f"no store at {store}; create it first with `neardup index`")
        else:
            old = None
        asked = embedder.name if embedder is not None else model
        if old is not None:
            if asked is not None and asked != old.meta.model:  # refused before any model is built
                raise StoreMismatchError(
                    f"{store} was made with model {old.meta.model}; it cannot be updated with {asked} "
                    f"(use another --store)")
            model = old.meta.model
            weights = resolve_weights(model, weights) if weights else old.meta.weights
        else:
            model = asked or DEFAULTS.model
            weights = embedder.weights if embedder is not None else resolve_weights(model, weights)
        summary = RunSummary(store=str(store), model=model)
        found = scan(roots, store.parent, opts.max_file_bytes)
        summary.failures.extend(found.failures)
        pending, summary.unchanged = split_unchanged(old, found.files)

        vectors: dict[str, Embedded] = {}  # content hash -> embedding
        if old is not None and pending:  # only new/changed files look content up; a quiet night skips this
            for i, sha in enumerate(old.sha256):
                vectors.setdefault(sha, Embedded(old.xb[i], int(old.widths[i]), int(old.heights[i])))
        hashes: dict[str, str] = {}  # rel -> content hash, for pending files that could be read
        new_meta = None
        if pending:
            emb = embedder or make_embedder(model, weights, precision)
            if old is not None:
                check_embedder(old.meta, emb, store)
            else:
                new_meta = StoreMeta(model=model, weights=weights, weights_fingerprint=emb.weights_fingerprint,
                                     dim=emb.dim, input_size=emb.input_size, preprocessing=emb.preprocessing)
            checkpoint = Checkpoint(files.work, {"model": emb.name, "weights_fingerprint": emb.weights_fingerprint,
                                                 "dim": emb.dim, "preprocessing": emb.preprocessing})
            for sha, e in checkpoint.known.items():
                vectors.setdefault(sha, e)
            t_embed = time.perf_counter()
            _embed_pending(pending, emb, vectors, hashes, checkpoint, summary, opts, progress)
            summary.embed_seconds = time.perf_counter() - t_embed
            summary.reused = sum(1 for f in pending if hashes.get(f.rel) in checkpoint.known)

        new, changes = assemble(old, found, hashes, vectors, summary.failures, prune=prune, new_meta=new_meta)
        for name, count in asdict(changes).items():
            setattr(summary, name, count)
        if new is not None:
            _publish(files, new, rotate=old is not None)
            summary.wrote = True
        elif old is not None and not old.meta.index_file:  # a store written without an index (library use)
            _publish(files, old, rotate=False)
            summary.wrote = True
        elif old is not None and not index_intact(store, old):  # lost or damaged: rewrite it from the store
            log.warning("index %s is missing or damaged; rewriting it from the store", old.meta.index_file)
            digest = save_index(build_flat_index(old.xb, old.ids), files.index(old.meta.index_file))
            if old.meta.index_sha256 and digest != old.meta.index_sha256:  # another FAISS version's bytes
                _publish(files, old, rotate=False)
                summary.wrote = True
        # also a checkpoint left by a run killed after publishing: its work is in the store now
        files.remove_work()
        summary.total = len(new) if new is not None else (len(old) if old is not None else 0)
    summary.seconds = time.perf_counter() - t0
    return summary


def update_index(roots: Sequence[str | os.PathLike[str]], store: str | os.PathLike[str], **kwargs) -> RunSummary:
    """Incrementally update an existing store (see build_index); refuses when the store does not exist."""
    return build_index(roots, store, require_existing=True, **kwargs)


def _embed_pending(pending: list[FileRecord], emb: Embedder, vectors: dict[str, Embedded], hashes: dict[str, str],
                   checkpoint: Checkpoint, summary: RunSummary, opts: JobOptions,
                   progress: Progress | None) -> None:
    """Read every pending file (hash into `hashes`), embed content not in `vectors` yet (into `vectors`),
    checkpointing every few batches; failures go into the summary."""
    batch: dict[str, np.ndarray] = {}  # content hash -> pixels: identical new files embed once
    sizes: dict[str, tuple[int, int]] = {}
    unsaved: dict[str, Embedded] = {}

    def flush_batch() -> None:
        if not batch:
            return
        xb = emb.embed(np.stack(list(batch.values())))
        for sha, vec in zip(batch, xb):
            vectors[sha] = unsaved[sha] = Embedded(vec, *sizes[sha])
        summary.embedded += len(batch)
        batch.clear()

    known = lambda sha: sha in vectors or sha in batch  # noqa: E731 - read by the decoding threads
    outcomes = prepare_all([f.abs for f in pending], emb, known=known, batch_size=opts.batch_size,
                           decode_workers=opts.decode_workers, max_bytes=opts.max_file_bytes)
    with closing(outcomes):  # an error or Ctrl-C here also ends the decoding threads
        for done, (f, out) in enumerate(zip(pending, outcomes), start=1):
            if out.error is not None:
                summary.failures.append((f.rel, out.error))
            else:
                sha, decoded = out.prepared.sha256, out.prepared.decoded
                hashes[f.rel] = sha
                if decoded is not None and sha not in vectors and sha not in batch:
                    batch[sha] = decoded.pixels
                    sizes[sha] = (decoded.width, decoded.height)
            if len(batch) >= opts.batch_size:
                flush_batch()
                if len(unsaved) >= opts.batch_size * opts.checkpoint_every:
                    checkpoint.save(unsaved)
                    unsaved = {}
            if progress is not None:
                progress(done, len(pending))
    flush_batch()
    checkpoint.save(unsaved)


def _writable(store: str | os.PathLike[str]) -> StoreFiles:
    """The files of a store about to be written; refuses a folder or a missing parent before any file is made."""
    files = StoreFiles.resolved(store)
    if files.store.is_dir():
        raise InputError(f"{store} is a folder; give the store's file name (e.g. {Path(store) / DEFAULTS.store})")
    check_output_path(files.store)
    return files


def _live_indexes(files: StoreFiles, meta: StoreMeta) -> set[str]:
    """Index files still named by a store: the current one and the previous generation's."""
    live = {meta.index_file}
    try:
        live.add(read_meta(files.previous).index_file)
    except StoreError:
        pass
    return live


def _publish(files: StoreFiles, cat: Catalog, *, rotate: bool) -> None:
    """Write the index, then (after keeping the current store as the previous generation when `rotate`) the
    store that names it with the index's digest, then drop index files no generation names."""
    name = files.new_index_name()
    digest = save_index(build_flat_index(cat.xb, cat.ids), files.index(name))
    cat.meta = replace(cat.meta, index_file=name, index_sha256=digest)
    if rotate and files.store.exists():
        files.keep_previous()
    write_catalog(files.store, cat)
    files.remove_index_files(keep=_live_indexes(files, cat.meta))


@dataclass(frozen=True)
class Restored:
    """What `restore_previous` did."""

    store: str
    count: int  #: images in the restored store
    updated: str  #: when the restored generation was written
    set_aside: str | None  #: where a damaged store was moved, if there was one
    swapped: bool  #: the replaced store was readable and is now the previous generation (restore is undoable)


def restore_previous(store: str | os.PathLike[str]) -> Restored:
    """Make the previous published generation of `store` current again, under the writer lock.

    The previous generation is read whole (checksums verified) first. A readable current store becomes the
    previous one (so a restore can be undone the same way); a damaged one is moved to `<store>.damaged`.
    Raises StoreError when there is no previous generation or it is damaged too.
    """
    files = _writable(store)
    with writer_lock(files):
        files.remove_temporaries()
        if not files.previous.is_file():
            raise StoreError(f"no previous generation of {store} is kept ({files.previous} does not exist); "
                             f"rebuild it with `neardup index DIR --store {store}`")
        try:
            prev = read_catalog(files.previous)
        except StoreError as exc:
            raise StoreError(f"the previous generation {files.previous} cannot be used either ({exc}); rebuild "
                             f"the store with `neardup index DIR --store {store}`") from None
        set_aside, swapped = None, False
        if files.store.exists():
            try:
                read_catalog(files.store)
                swapped = True
            except StoreError:
                os.replace(files.store, files.damaged)
                set_aside = str(files.damaged)
        updated = prev.meta.updated
        _publish(files, prev, rotate=swapped)
        files.remove_work()  # a checkpoint belongs to the generation being replaced
    return Restored(str(files.store), len(prev), updated, set_aside, swapped)
