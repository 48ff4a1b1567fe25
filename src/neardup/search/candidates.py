"""Search stage 2b, candidates at scale: each row's k nearest of a store too large to hold its vectors in memory.

`knn_pairs` (join.py) holds every stored vector and searches the store's index one row at a time at the knob
tuned for single queries; at a million 1280-d rows that is 5 GB of vectors and hours of searching. Here, for a
store with an approximate index (`duplicates` on a large store):

1. an uncentred PCA to `dims` is fitted on seeded windows of rows (checked blocks, never all in memory):
   x = V z + r with r orthogonal to V, so x·y = z_x·z_y + r_x·r_y;
2. a pass over the stored vectors keeps each row's z (float32, `dims` wide) and |r|; an IVF-Flat index
   (k-means on a sample of the z) takes the z over, and every row, list by list, is searched for its `depth`
   nearest in z at `nprobe` lists, in batches (both cores);
3. a pair can reach the threshold only if z_x·z_y + |r_x||r_y| >= threshold (Cauchy-Schwarz on r): the others
   are dropped without reading a vector; the rest are re-scored exactly from the stored vectors, a block of
   rows against the rows after it (a few passes over the store), and each row keeps its k best exact scores.

The result means what knn_pairs' does: pairs (i < j) where j is among i's k nearest (or i among j's), exact
cosine >= threshold. Memory: the codes (n * (4 dims + 12) bytes, twice while the index takes them), the
candidate pairs, then one block of `block_mb` of vectors.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..config import DEFAULTS
from ..store.generation import Generation
from ..store.index_kinds import nlist_for

log = logging.getLogger(__name__)

#: Pairs scored exactly at once (two gathered rows each: 8k x 2 x 1280 x 4 bytes = 80 MB at most).
SCORE_CHUNK = 8192
#: Rows of each window the PCA sample reads (contiguous: one span read each, wherever the windows lie).
SAMPLE_WINDOW = 512
#: Rows searched in one FAISS call (the lists' members, taken list by list: neighbours probe the same lists).
SEARCH_BATCH = 16_384


@dataclass
class SearchStats:
    """What one candidate search did (logged at info level; benchmarks/bench_million.py reports it)."""

    dims: int = 0
    nlist: int = 0
    nprobe: int = 0
    depth: int = 0
    code_bytes: int = 0  #: bytes of the in-memory IVF codes and ids
    seconds: dict[str, float] = field(default_factory=dict)  #: phase -> seconds
    bound_kept: int = 0  #: approximate neighbours that could reach the threshold (re-scored)
    scored: int = 0  #: distinct pairs scored exactly
    passes: float = 0.0  #: stored vectors read, in passes over the store


def store_knn_pairs(gen: Generation, k: int, threshold: float, *, dims: int = DEFAULTS.scale_dims,
                    depth: int | None = None, nprobe: int = DEFAULTS.scale_nprobe,
                    block_mb: int = DEFAULTS.scale_block_mb, sample: int = 32_768, seed: int = 0,
                    stats: SearchStats | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) of the store's rows where j is among i's k nearest (or i among j's) with exact inner
    product >= threshold: (I, J, D) sorted by (I, J), as join.knn_pairs returns, without the vectors in memory.
    `depth` (default 2k) approximate neighbours a row are re-ranked exactly; `block_mb` bounds the vectors
    held for that; `stats` receives what was done."""
    import faiss

    stats = stats if stats is not None else SearchStats()
    n, d = len(gen), gen.meta.model.dim
    depth = max(k, depth or 2 * k)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if n < 2 or k < 1:
        return empty
    t0 = time.perf_counter()
    nlist = max(1, min(nlist_for(n) * 2, n // 39))  # FAISS warns below 39 training points a list
    rng = np.random.default_rng(seed)
    V = None
    if dims < d:  # uncentred PCA: the top eigenvectors of the second moment of a sample of windows of rows
        wins = np.unique(rng.integers(0, max(1, n - SAMPLE_WINDOW), max(1, sample // SAMPLE_WINDOW)))
        M = np.zeros((d, d), np.float64)
        for w in wins.tolist():
            x = next(gen.vector_runs(w, SAMPLE_WINDOW))[1]
            M += x.T @ x  # float32 BLAS, summed in float64
        V = np.ascontiguousarray(np.linalg.eigh(M)[1][:, ::-1][:, :dims], np.float32)
    else:
        dims = d
    z = np.empty((n, dims), np.float32)
    rnorm = np.empty(n, np.float32)
    for start, x in gen.vector_runs():
        zz = z[start:start + len(x)] = x if V is None else x @ V
        rnorm[start:start + len(x)] = np.sqrt(np.maximum(0.0, np.einsum("ij,ij->i", x, x) - np.einsum(
            "ij,ij->i", zz, zz)))
    stats.seconds["PCA and codes"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    quantizer = faiss.IndexFlatIP(dims)
    index = faiss.IndexIVFFlat(quantizer, dims, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(z[np.sort(rng.choice(n, min(n, 40 * nlist), replace=False))])
    for start in range(0, n, 65_536):
        index.add_with_ids(z[start:start + 65_536], np.arange(start, min(n, start + 65_536), dtype=np.int64))
    del z  # the index holds the codes now
    index.nprobe = min(nprobe, nlist)
    stats.dims, stats.nlist, stats.nprobe, stats.depth = dims, nlist, index.nprobe, depth
    stats.code_bytes = n * (4 * dims + 8) + rnorm.nbytes
    stats.seconds["IVF build"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    src, dst = _search_lists(index, dims, depth, threshold, rnorm)
    del index, quantizer
    stats.bound_kept = len(src)
    stats.seconds["approximate search"] = time.perf_counter() - t0

    t0 = time.perf_counter()  # int32 rows and freed early: at 1M rows the pairs are tens of millions
    key = np.minimum(src, dst).astype(np.int64) * n + np.maximum(src, dst)
    key, inverse = np.unique(key, return_inverse=True)
    ua, ub = (key // n).astype(np.int32), (key % n).astype(np.int32)
    del key
    exact, stats.passes = _exact_scores(gen, ua, ub, max(1, (block_mb << 20) // (4 * d)))
    stats.scored = len(ua)
    del ua, ub
    score = exact[inverse]
    del inverse, exact
    # each row keeps its k best by exact score (as exact k-NN would), then the threshold
    order = np.lexsort((-score, src))
    src, dst, score = src[order], dst[order], score[order]
    del order
    top = (np.arange(len(src)) - np.searchsorted(src, src, side="left") < k) & (score >= threshold)
    a, b, s = np.minimum(src, dst)[top].astype(np.int64), np.maximum(src, dst)[top].astype(np.int64), score[top]
    key, at = np.unique(a * n + b, return_index=True)
    stats.seconds["exact re-scoring"] = time.perf_counter() - t0
    log.info("candidate search of %d rows: %s", n, stats)
    return key // n, key % n, s[at].astype(np.float32)


def _search_lists(index, dims: int, depth: int, threshold: float,  # noqa: ANN001 - faiss.IndexIVFFlat
                  rnorm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row of the IVF index searched for its depth nearest (itself excluded), list by list: the
    (row, neighbour) pairs whose score could reach `threshold` (approximate score + |r_row| |r_neighbour|)."""
    import faiss

    inv = index.invlists
    out_s, out_d = [], []
    rows, codes, held = [], [], 0

    def flush() -> None:
        q = np.concatenate(rows)
        D, I = index.search(np.concatenate(codes).reshape(len(q), dims), depth + 1)
        ok = (I >= 0) & (I != q[:, None])
        ok &= D + rnorm[q][:, None] * rnorm[np.maximum(I, 0)] >= threshold - 1e-6
        out_s.append(np.repeat(q, ok.sum(1)).astype(np.int32))
        out_d.append(I[ok].astype(np.int32))
        rows.clear()
        codes.clear()

    for lst in range(index.nlist):
        size = inv.list_size(lst)
        if not size:
            continue
        rows.append(faiss.rev_swig_ptr(inv.get_ids(lst), size).copy())
        codes.append(faiss.rev_swig_ptr(inv.get_codes(lst), size * dims * 4).view(np.float32).copy())
        held += size
        if held >= SEARCH_BATCH:
            flush()
            held = 0
    if rows:
        flush()
    if not out_s:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(out_s), np.concatenate(out_d)


def _exact_scores(gen: Generation, a: np.ndarray, b: np.ndarray, block: int) -> tuple[np.ndarray, float]:
    """Exact inner products of the row pairs (a < b) from the stored vectors: a block of `block` rows is read,
    then the rows after it stream past it. Returns the scores and the passes over the store it read."""
    n, out, read = len(gen), np.empty(len(a), np.float32), 0
    order = np.lexsort((b, a // block))
    a, b = a[order], b[order]
    starts = np.searchsorted(a // block, np.arange(-(-n // block) + 1))
    for L0 in range(0, n, block):
        lo, hi = starts[L0 // block], starts[L0 // block + 1]
        if lo == hi:
            continue
        L1 = min(n, L0 + block)
        left = np.empty((L1 - L0, gen.meta.model.dim), np.float32)
        for s, x in gen.vector_runs(L0):
            if s >= L1:
                break
            m = min(len(x), L1 - s)
            left[s - L0:s - L0 + m] = x[:m]
        read += L1 - L0
        pa, pb = a[lo:hi] - L0, b[lo:hi]  # b ascending within the block
        inside = int(np.searchsorted(pb, L1))
        _dots(out, order[lo:lo + inside], left, pa[:inside], left, pb[:inside] - L0)
        if inside < len(pb):
            for s, x in gen.vector_runs(L1):
                i0, i1 = np.searchsorted(pb, [s, s + len(x)])
                read += len(x)
                if i1 > i0:
                    _dots(out, order[lo + i0:lo + i1], left, pa[i0:i1], x, pb[i0:i1] - s)
                if i1 >= len(pb):
                    break
        del left
    return out, read / max(n, 1)


def _dots(out: np.ndarray, at: np.ndarray, xa: np.ndarray, ra: np.ndarray, xb: np.ndarray, rb: np.ndarray) -> None:
    """out[at] = rows ra of xa dotted with rows rb of xb, SCORE_CHUNK pairs at a time."""
    for c in range(0, len(at), SCORE_CHUNK):
        sl = slice(c, c + SCORE_CHUNK)
        out[at[sl]] = np.einsum("ij,ij->i", xa[ra[sl]], xb[rb[sl]])
