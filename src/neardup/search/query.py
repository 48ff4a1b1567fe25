"""Search stage 1, query: find the catalogue images nearest to new photos, with the store's own model."""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..config import DEFAULTS
from ..embed.discover import discover
from ..embed.embedders import Embedder
from ..embed.models import make_embedder
from ..embed.pipeline import embed_files
from ..errors import InputError
from ..features import LocalFeatures
from ..progress import Progress, stage_of
from ..store.faiss_index import search
from ..store.generation import Generation
from ..store_embedder import store_embedder
from .review import DecisionCache
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
    decision: str | None = None  #: a person's decision on this photo and the query photo (None: not reviewed)
    keeper: bool | None = None  #: with a duplicate decision naming a keeper: whether it is this match


@dataclass
class QueryResult:
    """The neighbours of one query photo, or why it could not be queried."""

    query: str
    matches: list[Match] = field(default_factory=list)
    error: str | None = None
    verified: bool = False  #: the matches were geometrically verified (and re-ranked)
    threshold: float | None = None  #: the match threshold it was answered with (Generation.threshold)

    def best(self) -> float | None:
        """Highest score, or None without matches."""
        return max(m.score for m in self.matches) if self.matches else None

    def is_match(self, m: Match, threshold: float | None = None) -> bool:
        """Whether neighbour `m` is this photo again: its verdict when verified (a photo too plain to judge,
        verified None, and unverified results compare the score with the threshold)."""
        if self.verified and m.verified is not None:
            return m.verified
        t = self.threshold if threshold is None else threshold
        if t is None:
            raise ValueError("a result without a threshold needs one")
        return m.score >= t

    def found(self, threshold: float | None = None) -> bool:
        """Whether the photo is in the catalogue: one of its neighbours is a match (is_match)."""
        return any(self.is_match(m, threshold) for m in self.matches)

    def first_match(self, threshold: float | None = None) -> Match | None:
        """The best-ranked neighbour that is a match (is_match), None when the photo is new."""
        return next((m for m in self.matches if self.is_match(m, threshold)), None)

    def to_json(self, threshold: float) -> dict:
        """One photo of Answer.to_json: its name ("query"), error, verdict ("found") and matches, each with its
        own verdict ("match")."""
        return {"query": self.query, "error": self.error, "found": None if self.error else self.found(threshold),
                "matches": [{"rank": m.rank, "id": m.id, "path": m.path, "score": round(m.score, 6),
                             "verified": m.verified, "inliers": m.inliers, "match": self.is_match(m, threshold),
                             "decision": m.decision, "keeper": m.keeper}
                            for m in self.matches]}

    @classmethod
    def from_json(cls, doc: dict, threshold: float, verified: bool) -> QueryResult:
        """The result `to_json` wrote (the verdicts are recomputed from the matches, not read)."""
        matches = [Match(rank=int(m["rank"]), score=float(m["score"]), id=int(m["id"]), path=str(m["path"]),
                         verified=m["verified"], inliers=m["inliers"], decision=m.get("decision"),
                         keeper=m.get("keeper")) for m in doc.get("matches", [])]
        return cls(str(doc["query"]), matches, error=doc.get("error"), verified=verified and not doc.get("error"),
                   threshold=threshold)


@dataclass
class Answer:
    """What a look-up gets, from the CLI or the service: a result per photo, all from one generation."""

    store: str
    generation: str
    count: int  #: photos in that generation
    model: str
    threshold: float
    verified: bool
    results: list[QueryResult]
    weights: str = ""  #: the store's weights spec ("none": seeded random weights, scores show only plumbing)

    def to_json(self) -> dict:
        """The one JSON form of an answer: the body of POST /v1/query, and `neardup query --json` (which adds
        where it asked). Each result is QueryResult.to_json."""
        return {"store": self.store, "generation": self.generation, "count": self.count, "model": self.model,
                "weights": self.weights, "threshold": self.threshold, "verified": self.verified,
                "results": [r.to_json(self.threshold) for r in self.results]}

    @classmethod
    def from_json(cls, doc: dict) -> Answer:
        """The answer `to_json` wrote (the client reads the service's this way)."""
        t, verified = float(doc["threshold"]), bool(doc["verified"])
        return cls(str(doc.get("store", "")), str(doc["generation"]), int(doc["count"]), str(doc["model"]), t,
                   verified, [QueryResult.from_json(r, t, verified) for r in doc["results"]],
                   str(doc.get("weights", "")))


def neighbours(D: np.ndarray, I: np.ndarray, paths: list[str], rows: np.ndarray) -> list[list[Match]]:
    """Turn FAISS (D, I) rows into Match lists (`rows`: the catalogue rows of I), dropping the -1 padding."""
    out = []
    for drow, irow, rrow in zip(D.tolist(), I.tolist(), np.atleast_2d(rows).tolist()):
        out.append([Match(rank=k + 1, score=s, id=i, path=paths[r])
                    for k, (s, i, r) in enumerate(zip(drow, irow, rrow)) if i >= 0 and r >= 0])
    return out


