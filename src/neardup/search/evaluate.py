"""Search stage 4, evaluate: score a store's duplicate detection and retrieval against a hand-made ground truth.

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

The default row is the threshold that decides what `neardup duplicates` lists on the store, resolved as it
resolves it; in store mode `at_default` scores find_duplicates' own pairs (search/listed.py).

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DEFAULTS, stored_model_spec
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
from .eval_result import EvalResult
from .join import candidate_pairs, exact_pairs, self_join, without_pairs
from .listed import score_listed
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


@dataclass(frozen=True)
class EvalOptions:
    """How evaluate() scores: `thresholds` (default 0.50..1.00 by 0.01) plus `threshold` (default: the model's, or
    with verification its candidates' loose threshold), reported separately; recall@`ks`; `verify` (None:
    DEFAULTS.verify for a store that caches local features) with each image's `k` nearest as candidates (default:
    the model's), verified by `workers` threads; in query mode, the query photos embedded as query() does."""

    thresholds: Sequence[float] | None = None
    threshold: float | None = None
    ks: Sequence[int] = DEFAULT_KS
    block: int | None = None  #: rows of a similarity block
    verify: bool | None = None
    k: int | None = None
    embedder: Embedder | None = None
    weights: str | None = None
    precision: str = DEFAULTS.precision
    runtime: str | None = None
    batch_size: int = DEFAULTS.batch_size
    max_file_bytes: int = DEFAULTS.max_file_bytes
    workers: int = DEFAULTS.verify_workers
    loose_threshold: float | None = None  #: duplicates' --candidate-threshold (default: the store's, else the model's)


