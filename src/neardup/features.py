"""Bottom layer: the records of local features that the stages pass and the store keeps.

`LocalFeatures` are one photo's keypoints; `LocalTable` packs many rows into fixed-size arrays (the store's
layout: `count` keypoints, -1 = not extracted; `xy` as fractions of width and height; 32-byte ORB
descriptors). They live below both the extractor (`embed.local_features`) and the store, which must not
import each other.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import DEFAULTS

#: Recorded in the store; features of another version are not compared with these.
LOCAL_VERSION = f"orb-v2-square/{DEFAULTS.local_keypoints}/{DEFAULTS.local_side}"
#: Bytes of one ORB descriptor.
DESC_BYTES = 32


@dataclass(frozen=True)
class LocalFeatures:
    """Keypoints of one photo, strongest first: `xy` float32 [m, 2] as fractions of (width, height), `desc`
    uint8 [m, 32]."""

    xy: np.ndarray
    desc: np.ndarray

    def __len__(self) -> int:
        return len(self.xy)


EMPTY = LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, DESC_BYTES), np.uint8))


@dataclass
class LocalTable:
    """Local features of many rows as fixed-size arrays (the store's layout)."""

    count: np.ndarray  #: int16 [n]; -1 = not extracted
    xy: np.ndarray  #: float16 [n, K, 2]
    desc: np.ndarray  #: uint8 [n, K, 32]

    def __len__(self) -> int:
        return len(self.count)

    def row(self, i: int) -> LocalFeatures | None:
        """Row i's features (None when not extracted)."""
        c = int(self.count[i])
        if c < 0:
            return None
        return LocalFeatures(self.xy[i, :c].astype(np.float32), self.desc[i, :c])

    @classmethod
    def empty(cls, n: int, k: int = DEFAULTS.local_keypoints) -> LocalTable:
        """n rows, none extracted."""
        return cls(np.full(n, -1, np.int16), np.zeros((n, k, 2), np.float16), np.zeros((n, k, DESC_BYTES), np.uint8))

    @classmethod
    def of(cls, rows: list[LocalFeatures | None], k: int = DEFAULTS.local_keypoints) -> LocalTable:
        """Pack per-row features (None: not extracted)."""
        t = cls.empty(len(rows), k)
        for i, f in enumerate(rows):
            if f is None:
                continue
            m = min(len(f), k)
            t.count[i] = m
            t.xy[i, :m] = f.xy[:m]
            t.desc[i, :m] = f.desc[:m]
        return t
