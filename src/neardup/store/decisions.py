"""Store, decisions: what people decided about pairs of photos, in an append-only journal beside the store.

A decision says two photos are a `duplicate` (optionally which one to keep) or `distinct`. It is keyed by the
photos' content digests (Catalog.sha256), never by path or id, so it survives renames, moves, `update`,
compaction, `restore` and `repair`: the journal is not part of any generation, and no writer of the store
touches it.

The journal `<store>.decisions` is a text file of records, one per line: `<sha256 of the JSON> <JSON>`. The
first record is a header naming the format; each later record is one batch of decisions (one `append`), so a
batch is written, and read back, all or nothing. Appends take an OS lock on the journal itself (not the
store's writer lock: an hour-long `update` never blocks a decision), write the batch with one write(2) and
fsync it; readers take a shared lock, so they never see half a batch. A last record cut short by a crash (no
newline at the end) is ignored and reported, and cut off by the next append (it was never acknowledged); a
damaged record elsewhere is reported and its decisions are never served. A later decision on a pair
supersedes the earlier one; the history keeps both.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InputError, StoreError
from ..fileio import TMP_SUFFIX, fsync_dir, now_iso
from .files import StoreFiles

log = logging.getLogger(__name__)

#: The decisions a person makes about a pair.
DECISIONS = ("duplicate", "distinct")
#: A decision that takes back the earlier ones on its pair (the page's undo): the pair is undecided again.
UNDECIDED = "undecided"
FORMAT = "neardup-decisions"
VERSION = 1
_DIGEST = re.compile(r"[0-9a-f]{64}")
#: The most a journal may hold before it is refused as not a journal (decisions are ~300 bytes each).
MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class Decision:
    """One person's decision about the pair of photos with content digests `a` < `b`."""

    a: str  #: content digest (sha256 hex, as Catalog.sha256) of one photo; a < b
    b: str  #: the other photo's digest
    decision: str  #: "duplicate" | "distinct" (| "undecided": takes the pair's earlier decisions back)
    keeper: str | None  #: digest of the photo to keep (a or b), or None
    at: str  #: ISO-8601 UTC time of the decision
    source: str  #: "import", "page", "api", ...
    note: str = ""  #: free text for people reading the history (e.g. the paths at the time)

    def __post_init__(self) -> None:
        for name in ("a", "b"):
            v = getattr(self, name)
            if not isinstance(v, str) or not _DIGEST.fullmatch(v):
                raise InputError(f"decision: {name} must be a photo's sha256 digest (64 lowercase hex), not {v!r}")
        if self.a >= self.b:
            raise InputError("decision: a pair of a photo with itself (the same content)" if self.a == self.b
                             else "decision: the digests must be given in order, a < b (use pair_key)")
        if self.decision not in (*DECISIONS, UNDECIDED):
            raise InputError(f"decision: must be {', '.join(DECISIONS)} or {UNDECIDED}, not {self.decision!r}")
        if self.keeper is not None and (self.keeper not in (self.a, self.b) or self.decision != "duplicate"):
            raise InputError("decision: a keeper is one of the pair, and only for a duplicate")
        for name in ("at", "source", "note"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"decision: {name} must be text")

    @classmethod
    def make(cls, x: str, y: str, decision: str, keeper: str | None = None, *, source: str, note: str = "",
             at: str | None = None) -> Decision:
        """A decision on the photos with digests `x` and `y` (any order), stamped now unless `at` is given."""
        a, b = pair_key(x, y)
        return cls(a, b, decision, keeper, at or now_iso(), source, note)

    @property
    def key(self) -> tuple[str, str]:
        """The pair (a, b)."""
        return (self.a, self.b)


def pair_key(x: str, y: str) -> tuple[str, str]:
    """The key of the pair of photos with digests `x` and `y`: the two sorted."""
    return (x, y) if x <= y else (y, x)


@dataclass
class JournalState:
    """What a journal holds: the current decision of every decided pair, every decision in order, and what
    was wrong with the file (a torn last record, damaged records: their decisions are not served)."""

    current: dict[tuple[str, str], Decision] = field(default_factory=dict)  #: latest decision per pair_key
    history: list[Decision] = field(default_factory=list)  #: every decision in order (superseded ones kept)
    problems: list[str] = field(default_factory=list)  #: e.g. "a torn last record (37 bytes) was ignored"

    def get(self, x: str, y: str) -> Decision | None:
        """The current decision on the pair of digests `x`, `y` (any order), or None."""
        return self.current.get(pair_key(x, y))

    def of(self, x: str, y: str) -> list[Decision]:
        """Every decision ever made on the pair `x`, `y`, oldest first."""
        key = pair_key(x, y)
        return [d for d in self.history if d.key == key]


def _record(payload: dict) -> bytes:
    body = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    data = body.encode("utf-8")
    return hashlib.sha256(data).hexdigest().encode("ascii") + b" " + data + b"\n"


def _parse(line: bytes) -> dict | None:
    """A record's payload, or None when its checksum does not match (damaged) or it is not one."""
    digest, _, data = line.partition(b" ")
    if len(digest) != 64 or hashlib.sha256(data).hexdigest().encode("ascii") != digest:
        return None
    try:
        payload = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


