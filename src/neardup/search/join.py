"""Search, join: the pair searches of a catalogue — pure, ndarray in, (I, J, D) rows out.

`self_join` is the exact all-pairs search: block after block of rows is multiplied (BLAS sgemm) against the
rows after it only, so each pair is computed once (half the work of xb @ xb.T or a FAISS range search) and
memory is bounded by the block, never by n². `knn_pairs` takes each row's k nearest (a store's index, or an
exact one) and re-scores every candidate exactly. `word_pairs` takes each row's k photos sharing the most
keypoint words (its ORB descriptors, quantised): a crop moves a photo's global vector far (a pHash 22-30 bits
off) but keeps most of its keypoints. `candidate_pairs` is what verification checks: both. `exact_pairs`
finds byte-identical files by content hash.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from ..config import DEFAULTS
from ..store.faiss_index import id_lookup, rows_for

if TYPE_CHECKING:
    import faiss

    from ..features import LocalTable


def self_join(xb: np.ndarray, threshold: float, block: int | None = None,
              progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) of rows of xb with inner product >= threshold (`progress`: (rows done, n) per block).

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
        if progress is not None:
            progress(min(r + block, n), n)
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return (np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64),
            np.concatenate(out_d).astype(np.float32))


def knn_pairs(xb: np.ndarray, k: int, threshold: float, index: faiss.Index | None = None,
              ids: np.ndarray | None = None, chunk: int = 1024, rows: np.ndarray | None = None,
              progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) where j is among i's k nearest rows (or i among j's) with inner product >= threshold.

    Returns (I, J, D) sorted by (I, J), each pair once: O(n k) pairs where the self-join's grow with n². The
    k-NN come from `index` (a store's FAISS index, holding the catalog's `ids`) when given, else from an exact
    IndexFlatIP; either way every candidate is re-scored exactly from xb, so an approximate index can miss a
    pair but never scores one wrongly. Rows are searched `chunk` at a time: memory is bounded by the chunk
    and the pairs kept, never by n². `rows` limits the searched rows (a benchmark's sample; default: all).
    `progress` is called with (rows searched, rows to search) after each chunk.
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
        if progress is not None:
            progress(start + len(qrows), len(todo))
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


#: Keypoint words: an ORB descriptor (256 bits) quantised by sampling 16 of its bits, in two tables of other
#: bits (seeded: the same words in every process); words in more than WORD_MAX_DF photos are dropped
#: (textures every shelf has). Chosen on the grocery copies sets of seed 0 (with and without anisotropic
#: resizes): each photo's 2 photos sharing the most words hold its copy for 480 of 480, and for 480 of 480 of
#: seed 1's (benchmarks/bench_verify.py); pHash's 5 nearest within Hamming 20 held 0.90.
WORD_TABLES, WORD_BITS, WORD_MAX_DF, WORD_SEED = 2, 16, 30, 0


def _words(count: np.ndarray, desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, word) of every extracted keypoint of these rows, in every table."""
    n, K = desc.shape[:2]
    rng = np.random.default_rng(WORD_SEED)
    valid = (np.arange(K)[None, :] < np.maximum(count, 0)[:, None]).ravel()
    weights = 1 << np.arange(WORD_BITS, dtype=np.int64)
    rows, words = [], []
    for t in range(WORD_TABLES):
        pos = np.sort(rng.choice(256, WORD_BITS, replace=False))
        bits = (desc[:, :, pos // 8] >> (7 - pos % 8).astype(np.uint8)) & 1  # [n, K, bits]
        w = (bits.astype(np.int64) @ weights).ravel() + (t << WORD_BITS)
        rows.append(np.repeat(np.arange(n), K)[valid])
        words.append(w[valid])
    return np.concatenate(rows), np.concatenate(words)


def word_pairs(count: np.ndarray, desc: np.ndarray, k: int, *, min_shared: int = 2,
               chunk: int = 1024) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) where j is among the k rows sharing the most keypoint words with i (or i among j's), at
    least `min_shared`: (I, J, shared words), sorted by (I, J), each pair once. `count`/`desc` are a
    LocalTable's (rows of count -1 have no words). Memory: the word matrix and a chunk of rows' overlaps."""
    n = len(count)
    if n < 2 or k < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    parts = [_words(count[s:s + chunk], desc[s:s + chunk]) for s in range(0, n, chunk)]
    rows = np.concatenate([r + s for (r, _), s in zip(parts, range(0, n, chunk))])
    words = np.concatenate([w for _, w in parts])
    X = sparse.csr_matrix((np.ones(len(rows), np.int32), (rows, words)),
                          shape=(n, WORD_TABLES << WORD_BITS))
    X.data[:] = 1  # a word counts once a photo
    df = X.getnnz(axis=0)
    X = X[:, np.flatnonzero((df >= 2) & (df <= WORD_MAX_DF))].tocsr()
    XT = X.T.tocsr()
    out_i, out_j, out_s = [], [], []
    for s0 in range(0, n, chunk):
        S = (X[s0:s0 + chunk] @ XT).tocsr()
        for r in range(S.shape[0]):
            lo, hi = S.indptr[r], S.indptr[r + 1]
            cols, vals = S.indices[lo:hi], S.data[lo:hi]
            keep = (cols != s0 + r) & (vals >= min_shared)
            cols, vals = cols[keep], vals[keep]
            top = np.argsort(-vals, kind="stable")[:k]
            out_i.append(np.full(len(top), s0 + r, np.int64))
            out_j.append(cols[top].astype(np.int64))
            out_s.append(vals[top].astype(np.int32))
    a, b, sh = (np.concatenate(x) for x in (out_i, out_j, out_s))
    key, first = np.unique(np.minimum(a, b) * n + np.maximum(a, b), return_index=True)
    return key // n, key % n, sh[first]


def candidate_pairs(xb: np.ndarray, k: int, loose: float, *, index: faiss.Index | None = None,
                    ids: np.ndarray | None = None, local: LocalTable | None = None, words: int = 0,
                    knn: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                    progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, ...]:
    """The pairs verification checks: knn_pairs(k, loose) (or `knn`, those pairs found already, as
    candidates.store_knn_pairs finds them at scale), and with `words` (and a LocalTable `local` of the same
    rows) each row's `words` photos sharing the most keypoint words, whatever their cosine. Returns
    (I, J, D, by_words): D exact cosines; by_words marks the pairs the words found (candidates whatever their
    score). `progress`: knn_pairs'."""
    I, J, D = knn if knn is not None else knn_pairs(xb, k, loose, index, ids, progress=progress)
    by_words = np.zeros(len(I), bool)
    if words and local is not None and len(xb) > 1:
        wi, wj, _ = word_pairs(local.count, local.desc, words)
        n = np.int64(len(xb))
        by_words = np.isin(I * n + J, wi * n + wj)
        new = ~np.isin(wi * n + wj, I * n + J)
        wi, wj = wi[new], wj[new]
        wd = np.einsum("ij,ij->i", np.asarray(xb[wi], np.float32), np.asarray(xb[wj], np.float32))
        I, J, D = np.concatenate([I, wi]), np.concatenate([J, wj]), np.concatenate([D, wd.astype(np.float32)])
        by_words = np.concatenate([by_words, np.ones(len(wi), bool)])
        order = np.lexsort((J, I))
        I, J, D, by_words = I[order], J[order], D[order], by_words[order]
    return I, J, D, by_words
