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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..config import DEFAULTS, PRECISIONS
from ..errors import DecodeError, InputError, StoreError, StoreMismatchError
from ..fileio import check_output_path, fsync_dir
from .checkpoint import Checkpoint
from .diff import assemble, split_unchanged
from .embed import Embedder, resolve_weights
from .models import make_embedder, split_model
from .faiss_index import derived_index, index_intact, save_index
from .index_kinds import plan as plan_index
from .files import StoreFiles
from .local_features import LOCAL_VERSION
from .embed_job import EmbedPhase, JobOptions, Progress, embed_pending
from .lock import writer_lock
from .onnx_export import agreement, quantize_int8
from .pipeline import Embedded, prepare
from .scan import FileRecord, scan
from .store import Catalog, StoreMeta, read_catalog, read_meta, store_embedder, write_catalog

if TYPE_CHECKING:
    from .ray_job import RayOptions

log = logging.getLogger(__name__)


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
    calibration: str = ""  #: int8 only: the calibration and its measured agreement with float32
    driver_seconds: float = 0.0  #: --ray only: the driver's own time on the rows that came back

    @property
    def images_per_second(self) -> float:
        """Decode+embed throughput of this run."""
        return self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0


def build_index(
    roots: Sequence[str | os.PathLike[str]],
    store: str | os.PathLike[str],
    *,
    model: str | None = None,
    weights: str | None = None,
    precision: str | None = None,
    batch_size: int = DEFAULTS.batch_size,
    prune: bool = False,
    decode_workers: int = DEFAULTS.decode_workers,
    checkpoint_every: int = DEFAULTS.checkpoint_every,
    max_file_bytes: int = DEFAULTS.max_file_bytes,
    runtime: str | None = None,
    preprocess: str | None = None,
    embedder: Embedder | None = None,
    progress: Progress | None = None,
    require_existing: bool = False,
    local_features: bool = True,
    ray: RayOptions | None = None,
    index: str | None = None,
    memory: int | None = None,
    target_recall: float | None = None,
) -> RunSummary:
    """Index the images under `roots` into the HDF5 store `store` and its FAISS index; return a summary.

    On an existing store this is an incremental update with the store's own model and weights (asking for
    another model is refused). Files that vanished from disk are removed; with `prune`, so are files that
    still exist but are no longer under `roots`. Images that cannot be decoded are listed, never fatal.
    Files over `max_file_bytes` are listed as skipped without being read. `runtime` picks TensorFlow or ONNX
    Runtime for the built-in CNNs; `preprocess` is the OnnxPreprocess spec of `model="onnx:PATH"`;
    `precision` defaults to the store's (else float32); another than the store's is refused. Precision
    "int8" (a new store only) calibrates an int8 model on the indexed images and keeps it beside
    the store. `embedder` injects an embedding method (tests); otherwise one is built from `model`/`weights`.
    A new store caches local features for verification unless `local_features` is False (then never).
    With `ray`, the decode+embed phase runs on a Ray cluster (indexer/ray_job.py); the store is the same.
    `index` (flat, auto, ivf, hnsw or a FAISS factory string), `memory` (bytes) and `target_recall` choose the
    FAISS index (indexer/index_kinds.py); the store keeps them for its updates (default: auto, no budget, 0.95).
    """
    t0 = time.perf_counter()
    files = _writable(store)
    store = files.store
    opts = JobOptions(batch_size, checkpoint_every, decode_workers, max_file_bytes)
    if min(batch_size, checkpoint_every, decode_workers, max_file_bytes) < 1:
        raise InputError("batch size, checkpoint interval, decode workers and file size limit must be at least 1")
    if ray is not None:  # said before any work: Ray is an optional extra
        from .ray_job import import_ray

        import_ray()
    if model is not None and embedder is None:
        model, weights = split_model(model, weights)  # onnx:PATH -> ("onnx", PATH)
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if model == "phash" and precision not in (None, "float32"):
        raise InputError("phash has no precision to choose; drop --precision")
    if preprocess and model not in (None, "onnx"):
        raise InputError("--preprocess describes an ONNX model of one's own (--model onnx:PATH); "
                         f"{model} has its own preprocessing")
    asked_index = {k: v for k, v in (("index_kind", index), ("index_memory", memory),
                                      ("index_target", target_recall)) if v is not None}
    if target_recall is not None and not 0 < target_recall <= 1:
        raise InputError("--target-recall is a fraction in (0, 1]")
    if memory is not None and memory < 0:
        raise InputError("--memory must be positive")
    repointed = False
    with writer_lock(files):
        files.remove_temporaries()
        _finish_restore(files)
        if store.exists():
            old = read_catalog(store, local=True)  # whole, checksums verified: a damaged store stops here, untouched
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
            if precision is not None and precision != old.meta.precision:
                raise StoreMismatchError(f"{store} holds {old.meta.precision} vectors; a store's precision is chosen "
                                         f"when it is created (drop --precision, or use another --store)")
            precision = old.meta.precision
            if preprocess and old.meta.model == "onnx" and not _same_preprocess(preprocess, old.meta.preprocessing):
                raise StoreMismatchError(f"{store} was made with the preprocessing {old.meta.preprocessing}; "
                                         f"--preprocess cannot change it (use another --store)")
            model = old.meta.model
            plan_index(asked_index.get("index_kind", old.meta.index_kind), 1, old.meta.dim)  # refused before work
            weights = resolve_weights(model, weights) if weights else old.meta.weights
            if model == "onnx" and weights != old.meta.weights:  # the same model file, moved: re-point the store
                repointed = _repoint(old, weights, store)
        else:
            model = asked or DEFAULTS.model
            weights = embedder.weights if embedder is not None else resolve_weights(model, weights)
        precision = precision or DEFAULTS.precision
        summary = RunSummary(store=str(store), model=model)
        found = scan(roots, store.parent)
        summary.failures.extend(found.failures)
        pending, summary.unchanged = split_unchanged(old, found.files)

        vectors: dict[str, Embedded] = {}  # content hash -> embedding
        if old is not None and pending:  # only new/changed files look content up; a quiet night skips this
            for i, sha in enumerate(old.sha256):
                vectors.setdefault(sha, Embedded(old.xb[i], int(old.widths[i]), int(old.heights[i]),
                                                 old.local.row(i) if old.local is not None else None))
        hashes: dict[str, str] = {}  # rel -> content hash, for pending files that could be read
        new_meta = None
        if pending:
            if old is not None:  # the store's own model, preprocessing and int8 file, checked against it
                factory = partial(store_embedder, old.meta, store, weights=weights, precision=precision,
                                  embedder=embedder, runtime=runtime)
                emb = factory()
            elif embedder is None and precision == "int8":
                emb = _calibrated(files, pending, model, weights, preprocess, opts, summary)
                factory = partial(make_embedder, model, weights, "int8", runtime="onnx", preprocess=preprocess,
                                  quantized=files.quantized)
            else:
                factory = partial(_itself, embedder) if embedder is not None else partial(
                    make_embedder, model, weights, precision, runtime=runtime, preprocess=preprocess)
                emb = factory()
            local = (LOCAL_VERSION if local_features else "") if old is None else old.meta.local_features
            if old is None:
                plan_index(asked_index.get("index_kind", DEFAULTS.index), 1, emb.dim)  # refused before embedding
                new_meta = StoreMeta(model=model, weights=weights, weights_fingerprint=emb.weights_fingerprint,
                                     dim=emb.dim, input_size=emb.input_size, preprocessing=emb.preprocessing,
                                     runtime=getattr(emb, "runtime", ""),
                                     precision=getattr(emb, "precision", DEFAULTS.precision),
                                     quantized_file=files.quantized.name if precision == "int8" else "",
                                     calibration=summary.calibration, local_features=local,
                                     **{"index_kind": DEFAULTS.index, **asked_index})
            checkpoint = Checkpoint(files.work, {"model": emb.name, "weights_fingerprint": emb.weights_fingerprint,
                                                 "dim": emb.dim, "preprocessing": emb.preprocessing,
                                                 "local_features": local})
            for sha, e in checkpoint.known.items():
                vectors.setdefault(sha, e)
            phase = EmbedPhase(vectors, hashes, summary.failures)
            t_embed = time.perf_counter()
            if ray is None:
                embed_pending(pending, emb, phase, checkpoint, opts, progress, bool(local))
            else:  # the same phase on a Ray cluster; everything around it stays here
                from .ray_job import embed_pending_ray

                embed_pending_ray(pending, emb, factory, phase, checkpoint, opts, ray, progress, bool(local))
            summary.embed_seconds = time.perf_counter() - t_embed
            summary.embedded, summary.driver_seconds = phase.embedded, phase.driver_seconds
            summary.reused = sum(1 for f in pending if hashes.get(f.rel) in checkpoint.known)

        new, changes = assemble(old, found, hashes, vectors, summary.failures, prune=prune, new_meta=new_meta)
        for name, count in asdict(changes).items():
            setattr(summary, name, count)
        reindex = old is not None and any(getattr(old.meta, k) != v for k, v in asked_index.items())
        if new is not None and old is not None:
            new.meta = replace(new.meta, **asked_index)
        if new is not None:
            _publish(files, new, rotate=old is not None)
            summary.wrote = True
        elif old is not None and not old.meta.index_file:  # a store written without an index (library use)
            _publish(files, old, rotate=False)
            summary.wrote = True
        elif repointed or reindex:  # a moved onnx model (its new place), or another index asked for
            old.meta = replace(old.meta, **asked_index)
            _publish(files, old, rotate=True)
            summary.wrote = True
        elif old is not None and not old.meta.index_sha256:  # written before checksums: rewrite it with them
            _publish(files, old, rotate=True)
            summary.wrote = True
        elif old is not None and not index_intact(store, old):  # lost or damaged: rewrite it from the store
            log.warning("index %s is missing or damaged; rewriting it from the store", old.meta.index_file)
            index, meta = derived_index(old.meta, old.xb, old.ids)
            digest = save_index(index, files.index(old.meta.index_file))
            if (old.meta.index_sha256 and digest != old.meta.index_sha256) or meta != old.meta:
                old.meta = meta  # another FAISS version's bytes, or a retrained approximate index
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


