"""Store, faiss_index: the FAISS inner-product index over L2-normalized vectors (so scores are cosines).

Pure: vectors and ids in, an index out (and its bytes). The store keeps an exact index as nothing at all
(it is the stored vectors, searched in memory); an IVF index as one part per segment, merged when loaded
(FAISS merges IVF lists of one training); other kinds (HNSW) as one whole file.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from ..errors import InputError
from ..fileio import atomic_write, ensure_space
from ..threads import one_thread
from . import index_kinds

log = logging.getLogger(__name__)


def build_flat_index(xb: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """Exact inner-product index with the store's ids: IndexIDMap2 over IndexFlatIP."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(xb.shape[1]))
    if len(xb):
        index.add_with_ids(xb, np.ascontiguousarray(ids, dtype=np.int64))
    return index


@dataclass(frozen=True)
class BuiltIndex:
    """What building the index a store asks for made and measured (recorded in its meta)."""

    factory: str  #: "Flat" or the FAISS factory string trained
    params: str = ""  #: the tuned search knob ("nprobe=16")
    recall: float = 1.0  #: recall@10 against exact search at those params
    queries: int = 0  #: held-out store vectors it was measured with


EXACT = BuiltIndex("Flat")


def derived_index(kind: str, memory: int, target: float, xb: np.ndarray,
                  ids: np.ndarray) -> tuple[faiss.Index, BuiltIndex]:
    """The index `kind` (flat, auto, ivf, hnsw or a factory string) asks for over xb under `memory` bytes (0:
    none): an approximate one trained, tuned to recall@10 `target` and measured; what was built."""
    choice = index_kinds.plan(kind, len(xb), xb.shape[1], memory or None)
    if choice.exact:
        return build_flat_index(xb, ids), EXACT
    try:
        index = index_kinds.build(xb, ids, choice.factory)
    except (InputError, RuntimeError) as exc:  # too few vectors to train it yet: exact until there are enough
        log.warning("index %s cannot be trained on %d vectors (%s); the store keeps an exact index until an update "
                    "has enough", choice.factory, len(xb), " ".join(str(exc).split())[:200])
        return build_flat_index(xb, ids), EXACT
    got = index_kinds.tune(index, xb, ids, target=target)
    log.info("index %s (%s): recall@%d %.3f at %s, measured on %d store vectors in %.1f s", choice.factory,
             choice.reason, index_kinds.RECALL_K, got.recall, got.params or "its defaults", got.queries,
             got.build_seconds)
    return index, BuiltIndex(choice.factory, got.params, got.recall, got.queries)


def mergeable(index: faiss.Index) -> bool:
    """Whether parts of this kind of index, trained once, can be built apart and merged (IVF lists can; an
    HNSW graph cannot)."""
    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False


def template_of(index: faiss.Index) -> faiss.Index:
    """An empty copy of a trained index (its training kept): new segments' parts are added to copies of it."""
    empty = faiss.clone_index(index)
    empty.reset()
    return empty


def part(template: faiss.Index, xb: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """A segment's part of an approximate index: `template`'s training with the segment's vectors."""
    return index_kinds.add(faiss.clone_index(template), xb, ids)


def merged(parts: list[tuple[faiss.Index, np.ndarray]]) -> faiss.Index:
    """One index from segment parts, each without its `dead` ids (rows deleted since it was written)."""
    base = None
    for index, dead in parts:
        if len(dead):
            index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(dead, np.int64)))
        if base is None:
            base = index
        else:
            base.merge_from(index, 0)
    if base is None:
        raise ValueError("an index is merged from one part at least")
    return base


#: Below this many queries FAISS scans the flat index without BLAS; that scan is memory-bound, and more
#: OpenMP threads only contend for the bandwidth (measured slower with 2 threads than with 1: RESULTS.md).
SMALL_BATCH = 20


def search(index: faiss.Index, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k-NN search: D float32 [nq, k] cosine scores (descending), I int64 [nq, k] ids (-1 when fewer)."""
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    k = max(1, min(int(k), max(index.ntotal, 1)))
    if len(xq) >= SMALL_BATCH:
        return index.search(xq, k)
    with one_thread():
        return index.search(xq, k)


def id_lookup(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids, their rows): rows_for(lookup, I) is then one searchsorted, not a dict built per query."""
    ids = np.asarray(ids, np.int64)
    order = np.argsort(ids, kind="stable")
    return ids[order], order


def rows_for(lookup: tuple[np.ndarray, np.ndarray], ids: np.ndarray | Sequence[int]) -> np.ndarray:
    """Rows of `ids` (any shape; FAISS's I) through an id_lookup; -1 for an id not there (and for -1)."""
    ids = np.asarray(ids, np.int64)
    sorted_ids, order = lookup
    if not len(order):
        return np.full(ids.shape, -1, np.int64)
    at = np.clip(np.searchsorted(sorted_ids, ids), 0, len(order) - 1)
    return np.where(sorted_ids[at] == ids, order[at], -1)


def index_ids(index: faiss.Index) -> np.ndarray:
    """The ids an index holds: an IndexIDMap(2)'s map, or the ids in an IVF index's lists."""
    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    inv = faiss.extract_index_ivf(index).invlists
    assert inv is not None  # an IVF index owns its lists
    parts = [faiss.rev_swig_ptr(inv.get_ids(k), inv.list_size(k)).copy() for k in range(inv.nlist)
             if inv.list_size(k)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def save_index(index: faiss.Index, path: str | os.PathLike[str]) -> str:
    """Write `index` to `path` atomically; returns the file's SHA-256 (the manifest records it). The bytes are
    made in memory and written by Python, so a full disk is an OSError, never a failure inside FAISS."""
    data = faiss.serialize_index(index).tobytes()
    ensure_space(Path(path), len(data))
    atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(data))
    return hashlib.sha256(data).hexdigest()


def index_from_bytes(data: bytes) -> faiss.Index:
    """An index read from its file's bytes (read once, checked against their digest, then parsed)."""
    return faiss.deserialize_index(np.frombuffer(data, np.uint8))
