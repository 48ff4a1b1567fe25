"""Embed, local features (used by decode): ORB keypoints of each photo, cached for geometric verification.

ORB was chosen over SIFT by measurement on the grocery photos (benchmarks/RESULTS.md): it costs a fraction of
SIFT's time a photo, and re-ranking a trained CNN's top-10 by its RANSAC inliers lifts recall@1 about as
much. Keypoints are found on the photo scaled to LOCAL_SIDE x LOCAL_SIDE px: enough for product packaging,
and a fixed size keeps a resized copy comparable with its original, also one resized by different factors in
width and height (version 2; version 1 kept the aspect ratio, and lost such copies).

The records (`LocalFeatures`, the store's `LocalTable`) live in `neardup.features`. cv2 is imported lazily:
only indexing and verification need it.
"""
from __future__ import annotations

from types import ModuleType

import numpy as np
from PIL import Image

from ..config import DEFAULTS
from ..features import EMPTY, LocalFeatures

#: Shortest side (px, after scaling to `side`) below which a photo gets no keypoints: ORB's 31 px patches
#: and 8-level pyramid need room (a 12 x 3000 banner made OpenCV raise).
MIN_SIDE = 32


def _cv2() -> ModuleType:
    from ..threads import opencv  # the thread owner sets its threads

    return opencv()


def extract_local(img: Image.Image, *, side: int = DEFAULTS.local_side,
                  keypoints: int = DEFAULTS.local_keypoints) -> LocalFeatures:
    """ORB keypoints and descriptors of a decoded upright photo (any mode), found on the photo resized to
    `side` x `side`: its aspect ratio is normalised away, so a copy resized by different factors in width and
    height (a careless thumbnailer) keeps its descriptors (benchmarks/RESULTS.md: more such copies verify than
    with the aspect kept)."""
    cv2 = _cv2()
    gray = np.asarray(img if img.mode == "L" else img.convert("L"), dtype=np.uint8)
    h, w = gray.shape
    if min(h, w) * side / max(h, w) < MIN_SIDE:  # a banner or a sliver: too thin for ORB's pyramid
        return EMPTY
    if (h, w) != (side, side):
        gray = cv2.resize(gray, (side, side), interpolation=cv2.INTER_AREA if max(h, w) > side else cv2.INTER_LINEAR)
    try:
        kps, desc = cv2.ORB_create(nfeatures=keypoints).detectAndCompute(gray, None)
    except cv2.error:  # no image may stop a job: a photo OpenCV cannot describe has no local features
        return EMPTY
    if desc is None or not kps:
        return EMPTY
    gh, gw = gray.shape
    # strongest first: verification can screen a pair with its first keypoints before matching them all
    order = np.argsort([-k.response for k in kps], kind="stable")[:keypoints]
    xy = np.array([k.pt for k in kps], np.float32)[order] / np.array([gw, gh], np.float32)
    return LocalFeatures(xy, np.ascontiguousarray(desc[order], np.uint8))