def _itself(emb: Embedder) -> Embedder:
    """An injected embedder as its own factory (Ray actors get a pickled copy)."""
    return emb


def _same_preprocess(asked: str, stored: str) -> bool:
    """True when the --preprocess asked for is the store's (unnamed input/output taking the store's names)."""
    from .onnx_runtime import OnnxPreprocess

    a, s = OnnxPreprocess.parse(asked), OnnxPreprocess.parse(stored)
    return replace(a, input=a.input or s.input, output=a.output or s.output) == s


def _repoint(old: Catalog, path: str, store: Path) -> bool:
    """Record the new place of an onnx store's model file when it holds the very model the store was made with."""
    from ..fileio import file_sha256

    if not Path(path).is_file():
        raise InputError(f"ONNX model not found: {path}")
    if "sha256:" + file_sha256(path)[:16] != old.meta.weights_fingerprint:
        raise StoreMismatchError(f"{store} was made with another model file (fingerprint "
                                 f"{old.meta.weights_fingerprint}) than {path}")
    old.meta = replace(old.meta, weights=path)
    return True


def _calibrated(files: StoreFiles, pending: list[FileRecord], model: str, weights: str,
                preprocess: str | None, opts: JobOptions, summary: RunSummary) -> Embedder:
    """An int8 embedder calibrated on up to DEFAULTS.calibration_images of the files being indexed (evenly
    spaced over their sorted paths), written beside the store; its agreement with float32 goes in `summary`."""
    fp32 = make_embedder(model, weights, "float32", runtime="onnx", preprocess=preprocess)
    n = min(DEFAULTS.calibration_images, len(pending))
    picks = [pending[i] for i in np.linspace(0, len(pending) - 1, n).round().astype(int)] if n else []
    pixels = []
    for f in dict.fromkeys(picks):  # without repeats
        try:
            pixels.append(prepare(f.abs, fp32, max_bytes=opts.max_file_bytes).decoded.pixels)
        except DecodeError:
            continue  # listed when the file comes up for embedding
    sample = np.stack(pixels) if pixels else np.zeros((0, fp32.input_size, fp32.input_size, 3), np.uint8)
    int8 = quantize_int8(fp32, sample, files.quantized)
    agree = agreement(fp32.embed(sample), int8.embed(sample))
    summary.calibration = f"int8 calibrated on {agree.line()}"
    log.info("%s", summary.calibration)
    return int8


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
    _save_index(files, cat)
    # the previous generation is linked when the new store is complete, just before it replaces the old one
    write_catalog(files.store, cat, before_replace=files.keep_previous if rotate and files.store.exists() else None)
    files.remove_index_files(keep=_live_indexes(files, cat.meta))


