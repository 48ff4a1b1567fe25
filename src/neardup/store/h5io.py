"""Store, h5io: HDF5 files written so that a full disk is an OSError, and read only after their bytes are checked.

Writing: HDF5 (through h5py's default driver) cannot recover from a write that fails (ENOSPC, EDQUOT, EFBIG)
— its close fails too, the file stays half-open inside the library, and the interpreter crashes (SIGSEGV)
when HDF5 shuts down at exit. So HDF5 writes through a `GuardedFile` (h5py's file-object driver): a write
that fails is recorded and its bytes go to an anonymous memory file instead, so HDF5 never sees a failure
and closes cleanly; the recorded error is raised after the close, and the writer stops at its next step.

Reading: HDF5 parses damaged metadata badly (a flipped byte has made it loop forever, or fail with errors
of any type), so bytes are checked before HDF5 sees them: a manifest carries the digest of its own bytes in
its userblock (512 bytes HDF5 skips), and the manifest records the digest of a segment's bytes but its
vectors' and local features' chunk data (HDF5 copies those without parsing; each block has its own digest).
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import h5py

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

#: Every exception type h5py raises on a damaged file (HDF5's errors map to several; a broken structure
#: surfaces as RuntimeError, KeyError, ValueError, ...): all of them mean "damaged", never a traceback.
H5_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError, LookupError,
             UnicodeError, OverflowError, SystemError, EOFError)
#: The userblock of a manifest: HDF5 skips it (it finds its superblock at 512); it holds the digest.
USERBLOCK = 512
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HEADER = re.compile(rb"neardup-manifest sha256=([0-9a-f]{64}) size=([0-9]{1,15})\n\0*")
_LIBVER = ("v110", "latest")


class GuardedFile:
    """A file HDF5 writes through (h5py's file-object driver) that never reports a failed write to HDF5:
    the first failure is kept in `error`, and that write and every later one go to a sparse memory file at
    the same offsets (reads see them there), so HDF5 can finish and close. The caller raises `error`."""

    def __init__(self, path: str | os.PathLike[str], shown: str | os.PathLike[str] | None = None) -> None:
        self.path, self.shown = str(path), str(shown or path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.pos = 0
        self.size = 0
        self.error: OSError | None = None
        self._spill: int | None = None  # memfd holding what was written after the failure
        self._spilled: list[tuple[int, int]] = []  # (offset, end) ranges that live in the memfd

    # the file-object protocol h5py's driver uses
    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.pos = offset if whence == os.SEEK_SET else self.pos + offset if whence == os.SEEK_CUR else \
            self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf: WriteableBuffer) -> int:
        view = memoryview(buf).cast("B")
        n = min(len(view), max(0, self.size - self.pos))
        got = os.preadv(self.fd, [view[:n]], self.pos) if n else 0
        view[got:n] = bytes(n - got)  # past the real file's end (bytes that went to the memfd): zeros first
        for start, end in self._spilled:  # then what went to the memfd, over them
            lo, hi = max(start, self.pos), min(end, self.pos + n)
            if lo < hi:
                assert self._spill is not None  # ranges are spilled only once the memfd exists
                os.preadv(self._spill, [view[lo - self.pos:hi - self.pos]], lo)
        self.pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        buf = bytearray(max(0, self.size - self.pos) if n < 0 else n)
        return bytes(buf[:self.readinto(buf)])

    def write(self, buf: ReadableBuffer) -> int:
        view = memoryview(buf).cast("B")
        done = 0
        if self.error is None:
            try:
                while done < len(view):
                    done += os.pwrite(self.fd, view[done:], self.pos + done)
            except OSError as exc:
                self.error = exc
        if done < len(view):
            self._to_memory(view[done:], self.pos + done)
        self.pos += len(view)
        self.size = max(self.size, self.pos)
        return len(view)

    def _to_memory(self, view: memoryview, at: int) -> None:
        if self._spill is None:
            self._spill = os.memfd_create("neardup-abandoned-write", os.MFD_CLOEXEC)
        done = 0
        while done < len(view):
            done += os.pwrite(self._spill, view[done:], at + done)
        self._spilled.append((at, at + len(view)))

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as exc:
                self.error = exc
        self.size = size
        return size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        for fd in (self.fd, self._spill):
            if fd is not None:
                os.close(fd)
        self.fd, self._spill = -1, None

    def check(self) -> None:
        """Raise the recorded write failure, naming the file (as the OS would have)."""
        if self.error is not None:
            exc = self.error
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno or errno.EIO), self.shown) from None


@contextmanager
def h5_create(path: str | os.PathLike[str], shown: str | os.PathLike[str], userblock: int = 0,
              ) -> Iterator[tuple[h5py.File, GuardedFile]]:
    """A new HDF5 file at `path` (a temporary: the caller publishes it as `shown`, the name errors give),
    written through a GuardedFile. Raises the first failed write as OSError after HDF5 has closed the file;
    the caller calls `guard.check()` between its steps to stop early."""
    guard = GuardedFile(path, shown)
    try:
        kw = {"userblock_size": userblock} if userblock else {}
        f = h5py.File(guard, "w", libver=_LIBVER, **kw)
        try:
            yield f, guard
        finally:
            f.close()
        guard.check()
    finally:
        guard.close()


# -------------------------------------------------------------------------------------- checked bytes

def seal(path: str | os.PathLike[str]) -> None:
    """Write the digest of a closed manifest's bytes (all but its userblock) into its userblock."""
    with open(path, "r+b") as fh:
        fh.seek(USERBLOCK)
        h, size = hashlib.sha256(), 0
        while block := fh.read(1 << 20):
            h.update(block)
            size += len(block)
        header = f"neardup-manifest sha256={h.hexdigest()} size={size}\n".encode()
        fh.seek(0)
        fh.write(header.ljust(USERBLOCK, b"\0"))


def unseal(data: bytes, header_only: bool = False) -> bytes | None:
    """The HDF5 bytes of a manifest read whole, its digest checked: None for a file written before manifests
    carried one (no userblock: read as before). With `header_only`, `data` is the file's first bytes and only
    the header is checked. Raises ValueError (what is wrong) when the digest or the header does not match."""
    if data[:8] == HDF5_SIGNATURE:
        return None  # no userblock: a manifest (or a store) written before manifests were sealed
    if not (data.startswith(b"neardup-manifest") or data[USERBLOCK:USERBLOCK + 8] == HDF5_SIGNATURE):
        raise ValueError("not a readable HDF5 file (no HDF5 signature)")
    m = _HEADER.fullmatch(data[:USERBLOCK])
    if m is None:
        raise ValueError("the manifest's header is damaged")
    if header_only:
        return None
    body = memoryview(data)[USERBLOCK:]
    if int(m.group(2)) != len(body):
        raise ValueError(f"the manifest holds {len(body)} bytes, not the {int(m.group(2))} it recorded")
    if hashlib.sha256(body).hexdigest() != m.group(1).decode():
        raise ValueError("the manifest does not match the digest of its bytes")
    return data


_checked: dict[tuple[int, int, int, int], str] = {}
_checked_lock = threading.Lock()


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    # not ctime: the publish's chmod and rename change it, and the file is the one just hashed
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _gaps(size: int, data: tuple[tuple[int, int], ...]) -> Iterator[tuple[int, int]]:
    """The byte ranges of a file of `size` bytes outside the sorted, disjoint ranges `data`."""
    at = 0
    for a, b in data:
        if not at <= a <= b <= size:
            raise ValueError("the manifest's byte ranges for the file are not its own")
        if at < a:
            yield at, a
        at = b
    if at < size:
        yield at, size


def _skeleton_digest(fd: int, size: int, data: tuple[tuple[int, int], ...]) -> str:
    h = hashlib.sha256(f"{size}\0".encode())
    for a, b in _gaps(size, data):
        while a < b:
            block = os.pread(fd, min(b - a, 1 << 20), a)
            if not block:
                raise ValueError(f"the file ends at byte {a}")
            h.update(block)
            a += len(block)
    return h.hexdigest()


def check_file(path: Path, sha256: str, size: int, data: tuple[tuple[int, int], ...]) -> None:
    """Check a segment's digest before HDF5 opens it: every byte but the large columns' chunk data (`data`:
    HDF5 copies those without parsing them, and each block of them is checked when it is read), so opening
    costs a read of its metadata and small columns, not of its vectors. Once per file per process (the file
    is immutable). Raises ValueError when it does not match, OSError when it cannot be read."""
    with open(path, "rb") as fh:
        ident = _identity(os.fstat(fh.fileno()))
        with _checked_lock:
            if _checked.get(ident) == sha256:
                return
        if ident[2] != size:
            raise ValueError(f"the file is truncated ({ident[2]} of {size} bytes)" if ident[2] < size else
                             f"the file holds {ident[2]} bytes, not {size}")
        if _skeleton_digest(fh.fileno(), size, data) != sha256:
            raise ValueError("the file does not match its digest")
    with _checked_lock:
        _checked[ident] = sha256


def file_digest(path: str | os.PathLike[str], large: tuple[str, ...]) -> tuple[str, int, tuple[tuple[int, int], ...]]:
    """The digest, size and chunk-data ranges (of the datasets `large`) of a segment just written (then known
    checked in this process): what `check_file` checks."""
    spans: list[tuple[int, int]] = []
    with h5py.File(path, "r") as f:  # our own file, just written: safe to parse
        for name in large:
            if name in f:
                f[name].id.chunk_iter(lambda c: spans.append((c.byte_offset, c.byte_offset + c.size)))
    data: list[tuple[int, int]] = []
    for a, b in sorted(spans):  # coalesced: the chunks of a column lie mostly one after another
        if data and a <= data[-1][1]:
            data[-1] = (data[-1][0], max(data[-1][1], b))
        else:
            data.append((a, b))
    with open(path, "rb") as fh:
        ident = _identity(os.fstat(fh.fileno()))
        digest = _skeleton_digest(fh.fileno(), ident[2], tuple(data))
    with _checked_lock:
        _checked[ident] = digest
    return digest, ident[2], tuple(data)
