"""Store, generation: one published generation of a store, pinned and immutable — what every reader uses.

`Generation.open(path)` reads the manifest (its digest checked) and opens every segment it names (each
root digest checked); the segment files and index parts stay open, so the generation stays readable after
a writer publishes the next one and deletes what no kept manifest names (an unlinked file stays readable
through an open handle). Its catalogue, vectors, local features and FAISS index all come from those files,
every block checked as it is read: searches, duplicates, evaluation, reports and the service take a
Generation, never a path.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from ..config import DEFAULTS, resolve_threshold, stored_model_spec
from ..errors import StoreError
from ..features import LocalTable
from ..fileio import file_sha256
from . import faiss_index, index_kinds
from .damage import damaged
from .files import StoreFiles
from .manifest import LegacyFile, moved_on, open_any
from .meta import Catalog, Manifest, Segment, StoreMeta
from .segment import Damage, SegmentFile
from .settings import SettingsFile, StoreSettings

if TYPE_CHECKING:
    import faiss  # imported by faiss_index when an index is first needed

log = logging.getLogger(__name__)


class Generation:
    """One generation of a store, open for reading; use it as a context manager or `close()` it."""

    def __init__(self, path: Path, files: StoreFiles, source: Manifest | LegacyFile,
                 readers: Sequence[SegmentFile | LegacyFile]) -> None:
        self.path, self.files = path, files
        self._readers: Sequence[SegmentFile | LegacyFile] = readers
        self.manifest = source if isinstance(source, Manifest) else None
        self.meta: StoreMeta = source.meta
        self.failures: list[tuple[str, str]] = list(source.failures)
        if isinstance(source, LegacyFile):
            self._segments = [Segment("legacy", source.rows, "")]
            self._live = [np.ones(source.rows, bool)]
        else:
            self._segments = list(source.segments)
            for seg, r in zip(self._segments, readers):  # the manifest and its segments must agree
                if r.rows != seg.rows or r.dim != self.meta.model.dim:
                    raise Damage(f"segment {seg.name} holds {r.rows} rows of dim {r.dim}; its manifest says "
                                 f"{seg.rows} of dim {self.meta.model.dim}", seg.name)
            self._live = [source.live(s) for s in self._segments]
        counts = [int(m.sum()) for m in self._live]
        self._seg = np.repeat(np.arange(len(counts), dtype=np.int32), counts)  # row -> segment
        self._row = np.concatenate([np.flatnonzero(m) for m in self._live]) if counts else np.zeros(0, np.int64)
        self._lock = threading.Lock()
        self.damage: str | None = None  #: damage found in this generation's files while serving (first_damage)
        self.closed = False
        self._index_files = self._open_index_files()

    # ------------------------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, hint: bool = True, files: StoreFiles | None = None) -> Generation:
        """The generation whose manifest is `path`: a store's current one, or (with the store's `files`) its
        previous one. Raises StoreError: missing, not a store, damaged (with how to recover, unless `hint` is
        False)."""
        path = Path(path)
        if not path.exists():
            raise StoreError(f"no store at {path}")
        if path.is_dir():
            raise StoreError(f"{path} is a folder; give the store's file name (e.g. {path / DEFAULTS.store})")
        files = files or StoreFiles.of_manifest(path)  # segments lie beside the real file, also through a symlink
        for _ in range(5):  # a writer may publish twice and delete our segments between our reads: read again
            try:
                source = open_any(path)
            except Damage as exc:
                raise damaged(path, exc.reason, hint) from None
            if isinstance(source, LegacyFile):
                return cls(path, files, source, [source])
            readers: list[SegmentFile] = []
            try:
                for seg in source.segments:
                    readers.append(SegmentFile(files.segment(seg.name), seg.sha256, seg))
                gen = cls(path, files, source, readers)
            except Damage as exc:
                for r in readers:
                    r.close()
                if moved_on(path, source, files):
                    continue
                raise damaged(path, exc.reason, hint, exc.segment) from None
            if gen.missing_index_files() and moved_on(path, source, files, index=True):
                gen.close()  # its index parts were deleted by a later publish before we opened them
                continue
            return gen
        raise StoreError(f"{path} changed during each of 5 reads; is a writer publishing in a loop?")

    def missing_index_files(self) -> list[str]:
        """The index files this generation names that could not be opened."""
        wanted = [s.index for s in self._segments if s.index]
        if self.meta.index.file and self.meta.index.factory != "Flat":
            wanted.append(self.meta.index.file)
        return [w for w in wanted if w not in self._index_files]

    def _open_index_files(self) -> dict[str, BinaryIO]:
        """The index files this generation's index is read from, opened now (they stay readable when a writer
        deletes them later); none for an exact index, which is the vectors themselves."""
        out: dict[str, BinaryIO] = {}
        wanted = [(s.index, self.files.segment_index(s.index)) for s in self._segments if s.index]
        if self.meta.index.file and self.meta.index.factory != "Flat":
            wanted.append((self.meta.index.file, self.files.index(self.meta.index.file)))
        for name, p in wanted:
            try:
                out[name] = open(p, "rb")
            except OSError:
                pass  # rebuilt from the vectors when needed (and said then)
        return out

    def close(self) -> None:
        """Release the files (the generation cannot be read after)."""
        self.closed = True
        for r in self._readers:
            r.close()
        for fh in self._index_files.values():
            fh.close()
        self._readers, self._index_files = [], {}

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ reading
    @property
    def id(self) -> str:
        """The generation's 12 hex digits (new at every publish)."""
        return self.meta.generation

    def __len__(self) -> int:
        return len(self._seg)

    @contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Damage found while reading becomes the store's StoreError, with how to recover."""
        try:
            yield
        except Damage as exc:
            raise damaged(self.path, f"{what}: {exc.reason}", segment=exc.segment) from None

    def _column(self, name: str) -> np.ndarray:
        with self._reading(name):
            parts = [r.column(name)[live] for r, live in zip(self._readers, self._live)]
        return np.concatenate(parts) if parts else np.zeros(0)

    @cached_property
    def catalog(self) -> Catalog:
        """The live rows' columns (without vectors or local features; read once, checked)."""
        with self._reading("catalogue"):
            paths: list[str] = []
            sha: list[str] = []
            for r, live in zip(self._readers, self._live):
                rp, rs = r.paths(), r.sha256()
                if len(rp) != r.rows:
                    raise Damage(f"{len(rp)} paths for {r.rows} rows")
                keep = np.flatnonzero(live).tolist()
                paths += rp if len(keep) == r.rows else [rp[i] for i in keep]
                sha += rs if len(keep) == r.rows else [rs[i] for i in keep]
        n = len(self)

        def col(name: str, dt: type) -> np.ndarray:
            return self._column(name).astype(dt) if n else np.zeros(0, dt)

        ids = col("ids", np.int64)
        if len(np.unique(ids)) != len(ids):  # a forged or mixed-up manifest: a photo would pair with itself
            raise damaged(self.path, "an id is in more than one row of its segments")
        return Catalog(meta=self.meta, ids=ids, paths=paths, sizes=col("sizes", np.int64),
                       mtimes_ns=col("mtimes_ns", np.int64), sha256=sha, widths=col("widths", np.int32),
                       heights=col("heights", np.int32), xb=None, failures=self.failures)

    def _take(self, name: str, rows: np.ndarray | None, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        """Column `name` of `rows` (default: all live rows), reading only their blocks."""
        if rows is None:
            rows = np.arange(len(self))
        rows = np.asarray(rows, np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows out of range [0, {len(self)})")
        out: np.ndarray = np.empty((len(rows), *shape), dtype)
        seg = self._seg[rows]
        with self._reading(name):
            for k in np.unique(seg).tolist():
                at = np.flatnonzero(seg == k)
                out[at] = self._readers[k].take(name, self._row[rows[at]])
        return out

    def vectors(self, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 [len(rows), d] stored vectors of `rows` (default: all)."""
        return self._take("embeddings", rows, (self.meta.model.dim,), np.float32)

    def vector_runs(self, start: int = 0, rows: int = 0) -> Iterator[tuple[int, np.ndarray]]:
        """The live rows' stored vectors from row `start` on, in checked runs of ~`rows` rows (0: ~64 MB):
        (first row, float32 [m, d]), for a pass over a store too large to hold in memory."""
        step, first = rows or max(1, (64 << 20) // max(1, 4 * self.meta.model.dim)), 0  # first: the segment's row 0
        with self._reading("embeddings"):
            for r, live in zip(self._readers, self._live):
                pos = np.flatnonzero(live)
                for at in range(max(0, start - first), len(pos), step):
                    raw = pos[at:at + step]  # the segment's own rows, ascending
                    block = r.span("embeddings", int(raw[0]), int(raw[-1]) + 1)
                    yield first + at, np.ascontiguousarray(block[raw - raw[0]], np.float32)
                first += len(pos)

    def local(self, rows: np.ndarray | None = None) -> LocalTable | None:
        """The cached local features of `rows` (default: all), or None when the store caches none."""
        if not self.meta.local_features or not all(r.has("local/count") for r in self._readers):
            return None
        if rows is None:
            rows = np.arange(len(self))
        count = self._take("local/count", rows, (), np.int16)
        xy = self._take("local/xy", rows, (DEFAULTS.local_keypoints, 2), np.float16)
        return LocalTable(count, xy, self._take("local/desc", rows, (DEFAULTS.local_keypoints, 32), np.uint8))

    def read(self, *, vectors: bool = True, local: bool = False) -> Catalog:
        """The whole generation in memory: the catalogue, with vectors and local features if asked."""
        cat = self.catalog
        return Catalog(meta=cat.meta, ids=cat.ids, paths=cat.paths, sizes=cat.sizes, mtimes_ns=cat.mtimes_ns,
                       sha256=cat.sha256, widths=cat.widths, heights=cat.heights,
                       xb=self.vectors() if vectors else None, failures=cat.failures,
                       local=self.local() if local else None)

    @cached_property
    def _lookup(self) -> tuple[np.ndarray, np.ndarray]:
        return faiss_index.id_lookup(self.catalog.ids)

    def rows_of(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Rows of catalogue `ids` (any shape); -1 for an id not in this generation (and for -1)."""
        return faiss_index.rows_for(self._lookup, ids)

    @cached_property
    def folder(self) -> Path:
        """The store's real folder (symlinks resolved), which stored paths are relative to."""
        return self.files.store.resolve().parent

    def image_path(self, row: int) -> Path:
        """The indexed file of `row` (stored paths are relative to the store's real folder)."""
        return self.folder / self.catalog.paths[row]

    def threshold(self, threshold: float | None = None) -> float:
        """The match threshold: `threshold` when given, else the one applied to the store (its settings file,
        `neardup evaluate --fit --apply`), else this store's model's default (the one rule)."""
        if threshold is None:
            threshold = self.settings.threshold
        return resolve_threshold(threshold, self.meta.model.name)

    def candidate_threshold(self, loose: float | None = None) -> float:
        """The loose cosine of verification's candidates: `loose` when given, else the one applied to the store,
        else the model's (config.MODEL_TABLE)."""
        if loose is None:
            loose = self.settings.candidate_threshold
        name = self.meta.model.name
        return resolve_threshold(stored_model_spec(name).loose_threshold if loose is None else loose, name)

    @cached_property
    def settings_file(self) -> SettingsFile:
        """The store's settings file, read again when it changes (a running service follows `--apply`)."""
        return SettingsFile(self.files.store)

    @property
    def settings(self) -> StoreSettings:
        """The thresholds applied to the store. Raises StoreError when its settings file is damaged."""
        return self.settings_file.current()

    # ------------------------------------------------------------------------------------------- index
    @property
    def index(self) -> faiss.Index:
        """The FAISS index of the live rows, its search knob set (built or loaded once, then kept)."""
        with self._lock:
            if "_index" not in self.__dict__:
                self.__dict__["_index"] = self._load_index()
            return self.__dict__["_index"]

    def _flat(self):
        index = faiss_index.build_flat_index(np.zeros((0, self.meta.model.dim), np.float32), np.zeros(0, np.int64))
        ids = self.catalog.ids
        at = 0
        with self._reading("embeddings"):
            for r, live in zip(self._readers, self._live):  # in runs: memory is the index plus one run
                for start, xb in r.runs("embeddings"):
                    keep = live[start:start + len(xb)]
                    n = int(keep.sum())
                    index.add_with_ids(np.ascontiguousarray(xb[keep], np.float32), ids[at:at + n])
                    at += n
        return index

    def _index_bytes(self, name: str, sha256: str) -> bytes | None:
        fh = self._index_files.get(name)
        if fh is None:
            return None
        data = os.pread(fh.fileno(), os.fstat(fh.fileno()).st_size, 0)
        if not sha256 and self.manifest is not None:  # a manifest records every index file's digest
            return None
        return data if not sha256 or hashlib.sha256(data).hexdigest() == sha256 else None

    def _load_index(self) -> faiss.Index:
        m = self.meta
        if m.index.factory == "Flat":
            return self._flat()
        index = None
        if m.index.file:  # one whole file (HNSW; a store written before segments)
            data = self._index_bytes(m.index.file, m.index.sha256)
            index = faiss_index.index_from_bytes(data) if data is not None else None
        else:
            index = self._merged_parts()
        if index is None or index.ntotal != len(self) or not np.array_equal(
                np.sort(faiss_index.index_ids(index)), np.sort(self.catalog.ids)):
            log.warning("the index of %s is missing, damaged or does not match its rows; searching its vectors "
                        "exactly instead (`neardup update DIR --repair` writes it anew)", self.path)
            return self._flat()
        index_kinds.apply_params(index, m.index.params)  # FAISS does not save nprobe with the index
        return index

    def _merged_parts(self) -> faiss.Index | None:
        """The segments' index parts merged, each without its dead rows; a part that is missing or damaged is
        built again in memory from its segment's vectors with the others' training (said in the log): an index
        chosen to fit a memory budget stays within it. None when no part is intact."""
        loaded: list[tuple[Segment, np.ndarray, bytes]] = []
        lost: list[Segment] = []
        for s, live in zip(self._segments, self._live):
            data = self._index_bytes(s.index, s.index_sha256) if s.index else None
            if data is None:
                lost.append(s)
            else:
                loaded.append((s, live, data))
        if not loaded:
            return None
        parts: list[tuple[faiss.Index, np.ndarray]] = []
        for s, live, data in loaded:
            dead = self._column_of(s, "ids")[~live] if not live.all() else np.zeros(0, np.int64)
            parts.append((faiss_index.index_from_bytes(data), dead))
        if lost:
            log.warning("index parts of %d segments of %s are missing or damaged; built again in memory (`neardup "
                        "update DIR --repair` writes them anew)", len(lost), self.path)
            template = faiss_index.template_of(parts[0][0])
            for s in lost:
                k = self._segments.index(s)
                rows = np.flatnonzero(self._seg == k)
                parts.append((faiss_index.part(template, self.vectors(rows), self.catalog.ids[rows]),
                              np.zeros(0, np.int64)))
        return faiss_index.merged(parts)

    def _column_of(self, seg: Segment, name: str) -> np.ndarray:
        k = self._segments.index(seg)
        with self._reading(name):
            return self._readers[k].column(name)

    def index_intact(self, full: bool = True) -> bool:
        """Whether every index file this generation names is there (with `full`: and has its recorded digest,
        which reads them whole)."""
        m = self.meta
        if m.index.factory == "Flat":
            return True
        if not full:
            files = [m.index.file] if m.index.file else [s.index for s in self._segments]
            return all(name in self._index_files for name in files)
        named = [(m.index.file, m.index.sha256)] if m.index.file else [(s.index, s.index_sha256) for s in
                                                                        self._segments]
        for name, sha in named:
            p = self.files.index(name) if name == m.index.file else self.files.segment_index(name)
            try:
                if not name or (sha and file_sha256(p) != sha):
                    return False
            except OSError:
                return False
        return True

    # ------------------------------------------------------------------------------------------- checks
    def verify(self, skip: Collection[tuple[str, str]] = ()) -> set[tuple[str, str]]:
        """Read and check every block of every segment but those in `skip`: (name, digest) of segments another
        generation's verify already checked (generations share most of their segments). Returns this
        generation's (name, digest) pairs. Raises StoreError (damaged)."""
        with self._reading("full check"):
            for seg, r in zip(self._segments, self._readers):
                if not seg.sha256 or (seg.name, seg.sha256) not in skip:  # a file before segments: no digest
                    r.verify()
        self.catalog  # noqa: B018 - its ids are checked unique
        return {(seg.name, seg.sha256) for seg in self._segments if seg.sha256}

    def first_damage(self, what: str) -> bool:
        """Record damage found while reading; True the first time (so it is said once, not on every request)."""
        with self._lock:
            first, self.damage = self.damage is None, self.damage or what
        return first

    def disk_bytes(self) -> dict[str, int]:
        """Bytes on disk: the manifest, the segments and the index files this generation names."""

        def size(p: Path) -> int:
            return p.stat().st_size if p.exists() else 0

        idx = [self.files.segment_index(s.index) for s in self._segments if s.index]
        if self.meta.index.file:
            idx.append(self.files.index(self.meta.index.file))
        segs = [self.files.segment(s.name) for s in self._segments] if self.manifest is not None else []
        return {"manifest": size(self.path), "segments": sum(size(p) for p in segs),
                "index": sum(size(p) for p in idx)}

    @property
    def segments(self) -> list[Segment]:
        """The segments in row order (a store written before segments: one, named "legacy")."""
        return list(self._segments)
