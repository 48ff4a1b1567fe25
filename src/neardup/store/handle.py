"""Store, handle: `Store`, the store by its path — its current and previous generations, its writer, its checks —
and the conveniences over it: read_meta, read_catalog, `opened`."""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import StoreError
from ..fileio import check_output_path, file_sha256
from .files import StoreFiles
from .generation import Generation
from .manifest import unnamed
from .meta import Catalog, StoreMeta
from .publish import Change, Published, Writer
from .restore import Restored, restore_previous


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
        """Make the previous generation current again (see restore.restore_previous)."""
        return restore_previous(self.files)

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
            q = self.files.index(gen.meta.quantized_file) if gen.meta.quantized_file else None
            if q is not None and (not q.is_file() or (gen.meta.quantized_sha256 and
                                                      file_sha256(q) != gen.meta.quantized_sha256)):
                problems.append(f"its int8 model {gen.meta.quantized_file} is missing or damaged: nothing can be "
                                f"embedded for it (rebuild the store with --precision int8)")
            if gen.manifest is None:
                problems.append("written before segments (store schema 1); `neardup update` rewrites it as segments, "
                                "nothing embedded again")
            left = unnamed(self.files, gen.manifest, self.files.previous) if gen.manifest is not None else []
            if left:
                shown = ", ".join(p.name for p in left[:3]) + (", ..." if len(left) > 3 else "")
                problems.append(f"{len(left)} file(s) that no kept generation names, left by a writer that was "
                                f"killed or being written now ({shown}); the next `neardup update` removes them")
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
    if cat.xb is None or cat.xb.shape != (len(cat), cat.meta.dim):
        raise ValueError(f"embeddings must be [{len(cat)}, {cat.meta.dim}]")
    if cat.local is not None and len(cat.local) != len(cat):
        raise ValueError(f"local features must have {len(cat)} rows")
    meta = replace(cat.meta, local_features=cat.meta.local_features if cat.local is not None else "")
    with Writer(files) as w:
        old = np.arange(len(w.current)) if w.current is not None else np.zeros(0, np.int64)
        w.publish(Change(meta=meta, append=replace(cat, meta=meta), delete=old, failures=list(cat.failures)))
    with Generation.open(files.store) as gen:
        return gen.meta
