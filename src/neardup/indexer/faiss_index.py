"""Indexing stage 7, faiss_index: the FAISS inner-product index over L2-normalized vectors (so scores are cosines)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import faiss
import numpy as np

from dataclasses import replace

from ..errors import InputError, StoreError
from ..fileio import atomic_write, file_sha256
from . import index_kinds
from .files import StoreFiles
from .store import Catalog, StoreMeta, read_catalog

log = logging.getLogger(__name__)


def build_flat_index(xb: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """Exact inner-product index with the store's ids: IndexIDMap2 over IndexFlatIP."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(xb.shape[1]))
    if len(xb):
        index.add_with_ids(xb, np.ascontiguousarray(ids, dtype=np.int64))
    return index


def derived_index(meta: StoreMeta, xb: np.ndarray, ids: np.ndarray) -> tuple[faiss.Index, StoreMeta]:
    """The index the store asks for (meta.index_kind, its memory budget and target recall) over xb, and the
    meta recording what was built: an approximate one trained, tuned to the target and its recall measured."""
    choice = index_kinds.plan(meta.index_kind, len(xb), xb.shape[1], meta.index_memory or None)
    if choice.exact:
        return build_flat_index(xb, ids), replace(meta, index_factory="Flat", index_params="", index_recall=1.0,
                                                  index_recall_queries=0)
    try:
        index = index_kinds.build(xb, ids, choice.factory)
    except (InputError, RuntimeError) as exc:  # too few vectors to train it yet: exact until there are enough
        log.warning("index %s cannot be trained on %d vectors (%s); the store keeps an exact index until an update "
                    "has enough", choice.factory, len(xb), " ".join(str(exc).split())[:200])
        return build_flat_index(xb, ids), replace(meta, index_factory="Flat", index_params="", index_recall=1.0,
                                                  index_recall_queries=0)
    got = index_kinds.tune(index, xb, ids, target=meta.index_target)
    log.info("index %s (%s): recall@%d %.3f at %s, measured on %d store vectors in %.1f s", choice.factory,
             choice.reason, index_kinds.RECALL_K, got.recall, got.params or "its defaults", got.queries,
             got.build_seconds)
    return index, replace(meta, index_factory=choice.factory, index_params=got.params, index_recall=got.recall,
                          index_recall_queries=got.queries)


#: Below this many queries FAISS scans the flat index without BLAS; that scan is memory-bound, and more
#: OpenMP threads only contend for the bandwidth (measured at 50k x 2048: 15 ms with 1 thread, 24 ms with 2).
SMALL_BATCH = 20


def search(index: faiss.Index, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k-NN search: D float32 [nq, k] cosine scores (descending), I int64 [nq, k] ids (-1 when fewer)."""
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    k = max(1, min(int(k), max(index.ntotal, 1)))
    if len(xq) >= SMALL_BATCH:
        return index.search(xq, k)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(xq, k)
    finally:
        faiss.omp_set_num_threads(threads)


def index_ids(index: faiss.Index) -> np.ndarray:
    """The ids held by an IndexIDMap(2)."""
    return faiss.vector_to_array(index.id_map).astype(np.int64)


def save_index(index: faiss.Index, path: str | os.PathLike[str]) -> str:
    """Write `index` to `path` atomically; returns the file's SHA-256 (the store records it)."""
    digest = ""

    def write(tmp: str) -> None:
        nonlocal digest
        faiss.write_index(index, tmp)
        digest = file_sha256(tmp)

    atomic_write(Path(path), write)
    return digest


def index_intact(store: str | os.PathLike[str], cat: Catalog) -> bool:
    """True when the index file the store names exists and has the digest the store recorded for it."""
    if not cat.meta.index_file:
        return False
    path = StoreFiles(Path(store)).index(cat.meta.index_file)
    try:
        return not cat.meta.index_sha256 or file_sha256(path) == cat.meta.index_sha256
    except OSError:
        return False


def _saved_index(store: Path, cat: Catalog) -> faiss.Index | None:
    if not cat.meta.index_file:
        return None
    path = StoreFiles(store).index(cat.meta.index_file)
    try:
        # The digest is checked before FAISS parses the file: a flipped byte in a vector still parses.
        if cat.meta.index_sha256 and file_sha256(path) != cat.meta.index_sha256:
            log.warning("index %s does not match the digest its store recorded (damaged); rebuilding it from "
                        "the store (`neardup update` writes a fresh one)", path)
            return None
        index = faiss.read_index(str(path))
    except (OSError, RuntimeError):
        log.info("index %s unavailable; rebuilding it from the store", path)
        return None
    if index.ntotal == len(cat) and np.array_equal(index_ids(index), cat.ids):
        index_kinds.apply_params(index, cat.meta.index_params)  # FAISS does not save nprobe with the index
        return index
    log.warning("index %s does not match the store; rebuilding it from the store", path)
    return None


def load_saved_index(store: str | os.PathLike[str], cat: Catalog) -> faiss.Index | None:
    """The store's saved index with its search knob set, when it is intact and matches `cat`; else None."""
    return _saved_index(Path(store), cat)


def open_index(store: str | os.PathLike[str]) -> tuple[Catalog, faiss.Index]:
    """The store's rows (without vectors) and its FAISS index.

    Uses the saved index when it matches the store's ids, else rebuilds one from the store's vectors. A
    writer may replace the store and remove the old index between our reads; the rebuild reads the store
    once more, so the rows and the index always come from the same published store.
    """
    cat = read_catalog(store, vectors=False)
    index = _saved_index(Path(store), cat)
    if index is None:  # exact, whatever kind the store asks for: training one here would take minutes
        cat = read_catalog(store, vectors=True)
        index = build_flat_index(cat.xb, cat.ids)
        cat.xb = None
    return cat, index


def check_store(store: str | os.PathLike[str]) -> list[str]:
    """Read every row of a store (each checksum verified) and check its index file's digest.

    Raises StoreError, with how to recover, when the store itself is damaged. Returns the problems that leave
    the data intact (an index file missing or damaged: readers rebuild it in memory, `neardup update` rewrites
    it); an empty list means healthy.
    """
    cat = read_catalog(store, vectors=True, local=True)
    problems = []
    if not cat.meta.index_file:
        problems.append("no index file yet; `neardup update` writes one (queries build it in memory meanwhile)")
    elif not index_intact(store, cat):
        problems.append(f"index {cat.meta.index_file} is missing or does not match its digest; `neardup update` "
                        f"rewrites it (queries rebuild it from the store meanwhile)")
    if cat.meta.quantized_file and not StoreFiles.resolved(store).index(cat.meta.quantized_file).is_file():
        problems.append(f"its int8 model {cat.meta.quantized_file} is missing: nothing can be embedded for it "
                        f"(rebuild the store with --precision int8)")
    if not cat.meta.index_sha256:
        problems.append("written before neardup recorded checksums; `neardup update` rewrites it with them")
    previous = StoreFiles.resolved(store).previous
    if previous.exists():
        try:
            read_catalog(previous, vectors=True, local=True)
        except StoreError as exc:
            problems.append(f"the previous generation {previous} is damaged ({getattr(exc, 'reason', exc)}); "
                            f"it cannot be restored (the next update replaces it)")
    return problems