def evaluate(store: Generation | str | os.PathLike[str], truth: str | os.PathLike[str],
             options: EvalOptions | None = None, *, progress: Progress | None = None,
             **fields: Any) -> EvalResult:
    """Score a store (an open Generation or a path) against a truth CSV (see the module): pair P/R/F1 over a
    threshold sweep and query recall@k / mAP. `options`, with any of its fields given as keywords instead or on top
    (`verify=False`). Without verification the duplicate search runs once, by the blocked self-join at the lowest
    threshold; its memory grows with the pairs above it: raise the sweep's lower end for a large store. `progress`
    is told of each stage. Raises InputError (bad truth, no truth image in the store, no true pairs, no readable
    query photo)."""
    o, truth = replace(options or EvalOptions(), **fields), Path(truth)
    with opened(store) as gen:
        t0 = time.perf_counter()
        rows = read_truth_rows(truth)
        cat = gen.read()
        model = cat.meta.model.name
        spec = stored_model_spec(model)
        verify = resolve_verify(o.verify, cat.meta.local_features)
        # the default row: the threshold deciding duplicates' pairs, resolved as it does (verified: the loose one)
        t_default = gen.candidate_threshold(o.loose_threshold) if verify else gen.threshold(o.threshold)
        sweep = np.unique(np.round(np.array(list(o.thresholds or DEFAULT_SWEEP) + [t_default], np.float64), 6))
        if not np.all((sweep >= -1) & (sweep <= 1)):
            raise InputError("thresholds must be cosines between -1 and 1")
        t_min = float(sweep.min())
        k = spec.candidates if o.k is None else int(o.k)
        if k < 1:
            raise InputError("k must be at least 1")
        base = gen.folder
        row_of: dict[Path, int] = {}
        for r, p in enumerate(cat.paths):
            row_of.setdefault(Path(os.path.normpath(base / p)).resolve(), r)
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

        ev_rows, ev_labels, ev_cls, missing = [], [], [], []
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
        xe = cat.xb[ev]
        n = len(ev)

        def load_rows(idx: np.ndarray) -> list:
            return row_features(gen, ev[idx])

        failed: list[tuple[str, str]] = []
        if mode == "store":
            fe: dict = {}
            verifier = _Verifier(fe, load_rows, fe, load_rows, o.workers, progress) if verify else None
            # Candidates: every pair at or above the lowest threshold (verified: each image's k nearest of those, and
            # as duplicates takes them, its photos sharing the most keypoint words, counted at the default
            # threshold whatever their cosine), once, plus byte-identical files at 1.0.
            words = spec.word_candidates if verify and gen.meta.local_features == LOCAL_VERSION else 0
            with stage_of(progress, "candidates", n, "img") as p:
                I, J, D, by_words = (candidate_pairs(xe, k, t_min, local=gen.local(ev) if words else None, words=words,
                                                     progress=p) if verify else (*self_join(xe, t_min, progress=p), 0))
            D = np.where(by_words, np.maximum(D, np.float32(t_default)), D).astype(np.float32)
            ei, ej = exact_pairs([cat.sha256[r] for r in ev.tolist()])
            I, J, D = without_pairs((I, J, D), ei, ej, n)
            I, J = np.concatenate([ei, I]), np.concatenate([ej, J])
            D = np.concatenate([np.ones(len(ei), np.float32), D])
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
            emb = store_embedder(gen.meta, gen.files.store, weights=o.weights, precision=o.precision,
                                 embedder=o.embedder, runtime=o.runtime)
            by_path = {str(r.full): r for r in query_rows}
            # decoded as the store's photos were (at >= 256 px when it caches features), as query() does
            with stage_of(progress, "embed", len(by_path), "img") as p:
                got = embed_files(list(by_path), emb, batch_size=o.batch_size, max_bytes=o.max_file_bytes,
                                  local=verify or bool(cat.meta.local_features), progress=p)
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
            verifier = (_Verifier(dict(enumerate(got.local)), lambda idx: [None] * len(idx), fe, load_rows, o.workers,
                                  progress) if verify else None)
            # Candidates: each query's top k catalogue images at or above the lowest threshold, plus byte-identical
            # catalogue files at 1.0.
            I, J, D = _query_candidates(xq, xe, k, t_min, o.block)
            by_sha: dict[str, list[int]] = {}
            for c, r in enumerate(ev.tolist()):
                by_sha.setdefault(cat.sha256[r], []).append(c)
            ei, ej = [], []
            for q, p in enumerate(got.paths):
                try:
                    sha = read_file(p, o.max_file_bytes)[1]
                except DecodeError:
                    continue
                for c in by_sha.get(sha, []):
                    ei.append(q)
                    ej.append(c)
            ei, ej = np.array(ei, np.int64), np.array(ej, np.int64)
            I, J, D = without_pairs((I, J, D), ei, ej, n)
            I, J = np.concatenate([ei, I]), np.concatenate([ej, J])
            D = np.concatenate([np.ones(len(ei), np.float32), D])
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

        at_default, listed = point(d), {}
        if mode == "store":  # the default row, scored on exactly the pairs `neardup duplicates` lists
            listed = score_listed(gen, ev, labels, cid if class_of else None, n_true, threshold=o.threshold,
                                  verify=verify, k=k, loose_threshold=o.loose_threshold, workers=o.workers,
                                  progress=progress)
            at_default = {"threshold": float(sweep[d]), **{x: listed[x] for x in ("precision", "recall", "f1")}}

        def mask(S: np.ndarray, q: np.ndarray) -> None:
            if mode == "store":
                S[np.arange(len(q)), q] = -np.inf
            if class_of:
                S[_junk(qlab[q][:, None], qcid[q][:, None], labels[None, :], cid[None, :])] = -np.inf

        if mode == "store" and verifier is None and not class_of:
            retrieval = retrieval_metrics_blocked(xe, labels, o.ks, o.block)  # the plain case, as it always was
        else:
            retrieval = _retrieval(xq, xe, queries, positives, mask, o.ks, o.block, k, verifier)
        return EvalResult(
            store=str(gen.path), truth=str(truth), model=model, images_in_store=len(cat),
            images_in_truth=len(rows), evaluated=n, truth_missing_from_store=len(missing),
            store_missing_from_truth=len(unlabelled), true_pairs=n_true, candidate_pairs=int(len(D)),
            default_threshold=float(sweep[d]), default_flag="--candidate-threshold" if verify else "--threshold",
            listed=listed, sweep={k: v.tolist() for k, v in m.items()}, best=point(b), at_default=at_default,
            retrieval=retrieval,
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
