"""Search stage 4b, decisions as truth: how well `duplicates` does on the pairs a person reviewed, and the
thresholds that those decisions suggest (`neardup evaluate --decisions`, `--fit`, `--apply`).

The truth is the store's decision journal (store/decisions.py): a pair decided `duplicate` is a positive, one
decided `distinct` a negative; a pair whose photo (by content digest) is no longer in the store is counted as
not evaluated. evaluate_decisions() predicts with the pairs find_duplicates lists at the store's settings
(verified and byte-identical pairs when verifying, as evaluate.listed_pairs), the decisions themselves not
applied: they are what is measured.

fit_thresholds() scores every decided pair once (its cosine and, when verifying, its geometric verdict, as
duplicates judges a candidate) and searches thresholds on a 0.01 grid: a pair is predicted at (--threshold t,
--candidate-threshold c) when it scores >= c (or, for a model with keypoint-word candidates, is one of them,
whatever its score) and is verified, or is too plain to verify and scores >= t (without verification: scores
>= t). Which pairs are each photo's k nearest is not modelled. The rule picks the highest
F1, or the highest recall at precision >= a target; ties go to the thresholds nearest those in use. The numbers
it reports at the proposal are measured on the same decisions it was fitted on (optimistic for new pairs); the
held-out row is the honest estimate: stratified k-fold, each fold judged at the thresholds the same rule picks
from the other folds.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import DEFAULTS, FIT_RULES, stored_model_spec
from ..errors import InputError
from ..features import LOCAL_VERSION
from ..fileio import now_iso
from ..progress import Progress
from ..store.decisions import DECISIONS, pair_key
from ..store.generation import Generation
from ..store.handle import opened
from ..store.settings import StoreSettings, write_settings
from .duplicates import find_duplicates
from .join import word_pairs
from .listed import listed_flags, listed_pairs, threshold_source
from .review import decisions_for
from .verify import resolve_verify, row_features, verify_pairs

#: The threshold grid of the fit.
GRID = np.round(np.arange(-100, 101) / 100, 2)


@dataclass
class DecidedPairs:
    """The current duplicate/distinct decisions of a store, mapped to catalogue rows (one row per digest)."""

    decided: int  #: current decisions (duplicate or distinct)
    a: np.ndarray  #: catalog row of one photo of each evaluated pair
    b: np.ndarray
    positive: np.ndarray  #: bool: decided duplicate
    keys: list[tuple[str, str]]  #: the pairs' digests
    gone: int = 0  #: decided pairs with a photo no longer in the store


def decided_pairs(gen: Generation) -> DecidedPairs:
    """The store's decided pairs whose two photos are in generation `gen`."""
    state = decisions_for(gen)
    row_of: dict[str, int] = {}
    for r, sha in enumerate(gen.catalog.sha256):
        row_of.setdefault(sha, r)
    current = [d for _, d in sorted(state.current.items()) if d.decision in DECISIONS]
    a, b, pos, keys = [], [], [], []
    for d in current:
        ra, rb = row_of.get(d.a), row_of.get(d.b)
        if ra is None or rb is None:
            continue
        a.append(ra)
        b.append(rb)
        pos.append(d.decision == "duplicate")
        keys.append(d.key)
    return DecidedPairs(len(current), np.array(a, np.int64), np.array(b, np.int64), np.array(pos, bool), keys,
                        gone=len(current) - len(keys))


