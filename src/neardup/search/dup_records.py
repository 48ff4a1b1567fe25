"""The records that `duplicates` hands on: Pair, Member, Group and DuplicateReport.

Pairs are kept as arrays of catalogue rows (millions of pairs stay cheap); `Pair` is one of them as a row of
the pairs CSV; a `Group`'s members are `Member`s, the keeper first.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class Pair:
    """Two catalogue images that are duplicates: kind "exact" (same bytes) or "near" (score >= threshold)."""

    a_id: int
    a_path: str
    b_id: int
    b_path: str
    score: float
    kind: str
    verified: bool | None = None  #: the geometric verdict (None: not verified)
    inliers: int | None = None  #: RANSAC inliers of the verification
    a_stale: str | None = None  #: "missing" or "changed" when a's file is no longer the one indexed
    b_stale: str | None = None
    decision: str | None = None  #: a person's decision on the pair ("duplicate"; None: undecided)


@dataclass(frozen=True)
class Member:
    """One image of a Group, as indexed."""

    id: int
    path: str
    width: int
    height: int
    size: int  #: bytes
    score_to_keeper: float  #: cosine with the keeper (1.0 for the keeper itself)
    exact: bool  #: byte-identical to the keeper (never the keeper itself)
    keeper: bool
    stale: str | None = None  #: "missing", "changed" or "alias": never keeper nor removable
    alias_of: str | None = None  #: the path kept for the file this one is another name of
    #: RANSAC inliers with the keeper, verified groups only (-1: byte-identical or the keeper itself)
    inliers_to_keeper: int | None = None
    #: "duplicate" when a person confirmed this member and the keeper are duplicates (search/review.py)
    decision: str | None = None

    @property
    def removable(self) -> bool:
        """Not the keeper, and still the file that was indexed."""
        return not self.keeper and not self.stale

    def as_json(self) -> dict:
        """The member as the groups JSON holds it (no inliers_to_keeper key when not verified)."""
        doc = asdict(self)
        if self.inliers_to_keeper is None:
            del doc["inliers_to_keeper"]
        return doc


@dataclass
class Group:
    """Images that all pairwise match; `keeper` is suggested to keep, the others are removable."""

    keeper: int  #: id
    members: list[Member]  #: the keeper first
    keeper_decided: bool = False  #: the keeper is the one a person chose (a duplicate decision's keeper)


@dataclass
class DuplicateReport:
    """Result of find_duplicates. Pairs are kept as arrays of catalog rows: millions of pairs stay cheap."""

    store: str
    model: str
    threshold: float
    n: int
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  #: catalog row -> id
    paths: list[str] = field(default_factory=list)  #: catalog row -> stored path
    I: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # noqa: E741 - FAISS vocabulary
    J: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    D: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    exact: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    groups: list[Group] = field(default_factory=list)
    seconds: float = 0.0
    verify: bool = False  #: pairs were geometrically verified (then `verified` and `inliers` are filled)
    verified: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    inliers: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    candidates: int = 0  #: candidate pairs verified
    k: int = 0  #: neighbours per image among the candidates
    loose_threshold: float = 0.0  #: the candidates' threshold
    verify_seconds: float = 0.0
    method: str = "exact join"  #: how pairs were found: the exact self-join, or the store index's k-NN
    #: catalog row -> "missing" / "changed": listed files no longer as indexed (stale_rows, changed_rows), or
    #: "alias": another name of a listed file (alias_rows); never a keeper nor removable
    stale: dict[int, str] = field(default_factory=dict)
    aliases: dict[int, int] = field(default_factory=dict)  #: catalog row -> the row of its file's name kept
    generation: str = ""  #: the store generation the pairs were found in (Generation.id)
    decisions: dict[int, str] = field(default_factory=dict)  #: pair index -> its decision (decided pairs only)
    hidden_distinct: int = 0  #: pairs found but not listed: a person decided they are distinct
    hidden_decided: int = 0  #: with new_only, decided duplicate pairs not listed
    new_only: bool = False  #: only pairs nobody decided are listed, and the groups holding one
    decision_problems: list[str] = field(default_factory=list)  #: what was wrong with the decisions journal

    def keep_pairs(self, keep: np.ndarray) -> None:
        """Keep only the pairs where the bool array `keep` is True (in every pair array)."""
        self.I, self.J, self.D, self.exact = self.I[keep], self.J[keep], self.D[keep], self.exact[keep]
        if self.verify:
            self.verified, self.inliers = self.verified[keep], self.inliers[keep]

    @property
    def n_pairs(self) -> int:
        """Number of pairs."""
        return len(self.I)

    @property
    def n_exact(self) -> int:
        """Number of byte-identical pairs."""
        return int(self.exact.sum())

    def iter_pairs(self, start: int = 0, stop: int | None = None) -> Iterator[Pair]:
        """Pairs as objects: exact pairs first, then (verified ones first, when verified) by descending score."""
        ver = self.verified[start:stop].tolist() if self.verify else [None] * len(self.I[start:stop])
        inl = self.inliers[start:stop].tolist() if self.verify else [None] * len(self.I[start:stop])
        for x, (a, b, s, e, v, n) in enumerate(zip(self.I[start:stop].tolist(), self.J[start:stop].tolist(),
                                                   self.D[start:stop].tolist(), self.exact[start:stop].tolist(),
                                                   ver, inl), start):
            yield Pair(int(self.ids[a]), self.paths[a], int(self.ids[b]), self.paths[b], round(s, 6),
                       "exact" if e else "near", v, n, self.stale.get(a), self.stale.get(b), self.decisions.get(x))

    @property
    def pairs(self) -> list[Pair]:
        """All pairs as a list (see iter_pairs for large reports)."""
        return list(self.iter_pairs())
