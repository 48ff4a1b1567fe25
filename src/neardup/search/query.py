"""Search stage 1, query: find the catalogue images nearest to new photos, with the store's own model."""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..config import DEFAULTS
from ..errors import InputError, StoreError
from ..indexer.discover import discover
from ..indexer.embed import Embedder
from ..indexer.models import make_embedder
from ..indexer.faiss_index import open_index, search
from ..indexer.pipeline import embed_files
from ..indexer.local_features import LocalFeatures
from ..indexer.store import Catalog, StoreMeta, open_pinned, read_meta, read_vectors, store_embedder
from .verify import rerank, resolve_verify, row_features, verify_pairs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Match:
    """One neighbour of a query photo."""

    rank: int
    score: float  #: cosine similarity
    id: int
    path: str  #: as stored, relative to the store's folder
    verified: bool | None = None  #: the geometric verdict (None: not verified)
    inliers: int | None = None  #: RANSAC inliers of the verification


@dataclass
class QueryResult:
    """The neighbours of one query photo, or why it could not be queried."""

    query: str
    matches: list[Match] = field(default_factory=list)
    error: str | None = None
    verified: bool = False  #: the matches were geometrically verified (and re-ranked)

    def best(self) -> float | None:
        """Highest score, or None without matches."""
        return max(m.score for m in self.matches) if self.matches else None

    def is_match(self, m: Match, threshold: float) -> bool:
        """Whether neighbour `m` is this photo again: its verdict when verified (a photo too plain to judge,
        verified None, and unverified results compare the score with `threshold`)."""
        if self.verified and m.verified is not None:
            return m.verified
        return m.score >= threshold

    def found(self, threshold: float) -> bool:
        """Whether the photo is in the catalogue: one of its neighbours is a match (is_match)."""
        return any(self.is_match(m, threshold) for m in self.matches)


def id_lookup(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids, their rows): rows_of(I) is then one searchsorted, not a dict built per query."""
    order = np.argsort(ids, kind="stable")
    return ids[order], order


def rows_for(lookup: tuple[np.ndarray, np.ndarray], ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Rows of catalogue `ids` (any shape) through an id_lookup; -1 for an id not there (and for -1)."""
    ids = np.asarray(ids, np.int64)
    sorted_ids, order = lookup
    if not len(order):
        return np.full(ids.shape, -1, np.int64)
    at = np.clip(np.searchsorted(sorted_ids, ids), 0, len(order) - 1)
    return np.where(sorted_ids[at] == ids, order[at], -1)


def neighbours(D: np.ndarray, I: np.ndarray, cat: Catalog,
               lookup: tuple[np.ndarray, np.ndarray] | None = None) -> list[list[Match]]:
    """Turn FAISS (D, I) rows into Match lists, dropping the -1 padding of short results."""
    sorted_ids, order = lookup or id_lookup(cat.ids)
    rows = order[np.clip(np.searchsorted(sorted_ids, I), 0, max(len(order) - 1, 0))] if len(order) else I
    out = []
    for drow, irow, rrow in zip(D.tolist(), I.tolist(), np.atleast_2d(rows).tolist()):
        out.append([Match(rank=k + 1, score=s, id=i, path=cat.paths[r])
                    for k, (s, i, r) in enumerate(zip(drow, irow, rrow)) if i >= 0])
    return out


def generation_of(meta: StoreMeta) -> str:
    """A published store's generation: the 12 hex digits of the index file it names (new at every publish),
    else a digest of its update time and size."""
    token = meta.index_file.rsplit(".", 2)[-2] if meta.index_file.count(".") >= 2 else ""
    if len(token) == 12:
        return token
    return hashlib.sha256(f"{meta.updated}/{meta.count}/{meta.next_id}".encode()).hexdigest()[:12]


