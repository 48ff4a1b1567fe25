"""What an evaluation measured (`EvalResult`): every number, its JSON document and the table `evaluate` prints."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .listed import default_line
from .metrics import DEFINITIONS


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
    mode: str = "store"  #: "store" (pairs among evaluated images) or "query" (query photos vs the catalogue)
    verify: bool = False  #: candidates were geometrically verified and rankings re-ranked
    k: int = 0  #: neighbours per image (query) among the candidates / re-ranked
    ignored_pairs: int = 0  #: pairs of evaluated images of different groups and one class (neither right nor wrong)
    ignored_candidates: int = 0  #: candidate pairs left out as ignored
    verified_candidates: int = 0  #: candidates (byte-identical ones aside) that passed verification
    query_images: int = 0  #: rows of role query in the truth (query mode)
    queries_without_mate: int = 0  #: decoded query photos with no catalogue image of their group
    queries_failed: list[tuple[str, str]] = field(default_factory=list)  #: (path as written, reason), all of them
    definitions: dict[str, str] = field(default_factory=lambda: dict(DEFINITIONS))
    default_flag: str = "--threshold"  #: the flag of `duplicates` (and evaluate) that moves the default row
    listed: dict = field(default_factory=dict)  #: store mode: what duplicates lists, scored (listed.score_listed)

    def to_dict(self) -> dict:
        """JSON-ready dict of every number."""
        return asdict(self)

    def __str__(self) -> str:
        r = self.retrieval
        ret = (f"; recall@1 {r['recall@1']:.3f}, mAP {r['map']:.3f} over {r['queries']} queries"
               if r.get("queries") and "recall@1" in r else "")
        how = [w for w, on in (("verified", self.verify), ("query mode", self.mode == "query")) if on]
        how = f" ({', '.join(how)})" if how else ""
        fail = f"; {len(self.queries_failed)} query photos failed" if self.queries_failed else ""
        return (f"best F1 {self.best['f1']:.3f} at t={self.best['threshold']:.4f}{how} "
                f"(P {self.best['precision']:.3f}, R {self.best['recall']:.3f}); at the default "
                f"t={self.default_threshold:.4f}: P {self.at_default['precision']:.3f}, "
                f"R {self.at_default['recall']:.3f}, F1 {self.at_default['f1']:.3f}{ret}{fail}")

    def table(self, every: float = 0.05) -> str:
        """A readable report: counts, P/R/F1 every `every` plus the default and best thresholds, retrieval."""
        t_min = min(self.sweep["thresholds"])
        lines = [f"store {self.store} (model {self.model}), truth {self.truth}",
                 f"images: {self.images_in_store} in the store, {self.images_in_truth} in the truth, "
                 f"{self.evaluated} evaluated" + (" catalogue images" if self.mode == "query" else ""),
                 f"  {self.truth_missing_from_store} truth rows not in the store"
                 + (f" (e.g. {', '.join(self.missing_examples[:3])})" if self.missing_examples else ""),
                 f"  {self.store_missing_from_truth} store images not in the truth (ignored)"]
        if self.mode == "query":
            lines.append(f"query mode: {self.query_images} query photos ranked against the catalogue images, "
                         f"{len(self.queries_failed)} failed to decode"
                         + "".join(f"\n    {p}: {why}" for p, why in self.queries_failed[:3])
                         + (f"; {self.queries_without_mate} have no catalogue image of their group"
                            if self.queries_without_mate else ""))
        if self.ignored_pairs:
            lines.append(f"  {self.ignored_pairs} pairs of different groups and one class are ignored "
                         f"({self.ignored_candidates} of them were candidates)")
        if self.verify:
            who = "each query's" if self.mode == "query" else "each image's"
            lines.append(f"true pairs {self.true_pairs}; verified pairs: predicted pair = candidate (one of "
                         f"{who} {self.k} nearest scoring >= {t_min:.4f}: {self.candidate_pairs} candidates) "
                         f"scoring >= t and geometrically verified ({self.verified_candidates} of them), or "
                         f"byte-identical")
        elif self.mode == "query":
            lines.append(f"true pairs {self.true_pairs}; predicted pair = one of each query's {self.k} nearest "
                         f"catalogue images with cosine >= t, or byte-identical")
        else:
            lines.append(f"true pairs {self.true_pairs}; predicted pair = cosine >= t or byte-identical")
        lines += ["", f"{'threshold':>10} {'predicted':>10} {'TP':>8} {'FP':>8} "
                      f"{'FN':>8} {'precision':>10} {'recall':>8} {'F1':>8}"]
        sw = self.sweep
        ts = np.asarray(sw["thresholds"])
        bt, dt = self.best["threshold"], self.default_threshold
        for k, t in enumerate(ts.tolist()):
            on_grid = abs(t / every - round(t / every)) < 1e-6
            if not (on_grid or t == bt or t == dt):
                continue
            mark = "  <- best F1" if t == bt else ""
            mark += f"  <- default ({self.default_flag} of duplicates)" if t == dt else ""
            lines.append(f"{t:>10.4f} {sw['predicted'][k]:>10} {sw['tp'][k]:>8} {sw['fp'][k]:>8} "
                         f"{sw['fn'][k]:>8} {sw['precision'][k]:>10.4f} {sw['recall'][k]:>8.4f} "
                         f"{sw['f1'][k]:>8.4f}{mark}")
        lines += ["", f"best F1 {self.best['f1']:.4f} at threshold {bt:.4f} "
                      f"(precision {self.best['precision']:.4f}, recall {self.best['recall']:.4f})",
                  default_line(self.at_default, self.listed, self.default_flag, dt)]
        r = self.retrieval
        among = "the catalogue images" if self.mode == "query" else "the evaluated images"
        rer = f"; top {self.k} re-ranked by verification" if self.verify else ""
        if r.get("queries"):
            ks = "  ".join(f"{k} {v:.4f}" for k, v in r.items() if k.startswith("recall@"))
            who = ("each query photo with a catalogue image of its group" if self.mode == "query" else
                   "each image with a group-mate")
            lines.append(f"retrieval over {r['queries']} queries ({who}; ranked among {among}{rer}): {ks}  "
                         f"mAP {r['map']:.4f}")
        else:
            lines.append("retrieval: no image has a group-mate in the store, so there are no queries")
        lines.append(f"({self.seconds:.1f} s)")
        return "\n".join(lines)
