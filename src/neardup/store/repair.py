"""Store, repair: a store's current generation without its damaged segments, for `neardup update --repair`.

Generations share segments, so a damaged segment cannot be restored from the previous generation; its photos
are still on disk, though. The repair reads every block of every segment, leaves out those that fail their
digests (keeping their paths when those still read true, so the job can check that every one of their photos
is among the files it will index again), and the writer then publishes a generation without them.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .files import StoreFiles
from .generation import Generation, damaged
from .manifest import LegacyFile, open_any
from .meta import Manifest, Segment
from .segment import Damage, SegmentFile


def open_healthy(path: Path, files: StoreFiles) -> tuple[Generation, list[tuple[Segment, str, list[str] | None]]]:
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
    readers, kept, dropped = [], [], []
    for seg in source.segments:
        try:
            r = SegmentFile(files.segment(seg.name), seg.sha256)
        except Damage as exc:
            dropped.append((seg, exc.reason, None))
            continue
        try:
            r.verify()
        except Damage as exc:
            try:  # the paths column has digests of its own: where it reads true, the repair can check them
                paths = r.paths()
            except Damage:
                paths = None
            r.close()
            dropped.append((seg, exc.reason, paths))
            continue
        readers.append(r)
        kept.append(seg)
    man = Manifest(meta=source.meta, segments=kept, dead={s.name: source.dead[s.name] for s in kept
                                                           if s.name in source.dead},
                   failures=source.failures, parent=source.parent)
    man.meta = replace(source.meta, count=man.count)
    return Generation(path, files, man, readers), dropped


def segment_contents(files: StoreFiles, seg: Segment) -> list[tuple[int, str]] | None:
    """(id, content hash) of each row of damaged segment `seg`, when those two columns still read true (each
    block checked): a repair whose segment's paths are damaged recognises its photos by their content. None when
    they cannot be read either."""
    try:
        with SegmentFile(files.segment(seg.name), seg.sha256) as r:
            return list(zip(r.column("ids").astype(int).tolist(), r.sha256()))
    except Damage:
        return None
