"""Search, verify: geometric verification of candidate pairs with the local features of both photos.

A global vector says two photos look alike; it cannot say they show the same thing. Verification matches
the photos' ORB keypoints (Hamming distance, Lowe's ratio test), fits one homography with RANSAC and
judges the fit (config.VerifyRule): enough inliers, a large enough share of the photos' keypoints, and
inliers on the product, not only around it. The last test guards the known trap of a grocery catalogue:
two different products held up in front of one shelf share the whole background (many inliers) but
not the packaging in the middle of the photo.

Everything here but row_features (which reads the store's cache) is pure: features in, numbers out; query
and duplicates decide which pairs to verify.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..config import DEFAULTS, VERIFY, VerifyRule
from ..embed.decode import file_local_features
from ..errors import DecodeError, StoreError
from ..features import DESC_BYTES, LOCAL_VERSION, LocalFeatures, LocalTable
from ..store.generation import Generation
from ..threads import one_thread, opencv as _cv2, thread_pool

log = logging.getLogger(__name__)

#: The central region of a photo, as fractions of its width and height ("where the product is").
CENTRE = (0.25, 0.75)


@dataclass(frozen=True)
class Verification:
    """The verdict on one pair, with the measurements behind it.

    `inliers`: RANSAC inliers of the homography (0 when fewer than min_inliers matches pass the ratio test,
    and the fit is not attempted); `inlier_ratio`: inliers / keypoints of the photo with fewer;
    `centre`: the smaller, over both photos, of the share of keypoints in the central region that are
    inliers; `coverage`: the smaller share of textured 6x6 grid cells (of those the fit maps into the other photo)
    holding an inlier. `xy_a`/`xy_b` are the inlier positions (fractions of width/height) when asked for (drawing).
    """

    verified: bool
    inliers: int
    inlier_ratio: float
    centre: float
    coverage: float
    xy_a: np.ndarray | None = None
    xy_b: np.ndarray | None = None
    judged: bool = True  #: False: a photo is too plain (or unreadable) to judge; the global threshold decides


UNVERIFIABLE = Verification(False, 0, 0.0, 0.0, 0.0)
UNJUDGED = Verification(False, 0, 0.0, 0.0, 0.0, judged=False)


@dataclass
class Verified:
    """Verdicts of many pairs as arrays (row k is pair k)."""

    verified: np.ndarray  #: bool [m]
    inliers: np.ndarray  #: int32 [m]
    inlier_ratio: np.ndarray  #: float32 [m]
    centre: np.ndarray  #: float32 [m]
    coverage: np.ndarray  #: float32 [m]
    #: bool [m]; None when made: all judged
    judged: np.ndarray = None  # type: ignore[assignment]  # __post_init__ makes it an array: readers see one

    def __post_init__(self) -> None:
        if self.judged is None:
            self.judged = np.ones(len(self.verified), bool)

    def __len__(self) -> int:
        return len(self.verified)

    def accepted(self, D: np.ndarray, threshold: float) -> np.ndarray:
        """Duplicates by these verdicts: verified, or (a photo too plain to judge) scoring >= threshold."""
        return self.verified | (~self.judged & (np.asarray(D) >= threshold))

    def row(self, k: int) -> Verification:
        """Pair k's verdict as one Verification (without inlier points)."""
        return Verification(bool(self.verified[k]), int(self.inliers[k]), float(self.inlier_ratio[k]),
                            float(self.centre[k]), float(self.coverage[k]), judged=bool(self.judged[k]))

    @classmethod
    def empty(cls, m: int) -> Verified:
        """m pairs, each judged and not verified (inliers 0)."""
        return cls(np.zeros(m, bool), np.zeros(m, np.int32), np.zeros(m, np.float32), np.zeros(m, np.float32),
                   np.zeros(m, np.float32), np.ones(m, bool))

    @classmethod
    def of(cls, results: Sequence[Verification]) -> Verified:
        """Pack single verdicts."""
        return cls(np.array([r.verified for r in results], bool), np.array([r.inliers for r in results], np.int32),
                   np.array([r.inlier_ratio for r in results], np.float32),
                   np.array([r.centre for r in results], np.float32),
                   np.array([r.coverage for r in results], np.float32),
                   np.array([r.judged for r in results], bool))

    @classmethod
    def concat(cls, parts: Sequence[Verified]) -> Verified:
        """The pairs of `parts`, in order."""
        if not parts:
            return cls.empty(0)
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))


