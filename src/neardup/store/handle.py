"""Store, handle: `Store`, the store by its path — its current and previous generations, its writer, its checks —
and the conveniences over it: read_meta, read_catalog, `opened`."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..config import DEFAULTS
from ..errors import InputError, StoreError
from ..fileio import check_output_path, file_sha256
from .decisions import Journal
from .files import StoreFiles
from .generation import Generation
from .manifest import unnamed
from .meta import Catalog, Segment, StoreMeta
from .publish import Change, Published, Writer
from .restore import Restored, restore_previous


@dataclass(frozen=True)
class Previous:
    """The previous generation a store keeps (what `restore` would make current), or why it cannot be."""

    path: str
    count: int | None  #: its photos (None: damaged)
    updated: str | None = None  #: when it was written
    damaged: str | None = None  #: why it cannot be restored

    def to_json(self) -> dict:
        """As `info --json` writes it: path, count and updated, or path, count (null) and damaged."""
        if self.damaged is not None:
            return {"path": self.path, "count": None, "damaged": self.damaged}
        return {"path": self.path, "count": self.count, "updated": self.updated}


@dataclass
class StoreInfo:
    """What `neardup info` says of a store: its current generation's meta, segments and sizes, its previous
    generation and, when asked, its failures and the problems a full check found."""

    store: str
    meta: StoreMeta
    sizes: dict[str, int]  #: bytes on disk: manifest, segments, index (Generation.disk_bytes)
    segments: list[Segment]
    segments_dir: str  #: the folder of its segment files
    dead_rows: int  #: deleted rows kept until compaction
    previous: Previous | None
    failures: list[tuple[str, str]] = field(default_factory=list)  #: (path, reason), when asked for
    problems: list[str] | None = None  #: what `check` found (None: not checked; empty: healthy)

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    def to_json(self) -> dict:
        """The document of `info --json`: every meta field, then sizes, segments, failures, previous, check."""
        doc = self.meta.flat()
        doc.update(store=self.store, store_bytes=self.total_bytes, index_bytes=self.sizes["index"],
                   segments=[{"name": s.name, "rows": s.rows, "index": s.index or None} for s in self.segments],
                   dead_rows=self.dead_rows, failure_list=[{"path": p, "reason": r} for p, r in self.failures],
                   previous=self.previous.to_json() if self.previous else None,
                   check=({"problems": self.problems} if self.problems is not None else None))
        return doc


class Store:
    """The store at `path` (its manifest file). Opening a generation reads and checks it; nothing is read here."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.files = StoreFiles.resolved(self.path)  # its segments and previous generation: beside the real file

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Generation:
        """The current generation of the store at `path` (close it, or use it in a `with`)."""
        return cls(path).current()

    def current(self) -> Generation:
        """The current generation. Raises StoreError (missing, not a store, damaged: with how to recover)."""
        return Generation.open(self.path)

    def previous(self) -> Generation | None:
        """The previous generation (`neardup restore` makes it current), None when none is kept. Raises
        StoreError when it is damaged."""
        if not self.files.previous.exists():
            return None
        return Generation.open(self.files.previous, hint=False, files=self.files)

    def writer(self) -> Writer:
        """The store's one writer: `with store.writer() as w: w.publish(change)` (an OS lock; see Writer)."""
        return Writer(self.files)

    def compact(self) -> Published:
        """Rewrite the current generation as one segment, without deleted rows (under the writer lock)."""
        with self.writer() as w:
            return w.compact()

    def restore(self) -> Restored:
        """Make the previous generation current again (see restore.restore_previous). Raises InputError for a
        folder or an unwritable place, StoreError when nothing can be restored."""
        if self.files.store.is_dir():
            raise InputError(f"{self.path} is a folder; give the store's file name (e.g. "
                             f"{self.path / DEFAULTS.store})")
        check_output_path(self.files.store)
        return restore_previous(self.files)

    def describe(self, *, failures: bool = False, check: bool = False) -> StoreInfo:
        """What `neardup info` shows: the current generation (its skipped files with `failures`), the previous
        one, and with `check` the problems found reading every block (see check). Raises StoreError."""
        problems = self.check() if check else None
        previous = self.previous_info()
        with self.current() as gen:
            return StoreInfo(str(self.path), gen.meta, gen.disk_bytes(), gen.segments, str(self.files.segments),
                             gen.manifest.dead_rows if gen.manifest else 0, previous,
                             list(gen.failures) if failures else [], problems)

    def previous_info(self) -> Previous | None:
        """The previous generation as `info` describes it: its size and date, or why it is damaged."""
        try:
            prev = self.previous()
        except StoreError as exc:
            return Previous(str(self.files.previous), None, damaged=getattr(exc, "reason", str(exc)))
        if prev is None:
            return None
        with prev:
            return Previous(str(self.files.previous), len(prev), prev.meta.updated)

    def check(self) -> list[str]:
        """Read every block of every segment (each digest checked) and every index file (its digest).

        Raises StoreError, with how to recover, when the store itself is damaged. Returns the problems that
        leave the data intact (an index file missing or damaged: readers search the vectors exactly meanwhile,
        `neardup update` writes it anew; files no kept generation names, which the next writer deletes); an
        empty list means healthy."""
        problems = []
        with self.current() as gen:
            checked = gen.verify()
            if not gen.index_intact():
                problems.append("an index file is missing or does not match its digest; `neardup update DIR --repair` "
                                "writes it anew (queries search the vectors exactly meanwhile)")
            q = self.files.index(gen.meta.model.quantized_file) if gen.meta.model.quantized_file else None
            if q is not None and (not q.is_file() or (gen.meta.model.quantized_sha256 and
                                                      file_sha256(q) != gen.meta.model.quantized_sha256)):
                problems.append(f"its int8 model {gen.meta.model.quantized_file} is missing or damaged: nothing can be "
                                f"embedded for it (rebuild the store with --precision int8)")
            if gen.manifest is None:
                problems.append("written before segments (store schema 1); `neardup update` rewrites it as segments, "
                                "nothing embedded again")
            problems += [f"decisions journal: {p}" for p in Journal(self.files.decisions).read().problems]
            left = unnamed(self.files, gen.manifest, self.files.previous) if gen.manifest is not None else []
            if left:
                problems.append(f"{len(left)} file(s) that no kept generation names, left by a writer that was "
                                f"killed or being written now ({', '.join(p.name for p in left[:3])}{', ...' if len(left) > 3 else ''}); "
                                f"the next `neardup update` removes them")
        try:
            prev = self.previous()
            if prev is not None:
                with prev:
                    prev.verify(skip=checked)  # the segments both name were read once, above
        except StoreError as exc:
            problems.append(f"the previous generation {self.files.previous} is damaged "
                            f"({getattr(exc, 'reason', exc)}); it cannot be restored (the next update replaces it)")
        return problems