class Searcher:
    """A store generation opened for repeated queries: its rows, FAISS index and embedder stay loaded (a warm
    process), and every answer comes from that one generation, also after a writer publishes the next (serve
    then opens a new Searcher beside this one). The one query pipeline of the CLI and the service:
    decode → `embed_knn` (the service batches it across requests) → `results` (neighbours, verification, the
    threshold). `embedder` may be a previous generation's (checked against this store's model and weights).
    `local_cache_rows` keeps the local features of that many recently verified catalogue rows (~18 kB each)."""

    def __init__(self, gen: Generation, *, weights: str | None = None, precision: str = DEFAULTS.precision,
                 embedder: Embedder | None = None, runtime: str | None = None, local_cache_rows: int = 0,
                 owns: bool = False) -> None:
        self.gen, self._owns = gen, owns
        self.meta, self.generation = gen.meta, gen.id
        # Local features of catalogue rows kept after verification reads them (a warm service): reading a
        # query's 10 candidate rows from the store took ~5 ms, their matching ~7 ms (grocery photos, 2 cores).
        self.local_cache_rows, self.cache_hits, self.cache_misses = local_cache_rows, 0, 0
        self._local_cache: OrderedDict[int, LocalFeatures] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.decisions = DecisionCache(gen.files.store)  # marks matches a person reviewed with the query photo
        try:
            self.cat, self.index = gen.catalog, gen.index
            self.embedder = store_embedder(gen.meta, gen.files.store, weights=weights, precision=precision,
                                           embedder=embedder, runtime=runtime)
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, store: str | os.PathLike[str], **kwargs: object) -> Searcher:
        """A Searcher over the current generation of `store`, which it closes with itself."""
        return cls(Generation.open(store), owns=True, **kwargs)

    def close(self) -> None:
        """Release the generation's files, when this Searcher opened it."""
        if self._owns:
            self.gen.close()

    def __enter__(self) -> Searcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _row_features(self, rows: np.ndarray) -> list[LocalFeatures | None]:
        """row_features, through the LRU cache of the last `local_cache_rows` rows read (when kept)."""
        if not self.local_cache_rows:
            return row_features(self.gen, rows)
        with self._cache_lock:
            got = {r: self._local_cache.get(r) for r in rows.tolist()}
            missing = [r for r, f in got.items() if f is None]
            for r in got.keys() - set(missing):
                self._local_cache.move_to_end(r)
            self.cache_hits += len(got) - len(missing)
            self.cache_misses += len(missing)
        if missing:
            got.update(zip(missing, row_features(self.gen, np.array(missing))))
            with self._cache_lock:
                self._local_cache.update((r, got[r]) for r in missing if got[r] is not None)
                while len(self._local_cache) > self.local_cache_rows:
                    self._local_cache.popitem(last=False)
        return [got[r] for r in rows.tolist()]

    def cache_info(self) -> dict[str, int]:
        """The local-features cache: rows held, hits and misses."""
        return {"rows": len(self._local_cache), "hits": self.cache_hits, "misses": self.cache_misses}

    def rows_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows of catalogue `ids`; -1 for an id not in this generation."""
        return self.gen.rows_of(ids)

    def decode_local(self, verify: bool) -> bool:
        """Whether query photos are decoded with their local features: to verify, and for a store that caches
        them (it decoded its photos at their size: queries are decoded the same way)."""
        return verify or bool(self.meta.local_features)

    def search(self, xq: np.ndarray, k: int = DEFAULTS.k) -> list[list[Match]]:
        """k nearest catalogue images of each row of xq (unit vectors from this store's embedder)."""
        if len(xq) == 0:
            return []
        return self.neighbours(*self.knn(xq, k))

    def embed_knn(self, pixels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Embed decoded photos and search them: FAISS (D, I)."""
        return self.knn(self.embedder.embed(pixels), k)

    def knn(self, xq: np.ndarray, k: int = DEFAULTS.k) -> tuple[np.ndarray, np.ndarray]:
        """FAISS (D, I) of xq in this store's index; on an approximate index (SQ, PQ, PCA codes) the scores are
        re-computed exactly from the stored vectors."""
        D, I = search(self.index, xq, k)
        return self._rescored(xq, I) if self.meta.index.factory != "Flat" else (D, I)

    def _rescored(self, xq: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosines of the found ids from the stored vectors, each row re-sorted by them (so a threshold
        means the same whatever the index's codes)."""
        rows = self.rows_of(I.ravel()).reshape(I.shape)
        ok = rows >= 0
        uniq, inverse = np.unique(rows[ok], return_inverse=True)
        D = np.full(I.shape, -np.inf, np.float32)
        if len(uniq):
            xb = self.gen.vectors(uniq)
            D[ok] = np.einsum("ij,ij->i", np.repeat(xq, ok.sum(1), axis=0), xb[inverse])
        order = np.argsort(-D, axis=1, kind="stable")
        I = np.where(ok, I, -1)
        return np.take_along_axis(D, order, 1), np.take_along_axis(I, order, 1)

    def neighbours(self, D: np.ndarray, I: np.ndarray) -> list[list[Match]]:
        """FAISS results (D, I) of this store's index as Match lists."""
        return neighbours(D, I, self.cat.paths, self.rows_of(I))

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

    def reviewed(self, matches: list[Match], digest: str | None) -> list[Match]:
        """`matches` of the query photo with content `digest`, each marked with the decision a person recorded
        on the two (search/review.py), if any."""
        state = self.decisions.state()
        if not digest or not state.current or not matches:
            return matches
        sha, rows = self.cat.sha256, self.rows_of([m.id for m in matches]).tolist()
        out = []
        for m, r in zip(matches, rows):
            d = state.get(digest, sha[r]) if r >= 0 and sha[r] != digest else None
            out.append(m if d is None else replace(
                m, decision=d.decision, keeper=None if d.keeper is None else d.keeper == sha[r]))
        return out

    def results(self, names: Sequence[str], D: np.ndarray, I: np.ndarray, local: Sequence[LocalFeatures | None],
                *, verify: bool, threshold: float, errors: Sequence[str | None] | None = None,
                digests: Sequence[str | None] | None = None) -> list[QueryResult]:
        """The results of photos `names` (in order): those with an error in `errors` (by position) with it,
        the others (rows of D, I and `local`, in order) with their neighbours, verified and re-ranked when
        `verify`, and marked with the decisions on them (`digests`: the photos' content, by row). The last
        stage of every look-up, in the CLI and the service."""
        errors = errors or [None] * len(names)
        found = iter(self.neighbours(D, I))
        feats, sha = iter(local), iter(digests or [None] * len(D))
        out = []
        for name, error in zip(names, errors):
            if error is not None:
                out.append(QueryResult(name, error=error, threshold=threshold))
                continue
            m, f = next(found), next(feats)
            m = self.reviewed(self.verify(m, f) if verify else m, next(sha))
            out.append(QueryResult(name, m, verified=verify, threshold=threshold))
        return out

    def answer(self, images: Sequence[str | os.PathLike[str]], k: int = DEFAULTS.k, *,
               batch_size: int = DEFAULTS.batch_size, max_file_bytes: int = DEFAULTS.max_file_bytes,
               verify: bool | None = None, threshold: float | None = None,
               progress: Progress | None = None) -> Answer:
        """Look up image files (folders are expanded); undecodable, non-regular and too large files come back
        with an error. With `verify` (None: resolve_verify), each photo's top k are geometrically verified and
        re-ranked; `threshold` (default: the model's) decides the rest. `progress` gets a stage "query" (the
        photos decoded and embedded)."""
        if k < 1:
            raise InputError("k must be at least 1")
        verify = resolve_verify(verify, self.meta.local_features)
        t = self.gen.threshold(threshold)
        paths = [str(p) for p in discover(images)]
        with stage_of(progress, "query", len(paths), "img") as p:
            got = embed_files(paths, self.embedder, batch_size=batch_size, max_bytes=max_file_bytes,
                              local=self.decode_local(verify), progress=p)
        D, I = self.knn(got.xq, k) if len(got.xq) else (np.zeros((0, k), np.float32), np.zeros((0, k), np.int64))
        failed = dict(got.failures)
        results = self.results(paths, D, I, got.local or [None] * len(got.paths), verify=verify, threshold=t,
                               errors=[failed.get(p) for p in paths], digests=got.sha256)
        return Answer(str(self.gen.path), self.generation, len(self.cat), self.meta.model.name, t, verify, results,
                      self.meta.model.weights)


def answer(store: str | os.PathLike[str], images: Sequence[str | os.PathLike[str]], *, k: int = DEFAULTS.k,
           weights: str | None = None, precision: str = DEFAULTS.precision, embedder: Embedder | None = None,
           batch_size: int = DEFAULTS.batch_size, max_file_bytes: int = DEFAULTS.max_file_bytes,
           runtime: str | None = None, verify: bool | None = None, threshold: float | None = None,
           progress: Progress | None = None) -> Answer:
    """Look up photos in the current generation of `store`, with its own model and weights (`runtime` may be
    either: TensorFlow and ONNX Runtime vectors are interchangeable); see Searcher.answer. The library's one
    look-up: `query` gives its results, the service answers with the same Searcher pipeline, and the client
    (serve/client.py) reads the service's Answer back."""
    with Searcher.open(store, weights=weights, precision=precision, embedder=embedder, runtime=runtime) as s:
        return s.answer(images, k, batch_size=batch_size, max_file_bytes=max_file_bytes, verify=verify,
                        threshold=threshold, progress=progress)


def query(store: str | os.PathLike[str], images: Sequence[str | os.PathLike[str]], **options: Any) -> list[QueryResult]:
    """The results of `answer` (the look-up; `options` are its keywords): top-k catalogue matches of each
    photo, verified and re-ranked with `verify`."""
    return answer(store, images, **options).results


def has_match(results: Sequence[QueryResult], threshold: float | None = None) -> bool:
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
