"""Store, publish: the one writer of a store — new segments, tombstones, compaction, the index.

A publish writes what changed and nothing else: the new rows as one new segment (with its part of an
approximate index), the deleted rows as tombstones in a new manifest, and the manifest itself, published
with `os.replace` after everything it names is durable. The manifest it replaces becomes the previous
generation (`<store>.prev`, a hard link), so `neardup restore` can bring it back; files that neither names
are deleted after the publish. Compaction is the exception that rewrites rows: when dead rows exceed a
quarter of those written, every live row is copied into one segment; when segments pile up, the newest
small ones of similar size are merged into one (merge_start: each row is copied O(log n) times over a
store's life).

Readers are never disturbed: a segment or index file is never modified, only created and, when no kept
manifest names it any more, deleted (a reader that has it open keeps reading it).
"""
from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..config import VERSION
from ..errors import InputError, StoreError
from ..fileio import now_iso
from . import faiss_index, index_kinds
from .damage import damaged
from .files import StoreFiles, new_name
from .generation import Generation
from .h5io import file_digest
from .lock import writer_lock
from .manifest import is_store, named, open_any, remove_unnamed, write_manifest
from .meta import RECORDED, SCHEMA_VERSION, Catalog, Manifest, Segment, StoreMeta
from .repair import DroppedSegment, open_healthy, rebuild
from .segment import LARGE, Damage, SegmentFile, plain, segment_columns, write_segment

log = logging.getLogger(__name__)

#: Compact (copy every live row into one segment) when more than this share of the rows written are dead.
DEAD_SHARE = 0.25
#: The newest segments are merged, this many at a time, while their sizes are within this factor of each
#: other (simulated over 3,000 nightly updates of 100 rows: each row copied 7 times, at most 11 segments;
#: 1,000 updates of 2,000 rows over 200k: 5.9 times, 9 segments).
MERGE_FANOUT = 3
#: Past this many segments the newest are merged whatever their sizes.
MAX_SEGMENTS = 16


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
    bytes_written: int  #: bytes of the new segments, index files and manifest that it keeps
    compacted: str  #: "", "merged N segments", "compacted" or "upgraded": what compaction did
    reindexed: bool


def merge_start(live: list[int], fanout: int = MERGE_FANOUT, limit: int = MAX_SEGMENTS) -> int | None:
    """Where the tail of segments to merge into one starts (None: no merge), given each segment's live rows,
    oldest first. The newest `fanout` segments are merged while their sizes are within a factor `fanout` of
    each other, as often as that holds (a size-tiered rule: segments grow geometrically, each row is copied
    O(log n) times, and a big segment is never rewritten to absorb a small one); past `limit` segments, the
    newest `fanout` are merged whatever their sizes."""
    tiers = [(n, 1) for n in live]  # (rows, original segments merged into it)
    while len(tiers) >= fanout and max(n for n, _ in tiers[-fanout:]) <= fanout * min(n for n, _ in tiers[-fanout:]):
        tiers[-fanout:] = [(sum(n for n, _ in tiers[-fanout:]), sum(c for _, c in tiers[-fanout:]))]
    if len(tiers) > limit:
        tiers[-fanout:] = [(sum(n for n, _ in tiers[-fanout:]), sum(c for _, c in tiers[-fanout:]))]
    merged = tiers[-1][1] if tiers else 1
    return len(live) - merged if merged > 1 else None


