"""Search stage 2, duplicates: every pair at or above a cosine threshold, and anti-chaining groups with a keeper.

The all-pairs search is an exact blocked self-join: block after block of rows is multiplied (BLAS sgemm)
against the rows after it only, so each pair is computed once (half the work of a full xb @ xb.T or a
FAISS range search) and memory is bounded by the block, never by n².
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import DEFAULTS, resolve_threshold
from ..errors import InputError
from ..fileio import atomic_write, check_output_path
from ..indexer.store import Catalog, read_catalog

log = logging.getLogger(__name__)


def self_join(xb: np.ndarray, threshold: float, block: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) of rows of xb with inner product >= threshold.

    Returns (I, J, D): int64 row indices and float32 scores, sorted by (I, J). Memory beyond xb is about
    block * n * 5 bytes; the default block keeps it near half the bytes of xb, and at least 16 MB.
    """
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    n, d = xb.shape
    if block is None:
        budget = max(16 << 20, xb.nbytes // 2)
        block = int(np.clip(budget // (5 * max(n, 1)), 16, DEFAULTS.join_block))
    out_i, out_j, out_d = [], [], []
    for r in range(0, n, block):
        q = xb[r:r + block]
        sims = q @ xb[r:].T  # rows r.., columns r..: the lower triangle is never computed
        # keep only j > i: the diagonal block is the first len(q) columns
        sims[:, :len(q)][np.tril_indices(len(q))] = -np.inf
        ii, jj = np.nonzero(sims >= threshold)
        out_i.append(ii + r)
        out_j.append(jj + r)
        out_d.append(sims[ii, jj])
        del sims
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return (np.concatenate(out_i).astype(np.int64), np.concatenate(out_j).astype(np.int64),
            np.concatenate(out_d).astype(np.float32))


def exact_pairs(hashes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i < j) of rows with the same content hash: byte-identical files."""
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        by_hash[h].append(i)
    pi, pj = [], []
    for rows in by_hash.values():
        for a in range(len(rows)):
            for b in range(a + 1, len(rows)):
                pi.append(rows[a])
                pj.append(rows[b])
    return np.array(pi, np.int64), np.array(pj, np.int64)


def connected_components(n: int, pi: np.ndarray, pj: np.ndarray) -> list[np.ndarray]:
    """Components (of size >= 2) of the graph on n nodes with edges (pi, pj), as sorted row arrays."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as cc

    if len(pi) == 0:
        return []
    graph = coo_matrix((np.ones(len(pi), np.int8), (pi, pj)), shape=(n, n))
    _, labels = cc(graph, directed=False)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    comps = [c for c in np.split(order, bounds) if len(c) > 1]
    return sorted((np.sort(c).astype(np.int64) for c in comps), key=lambda c: int(c[0]))


def complete_linkage(S: np.ndarray, threshold: float, forced: np.ndarray | None = None) -> list[list[int]]:
    """Split one component into groups in which EVERY two members score >= threshold.

    Rule (deterministic, greedy): the member with most partners (ties: higher mean score, then lower row)
    seeds a group; its partners join in descending score to the seed while they score >= threshold with
    every member already in the group. Repeat on the rest. A chain A~B~C with A!~C becomes {A, B} (or
    {B, C}) and C (or A) is left out or grouped elsewhere: a chain never merges unrelated products.
    `forced` marks pairs that are always linked (byte-identical files). Returns lists of local indices.
    """
    m = len(S)
    adj = S >= threshold
    if forced is not None:
        adj |= forced
    np.fill_diagonal(adj, False)
    alive = np.ones(m, bool)
    degree = adj.sum(1).astype(np.int64)
    mean = np.where(adj, S, 0).sum(1) / np.maximum(degree, 1)
    groups = []
    while True:
        cand = np.flatnonzero(alive & (degree > 0))
        if len(cand) == 0:
            break
        order = np.lexsort((cand, -mean[cand], -degree[cand]))
        seed = int(cand[order[0]])
        compatible = adj[seed] & alive
        group = [seed]
        for c in sorted(np.flatnonzero(compatible).tolist(), key=lambda c: (-S[seed, c], c)):
            if compatible[c]:
                group.append(c)
                compatible &= adj[c]
        members = np.array(group)
        alive[members] = False
        degree -= adj[:, members].sum(1)
        groups.append(sorted(group))
    return groups


def keeper_order(cat: Catalog, rows: np.ndarray) -> np.ndarray:
    """`rows` sorted best keeper first: largest resolution, then largest file, then oldest, then path."""
    return np.array(sorted(rows.tolist(), key=lambda r: (-int(cat.widths[r]) * int(cat.heights[r]),
                                                           -int(cat.sizes[r]), int(cat.mtimes_ns[r]),
                                                           cat.paths[r])), np.int64)


@dataclass(frozen=True)
class Pair:
    """Two catalogue images that are duplicates: kind "exact" (same bytes) or "near" (score >= threshold)."""

    a_id: int
    a_path: str
    b_id: int
    b_path: str
    score: float
    kind: str


@dataclass
class Group:
    """Images that all pairwise match; `keeper` is suggested to keep, the others are removable."""

    keeper: int  #: id
    members: list[dict]  #: id, path, width, height, size, score_to_keeper, keeper


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

    @property
    def n_pairs(self) -> int:
        """Number of pairs."""
        return len(self.I)

    @property
    def n_exact(self) -> int:
        """Number of byte-identical pairs."""
        return int(self.exact.sum())

    def iter_pairs(self, start: int = 0, stop: int | None = None) -> Iterator[Pair]:
        """Pairs as objects, exact pairs first, then by descending score."""
        for a, b, s, e in zip(self.I[start:stop].tolist(), self.J[start:stop].tolist(),
                              self.D[start:stop].tolist(), self.exact[start:stop].tolist()):
            yield Pair(int(self.ids[a]), self.paths[a], int(self.ids[b]), self.paths[b], round(s, 6),
                       "exact" if e else "near")

    @property
    def pairs(self) -> list[Pair]:
        """All pairs as a list (see iter_pairs for large reports)."""
        return list(self.iter_pairs())


def duplicate_rows(cat: Catalog, threshold: float, block: int | None = None) -> tuple[np.ndarray, ...]:
    """Pure core of find_duplicates: (I, J, D, exact) row pairs of a catalog, exact pairs first."""
    ei, ej = exact_pairs(cat.sha256)
    ni, nj, nd = self_join(cat.xb, threshold, block)
    if len(ei):
        n = np.int64(len(cat))
        keep = ~np.isin(ni * n + nj, ei * n + ej)
        ni, nj, nd = ni[keep], nj[keep], nd[keep]
    order = np.lexsort((nj, ni, -nd))
    I = np.concatenate([ei, ni[order]])
    J = np.concatenate([ej, nj[order]])
    D = np.concatenate([np.ones(len(ei), np.float32), nd[order]])
    exact = np.concatenate([np.ones(len(ei), bool), np.zeros(len(ni), bool)])
    return I, J, D, exact


def find_duplicates(store: str | os.PathLike[str], *, threshold: float | None = None,
                    block: int | None = None, max_group_search: int = 20_000) -> DuplicateReport:
    """All duplicate pairs of a store and their anti-chaining groups (see complete_linkage).

    A connected cluster larger than `max_group_search` images (its dense similarity matrix would take
    gigabytes) means the threshold is far too low for the model: that is refused with InputError.
    """
    t0 = time.perf_counter()
    cat = read_catalog(store)
    t = resolve_threshold(threshold, cat.meta.model)
    I, J, D, exact = duplicate_rows(cat, t, block)
    report = DuplicateReport(store=str(store), model=cat.meta.model, threshold=t, n=len(cat), ids=cat.ids,
                             paths=cat.paths, I=I, J=J, D=D, exact=exact)
    comps = connected_components(len(cat), I, J)
    comp_of = np.full(len(cat), -1, np.int64)
    for ci, comp in enumerate(comps):
        comp_of[comp] = ci
    exact_in: dict[int, list[tuple[int, int]]] = defaultdict(list)  # byte-identical pairs, by component
    for a, b in zip(I[exact].tolist(), J[exact].tolist()):
        exact_in[int(comp_of[a])].append((a, b))
    for ci, comp in enumerate(comps):
        if len(comp) > max_group_search:
            raise InputError(
                f"threshold {t:.4f} links {len(comp)} images into one cluster, too many to be duplicates; "
                f"raise --threshold (with {cat.meta.model}, {report.n_pairs} pairs score above it)")
        S = cat.xb[comp] @ cat.xb[comp].T
        forced = np.zeros_like(S, bool)
        local = {r: k for k, r in enumerate(comp.tolist())}
        for a, b in exact_in[ci]:
            forced[local[a], local[b]] = forced[local[b], local[a]] = True
        for g in complete_linkage(S, t, forced):
            rows = keeper_order(cat, comp[g])
            keeper = int(rows[0])
            kl = local[keeper]
            members = [{"id": int(cat.ids[r]), "path": cat.paths[r], "width": int(cat.widths[r]),
                        "height": int(cat.heights[r]), "size": int(cat.sizes[r]),
                        "score_to_keeper": 1.0 if r == keeper else round(float(S[kl, local[r]]), 6),
                        "exact": bool(r != keeper and forced[kl, local[r]]), "keeper": r == keeper}
                       for r in rows.tolist()]
            report.groups.append(Group(keeper=int(cat.ids[keeper]), members=members))
    report.groups.sort(key=lambda g: (-len(g.members), -min(m["score_to_keeper"] for m in g.members)))
    report.seconds = time.perf_counter() - t0
    return report


# ------------------------------------------------------------------- files: pairs CSV and groups JSON

def write_pairs_csv(report: DuplicateReport, path: str | os.PathLike[str]) -> None:
    """Pairs as CSV: a_id, a_path, b_id, b_path, score, kind (exact pairs first, then by score)."""
    path = Path(path)
    check_output_path(path)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["a_id", "a_path", "b_id", "b_path", "score", "kind"])
            for p in report.iter_pairs():
                w.writerow([p.a_id, p.a_path, p.b_id, p.b_path, f"{p.score:.6f}", p.kind])

    atomic_write(path, write)


def groups_document(report: DuplicateReport) -> dict:
    """The JSON-ready description of the groups."""
    return {
        "store": report.store, "model": report.model, "threshold": report.threshold, "images": report.n,
        "rule": "complete linkage: every two members of a group score >= threshold (identical files always "
                "match); keeper = largest resolution, then largest file, then oldest, then path",
        "groups": [{"group": k + 1, "size": len(g.members), "keeper": g.keeper,
                    "keeper_path": next(m["path"] for m in g.members if m["keeper"]),
                    "removable": [m["path"] for m in g.members if not m["keeper"]], "members": g.members}
                   for k, g in enumerate(report.groups)],
    }


def write_groups_json(report: DuplicateReport, path: str | os.PathLike[str]) -> None:
    """Groups as JSON (see groups_document)."""
    path = Path(path)
    check_output_path(path)
    doc = groups_document(report)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1, ensure_ascii=False),
                                                        encoding="utf-8"))