_FIELDS = ("verified", "inliers", "inlier_ratio", "centre", "coverage", "judged")


def pack(features: Sequence[LocalFeatures | None]) -> LocalTable:
    """Per-photo features as one padded table (count -1: none), positions kept as float32 (the table of the
    store holds float16; either is verified alike)."""
    k = max((len(f) for f in features if f is not None), default=1)
    t = LocalTable(np.full(len(features), -1, np.int32), np.zeros((len(features), k, 2), np.float32),
                   np.zeros((len(features), k, DESC_BYTES), np.uint8))
    for i, f in enumerate(features):
        if f is not None:
            t.count[i] = len(f)
            t.xy[i, :len(f)] = f.xy
            t.desc[i, :len(f)] = f.desc
    return t


def _order_keys(t: LocalTable, rows: np.ndarray) -> np.ndarray:
    """A rank per row of `rows` by (keypoints, descriptor bytes): the order in which a pair is judged (equal
    features share a rank; either order of them gives the same verdict)."""
    keys = [(int(t.count[r]), t.desc[r, :max(int(t.count[r]), 0)].tobytes()) for r in rows.tolist()]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    rank = np.empty(len(keys), np.int64)
    prev, r = None, -1
    for i in order:
        if keys[i] != prev:
            r, prev = r + 1, keys[i]
        rank[i] = r
    return rank


def _ranges(start: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, position) of every integer of the ranges [start[p], stop[p]), in order of p then position."""
    n = np.maximum(stop - start, 0)
    owner = np.repeat(np.arange(len(n)), n)
    first = np.cumsum(n) - n
    return owner, start[owner] + np.arange(int(n.sum())) - first[owner]


def _knn_grouped(desc: np.ndarray, count: np.ndarray, q_rows: np.ndarray, q_kp: np.ndarray,
                 db_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two nearest keypoints (Hamming: distances, indices) of photo db_rows[i] for keypoint q_kp[i] of
    photo q_rows[i]: one FAISS call per database photo, its queries from every pair it is in (a photo is in
    ~k pairs), instead of one call per pair. Each query row's answer depends on it and its database only."""
    import faiss

    m = len(q_rows)
    dist, nn = np.zeros((m, 2), np.int32), np.full((m, 2), -1, np.int64)
    if m == 0:
        return dist, nn
    order = np.argsort(db_rows, kind="stable")
    q = desc[q_rows[order], q_kp[order]]
    sorted_db = db_rows[order]
    bounds = np.flatnonzero(np.diff(sorted_db)) + 1
    starts = np.concatenate([[0], bounds]).tolist()
    stops = np.concatenate([bounds, [m]]).tolist()
    for s, e in zip(starts, stops):
        r = int(sorted_db[s])
        d, i = faiss.knn_hamming(q[s:e], desc[r, :int(count[r])], 2)
        dist[order[s:e]], nn[order[s:e]] = d, i
    return dist, nn


class _Grid:
    """Per photo (rows of a table, computed once however many pairs it is in): keypoints in the central region,
    and the textured cells of the coverage grid."""

    def __init__(self, t: LocalTable, rows: np.ndarray, cells: int = 6, textured: int = 3) -> None:
        self.cells = cells
        xy = t.xy[rows].astype(np.float32)
        present = np.arange(xy.shape[1])[None, :] < np.maximum(t.count[rows], 0)[:, None]
        lo, hi = CENTRE
        self.central = (np.all((xy >= lo) & (xy <= hi), axis=2) & present).sum(1)
        cell = np.where(present, _cell(xy, cells), cells * cells)  # padding: an extra cell, dropped
        width = cells * cells + 1
        hist = np.bincount((np.arange(len(rows))[:, None] * width + cell).ravel(), minlength=len(rows) * width)
        self.textured = hist.reshape(len(rows), width)[:, :-1] >= textured
        self.at = {r: i for i, r in enumerate(rows.tolist())}
        c = (np.stack(np.meshgrid(np.arange(cells), np.arange(cells)), -1).reshape(-1, 2) + 0.5) / cells
        self.centres = np.hstack([c, np.ones((len(c), 1))])  # homogeneous, float64

    def coverage(self, row: int, inl: np.ndarray, H: np.ndarray) -> float:
        """Share of the photo's textured cells that hold an inlier, among the cells whose centres `H` maps into
        the other photo (a cropped copy's missing border is not held against it)."""
        p = self.centres @ H.T
        with np.errstate(divide="ignore", invalid="ignore"):
            mapped = p[:, :2] / p[:, 2:]
        seen = np.all((mapped >= 0) & (mapped <= 1), axis=1)  # NaN (a centre mapped to infinity): not seen
        expected = self.textured[self.at[row]] & seen
        hit = np.bincount(_cell(inl, self.cells), minlength=self.cells * self.cells) > 0
        return float((expected & hit).sum() / max(int(expected.sum()), 1))


