"""Store, index_kinds: which FAISS index a store gets, trained, tuned and measured.

The store's float32 vectors stay the ground truth; the index is derived from them and rebuildable. `flat`
is exact. An approximate kind (`ivf`, `hnsw`, or any FAISS index-factory string) is built on the store's
vectors, then measured: recall@10 of its k-NN against exact search (a result tying the 10th exact score counts:
which of tied neighbours exact search returns is arbitrary), over a held-out sample of the store's
own vectors as queries, with its search knob (nprobe, efSearch) raised until that recall reaches the target.
The knob, the recall and the sample size are recorded in the store, and `neardup info` shows them.

`auto` chooses from the vector count n, the dimension d and a memory budget (autofaiss-style rules):
    n <= FLAT_MAX and 4*n*d bytes fit          Flat: exact
    d + 16 bytes a vector fit                   IVF{nlist},SQ8: 8-bit scalar quantisation, no PCA
    else                                        PCAR{p},IVF{nlist},SQ8 with the widest p in 1024/512/256 that fits,
                                                or PCAR256,IVF{nlist},PQ{m} (m in 64/32/16/8 bytes a vector) below that
nlist is the power of two nearest 2*sqrt(n) (16 <= nlist), trained on a seeded sample of 40*nlist vectors
(FAISS warns below 39 per centroid): on 2 cores the k-means and the assignment of n vectors in 2048-d cost
O(n * nlist * d), so nlist stays at the low end of autofaiss's 4-16*sqrt(n) and nprobe is tuned up instead.
HNSW is offered (`--index hnsw`: HNSW32 on the float vectors, no training) but never chosen by `auto`: its
build inserts every vector through a graph search in full dimension. Measurements: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import faiss
import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

#: The kinds by name; anything else must be a FAISS index-factory string ("IVF1024,PQ64", "PCAR256,HNSW32").
KINDS = ("flat", "auto", "ivf", "hnsw")
#: auto keeps the exact index up to this many vectors (the 50k catalogue of the design card stays exact).
FLAT_MAX = 100_000
#: The recall@10 an approximate index is tuned to by default, and the queries it is measured with.
TARGET_RECALL = 0.95
RECALL_K = 10
RECALL_QUERIES = 1000
#: Bytes a vector costs beside its code: its id in the IDMap and in the inverted list.
ID_BYTES = 16


@dataclass(frozen=True)
class IndexPlan:
    """A resolved index kind: the factory string to build and why it was chosen."""

    factory: str  #: FAISS index-factory string ("Flat" for the exact index)
    reason: str

    @property
    def exact(self) -> bool:
        return self.factory == "Flat"


@dataclass(frozen=True)
class Measured:
    """What building an approximate index measured (recorded in the store)."""

    params: str  #: the search knob it was tuned to, as FAISS ParameterSpace takes it ("nprobe=16"), or ""
    recall: float  #: recall@RECALL_K against exact search at those params (1.0 for Flat)
    queries: int  #: held-out store vectors it was measured with (0 for Flat)
    build_seconds: float


def nlist_for(n: int) -> int:
    """Inverted lists for n vectors: the power of two nearest 2*sqrt(n), at least 16."""
    return max(16, 2 ** round(math.log2(max(2 * math.sqrt(max(n, 1)), 1))))


def plan(kind: str, n: int, d: int, memory: int | None = None) -> IndexPlan:
    """Resolve `kind` (KINDS or a factory string) for n vectors of dimension d under `memory` bytes."""
    budget = memory if memory else math.inf
    if kind == "flat":
        return IndexPlan("Flat", "asked for (exact)")
    if kind == "hnsw":
        return IndexPlan("HNSW32,Flat", "asked for (graph over the float vectors)")
    nlist = nlist_for(n)
    if kind == "ivf":
        return IndexPlan(f"IVF{nlist},SQ8" if (d + ID_BYTES) * n <= budget else _compressed(n, d, budget, nlist),
                         f"asked for; nlist {nlist} for {n} vectors")
    if kind != "auto":
        _check_factory(kind, d)
        return IndexPlan(kind, "a FAISS factory string, as given")
    per = budget / max(n, 1)
    if n <= FLAT_MAX and 4 * d + 8 <= per:
        return IndexPlan("Flat", f"{n} vectors <= {FLAT_MAX}: exact search is fast enough")
    if d + ID_BYTES <= per:
        return IndexPlan(f"IVF{nlist},SQ8", f"{n} vectors: 8-bit codes of all {d} dims fit the memory budget")
    return IndexPlan(_compressed(n, d, budget, nlist), f"{n} vectors under a {_gb(budget)} budget")


def _compressed(n: int, d: int, budget: float, nlist: int) -> str:
    per = budget / max(n, 1) - ID_BYTES
    for p in (1024, 512, 256):
        if p < d and p <= per:
            return f"PCAR{p},IVF{nlist},SQ8"
    p = min(256, d)
    fits = [m for m in (64, 32, 16, 8) if m <= per and p % m == 0]  # PQ's sub-vectors must split p evenly
    if not fits:
        raise InputError(f"a memory budget of {_gb(budget)} leaves {per:.0f} bytes per vector for {n} vectors; "
                         f"the smallest index needs {8 + ID_BYTES} (raise --memory)")
    return f"PCAR{p},IVF{nlist},PQ{fits[0]}"


def _gb(x: float) -> str:
    return "unlimited" if x == math.inf else f"{x / 2**30:.2f} GiB"


def _check_factory(spec: str, d: int) -> None:
    try:
        faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise InputError(f"--index {spec!r} is neither one of {', '.join(KINDS)} nor a FAISS index-factory string "
                         f"FAISS accepts ({' '.join(str(exc).split())[:200]})") from None


def trained(xb: np.ndarray, factory: str, *, seed: int = 0) -> faiss.Index:
    """An empty index `factory` trained on a seeded sample of xb, holding the store's ids: an IVF kind keeps
    them in its lists (so parts built apart merge with their ids: an IndexIDMap's sequence numbers would
    collide), any other kind in an IndexIDMap2."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    n, d = xb.shape
    inner = faiss.IndexFlatIP(d) if factory == "Flat" else faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    index = inner if _ivf(inner) is not None else faiss.IndexIDMap2(inner)
    if not inner.is_trained:
        ivf = _ivf(index)
        need = max(40 * ivf.nlist, 4096) if ivf is not None else 65_536
        least = ivf.nlist if ivf is not None else 1
        if n < least:
            raise InputError(f"{factory} needs at least {least} vectors to train; the store has {n} "
                             f"(use --index flat or a smaller IVF)")
        rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, need), replace=False))
        index.train(xb[rows])
    return index


