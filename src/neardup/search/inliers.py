"""Search stage 0b, inliers: the inlier correspondences of a pair's verification, for drawing (the review
page's lines, `neardup plot`): which keypoint of one photo matched which of the other, and the verdict.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from ..config import VERIFY, VerifyRule
from ..embed.decode import file_local_features
from ..errors import DecodeError
from ..store.generation import Generation
from .verify import Verification, row_features, verify_pair

log = logging.getLogger(__name__)


def pair_points(gen: Generation, row_a: int, row_b: int, rule: VerifyRule = VERIFY) -> Verification:
    """The verdict on catalogue rows `row_a` and `row_b` of a generation with its inlier correspondences:
    `xy_a[i]` in row_a's photo matches `xy_b[i]` in row_b's (fractions of width and height; None when no
    homography was fitted). Judged from the cached features (else the files) and screened as `duplicates`
    screens, so a drawing of these points shows what the listed verdict counted."""
    fa, fb = row_features(gen, np.array([row_a, row_b], np.int64))
    return verify_pair(fa, fb, rule, points=True, screen=True)


def file_points(a: str | os.PathLike[str], b: str | os.PathLike[str], *, mode: str = "RGB",
                rule: VerifyRule = VERIFY) -> Verification | None:
    """pair_points for two image files, decoded as a store of input `mode` decodes them (None when either
    cannot be read: then there is no verdict to draw)."""
    try:
        fa, fb = (file_local_features(p, mode=mode) for p in (a, b))
    except DecodeError as exc:
        log.info("no verification: %s", exc)
        return None
    return verify_pair(fa, fb, rule, points=True, screen=True)
