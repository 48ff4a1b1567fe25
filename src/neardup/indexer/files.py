"""Indexing stage 5, files: the names of every file a store owns beside it, and their clean-up.

`catalog.h5` owns `catalog.h5.lock` (the writer lock), `catalog.h5.work/` (checkpoints of a running job),
`catalog.h5.<12 hex>.faiss` (index generations; the store names the live one), `catalog.h5.prev` (the
previous published generation, for recovery), `catalog.h5.damaged` (a damaged store set aside by
`neardup restore`), `catalog.h5.restoring` (a restore's complete new store, before it is renamed into place),
`catalog.h5.int8.onnx` (an int8 store's calibrated model) and temporaries
`.catalog.h5[.prev|.damaged|.restoring|.int8.onnx|.<12 hex>.faiss].<8 random>.neardup-tmp` of interrupted
writes. The patterns match this store's files only, never a sibling store's (`catalog.h5.old`, `catalog.h5x`).
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..fileio import TMP_SUFFIX, fsync_dir


@dataclass(frozen=True)
class StoreFiles:
    """The files of the store at `store` (give it resolved when writing: see `resolved`)."""

    store: Path

    @classmethod
    def resolved(cls, store: str | os.PathLike[str]) -> StoreFiles:
        """The real place of a store: through a symlinked folder, relative paths and the atomic replace
        must use the folder the file really lives in."""
        return cls(Path(store).expanduser().resolve())

    @property
    def lock(self) -> Path:
        """The writer lock file (an OS lock on it; the file itself is harmless and stays)."""
        return self.store.with_name(self.store.name + ".lock")

    @property
    def work(self) -> Path:
        """The checkpoint folder of a running index job."""
        return self.store.with_name(self.store.name + ".work")

    @property
    def previous(self) -> Path:
        """The previous published generation of the store (rotated by the writer, for recovery)."""
        return self.store.with_name(self.store.name + ".prev")

    @property
    def damaged(self) -> Path:
        """Where `neardup restore` sets a damaged store aside (kept for inspection, never read)."""
        return self.store.with_name(self.store.name + ".damaged")

    @property
    def restoring(self) -> Path:
        """Where `neardup restore` writes the generation it brings back before renaming it into place."""
        return self.store.with_name(self.store.name + ".restoring")

    @property
    def quantized(self) -> Path:
        """The int8 model of a store indexed with --precision int8 (calibrated on its images; kept for queries)."""
        return self.store.with_name(self.store.name + ".int8.onnx")

    def index(self, index_file: str) -> Path:
        """Where the index file named in the store's attributes lies (beside the store's real file)."""
        return self.store.resolve().parent / index_file

    def new_index_name(self) -> str:
        """A fresh index generation's file name (published before the store that names it)."""
        return f"{self.store.name}.{uuid.uuid4().hex[:12]}.faiss"

    def _index_pattern(self) -> re.Pattern[str]:
        return re.compile(rf"{re.escape(self.store.name)}\.[0-9a-f]{{12}}\.faiss")

    def remove_index_files(self, keep: str | set[str]) -> None:
        """Delete this store's index generations other than `keep` (orphans of a run killed while publishing)."""
        keep = {keep} if isinstance(keep, str) else keep
        pattern = self._index_pattern()
        for stale in self.store.parent.iterdir():
            if pattern.fullmatch(stale.name) and stale.name not in keep:
                try:
                    stale.unlink()
                except OSError:
                    pass

    def remove_temporaries(self) -> None:
        """Delete temporary files a killed writer left (call only while holding the writer lock)."""
        # mkstemp's random part is 8 characters of [a-z0-9_]: never match another file's temporaries
        name = re.escape(self.store.name)
        kinds = r"\.prev|\.damaged|\.restoring|\.int8\.onnx|\.[0-9a-f]{12}\.faiss"
        pattern = re.compile(rf"\.{name}({kinds})?\.[a-z0-9_]{{8}}{re.escape(TMP_SUFFIX)}")
        for tmp in self.store.parent.iterdir():
            if pattern.fullmatch(tmp.name):
                try:
                    tmp.unlink()
                except OSError:
                    pass

    def keep_previous(self) -> None:
        """Make the current store file the previous generation, atomically (call only under the writer lock,
        and only for a store that was read whole without error: a damaged store never replaces a good one)."""
        self.link_as(self.previous)

    def link_as(self, target: Path) -> None:
        """Give the current store file the name `target` too, atomically (a hard link costs nothing; a copy
        where the filesystem has none). The writer then replaces the store's own name."""
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

    def remove_work(self) -> None:
        """Delete the checkpoint folder (its work is in the published store, or is being discarded)."""
        shutil.rmtree(self.work, ignore_errors=True)