_HEADER = {"format": FORMAT, "version": VERSION}


class Journal:
    """The decisions journal of one store (see the module's docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, store: str | os.PathLike[str]) -> Journal:
        """The journal of the store at `store` (beside its real file, through a symlinked path)."""
        return cls(StoreFiles.resolved(store).decisions)

    def exists(self) -> bool:
        """Whether any decision was ever recorded."""
        return self.path.exists()

    def _open(self, flags: int) -> int:
        try:
            fd = os.open(self.path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StoreError(f"the decisions journal {self.path} is a symbolic link; refusing to use it") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StoreError(f"the decisions journal {self.path} is not a regular file")
        return fd

    def _create(self) -> None:
        """Create the journal holding its header, atomically (a reader never sees it empty) and durably."""
        if self.path.exists() or self.path.is_symlink():
            return
        if not self.path.parent.is_dir():
            raise InputError(f"the folder of the store {self.path.parent} does not exist")
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
        try:
            with open(tmp, "xb") as fh:
                fh.write(_record(_HEADER))
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, self.path)  # fails if another process created it first: theirs stands
            except FileExistsError:
                pass
            except OSError:  # a filesystem without hard links: create it exclusively instead
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
                except FileExistsError:
                    pass
                else:
                    try:
                        os.write(fd, _record(_HEADER))
                        os.fsync(fd)
                    finally:
                        os.close(fd)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.path.parent)

    @contextmanager
    def _locked(self, fd: int, kind: int) -> Iterator[None]:
        fcntl.flock(fd, kind)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def append(self, decisions: Sequence[Decision]) -> None:
        """Record `decisions` as one batch: all of them or (after a crash) none, durable when this returns.
        Concurrent appenders (processes or threads) wait for each other; none is lost."""
        batch = list(decisions)
        if not batch:
            return
        for d in batch:
            if not isinstance(d, Decision):
                raise TypeError(f"not a Decision: {d!r}")
            Decision(**asdict(d))  # checked again: a Decision built with object.__setattr__ tricks is refused
        data = _record({"decisions": [asdict(d) for d in batch]})
        self._create()
        fd = self._open(os.O_RDWR | os.O_APPEND)
        try:
            with self._locked(fd, fcntl.LOCK_EX):
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    # a torn last record: a crash during an append that never returned, so never acknowledged
                    start = _last_newline(fd, size)
                    log.warning("%s: a torn last record (%d bytes) was cut off before appending", self.path,
                                size - start)
                    os.ftruncate(fd, start)
                    size = start
                if size == 0:  # only a torn header was there (a crash creating it without hard links)
                    data = _record(_HEADER) + data
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                except BaseException:
                    os.ftruncate(fd, size)  # all or nothing: a batch half written is taken back
                    raise
        finally:
            os.close(fd)

    def read(self) -> JournalState:
        """Every decision, checked: a torn last record is ignored, damaged records are skipped; both reported
        in `problems`. An absent journal is an empty state."""
        state = JournalState()
        try:
            fd = self._open(os.O_RDONLY)
        except FileNotFoundError:
            return state
        try:
            with self._locked(fd, fcntl.LOCK_SH):
                size = os.fstat(fd).st_size
                if size > MAX_BYTES:
                    raise StoreError(f"the decisions journal {self.path} holds {size} bytes: not a journal")
                data = os.pread(fd, size, 0) if size else b""
        finally:
            os.close(fd)
        lines = data.split(b"\n")
        tail = lines.pop()  # after the last newline: b"" unless the last record is torn
        if tail:
            state.problems.append(f"{self.path.name}: a torn last record ({len(tail)} bytes) was ignored: a write "
                                  f"was interrupted (the next decision recorded cuts it off)")
        damaged = []
        for n, line in enumerate(lines, start=1):
            payload = _parse(line)
            if n == 1:
                if payload != _HEADER:
                    raise StoreError(f"{self.path} is not a decisions journal of this neardup (its first line is "
                                     f"not a {FORMAT} {VERSION} header); move it aside to go on without decisions")
                continue
            try:
                if payload is None or not isinstance(payload.get("decisions"), list):
                    raise InputError("damaged")
                batch = [Decision(**d) for d in payload["decisions"]]
            except (InputError, TypeError):
                damaged.append(n)
                continue
            for d in batch:
                state.history.append(d)
                if d.decision == UNDECIDED:
                    state.current.pop(d.key, None)
                else:
                    state.current[d.key] = d
        if damaged:
            shown = ", ".join(map(str, damaged[:10])) + (", ..." if len(damaged) > 10 else "")
            state.problems.append(f"{self.path.name}: {len(damaged)} damaged record(s) (line {shown}): their "
                                  f"decisions are not served; a pair they decided may show an earlier decision")
        return state


def _last_newline(fd: int, size: int) -> int:
    """The offset just after the last newline before `size` (0 if none)."""
    pos = size
    while pos > 0:
        step = min(pos, 1 << 16)
        block = os.pread(fd, step, pos - step)
        k = block.rfind(b"\n")
        if k >= 0:
            return pos - step + k + 1
        pos -= step
    return 0