class Writer:
    """The store's writer: holds its lock, reads its current generation, publishes the next.

    `with Writer(files) as w:` takes the lock (StoreLockedError when another process has it), removes what a
    killed writer left and finishes a killed restore; `w.current` is the current generation (None for a new
    store), opened and checked (a damaged store stops here, untouched). With `repair`, every block is read
    first and damaged segments are left out of `w.current` (`w.dropped`): the next publish drops them.
    After each publish `w.current` is the generation just published."""

    def __init__(self, files: StoreFiles, *, repair: bool = False) -> None:
        self.files, self.repair = files, repair
        self.current: Generation | None = None
        #: with `repair`: the damaged segments left out of the current generation
        self.dropped: list[DroppedSegment] = []
        self._lock = None
        self._bytes = 0
        #: with `repair`: the manifest was damaged and rebuilt from the segments (published by the next publish)
        self.rebuilt = False

    def __enter__(self) -> Writer:
        self._lock = writer_lock(self.files)
        self._lock.__enter__()
        try:
            self.files.remove_temporaries()
            self.files.finish_restore()
            if self.files.store.exists() and self.repair:  # every block read; damaged segments left out
                try:
                    self.current, self.dropped = open_healthy(self.files.store, self.files)
                except StoreError as exc:  # the manifest: rebuilt from the segments when none can be restored
                    if not getattr(exc, "reason", "") or getattr(exc, "segment", "") or is_store(self.files.previous):
                        raise
                    self.current, self.dropped = rebuild(self.files.store, self.files, exc.reason)
                    self.rebuilt = True
                    log.warning("the manifest of %s is damaged (%s) and no previous generation can be restored: "
                                "rebuilt from its %d segments (%d rows; nothing embedded again)", self.files.store,
                                exc.reason, len(self.current.segments), len(self.current))
                for d in self.dropped:
                    log.warning("segment %s (%d rows) is damaged (%s): left out; its photos are to be indexed again",
                                d.segment.name, d.segment.rows, d.why)
            elif self.files.store.exists():
                self.current = Generation.open(self.files.store)
                if self.current.manifest is not None:  # what a writer killed before its publish left (orphans)
                    remove_unnamed(self.files, self.current.manifest, self.files.previous)
                else:  # written before segments: every block read before an upgrade
                    self.current.verify()
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
        forbids (False) a full compaction; None decides by the dead share. Returns what was written. A
        publish that fails (a full disk) deletes the files it wrote that no manifest on disk names."""
        try:
            return self._publish(change, compact)
        except BaseException:
            try:
                remove_unnamed(self.files, self.files.store, self.files.previous)
            except Exception:  # noqa: BLE001 - the first error is the one to report; the next writer retries
                pass
            raise

    def _publish(self, change: Change, compact: bool | None) -> Published:
        cur, files = self.current, self.files
        files.segments.mkdir(exist_ok=True)
        self._bytes, created = 0, now_iso()
        meta = replace(change.meta, schema_version=SCHEMA_VERSION, neardup_version=VERSION, updated=created,
                       created=(cur.meta.created if cur is not None else "") or change.meta.created or created)
        appended = len(change.append) if change.append is not None else 0
        if appended and bool(meta.local_features) != (change.append.local is not None):
            raise ValueError("appended rows must carry local features exactly when the store caches them")
        keep = np.ones(len(cur) if cur is not None else 0, bool)
        keep[np.asarray(change.delete, np.int64)] = False
        upgrade = cur is not None and cur.manifest is None  # a store written before segments
        segments: list[Segment] = []
        dead: dict[str, np.ndarray] = {}
        if cur is not None and not upgrade:
            segments = list(cur.segments)
            dead = {k: v.copy() for k, v in cur.manifest.dead.items()}
            for k, s in enumerate(segments):  # the deleted rows, as (segment, row) tombstones
                gone = ~keep & (cur._seg == k)
                if gone.any():
                    dead[s.name] = np.union1d(dead.get(s.name, np.zeros(0, np.int64)), cur._row[gone])
        segments = [s for s in segments if len(dead.get(s.name, ())) < s.rows]  # wholly deleted: dropped
        dead = {s.name: dead[s.name] for s in segments if s.name in dead}
        written_rows = sum(s.rows for s in segments) + appended
        full = upgrade or compact is True or (compact is None and written_rows > 0 and
                                              sum(len(v) for v in dead.values()) / written_rows > DEAD_SHARE)
        new_rows = [segment_columns(change.append)] if appended else []
        written: list[Segment] = []
        if full and cur is not None:  # every live row kept, and the new ones, copied into one segment
            n = int(keep.sum()) + appended
            segments, dead = [], {}
            if n:
                written.append(self._segment(n, meta, created, itertools.chain(pieces(cur, keep), new_rows)))
                segments.append(written[-1])
        elif appended:
            written.append(self._segment(appended, meta, created, iter(new_rows)))
            segments.append(written[-1])
        merged = ""
        j = None if full else merge_start([s.rows - len(dead.get(s.name, ())) for s in segments])
        if j is not None:
            tail = segments[j:]
            with _Pinned(self.files, meta, tail, dead) as gen:
                seg = self._segment(len(gen), meta, created, pieces(gen))
            for s in tail:  # an appended segment merged away was written for nothing: not counted
                if s in written:
                    written.remove(s)
                    self._bytes -= self.files.segment(s.name).stat().st_size
            written.append(seg)
            segments, merged = segments[:j] + [seg], f"merged {len(tail)} segments"
            dead = {k: v for k, v in dead.items() if k not in {s.name for s in tail}}
        live = sum(s.rows for s in segments) - sum(len(v) for v in dead.values())
        man = Manifest(meta=replace(meta, generation=new_name(), count=live, failures=len(change.failures)),
                       segments=segments, dead=dead, failures=sorted(change.failures),
                       parent=cur.id if cur is not None else "")
        man, reindexed = self._index(man, cur, written, change.reindex or upgrade)
        man.segments = [s if s.file_sha256 else self._file_digest(s) for s in man.segments]
        # a repair keeps no generation that names a dropped (damaged) segment: it could never be restored
        rotate = files.store.exists() and not self.dropped and not self.rebuilt
        if self.rebuilt:  # the damaged manifest is kept aside for inspection (never read), as restore does
            files.link_as(files.damaged)
        write_manifest(files.store, man, before_replace=files.keep_previous if rotate else None)
        if self.dropped and files.previous.exists():
            try:
                prev = open_any(files.previous)
                stale = bool(named(prev)[0] & {d.segment.name for d in self.dropped})
            except (StoreError, OSError):
                stale = True  # unreadable: it cannot be restored either
            if stale:
                files.previous.unlink()
        remove_unnamed(files, man, files.previous)
        out = Published(man.meta.generation, live, sum(s.rows for s in written),
                        self._bytes + files.store.stat().st_size,
                        "upgraded" if upgrade else "compacted" if full and cur is not None else merged, reindexed)
        if cur is not None:  # later publishes of this writer build on the one just made
            cur.close()
        self.current, self.dropped, self.rebuilt = Generation.open(files.store), [], False
        return out

    def compact(self) -> Published:
        """Copy every live row of the current generation into one segment (and publish it)."""
        if self.current is None:
            raise StoreError(f"no store at {self.files.store}")
        return self.publish(Change(self.current.meta, failures=self.current.failures), compact=True)

    def _segment(self, n: int, meta: StoreMeta, created: str,
                 pieces: Iterator[dict[str, np.ndarray | list[str]]]) -> Segment:
        path = self.files.segment(new_name())
        flat = meta.flat()
        recorded = json.dumps({k: plain(flat[k]) for k in RECORDED})  # a lost manifest is rebuilt from it
        seg = write_segment(path, n, meta.model.dim, meta.local_features, created, pieces, recorded)
        self._bytes += path.stat().st_size
        return seg

    def _file_digest(self, seg: Segment) -> Segment:
        """`seg` with its whole-file digest: a segment written before segments had one is read whole and every
        block checked first (once: the manifest keeps the digest, and readers check it before HDF5 parses)."""
        with SegmentFile(self.files.segment(seg.name), seg.sha256) as r:
            try:
                r.verify()
            except Damage as exc:
                raise damaged(self.files.store, exc.reason, segment=seg.name) from None
        sha, size, data = file_digest(self.files.segment(seg.name), LARGE)
        return replace(seg, file_sha256=sha, file_bytes=size, file_data=data)

    def _save(self, index, path: Path) -> str:  # noqa: ANN001
        sha = faiss_index.save_index(index, path)
        self._bytes += path.stat().st_size
        return sha

    # -------------------------------------------------------------------------------------------- index
    def _index(self, man: Manifest, cur: Generation | None, written: list[Segment],
               reindex: bool) -> tuple[Manifest, bool]:
        """The new generation's index: nothing for an exact one (its vectors are searched); for an IVF kind, a
        part for each new segment from the trained template (and for any part lost or damaged), or all parts
        anew when the plan changed (the store grew past a boundary, another kind was asked for); for other
        kinds, one whole file."""
        m = man.meta
        plan = index_kinds.plan(m.index.kind, m.count, m.model.dim, m.index.memory or None)
        if m.count == 0 or plan.exact:
            return _exact(man), m.index.factory != "Flat"
        if plan.factory == m.index.factory != "Flat" and not reindex and cur is not None:
            template, good = self._template(cur)
            if template is not None:
                if not faiss_index.mergeable(template):  # HNSW: one whole index, rebuilt
                    return self._whole(man, faiss_index.part(template, *self._live_vectors(man))), False
                # a part is kept when it is intact (digest checked: a damaged one is written anew)
                man.segments = [s if s.index in good and s not in written else self._part(template, s, man)
                                for s in man.segments]
                return man, False
        return self._retrained(man), True

    def _template(self, cur: Generation):  # noqa: ANN202 - (faiss.Index or None, intact part names)
        """An empty copy of the current index's training, and the parts that match their digests."""
        m = cur.meta
        if m.index.file:
            data = cur._index_bytes(m.index.file, m.index.sha256)
            return (faiss_index.template_of(faiss_index.index_from_bytes(data)) if data is not None else None), set()
        template, good = None, set()
        for s in cur.segments:
            data = cur._index_bytes(s.index, s.index_sha256) if s.index else None
            if data is not None:
                good.add(s.index)
                if template is None:
                    template = faiss_index.template_of(faiss_index.index_from_bytes(data))
        return template, good

    def _live_vectors(self, man: Manifest, segments: list[Segment] | None = None) -> tuple[np.ndarray, np.ndarray]:
        with _Pinned(self.files, man.meta, man.segments if segments is None else segments, man.dead) as gen:
            return gen.vectors(), gen.catalog.ids

    def _part(self, template, seg: Segment, man: Manifest) -> Segment:  # noqa: ANN001
        name = new_name()
        xb, ids = self._live_vectors(man, [seg])
        sha = self._save(faiss_index.part(template, xb, ids), self.files.segment_index(name))
        return replace(seg, index=name, index_sha256=sha)

    def _whole(self, man: Manifest, index) -> Manifest:  # noqa: ANN001
        name = self.files.new_index_name()
        sha = self._save(index, self.files.index(name))
        man.meta = replace(man.meta, index=replace(man.meta.index, file=name, sha256=sha))
        man.segments = [replace(s, index="", index_sha256="") for s in man.segments]
        return man

    def _retrained(self, man: Manifest) -> Manifest:
        """Train the planned index on every live vector, tune it to the target recall, and write its parts."""
        m = man.meta
        xb, ids = self._live_vectors(man)
        factory = index_kinds.plan(m.index.kind, len(xb), m.model.dim, m.index.memory or None).factory
        try:
            template = index_kinds.trained(xb, factory)
        except (InputError, RuntimeError) as exc:  # too few vectors to train it yet: exact for now
            log.warning("index %s cannot be trained on %d vectors (%s); the store keeps an exact index until an "
                        "update has enough", factory, len(xb), " ".join(str(exc).split())[:200])
            return _exact(man)
        if faiss_index.mergeable(template):
            man.segments = [self._part(template, s, man) for s in man.segments]
            man.meta = replace(m, index=replace(m.index, factory=factory, params="", file="", sha256=""))
            with _Pinned(self.files, man.meta, man.segments, man.dead) as gen:
                index = gen.index  # the parts merged, as a reader will see them
        else:
            index = faiss_index.part(template, xb, ids)
        got = index_kinds.tune(index, xb, ids, target=m.index.target)
        log.info("index %s: recall@%d %.3f at %s, measured on %d store vectors", factory, index_kinds.RECALL_K,
                 got.recall, got.params or "its defaults", got.queries)
        if not faiss_index.mergeable(template):
            man = self._whole(man, index)
        man.meta = replace(man.meta, index=replace(man.meta.index, factory=factory, params=got.params,
                                                   recall=got.recall, recall_queries=got.queries))
        return man


