"""Index job, scan: the image files under the given folders, a stat each, named relative to the store."""
from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..embed.discover import walk_images


class FileRecord(NamedTuple):
    """One image file found on disk (a tuple: a scan makes one for each of a catalogue's files)."""

    rel: str  #: path relative to the store's folder, with forward slashes (as the store records it)
    abs: str  #: absolute path, to read it
    size: int
    mtime_ns: int


@dataclass
class Scan:
    """What a scan found: the files, the folders it could not list, and files it had to skip."""

    base: Path  #: the store's folder; `rel` paths are relative to it
    files: list[FileRecord] = field(default_factory=list)
    #: folders (relative, ending in "/") that could not be listed: their stored images are kept as they were
    blind: tuple[str, ...] = ()
    failures: list[tuple[str, str]] = field(default_factory=list)  #: (path, reason) rows

    def is_blind(self, rel: str) -> bool:
        """True when `rel` lies under a folder that could not be listed this time."""
        return rel.startswith(self.blind)

    def gone(self, rel: str) -> bool:
        """True only when the stored file `rel` is really absent (not when a folder on the way is unreadable)."""
        try:
            (self.base / rel).stat()
        except (FileNotFoundError, NotADirectoryError):
            return True
        except OSError:
            return False
        return False


def scan(roots: Sequence[str | os.PathLike[str]], base: Path) -> Scan:
    """Image files under `roots` (see discover) with size and mtime; non-regular files and names that are not
    UTF-8 are listed as failures, folders that cannot be listed as `blind`. (The size limit applies when a
    file is read: a stored file that did not change is never read, so a lower limit never drops it.)"""
    out = Scan(base=base)
    unreadable: list[tuple[str, str]] = []
    found = walk_images(roots, unreadable=unreadable)
    # folder -> (its path relative to the store's folder, ending in "/", and whether it is ASCII): one relpath
    # a folder
    prefixes: dict[str, tuple[str, bool]] = {}
    files, failures = out.files, out.failures
    record = FileRecord._make  # tuple.__new__: a NamedTuple's own __new__ is a Python call a file
    regular = stat.S_ISREG
    devs: list[int] = []  # each file's (device, inode): two names of one file are one photo (aliases)
    inodes: list[int] = []
    # the loop of a quiet night: a stat a file (~3 µs here) is all an unchanged file costs, so nothing else
    # a file may cost much more
    for p, (folder, name, entry) in found:
        prefix, ascii_folder = prefixes.get(folder) or (None, False)
        if prefix is None:
            prefix = Path(os.path.relpath(folder, base)).as_posix() + "/"
            prefix = "" if prefix == "./" else prefix
            prefixes[folder] = (prefix, ascii_folder := prefix.isascii())
        rel = prefix + name
        if not (ascii_folder and name.isascii()):  # a name that is not UTF-8 holds surrogates: no row for it
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                failures.append((os.fsencode(p).decode("utf-8", "backslashreplace"), "file name is not valid UTF-8"))
                continue
        st: os.stat_result | OSError
        try:  # an entry's stat follows a symlink, as os.stat does
            st = entry.stat() if entry is not None else os.stat(p)
        except OSError as exc:
            st = exc
        if isinstance(st, OSError):
            failures.append((rel, f"cannot stat: {st.strerror or st}"))
        elif not regular(st.st_mode):  # a FIFO or device named *.jpg would block or read forever
            failures.append((rel, "not a regular file (a FIFO, device or socket)"))
        else:
            files.append(record((rel, p, st.st_size, st.st_mtime_ns)))
            devs.append(st.st_dev)
            inodes.append(st.st_ino)
    blind = []
    for folder, why in unreadable:
        rel = Path(os.path.relpath(os.path.abspath(folder), base)).as_posix()
        out.failures.append((rel + "/", f"cannot list folder: {why}; its stored images are kept as they were"))
        blind.append(rel + "/")
    out.blind = tuple(blind)
    drop = aliases(files, devs, inodes)
    if drop:
        out.files = [f for k, f in enumerate(files) if k not in drop]
        failures.extend((files[k].rel, alias_reason(files[kept].rel)) for k, kept in sorted(drop.items()))
    return out


def aliases(files: list[FileRecord], devs: list[int], inodes: list[int]) -> dict[int, int]:
    """Files that are other names of one file (a symlink to it, a hard link, its folder reached again through a
    symlink): index -> the index of the name kept. A file is indexed once, else `duplicates` would call one name
    of it removable beside the other (deleting a link's target deletes the link's photo too). The name kept is
    the one with the fewest links on the way (a link is never kept over its target), then the first by path."""
    if len(files) < 2:
        return {}
    dev, ino = np.array(devs, np.uint64), np.array(inodes, np.uint64)
    order = np.lexsort((ino, dev))
    same = (dev[order][1:] == dev[order][:-1]) & (ino[order][1:] == ino[order][:-1])
    if not same.any():  # the common case: one name a file, ~20 ms for 200k files
        return {}
    out: dict[int, int] = {}
    starts = np.flatnonzero(np.r_[True, ~same])
    for run in np.split(order, starts[1:]):
        if len(run) > 1:
            names = sorted(run.tolist(), key=lambda k: (link_depth(files[k].abs), files[k].rel))
            out.update((k, names[0]) for k in names[1:])
    return out


def alias_reason(kept: str) -> str:
    """The reason listed for a name that is not indexed because it names the file indexed as `kept`."""
    return f"another name of {kept} (a symlink or hard link to it): indexed once, under that name"


def link_depth(path: str) -> tuple[int, int]:
    """(symlinks followed from the name itself to its file, 1 when a folder on its path is a symlink): the
    fewer, the closer a name is to the file itself."""
    hops, p = 0, path
    while os.path.islink(p) and hops < 40:
        p = os.path.join(os.path.dirname(p), os.readlink(p))
        hops += 1
    folder = os.path.dirname(os.path.abspath(path))
    return hops, int(os.path.realpath(folder) != os.path.normpath(folder))
