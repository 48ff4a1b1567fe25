"""Store, repair: a store's current generation without its damaged segments, for `neardup update --repair`.

Generations share segments, so a damaged segment cannot be restored from the previous generation; its photos
are still on disk, though. The repair reads every block of every segment, leaves out those that fail their
digests (keeping their paths when those still read true, so the job can check that every one of their photos
is among the files it will index again), and the writer then publishes a generation without them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .damage import damaged
from .files import StoreFiles
from .generation import Generation
from .h5io import file_digest
from .manifest import LegacyFile, _meta, open_any
from .meta import Manifest, Segment
from .segment import LARGE, Damage, SegmentFile


@dataclass(frozen=True)
class DroppedSegment:
    """A damaged segment a repair leaves out of the generation."""

    segment: Segment
    why: str  #: the damage found
    paths: list[str] | None  #: its photos' paths where they still read true (None: unknown)


def open_healthy(path: Path, files: StoreFiles) -> tuple[Generation, list[DroppedSegment]]:
    """The store's current generation without its damaged segments (every block of every segment read and
    checked: a full check), and the segments left out: why, and their paths when those still read true.
    Raises StoreError when the manifest itself is damaged (a restore helps there), or a store written
    before segments is."""
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
    readers, kept = [], []
    dropped: list[DroppedSegment] = []
    for seg in source.segments:
        try:
            r = SegmentFile(files.segment(seg.name), seg.sha256, seg)
        except Damage as exc:
            dropped.append(DroppedSegment(seg, exc.reason, _paths_of_damaged(files, seg) if seg.file_sha256 else None))
            continue
        try:
            r.verify()
        except Damage as exc:
            try:  # the paths column has digests of its own: where it reads true, the repair can check them
                paths = r.paths()
            except Damage:
                paths = None
            r.close()
            dropped.append(DroppedSegment(seg, exc.reason, paths))
            continue
        readers.append(r)
        kept.append(seg)
    man = Manifest(meta=source.meta, segments=kept, dead={s.name: source.dead[s.name] for s in kept
                                                           if s.name in source.dead},
                   failures=source.failures, parent=source.parent)
    man.meta = replace(source.meta, count=man.count)
    return Generation(path, files, man, readers), dropped


def _paths_of_damaged(files: StoreFiles, seg: Segment) -> list[str] | None:
    """The paths of a segment whose file does not match its digest, when its root and its paths column still
    read true (their own digests: damage elsewhere in the file leaves them usable); None otherwise."""
    try:
        with SegmentFile(files.segment(seg.name), seg.sha256) as r:
            return r.paths()
    except Damage:
        return None


def rebuild(path: Path, files: StoreFiles, why: str) -> tuple[Generation, list[DroppedSegment]]:
    """A generation rebuilt from the segments in the store's folder when its manifest is damaged (`why`) and no
    previous generation can be restored: every block of every segment checked, the newest segment's meta, and
    of rows sharing an id or a path, the newest (the tombstones were in the manifest: the update that follows
    removes rows whose photos are gone). Its index is built anew. Raises StoreError (damaged) when there are
    no segments, or they were written before segments recorded the meta."""
    found = []
    dropped: list[DroppedSegment] = []
    names = sorted(f.stem for f in files.segments.glob("*.h5") if re.fullmatch(r"[0-9a-f]{12}", f.stem)) \
        if files.segments.is_dir() else []
    try:
        for name in names:
            try:
                r = SegmentFile(files.segment(name), None)
            except Damage as exc:
                dropped.append(DroppedSegment(Segment(name, 0, ""), exc.reason, None))
                continue
            try:
                r.verify()
                meta = json.loads(str(r.attrs.get("meta", ""))) if r.attrs.get("meta") else None
            except (Damage, ValueError) as exc:
                reason = getattr(exc, "reason", str(exc))
                dropped.append(DroppedSegment(Segment(name, r.rows, ""), reason, _readable_paths(r)))
                r.close()
                continue
            if meta is None:
                r.close()
                raise damaged(path, f"{why}; segment {name} was written before segments recorded the store's "
                                    f"meta, so the manifest cannot be rebuilt from them")
            found.append((str(r.attrs.get("created", "")), name, r, meta))
        if not found:
            raise damaged(path, f"{why}; no intact segment to rebuild it from")
        found.sort(key=lambda x: (x[0], x[1]))
        seen_ids: set[int] = set()
        seen_paths: set[str] = set()
        kept: list[tuple[Segment, SegmentFile, np.ndarray]] = []
        for _, name, r, _ in reversed(found):  # the newest first: it wins a shared id or path
            ids, paths = r.column("ids").tolist(), r.paths()
            live = np.array([i not in seen_ids and p not in seen_paths for i, p in zip(ids, paths)], bool)
            seen_ids.update(ids)
            seen_paths.update(paths)
            if not live.any():
                r.close()
                continue
            sha, size, data = file_digest(files.segment(name), LARGE)
            kept.append((Segment(name, r.rows, r.root, file_sha256=sha, file_bytes=size, file_data=data), r, live))
        kept.reverse()
    except BaseException:
        for _, _, r, _ in found:
            r.close()
        raise
    newest = found[-1][3]
    dims = {r.dim for _, r, _ in kept}
    if dims != {int(newest.get("dim", -1))}:
        for _, r, _ in kept:
            r.close()
        raise damaged(path, f"{why}; its segments hold vectors of dimensions {sorted(dims)}: they cannot be one store")
    man = Manifest(meta=_meta(newest, 0, 0), segments=[s for s, _, _ in kept],
                   dead={s.name: np.flatnonzero(~live).astype(np.int64) for s, _, live in kept if not live.all()})
    top = max(max(seen_ids) + 1, int(newest.get("next_id", 0)))
    man.meta = replace(man.meta, count=man.count, next_id=top, index=replace(man.meta.index, file="", sha256=""),
                       generation=found[-1][1])
    return Generation(path, files, man, [r for _, r, _ in kept]), dropped


def _readable_paths(r: SegmentFile) -> list[str] | None:
    try:
        return r.paths()
    except Damage:
        return None


def segment_contents(files: StoreFiles, seg: Segment) -> list[tuple[int, str]] | None:
    """(id, content hash) of each row of damaged segment `seg`, when those two columns still read true (each
    block checked): a repair whose segment's paths are damaged recognises its photos by their content. None when
    they cannot be read either."""
    try:
        with SegmentFile(files.segment(seg.name), seg.sha256) as r:
            return list(zip(r.column("ids").astype(int).tolist(), r.sha256()))
    except Damage:
        return None