def add(index: faiss.Index, xb: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """Add xb with `ids` to `index` in bounded steps (PCA and code temporaries for a million rows); returns it."""
    for start in range(0, len(xb), 65_536):
        index.add_with_ids(np.ascontiguousarray(xb[start:start + 65_536], np.float32),
                           np.ascontiguousarray(ids[start:start + 65_536], np.int64))
    return index


def build(xb: np.ndarray, ids: np.ndarray, factory: str, *, seed: int = 0) -> faiss.Index:
    """The index `factory` over xb with the store's ids, trained on a seeded sample of xb (see trained)."""
    return add(trained(xb, factory, seed=seed), xb, ids)


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _knob(index: faiss.Index) -> tuple[str, list[int]] | None:
    """The search knob of an approximate index and the values tuning tries, smallest first (None: none)."""
    ivf = _ivf(index)
    if ivf is not None:
        return "nprobe", [p for p in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
                          if p <= ivf.nlist]
    try:  # an HNSW anywhere inside (PCA first, an IDMap around it): ParameterSpace finds it
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", 16)
    except RuntimeError:
        return None
    return "efSearch", [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]


def apply_params(index: faiss.Index, params: str) -> None:
    """Set the recorded search knob ("nprobe=16") on a loaded index ("" leaves it alone)."""
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)  # type: ignore[arg-type]  # faiss's stub lacks the str overload


