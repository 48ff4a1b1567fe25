"""Store, lock: one writer per store at a time, by an OS lock the kernel drops if the process dies."""
from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import StoreError, StoreLockedError
from .files import StoreFiles


@contextmanager
def writer_lock(files: StoreFiles) -> Iterator[None]:
    """Hold the exclusive writer lock of a store; StoreLockedError (naming the holder) when another has it.
    The lock file is never followed through a symlink nor taken when it is not a regular file: the writer
    truncates it, and a link planted there would truncate whatever it points to."""
    try:
        fd = os.open(files.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(f"the lock file {files.lock} is a symbolic link; refusing to write through it "
                             f"(remove it: the writer makes its own)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise StoreError(f"the lock file {files.lock} is not a regular file; remove it (the writer makes its own)")
    os.set_blocking(fd, True)
    fh = os.fdopen(fd, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            who = fh.read().strip() or "another process"
            raise StoreLockedError(
                f"{files.store} is being written by {who}; try again when it has finished") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"neardup pid {os.getpid()}")
        fh.flush()
        yield
    finally:
        fh.close()  # closing releases the lock; the file stays, harmless, so there is nothing to clean up
