"""Store, files: the names of every file a store owns, and their clean-up.

`catalog.h5` is the store's manifest: a small HDF5 file naming the segments of the current generation, its
tombstones and its meta. It owns:
- `catalog.h5.segments/<12 hex>.h5`: immutable segments (rows, vectors, local features), and
  `<12 hex>.faiss`: a segment's part of an approximate index (an exact store keeps none: its index is the
  vectors);
- `catalog.h5.prev`: the previous published manifest (for `neardup restore`); `catalog.h5.damaged`: a damaged
  manifest set aside by restore; `catalog.h5.restoring`: a restore's new manifest before it is renamed;
- `catalog.h5.settings.json`: thresholds applied to the store (store/settings.py), never collected;
- `catalog.h5.lock` (the writer lock), `catalog.h5.work/` (checkpoints of a running job),
  `catalog.h5.int8.onnx` (an int8 store's calibrated model), `catalog.h5.<12 hex>.faiss` (a whole-index
  generation: a store written before segments, or an index kind FAISS cannot merge, such as HNSW);
- `catalog.h5.decisions`: the decisions people made about pairs (store/decisions.py), an append-only journal
  that belongs to no generation: no writer, restore or repair touches it, and nothing collects it;
- temporaries `.NAME.<8 random>.neardup-tmp` of interrupted writes, beside the store or in its segments folder.
The patterns match this store's files only, never a sibling store's (`catalog.h5.old`, `catalog.h5x`).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..fileio import TMP_SUFFIX, fsync_dir

log = logging.getLogger(__name__)
_HEX12 = re.compile(r"[0-9a-f]{12}")


def new_name() -> str:
    """A fresh 12-hex name (a segment's, an index generation's)."""
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class StoreFiles:
    """The files of the store at `store` (give it resolved when writing: see `resolved`)."""

    store: Path

    @classmethod
    def resolved(cls, store: str | os.PathLike[str]) -> StoreFiles:
        """The real place of a store: through a symlinked folder, relative paths and the atomic replace
        must use the folder the file really lives in."""
        return cls(Path(store).expanduser().resolve())

    def _beside(self, suffix: str) -> Path:
        return self.store.with_name(self.store.name + suffix)

    @classmethod
    def of_manifest(cls, manifest: str | os.PathLike[str]) -> StoreFiles:
        """The files of the store a manifest belongs to: its own, or the store's whose previous, damaged or
        restoring manifest it is (all of them name segments in the store's folder)."""
        path = Path(manifest).expanduser().resolve()
        for suffix in (".prev", ".damaged", ".restoring"):
            if path.name.endswith(suffix) and len(path.name) > len(suffix):
                return cls(path.with_name(path.name[:-len(suffix)]))
        return cls(path)

    @property
    def lock(self) -> Path:
        """The writer lock file (an OS lock on it; the file itself is harmless and stays)."""
        return self._beside(".lock")

    @property
    def work(self) -> Path:
        """The checkpoint folder of a running index job."""
        return self._beside(".work")

    @property
    def previous(self) -> Path:
        """The previous published manifest of the store (rotated by the writer, for recovery)."""
        return self._beside(".prev")

    @property
    def damaged(self) -> Path:
        """Where `neardup restore` sets a damaged manifest aside (kept for inspection, never read)."""
        return self._beside(".damaged")

    @property
    def restoring(self) -> Path:
        """Where `neardup restore` writes the manifest it brings back before renaming it into place."""
        return self._beside(".restoring")

    @property
    def settings(self) -> Path:
        """Thresholds applied to the store (store/settings.py): the user's choice, kept until the store goes."""
        return self._beside(".settings.json")

    @property
    def quantized(self) -> Path:
        """The int8 model of a store indexed with --precision int8 (calibrated on its images; kept for queries)."""
        return self._beside(".int8.onnx")

    @property
    def decisions(self) -> Path:
        """The journal of decisions about pairs (store/decisions.py): kept by every writer, restore and repair."""
        return self._beside(".decisions")

    @property
    def segments(self) -> Path:
        """The folder of the store's immutable segments and their index files."""
        return self._beside(".segments")

    def renamed_advice(self, path: str | os.PathLike[str], segment: str) -> str:
        """What to say when the segments folder is missing: where the store's segments are, if a folder
        beside holds `segment` (the manifest was renamed, or moved, without its folder)."""
        where = [d for d in self.segments.parent.glob("*.segments") if (d / f"{segment}.h5").is_file()]
        if where:
            return (f"the segments folder of {path} was not found at {self.segments}, but {where[0]} holds its "
                    f"segments: was the store renamed? rename {where[0].name} to {self.segments.name} too")
        return (f"the segments folder of {path} was not found at {self.segments}: was the store renamed or moved? "
                f"move its `<old name>.segments` folder beside it as {self.segments.name} too")

    def segment(self, name: str) -> Path:
        """Segment `name`'s HDF5 file."""
        return self.store.resolve().parent / self.segments.name / f"{name}.h5"

    def segment_index(self, name: str) -> Path:
        """A segment's part of an approximate index, by its own name (a retrained index gets new parts)."""
        return self.store.resolve().parent / self.segments.name / f"{name}.faiss"

    def index(self, index_file: str) -> Path:
        """Where a whole-index file (or the int8 model) named in the manifest lies: beside the store's real
        file, under the name recorded or, for a store renamed with its files, under the store's new name."""
        path = self.store.resolve().parent / index_file
        tail = _tail(index_file)
        if tail and not path.exists() and (path.parent / (self.store.name + tail)).exists():
            return path.parent / (self.store.name + tail)
        return path

    def new_index_name(self) -> str:
        """A fresh whole-index file name (published before the manifest that names it)."""
        return f"{self.store.name}.{new_name()}.faiss"

    def unnamed(self, names: Iterable[str], index_files: Iterable[str]) -> list[Path]:
        """This store's segments and index parts (by `names`) and whole-index files that no kept manifest
        names: what a killed publish or an earlier generation left."""
        keep_segments, keep_index, out = set(names), set(index_files), []
        if self.segments.is_dir():
            for f in self.segments.iterdir():
                stem, dot, ext = f.name.partition(".")
                if _HEX12.fullmatch(stem) and dot and ext in ("h5", "faiss") and stem not in keep_segments:
                    out.append(f)
        pattern = re.compile(rf"{re.escape(self.store.name)}\.[0-9a-f]{{12}}\.faiss")
        keep_tails = {_tail(k) for k in keep_index}  # a store renamed with its files keeps them
        for f in self.store.parent.iterdir():
            if pattern.fullmatch(f.name) and f.name not in keep_index and _tail(f.name) not in keep_tails:
                out.append(f)
        return sorted(out)

    def remove_unnamed(self, names: Iterable[str], index_files: Iterable[str]) -> None:
        """Delete what `unnamed` lists (call only under the writer lock)."""
        for f in self.unnamed(names, index_files):
            _unlink(f)

    def remove_temporaries(self) -> None:
        """Delete temporary files a killed writer left (call only while holding the writer lock)."""
        # mkstemp's random part is 8 characters of [a-z0-9_]: never match another file's temporaries
        name = re.escape(self.store.name)
        kinds = r"\.prev|\.damaged|\.decisions|\.restoring|\.int8\.onnx|\.settings\.json|\.[0-9a-f]{12}\.faiss"
        beside = re.compile(rf"\.{name}({kinds})?\.[a-z0-9_]{{8}}{re.escape(TMP_SUFFIX)}")
        inside = re.compile(rf"\.[0-9a-f]{{12}}\.(h5|faiss)\.[a-z0-9_]{{8}}{re.escape(TMP_SUFFIX)}")
        for folder, pattern in ((self.store.parent, beside), (self.segments, inside)):
            if folder.is_dir():
                for tmp in folder.iterdir():
                    if pattern.fullmatch(tmp.name):
                        _unlink(tmp)

    def keep_previous(self) -> None:
        """Make the current manifest the previous one, atomically (call only under the writer lock, and only
        for a store that was read without error: a damaged manifest never replaces a good one)."""
        self.link_as(self.previous)

    def link_as(self, target: Path) -> None:
        """Give the current manifest the name `target` too, atomically (a hard link costs nothing; a copy
        where the filesystem has none). The writer then replaces the store's own name."""
        if target.exists() and os.path.samefile(self.store, target):
            return  # already (a killed writer linked it): rename(2) of one file onto itself would do nothing
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
        try:
            try:
                os.link(self.store, tmp)
            except OSError:
                shutil.copyfile(self.store, tmp)
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.store.parent)

    def finish_restore(self) -> bool:
        """Complete or drop a restore that was killed (call under the writer lock). It had kept the current
        manifest as the previous one only after linking the restored one as `<store>.restoring`: if both names
        already hold one file, that step happened and the rename is finished now; otherwise it is dropped.
        Returns True when a restore was finished."""
        if not self.restoring.exists():
            return False
        if self.store.exists() and self.previous.exists() and os.path.samefile(self.store, self.previous):
            log.warning("finishing a restore of %s that was interrupted", self.store)
            os.replace(self.restoring, self.store)
            fsync_dir(self.store.parent)
            return True
        self.restoring.unlink()
        return False

    def remove_store(self) -> None:
        """Delete the store and every file it owns (the demo starting again; never a user's store)."""
        for p in (self.store, self.previous, self.damaged, self.restoring, self.quantized, self.settings, self.lock,
                  self.decisions):
            _unlink(p)
        shutil.rmtree(self.segments, ignore_errors=True)
        self.remove_unnamed((), ())
        self.remove_work()

    def remove_work(self) -> None:
        """Delete the checkpoint folder (its work is in the published store, or is being discarded)."""
        shutil.rmtree(self.work, ignore_errors=True)


def _tail(file_name: str) -> str:
    """The part of a whole-index or int8-model file name after its store's name (".<12 hex>.faiss",
    ".int8.onnx"); "" for another name."""
    m = re.fullmatch(r".+?(\.[0-9a-f]{12}\.faiss|\.int8\.onnx)", file_name)
    return m.group(1) if m else ""


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