def _cell(p: np.ndarray, cells: int) -> np.ndarray:
    c = np.clip((p * cells).astype(np.int64), 0, cells - 1)
    return c[..., 1] * cells + c[..., 0]


def _central(xy: np.ndarray) -> np.ndarray:
    lo, hi = CENTRE
    return np.all((xy >= lo) & (xy <= hi), axis=1)


def verify_table(t: LocalTable, ia: np.ndarray, ib: np.ndarray, rule: VerifyRule = VERIFY, *,
                 screen: bool = False, points: list | None = None,
                 stages: dict[str, float] | None = None) -> Verified:
    """The verdicts of pairs (t's rows ia[k], ib[k]), stage by stage over all of them (see verify_pair, which
    this is for one pair). `points`, a list, receives each pair's inlier positions (xy_a, xy_b; None when not
    fitted); `stages`, a dict, adds up the seconds each stage took (benchmarks' profile)."""
    cv2 = _cv2()
    clock = _Clock(stages)
    ia, ib = np.asarray(ia, np.int64), np.asarray(ib, np.int64)
    m = len(ia)
    out = Verified.empty(m)
    if points is not None:
        points[:] = [None] * m
    if m == 0:
        return out
    count = np.asarray(t.count, np.int64)
    out.judged = np.minimum(count[ia], count[ib]) >= max(rule.min_keypoints, 4)
    # one order for the pair, whichever way it is asked: the same matches, the same RANSAC, the same verdict
    rows = np.unique(np.concatenate([ia, ib]))
    rank = np.zeros(len(count), np.int64)
    rank[rows] = _order_keys(t, rows)
    swap = rank[ib] < rank[ia]
    a, b = np.where(swap, ib, ia), np.where(swap, ia, ib)
    na, nb = count[a], count[b]
    live = np.flatnonzero(out.judged)
    clock.lap("order")
    # stage 1: the first (strongest) keypoints of a against b; with `screen`, a pair whose strongest keypoints
    # barely match is rejected here (inliers 0), and the rest keep these rows: nothing is matched twice
    head = np.minimum(na[live], rule.screen) if screen else na[live]
    own, kp = _ranges(np.zeros(len(live), np.int64), head)
    dist, nn = _knn_grouped(t.desc, count, a[live][own], kp, b[live][own])
    own = live[own]
    clock.lap("screen k-NN" if screen else "k-NN")
    if screen:
        hits = np.bincount(own, weights=dist[:, 0] < rule.ratio * dist[:, 1], minlength=m)
        rejected = (na > rule.screen) & (hits < rule.screen_matches)
        live = live[~rejected[live]]
        keep = ~rejected[own]
        own, kp, dist, nn = own[keep], kp[keep], dist[keep], nn[keep]
        rest = live[na[live] > rule.screen]
        own2, kp2 = _ranges(np.full(len(rest), rule.screen, np.int64), na[rest])
        d2, n2 = _knn_grouped(t.desc, count, a[rest][own2], kp2, b[rest][own2])
        own, kp = np.concatenate([own, rest[own2]]), np.concatenate([kp, kp2])
        dist, nn = np.concatenate([dist, d2]), np.concatenate([nn, n2])
        clock.lap("rest k-NN")
    good = (dist[:, 0] < rule.ratio * dist[:, 1]) & (nn[:, 0] >= 0)
    own, kp, to = own[good], kp[good], nn[good, 0]
    # cross-check: a's match in b must have a's keypoint as its own nearest in a
    _, back = _knn_grouped(t.desc, count, b[own], to, a[own])
    mutual = back[:, 0] == kp
    own, kp, to = own[mutual], kp[mutual], to[mutual]
    order = np.lexsort((kp, own))  # each pair's matches by a's keypoint, as a one-pair match lists them
    own, kp, to = own[order], kp[order], to[order]
    clock.lap("back k-NN")
    matches = np.bincount(own, minlength=m)
    fit = (matches >= max(rule.min_inliers, 4)) & out.judged  # too few matches to verify: no fit (inliers 0)
    if screen:  # even all matches as inliers would fail the share
        fit &= matches >= rule.min_inlier_ratio * np.minimum(na, nb)
    fit = np.flatnonzero(fit)
    first = np.searchsorted(own, fit)
    grid = _Grid(t, np.unique(np.concatenate([a[fit], b[fit]]))) if len(fit) else None
    clock.lap("ratio and counts")
    for p, s in zip(fit.tolist(), first.tolist()):
        e = s + int(matches[p])
        pa = t.xy[a[p], kp[s:e]].astype(np.float32)
        pb = t.xy[b[p], to[s:e]].astype(np.float32)
        # USAC (OpenCV's modern RANSAC): the same inliers as classic RANSAC on the grocery pairs, 10x faster on
        # unrelated pairs, where classic RANSAC runs all its iterations
        H, mask = cv2.findHomography(pa, pb, cv2.USAC_DEFAULT, rule.ransac)
        clock.lap("homography")
        if H is None or mask is None or abs(np.linalg.det(H)) < 1e-12:
            continue
        keep = mask.ravel().astype(bool)
        n = int(keep.sum())
        ratio = n / min(int(na[p]), int(nb[p]))
        out.inliers[p], out.inlier_ratio[p] = n, ratio
        if screen and (n < rule.min_inliers or ratio < rule.min_inlier_ratio):  # the verdict is known: no
            continue                                                            # centre and coverage needed
        assert grid is not None  # made whenever a pair is fitted
        inl_a, inl_b = pa[keep], pb[keep]
        centre = min(_central(inl_a).sum() / max(int(grid.central[grid.at[int(a[p])]]), 1),
                     _central(inl_b).sum() / max(int(grid.central[grid.at[int(b[p])]]), 1))
        cover = min(grid.coverage(int(a[p]), inl_a, H), grid.coverage(int(b[p]), inl_b, np.linalg.inv(H)))
        out.centre[p], out.coverage[p] = centre, cover
        out.verified[p] = n >= rule.min_inliers and ratio >= rule.min_inlier_ratio and \
            (centre + cover) / 2 >= rule.min_support
        if points is not None:
            points[p] = (inl_b, inl_a) if swap[p] else (inl_a, inl_b)
        clock.lap("centre and coverage")
    return out


