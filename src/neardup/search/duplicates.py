"""Search stage 2, duplicates: every pair at or above a cosine threshold, and anti-chaining groups with a keeper.

With verification (the default), the pairs are instead each image's k nearest neighbours (FAISS) above the
model's loose candidate threshold that pass geometric verification (search/verify.py); candidates that fail
it but score above the strict threshold are listed too, marked unverified, and never grouped.

Without verification, the all-pairs search is an exact blocked self-join: each block of rows is multiplied
(BLAS sgemm) against the rows after it only, so each pair is computed once (half the work of xb @ xb.T or a
FAISS range search) and memory is bounded by the block, never by n².
"""
from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import DEFAULTS, stored_model_spec
from ..errors import InputError
from ..features import LOCAL_VERSION, LocalFeatures
from ..progress import Progress, stage_of
from ..store.decisions import JournalState
from ..store.generation import Generation
from ..store.handle import opened
from ..store.meta import Catalog
from .candidates import store_knn_pairs
from .dup_records import DuplicateReport, Group, Member, Pair  # noqa: F401 - Pair: importable from here too
from .grouping import alias_rows, changed_rows, complete_linkage, connected_components, keeper_order, stale_rows
from .join import candidate_pairs, exact_pairs, knn_pairs, self_join, without_pairs
from .review import Decided, decided
from .verify import pack, resolve_verify, row_features, verify_pairs
from .verify_jobs import verify_many

if TYPE_CHECKING:
    from ..indexer.ray_job import RayOptions

log = logging.getLogger(__name__)


