"""Store, restore: make the previous generation current again, never losing either (after a kill at any point).

The manifest it replaces becomes the previous one, so a restore can be undone the same way. Restoring only
renames manifests: generations share their segments, so it helps when a manifest is damaged or an update
is to be undone; a damaged segment is repaired from the photos (`neardup update DIR --repair`).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..errors import StoreError
from ..fileio import TMP_SUFFIX, fsync_dir
from .files import StoreFiles, new_name
from .generation import Generation
from .lock import writer_lock
from .manifest import remove_unnamed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Restored:
    """What `restore_previous` did."""

    store: str
    count: int  #: images in the restored generation
    updated: str  #: when the restored generation was written
    set_aside: str | None  #: where a damaged manifest was moved, if there was one
    swapped: bool  #: the replaced generation was readable and is now the previous one (restore is undoable)


def restore_previous(files: StoreFiles) -> Restored:
    """Make the previous published generation current again, under the writer lock.

    The previous generation is checked whole (every block of every segment) first. A readable current
    generation becomes the previous one (so a restore can be undone the same way); a damaged manifest is moved
    to `<store>.damaged`. Raises StoreError when there is no previous generation or it is damaged too.
    """
    store = files.store
    if not store.exists() and not files.previous.exists():  # a mistyped path: no lock file left behind
        raise StoreError(f"no store at {store}")
    with writer_lock(files):
        files.remove_temporaries()
        if files.finish_restore():  # the restore asked for again was killed after its point of no return
            with Generation.open(store) as gen:
                return Restored(str(store), len(gen), gen.meta.updated, None, True)
        if not files.previous.is_file():
            raise StoreError(f"no previous generation of {store} is kept ({files.previous} does not exist); "
                             f"rebuild it with `neardup index DIR --store {store}`")
        try:
            with Generation.open(files.previous, hint=False, files=files) as prev:
                checked = prev.verify()
                count, updated = len(prev), prev.meta.updated
        except StoreError as exc:
            raise StoreError(f"the previous generation {files.previous} is damaged too "
                             f"({getattr(exc, 'reason', exc)}); move {store.name} and {files.previous.name} "
                             f"away and rebuild the store with `neardup index DIR --store {store}`") from None
        swapped, set_aside = False, None
        if store.exists():
            try:
                with Generation.open(store, hint=False) as gen:
                    gen.verify(skip=checked)  # the segments both name were read once, above
                swapped = True
            except StoreError:
                set_aside = str(files.damaged)
        # The restored manifest is linked under its own name first, so a kill at any point leaves a readable
        # store name and both generations on disk (see StoreFiles.finish_restore); the store's name is never missing.
        tmp = files.restoring.with_name(f".{files.restoring.name}.{new_name()[:8]}{TMP_SUFFIX}")
        os.link(files.previous, tmp)
        os.replace(tmp, files.restoring)
        if swapped:
            files.keep_previous()  # restore can be undone the same way
        elif store.exists():
            files.link_as(files.damaged)  # kept for inspection, never read
        os.replace(files.restoring, store)
        fsync_dir(store.parent)
        remove_unnamed(files, store, files.previous)
    return Restored(str(store), count, updated, set_aside, swapped)
