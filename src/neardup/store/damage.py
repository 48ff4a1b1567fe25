"""Store, damage: the one error a damaged store is reported with, and the advice that gets a usable store back."""
from __future__ import annotations

import os

from ..errors import StoreError
from .files import StoreFiles
from .manifest import is_store


def recovery_hint(path: str | os.PathLike[str]) -> str:
    """How to get a usable store back when the one at `path` cannot be read."""
    files = StoreFiles.resolved(path)  # beside the real file, also through a symlink
    if files.previous.is_file() and is_store(files.previous):
        return (f"the previous generation is kept as {files.previous}: restore it with "
                f"`neardup restore --store {path}`, then `neardup update` to add what changed since")
    if files.previous.is_file():
        return (f"its previous generation {files.previous} is damaged too; move both away and rebuild the store "
                f"with `neardup index DIR --store {path}`")
    return f"no previous generation is kept; move {path} away and rebuild it with `neardup index DIR --store {path}`"


def damaged(path: str | os.PathLike[str], reason: str, hint: bool = True, segment: str = "") -> StoreError:
    """The StoreError of a damaged store at `path` (`reason` kept on it for callers with their own advice).
    Damage in a segment is repaired from the photos (generations share segments: a restore cannot help);
    damage in the manifest by restoring the previous one."""
    repair = (f"`neardup update DIR --store {path} --repair` drops the damaged segments and indexes their photos "
              f"again")
    files = StoreFiles.of_manifest(path)
    if segment and not files.segments.is_dir():  # not damage: the manifest was renamed without its folder
        err = StoreError(files.renamed_advice(path, segment))
        err.reason, err.segment = f"segments folder not found at {files.segments}", segment
        return err
    if segment and not files.segment(segment).exists():  # a manifest from elsewhere, or segments deleted
        advice = f"segment {segment} is missing: if the manifest was replaced, {recovery_hint(path)}; else {repair}"
    else:
        advice = f"the photos are still on disk: {repair}" if segment else recovery_hint(path)
    err = StoreError(f"{path} is damaged or incomplete ({reason})" + (f"; {advice}" if hint else ""))
    err.reason, err.segment = reason, segment
    return err
