"""Index job, build: scan → diff → decode+embed → publish (store/publish.py), incremental and crash-safe.

One operation serves `neardup index` and `neardup update`: files whose size and mtime are unchanged cost a
stat; other files are hashed, and only content never seen before is decoded and embedded. Embeddings are
saved in durable checkpoint chunks while the run goes, so a killed run resumes where it stopped; what
changed is published as a new segment and tombstones under a new manifest (`os.replace`), so readers see
the old or the new generation, never a mix, and an update writes what changed, not the store.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np

from ..config import DEFAULTS, PRECISIONS
from ..embed.embedders import Embedder, resolve_weights
from ..embed.models import make_embedder, split_model
from ..embed.onnx_export import agreement, quantize_int8
from ..embed.pipeline import prepare
from ..errors import DecodeError, InputError, StoreError, StoreMismatchError
from ..features import LOCAL_VERSION
from ..fileio import check_output_path, file_sha256
from ..store.files import StoreFiles
from ..store.index_kinds import plan as plan_index
from ..store.meta import Catalog, StoreMeta
from ..store.publish import Change, Published, Writer
from ..store.repair import DroppedSegment, segment_contents
from ..store_embedder import store_embedder
from .checkpoint import Checkpoint
from .diff import KnownContent, assemble, split_unchanged
from .embed_job import EmbedPhase, JobOptions, Progress, embed_pending
from .options import IndexOptions, options_of
from .scan import FileRecord, Scan, scan

log = logging.getLogger(__name__)


@dataclass
class Repaired:
    """A damaged segment a repair dropped: why, and which of its photos were indexed again."""

    name: str
    rows: int
    why: str
    found: int | None = None  #: its photos indexed again (None: cannot be told, neither paths nor hashes read)
    gone: int = 0  #: photos deleted from disk since (known by their paths)
    missing: list[str] = field(default_factory=list)  #: photos not found under the folders given, dropped


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
    published: Published | None = None  #: what the publish wrote (segments, bytes, compaction), if anything
    repaired: list[Repaired] = field(default_factory=list)  #: damaged segments dropped, and what came back

    @property
    def images_per_second(self) -> float:
        """Decode+embed throughput of this run."""
        return self.embedded / self.embed_seconds if self.embed_seconds > 0 else 0.0


def build_index(
    roots: Sequence[str | os.PathLike[str]],
    store: str | os.PathLike[str],
    options: IndexOptions | None = None,
    *,
    progress: Progress | None = None,
    embedder: Embedder | None = None,
    **fields: object,
) -> RunSummary:
    """Index the images under `roots` into the HDF5 store `store` and its FAISS index; return a summary.

    `options` (an IndexOptions, or its fields given as keywords) say how; `progress` follows the embedding.

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
    FAISS index (store/index_kinds.py); the store keeps them for its updates (default: auto, no budget, 0.95).
    `repair` reads every block of the store first and drops damaged segments: their photos are indexed again
    (new ids), so nothing is lost but the embedding time; a photo of theirs not found under `roots` (by its
    path, or where the segment's paths are damaged too, by its content) refuses the repair before anything is
    written, unless `drop_missing` (then it is dropped, and listed in the summary). `compact` copies every
    live row into one segment and trains the index anew (what every update did before segments; updates
    compact by themselves when deleted rows pile up).
    """
    o = options_of(options, fields)
    model, weights, precision, batch_size, prune = o.model, o.weights, o.precision, o.batch_size, o.prune
    decode_workers, checkpoint_every, max_file_bytes = o.decode_workers, o.checkpoint_every, o.max_file_bytes
    runtime, preprocess, require_existing, local_features, ray = (o.runtime, o.preprocess, o.require_existing,
                                                                   o.local_features, o.ray)
    index, memory, target_recall = o.index, o.memory, o.target_recall
    repair, compact, drop_missing = o.repair, o.compact, o.drop_missing
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
    with Writer(files, repair=repair) as w:
        gen = w.current  # opened and checked: a damaged store stops here, untouched
        if gen is None and require_existing:
            raise StoreError(f"no store at {store}; create it first with `neardup index`")
        old_meta = gen.meta if gen is not None else None
        asked = embedder.name if embedder is not None else model
        if old_meta is not None:
            if asked is not None and asked != old_meta.model.name:  # refused before any model is built
                raise StoreMismatchError(
                    f"{store} was made with model {old_meta.model.name}; it cannot be updated with {asked} "
                    f"(use another --store)")
            if precision is not None and precision != old_meta.model.precision:
                raise StoreMismatchError(f"{store} holds {old_meta.model.precision} vectors; a store's precision is "
                                         f"chosen when it is created (drop --precision, or use another --store)")
            precision = old_meta.model.precision
            if preprocess and old_meta.model.name == "onnx" and not _same_preprocess(preprocess,
                                                                                     old_meta.model.preprocessing):
                raise StoreMismatchError(f"{store} was made with the preprocessing {old_meta.model.preprocessing}; "
                                         f"--preprocess cannot change it (use another --store)")
            model = old_meta.model.name
            plan_index(asked_index.get("index_kind", old_meta.index.kind), 1, old_meta.model.dim)  # refused before work
            weights = resolve_weights(model, weights) if weights else old_meta.model.weights
            if model == "onnx" and weights != old_meta.model.weights:  # the same model file, moved: re-point the store
                repointed = _repoint(old_meta, weights, store)
        else:
            model = asked or DEFAULTS.model
            weights = embedder.weights if embedder is not None else resolve_weights(model, weights)
        precision = precision or DEFAULTS.precision
        summary = RunSummary(store=str(store), model=model)
        found = scan(roots, store.parent)
        summary.failures.extend(found.failures)
        dropped = list(w.dropped)  # a repair's damaged segments: their photos must be among those found
        summary.repaired = _check_repair(dropped, found, drop_missing)
        old = gen.catalog if gen is not None else None
        pending, summary.unchanged = split_unchanged(old, found.files)

        vectors = KnownContent(gen)  # content hash -> embedding: stored rows are read only when asked for
        hashes: dict[str, str] = {}  # rel -> content hash, for pending files that could be read
        new_meta = None
        if pending:
            if gen is not None:  # the store's own model, preprocessing and int8 file, checked against it
                factory = partial(store_embedder, gen.meta, store, weights=weights, precision=precision,
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
            local = (LOCAL_VERSION if local_features else "") if gen is None else gen.meta.local_features
            if gen is None:
                plan_index(asked_index.get("index_kind", DEFAULTS.index), 1, emb.dim)  # refused before embedding
                new_meta = StoreMeta.of_flat({
                    "model": model, "weights": weights, "weights_fingerprint": emb.weights_fingerprint,
                    "dim": emb.dim, "input_size": emb.input_size, "preprocessing": emb.preprocessing,
                    "runtime": getattr(emb, "runtime", ""), "precision": getattr(emb, "precision", DEFAULTS.precision),
                    "quantized_file": files.quantized.name if precision == "int8" else "",
                    "quantized_sha256": file_sha256(files.quantized)
                    if precision == "int8" and files.quantized.is_file() else "",
                    "calibration": summary.calibration, "local_features": local,
                    "index_kind": DEFAULTS.index, **asked_index})
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
            vectors.prefetch(set(hashes.values()))  # stored content of moved, touched and copied files: one read

        if dropped:  # before anything is written: photos of a damaged segment known only by their content
            _check_repair_contents(summary.repaired, dropped, files, hashes, old, drop_missing)
        delta = assemble(old, found, hashes, vectors, summary.failures, prune=prune, new_meta=new_meta,
                         unchanged=summary.unchanged)
        if delta is not None:
            for name, count in asdict(delta.changes).items():
                setattr(summary, name, count)
        reindex = gen is not None and any(gen.meta.flat()[k] != v for k, v in asked_index.items())
        moved_model = {"weights": weights} if repointed else {}
        if delta is not None:
            meta = delta.meta.with_flat(**asked_index, **moved_model)
            summary.published = w.publish(Change(meta, delta.append, delta.delete, delta.failures,
                                                 reindex or compact), compact=compact or None)
        elif gen is not None and compact:
            summary.published = w.publish(Change(gen.meta.with_flat(**asked_index, **moved_model),
                                                 failures=gen.failures, reindex=True), compact=True)
        elif gen is not None and (repointed or reindex or gen.manifest is None or dropped or w.rebuilt or
                                  not gen.index_intact(full=repair)):
            # a moved onnx model (its new place), another index asked for, a store written before segments
            # (upgraded: its rows copied, nothing embedded) or an index file lost (or, with --repair, damaged:
            # a publish checks every part it keeps, so any update that changes rows mends a damaged one too)
            if not (repointed or reindex or gen.manifest is None or dropped or w.rebuilt):
                log.warning("the index of %s is missing or damaged; writing it anew from the store", store)
            meta = gen.meta.with_flat(**asked_index, **moved_model)
            summary.published = w.publish(Change(meta, failures=gen.failures, reindex=reindex))
        summary.wrote = summary.published is not None
        # also a checkpoint left by a run killed after publishing: its work is in the store now
        files.remove_work()
        summary.total = summary.published.count if summary.published is not None else (
            len(gen) if gen is not None else 0)
    summary.seconds = time.perf_counter() - t0
    return summary


def update_index(roots: Sequence[str | os.PathLike[str]], store: str | os.PathLike[str],
                 options: IndexOptions | None = None, *, progress: Progress | None = None,
                 embedder: Embedder | None = None, **fields: object) -> RunSummary:
    """Incrementally update an existing store (see build_index); refuses when the store does not exist."""
    return build_index(roots, store, replace(options_of(options, fields), require_existing=True), progress=progress,
                       embedder=embedder)


def _itself(emb: Embedder) -> Embedder:
    """An injected embedder as its own factory (Ray actors get a pickled copy)."""
    return emb


def _same_preprocess(asked: str, stored: str) -> bool:
    """True when the --preprocess asked for is the store's (unnamed input/output taking the store's names)."""
    from ..embed.onnx_runtime import OnnxPreprocess

    a, s = OnnxPreprocess.parse(asked), OnnxPreprocess.parse(stored)
    return replace(a, input=a.input or s.input, output=a.output or s.output) == s


def _repoint(meta: StoreMeta, path: str, store: Path) -> bool:
    """Whether `path` holds the very model an onnx store was made with (its new place is then recorded)."""
    if not Path(path).is_file():
        raise InputError(f"ONNX model not found: {path}")
    if "sha256:" + file_sha256(path)[:16] != meta.model.weights_fingerprint:
        raise StoreMismatchError(f"{store} was made with another model file (fingerprint "
                                 f"{meta.model.weights_fingerprint}) than {path}")
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


def _check_repair(dropped: list[DroppedSegment], found: Scan,
                  drop_missing: bool) -> list[Repaired]:
    """What a repair will bring back of each damaged segment whose paths read true: its photos found under the
    folders given, those deleted from disk since, and those still on disk elsewhere. The last would be lost:
    refused (InputError, before anything is read or written) unless `drop_missing`."""
    here = {f.rel for f in found.files}
    out = []
    for d in dropped:
        seg, why, paths = d.segment, d.why, d.paths
        if paths is None:  # known by their content only: checked once the files found are hashed
            out.append(Repaired(seg.name, seg.rows, why))
            continue
        lost = [p for p in paths if p not in here]
        gone = sum(found.gone(p) for p in lost)
        outside = [p for p in lost if not found.gone(p)]
        if outside and not drop_missing:
            raise InputError(f"damaged segment {seg.name} holds {len(outside)} photos outside the folders given "
                             f"(e.g. {outside[0]}): give every folder the store indexes, so that they are "
                             f"indexed again (or --drop-missing to drop them)")
        out.append(Repaired(seg.name, seg.rows, why, seg.rows - len(lost), gone, outside))
    return out


def _check_repair_contents(repaired: list[Repaired], dropped: list[DroppedSegment],
                           files: StoreFiles, hashes: dict[str, str], old: Catalog | None,
                           drop_missing: bool) -> None:
    """For each damaged segment whose paths cannot be read: its photos found again by their content (the files
    hashed in this run, or rows the store keeps), filled into `repaired`. Photos not found are refused
    (InputError, nothing written; the embeddings of this run stay in its checkpoint) unless `drop_missing`.
    Where the content hashes cannot be read either, only a shortfall in the count of new photos can show."""
    have = set(hashes.values()) | (set(old.sha256) if old is not None else set())
    by_name = {r.name: r for r in repaired}
    for d in dropped:
        seg = d.segment
        if d.paths is not None:
            continue
        rep = by_name[seg.name]
        contents = segment_contents(files, seg)
        if contents is None:
            short = seg.rows - len(set(hashes.values()) - (set(old.sha256) if old is not None else set()))
            if short > 0 and not drop_missing:
                raise InputError(f"damaged segment {seg.name} held {seg.rows} photos, and neither its paths nor their "
                                 f"content can be read: only {seg.rows - short} new photos were found under the "
                                 f"folders given; give every folder the store indexes (or --drop-missing to drop "
                                 f"what is not found)")
            continue
        lost = [f"id {i} (content sha256 {sha[:12]}…)" for i, sha in contents if sha not in have]
        if lost and not drop_missing:
            raise InputError(f"damaged segment {seg.name} cannot say its paths, and {len(lost)} of its {seg.rows} "
                             f"photos were not found under the folders given (by content; moved, deleted or in a "
                             f"folder not given): {', '.join(lost[:3])}{', …' if len(lost) > 3 else ''}; nothing "
                             f"was written: give every folder the store indexes (or --drop-missing to drop them)")
        rep.found, rep.missing = seg.rows - len(lost), lost


def _writable(store: str | os.PathLike[str]) -> StoreFiles:
    """The files of a store about to be written; refuses a folder or a missing parent before any file is made."""
    files = StoreFiles.resolved(store)
    if files.store.is_dir():
        raise InputError(f"{store} is a folder; give the store's file name (e.g. {Path(store) / DEFAULTS.store})")
    check_output_path(files.store)
    return files