class StoredVectors:
    """A generation's vectors read when indexed (`xb[rows]`), for a catalogue too large to hold them all."""

    def __init__(self, gen: Generation) -> None:
        self.gen = gen
        self.shape = (len(gen), gen.meta.model.dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return self.gen.vectors(np.asarray(rows, np.int64))


def duplicate_rows(cat: Catalog, threshold: float, block: int | None = None, index=None,  # noqa: ANN001
                   k: int = DEFAULTS.k, progress: Progress | None = None, *,
                   scale: Generation | None = None) -> tuple[np.ndarray, ...]:
    """Pure core of find_duplicates: (I, J, D, exact) row pairs of a catalog, exact pairs first. All pairs
    (the exact self-join), or with `index` (the store's approximate index) each row's k nearest, re-scored;
    with `scale` (the catalogue's generation) each row's k nearest by store_knn_pairs, vectors read in blocks.
    `progress` gets a stage "pairs" (rows searched)."""
    ei, ej = exact_pairs(cat.sha256)
    with stage_of(progress, "pairs", len(cat), "img") as p:
        near = (store_knn_pairs(scale, k, threshold) if scale is not None
                else self_join(cat.xb, threshold, block, progress=p) if index is None
                else knn_pairs(cat.xb, k, threshold, index, cat.ids, progress=p))
    ni, nj, nd = without_pairs(near, ei, ej, len(cat))
    order = np.lexsort((nj, ni, -nd))
    I = np.concatenate([ei, ni[order]])
    J = np.concatenate([ej, nj[order]])
    D = np.concatenate([np.ones(len(ei), np.float32), nd[order]])
    exact = np.concatenate([np.ones(len(ei), bool), np.zeros(len(ni), bool)])
    return I, J, D, exact


@dataclass(frozen=True)
class VerifiedRows:
    """The pairs verified_rows keeps, as catalog rows: exact pairs first, then verified, then unverified."""

    I: np.ndarray  # noqa: E741 - FAISS vocabulary
    J: np.ndarray
    D: np.ndarray  #: cosine scores (1.0 for byte-identical pairs)
    exact: np.ndarray  #: byte-identical
    verified: np.ndarray  #: verified, by their bytes or geometrically (or too plain to judge, >= threshold)
    inliers: np.ndarray  #: RANSAC inliers (-1: byte-identical, or too plain to judge)
    candidates: int  #: candidate pairs verified


def verified_rows(cat: Catalog, gen: Generation, threshold: float, k: int, loose: float, *,
                  index=None, words: int = 0,  # noqa: ANN001
                  features: dict[int, LocalFeatures | None] | None = None, scale: bool = False,
                  processes: int = DEFAULTS.verify_processes, ray: RayOptions | None = None,
                  progress: Progress | None = None) -> VerifiedRows:
    """Core of find_duplicates(verify=True): the candidates that pass, with their verdicts.

    Candidates are candidate_pairs(k, loose, words) (with `words`, each image's photos sharing the most keypoint
    words too); each is verified with the rows' cached local features (screened: a
    rejected pair may show 0 inliers, see verify_pair). Kept: exact pairs (verified by their bytes; inliers
    -1), verified candidates, candidates with a photo too plain to judge scoring >= `threshold` (accepted as
    verified, inliers -1), and unverified ones scoring >= `threshold` (listed for review, never grouped).
    Order: exact, verified, unverified; each by score. `features`, when given, receives the local features
    read (row -> features) for grouping to use again. With `scale`, the k-NN are store_knn_pairs' (the
    store's vectors read in blocks, for a store too large to hold them), not `index`'s. The pairs are verified
    by verify_many: over `processes` local processes (0: one per core), or on a Ray cluster with `ray`.
    `progress` gets the stages "candidates" (rows searched) and "verify" (pairs).
    """
    ei, ej = exact_pairs(cat.sha256)
    table = gen.local() if words and gen.meta.local_features == LOCAL_VERSION else None  # one read, two uses
    with stage_of(progress, "candidates", len(cat), "img") as p:
        ci, cj, cd, _ = candidate_pairs(cat.xb, k, loose, index=index, ids=cat.ids if index is not None else None,
                                        local=table, words=words, progress=p,
                                        knn=store_knn_pairs(gen, k, loose) if scale else None)
    ci, cj, cd = without_pairs((ci, cj, cd), ei, ej, len(cat))
    rows, inverse = np.unique(np.concatenate([ci, cj]), return_inverse=True)
    feats = row_features(gen, rows, table=table)
    if features is not None:
        features.update(zip(rows.tolist(), feats))
    with stage_of(progress, "verify", len(ci), "pairs") as p:
        v = verify_many(pack(feats), inverse[:len(ci)], inverse[len(ci):], screen=True, processes=processes,
                        ray=ray, progress=p)
    ok = v.accepted(cd, threshold)  # verified, or too plain to judge and >= threshold
    keep = ok | (cd >= threshold)
    ci, cj, cd, ver, inl = ci[keep], cj[keep], cd[keep], ok[keep], np.where(v.judged, v.inliers, -1)[keep]
    order = np.lexsort((cj, ci, -cd, ~ver))
    return VerifiedRows(I=np.concatenate([ei, ci[order]]), J=np.concatenate([ej, cj[order]]),
                        D=np.concatenate([np.ones(len(ei), np.float32), cd[order]]),
                        exact=np.concatenate([np.ones(len(ei), bool), np.zeros(len(ci), bool)]),
                        verified=np.concatenate([np.ones(len(ei), bool), ver[order]]),
                        inliers=np.concatenate([np.full(len(ei), -1, np.int32), inl[order]]), candidates=len(v))


@dataclass(frozen=True)
class DuplicateOptions:
    """How find_duplicates searches (its docstring says what each does); the library's keywords and the CLI's
    flags build one."""

    threshold: float | None = None
    block: int | None = None
    max_group_search: int = 20_000
    verify: bool | None = None
    k: int | None = None
    loose_threshold: float | None = None
    workers: int = DEFAULTS.verify_workers
    exact: bool = False
    processes: int = DEFAULTS.verify_processes
    ray: RayOptions | None = None
    new_only: bool = False
    decisions: bool = True


def find_duplicates(store: Generation | str | os.PathLike[str], options: DuplicateOptions | None = None, *,
                    progress: Progress | None = None, **fields: Any) -> DuplicateReport:
    """All duplicate pairs of a store (an open Generation, or a path) and their anti-chaining groups, as
    `options` say (any of its fields may be given as keywords instead, or on top: `verify=False`).

    With `verify` (None: resolve_verify), pairs are verified candidates (verified_rows; `k` and
    `loose_threshold` default to the model's, config.MODEL_TABLE) and groups link verified and byte-identical pairs
    only; without it, every pair scoring >= `threshold` (the model's default) is a duplicate. A cluster larger
    than `max_group_search` images means the threshold is far too low: refused with InputError. A store with
    an approximate index (a large one) takes each image's `k` nearest by candidates.store_knn_pairs, re-scored
    exactly, its vectors read in blocks, never all held; `exact` forces the exact search. The candidates are
    verified over `processes` local processes (0: one per core), or on a Ray cluster with `ray` (the same pairs
    either way); `workers` threads verify a group's missing pairs. `progress` (default: silent) is told of the
    searches and verification.

    With `decisions` (the default), the decisions people recorded (search/review.py) are applied: a pair
    decided distinct is never listed and never links a group; a pair confirmed duplicate is marked
    (report.decisions), links its group even unverified, and its keeper is kept. A decision adds no pair the
    search did not find. `new_only` lists only the pairs nobody decided, and the groups holding one (the
    nightly delta). `decisions=False` gives what the search alone finds.
    """
    o = replace(options or DuplicateOptions(), **fields)
    threshold, block, max_group_search, verify, k = o.threshold, o.block, o.max_group_search, o.verify, o.k
    loose_threshold, workers, exact, processes, ray = o.loose_threshold, o.workers, o.exact, o.processes, o.ray
    new_only, decisions = o.new_only, o.decisions
    if new_only and not decisions:
        raise InputError("new_only needs the decisions: it lists the pairs nobody decided")
    with opened(store) as gen:
        t0, t = time.perf_counter(), gen.threshold(threshold)
        scale = not exact and gen.meta.index.factory != "Flat"  # a large store: its vectors are read in blocks
        cat = replace(gen.read(vectors=False), xb=StoredVectors(gen)) if scale else gen.read(vectors=True)
        verify = resolve_verify(verify, cat.meta.local_features)
        if ray is not None and not verify:
            raise InputError("--ray verifies the candidates on a cluster: it needs verification (a store with local "
                             "features, without --no-verify)")
        report = DuplicateReport(str(gen.path), cat.meta.model.name, t, len(cat), cat.ids, cat.paths, verify=verify,
                                 generation=gen.id, new_only=new_only)
        dec = decided(gen) if decisions else Decided(JournalState(), cat.sha256)
        report.decision_problems = dec.state.problems
        index = None
        report.method = (f"k-NN by a PCA{DEFAULTS.scale_dims} IVF search of the stored vectors, not the store's "
                         f"{cat.meta.index.factory} index; candidates re-scored exactly" if scale
                         else "exact k-NN" if verify else "exact join")
        if verify:
            spec = stored_model_spec(cat.meta.model.name)
            report.k = spec.candidates if k is None else int(k)
            report.loose_threshold = gen.candidate_threshold(loose_threshold)
            if report.k < 1:
                raise InputError("k must be at least 1")
            tv = time.perf_counter()
            feats: dict[int, LocalFeatures | None] = {}  # read once: candidates, then the groups' missing pairs
            vr = verified_rows(cat, gen, t, report.k, report.loose_threshold, index=index,
                               words=spec.word_candidates, features=feats, scale=scale, processes=processes, ray=ray,
                               progress=progress)
            report.I, report.J, report.D, report.exact = vr.I, vr.J, vr.D, vr.exact
            report.verified, report.inliers, report.candidates = vr.verified, vr.inliers, vr.candidates
            report.verify_seconds = time.perf_counter() - tv
            _drop_distinct(report, dec)
            linked = report.verified | dec.pair_mask(report.I, report.J, "duplicate")  # exact: verified by their bytes
            link_t = np.inf  # groups follow the verified (or confirmed) links only
        else:
            report.k = DEFAULTS.k if k is None else int(k)
            report.I, report.J, report.D, report.exact = duplicate_rows(cat, t, block, index, report.k, progress,
                                                                        scale=gen if scale else None)
            _drop_distinct(report, dec)
            linked = report.exact | dec.pair_mask(report.I, report.J, "duplicate")
            link_t = t
        I, J = report.I, report.J
        comps = connected_components(len(cat), I[linked] if verify else I, J[linked] if verify else J)
        _check_files(gen, report, np.unique(np.concatenate([I, J])), comps)
        comp_of = np.full(len(cat), -1, np.int64)
        for ci, comp in enumerate(comps):
            comp_of[comp] = ci
        forced_in: dict[int, list[tuple[int, int, int]]] = defaultdict(list)  # always-linked pairs, by component
        inl = report.inliers if verify else np.full(len(I), -1, np.int32)
        for a, b, n in zip(I[linked].tolist(), J[linked].tolist(), inl[linked].tolist()):
            forced_in[int(comp_of[a])].append((a, b, n))
        extra: list[tuple[int, int, float, int]] = []  # pairs verified while grouping
        never, confirmed = dec.row_pair_set("distinct"), dec.row_pair_set("duplicate")  # never linked; always
        group_rows: list[np.ndarray] = []
        for ci, comp in enumerate(comps):
            if len(comp) > max_group_search:
                raise InputError(
                    f"threshold {t:.4f} links {len(comp)} images into one cluster, too many to be duplicates; "
                    f"raise --threshold (with {cat.meta.model.name}, {report.n_pairs} pairs score above it)")
            if verify and 2 < len(comp) <= COMPLETE_UP_TO:
                extra += _complete(cat, gen, comp, forced_in[ci], t, workers, feats, never)
            S = cat.xb[comp] @ cat.xb[comp].T
            forced = np.zeros_like(S, bool)
            inliers = np.full(S.shape, -1, np.int32)
            local = {r: k for k, r in enumerate(comp.tolist())}
            for a, b, n in forced_in[ci]:
                forced[local[a], local[b]] = forced[local[b], local[a]] = True
                inliers[local[a], local[b]] = inliers[local[b], local[a]] = n
            for g in complete_linkage(S, link_t, forced, dec.forbidden(local)):
                rows = keeper_order(cat, comp[g], report.stale)
                chosen = dec.keeper_among(rows, report.stale)
                if chosen is not None:
                    rows = np.concatenate([[chosen], rows[rows != chosen]])
                keeper = int(rows[0])
                kl = local[keeper]
                members = [Member(id=int(cat.ids[r]), path=cat.paths[r], width=int(cat.widths[r]),
                                  height=int(cat.heights[r]), size=int(cat.sizes[r]),
                                  score_to_keeper=1.0 if r == keeper else round(float(S[kl, local[r]]), 6),
                                  exact=bool(r != keeper and cat.sha256[r] == cat.sha256[keeper]), keeper=r == keeper,
                                  stale=report.stale.get(r),
                                  alias_of=cat.paths[report.aliases[r]] if r in report.aliases else None,
                                  inliers_to_keeper=int(inliers[kl, local[r]]) if verify else None,
                                  decision="duplicate" if (min(r, keeper), max(r, keeper)) in confirmed else None)
                           for r in rows.tolist()]
                report.groups.append(Group(keeper=int(cat.ids[keeper]), members=members,
                                           keeper_decided=chosen is not None))
                group_rows.append(rows)
        ranked = sorted(zip(report.groups, group_rows), key=lambda gr: (
            -len(gr[0].members), -min(m.score_to_keeper for m in gr[0].members)))
        report.groups, group_rows = [g for g, _ in ranked], [r for _, r in ranked]
        if extra:  # the pairs list shows every pair a group rests on
            ei, ej, ed, en = (np.array(x) for x in zip(*extra))
            I, J = np.concatenate([report.I, ei]), np.concatenate([report.J, ej])
            D = np.concatenate([report.D, ed.astype(np.float32)])
            ex = np.concatenate([report.exact, np.zeros(len(ei), bool)])
            ver = np.concatenate([report.verified, np.ones(len(ei), bool)])
            inl = np.concatenate([report.inliers, en.astype(np.int32)])
            order = np.lexsort((J, I, -D, ~ver, ~ex))
            report.I, report.J, report.D, report.exact, report.verified, report.inliers = (
                I[order], J[order], D[order], ex[order], ver[order], inl[order])
        decided_pairs = dec.pair_mask(report.I, report.J, "duplicate")
        report.decisions = dict.fromkeys(np.flatnonzero(decided_pairs).tolist(), "duplicate")
        if new_only:
            _only_new(report, decided_pairs, group_rows)
        report.seconds = time.perf_counter() - t0
        return report


def _check_files(gen: Generation, report: DuplicateReport, listed: np.ndarray, comps: list[np.ndarray]) -> None:
    """Fill report.stale and report.aliases for the `listed` rows: files gone or changed (size, mtime), other
    names of one file, and — for the rows that groups are made of, the keepers and removable files — files whose
    content is no longer the one indexed."""
    report.stale = stale_rows(gen, listed)
    report.aliases = alias_rows(gen, listed)
    report.stale.update((r, "alias") for r in report.aliases if r not in report.stale)
    if comps:
        report.stale.update(changed_rows(gen, np.concatenate(comps), skip=report.stale))


#: Components of verified links up to this size get their missing pairs verified before grouping.
COMPLETE_UP_TO = 200


def _drop_distinct(report: DuplicateReport, dec: Decided) -> None:
    """Remove the pairs a person decided distinct from the report (never listed, never linked)."""
    drop = dec.pair_mask(report.I, report.J, "distinct")
    report.hidden_distinct = int(drop.sum())
    if report.hidden_distinct:
        report.keep_pairs(~drop)


def _complete(cat: Catalog, gen: Generation, comp: np.ndarray, links: list[tuple[int, int, int]],
              threshold: float, workers: int, feats: dict[int, LocalFeatures | None],
              never: Collection[tuple[int, int]] = ()) -> list[tuple[int, int, float, int]]:
    """Verify the pairs of a component that were not candidates (a photo with more copies than k has
    neighbours): complete linkage needs every pair's verdict. Adds the accepted ones to `links`; returns
    them as (i, j, score, inliers). `feats`: the features read so far (row -> features), completed here.
    `never`: row pairs (i < j) a person decided distinct: not verified, never linked."""
    have = {(a, b) for a, b, _ in links}
    members = comp.tolist()
    missing = [(a, b) for x, a in enumerate(members) for b in members[x + 1:]
               if (a, b) not in have and (min(a, b), max(a, b)) not in never]
    if not missing:
        return []
    ma, mb = (np.array(c, np.int64) for c in zip(*missing))
    need = [r for r in members if r not in feats]  # rows of byte-identical pairs only: never candidates
    if need:
        feats.update(zip(need, row_features(gen, np.array(need, np.int64))))
    v = verify_pairs([feats[a] for a in ma.tolist()], [feats[b] for b in mb.tolist()], workers=workers, screen=True)
    d = np.einsum("ij,ij->i", cat.xb[ma], cat.xb[mb])
    ok = v.accepted(d, threshold)
    out = [(int(a), int(b), float(s), int(n) if j else -1)
           for a, b, s, n, j in zip(ma[ok], mb[ok], d[ok], v.inliers[ok], v.judged[ok])]
    links.extend((a, b, n) for a, b, _, n in out)
    return out



def _only_new(report: DuplicateReport, decided_pairs: np.ndarray, group_rows: list[np.ndarray]) -> None:
    """Keep only the pairs nobody decided, and the groups holding one of them (new_only)."""
    group_of = np.full(report.n, -1, np.int64)
    for g, rows in enumerate(group_rows):
        group_of[rows] = g
    gi, gj = group_of[report.I[~decided_pairs]], group_of[report.J[~decided_pairs]]
    fresh = set(gi[(gi >= 0) & (gi == gj)].tolist())
    report.groups = [g for x, g in enumerate(report.groups) if x in fresh]
    report.hidden_decided = int(decided_pairs.sum())
    report.keep_pairs(~decided_pairs)
    report.decisions = {}