class _Clock:
    """Adds the time since the last lap to stages[name] (nothing without a dict)."""

    def __init__(self, stages: dict[str, float] | None) -> None:
        self.stages, self.t = stages, time.perf_counter()

    def lap(self, name: str) -> None:
        if self.stages is not None:
            now = time.perf_counter()
            self.stages[name] = self.stages.get(name, 0.0) + now - self.t
            self.t = now


def verify_pair(a: LocalFeatures | None, b: LocalFeatures | None, rule: VerifyRule = VERIFY, *,
                points: bool = False, screen: bool = False) -> Verification:
    """Match two photos' features and judge the geometry (see the module). Missing features: not verified.
    The verdict is symmetric: verify_pair(a, b) == verify_pair(b, a) (the pair is judged in one order, the
    photos' own, whichever way it is asked; matches must be mutual nearest neighbours). With `screen` (for
    callers that need only the verdict), a pair is rejected as soon as its verdict is known: unfitted (inliers
    0) when its strongest keypoints barely match (rule.screen) or too few matches pass the ratio test for the
    inlier share, and without centre and coverage when the fit fails them."""
    got: list = []
    with one_thread():
        v = verify_table(pack([a, b]), np.array([0]), np.array([1]), rule, screen=screen, points=got)
    out = v.row(0)
    if points and got[0] is not None:
        out = replace(out, xy_a=got[0][0], xy_b=got[0][1])
    return out


