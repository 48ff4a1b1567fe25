"""Search, metrics: the pure core of evaluate: pair precision/recall over thresholds, exact rankings.

Everything here is ndarray in, numbers out (see search/evaluate.py for the definitions); with verification,
a query's top k are re-ranked by verify.rerank above the cosine order of the rest.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import fields

import numpy as np

from ..progress import Progress, stage_of
from .verify import Verified, rerank, verify_pairs

#: The default threshold sweep: 0.50, 0.51, ..., 1.00 (the model's default threshold is added to it).
DEFAULT_SWEEP = tuple(round(0.50 + k / 100, 2) for k in range(51))
#: Cut-offs of recall@k.
DEFAULT_KS = (1, 5, 10)
#: Scores this close count as tied in rankings: above float32 rounding of a cosine (~1e-7), far below the
#: gaps between different photos' scores.
TIE_TOL = 1e-6

DEFINITIONS = {
    "predicted_pair": "two evaluated images with cosine >= t (float32 comparison, as neardup duplicates) "
                      "or identical content hashes (score 1.0); with verification: a candidate scoring >= t "
                      "that is verified (identical files always are)",
    "candidate": "with verification, a pair that may be predicted: i and j where j is among i's k nearest "
                 "evaluated images or i among j's, scoring >= the lowest threshold of the sweep, or identical "
                 "files; in query mode (verified or not) a query and one of its top k catalogue images "
                 "scoring >= that threshold, or an identical file",
    "verified": "a candidate whose photos' local features fit one homography (search/verify.py, as "
                "duplicates --verify); in rankings, a query's top k are re-ranked by rerank() (verified first, "
                "by inliers) above the cosine order of the rest",
    "true_pair": "two evaluated images in the same truth group (query mode: a query and a catalogue image of "
                 "its group)",
    "ignored_pair": "two evaluated images of different groups and the same non-empty class: neither a true nor "
                    "a false pair (never counted as predicted), and junk in each other's ranking (left out of it)",
    "precision": "TP / predicted pairs; 1.0 when nothing is predicted",
    "recall": "TP / true pairs; undefined without true pairs (evaluate refuses such a truth)",
    "f1": "2PR / (P + R); 0 when P + R = 0; undefined with recall",
    "best": "the threshold of highest F1 (ties: the highest such threshold, the most conservative)",
    "query": "an evaluated image with at least one other evaluated member of its truth group (query mode: a "
             "decoded query photo with a catalogue image of its group)",
    "query_mode": "a truth with rows of role 'query': those photos are embedded with the store's model and "
                  "ranked against the catalogue (evaluated rows without a role); only they are scored, pairs "
                  "and retrieval; query photos that fail to decode are listed, not scored",
    "ranking": "all other evaluated images (query mode: all catalogue images), junk left out, by cosine, exact "
               f"(blocked matrix products); ties (scores within {TIE_TOL:g}) broken pessimistically: a true "
               "match tied with a false one ranks below it",
    "recall_at_k": "fraction of queries with at least one true match among their top k",
    "map": "mean over queries of average precision over the full ranking of all their group-mates "
           "(exact, not truncated)",
    "evaluated": "images both in the store and in the truth; other store images are ignored",
}



# ----------------------------------------------------------------------------------------- pure core functions

def pair_metrics(scores: np.ndarray, is_true: np.ndarray, n_true: int,
                 thresholds: Sequence[float] | np.ndarray) -> dict[str, np.ndarray]:
    """Pair-level precision, recall and F1 at every threshold, from the candidate pairs' scores.

    `scores[i]` is the score of candidate pair i (every pair that could be predicted at the lowest
    threshold), `is_true[i]` whether it is a true pair, `n_true` the number of true pairs in all (found or
    not). A pair is predicted at t when score >= t, compared in float32. Vectorised: one sort, then a binary
    search per threshold. Returns arrays: thresholds, predicted, tp, fp, fn, precision, recall, f1.
    """
    s = np.asarray(scores, np.float32)
    truth = np.asarray(is_true, bool)
    if s.shape != truth.shape:
        raise ValueError("scores and is_true must have the same length")
    t = np.asarray(thresholds, np.float64)
    order = np.argsort(-s, kind="stable")
    desc = s[order]
    cum_true = np.concatenate([[0], np.cumsum(truth[order])])
    # number of scores >= t: -desc is ascending, and s >= t  <=>  -s <= -t
    predicted = np.searchsorted(-desc, -t.astype(np.float32), side="right")
    tp = cum_true[predicted]
    fp = predicted - tp
    fn = n_true - tp
    precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 1.0)
    recall = tp / n_true if n_true > 0 else np.full(len(t), np.nan)  # undefined, not perfect
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1.0), 0.0)
    f1 = np.where(np.isnan(recall), np.nan, f1)
    return {"thresholds": t, "predicted": predicted.astype(np.int64), "tp": tp.astype(np.int64),
            "fp": fp.astype(np.int64), "fn": fn.astype(np.int64), "precision": precision, "recall": recall,
            "f1": f1}


def best_index(f1: np.ndarray, thresholds: np.ndarray) -> int:
    """Index of the highest F1; among ties the highest threshold (fewest predictions, the safest to act on)."""
    f1 = np.asarray(f1)
    top = np.flatnonzero(f1 >= f1.max() - 1e-12) if len(f1) else np.zeros(0, np.int64)
    if not len(top):
        raise ValueError("no thresholds")
    return int(top[np.argmax(np.asarray(thresholds)[top])])


class _RankStats:
    """Accumulates recall@k and average precision query by query (see the module's definitions)."""

    def __init__(self, ks: Sequence[int]) -> None:
        self.ks = tuple(int(k) for k in ks)
        self.hits = np.zeros(len(self.ks), np.int64)
        self.ap_sum = 0.0
        self.queries = 0

    def add(self, row: np.ndarray, positives: np.ndarray) -> None:
        """One query: `row` = its scores against every evaluated image (itself at -inf), `positives` = columns
        of its group-mates."""
        pos = np.sort(row[positives])[::-1]  # positives' scores, best first
        cut = pos - np.float32(TIE_TOL)  # a score >= cut ties with (or beats) that positive
        if len(pos) > 32:  # many positives: one sort of the row beats a comparison per positive
            srt = np.sort(row)
            ge_all = len(row) - np.searchsorted(srt, cut, side="left")
        else:
            ge_all = (row[None, :] >= cut[:, None]).sum(1)
        # positives scoring >= the i-th positive's cut (ties after it included): count in the ascending copy
        pos_ge = len(pos) - np.searchsorted(pos[::-1], cut, side="left")
        neg_ge = ge_all - pos_ge  # negatives tied with or above the i-th positive rank before it (pessimistic)
        i = np.arange(1, len(pos) + 1)
        ranks = i + neg_ge
        self.ap_sum += float(np.mean(i / ranks))
        self.hits += ranks[0] <= np.array(self.ks)
        self.queries += 1

    def result(self) -> dict[str, float | int | None]:
        out: dict[str, float | int | None] = {"queries": self.queries}
        for k, h in zip(self.ks, self.hits.tolist()):
            out[f"recall@{k}"] = h / self.queries if self.queries else None
        out["map"] = self.ap_sum / self.queries if self.queries else None
        return out


def _mates(labels: np.ndarray) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    labels = np.asarray(labels)
    members: dict[int, np.ndarray] = {}
    order = np.argsort(labels, kind="stable")
    uniq, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    for lab, st, c in zip(uniq.tolist(), starts.tolist(), counts.tolist()):
        if c > 1:
            members[lab] = order[st:st + c]
    queries = np.array([r for r in range(len(labels)) if labels[r] in members], np.int64)
    return queries, members


def retrieval_metrics(S: np.ndarray, labels: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """recall@k and mAP from a full square similarity matrix S [n, n] and group labels [n].

    Each row with at least one other row of its label is a query; its own column is ignored. Exact, with
    pessimistic ties (see the module's definitions). Returns {"queries", "recall@k"..., "map"}; the rates
    are None when there are no queries.
    """
    S = np.asarray(S, np.float32)
    stats = _RankStats(ks)
    queries, members = _mates(labels)
    for q in queries.tolist():
        row = S[q].copy()
        row[q] = -np.inf
        m = members[int(labels[q])]
        stats.add(row, m[m != q])
    return stats.result()


def retrieval_metrics_blocked(xb: np.ndarray, labels: np.ndarray, ks: Sequence[int] = DEFAULT_KS,
                              block: int | None = None) -> dict:
    """retrieval_metrics over S = xb @ xb.T, computed block by block of query rows (memory ~ block * n * 4 B)."""
    xb = np.ascontiguousarray(xb, np.float32)
    n = len(xb)
    block = block or int(np.clip((64 << 20) // (4 * max(n, 1)), 16, 4096))
    stats = _RankStats(ks)
    queries, members = _mates(labels)
    for r in range(0, len(queries), block):
        q = queries[r:r + block]
        S = xb[q] @ xb.T
        S[np.arange(len(q)), q] = -np.inf
        for k, qi in enumerate(q.tolist()):
            m = members[int(labels[qi])]
            stats.add(S[k], m[m != qi])
    return stats.result()


# ------------------------------------------------------------------------------------------ verified rankings

def _topk(row: np.ndarray, k: int) -> np.ndarray:
    """Columns of the k highest finite scores of `row`, best first (equal scores: lower column first)."""
    ok = np.flatnonzero(row > -np.inf)
    if len(ok) > k:
        kth = np.partition(row[ok], len(ok) - k)[len(ok) - k]
        above = ok[row[ok] > kth]
        ok = np.concatenate([above, ok[row[ok] == kth][:k - len(above)]])
    return ok[np.lexsort((ok, -row[ok]))]


def _take(v: Verified, idx: np.ndarray | slice | list[int]) -> Verified:
    return Verified(*(getattr(v, f.name)[idx] for f in fields(Verified)))


def _reranked(D: np.ndarray, v: Verified) -> np.ndarray:
    """Scores in (2, 3], above every cosine, that order one query's candidates (cosines `D`, verdicts `v`) as
    rerank() does. Neighbours in that order that only their cosines order, and whose cosines are within
    TIE_TOL, get equal scores, so ties stay pessimistic (see the module) and no number depends on row order."""
    order = rerank(D, v).tolist()
    out = np.empty(len(order), np.float32)
    for p, c in enumerate(order):
        out[c] = 2 + (len(order) - p) / len(order)
        if p:
            a = order[p - 1]
            # does the cosine decide between a and c? Lower a's below c's: rerank then puts c first
            if abs(float(D[a]) - float(D[c])) <= TIE_TOL and \
                    rerank(np.array([D[c] - 1, D[c]], np.float64), _take(v, [a, c]))[0] == 1:
                out[c] = out[a]
    return out


class _Verifier:
    """Verdicts of (query, catalogue) pairs by index, each pair verified once; features are loaded on demand
    (`load_q`/`load_e`: indices -> features) into `fq`/`fe` (the same dict when queries are catalogue rows);
    each call is a stage "verify" of `progress`."""

    def __init__(self, fq: dict, load_q: Callable, fe: dict, load_e: Callable, workers: int,
                 progress: Progress | None = None) -> None:
        self.fq, self.load_q, self.fe, self.load_e, self.workers = fq, load_q, fe, load_e, workers
        self.progress = progress
        self.index: dict[tuple[int, int], int] = {}
        self.done = Verified.of([])

    @staticmethod
    def _load(have: dict, load: Callable, need: set[int]) -> None:
        need_ = sorted(x for x in need if x not in have)
        if need_:
            have.update(zip(need_, load(np.array(need_, np.int64))))

    def __call__(self, a: np.ndarray, b: np.ndarray) -> Verified:
        keys = list(zip(np.asarray(a).tolist(), np.asarray(b).tolist()))
        todo = sorted(set(keys) - self.index.keys())
        if todo:
            self._load(self.fq, self.load_q, {x for x, _ in todo})
            self._load(self.fe, self.load_e, {y for _, y in todo})
            with stage_of(self.progress, "verify", len(todo), "pairs") as p:
                v = verify_pairs([self.fq[x] for x, _ in todo], [self.fe[y] for _, y in todo], workers=self.workers,
                                 progress=p)
            self.index.update((key, len(self.done) + t) for t, key in enumerate(todo))
            self.done = Verified(*(np.concatenate([getattr(self.done, f.name), getattr(v, f.name)])
                                   for f in fields(Verified)))
        return _take(self.done, np.array([self.index[key] for key in keys], np.int64))


def _retrieval(xq: np.ndarray, xe: np.ndarray, queries: np.ndarray, positives: Callable[[int], np.ndarray],
               mask: Callable[[np.ndarray, np.ndarray], None], ks: Sequence[int], block: int | None,
               k: int = 0, verifier: _Verifier | None = None) -> dict:
    """recall@k and mAP of `queries` (rows of xq) ranked against the rows of xe, block by block of queries:
    `positives(q)` are q's true columns; `mask(S, q)` puts what q must not see (itself, junk) at -inf. With
    `verifier`, each query's top k are verified and re-ranked above the cosine order of the rest."""
    xq, xe = np.ascontiguousarray(xq, np.float32), np.ascontiguousarray(xe, np.float32)
    block = block or int(np.clip((64 << 20) // (4 * max(len(xe), 1)), 16, 4096))

    def rows():
        for r in range(0, len(queries), block):
            q = queries[r:r + block]
            S = xq[q] @ xe.T
            mask(S, q)
            yield from zip(q.tolist(), S)

    stats = _RankStats(ks)
    if verifier is None:
        for q, row in rows():
            stats.add(row, positives(q))
        return stats.result()
    top = [_topk(row, k) for _, row in rows()]  # pass 1: the candidates; then verify them all at once
    lens = np.array([len(t) for t in top], np.int64)
    v = verifier(np.repeat(queries, lens), np.concatenate(top) if top else np.zeros(0, np.int64))
    ends = np.cumsum(lens)
    for n, (q, row) in enumerate(rows()):  # pass 2: the same scores, the top k re-ranked
        if lens[n]:
            row[top[n]] = _reranked(row[top[n]], _take(v, slice(ends[n] - lens[n], ends[n])))
        stats.add(row, positives(q))
    return stats.result()


def _junk(qlab: np.ndarray, qcls: np.ndarray, elab: np.ndarray, ecls: np.ndarray) -> np.ndarray:
    """Pairwise (broadcast) "different group, same non-empty class" of labels and class ids (-1: no class)."""
    return (qcls == ecls) & (qcls >= 0) & (qlab != elab)


def _pairs_in(counts: Counter) -> int:
    return sum(c * (c - 1) // 2 for c in counts.values())


def _query_candidates(xq: np.ndarray, xe: np.ndarray, k: int, t_min: float,
                      block: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(I, J, D): each query row's top k rows of xe scoring >= t_min (float32), by query then score."""
    block = block or int(np.clip((64 << 20) // (4 * max(len(xe), 1)), 16, 4096))
    out_i, out_j, out_d = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    for r in range(0, len(xq), block):
        S = np.ascontiguousarray(xq[r:r + block], np.float32) @ np.ascontiguousarray(xe, np.float32).T
        for n, row in enumerate(S):
            c = _topk(row, k)
            c = c[row[c] >= np.float32(t_min)]
            out_i.append(np.full(len(c), r + n, np.int64))
            out_j.append(c.astype(np.int64))
            out_d.append(row[c])
    return np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d).astype(np.float32)
