"""Search stage 4, evaluate: score a store's duplicate detection and retrieval against a hand-made ground truth.

Ground truth is a CSV with the header `path,group`: every listed image belongs to one group, and two images
of the same group are duplicates of each other (an empty group means "no duplicate"). Paths are relative
to the CSV's own folder, or absolute; they are matched to store rows by resolved absolute path. Only
images that are both in the store and in the truth are evaluated: truth rows missing from the store and
store rows missing from the truth are counted and reported, never fatal.

Definitions (also written into the JSON output):

* Pair level. A predicted pair is two evaluated images with cosine >= t (compared in float32, exactly as
  `neardup duplicates` does) or with identical content hashes (score 1.0). A true pair is two evaluated
  images of the same truth group. precision = TP / predicted (1.0 when nothing is predicted), recall =
  TP / true pairs (1.0 when there are none), F1 = their harmonic mean (0 when both are 0).
* Query level. Every evaluated image with at least one other evaluated member of its group is a query.
  All other evaluated images are ranked by cosine (exactly, by blocked matrix products); ties are broken
  pessimistically (a true match tied with a false one ranks below it), so no number depends on row order.
  Scores within TIE_TOL (1e-6) of each other count as tied: float32 products computed in another order (a
  row at a time, another CPU's BLAS kernel) differ by ~1e-7, and must not reorder equal scores.
  recall@k = fraction of queries with at least one true match among their top k. mAP = mean over queries
  of the average precision over the full ranking of all their group-mates (exact, not truncated).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import resolve_threshold
from ..errors import InputError
from ..fileio import atomic_write, check_output_path
from ..indexer.store import read_catalog
from .duplicates import exact_pairs, self_join

log = logging.getLogger(__name__)

#: The default threshold sweep: 0.50, 0.51, ..., 1.00 (the model's default threshold is added to it).
DEFAULT_SWEEP = tuple(round(0.50 + k / 100, 2) for k in range(51))
#: Cut-offs of recall@k.
DEFAULT_KS = (1, 5, 10)
#: Scores this close count as tied in rankings: above float32 rounding of a cosine (~1e-7), far below the
#: gaps between different photos' scores.
TIE_TOL = 1e-6
#: Examples of unmatched paths kept in the result (the counts are always complete).
EXAMPLES = 20

DEFINITIONS = {
    "predicted_pair": "two evaluated images with cosine >= t (float32 comparison, as neardup duplicates) "
                      "or identical content hashes (score 1.0)",
    "true_pair": "two evaluated images in the same truth group",
    "precision": "TP / predicted pairs; 1.0 when nothing is predicted",
    "recall": "TP / true pairs; undefined without true pairs (evaluate refuses such a truth)",
    "f1": "2PR / (P + R); 0 when P + R = 0; undefined with recall",
    "best": "the threshold of highest F1 (ties: the highest such threshold, the most conservative)",
    "query": "an evaluated image with at least one other evaluated member of its truth group",
    "ranking": "all other evaluated images by cosine, exact (blocked matrix products); ties (scores within "
               f"{TIE_TOL:g}) broken pessimistically: a true match tied with a false one ranks below it",
    "recall_at_k": "fraction of queries with at least one true match among their top k",
    "map": "mean over queries of average precision over the full ranking of all their group-mates "
           "(exact, not truncated)",
    "evaluated": "images both in the store and in the truth; other store images are ignored",
}


# ----------------------------------------------------------------------------------------- pure core functions

def pair_metrics(scores: np.ndarray, is_true: np.ndarray, n_true: int,
                 thresholds: Sequence[float]) -> dict[str, np.ndarray]:
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


# --------------------------------------------------------------------------------------------- ground truth

def read_truth(truth: str | os.PathLike[str]) -> list[tuple[str, Path, str]]:
    """Rows of a truth CSV as (path as written, resolved absolute path, group). Raises InputError."""
    truth = Path(truth)
    if not truth.is_file():
        raise InputError(f"no truth file at {truth}")
    base = truth.resolve().parent
    rows: dict[Path, tuple[str, Path, str]] = {}
    try:
        with open(truth, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            if "path" not in cols or "group" not in cols:
                raise InputError(f"{truth} must be a CSV with the header path,group "
                                 f"(found: {','.join(cols) or 'nothing'})")
            for line, raw in enumerate(reader, start=2):
                row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
                if not row.get("path"):
                    raise InputError(f"{truth}, line {line}: empty path")
                full = Path(os.path.normpath(base / row["path"])).resolve()
                group = row.get("group", "")
                if full in rows and rows[full][2] != group:
                    raise InputError(f"{truth}, line {line}: {row['path']} is listed in two groups "
                                     f"({rows[full][2]!r} and {group!r})")
                rows.setdefault(full, (row["path"], full, group))
    except UnicodeDecodeError:
        raise InputError(f"{truth} is not a UTF-8 text file") from None
    except csv.Error as exc:
        raise InputError(f"{truth} is not a readable CSV ({exc})") from None
    if not rows:
        raise InputError(f"{truth} lists no images")
    return list(rows.values())


# ----------------------------------------------------------------------------------------------- evaluation

@dataclass
class EvalResult:
    """Everything evaluate() measured; to_dict() is the JSON document."""

    store: str
    truth: str
    model: str
    images_in_store: int
    images_in_truth: int
    evaluated: int
    truth_missing_from_store: int
    store_missing_from_truth: int
    true_pairs: int
    candidate_pairs: int
    default_threshold: float
    sweep: dict[str, list]  #: per threshold: thresholds, predicted, tp, fp, fn, precision, recall, f1
    best: dict[str, float]  #: threshold, precision, recall, f1 of the best F1
    at_default: dict[str, float]  #: the same at the default threshold
    retrieval: dict  #: queries, recall@k, map
    missing_examples: list[str] = field(default_factory=list)
    unlabelled_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    definitions: dict[str, str] = field(default_factory=lambda: dict(DEFINITIONS))

    def to_dict(self) -> dict:
        """JSON-ready dict of every number."""
        return asdict(self)

    def __str__(self) -> str:
        r = self.retrieval
        ret = (f"; recall@1 {r['recall@1']:.3f}, mAP {r['map']:.3f} over {r['queries']} queries"
               if r.get("queries") and "recall@1" in r else "")
        return (f"best F1 {self.best['f1']:.3f} at t={self.best['threshold']:.4f} "
                f"(P {self.best['precision']:.3f}, R {self.best['recall']:.3f}); at the default "
                f"t={self.default_threshold:.4f}: P {self.at_default['precision']:.3f}, "
                f"R {self.at_default['recall']:.3f}, F1 {self.at_default['f1']:.3f}{ret}")

    def table(self, every: float = 0.05) -> str:
        """A readable report: counts, P/R/F1 every `every` plus the default and best thresholds, retrieval."""
        lines = [f"store {self.store} (model {self.model}), truth {self.truth}",
                 f"images: {self.images_in_store} in the store, {self.images_in_truth} in the truth, "
                 f"{self.evaluated} evaluated",
                 f"  {self.truth_missing_from_store} truth rows not in the store"
                 + (f" (e.g. {', '.join(self.missing_examples[:3])})" if self.missing_examples else ""),
                 f"  {self.store_missing_from_truth} store images not in the truth (ignored)",
                 f"true pairs {self.true_pairs}; predicted pair = cosine >= t or byte-identical", "",
                 f"{'threshold':>10} {'predicted':>10} {'TP':>8} {'FP':>8} {'FN':>8} {'precision':>10} "
                 f"{'recall':>8} {'F1':>8}"]
        sw = self.sweep
        ts = np.asarray(sw["thresholds"])
        bt, dt = self.best["threshold"], self.default_threshold
        for k, t in enumerate(ts.tolist()):
            on_grid = abs(t / every - round(t / every)) < 1e-6
            if not (on_grid or t == bt or t == dt):
                continue
            mark = "  <- best F1" if t == bt else ""
            mark += "  <- default" if t == dt else ""
            lines.append(f"{t:>10.4f} {sw['predicted'][k]:>10} {sw['tp'][k]:>8} {sw['fp'][k]:>8} "
                         f"{sw['fn'][k]:>8} {sw['precision'][k]:>10.4f} {sw['recall'][k]:>8.4f} "
                         f"{sw['f1'][k]:>8.4f}{mark}")
        lines += ["", f"best F1 {self.best['f1']:.4f} at threshold {bt:.4f} "
                      f"(precision {self.best['precision']:.4f}, recall {self.best['recall']:.4f})",
                  f"default threshold {dt:.4f}: precision {self.at_default['precision']:.4f}, "
                  f"recall {self.at_default['recall']:.4f}, F1 {self.at_default['f1']:.4f}"]
        r = self.retrieval
        if r.get("queries"):
            ks = "  ".join(f"{k} {v:.4f}" for k, v in r.items() if k.startswith("recall@"))
            lines.append(f"retrieval over {r['queries']} queries (each image with a group-mate; ranked among "
                         f"the evaluated images): {ks}  mAP {r['map']:.4f}")
        else:
            lines.append("retrieval: no image has a group-mate in the store, so there are no queries")
        lines.append(f"({self.seconds:.1f} s)")
        return "\n".join(lines)


def evaluate(store: str | os.PathLike[str], truth: str | os.PathLike[str], *,
             thresholds: Sequence[float] | None = None, threshold: float | None = None,
             ks: Sequence[int] = DEFAULT_KS, block: int | None = None) -> EvalResult:
    """Score a store against a truth CSV: pair P/R/F1 over a threshold sweep and query recall@k / mAP.

    `thresholds` defaults to 0.50..1.00 by 0.01; `threshold` (default: the model's documented default) is
    added to the sweep and reported separately. The duplicate search runs once, by search.duplicates'
    blocked self-join at the lowest threshold; its memory grows with the number of pairs above that
    threshold, so raise the sweep's lower end for a large store of a model whose scores run high.
    Raises InputError (bad truth file, no truth image in the store) and StoreError.
    """
    t0 = time.perf_counter()
    truth = Path(truth)
    rows = read_truth(truth)
    cat = read_catalog(store)
    t_default = resolve_threshold(threshold, cat.meta.model)
    sweep = np.unique(np.round(np.array(list(thresholds or DEFAULT_SWEEP) + [t_default], np.float64), 6))
    if not np.all((sweep >= -1) & (sweep <= 1)):
        raise InputError("thresholds must be cosines between -1 and 1")
    base = Path(store).resolve().parent
    row_of: dict[Path, int] = {}
    for r, p in enumerate(cat.paths):
        row_of.setdefault(Path(os.path.normpath(base / p)).resolve(), r)

    # Labels: one integer per truth group; an empty group is a label of its own ("no duplicate").
    label_of: dict[str, int] = {}
    ev_rows, ev_labels, missing = [], [], []
    for written, full, group in rows:
        r = row_of.get(full)
        if r is None:
            missing.append(written)
            continue
        key = group if group else f"\0single:{written}"
        ev_rows.append(r)
        ev_labels.append(label_of.setdefault(key, len(label_of)))
    if not ev_rows:
        raise InputError(f"none of the {len(rows)} images in {truth} is in the store {store} (truth paths are "
                         f"relative to the truth file's folder, store paths to the store's folder)")
    ev = np.array(ev_rows, np.int64)
    labels = np.array(ev_labels, np.int64)
    in_truth = set(ev_rows)
    unlabelled = [p for r, p in enumerate(cat.paths) if r not in in_truth]
    if missing:  # counted in the result and its table; not an error (files may have failed to decode)
        log.info("%d truth rows are not in the store (e.g. %s)", len(missing), missing[0])

    # Candidates: every pair at or above the lowest threshold, once, plus byte-identical files at 1.0.
    xe = cat.xb[ev]
    I, J, D = self_join(xe, float(sweep.min()))
    ei, ej = exact_pairs([cat.sha256[r] for r in ev.tolist()])
    n = len(ev)
    exact_keys = ei * n + ej
    keep = ~np.isin(I * n + J, exact_keys)
    I = np.concatenate([ei, I[keep]])
    J = np.concatenate([ej, J[keep]])
    D = np.concatenate([np.ones(len(ei), np.float32), D[keep]])
    is_true = labels[I] == labels[J]
    _, counts = np.unique(labels, return_counts=True)
    n_true = int((counts * (counts - 1) // 2).sum())
    if n_true == 0:
        raise InputError(f"{truth} has no true pairs among the {n} images in the store (no group holds two of "
                         f"them), so precision, recall and F1 are undefined; give a truth with duplicate groups")
    log.info("%d evaluated images, %d candidate pairs, %d true pairs", n, len(D), n_true)

    m = pair_metrics(D, is_true, n_true, sweep)
    b = best_index(m["f1"], sweep)
    d = int(np.flatnonzero(np.isclose(sweep, round(t_default, 6)))[0])

    def point(k: int) -> dict[str, float]:
        return {"threshold": float(sweep[k]), "precision": float(m["precision"][k]),
                "recall": float(m["recall"][k]), "f1": float(m["f1"][k])}

    retrieval = retrieval_metrics_blocked(xe, labels, ks, block)
    return EvalResult(
        store=str(store), truth=str(truth), model=cat.meta.model, images_in_store=len(cat),
        images_in_truth=len(rows), evaluated=n, truth_missing_from_store=len(missing),
        store_missing_from_truth=len(unlabelled), true_pairs=n_true, candidate_pairs=int(len(D)),
        default_threshold=float(sweep[d]),
        sweep={k: v.tolist() for k, v in m.items()}, best=point(b), at_default=point(d), retrieval=retrieval,
        missing_examples=missing[:EXAMPLES], unlabelled_examples=unlabelled[:EXAMPLES],
        seconds=time.perf_counter() - t0)


def write_eval_json(result: EvalResult, path: str | os.PathLike[str]) -> None:
    """Write result.to_dict() as JSON, atomically."""
    path = Path(path)
    check_output_path(path)
    text = json.dumps(result.to_dict(), indent=1, ensure_ascii=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
