"""Search stage 4a, listed: the pairs `neardup duplicates` calls duplicates, scored against a truth, and the
settings that produced them (the flags that reproduce them, where their thresholds came from). `evaluate`
scores its default row with these, so that it measures exactly what `duplicates` lists.
"""
from __future__ import annotations

import numpy as np

from ..progress import Progress
from ..store.generation import Generation
from .dup_records import DuplicateReport
from .duplicates import find_duplicates
from .metrics import _junk


def listed_pairs(report: DuplicateReport) -> tuple[np.ndarray, np.ndarray]:
    """The (row, row) pairs a duplicates report calls duplicates: verified or byte-identical ones when it
    verified (its unverified pairs are listed for review only), else all of them; each pair once, low row first."""
    keep = report.verified if report.verify else np.ones(report.n_pairs, bool)
    a, b = report.I[keep], report.J[keep]
    pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], 1).reshape(-1, 2), axis=0)
    return pairs[:, 0], pairs[:, 1]


def listed_counts(report: DuplicateReport, ev: np.ndarray, labels: np.ndarray, cid: np.ndarray | None,
                  n_true: int) -> dict:
    """Score the pairs `report` lists against truth labels of the evaluated rows `ev` (catalog rows): pairs
    with a row outside `ev` are not counted, nor pairs of different groups and one class (`cid`, None: no
    class column). Returns the settings of the report with predicted, tp, fp, fn, precision, recall, f1."""
    pos = np.full(report.n, -1, np.int64)
    pos[ev] = np.arange(len(ev))
    a, b = listed_pairs(report)
    a, b = pos[a], pos[b]
    inside = (a >= 0) & (b >= 0)
    a, b = a[inside], b[inside]
    if cid is not None:
        junk = _junk(labels[a], cid[a], labels[b], cid[b])
        a, b = a[~junk], b[~junk]
    tp = int((labels[a] == labels[b]).sum())
    fp, fn = len(a) - tp, n_true - tp
    p = tp / len(a) if len(a) else 1.0
    r = tp / n_true if n_true else 0.0
    return {"threshold": float(report.threshold), "verify": bool(report.verify),
            "candidate_threshold": float(report.loose_threshold) if report.verify else None,
            "k": int(report.k) if report.verify else None, "predicted": len(a), "tp": tp, "fp": fp, "fn": fn,
            "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def listed_flags(listed: dict) -> str:
    """The flags of `neardup duplicates` that reproduce the settings of `listed` (listed_counts)."""
    if not listed["verify"]:
        return f"--no-verify --threshold {listed['threshold']:.4g}"
    return (f"--threshold {listed['threshold']:.4g} --candidate-threshold {listed['candidate_threshold']:.4g} "
            f"-k {listed['k']}")


def threshold_source(gen: Generation, threshold: float | None, loose: float | None, verify: bool) -> str:
    """Where the thresholds in use came from: the command line, the store's settings (evaluate --fit --apply),
    or the model's defaults (`loose` counts only with `verify`)."""
    s = gen.settings
    given = threshold is not None or (verify and loose is not None)
    applied = ((threshold is None and s.threshold is not None)
               or (verify and loose is None and s.candidate_threshold is not None))
    what = [w for w, on in (("the command line", given),
                            (f"the store's settings ({s.source or 'evaluate --fit --apply'})", applied)) if on]
    return " and ".join(what) if what else f"the defaults of model {gen.meta.model.name}"


def score_listed(gen: Generation, ev: np.ndarray, labels: np.ndarray, cid: np.ndarray | None, n_true: int, *,
                 threshold: float | None, verify: bool, k: int | None, loose_threshold: float | None, workers: int,
                 progress: Progress | None = None) -> dict:
    """find_duplicates at these settings (None: as duplicates resolves them), scored by listed_counts, with
    where its thresholds came from ("source")."""
    report = find_duplicates(gen, threshold=threshold, verify=verify, k=k, loose_threshold=loose_threshold,
                             workers=workers, progress=progress)
    listed = listed_counts(report, ev, labels, cid, n_true)
    listed["source"] = threshold_source(gen, threshold, loose_threshold, verify)
    return listed


def default_line(at: dict, listed: dict, flag: str, threshold: float) -> str:
    """What evaluate's default row means: with `listed`, the pairs `neardup duplicates` lists, scored."""
    scores = f"precision {at['precision']:.4f}, recall {at['recall']:.4f}, F1 {at['f1']:.4f}"
    if not listed:
        return f"default threshold {threshold:.4f} ({flag}): {scores}"
    return (f"what `neardup duplicates {listed_flags(listed)}` lists ({listed['source']}): {listed['predicted']} "
            f"pairs among the evaluated images, TP {listed['tp']}, FP {listed['fp']}, FN {listed['fn']}: {scores}; "
            f"{flag} {threshold:.4f} decides them")
