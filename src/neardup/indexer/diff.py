"""Index job, diff: what changed since the store was written, and the new store's rows.

Files whose size and mtime are unchanged keep their row (a stat, nothing read). Other files were hashed: same
content as their row is a touch; new content at a known path is a change; the content of a vanished row at a
new path is a move (it keeps its id); anything else is new. Rows whose file is gone are removed; with
`prune`, so are rows whose file is no longer under the folders given.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import InputError
from .local_features import LocalFeatures, LocalTable
from .pipeline import Embedded
from .scan import FileRecord, Scan
from .store import Catalog, StoreMeta


@dataclass
class Changes:
    """How the store's rows changed in one run (rows whose file has the same size and mtime aside)."""

    added: int = 0
    changed: int = 0
    moved: int = 0
    removed: int = 0
    touched: int = 0  #: mtime/size changed but identical content: no embedding


@dataclass(frozen=True)
class Row:
    """One row of a store, as the diff assembles it."""

    id: int
    path: str
    size: int
    mtime_ns: int
    sha256: str
    vector: np.ndarray
    width: int
    height: int
    local: LocalFeatures | None = None

    @classmethod
    def of(cls, cat: Catalog, i: int) -> Row:
        """Row i of a catalog."""
        return cls(int(cat.ids[i]), cat.paths[i], int(cat.sizes[i]), int(cat.mtimes_ns[i]), cat.sha256[i],
                   cat.xb[i], int(cat.widths[i]), int(cat.heights[i]),
                   cat.local.row(i) if cat.local is not None else None)


def split_unchanged(old: Catalog | None, files: list[FileRecord]) -> tuple[list[FileRecord], int]:
    """(files that must be read: new, or with another size or mtime than their row; count of the others)."""
    rows = {p: i for i, p in enumerate(old.paths)} if old is not None else {}
    pending = []
    for f in files:
        i = rows.get(f.rel)
        if i is None or old.sizes[i] != f.size or old.mtimes_ns[i] != f.mtime_ns:
            pending.append(f)
    return pending, len(files) - len(pending)


def assemble(old: Catalog | None, found: Scan, hashes: dict[str, str], vectors: dict[str, Embedded],
             failures: list[tuple[str, str]], *, prune: bool,
             new_meta: StoreMeta | None) -> tuple[Catalog | None, Changes]:
    """The new catalog (None when it would equal `old`) and what changed.

    `hashes` maps the read files (path → content hash), `vectors` content hashes to embeddings; files read
    without an embedding failed and are in `failures`. `new_meta` describes a store made from scratch (None
    when nothing could be embedded: then a new store is refused).
    """
    changes = Changes()
    old_rows = {p: i for i, p in enumerate(old.paths)} if old is not None else {}
    current = {f.rel for f in found.files}
    next_id = old.meta.next_id if old is not None else 0
    claimed: set[int] = set()
    # Rows of the old store whose file is gone: a new path with the same content is that file, moved.
    gone_by_sha: dict[str, list[int]] = {}
    if old is not None:
        for i, p in enumerate(old.paths):
            if p not in current and not found.is_blind(p) and found.gone(p):
                gone_by_sha.setdefault(old.sha256[i], []).append(i)

    rows: list[Row] = []
    for f in found.files:
        i = old_rows.get(f.rel)
        if i is not None and f.rel not in hashes and old.sizes[i] == f.size and old.mtimes_ns[i] == f.mtime_ns:
            claimed.add(i)
            rows.append(Row.of(old, i))
            continue
        sha = hashes.get(f.rel)
        if sha is None or sha not in vectors:  # unreadable or undecodable: listed in failures
            continue
        e = vectors[sha]
        new = dict(path=f.rel, size=f.size, mtime_ns=f.mtime_ns, sha256=sha, vector=e.vector, width=e.width,
                   height=e.height, local=e.local)
        if i is not None:
            claimed.add(i)
            if old.sha256[i] == sha:
                changes.touched += 1
            else:
                changes.changed += 1
            rows.append(Row(id=int(old.ids[i]), **new))
            continue
        moved_from = gone_by_sha.get(sha)
        if moved_from:
            j = moved_from.pop(0)
            claimed.add(j)
            changes.moved += 1
            rows.append(Row(id=int(old.ids[j]), **new))
            continue
        changes.added += 1
        rows.append(Row(id=next_id, **new))
        next_id += 1

    failed = {p for p, _ in failures}
    if old is not None:
        for i, p in enumerate(old.paths):
            if i in claimed or p in failed:
                continue
            # kept: under a folder that could not be listed this time (not known to be gone), or still on
            # disk but outside the folders given this time
            if not found.is_blind(p) and (prune or found.gone(p)):
                changes.removed += 1
                continue
            rows.append(Row.of(old, i))
        changes.removed += sum(1 for i, p in enumerate(old.paths) if p in failed and i not in claimed)
        nothing_changed = not (changes.added or changes.changed or changes.moved or changes.removed
                               or changes.touched) and sorted(failures) == sorted(old.failures)
        if nothing_changed:
            return None, changes
        meta = old.meta
    else:
        if new_meta is None:
            reasons = "; ".join(f"{p}: {r}" for p, r in failures[:3])
            raise InputError(f"nothing could be indexed ({reasons})")
        meta = new_meta
    return catalog_of(rows, replace(meta, next_id=next_id), sorted(failures)), changes


def catalog_of(rows: list[Row], meta: StoreMeta, failures: list[tuple[str, str]]) -> Catalog:
    """Rows (sorted here by path) as a column Catalog."""
    rows = sorted(rows, key=lambda r: r.path)
    return Catalog(
        meta=meta, ids=np.array([r.id for r in rows], np.int64), paths=[r.path for r in rows],
        sizes=np.array([r.size for r in rows], np.int64), mtimes_ns=np.array([r.mtime_ns for r in rows], np.int64),
        sha256=[r.sha256 for r in rows], widths=np.array([r.width for r in rows], np.int32),
        heights=np.array([r.height for r in rows], np.int32),
        xb=np.stack([r.vector for r in rows]).astype(np.float32) if rows else np.zeros((0, meta.dim), np.float32),
        failures=failures, local=LocalTable.of([r.local for r in rows]) if meta.local_features else None)
