"""Store, publish: the one writer of a store — new segments, tombstones, compaction, the index, restore.

A publish writes what changed and nothing else: the new rows as one new segment (with its part of an
approximate index), the deleted rows as tombstones in a new manifest, and the manifest itself, published
with `os.replace` after everything it names is durable. The manifest it replaces becomes the previous
generation (`<store>.prev`, a hard link), so `neardup restore` can bring it back; files that neither names
are deleted after the publish. Compaction is the exception that rewrites rows: when dead rows exceed a
quarter of those written, every live row is copied into one segment; when segments pile up, the newest
small ones are merged into one (each row is copied O(log n) times over a store's life).

Readers are never disturbed: a segment or index file is never modified, only created and, when no kept
manifest names it any more, deleted (a reader that has it open keeps reading it).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..config import VERSION
from ..errors import InputError, StoreError
from ..fileio import now_iso
from ..indexer import faiss_index, index_kinds
from .files import StoreFiles, new_name
from .generation import Generation, damaged
from .manifest import LegacyFile, open_any, write_manifest
from .segment import Damage, SegmentFile, segment_columns, write_segment
from .lock import writer_lock
from .meta import SCHEMA_VERSION, Catalog, Manifest, Segment, StoreMeta

log = logging.getLogger(__name__)

#: Compact (copy every live row into one segment) when more than this share of the rows written are dead.
DEAD_SHARE = 0.25
#: Merge the newest small segments when a generation would have more than this many.
MAX_SEGMENTS = 10


@dataclass
class Change:
    """One publish: rows to append (with vectors, and local features when the store caches them), rows of
    the current generation to delete, and the new generation's meta and failures."""

    meta: StoreMeta
    append: Catalog | None = None
    delete: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    failures: list[tuple[str, str]] = field(default_factory=list)
    reindex: bool = False  #: build the index anew (another kind asked for, or its files damaged)


@dataclass(frozen=True)
class Published:
    """What a publish wrote."""

    generation: str
    count: int  #: live rows of the new generation
    rows_written: int  #: rows copied into new segments (appended, plus any compaction)
    bytes_written: int  #: bytes of the new segments, index files and manifest
    compacted: str  #: "" / "merged N segments" / "compacted": what compaction did
    reindexed: bool


def _named(path: Path, files: StoreFiles) -> tuple[set[str], set[str]]:
    """(segment and index-part names, whole-index files) a manifest names; nothing for a damaged one."""
    try:
        got = open_any(path)
    except (StoreError, OSError):
        return set(), set()
    if isinstance(got, LegacyFile):
        got.close()
        return set(), {got.meta.index_file}
    return ({s.name for s in got.segments} | {s.index for s in got.segments if s.index},
            {got.meta.index_file} if got.meta.index_file else set())


def remove_unnamed(files: StoreFiles, *manifests: Path) -> None:
    """Delete the segments and index files no manifest among `manifests` names (under the writer lock)."""
    names: set[str] = set()
    index_files: set[str] = set()
    for m in manifests:
        a, b = _named(m, files)
        names |= a
        index_files |= b
    files.remove_unnamed(names, index_files)


