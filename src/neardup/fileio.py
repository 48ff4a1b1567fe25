"""Bottom layer: crash-safe file writes (temporary file, fsync, os.replace), output-path checks, byte counts.

Every file neardup publishes (store, index, CSV, JSON, HTML, PNG) goes through `atomic_write`, so a reader
or a crash sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .errors import InputError

#: Suffix of every temporary file neardup writes beside its target (cleaned up by the store's writer).
TMP_SUFFIX = ".neardup-tmp"
T = TypeVar("T")
_UMASK = os.umask(0)
os.umask(_UMASK)


def now_iso() -> str:
    """UTC time stamp, as stores and reports record it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_output_path(path: Path) -> None:
    """Refuse an output file whose folder does not exist (rather than creating folders by surprise)."""
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise InputError(f"the folder for {path} does not exist: {parent}")


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (best effort: some filesystems refuse to fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[str], T], before_replace: Callable[[], object] | None = None) -> T:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then atomically rename it to `path`;
    returns what `write` returned.

    `before_replace` runs between the two, when the new file is complete (the store keeps its previous
    generation there, so the moment both names hold the same file is as short as it can be)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a file name")
    try:
        mode = path.stat().st_mode & 0o777  # keep the permissions the user gave the file
    except OSError:
        mode = 0o666 & ~_UMASK  # mkstemp makes 0600; a new file is as readable as any file the user writes
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        result = write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return result


def ensure_space(path: Path, nbytes: float) -> None:
    """Refuse a write of about `nbytes` to `path` that its filesystem cannot take, before anything is written:
    the blocks are reserved beside it (posix_fallocate: a user's quota counts too) and given back at once.
    Raises OSError (ENOSPC, EDQUOT). HDF5 must never meet a full disk mid-write: it has crashed the process
    (SIGSEGV) there instead of failing."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        try:
            os.posix_fallocate(fd, 0, max(1, int(nbytes)))
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise OSError(exc.errno, f"{exc.strerror} (needs about {fmt_bytes(int(nbytes))})", str(path)) from None
            if shutil.disk_usage(path.parent).free < nbytes:  # a filesystem without fallocate: its free space
                raise OSError(errno.ENOSPC, f"No space left on device (needs about {fmt_bytes(int(nbytes))})",
                              str(path)) from None
    finally:
        os.close(fd)
        os.unlink(tmp)


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fmt_bytes(n: int) -> str:
    """A byte count for people: 812 B, 23.4 KB, 1.2 GB."""
    x = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if x < 1024 or unit == "GB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return ""