def pieces(gen: Generation, keep: np.ndarray | None = None, step: int = 8192) -> Iterator[dict[str, object]]:
    """The rows of `gen` marked in `keep` (default: all), in order, as segment columns in pieces of `step`
    rows at most: a compaction or an upgrade copies a store of any size in bounded memory."""
    cat, local = gen.catalog, bool(gen.meta.local_features)
    at = 0
    with gen._reading("copy"):
        for r, live in zip(gen._readers, gen._live):
            gen_row = np.full(r.rows, -1, np.int64)
            gen_row[live] = np.arange(at, at + int(live.sum()))
            at += int(live.sum())
            for s0 in range(0, r.rows, step):
                g = gen_row[s0:s0 + step]
                sel = g >= 0
                sel[sel] = keep[g[sel]] if keep is not None else True
                if not sel.any():
                    continue
                rows = g[sel]
                piece: dict[str, object] = {
                    "ids": cat.ids[rows], "paths": [cat.paths[i] for i in rows.tolist()],
                    "sizes": cat.sizes[rows], "mtimes_ns": cat.mtimes_ns[rows],
                    "sha256": np.array([cat.sha256[i] for i in rows.tolist()], "S64"),
                    "widths": cat.widths[rows], "heights": cat.heights[rows],
                    "embeddings": r.span("embeddings", s0, s0 + len(g))[sel]}
                if local:
                    for name in ("local/count", "local/xy", "local/desc"):
                        piece[name] = r.span(name, s0, s0 + len(g))[sel]
                yield piece


def _exact(man: Manifest) -> Manifest:
    """`man` with an exact index: its vectors, searched in memory (no index file)."""
    man.meta = replace(man.meta, index=replace(man.meta.index, factory="Flat", params="", recall=1.0,
                                               recall_queries=0, file="", sha256=""))
    man.segments = [replace(s, index="", index_sha256="") for s in man.segments]
    return man


class _Pinned(Generation):
    """Segments of a generation being written, opened as a generation (to copy or index their rows)."""

    def __init__(self, files: StoreFiles, meta: StoreMeta, segments: list[Segment],
                 dead: dict[str, np.ndarray]) -> None:
        names = {s.name for s in segments}
        m = Manifest(meta=meta, segments=list(segments), dead={k: v for k, v in dead.items() if k in names})
        m.meta = replace(meta, count=m.count)
        readers = []
        try:
            for s in m.segments:
                readers.append(SegmentFile(files.segment(s.name), s.sha256, s))
        except Damage:
            for r in readers:
                r.close()
            raise
        super().__init__(files.store, files, m, readers)