@contextmanager
def opened(store: Generation | str | os.PathLike[str]) -> Iterator[Generation]:
    """`store` itself when it is an open Generation, else its path's current generation, closed after: the
    library's functions take either, and open a path once."""
    if isinstance(store, Generation):
        yield store
        return
    with Generation.open(store) as gen:
        yield gen


def read_meta(path: str | os.PathLike[str]) -> StoreMeta:
    """Only the meta of a store (its manifest; segments are opened and their roots checked). Raises StoreError."""
    with Generation.open(path) as gen:
        return gen.meta


def read_catalog(path: str | os.PathLike[str], *, vectors: bool = True, local: bool = False) -> Catalog:
    """A whole store in memory (vectors when `vectors`, local features when `local` and cached). Raises
    StoreError."""
    with Generation.open(path) as gen:
        return gen.read(vectors=vectors, local=local)


def write_catalog(path: str | os.PathLike[str], cat: Catalog) -> StoreMeta:
    """Publish `cat` (rows with vectors, and local features when its meta names a version) as the whole store
    at `path`, replacing any generation there (kept as the previous one). Returns the meta published."""
    files = StoreFiles.resolved(path)
    check_output_path(files.store)
    if cat.xb is None or cat.xb.shape != (len(cat), cat.meta.model.dim):
        raise ValueError(f"embeddings must be [{len(cat)}, {cat.meta.model.dim}]")
    if cat.local is not None and len(cat.local) != len(cat):
        raise ValueError(f"local features must have {len(cat)} rows")
    meta = replace(cat.meta, local_features=cat.meta.local_features if cat.local is not None else "")
    with Writer(files) as w:
        old = np.arange(len(w.current)) if w.current is not None else np.zeros(0, np.int64)
        w.publish(Change(meta=meta, append=replace(cat, meta=meta), delete=old, failures=list(cat.failures)))
    with Generation.open(files.store) as gen:
        return gen.meta