def verify_pairs(fa: Sequence[LocalFeatures | None], fb: Sequence[LocalFeatures | None],
                 rule: VerifyRule = VERIFY, *, workers: int = DEFAULTS.verify_workers,
                 screen: bool = False, progress: Callable[[int, int], None] | None = None) -> Verified:
    """verify_pair(fa[k], fb[k], screen=screen) for every k, stage by stage over the pairs (verify_table); a
    photo given as one object for several pairs is one database of its k-NN. With `workers` > 1 the pairs are
    split over that many threads (FAISS and OpenCV release the GIL in their calls). `progress(done, total)`
    when they are."""
    out = _verify_pairs(fa, fb, rule, workers, screen)
    if progress is not None:
        progress(len(out), len(out))
    return out


def _verify_pairs(fa: Sequence[LocalFeatures | None], fb: Sequence[LocalFeatures | None], rule: VerifyRule,
                  workers: int, screen: bool) -> Verified:
    if len(fa) != len(fb):
        raise ValueError("fa and fb must have the same length")
    rows: dict[int, int] = {}
    feats: list[LocalFeatures | None] = []
    for f in (*fa, *fb):
        if id(f) not in rows:
            rows[id(f)] = len(feats)
            feats.append(f)
    t = pack(feats)
    ia = np.array([rows[id(f)] for f in fa], np.int64)
    ib = np.array([rows[id(f)] for f in fb], np.int64)
    if workers <= 1 or len(fa) < 16:
        with one_thread():
            return verify_table(t, ia, ib, rule, screen=screen)
    parts = np.array_split(np.arange(len(fa)), workers)
    # each worker thread runs every library on one thread (threads.py)
    with thread_pool(workers, "neardup-verify") as pool:
        return Verified.concat(list(pool.map(lambda p: verify_table(t, ia[p], ib[p], rule, screen=screen), parts)))


def resolve_verify(verify: bool | None, local_features: str) -> bool:
    """Whether to verify: as asked, else (None) DEFAULTS.verify for a store that caches local features (a store
    made before them, or built without, is searched as it always was)."""
    return (DEFAULTS.verify and bool(local_features)) if verify is None else bool(verify)


def rerank(D: np.ndarray, v: Verified, min_inliers: int = 0) -> np.ndarray:
    """The order in which to show one query's candidates (scores `D`, verdicts `v`): verified first, by
    inliers; then the candidates that fail it, by their inliers when at least `min_inliers` (another shot of
    the product shares keypoints without passing the copy-strict verdict), then by score (a pair never fitted
    has 0). Failed candidates are ordered by inliers rather than by score or with a higher floor of inliers,
    as measured on the store -> catalogue set (benchmarks/RESULTS.md, issue 29)."""
    support = np.where(v.inliers >= min_inliers, v.inliers, 0)
    return np.lexsort((-np.asarray(D, np.float64), -support, ~v.verified))


def row_features(gen: Generation, rows: np.ndarray, max_bytes: int = DEFAULTS.max_file_bytes, *,
                 table: LocalTable | None = None) -> list[LocalFeatures | None]:
    """Local features of catalogue `rows` of a generation: from its cache (every block checked; `table`: the
    generation's whole cache, already read), else (a store made before local features, or with another version
    of them, rows not extracted, or damaged cached features, which are never used) from the image files
    themselves; None for a file that cannot be read now."""
    rows = np.asarray(rows, np.int64)
    if table is not None:
        table = LocalTable(table.count[rows], table.xy[rows], table.desc[rows])
    elif gen.meta.local_features == LOCAL_VERSION and len(rows):
        try:
            table = gen.local(rows)
        except StoreError as exc:  # said (once a generation), and answered from the photos: never served
            if gen.first_damage(str(exc)):
                log.warning("%s; verifying from the photos themselves", exc)
    out: list[LocalFeatures | None] = []
    for k, r in enumerate(rows.tolist()):
        f = table.row(k) if table is not None else None
        if f is None:
            try:
                f = file_local_features(gen.image_path(r), max_bytes)
            except DecodeError as exc:
                log.info("no local features for %s: %s", gen.catalog.paths[r], exc)
        out.append(f)
    return out
