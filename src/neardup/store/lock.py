"""Store, lock: one writer per store at a time, by an OS lock the kernel drops if the process dies."""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import StoreLockedError
from .files import StoreFiles


@contextmanager
def writer_lock(files: StoreFiles) -> Iterator[None]:
    """Hold the exclusive writer lock of a store; StoreLockedError (naming the holder) when another has it."""
    fh = open(files.lock, "a+")
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