class Writer:
    """The store's writer: holds its lock, reads its current generation, publishes the next.

    `with Writer(files) as w:` takes the lock (StoreLockedError when another process has it), removes what a
    killed writer left and finishes a killed restore; `w.current` is the current generation (None for a new
    store), opened and checked (a damaged store stops here, untouched). With `repair`, every block is read
    first and damaged segments are left out of `w.current` (`w.dropped`): the next publish drops them."""

    def __init__(self, files: StoreFiles, *, repair: bool = False) -> None:
        self.files, self.repair = files, repair
        self.current: Generation | None = None
        #: with `repair`: the damaged segments left out of the current generation, and why; damaged index parts
        self.dropped: list[tuple[Segment, str]] = []
        self.bad_parts: set[str] = set()
        self._lock = None
        self._bytes = 0  #: bytes of the segment and index files written by this writer

    def __enter__(self) -> Writer:
        self._lock = writer_lock(self.files)
        self._lock.__enter__()
        try:
            self.files.remove_temporaries()
            self.files.finish_restore()
            if self.files.store.exists() and self.repair:  # every block read; damaged segments left out
                self.current, self.dropped = open_healthy(self.files.store, self.files)
                for seg, why in self.dropped:
                    log.warning("segment %s (%d rows) is damaged (%s): left out; its photos are indexed again",
                                seg.name, seg.rows, why)
                cur = self.current
                self.bad_parts = {s.index for s in cur.segments if s.index and
                                  cur._index_bytes(s.index, s.index_sha256) is None}
            elif self.files.store.exists():
                self.current = Generation.open(self.files.store)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.current is not None:
            self.current.close()
        self._lock.__exit__(*exc)

    # ------------------------------------------------------------------------------------------ publish
    def publish(self, change: Change, *, compact: bool | None = None) -> Published:
        """Publish the next generation: `change` applied to the current one. `compact` forces (True) or
        forbids (False) a full compaction; None decides by the dead share. Returns what was written."""
        cur, files = self.current, self.files
        files.segments.mkdir(exist_ok=True)
        created = now_iso()
        meta = replace(change.meta, schema_version=SCHEMA_VERSION, neardup_version=VERSION, updated=created,
                       created=(cur.meta.created if cur is not None else "") or change.meta.created or created)
        local = meta.local_features
        written: list[Segment] = []
        segments: list[Segment] = []
        dead: dict[str, np.ndarray] = {}
        keep = np.ones(len(cur) if cur is not None else 0, bool)
        keep[np.asarray(change.delete, np.int64)] = False
        upgrade = cur is not None and cur.manifest is None  # a store written before segments
        if cur is not None and not upgrade:
            segments = list(cur.segments)
            dead = {k: v.copy() for k, v in cur.manifest.dead.items()}
            for k, s in enumerate(segments):  # the deleted rows, as (segment, row) tombstones
                gone = ~keep & (cur._seg == k)
                if gone.any():
                    dead[s.name] = np.union1d(dead.get(s.name, np.zeros(0, np.int64)), cur._row[gone])
        full = upgrade or bool(compact) or (compact is None and cur is not None and not upgrade and
                                            _dead_share(segments, dead) > DEAD_SHARE)
        if full and cur is not None:  # every live row kept, copied into one segment (in bounded pieces)
            n = int(keep.sum())
            segments, dead = [], {}
            if n:
                written.append(self._segment(n, meta, local, created, cur.pieces(keep)))
                segments.append(written[-1])
        if change.append is not None and len(change.append):
            cols = segment_columns(change.append)
            written.append(self._segment(len(change.append), meta, local, created, iter([cols])))
            segments.append(written[-1])
        segments = [s for s in segments if len(dead.get(s.name, ())) < s.rows]  # wholly deleted: dropped
        dead = {s.name: dead[s.name] for s in segments if s.name in dead}
        merged = ""
        if not full and len(segments) > MAX_SEGMENTS:
            segments, dead, merged = self._merge_tail(segments, dead, meta, created, written, change.append)
        live = sum(s.rows for s in segments) - sum(len(v) for v in dead.values())
        man = Manifest(meta=replace(meta, generation=new_name(), count=live, failures=len(change.failures)),
                       segments=segments, dead=dead, failures=sorted(change.failures),
                       parent=cur.id if cur is not None else "")
        man, reindexed = self._index(man, cur, written, change.reindex or upgrade)
        # a repair keeps no generation that names a dropped (damaged) segment: it could never be restored
        keep = files.store.exists() and not self.dropped
        write_manifest(files.store, man, before_replace=files.keep_previous if keep else None)
        if self.dropped and self.dropped[0][0].name in _named(files.previous, files)[0]:
            files.previous.unlink()
        remove_unnamed(files, files.store, files.previous)
        return Published(man.meta.generation, man.meta.count, sum(s.rows for s in written),
                         self._bytes + files.store.stat().st_size, "compacted" if full and cur is not None else merged,
                         reindexed)

    def compact(self) -> Published:
        """Copy every live row of the current generation into one segment (and publish it)."""
        if self.current is None:
            raise StoreError(f"no store at {self.files.store}")
        return self.publish(Change(self.current.meta, failures=self.current.failures), compact=True)

    def _segment(self, n: int, meta: StoreMeta, local: str, created: str,
                 pieces: Iterator[dict[str, np.ndarray | list[str]]]) -> Segment:
        path = self.files.segment(new_name())
        seg = write_segment(path, n, meta.dim, local, created, pieces)
        self._bytes += path.stat().st_size
        return seg

    def _save(self, index, path: Path) -> str:  # noqa: ANN001
        sha = faiss_index.save_index(index, path)
        self._bytes += path.stat().st_size
        return sha

    def _merge_tail(self, segments: list[Segment], dead: dict[str, np.ndarray], meta: StoreMeta, created: str,
                    written: list[Segment], appended: Catalog | None) -> tuple[list[Segment], dict, str]:
        """Merge the longest tail of segments whose live rows together are no more than the segment before
        it holds (so segment sizes fall geometrically and a row is copied O(log n) times)."""
        live = [s.rows - len(dead.get(s.name, ())) for s in segments]
        j = next((j for j in range(1, len(segments) - 1) if sum(live[j:]) <= live[j - 1]),
                 len(segments) - MAX_SEGMENTS // 2)
        tail = segments[j:]
        with _Pinned(self.files, tail, dead) as gen:
            n = len(gen)
            seg = self._segment(n, meta, meta.local_features, created, gen.pieces())
        written[:] = [s for s in written if s not in tail] + [seg]  # (an appended segment merged: deleted)
        return segments[:j] + [seg], {k: v for k, v in dead.items() if k not in {s.name for s in tail}}, \
            f"merged {len(tail)} segments"

    # -------------------------------------------------------------------------------------------- index
    def _index(self, man: Manifest, cur: Generation | None, written: list[Segment],
               reindex: bool) -> tuple[Manifest, bool]:
        """The new generation's index: nothing for an exact one (its vectors are searched); for an IVF kind, a
        part for each new segment from the trained template (or all parts anew when the plan changed: the store
        grew past a boundary, another kind was asked for); for other kinds, one whole file."""
        m = man.meta
        plan = index_kinds.plan(m.index_kind, m.count, m.dim, m.index_memory or None)
        same = plan.factory == m.index_factory and not reindex and cur is not None
        if plan.exact:
            man.meta = replace(m, index_factory="Flat", index_params="", index_recall=1.0, index_recall_queries=0,
                               index_file="", index_sha256="")
            man.segments = [replace(s, index="", index_sha256="") for s in man.segments]
            return man, m.index_factory != "Flat"
        if same and m.index_factory != "Flat":
            template = self._template(cur, man)
            if template is not None:
                if not faiss_index.mergeable(template):  # HNSW: one whole index, rebuilt
                    return self._whole(man, faiss_index.part(template, *self._live_vectors(man))), False
                keep = {s.index for s in man.segments if s.index and s not in written} & set(cur._index_files) \
                    - self.bad_parts  # a part lost (or, with repair, damaged) is written anew
                man.segments = [s if s.index in keep else self._part(template, s, man) for s in man.segments]
                return man, False
        return self._retrained(man), True

    def _template(self, cur: Generation, man: Manifest):  # noqa: ANN202 - faiss.Index or None
        """An empty copy of the current index's training (None when its files are missing or damaged)."""
        m = cur.meta
        name, sha = (m.index_file, m.index_sha256) if m.index_file else next(
            ((s.index, s.index_sha256) for s in cur.segments if s.index), ("", ""))
        data = cur._index_bytes(name, sha) if name else None
        return faiss_index.template_of(faiss_index.index_from_bytes(data)) if data is not None else None

    def _live_vectors(self, man: Manifest, segments: list[Segment] | None = None) -> tuple[np.ndarray, np.ndarray]:
        with _Pinned(self.files, segments or man.segments, man.dead) as gen:
            return gen.vectors(), gen.catalog.ids

    def _part(self, template, seg: Segment, man: Manifest) -> Segment:  # noqa: ANN001
        name = new_name()
        xb, ids = self._live_vectors(man, [seg])
        sha = self._save(faiss_index.part(template, xb, ids), self.files.segment_index(name))
        return replace(seg, index=name, index_sha256=sha)

    def _whole(self, man: Manifest, index) -> Manifest:  # noqa: ANN001
        name = self.files.new_index_name()
        sha = self._save(index, self.files.index(name))
        man.meta = replace(man.meta, index_file=name, index_sha256=sha)
        man.segments = [replace(s, index="", index_sha256="") for s in man.segments]
        return man

    def _retrained(self, man: Manifest) -> Manifest:
        """Train the planned index on every live vector, tune it to the target recall, and write its parts."""
        m = man.meta
        xb, ids = self._live_vectors(man)
        factory = index_kinds.plan(m.index_kind, len(xb), m.dim, m.index_memory or None).factory
        try:
            template = index_kinds.trained(xb, factory)
        except (InputError, RuntimeError) as exc:  # too few vectors to train it yet: exact for now
            log.warning("index %s cannot be trained on %d vectors (%s); the store keeps an exact index until an "
                        "update has enough", factory, len(xb), " ".join(str(exc).split())[:200])
            man.meta = replace(m, index_factory="Flat", index_params="", index_recall=1.0, index_recall_queries=0,
                               index_file="", index_sha256="")
            man.segments = [replace(s, index="", index_sha256="") for s in man.segments]
            return man
        if faiss_index.mergeable(template):
            man.segments = [self._part(template, s, man) for s in man.segments]
            man.meta = replace(m, index_factory=factory, index_params="", index_file="", index_sha256="")
            with _Pinned(self.files, man.segments, man.dead, manifest=man) as gen:
                index = gen.index  # the parts merged, as a reader will see them
        else:
            index = faiss_index.part(template, xb, ids)
        got = index_kinds.tune(index, xb, ids, target=m.index_target)
        log.info("index %s: recall@%d %.3f at %s, measured on %d store vectors", factory, index_kinds.RECALL_K,
                 got.recall, got.params or "its defaults", got.queries)
        if not faiss_index.mergeable(template):
            man = self._whole(man, index)
        man.meta = replace(man.meta, index_factory=factory, index_params=got.params, index_recall=got.recall,
                           index_recall_queries=got.queries)
        return man


def open_healthy(path: Path, files: StoreFiles) -> tuple[Generation, list[tuple[Segment, str]]]:
    """The store's current generation without its damaged segments (every block of every segment read and
    checked: a full check), and the segments left out with why. Raises StoreError when the manifest
    itself is damaged (a restore helps there), or a store written before segments is."""
    if not path.is_file():
        Generation.open(path, files=files)  # missing, or a folder: says so
    try:
        source = open_any(path)
    except Damage as exc:
        raise damaged(path, exc.reason) from None
    if isinstance(source, LegacyFile):
        gen = Generation(path, files, source, [source])
        gen.verify()
        return gen, []
    readers, kept, dropped = [], [], []
    for seg in source.segments:
        try:
            r = SegmentFile(files.segment(seg.name), seg.sha256)
        except Damage as exc:
            dropped.append((seg, exc.reason))
            continue
        try:
            r.verify()
        except Damage as exc:
            r.close()
            dropped.append((seg, exc.reason))
            continue
        readers.append(r)
        kept.append(seg)
    man = Manifest(meta=source.meta, segments=kept, dead={s.name: source.dead[s.name] for s in kept
                                                           if s.name in source.dead},
                   failures=source.failures, parent=source.parent)
    man.meta = replace(source.meta, count=man.count)
    return Generation(path, files, man, readers), dropped


def _dead_share(segments: list[Segment], dead: dict[str, np.ndarray]) -> float:
    total = sum(s.rows for s in segments)
    return sum(len(v) for v in dead.values()) / total if total else 0.0


class _Pinned(Generation):
    """Segments of a generation being written, opened as a generation (to copy or index their rows)."""

    def __init__(self, files: StoreFiles, segments: list[Segment], dead: dict[str, np.ndarray],
                 manifest: Manifest | None = None) -> None:
        m = manifest or Manifest(meta=StoreMeta("", "", "", 0, 0, ""), segments=segments,
                                 dead={k: v for k, v in dead.items() if k in {s.name for s in segments}})
        if manifest is None:
            with SegmentFile(files.segment(segments[0].name), segments[0].sha256) as first:
                dim, local = first.dim, first.local_features
            m.meta = replace(m.meta, dim=dim, local_features=local, index_factory="Flat")
        readers = []
        try:
            for s in m.segments:
                readers.append(SegmentFile(files.segment(s.name), s.sha256))
        except Damage:
            for r in readers:
                r.close()
            raise
        super().__init__(files.store, files, m, readers)