def _save_index(files: StoreFiles, cat: Catalog) -> None:
    name = files.new_index_name()
    index, cat.meta = derived_index(cat.meta, cat.xb, cat.ids)
    cat.meta = replace(cat.meta, index_file=name, index_sha256=save_index(index, files.index(name)))


def _finish_restore(files: StoreFiles) -> bool:
    """Complete or drop a restore that was killed (call under the writer lock). It had kept the current store
    as the previous generation only after writing the restored one as `<store>.restoring`: if both names
    already hold one file, that step happened and the rename is finished now; otherwise it is dropped.
    Returns True when a restore was finished."""
    if not files.restoring.exists():
        return False
    if files.store.exists() and files.previous.exists() and os.path.samefile(files.store, files.previous):
        log.warning("finishing a restore of %s that was interrupted", files.store)
        os.replace(files.restoring, files.store)
        fsync_dir(files.store.parent)
        return True
    files.restoring.unlink()
    return False


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
    if not files.store.exists() and not files.previous.exists():  # a mistyped path: no lock file left behind
        raise StoreError(f"no store at {store}")
    with writer_lock(files):
        files.remove_temporaries()
        if _finish_restore(files):  # the restore asked for again was killed after its point of no return
            cat = read_catalog(files.store, vectors=False)
            return Restored(str(files.store), len(cat), cat.meta.updated, None, True)
        if not files.previous.is_file():
            raise StoreError(f"no previous generation of {store} is kept ({files.previous} does not exist); "
                             f"rebuild it with `neardup index DIR --store {store}`")
        try:
            prev = read_catalog(files.previous, local=True)
        except StoreError as exc:
            raise StoreError(f"the previous generation {files.previous} is damaged too "
                             f"({getattr(exc, 'reason', exc)}); move {files.store.name} and {files.previous.name} "
                             f"away and rebuild the store with `neardup index DIR --store {store}`") from None
        swapped, set_aside = False, None
        if files.store.exists():
            try:
                read_catalog(files.store)
                swapped = True
            except StoreError:
                set_aside = str(files.damaged)
        updated = prev.meta.updated
        # The restored generation is written whole under its own name first, so a kill at any point leaves a
        # readable store name and both generations on disk (see _finish_restore); the store's name is never
        # missing, not even for a moment.
        _save_index(files, prev)
        write_catalog(files.restoring, prev)
        if swapped:
            files.keep_previous()  # restore can be undone the same way
        elif files.store.exists():
            files.link_as(files.damaged)  # kept for inspection, never read
        os.replace(files.restoring, files.store)
        fsync_dir(files.store.parent)
        files.remove_index_files(keep=_live_indexes(files, prev.meta))
    return Restored(str(files.store), len(prev), updated, set_aside, swapped)
