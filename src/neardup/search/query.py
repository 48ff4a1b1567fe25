"""Search stage 1, query: find the catalogue images nearest to new photos, with the store's own model."""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..config import DEFAULTS
from ..errors import InputError
from ..indexer.discover import discover
from ..indexer.embed import Embedder
from ..indexer.models import make_embedder
from ..indexer.faiss_index import open_index, search
from ..indexer.pipeline import embed_files
from ..indexer.local_features import LocalFeatures
from ..indexer.store import Catalog, read_meta, store_embedder
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

    def found(self, threshold: float) -> bool:
        """Whether the photo is in the catalogue: a verified match when verified (or, for a photo too plain to
        judge, verified None, one >= threshold), else a match >= threshold."""
        if self.verified:
            return any(m.verified or (m.verified is None and m.score >= threshold) for m in self.matches)
        best = self.best()
        return best is not None and best >= threshold


def id_lookup(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids, their rows): rows_of(I) is then one searchsorted, not a dict built per query."""
    order = np.argsort(ids, kind="stable")
    return ids[order], order


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


class Searcher:
    """A store opened for repeated queries: rows, FAISS index and embedder stay loaded (warm process)."""

    def __init__(self, store: str | os.PathLike[str], *, weights: str | None = None,
                 precision: str = DEFAULTS.precision, embedder: Embedder | None = None,
                 runtime: str | None = None) -> None:
        self.store = Path(store)
        self.meta = read_meta(self.store)
        self.embedder = store_embedder(self.meta, self.store, weights=weights, precision=precision,
                                       embedder=embedder, runtime=runtime)
        self.cat, self.index = open_index(self.store)
        self._lookup = id_lookup(self.cat.ids)

    def search(self, xq: np.ndarray, k: int = DEFAULTS.k) -> list[list[Match]]:
        """k nearest catalogue images of each row of xq (unit vectors from this store's embedder)."""
        if len(xq) == 0:
            return []
        D, I = search(self.index, xq, k)
        return neighbours(D, I, self.cat, self._lookup)

    def verify(self, matches: list[Match], feats: LocalFeatures | None) -> list[Match]:
        """Geometrically verify one query's matches (its local features `feats`) and re-rank them: verified
        first, then by shared inliers, then by score (verify.rerank)."""
        if not matches:
            return matches
        sorted_ids, order = self._lookup
        rows = order[np.searchsorted(sorted_ids, np.array([m.id for m in matches], np.int64))]
        v = verify_pairs([feats] * len(matches), row_features(self.store, self.cat, rows), workers=1)
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