def read_pairs_csv(path: str | os.PathLike[str]) -> list[Pair]:
    """Read a pairs CSV as written by `neardup duplicates --out` (a_path, b_path, score; a_id, b_id, kind optional).

    Raises InputError for a missing file, missing columns or a bad score.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no pairs file at {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = {c.strip() for c in (reader.fieldnames or [])}
            need = {"a_path", "b_path", "score"}
            if not need <= cols:
                raise InputError(f"{path} is not a pairs CSV: it needs the columns a_path,b_path,score "
                                 f"(found: {','.join(sorted(cols)) or 'nothing'})")
            pairs = []
            for line, row in enumerate(reader, start=2):
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                try:
                    score = float(row["score"])
                    a_id, b_id = int(row.get("a_id") or -1), int(row.get("b_id") or -1)
                except ValueError:
                    raise InputError(f"{path}, line {line}: bad score or id") from None
                if not math.isfinite(score):
                    raise InputError(f"{path}, line {line}: the score must be a number, not {row['score']!r}")
                if not row["a_path"] or not row["b_path"]:
                    raise InputError(f"{path}, line {line}: empty path")
                kind = row.get("kind") or "near"
                if kind not in ("exact", "near"):
                    raise InputError(f"{path}, line {line}: kind must be exact or near, not {kind!r}")
                pairs.append(Pair(a_id, row["a_path"], b_id, row["b_path"], score, kind))
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a UTF-8 text file") from None
    return pairs


def read_groups_json(path: str | os.PathLike[str]) -> dict:
    """Read a groups JSON as written by `neardup duplicates --groups` (see groups_document).

    Raises InputError for a missing file or a document without groups of members with paths.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no groups file at {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not a JSON file ({exc})") from None
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if not isinstance(groups, list):
        raise InputError(f"{path} is not a groups JSON: it has no \"groups\" list")
    for k, g in enumerate(groups, start=1):
        members = g.get("members") if isinstance(g, dict) else None
        if not isinstance(members, list) or not all(isinstance(m, dict) and isinstance(m.get("path"), str)
                                                    for m in members):
            raise InputError(f"{path}: group {k} has no list of members with paths")
        for m in members:
            s = m.get("score_to_keeper", 1.0)
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise InputError(f"{path}: group {k} has a member whose score_to_keeper is not a number")
    return doc
