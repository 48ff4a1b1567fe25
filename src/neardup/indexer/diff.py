"""Index job, diff: what changed since the store's current generation, as rows to append and rows to delete.

Files whose size and mtime are unchanged keep their row (a stat, nothing read, nothing written). Other files
were hashed: same content as their row is a touch; new content at a known path is a change; the content of
a vanished row at a new path is a move (it keeps its id). Each of these deletes the old row and appends the
new one (segments are immutable); anything else is new. Rows whose file is gone are deleted; with `prune`,
so are rows whose file is no longer under the folders given. Only the appended rows carry vectors: a
nightly update reads and writes what changed, not the store.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field, replace

import numpy as np

from ..embed.pipeline import Embedded
from ..errors import InputError
from ..features import LocalFeatures, LocalTable
from ..store.generation import Generation
from ..store.meta import Catalog, StoreMeta
from .scan import FileRecord, Scan, alias_reason


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
    """One new row, as the diff assembles it."""

    id: int
    path: str
    size: int
    mtime_ns: int
    sha256: str
    vector: np.ndarray
    width: int
    height: int
    local: LocalFeatures | None = None


@dataclass
class Delta:
    """What a run changes: rows to append (sorted by path, with vectors), rows of the current generation to
    delete, the new meta (its next id) and failures, and the counts."""

    append: Catalog
    delete: np.ndarray
    meta: StoreMeta
    failures: list[tuple[str, str]]
    changes: Changes = field(default_factory=Changes)


class KnownContent(MutableMapping):
    """Content hash -> Embedded: what this run embedded or resumed, and (read lazily, only for the hashes a
    run asks about) the current generation's rows, so content seen before is never embedded again and a
    quiet night reads no vector."""

    def __init__(self, gen: Generation | None) -> None:
        self.new: dict[str, Embedded] = {}
        self._gen = gen
        self._rows: dict[str, int] | None = None

    @property
    def rows(self) -> dict[str, int]:
        """Content hash -> a row of the current generation holding it."""
        if self._rows is None:  # filled before it is published: decoding threads ask from the first file on
            rows: dict[str, int] = {}
            if self._gen is not None:
                for i, sha in enumerate(self._gen.catalog.sha256):
                    rows.setdefault(sha, i)
            self._rows = rows
        return self._rows

    def prefetch(self, hashes: set[str]) -> None:
        """Read the stored rows of `hashes` (those not embedded in this run) in one pass."""
        want = sorted({self.rows[h] for h in hashes if h not in self.new and h in self.rows})
        if not want or self._gen is None:
            return
        rows = np.array(want, np.int64)
        xb, local, cat = self._gen.vectors(rows), self._gen.local(rows), self._gen.catalog
        for k, r in enumerate(want):
            self.new.setdefault(cat.sha256[r], Embedded(xb[k], int(cat.widths[r]), int(cat.heights[r]),
                                                        local.row(k) if local is not None else None))

    def __contains__(self, sha: object) -> bool:
        return sha in self.new or sha in self.rows

    def __getitem__(self, sha: str) -> Embedded:
        if sha not in self.new:
            if sha not in self.rows:
                raise KeyError(sha)
            self.prefetch({sha})
        return self.new[sha]

    def setdefault(self, sha: str, e: Embedded) -> Embedded:  # never reads the store: same content, same vector
        return self.new.setdefault(sha, e)

    def __setitem__(self, sha: str, e: Embedded) -> None:
        self.new[sha] = e

    def __delitem__(self, sha: str) -> None:
        del self.new[sha]

    def __iter__(self) -> Iterator[str]:
        yield from self.new
        yield from (h for h in self.rows if h not in self.new)

    def __len__(self) -> int:
        return len(self.new) + sum(1 for h in self.rows if h not in self.new)


def split_unchanged(old: Catalog | None, files: list[FileRecord]) -> tuple[list[FileRecord], int]:
    """(files that must be read: new, or with another size or mtime than their row; count of the others)."""
    if old is None:
        return list(files), 0
    rows = dict(zip(old.paths, range(len(old.paths))))
    sizes, mtimes = old.sizes.tolist(), old.mtimes_ns.tolist()
    pending = []
    for f in files:
        i = rows.get(f.rel)
        if i is None or sizes[i] != f.size or mtimes[i] != f.mtime_ns:
            pending.append(f)
    return pending, len(files) - len(pending)


def assemble(old: Catalog | None, found: Scan, hashes: dict[str, str], vectors: MutableMapping[str, Embedded],
             failures: list[tuple[str, str]], *, prune: bool, new_meta: StoreMeta | None,
             unchanged: int = -1) -> Delta | None:
    """The delta from `old` (the current generation's catalogue; None for a new store) to what `found` holds
    now; None when nothing changed.

    `hashes` maps the read files (path → content hash), `vectors` content hashes to embeddings; files read
    without an embedding failed and are in `failures`. `new_meta` describes a store made from scratch (None
    when nothing could be embedded: then a new store is refused). `unchanged` is split_unchanged's count.
    """
    if old is not None and unchanged == len(found.files) == len(old) and sorted(failures) == sorted(old.failures):
        return None  # every file found is an unchanged row, and every row was found: a quiet night
    changes = Changes()
    old_rows = {p: i for i, p in enumerate(old.paths)} if old is not None else {}
    current = {f.rel for f in found.files}
    next_id = old.meta.next_id if old is not None else 0
    claimed: set[int] = set()
    delete: list[int] = []
    # Rows of the old store whose file is gone: a new path with the same content is that file, moved.
    gone_by_sha: dict[str, list[int]] = {}
    # New names of files the store keeps under a name outside the folders given (not pruned): listed, never a
    # second row of one file
    outside = [i for i, p in enumerate(old.paths) if p not in current] if old is not None else []
    ours = _identities(f for f in found.files if f.rel not in old_rows) if outside and not prune else {}
    alias_of: dict[str, str] = {}
    for i in outside:
        p = old.paths[i]
        if not found.is_blind(p):
            if found.gone(p):
                gone_by_sha.setdefault(old.sha256[i], []).append(i)
            elif ours and (name := ours.get(_identity(found.base / p))) is not None:
                alias_of[name] = p

    rows: list[Row] = []
    for f in found.files:
        i = old_rows.get(f.rel)
        if i is not None and f.rel not in hashes and old.sizes[i] == f.size and old.mtimes_ns[i] == f.mtime_ns:
            claimed.add(i)  # unchanged: its row stays as it is
            continue
        sha = hashes.get(f.rel)
        if sha is None or sha not in vectors:  # unreadable or undecodable: listed in failures
            continue
        e = vectors[sha]
        new = dict(path=f.rel, size=f.size, mtime_ns=f.mtime_ns, sha256=sha, vector=e.vector, width=e.width,
                   height=e.height, local=e.local)
        if i is not None:
            claimed.add(i)
            delete.append(i)
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
            delete.append(j)
            changes.moved += 1
            rows.append(Row(id=int(old.ids[j]), **new))
            continue
        if f.rel in alias_of:
            failures.append((f.rel, alias_reason(alias_of[f.rel])))
            continue
        changes.added += 1
        rows.append(Row(id=next_id, **new))
        next_id += 1

    failed = {p for p, _ in failures}
    if old is not None:
        for i, p in enumerate(old.paths):
            if i in claimed:
                continue
            # kept: under a folder that could not be listed this time (not known to be gone), or still on
            # disk but outside the folders given this time
            if p in failed or (not found.is_blind(p) and (prune or found.gone(p))):
                changes.removed += 1
                delete.append(i)
        nothing_changed = not (changes.added or changes.changed or changes.moved or changes.removed
                               or changes.touched) and sorted(failures) == sorted(old.failures)
        if nothing_changed:
            return None
        meta = old.meta
    else:
        if new_meta is None:
            reasons = "; ".join(f"{p}: {r}" for p, r in failures[:3])
            raise InputError(f"nothing could be indexed ({reasons})")
        meta = new_meta
    meta = replace(meta, next_id=next_id)
    return Delta(catalog_of(rows, meta), np.array(sorted(delete), np.int64), meta, sorted(failures), changes)


def _identity(path: object) -> tuple[int, int] | None:
    """(device, inode) of the file `path` names (symlinks followed); None when it cannot be stat-ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _identities(files: Iterable[FileRecord]) -> dict[tuple[int, int], str]:
    """(device, inode) -> name, of `files` (a stat each: only the files new to the store)."""
    return {k: f.rel for f in files if (k := _identity(f.abs)) is not None}


def catalog_of(rows: list[Row], meta: StoreMeta, failures: list[tuple[str, str]] | None = None) -> Catalog:
    """Rows (sorted here by path) as a column Catalog."""
    rows = sorted(rows, key=lambda r: r.path)
    return Catalog(
        meta=meta, ids=np.array([r.id for r in rows], np.int64), paths=[r.path for r in rows],
        sizes=np.array([r.size for r in rows], np.int64), mtimes_ns=np.array([r.mtime_ns for r in rows], np.int64),
        sha256=[r.sha256 for r in rows], widths=np.array([r.width for r in rows], np.int32),
        heights=np.array([r.height for r in rows], np.int32),
        xb=np.stack([r.vector for r in rows]).astype(np.float32) if rows else np.zeros((0, meta.model.dim), np.float32),
        failures=failures or [], local=LocalTable.of([r.local for r in rows]) if meta.local_features else None)
