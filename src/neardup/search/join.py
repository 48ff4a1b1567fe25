"""Search stage 2a, join: the pair searches of a catalogue — pure, ndarray in, (I, J, D) rows out.

`self_join` is the exact all-pairs search: block after block of rows is multiplied (BLAS sgemm) against the
rows after it only, so each pair is computed once (half the work of xb @ xb.T or a FAISS range search) and
memory is bounded by the block, never by n². `knn_pairs` takes each row's k nearest (a store's index, or an
exact one) and re-scores every candidate exactly. `exact_pairs` finds byte-identical files by content hash.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..config import DEFAULTS
from ..indexer.faiss_index import id_lookup, rows_for


def self_join(xb: np.ndarray, threshold: float, block: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) of rows of xb with inner product >= threshold.

    Returns (I, J, D): int64 row indices and float32 scores, sorted by (I, J). Memory beyond xb is about
    block * n * 5 bytes; the default block keeps it near half the bytes of xb, and at least 16 MB.
    """
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    n, d = xb.shape
    if block is None:
        budget = max(16 << 20, xb.nbytes // 2)
        block = int(np.clip(budget // (5 * max(n, 1)), 16, DEFAULTS.join_block))
    out_i, out_j, out_d = [], [], []
    for r in range(0, n, block):
        q = xb[r:r + block]
        sims = q @ xb[r:].T  # rows r.., columns r..: the lower triangle is never computed
        # keep only j > i: the diagonal block is the first len(q) columns
        sims[:, :len(q)][np.tril_indices(len(q))] = -np.inf
        ii, jj = np.nonzero(sims >= threshold)
        out_i.append(ii + r)
        out_j.append(jj + r)
        out_d.append(sims[ii, jj])
        del sims
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return (np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64),
            np.concatenate(out_d).astype(np.float32))


def knn_pairs(xb: np.ndarray, k: int, threshold: float, index=None, ids: np.ndarray | None = None,  # noqa: ANN001
              chunk: int = 1024, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) where j is among i's k nearest rows (or i among j's) with inner product >= threshold.

    Returns (I, J, D) sorted by (I, J), each pair once: O(n k) pairs where the self-join's grow with n². The
    k-NN come from `index` (a store's FAISS index, holding the catalog's `ids`) when given, else from an exact
    IndexFlatIP; either way every candidate is re-scored exactly from xb, so an approximate index can miss a
    pair but never scores one wrongly. Rows are searched `chunk` at a time: memory is bounded by the chunk
    and the pairs kept, never by n². `rows` limits the searched rows (a benchmark's sample; default: all).
    """
    import faiss

    xb = np.ascontiguousarray(xb, dtype=np.float32)
    n = len(xb)
    if n < 2 or k < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    if index is None:
        index, ids = faiss.IndexFlatIP(xb.shape[1]), None
        index.add(xb)
    lookup = id_lookup(ids) if ids is not None else None
    kk = min(k + 1, n)  # +1: each row finds itself (or a tie) first
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    todo = np.arange(n) if rows is None else np.asarray(rows, np.int64)
    for start in range(0, len(todo), chunk):
        qrows = todo[start:start + chunk]
        xq = xb[qrows]
        _, cols = index.search(xq, kk)
        if lookup is not None:  # store ids -> rows (-1 stays -1)
            cols = rows_for(lookup, cols)
        # exact re-scoring from the stored vectors: chunk x (k+1) x d floats at a time
        sims = np.einsum("cd,ckd->ck", xq, xb[np.maximum(cols, 0)]).ravel()
        src, cols = np.repeat(qrows, kk), cols.ravel()
        keep = (cols >= 0) & (cols != src) & (sims >= threshold)
        a, b = np.minimum(src, cols)[keep], np.maximum(src, cols)[keep]
        found.append((a, b, sims[keep].astype(np.float32)))
    a, b, sims = (np.concatenate(x) for x in zip(*found)) if found else (np.zeros(0, np.int64),) * 2 + (
        np.zeros(0, np.float32),)
    key, first = np.unique(a * n + b, return_index=True)
    return key // n, key % n, sims[first]


def exact_pairs(hashes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) of rows with the same content hash: byte-identical files."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        by_hash[h].append(i)
    pi, pj = [], []
    for rows in by_hash.values():
        for a in range(len(rows)):
            for b in range(a + 1, len(rows)):
                pi.append(rows[a])
                pj.append(rows[b])
    return np.array(pi, np.int64), np.array(pj, np.int64)


def without_pairs(pairs: tuple[np.ndarray, np.ndarray, np.ndarray], ei: np.ndarray, ej: np.ndarray,
             n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (I, J, D) pairs that are not among the exact pairs (ei, ej) of n rows."""
    I, J, D = pairs
    if not len(ei):
        return I, J, D
    keep = ~np.isin(I * np.int64(n) + J, ei * np.int64(n) + ej)
    return I[keep], J[keep], D[keep]