def recall_at(I: np.ndarray, gt: np.ndarray, scores: np.ndarray | None = None, kth: np.ndarray | None = None,
              tol: float = 1e-6) -> float:
    """Mean fraction of each row of gt (exact k-NN ids) found in the same row of I.

    With `scores` (the exact scores of I's results) and `kth` (each query's k-th exact score), a result that
    ties the k-th exact score counts as found too: which of several tied neighbours exact search returns is
    arbitrary (pHash scores take a dozen values), so an index returning another of them is not wrong. A row
    counts at most k results."""
    k = gt.shape[1]
    if not len(gt):
        return 1.0
    I = np.asarray(I)[:, :k]
    valid = I >= 0
    hit = (I[:, :, None] == np.asarray(gt)[:, None, :]).any(2) & valid
    if scores is not None and kth is not None:
        hit |= valid & (np.asarray(scores)[:, :k] >= np.asarray(kth, np.float64)[:, None] - tol)
    return float(np.minimum(hit.sum(1), k).mean() / k)


def exact_scores(xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, I: np.ndarray) -> np.ndarray:
    """Exact inner products of each query with its results I (store ids; -1 gives -inf): for recall_at."""
    ids = np.asarray(ids, np.int64)
    order = np.argsort(ids, kind="stable")
    at = np.clip(np.searchsorted(ids[order], I), 0, max(len(ids) - 1, 0))
    rows = order[at] if len(ids) else np.zeros_like(I)
    ok = (I >= 0) & (ids[rows] == I) if len(ids) else np.zeros(I.shape, bool)
    got = np.einsum("qd,qkd->qk", np.asarray(xq, np.float32), np.asarray(xb[rows.ravel()], np.float32).reshape(
        *I.shape, -1)) if I.size else np.zeros(I.shape, np.float32)
    return np.where(ok, got, -np.inf)


def tie_recall(index: faiss.Index, xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, gt: np.ndarray,
               gt_scores: np.ndarray, k: int) -> float:
    """recall_at of `index`'s k-NN of xq against exact search (gt ids, gt_scores descending), ties counted."""
    I = index.search(np.ascontiguousarray(xq, np.float32), k)[1]
    return recall_at(I, gt, exact_scores(xq, xb, ids, I), gt_scores[:, k - 1])


def tune(index: faiss.Index, xb: np.ndarray, ids: np.ndarray, *, target: float = TARGET_RECALL,
         k: int = RECALL_K, queries: int = RECALL_QUERIES, seed: int = 1) -> Measured:
    """Measure recall@k of `index` against exact search (a result tying the k-th exact score counts: recall_at),
    over `queries` store vectors picked with `seed`, and set its knob to the smallest value that reaches
    `target` (the largest tried when none does)."""
    t0 = time.perf_counter()
    knob = _knob(index)
    if index.ntotal == 0:
        return Measured("", 1.0, 0, 0.0)
    n = len(xb)
    rows = np.random.default_rng(seed).choice(n, size=min(n, queries), replace=False)
    xq = np.ascontiguousarray(xb[rows], dtype=np.float32)
    k = min(k, n)
    # brute force over xb itself: no copy of a million vectors beside the store's
    gt_scores, gt_rows = faiss.knn(xq, np.ascontiguousarray(xb, np.float32), k, metric=faiss.METRIC_INNER_PRODUCT)
    gt = np.asarray(ids, np.int64)[gt_rows]

    def measure() -> float:
        return tie_recall(index, xq, xb, ids, gt, gt_scores, k)

    if knob is None:  # a factory string without a knob: measured as it is
        return Measured("", measure(), len(rows), time.perf_counter() - t0)
    name, values = knob
    best = ("", -1.0)
    for v in values:
        apply_params(index, f"{name}={v}")
        r = measure()
        best = (f"{name}={v}", r)
        if r >= target:
            break
    apply_params(index, best[0])
    if best[1] < target:
        log.warning("index reached recall@%d %.3f < target %.2f at %s (its best); consider --index flat or more "
                    "memory", k, best[1], target, best[0])
    return Measured(best[0], best[1], len(rows), time.perf_counter() - t0)
