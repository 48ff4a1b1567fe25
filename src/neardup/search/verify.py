"""Search stage 0, verify: geometric verification of candidate pairs with the local features of both photos.

A global vector says two photos look alike; it cannot say they show the same thing. Verification matches
the photos' ORB keypoints (Hamming distance, Lowe's ratio test), fits one homography with RANSAC and
judges the fit (config.VerifyRule): enough inliers, a large enough share of the photos' keypoints, and
inliers on the product, not only around it. The last test guards the known trap of a grocery catalogue:
two different products held up in front of one shelf share the whole background (up to ~100 inliers) but
not the packaging in the middle of the photo.

Everything here but row_features (which reads the store's cache) is pure: features in, numbers out; query
and duplicates decide which pairs to verify.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ..config import DEFAULTS, VERIFY, VerifyRule
from ..errors import DecodeError, StoreError
from ..indexer.decode import file_local_features
from ..indexer.local_features import LOCAL_VERSION, LocalFeatures, LocalTable, _cv2
from ..store.generation import Generation
from ..threads import small_calls, thread_pool

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


def _central(xy: np.ndarray) -> np.ndarray:
    lo, hi = CENTRE
    return np.all((xy >= lo) & (xy <= hi), axis=1)


def _coverage(xy: np.ndarray, inl: np.ndarray, H: np.ndarray, cells: int = 6, textured: int = 3) -> float:
    """Share of the photo's textured grid cells (>= `textured` keypoints) that hold an inlier, among the cells
    that the homography `H` maps into the other photo (a cropped copy's missing border is not held against it).
    """
    cv2 = _cv2()

    def cell(p: np.ndarray) -> np.ndarray:
        c = np.clip((p * cells).astype(np.int64), 0, cells - 1)
        return c[:, 1] * cells + c[:, 0]
    centres = (np.stack(np.meshgrid(np.arange(cells), np.arange(cells)), -1).reshape(-1, 2) + 0.5) / cells
    mapped = cv2.perspectiveTransform(centres[None].astype(np.float32), H)[0]
    seen = np.all((mapped >= 0) & (mapped <= 1), axis=1)
    expected = (np.bincount(cell(xy), minlength=cells * cells) >= textured) & seen
    hit = np.bincount(cell(inl), minlength=cells * cells) > 0
    return float((expected & hit).sum() / max(int(expected.sum()), 1))


def _knn2(qa: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two nearest rows of `db` (Hamming) for each row of `qa`, as arrays: FAISS's popcount kernel, 2.5x
    faster than OpenCV's matcher on 500 x 500 ORB descriptors (and no per-match Python objects)."""
    import faiss

    if len(db) < 2:  # one candidate: its distance, and an infinitely far second
        d = np.unpackbits(qa ^ db[:1], axis=1).sum(1, dtype=np.int32)[:, None]
        return np.hstack([d, np.full_like(d, 1 << 20)]), np.zeros((len(qa), 2), np.int64)
    return faiss.knn_hamming(np.ascontiguousarray(qa), np.ascontiguousarray(db), 2)


def verify_pair(a: LocalFeatures | None, b: LocalFeatures | None, rule: VerifyRule = VERIFY, *,
                points: bool = False, screen: bool = False) -> Verification:
    """Match two photos' features and judge the geometry (see the module). Missing features: not verified.
    The verdict is symmetric: verify_pair(a, b) == verify_pair(b, a) (the pair is judged in one order, the
    photos' own, whichever way it is asked; matches must be mutual nearest neighbours). With `screen` (for
    callers that need only the verdict), a pair is rejected as soon as its verdict is known: unfitted (inliers
    0) when its strongest keypoints barely match (rule.screen) or too few matches pass the ratio test for the
    inlier share, and without centre and coverage when the fit fails them."""
    if a is None or b is None or min(len(a), len(b)) < max(rule.min_keypoints, 4):
        return UNJUDGED
    if _first(b, a):  # one order for the pair, whichever way it is asked: the same RANSAC, the same verdict
        v = _verify(b, a, rule, points, screen)
        return replace(v, xy_a=v.xy_b, xy_b=v.xy_a)
    return _verify(a, b, rule, points, screen)


def _first(a: LocalFeatures, b: LocalFeatures) -> bool:
    """Whether `a` comes first in a pair: an order of the features themselves (by count, then bytes)."""
    return (len(a), a.desc.tobytes()) < (len(b), b.desc.tobytes())


def _verify(a: LocalFeatures, b: LocalFeatures, rule: VerifyRule, points: bool, screen: bool) -> Verification:
    cv2 = _cv2()
    if screen and len(a) > rule.screen:
        dist, _ = _knn2(a.desc[:rule.screen], b.desc)
        if int(np.count_nonzero(dist[:, 0] < rule.ratio * dist[:, 1])) < rule.screen_matches:
            return UNVERIFIABLE
    dist, nn = _knn2(a.desc, b.desc)
    good = np.flatnonzero((dist[:, 0] < rule.ratio * dist[:, 1]) & (nn[:, 0] >= 0))
    if len(good):  # cross-check the matches that passed the ratio test: a's match in b must have a as nearest
        matched, at = np.unique(nn[good, 0], return_inverse=True)
        _, back = _knn2(b.desc[matched], a.desc)
        good = good[back[at, 0] == good]
    if len(good) < max(rule.min_inliers, 4):  # too few matches to verify: RANSAC is not even run (inliers 0)
        return UNVERIFIABLE
    if screen and len(good) < rule.min_inlier_ratio * min(len(a), len(b)):  # even all inliers would fail
        return UNVERIFIABLE
    pa = a.xy[good]
    pb = b.xy[nn[good, 0]]
    # USAC (OpenCV's modern RANSAC): the same inliers as classic RANSAC on the grocery pairs, 10x faster on
    # unrelated pairs, where classic RANSAC runs all its iterations
    H, mask = cv2.findHomography(pa, pb, cv2.USAC_DEFAULT, rule.ransac)
    if H is None or mask is None or abs(np.linalg.det(H)) < 1e-12:
        return UNVERIFIABLE
    keep = mask.ravel().astype(bool)
    n = int(keep.sum())
    ia, ib = pa[keep], pb[keep]
    ratio = n / min(len(a), len(b))
    if screen and (n < rule.min_inliers or ratio < rule.min_inlier_ratio):  # the verdict is known: no
        return Verification(False, n, float(ratio), 0.0, 0.0)            # centre and coverage needed
    centre = min(_central(ia).sum() / max(int(_central(a.xy).sum()), 1),
                 _central(ib).sum() / max(int(_central(b.xy).sum()), 1))
    cover = min(_coverage(a.xy, ia, H), _coverage(b.xy, ib, np.linalg.inv(H)))
    ok = n >= rule.min_inliers and ratio >= rule.min_inlier_ratio and (centre + cover) / 2 >= rule.min_support
    return Verification(bool(ok), n, float(ratio), float(centre), float(cover),
                        ia if points else None, ib if points else None)


@dataclass
class Verified:
    """Verdicts of many pairs as arrays (row k is pair k)."""

    verified: np.ndarray  #: bool [m]
    inliers: np.ndarray  #: int32 [m]
    inlier_ratio: np.ndarray  #: float32 [m]
    centre: np.ndarray  #: float32 [m]
    coverage: np.ndarray  #: float32 [m]
    judged: np.ndarray | None = None  #: bool [m]; None: all judged

    def __post_init__(self) -> None:
        if self.judged is None:
            self.judged = np.ones(len(self.verified), bool)

    def __len__(self) -> int:
        return len(self.verified)

    def accepted(self, D: np.ndarray, threshold: float) -> np.ndarray:
        """Duplicates by these verdicts: verified, or (a photo too plain to judge) scoring >= threshold."""
        return self.verified | (~self.judged & (np.asarray(D) >= threshold))

    @classmethod
    def of(cls, results: Sequence[Verification]) -> Verified:
        """Pack single verdicts."""
        return cls(np.array([r.verified for r in results], bool), np.array([r.inliers for r in results], np.int32),
                   np.array([r.inlier_ratio for r in results], np.float32),
                   np.array([r.centre for r in results], np.float32),
                   np.array([r.coverage for r in results], np.float32),
                   np.array([r.judged for r in results], bool))


#: Pairs verified between two progress reports of verify_pairs.
PROGRESS_CHUNK = 512


def verify_pairs(fa: Sequence[LocalFeatures | None], fb: Sequence[LocalFeatures | None],
                 rule: VerifyRule = VERIFY, *, workers: int = DEFAULTS.verify_workers,
                 screen: bool = False, progress: Callable[[int, int], None] | None = None) -> Verified:
    """verify_pair(fa[k], fb[k], screen=screen) for every k, on `workers` threads (OpenCV releases the GIL).
    `progress` is called with (done, total) after each chunk of pairs."""
    if len(fa) != len(fb):
        raise ValueError("fa and fb must have the same length")
    pairs = list(zip(fa, fb))

    def one(ab: tuple[LocalFeatures | None, LocalFeatures | None]) -> Verification:
        return verify_pair(ab[0], ab[1], rule, screen=screen)

    out: list[Verification] = []
    if progress is not None:
        progress(0, len(pairs))
    if workers <= 1 or len(pairs) < 16:
        with small_calls():  # a pair's FAISS search is too small for a team of threads (threads.py)
            for s in range(0, len(pairs), PROGRESS_CHUNK):
                out += map(one, pairs[s:s + PROGRESS_CHUNK])
                if progress is not None:
                    progress(len(out), len(pairs))
        return Verified.of(out)
    # the pairs run in parallel, each worker on one thread of every library (threads.py)
    with thread_pool(workers, "neardup-verify") as pool:
        for s in range(0, len(pairs), PROGRESS_CHUNK):
            out += pool.map(one, pairs[s:s + PROGRESS_CHUNK], chunksize=64)
            if progress is not None:
                progress(len(out), len(pairs))
    return Verified.of(out)


def resolve_verify(verify: bool | None, local_features: str) -> bool:
    """Whether to verify: as asked, else (None) DEFAULTS.verify for a store that caches local features (a store
    made before them, or built without, is searched as it always was)."""
    return (DEFAULTS.verify and bool(local_features)) if verify is None else bool(verify)


def rerank(D: np.ndarray, v: Verified, min_inliers: int = VERIFY.min_inliers) -> np.ndarray:
    """The order in which to show one query's candidates (scores `D`, verdicts `v`): verified first, by
    inliers; then candidates with at least `min_inliers` inliers, by inliers (another shot of the product
    shares keypoints without passing the copy-strict verdict); then the rest by score."""
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
