"""Search, evaluate: score a store's duplicate detection and retrieval against a hand-made ground truth.

Ground truth is a CSV with the header `path,group` and two optional columns, `class` and `role`: every listed
image belongs to one group, and two images of the same group are duplicates of each other (an empty group
means "no duplicate"). Paths are relative to the CSV's own folder, or absolute; they are matched to store rows
by resolved absolute path. Only images that are both in the store and in the truth are evaluated: truth rows
missing from the store and store rows missing from the truth are counted and reported, never fatal.

`class`: two images of DIFFERENT groups but the same non-empty class (two shots of one product, say) are
neither right nor wrong: such a pair is never a false positive, and the images are left out of each other's
rankings (junk, as in the Oxford/Paris buildings protocol). They are counted (ignored_pairs).

`role`: rows of role `query` are not looked up in the store: they are photos, embedded with the store's own
model, and ranked against the catalogue (the evaluated rows without a role). Then only this query mode is
scored, pairs and retrieval (groups among the catalogue rows themselves only define the queries' mates).
Query photos that cannot be decoded are counted and listed, never fatal.

With verification (the default for a store that caches local features), scoring follows `duplicates
--verify` and `query --verify`: candidates are each image's k nearest neighbours, and a pair is predicted only
when geometrically verified (search/verify.py); a query's top k are re-ranked by rerank() above the cosine
order of the rest.

The pair- and query-level definitions (predicted and true pairs, ties, recall@k, mAP) are
`metrics.DEFINITIONS`, which the JSON output also carries.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..config import DEFAULTS, candidate_rule, resolve_threshold, word_candidates
from ..embed.decode import read_file
from ..embed.embedders import Embedder
from ..embed.pipeline import embed_files
from ..errors import DecodeError, InputError
from ..features import LOCAL_VERSION
from ..fileio import atomic_write, check_output_path
from ..progress import Progress, stage_of
from ..store.generation import Generation
from ..store.handle import opened
from ..store_embedder import store_embedder
from .join import candidate_pairs, exact_pairs, self_join, without_pairs
from .metrics import (  # noqa: F401 - TIE_TOL
    DEFAULT_KS,
    DEFAULT_SWEEP,
    DEFINITIONS,
    TIE_TOL,
    _junk,
    _mates,
    _pairs_in,
    _query_candidates,
    _retrieval,
    _Verifier,
    best_index,
    pair_metrics,
    retrieval_metrics,
    retrieval_metrics_blocked,
)
from .truth import TruthRow, read_truth, read_truth_rows  # noqa: F401 - read_truth: re-exported
from .verify import resolve_verify, row_features

log = logging.getLogger(__name__)

#: Examples of unmatched paths kept in the result (the counts are always complete).
EXAMPLES = 20



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

    def to_dict(self) -> dict:
        """JSON-ready dict of every number."""
        return asdict(self)

    def __str__(self) -> str:
        r = self.retrieval
        ret = (f"; recall@1 {r['recall@1']:.3f}, mAP {r['map']:.3f} over {r['queries']} queries"
               if r.get("queries") and "recall@1" in r else "")
        ways = [w for w, on in (("verified", self.verify), ("query mode", self.mode == "query")) if on]
        how = f" ({', '.join(ways)})" if ways else ""
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
            mark += "  <- default" if t == dt else ""
            lines.append(f"{t:>10.4f} {sw['predicted'][k]:>10} {sw['tp'][k]:>8} {sw['fp'][k]:>8} "
                         f"{sw['fn'][k]:>8} {sw['precision'][k]:>10.4f} {sw['recall'][k]:>8.4f} "
                         f"{sw['f1'][k]:>8.4f}{mark}")
        lines += ["", f"best F1 {self.best['f1']:.4f} at threshold {bt:.4f} "
                      f"(precision {self.best['precision']:.4f}, recall {self.best['recall']:.4f})",
                  f"default threshold {dt:.4f}: precision {self.at_default['precision']:.4f}, "
                  f"recall {self.at_default['recall']:.4f}, F1 {self.at_default['f1']:.4f}"]
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


def evaluate(store: Generation | str | os.PathLike[str], truth: str | os.PathLike[str], *,
             thresholds: Sequence[float] | None = None, threshold: float | None = None,
             ks: Sequence[int] = DEFAULT_KS, block: int | None = None, verify: bool | None = None,
             k: int | None = None, embedder: Embedder | None = None, weights: str | None = None,
             precision: str = DEFAULTS.precision, runtime: str | None = None,
             batch_size: int = DEFAULTS.batch_size, max_file_bytes: int = DEFAULTS.max_file_bytes,
             workers: int = DEFAULTS.verify_workers, progress: Progress | None = None) -> EvalResult:
    """Score a store against a truth CSV: pair P/R/F1 over a threshold sweep and query recall@k / mAP.

    `thresholds` defaults to 0.50..1.00 by 0.01; `threshold` (default: the model's documented default, or with
    verification its candidates' loose threshold) is added to the sweep and reported separately. Without
    verification the duplicate search runs once, by search.duplicates' blocked self-join at the lowest threshold;
    its memory grows with the number of pairs above it: raise the sweep's lower end for a large store.

    `verify` (None: DEFAULTS.verify for a store that caches local features, off for one made before them)
    scores verified candidates (each image's `k` nearest, default the model's candidate_rule) and re-ranks
    each query's top k (see the module). A truth with rows of role `query` is scored in query mode: those
    photos are embedded with the store's model (`embedder` injects one; `weights`, `precision` and `runtime`
    as for query()) and ranked against the catalogue rows; only query mode is then scored.
    The `class` column marks ignored pairs. `store`: an open Generation or a store's path; `progress`: told of each
    stage. Raises InputError (bad truth, no truth image in the store, no true pairs, no readable query photo).
    """
    with opened(store) as gen:
        return _evaluate(gen, Path(truth), thresholds=thresholds, threshold=threshold, ks=ks, block=block,
                         verify=verify, k=k, embedder=embedder, weights=weights, precision=precision,
                         runtime=runtime, batch_size=batch_size, max_file_bytes=max_file_bytes, workers=workers,
                         progress=progress)


def _evaluate(gen: Generation, truth: Path, *, thresholds: Sequence[float] | None, threshold: float | None,
              ks: Sequence[int], block: int | None, verify: bool | None, k: int | None,
              embedder: Embedder | None, weights: str | None, precision: str, runtime: str | None,
              batch_size: int, max_file_bytes: int, workers: int, progress: Progress | None = None) -> EvalResult:
    t0 = time.perf_counter()
    rows = read_truth_rows(truth)
    cat = gen.read()
    model = cat.meta.model
    verify = resolve_verify(verify, cat.meta.local_features)
    # verified, the default operating point is the candidates' loose threshold (what duplicates uses)
    t_default = resolve_threshold(threshold if threshold is not None or not verify else candidate_rule(model)[1],
                                  model)
    sweep = np.unique(np.round(np.array(list(thresholds or DEFAULT_SWEEP) + [t_default], np.float64), 6))
    if not np.all((sweep >= -1) & (sweep <= 1)):
        raise InputError("thresholds must be cosines between -1 and 1")
    t_min = float(sweep.min())
    k = candidate_rule(model)[0] if k is None else int(k)
    if k < 1:
        raise InputError("k must be at least 1")
    base = gen.folder
    row_of: dict[Path, int] = {}
    for at, p in enumerate(cat.paths):
        row_of.setdefault(Path(os.path.normpath(base / p)).resolve(), at)
    query_rows = [r for r in rows if r.role == "query"]
    mode = "query" if query_rows else "store"

    # Labels: one integer per truth group; an empty group is a label of its own ("no duplicate"). Classes: one
    # integer per non-empty class, -1 for none.
    label_of: dict[str, int] = {}
    class_of: dict[str, int] = {}

    def label(row: TruthRow) -> int:
        return label_of.setdefault(row.group if row.group else f"\0single:{row.written}", len(label_of))

    def klass(row: TruthRow) -> int:
        return class_of.setdefault(row.cls, len(class_of)) if row.cls else -1

    ev_rows, ev_labels, ev_cls = [], [], []
    missing: list[str] = []
    for row in rows:
        if row.role == "query":
            continue
        r = row_of.get(row.full)
        if r is None:
            missing.append(row.written)
            continue
        ev_rows.append(r)
        ev_labels.append(label(row))
        ev_cls.append(klass(row))
    if not ev_rows:
        what = f"{len(rows) - len(query_rows)} catalogue images" if query_rows else f"{len(rows)} images"
        raise InputError(f"none of the {what} in {truth} is in the store {gen.path} (truth paths are "
                         f"relative to the truth file's folder, store paths to the store's folder)")
    ev = np.array(ev_rows, np.int64)
    labels = np.array(ev_labels, np.int64)
    cid = np.array(ev_cls, np.int64)
    in_truth = set(ev_rows)
    unlabelled = [p for r, p in enumerate(cat.paths) if r not in in_truth]
    if missing:  # counted in the result and its table; not an error (files may have failed to decode)
        log.info("%d truth rows are not in the store (e.g. %s)", len(missing), missing[0])
    assert cat.xb is not None  # read with its vectors
    xe = cat.xb[ev]
    n = len(ev)

    def load_rows(idx: np.ndarray) -> list:
        return row_features(gen, ev[idx])

    failed: list[tuple[str, str]] = []
    if mode == "store":
        fe: dict = {}
        verifier = _Verifier(fe, load_rows, fe, load_rows, workers, progress) if verify else None
        # Candidates: every pair at or above the lowest threshold (verified: each image's k nearest of those, and
        # as duplicates takes them, its photos sharing the most keypoint words, counted at the default
        # threshold whatever their cosine), once, plus byte-identical files at 1.0.
        words = word_candidates(model) if verify and gen.meta.local_features == LOCAL_VERSION else 0
        with stage_of(progress, "candidates", n, "img") as st:
            I, J, D, by_words = (candidate_pairs(xe, k, t_min, local=gen.local(ev) if words else None, words=words,
                                                 progress=st) if verify else (*self_join(xe, t_min, progress=st), 0))
        D = np.where(by_words, np.maximum(D, np.float32(t_default)), D).astype(np.float32)
        ei, ej = exact_pairs([cat.sha256[r] for r in ev.tolist()])
        I, J, D = without_pairs((I, J, D), ei, ej, n)
        I, J, D = np.concatenate([ei, I]), np.concatenate([ej, J]), np.concatenate([np.ones(len(ei), np.float32), D])
        exact = np.arange(len(D)) < len(ei)
        qlab, qcid = labels, cid
        is_true = labels[I] == labels[J]
        n_true = _pairs_in(Counter(labels.tolist()))
        ignored = (_pairs_in(Counter(cid[cid >= 0].tolist()))
                   - _pairs_in(Counter(zip(cid[cid >= 0].tolist(), labels[cid >= 0].tolist()))))
        queries, members = _mates(labels)
        xq = xe

        def positives(q: int) -> np.ndarray:
            m = members[int(labels[q])]
            return m[m != q]
    else:
        emb = store_embedder(gen.meta, gen.files.store, weights=weights, precision=precision, embedder=embedder,
                             runtime=runtime)
        by_path = {str(r.full): r for r in query_rows}
        # decoded as the store's photos were (at >= 256 px when it caches features), as query() does
        with stage_of(progress, "embed", len(by_path), "img") as st:
            got = embed_files(list(by_path), emb, batch_size=batch_size, max_bytes=max_file_bytes,
                              local=verify or bool(cat.meta.local_features), progress=st)
        failed = [(by_path[p].written, why) for p, why in got.failures]
        if not got.paths:
            raise InputError(f"none of the {len(query_rows)} query photos of {truth} could be read (e.g. "
                             f"{failed[0][0]}: {failed[0][1]})")
        if failed:
            log.info("%d query photos failed (e.g. %s: %s)", len(failed), *failed[0])
        qr = [by_path[p] for p in got.paths]
        qlab = np.array([label(r) for r in qr], np.int64)
        qcid = np.array([klass(r) for r in qr], np.int64)
        xq = got.xq
        fe = {}
        verifier = (_Verifier(dict(enumerate(got.local or [])), lambda idx: [None] * len(idx), fe, load_rows, workers,
                              progress) if verify else None)
        # Candidates: each query's top k catalogue images at or above the lowest threshold, plus byte-identical
        # catalogue files at 1.0.
        I, J, D = _query_candidates(xq, xe, k, t_min, block)
        by_sha: dict[str, list[int]] = {}
        for c, r in enumerate(ev.tolist()):
            by_sha.setdefault(cat.sha256[r], []).append(c)
        li: list[int] = []
        lj: list[int] = []
        for q, p in enumerate(got.paths):
            try:
                sha = read_file(p, max_file_bytes)[1]
            except DecodeError:
                continue
            for c in by_sha.get(sha, []):
                li.append(q)
                lj.append(c)
        ei, ej = np.array(li, np.int64), np.array(lj, np.int64)
        I, J, D = without_pairs((I, J, D), ei, ej, n)
        I, J, D = np.concatenate([ei, I]), np.concatenate([ej, J]), np.concatenate([np.ones(len(ei), np.float32), D])
        exact = np.arange(len(D)) < len(ei)
        is_true = qlab[I] == labels[J]
        cat_count = Counter(labels.tolist())
        n_true = sum(cat_count.get(lab, 0) for lab in qlab.tolist())
        cls_count = Counter(cid[cid >= 0].tolist())
        cls_lab = Counter(zip(cid[cid >= 0].tolist(), labels[cid >= 0].tolist()))
        ignored = sum(cls_count.get(c, 0) - cls_lab.get((c, lab), 0)
                      for c, lab in zip(qcid.tolist(), qlab.tolist()) if c >= 0)
        members = {lab: np.flatnonzero(labels == lab) for lab in set(qlab.tolist()) & set(cat_count)}
        queries = np.array([q for q in range(len(qr)) if int(qlab[q]) in members], np.int64)

        def positives(q: int) -> np.ndarray:
            return members[int(qlab[q])]

    # Ignored pairs: different groups, one class: neither right nor wrong, never candidates.
    junk = _junk(qlab[I], qcid[I], labels[J], cid[J]) if class_of else np.zeros(len(I), bool)
    I, J, D, exact, is_true = I[~junk], J[~junk], D[~junk], exact[~junk], is_true[~junk]
    if n_true == 0:
        raise InputError(f"{truth} has no true pairs among the {n} images in the store (no group holds two of "
                         f"them), so precision, recall and F1 are undefined; give a truth with duplicate groups"
                         if mode == "store" else
                         f"no query photo of {truth} has a catalogue image of its group in the store, so "
                         f"precision, recall and F1 are undefined")
    verified = 0
    if verifier is not None:  # predicted only when verified (byte-identical files always are)
        ok = exact.copy()
        ok[~exact] = verifier(I[~exact], J[~exact]).verified
        verified = int(ok.sum() - exact.sum())
        D = np.where(ok, D, np.float32(-np.inf)).astype(np.float32)
    log.info("%d evaluated images, %d candidate pairs, %d true pairs", n, len(D), n_true)

    m = pair_metrics(D, is_true, n_true, sweep)
    b = best_index(m["f1"], sweep)
    d = int(np.flatnonzero(np.isclose(sweep, round(t_default, 6)))[0])

    def point(k: int) -> dict[str, float]:
        return {"threshold": float(sweep[k]), "precision": float(m["precision"][k]),
                "recall": float(m["recall"][k]), "f1": float(m["f1"][k])}

    def mask(S: np.ndarray, q: np.ndarray) -> None:
        if mode == "store":
            S[np.arange(len(q)), q] = -np.inf
        if class_of:
            S[_junk(qlab[q][:, None], qcid[q][:, None], labels[None, :], cid[None, :])] = -np.inf

    if mode == "store" and verifier is None and not class_of:
        retrieval = retrieval_metrics_blocked(xe, labels, ks, block)  # the plain case, as it always was
    else:
        retrieval = _retrieval(xq, xe, queries, positives, mask, ks, block, k, verifier)
    return EvalResult(
        store=str(gen.path), truth=str(truth), model=model, images_in_store=len(cat),
        images_in_truth=len(rows), evaluated=n, truth_missing_from_store=len(missing),
        store_missing_from_truth=len(unlabelled), true_pairs=n_true, candidate_pairs=int(len(D)),
        default_threshold=float(sweep[d]),
        sweep={k: v.tolist() for k, v in m.items()}, best=point(b), at_default=point(d), retrieval=retrieval,
        missing_examples=missing[:EXAMPLES], unlabelled_examples=unlabelled[:EXAMPLES],
        seconds=time.perf_counter() - t0, mode=mode, verify=verify, k=k, ignored_pairs=int(ignored),
        ignored_candidates=int(junk.sum()), verified_candidates=verified, query_images=len(query_rows),
        queries_without_mate=len(xq) - len(queries) if mode == "query" else 0, queries_failed=failed)


def write_eval_json(result: EvalResult, path: str | os.PathLike[str]) -> None:
    """Write result.to_dict() as JSON, atomically."""
    path = Path(path)
    check_output_path(path)
    text = json.dumps(result.to_dict(), indent=1, ensure_ascii=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