def _scores(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


@dataclass
class DecisionEval:
    """Precision and recall of `duplicates` on a store's decided pairs; to_dict() is the JSON document."""

    store: str
    model: str
    decided: int  #: current decisions (duplicate or distinct)
    evaluated: int  #: of those, pairs whose two photos are in the store
    not_evaluated: int  #: decided pairs with a photo gone from the store
    positives: int
    negatives: int
    tp: int
    fp: int
    fn: int
    tn: int
    precision: float
    recall: float
    f1: float
    settings: dict = field(default_factory=dict)  #: threshold, candidate_threshold, k, verify, source

    def to_dict(self) -> dict:
        """JSON-ready dict of every number."""
        return asdict(self)

    def table(self) -> str:
        """A readable report."""
        s = self.settings
        return "\n".join([
            f"decisions of {self.store} (model {self.model}): {self.decided} decided pairs, {self.evaluated} "
            f"evaluated ({self.positives} duplicate, {self.negatives} distinct), {self.not_evaluated} not "
            f"evaluated (a photo is no longer in the store)",
            f"predicted: what `neardup duplicates {listed_flags(s)}` lists ({s['source']}), the decisions not applied",
            f"TP {self.tp}  FP {self.fp}  FN {self.fn}  TN {self.tn}: precision {self.precision:.4f}, recall "
            f"{self.recall:.4f}, F1 {self.f1:.4f}"])


def evaluate_decisions(store: Generation | str | os.PathLike[str], *, threshold: float | None = None,
                       loose_threshold: float | None = None, verify: bool | None = None, k: int | None = None,
                       workers: int = DEFAULTS.verify_workers, progress: Progress | None = None) -> DecisionEval:
    """Score what find_duplicates lists (at the given settings, else the store's, else the model's) against the
    store's decided pairs. Raises InputError when no decided pair has both photos in the store."""
    with opened(store) as gen:
        pairs = decided_pairs(gen)
        if not len(pairs.a):
            raise InputError(f"{gen.path} has {pairs.decided} decided pairs and none with both photos still in the "
                             f"store: nothing to evaluate (decide pairs with `neardup review import` or the "
                             f"/review page of `neardup serve`)")
        report = find_duplicates(gen, threshold=threshold, verify=verify, k=k, loose_threshold=loose_threshold,
                                 workers=workers, progress=progress, decisions=False)
        sha = gen.catalog.sha256
        li, lj = listed_pairs(report)
        listed = {pair_key(sha[i], sha[j]) for i, j in zip(li.tolist(), lj.tolist())}
        hit = np.array([key in listed for key in pairs.keys], bool)
        pos = pairs.positive
        tp, fp = int((hit & pos).sum()), int((hit & ~pos).sum())
        fn, tn = int((~hit & pos).sum()), int((~hit & ~pos).sum())
        settings = {"threshold": float(report.threshold), "verify": bool(report.verify),
                    "candidate_threshold": float(report.loose_threshold) if report.verify else None,
                    "k": int(report.k) if report.verify else None,
                    "source": threshold_source(gen, threshold, loose_threshold, report.verify)}
        return DecisionEval(str(gen.path), gen.meta.model.name, pairs.decided, len(pairs.a), pairs.gone, int(pos.sum()),
                            int((~pos).sum()), tp, fp, fn, tn, **_scores(tp, fp, fn), settings=settings)


@dataclass
class Fit:
    """Thresholds fitted to a store's decisions, and how they and the ones in use do on those decisions."""

    store: str
    model: str
    rule: str  #: "f1" or "recall" (at precision >= min_precision)
    min_precision: float
    verify: bool
    pairs: int  #: decided pairs evaluated
    positives: int
    negatives: int
    threshold: float
    candidate_threshold: float | None  #: None without verification
    proposed: dict[str, float]  #: tp, fp, fn, precision, recall, f1 at the proposal
    current: dict[str, float | None]  #: the same at the thresholds in use (threshold, candidate_threshold too)
    #: the same, each pair judged at thresholds fitted without its fold (`folds` of them; None: too few pairs)
    held_out: dict[str, float] | None = None
    folds: int = 0
    #: the thresholds in use came from an earlier `evaluate --fit --apply` (fitted to decisions like these: their
    #: figure is in-sample too)
    in_use_fitted: bool = False

    @property
    def moved(self) -> bool:
        """True when the proposal differs from the thresholds in use."""
        c = self.current
        return not (np.isclose(self.threshold, c["threshold"] or 0.0) and
                    (self.candidate_threshold is None or c["candidate_threshold"] is None or
                     np.isclose(self.candidate_threshold, c["candidate_threshold"])))

    def advice(self) -> str:
        """Whether applying is expected to help on new pairs, judged on the rule's own terms: the held-out figures
        (thresholds fitted without the pairs judged) against those of the thresholds in use (nothing fitted
        there, unless an earlier fit applied them). f1: a higher F1; recall: precision at the target, and a higher
        recall (or the thresholds in use missing the target)."""
        if not self.moved:
            return "the thresholds in use are already the best on these decisions: nothing to apply"
        if not self.held_out:
            return "too few decisions of each kind for a held-out estimate: review more pairs before applying"
        ho, now = self.held_out, self.current
        if self.rule == "f1":
            better = ho["f1"] > (now["f1"] or 0.0)
            said = f"held out F1 {ho['f1']:.4f} {'>' if better else 'is not above'} {now['f1'] or 0.0:.4f} in use"
        else:
            target = self.min_precision
            met, now_met = ho["precision"] >= target - 1e-12, (now["precision"] or 0.0) >= target - 1e-12
            better = met and (not now_met or ho["recall"] > (now["recall"] or 0.0))
            said = (f"held out precision {ho['precision']:.4f} {'meets' if met else 'misses'} the target {target:g}"
                    + (f", recall {ho['recall']:.4f} against {now['recall'] or 0.0:.4f} in use" if now_met else
                       f", which the thresholds in use miss ({now['precision'] or 0.0:.4f})"))
        if self.in_use_fitted:
            said += " (the thresholds in use came from an earlier evaluate --fit --apply: their figure is in-sample)"
        if better:
            return f"{said}: the new thresholds are expected to help on pairs nobody has reviewed"
        return f"{said}: the gain may not hold on new pairs; review more pairs before applying"

    def flags(self) -> str:
        """The exact flags that give the proposal."""
        return self.settings().flags() + ("" if self.verify else " --no-verify")

    def settings(self, source: str = "") -> StoreSettings:
        """The proposal as store settings."""
        return StoreSettings(threshold=self.threshold, candidate_threshold=self.candidate_threshold,
                             source=source, at=now_iso() if source else "")

    def table(self) -> str:
        """A readable report."""
        rule = ("the highest F1" if self.rule == "f1" else
                f"the highest recall at precision >= {self.min_precision:g}")
        c, p = self.current, self.proposed

        def line(what: str, m: dict) -> str:
            return (f"  {what:<10} TP {m['tp']:>5}  FP {m['fp']:>5}  FN {m['fn']:>5}  precision {m['precision']:.4f}  "
                    f"recall {m['recall']:.4f}  F1 {m['f1']:.4f}")

        now = f"--threshold {c['threshold']:.4g}" + (
            f" --candidate-threshold {c['candidate_threshold']:.4g}" if self.verify else "")
        return "\n".join([
            f"fit on {self.pairs} decided pairs of {self.store} ({self.positives} duplicate, {self.negatives} "
            f"distinct), model {self.model}{', verified' if self.verify else ''}; rule: {rule} (--fit-rule)",
            line("in use", c) + f"  ({now})",
            line("proposed", p) + f"  ({self.flags()})",
            *([line("held out", self.held_out) + f"  (the rule's thresholds fitted on {self.folds - 1} of "
                                                 f"{self.folds} folds, judged on the fold left out)"]
              if self.held_out else []),
            "(in use and proposed: measured on the same decisions the thresholds were fitted to"
            + ("; held out: what to expect on pairs the fit did not see" if self.held_out else "")
            + "; each pair judged alone, not among its photos' k nearest)",
            self.advice()])


def _pair_features(gen: Generation, a: np.ndarray, b: np.ndarray, verify: bool, workers: int
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Cosine of each pair and, when verifying, (verified, judged) as duplicates judges a candidate."""
    rows, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    x = gen.vectors(rows)
    ia, ib = inverse[:len(a)], inverse[len(a):]
    d = np.einsum("ij,ij->i", x[ia], x[ib]).astype(np.float64)
    if not verify:
        return d, None, None
    feats = row_features(gen, rows)
    v = verify_pairs([feats[i] for i in ia.tolist()], [feats[i] for i in ib.tolist()], workers=workers, screen=True)
    return d, np.asarray(v.verified, bool), np.asarray(v.judged, bool)


def _by_words(gen: Generation, pairs: DecidedPairs) -> np.ndarray:
    """Which decided pairs `duplicates` takes as candidates through the keypoint words whatever their cosine
    (models with word candidates, config.MODEL_TABLE, and a store with local features; else none); by content,
    as decisions are: a pair of byte-identical copies' rows counts for each of them."""
    words = stored_model_spec(gen.meta.model.name).word_candidates
    none = np.zeros(len(pairs.a), bool)
    if not words or gen.meta.local_features != LOCAL_VERSION or len(gen) < 2:
        return none
    table = gen.local()
    if table is None:
        return none
    wi, wj, _ = word_pairs(table.count, table.desc, words)
    sha = gen.catalog.sha256
    found = {pair_key(sha[i], sha[j]) for i, j in zip(wi.tolist(), wj.tolist())}
    return np.array([k in found for k in pairs.keys], bool)


def _fold_counts(pred: np.ndarray, pos: np.ndarray, fold: np.ndarray, folds: int) -> tuple[np.ndarray, np.ndarray]:
    """TP and FP per row of `pred` (thresholds x pairs) and per fold: two (thresholds x folds) arrays."""
    tp = np.stack([(pred & (pos & (fold == f))).sum(-1) for f in range(folds)], -1)
    fp = np.stack([(pred & (~pos & (fold == f))).sum(-1) for f in range(folds)], -1)
    return tp, fp


def _rates(tp: np.ndarray, fp: np.ndarray, npos: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 of counts (no prediction: precision 1)."""
    prec = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
    rec = tp / max(npos, 1)
    # F1 = 2TP / (2TP + FP + FN), one correctly rounded division of integers: equal F1s are equal floats, so ties
    # reach the tie-break (through precision and recall they can differ in the last bit)
    f1 = np.where(tp > 0, 2 * tp / np.maximum(tp + fp + npos, 1), 0.0)
    return prec, rec, f1


def _rule_score(tp: np.ndarray, fp: np.ndarray, npos: int, rule: str, min_precision: float) -> np.ndarray:
    """What the rule maximises at each threshold (the highest F1, or recall where precision holds; -1 where it
    does not)."""
    prec, rec, f1 = _rates(tp, fp, npos)
    return f1 if rule == "f1" else np.where(prec >= min_precision - 1e-12, rec, -1.0)


def _folds_of(pos: np.ndarray, folds: int) -> np.ndarray:
    """A fold number per pair, stratified (each fold holds its share of either kind), seeded: the same
    decisions always split the same way."""
    fold = np.empty(len(pos), np.int64)
    rng = np.random.default_rng(0)
    for kind in (pos, ~pos):
        rows = np.flatnonzero(kind)
        fold[rng.permutation(rows)] = np.arange(len(rows)) % folds
    return fold


def _point(tp: int, fp: int, npos: int) -> dict[str, float]:
    prec, rec, f1 = (float(x) for x in _rates(np.array(tp), np.array(fp), npos))
    return {"tp": int(tp), "fp": int(fp), "fn": npos - int(tp), "precision": prec, "recall": rec, "f1": f1}


def fit_thresholds(store: Generation | str | os.PathLike[str], *, rule: str = DEFAULTS.fit_rule,
                   min_precision: float = DEFAULTS.fit_min_precision, verify: bool | None = None,
                   threshold: float | None = None, loose_threshold: float | None = None,
                   min_pairs: int = DEFAULTS.fit_min_pairs, min_each: int = DEFAULTS.fit_min_each,
                   workers: int = DEFAULTS.verify_workers) -> Fit:
    """Thresholds that best separate a store's decided pairs by `rule` (see the module). `threshold` and
    `loose_threshold` are the ones in use to compare with (default: the store's settings, else the model's).
    Raises InputError on an unknown rule, too few decisions (fewer than `min_pairs` pairs in the store, or
    `min_each` of either kind), or when no thresholds satisfy the rule."""
    if rule not in FIT_RULES:
        raise InputError(f"unknown fit rule {rule!r}: one of {', '.join(FIT_RULES)}")
    if not 0.0 < min_precision <= 1.0:
        raise InputError(f"the fit's minimum precision must be in (0, 1], got {min_precision}")
    with opened(store) as gen:
        pairs = decided_pairs(gen)
        n, npos = len(pairs.a), int(pairs.positive.sum())
        if n < min_pairs or npos < min_each or n - npos < min_each:
            raise InputError(
                f"fitting thresholds needs at least {min_pairs} decided pairs with both photos in the store, at "
                f"least {min_each} of them duplicate and {min_each} distinct; {gen.path} has {n} ({npos} duplicate, "
                f"{n - npos} distinct" + (f"; {pairs.gone} more have a photo no longer in the store" if pairs.gone
                                          else "") + "): review more pairs first")
        verify = resolve_verify(verify, gen.meta.local_features)
        t_now = gen.threshold(threshold)
        applied = gen.settings
        in_use_fitted = applied.source.startswith("evaluate --fit") and (
            (threshold is None and applied.threshold is not None)
            or (verify and loose_threshold is None and applied.candidate_threshold is not None))
        c_now = gen.candidate_threshold(loose_threshold) if verify else None
        c_ref = 0.0 if c_now is None else c_now  # only read when verifying
        d, ver, judged = _pair_features(gen, pairs.a, pairs.b, verify, workers)
        words = _by_words(gen, pairs) if verify else np.zeros(n, bool)
        pos = pairs.positive
        grid_t = np.unique(np.concatenate([GRID, [round(t_now, 6)]]))
        grid_c = np.unique(np.concatenate([GRID, [round(c_ref, 6)]])) if verify else np.array([np.nan])
        folds = max(1, min(DEFAULTS.fit_folds, npos, n - npos))  # 1: no held-out estimate (a kind is missing)
        fold = _folds_of(pos, folds)
        ts, cs, tps, fps = [], [], [], []
        for c in grid_c.tolist():
            if verify:
                assert ver is not None and judged is not None
                near = (d >= c - 1e-9) | words  # the keypoint words' candidates, whatever their cosine
                pred = (near & ver)[None, :] | ((near & ~judged)[None, :] & (d[None, :] >= grid_t[:, None] - 1e-9))
            else:
                pred = d[None, :] >= grid_t[:, None] - 1e-9
            tp, fp = _fold_counts(pred, pos, fold, folds)
            ts.append(grid_t)
            cs.append(np.full(len(grid_t), c))
            tps.append(tp)
            fps.append(fp)
        t_all, c_all = np.concatenate(ts), np.concatenate(cs)
        tp_fold, fp_fold = np.concatenate(tps), np.concatenate(fps)  # (thresholds x folds)
        tp_all, fp_all = tp_fold.sum(1), fp_fold.sum(1)
        score = _rule_score(tp_all, fp_all, npos, rule, min_precision)
        if not (score > 0).any():
            if rule == "f1":
                raise InputError(f"no thresholds find any of the {npos} pairs decided duplicate: nothing to fit")
            raise InputError(f"no thresholds reach precision {min_precision:g} with any recall on these {n} "
                             f"decisions (best F1 {_rates(tp_all, fp_all, npos)[2].max():.3f}); lower "
                             f"--min-precision or use --fit-rule f1")
        # ties: the thresholds nearest those in use (a plateau of the decisions says nothing about moving)
        dist = np.abs(t_all - t_now) + (np.abs(c_all - c_ref) if verify else 0.0)
        best = int(np.lexsort((-t_all, dist, -score))[0])
        now = int(np.flatnonzero(np.isclose(t_all, t_now) & (np.isclose(c_all, c_ref) if verify else True))[0])
        held_out = None
        if folds >= 2:  # each fold judged at what the rule picks from the others (the thresholds in use if none)
            tp_h = fp_h = 0
            for f in range(folds):
                tp_t, fp_t = tp_all - tp_fold[:, f], fp_all - fp_fold[:, f]
                s_t = _rule_score(tp_t, fp_t, npos - int((pos & (fold == f)).sum()), rule, min_precision)
                pick = int(np.lexsort((-t_all, dist, -s_t))[0]) if (s_t > 0).any() else now
                tp_h, fp_h = tp_h + int(tp_fold[pick, f]), fp_h + int(fp_fold[pick, f])
            held_out = _point(tp_h, fp_h, npos)

        return Fit(str(gen.path), gen.meta.model.name, rule, min_precision, verify, n, npos, n - npos,
                   float(t_all[best]), float(c_all[best]) if verify else None,
                   _point(int(tp_all[best]), int(fp_all[best]), npos),
                   {**_point(int(tp_all[now]), int(fp_all[now]), npos), "threshold": float(t_now),
                    "candidate_threshold": c_now}, held_out, folds if held_out else 0, in_use_fitted)


def apply_fit(store: Generation | str | os.PathLike[str], fit: Fit) -> Path:
    """Save a fit's thresholds in the store's settings (without verification, the candidates' threshold
    applied before is kept); returns the settings file. Every command uses them from then on."""
    with opened(store) as gen:
        before = gen.settings
        source = (f"evaluate --fit ({fit.rule}{'' if fit.rule == 'f1' else f' at precision >= {fit.min_precision:g}'}) "
                  f"on {fit.pairs} decided pairs")
        s = fit.settings(source)
        if s.candidate_threshold is None:
            s = StoreSettings(s.threshold, before.candidate_threshold, s.source, s.at)
        return write_settings(gen.files.store, s)