class Searcher:
    """A store opened for repeated queries: rows, FAISS index and embedder stay loaded (warm process).

    With `pinned`, the store file stays open (store.open_pinned), and the rows, the index and the local
    features all come from that one generation, also after a writer publishes the next (serve reloads then
    opens a new Searcher beside this one); `close()` releases it. `embedder` may be a previous generation's
    (checked against this store's model and weights). `local_cache_rows` keeps the local features of that many
    recently verified catalogue rows in memory (~18 kB each)."""

    def __init__(self, store: str | os.PathLike[str], *, weights: str | None = None,
                 precision: str = DEFAULTS.precision, embedder: Embedder | None = None,
                 runtime: str | None = None, pinned: bool = False, local_cache_rows: int = 0) -> None:
        self.store = Path(store)
        # Local features of catalogue rows kept after verification reads them (a warm service): reading a
        # query's 10 candidate rows from the store took ~5 ms, their matching ~7 ms (grocery photos, 2 cores).
        self.local_cache_rows, self.cache_hits, self.cache_misses = local_cache_rows, 0, 0
        self._local_cache: OrderedDict[int, LocalFeatures] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.pinned = None
        for _ in range(5):  # a writer may publish between our reads: read until all come from one generation
            self.pinned = open_pinned(self.store) if pinned else None
            self.meta = read_meta(self.pinned or self.store)
            self.cat, self.index = open_index(self.store)
            if not pinned or self.cat.meta == self.meta:
                break
            self.pinned.close()
        else:
            raise StoreError(f"{self.store} changed during each of 5 reads; is a writer publishing in a loop?")
        self.embedder = store_embedder(self.meta, self.store, weights=weights, precision=precision,
                                       embedder=embedder, runtime=runtime)
        self._lookup = id_lookup(self.cat.ids)
        self.generation = generation_of(self.meta)

    def _row_features(self, rows: np.ndarray) -> list[LocalFeatures | None]:
        """row_features, through the LRU cache of the last `local_cache_rows` rows read (when kept)."""
        if not self.local_cache_rows:
            return row_features(self.store, self.cat, rows, pinned=self.pinned)
        with self._cache_lock:
            got = {r: self._local_cache.get(r) for r in rows.tolist()}
            missing = [r for r, f in got.items() if f is None]
            for r in got.keys() - set(missing):
                self._local_cache.move_to_end(r)
            self.cache_hits += len(got) - len(missing)
            self.cache_misses += len(missing)
        if missing:
            got.update(zip(missing, row_features(self.store, self.cat, np.array(missing), pinned=self.pinned)))
            with self._cache_lock:
                self._local_cache.update((r, got[r]) for r in missing if got[r] is not None)
                while len(self._local_cache) > self.local_cache_rows:
                    self._local_cache.popitem(last=False)
        return [got[r] for r in rows.tolist()]

    def cache_info(self) -> dict[str, int]:
        """The local-features cache: rows held, hits and misses."""
        return {"rows": len(self._local_cache), "hits": self.cache_hits, "misses": self.cache_misses}

    def close(self) -> None:
        """Release a pinned store file (the embedder and index are freed with the object)."""
        if self.pinned is not None:
            self.pinned.close()
            self.pinned = None

    def rows_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows of catalogue `ids`; -1 for an id not in this generation."""
        return rows_for(self._lookup, ids)

    def search(self, xq: np.ndarray, k: int = DEFAULTS.k) -> list[list[Match]]:
        """k nearest catalogue images of each row of xq (unit vectors from this store's embedder)."""
        if len(xq) == 0:
            return []
        return self.neighbours(*self.knn(xq, k))

    def knn(self, xq: np.ndarray, k: int = DEFAULTS.k) -> tuple[np.ndarray, np.ndarray]:
        """FAISS (D, I) of xq in this store's index; on an approximate index (SQ, PQ, PCA codes) the scores are
        re-computed exactly from the stored vectors."""
        D, I = search(self.index, xq, k)
        return self._rescored(xq, I) if self.meta.index_factory != "Flat" else (D, I)

    def _rescored(self, xq: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosines of the found ids from the stored vectors, each row re-sorted by them (so a threshold
        means the same whatever the index's codes)."""
        rows = self.rows_of(I.ravel()).reshape(I.shape)
        ok = rows >= 0
        uniq, inverse = np.unique(rows[ok], return_inverse=True)
        D = np.full(I.shape, -np.inf, np.float32)
        if len(uniq):
            xb = read_vectors(self.pinned or self.store, uniq, self.meta.index_file)
            D[ok] = np.einsum("ij,ij->i", np.repeat(xq, ok.sum(1), axis=0), xb[inverse])
        order = np.argsort(-D, axis=1, kind="stable")
        I = np.where(ok, I, -1)
        return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)

    def neighbours(self, D: np.ndarray, I: np.ndarray) -> list[list[Match]]:
        """FAISS results (D, I) of this store's index as Match lists."""
        return neighbours(D, I, self.cat, self._lookup)

    def verify(self, matches: list[Match], feats: LocalFeatures | None) -> list[Match]:
        """Geometrically verify one query's matches (its local features `feats`) and re-rank them: verified
        first, then by shared inliers, then by score (verify.rerank)."""
        if not matches:
            return matches
        rows = self.rows_of([m.id for m in matches])
        v = verify_pairs([feats] * len(matches), self._row_features(rows), workers=1)
        ranked = rerank(np.array([m.score for m in matches]), v)
        # a photo too plain to judge: verified None (the global threshold decides, see QueryResult.found)
        return [replace(matches[i], rank=r + 1, verified=bool(v.verified[i]) if v.judged[i] else None,
                        inliers=int(v.inliers[i]) if v.judged[i] else None)
                for r, i in enumerate(ranked.tolist())]

    def query(self, images: Sequence[str | os.PathLike[str]], k: int = DEFAULTS.k,
              batch_size: int = DEFAULTS.batch_size, max_file_bytes: int = DEFAULTS.max_file_bytes,
              verify: bool | None = None) -> list[QueryResult]:
        """Query image files (folders are expanded); undecodable, non-regular and too large files come back
        with an error. With `verify` (None: resolve_verify), each query's top k are geometrically verified and
        re-ranked."""
        if k < 1:
            raise InputError("k must be at least 1")
        verify = resolve_verify(verify, self.meta.local_features)
        paths = [str(p) for p in discover(images)]
        # a store with local features decoded its photos at their size: decode queries the same way
        local = verify or bool(self.meta.local_features)
        got = embed_files(paths, self.embedder, batch_size=batch_size, max_bytes=max_file_bytes, local=local)
        found = self.search(got.xq, k)
        if verify:
            found = [self.verify(m, f) for m, f in zip(found, got.local)]
        results = {p: QueryResult(p, m, verified=verify) for p, m in zip(got.paths, found)}
        results.update({p: QueryResult(p, error=why) for p, why in got.failures})
        return [results[p] for p in paths]


def query(store: str | os.PathLike[str], images: Sequence[str | os.PathLike[str]], *, k: int = DEFAULTS.k,
          weights: str | None = None, precision: str = DEFAULTS.precision, embedder: Embedder | None = None,
          batch_size: int = DEFAULTS.batch_size, max_file_bytes: int = DEFAULTS.max_file_bytes,
          runtime: str | None = None, verify: bool | None = None) -> list[QueryResult]:
    """Top-k catalogue matches of each query image, searched with the store's own model and weights
    (`runtime` may be either: TensorFlow and ONNX Runtime vectors are interchangeable); with `verify`,
    geometrically verified and re-ranked."""
    searcher = Searcher(store, weights=weights, precision=precision, embedder=embedder, runtime=runtime)
    return searcher.query(images, k, batch_size, max_file_bytes, verify=verify)


def has_match(results: Sequence[QueryResult], threshold: float) -> bool:
    """True when any query is found in the catalogue (QueryResult.found; the CLI's exit status 0)."""
    return any(r.found(threshold) for r in results)


def compare(a: str | os.PathLike[str], b: str | os.PathLike[str], *, model: str = DEFAULTS.model,
            weights: str = DEFAULTS.weights, precision: str = DEFAULTS.precision,
            embedder: Embedder | None = None, runtime: str | None = None) -> float:
    """Cosine similarity of two image files under one model."""
    emb = embedder or make_embedder(model, weights, precision, runtime=runtime)
    got = embed_files([a, b], emb, batch_size=2)
    if got.failures:
        path, why = got.failures[0]
        raise InputError(f"{path}: {why}")
    return float(got.xq[0] @ got.xq[1])
