"""Search stage 2a, grouping: duplicate pairs into groups that cannot chain unrelated products, the keeper of
each group, and the files that may never be called removable (gone, changed, or another name of a listed file).
"""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Collection

import numpy as np

from ..store.generation import Generation
from ..store.meta import Catalog


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


def complete_linkage(S: np.ndarray, threshold: float, forced: np.ndarray | None = None,
                     forbidden: np.ndarray | None = None) -> list[list[int]]:
    """Split one component into groups in which EVERY two members score >= threshold.

    Rule (deterministic, greedy): the member with most partners (ties: higher mean score, then lower row)
    seeds a group; its partners join in descending score to the seed while they score >= threshold with
    every member already in the group. Repeat on the rest. A chain A~B~C with A!~C becomes {A, B} (or
    {B, C}) and C (or A) is left out or grouped elsewhere: a chain never merges unrelated products.
    `forced` marks pairs that are always linked (byte-identical files, pairs a person confirmed), `forbidden`
    pairs that never are (a person decided them distinct): no group holds both. Returns lists of local indices.
    """
    m = len(S)
    adj = S >= threshold
    if forced is not None:
        adj |= forced
    if forbidden is not None:
        adj &= ~forbidden
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


def keeper_order(cat: Catalog, rows: np.ndarray, stale: dict[int, str] | None = None) -> np.ndarray:
    """`rows` sorted best keeper first: a file still as indexed (not in `stale`), then largest resolution, then
    largest file, then oldest, then path."""
    stale = stale or {}
    return np.array(sorted(rows.tolist(), key=lambda r: (r in stale, -int(cat.widths[r]) * int(cat.heights[r]),
                                                           -int(cat.sizes[r]), int(cat.mtimes_ns[r]),
                                                           cat.paths[r])), np.int64)


def stale_rows(gen: Generation, rows: np.ndarray) -> dict[int, str]:
    """The `rows` whose file is gone ("missing") or is no longer the file indexed ("changed": another size or
    modification time): their pairs were found on what the file was, so they are flagged, never a keeper."""
    cat, out = gen.catalog, {}
    for r in np.asarray(rows, np.int64).tolist():
        try:
            st = os.stat(gen.image_path(r))
        except OSError:
            out[r] = "missing"
            continue
        if st.st_size != int(cat.sizes[r]) or st.st_mtime_ns != int(cat.mtimes_ns[r]):
            out[r] = "changed"
    return out


def alias_rows(gen: Generation, rows: np.ndarray) -> dict[int, int]:
    """The `rows` that name the same file as another of `rows` (a symlink to it, a hard link, its folder reached
    through a symlink; a store indexed before names were resolved holds such rows): row -> the row of the name
    kept for that file, the one with the fewest links on the way, then the first by path. Two names of one file
    are one photo: deleting one as a "duplicate" of the other would delete both (a link dies with its target)."""
    from ..indexer.scan import link_depth

    by_file: dict[tuple[int, int], list[int]] = defaultdict(list)
    for r in np.asarray(rows, np.int64).tolist():
        try:
            st = os.stat(gen.image_path(r))
        except OSError:
            continue  # gone: stale_rows says so
        by_file[(st.st_dev, st.st_ino)].append(r)
    out: dict[int, int] = {}
    for names in by_file.values():
        if len(names) > 1:
            names.sort(key=lambda r: (link_depth(str(gen.image_path(r))), gen.catalog.paths[r]))
            out.update((r, names[0]) for r in names[1:])
    return out


def changed_rows(gen: Generation, rows: np.ndarray, skip: Collection[int] = ()) -> dict[int, str]:
    """The `rows` (but those in `skip`) whose file no longer holds the content indexed (its SHA-256, read again):
    a file replaced with one of the same size and modification time is caught here, before it is called a
    keeper or removable. Unreadable files are "missing"."""
    from ..fileio import file_sha256

    cat, out = gen.catalog, {}
    for r in np.unique(np.asarray(rows, np.int64)).tolist():
        if r in skip:
            continue
        try:
            if file_sha256(gen.image_path(r)) != cat.sha256[r]:
                out[r] = "changed"
        except OSError:
            out[r] = "missing"
    return out
