"""Search, review: the decisions people make about pairs (duplicate or distinct), read and recorded by path.

The journal (store/decisions.py) keys decisions by the photos' content digests; this module turns the paths
and ids a person sees (as `duplicates` writes them) into digests and back: `record_decision` (one decision,
the review page's), `import_decisions` (a CSV, all or nothing), `export_decisions` (every current decision
with paths as the store knows them now) and `decisions_for`. `Decided` is what `duplicates`, `query` and the
report use to apply them to catalogue rows.
"""
from __future__ import annotations

import csv
import logging
import os
import threading
import weakref
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, StoreError
from ..fileio import atomic_write, check_output_path
from ..store.decisions import DECISIONS, UNDECIDED, Decision, Journal, JournalState, pair_key
from ..store.generation import Generation
from ..store.handle import opened

log = logging.getLogger(__name__)

#: The columns `review import` reads: a, b and decision are required, keeper is optional.
IMPORT_COLUMNS = ("a", "b", "decision", "keeper")
#: The columns `review export` writes (an export can be imported again: the extra columns are checked or
#: informational).
EXPORT_COLUMNS = ("a", "b", "decision", "keeper", "a_sha256", "b_sha256", "at", "source", "note")
#: The other columns of a `duplicates` pairs CSV: such a file with a decision column added imports as is.
PAIRS_CSV_COLUMNS = ("a_id", "a_path", "b_id", "b_path", "score", "kind", "a_stale", "b_stale", "verified",
                     "inliers")
#: Bad rows listed in an import's error (the count of all is given).
MAX_LISTED = 20


class BadRowsError(InputError):
    """A decisions CSV with bad rows: none of it was applied. `rows` holds one "line N: reason" per bad row."""

    def __init__(self, path: str | os.PathLike[str], rows: list[str]) -> None:
        self.path, self.rows = str(path), rows
        shown = "; ".join(rows[:3]) + ("; ..." if len(rows) > 3 else "")
        super().__init__(f"{path}: {len(rows)} bad row(s), nothing was applied: {shown}")

    def lines(self, limit: int = MAX_LISTED) -> list[str]:
        """One line per bad row (at most `limit`, then how many more)."""
        out = self.rows[:limit]
        if len(self.rows) > limit:
            out.append(f"... and {len(self.rows) - limit} more bad row(s)")
        return out


@dataclass
class ImportResult:
    """What `import_decisions` did."""

    path: str
    rows: int  #: data rows read
    recorded: int  #: decisions appended to the journal
    unchanged: int  #: rows that repeat the pair's current decision (not recorded again)
    decisions: list[Decision] = field(default_factory=list)  #: the decisions recorded


class Photos:
    """A store generation's photos by stored path, resolved path and id, and their content digests."""

    def __init__(self, gen: Generation) -> None:
        cat = gen.catalog
        # weak: _PHOTOS caches this by its generation, and a value holding its key would keep it alive for good
        self._gen, self.sha256 = weakref.ref(gen), list(cat.sha256)
        self.paths = list(cat.paths)
        self._by_path: dict[str, int] = {}
        self._by_id = {int(i): r for r, i in enumerate(cat.ids.tolist())}
        self._by_digest: dict[str, list[int]] = {}
        for r, (p, d) in enumerate(zip(self.paths, self.sha256)):
            self._by_path.setdefault(p, r)
            self._by_digest.setdefault(d, []).append(r)  # byte-identical copies: several rows
        self._resolved: dict[str, int] | None = None

    @property
    def gen(self) -> Generation:
        """The generation these photos are of (its callers hold it while they use them)."""
        if (gen := self._gen()) is None:
            raise StoreError("the store generation of these photos was released")
        return gen

    def row(self, text: str) -> int | None:
        """The row of a photo named by its stored path, its path from here (absolute or relative to the
        current folder), or its id; None when the store holds no such photo."""
        text = text.strip()
        if text in self._by_path:
            return self._by_path[text]
        if text.lstrip("-").isdigit() and int(text) in self._by_id:
            return self._by_id[int(text)]
        resolved = self._resolved
        if resolved is None:  # built whole, then published: a thread sharing this object never sees half of it
            resolved = {}
            for r in range(len(self.paths)):
                resolved.setdefault(os.path.normpath(str(self.gen.image_path(r))), r)
            self._resolved = resolved
        try:
            return resolved.get(os.path.normpath(os.path.abspath(os.path.expanduser(text))))
        except (OSError, ValueError):
            return None

    def path_of(self, digest: str, prefer: Collection[str] = ()) -> str | None:
        """The stored path of the photo with content `digest` now: of byte-identical copies, one named in
        `prefer` (the paths a decision was made on), else the first."""
        rows = self._by_digest.get(digest)
        if not rows:
            return None
        return next((self.paths[r] for r in rows if self.paths[r] in prefer), self.paths[rows[0]])


class Decided:
    """Decisions applied to catalogue rows: the current decision on the pair of rows (i, j), by digest."""

    def __init__(self, state: JournalState, sha256: list[str]) -> None:
        self.state, self.sha256 = state, sha256
        self._pairs: dict[str, set[tuple[int, int]]] = {}
        self._keepers: dict[str, list[Decision]] | None = None

    def __bool__(self) -> bool:
        return bool(self.state.current)

    def get(self, i: int, j: int) -> Decision | None:
        """The current decision on rows i and j (None: undecided, or byte-identical rows)."""
        if not self.state.current:
            return None
        a, b = self.sha256[i], self.sha256[j]
        return None if a == b else self.state.current.get(pair_key(a, b))

    def row_pair_set(self, word: str) -> set[tuple[int, int]]:
        """The pairs of catalogue rows (i < j) whose current decision is `word`: every row of one content with
        every row of the other (byte-identical copies share their content's decisions)."""
        if word not in self._pairs:
            rows: dict[str, list[int]] = {}
            if self.state.current:
                for r, d in enumerate(self.sha256):
                    rows.setdefault(d, []).append(r)
            self._pairs[word] = {(min(i, j), max(i, j)) for d in self.state.current.values() if d.decision == word
                                 for i in rows.get(d.a, ()) for j in rows.get(d.b, ())}
        return self._pairs[word]

    def pair_mask(self, I: np.ndarray, J: np.ndarray, word: str) -> np.ndarray:
        """Bool [len(I)]: which row pairs (I[k], J[k]) are currently decided `word`."""
        pairs = self.row_pair_set(word)
        if not pairs:
            return np.zeros(len(I), bool)
        n = max(len(self.sha256), 1)
        keys = np.array(sorted(a * n + b for a, b in pairs), np.int64)
        I, J = np.asarray(I, np.int64), np.asarray(J, np.int64)
        return np.isin(np.minimum(I, J) * n + np.maximum(I, J), keys)

    def forbidden(self, local: dict[int, int]) -> np.ndarray | None:
        """Bool [m, m] over a component's rows (`local`: row -> index): the pairs decided distinct, which never
        share a group whatever their score; None when there is none."""
        pairs = [(local[a], local[b]) for a, b in self.row_pair_set("distinct") if a in local and b in local]
        if not pairs:
            return None
        out = np.zeros((len(local), len(local)), bool)
        for x, y in pairs:
            out[x, y] = out[y, x] = True
        return out

    def keeper_among(self, rows: np.ndarray, stale: Collection[int] = ()) -> int | None:
        """The row a person chose to keep among a group's `rows` (in keeper order): the keeper of the latest
        duplicate decision on two of them whose keeper no decision among them turned down; None without one
        (or when it is `stale`: a file gone or changed is never a keeper)."""
        if self._keepers is None:
            self._keepers = {}
            for d in self.state.current.values():
                if d.decision == "duplicate" and d.keeper is not None:
                    self._keepers.setdefault(d.a, []).append(d)
                    self._keepers.setdefault(d.b, []).append(d)
        if not self._keepers:
            return None
        digests = {self.sha256[r] for r in rows.tolist()}
        among = {d for g in digests for d in self._keepers.get(g, ()) if d.a in digests and d.b in digests}
        lost = {d.b if d.keeper == d.a else d.a for d in among}
        for d in sorted(among, key=lambda d: d.at, reverse=True):
            if d.keeper in lost:
                continue
            for r in rows.tolist():  # byte-identical copies of the keeper: the best of them
                if self.sha256[r] == d.keeper and r not in stale:
                    return int(r)
        return None

    def keeper_row(self, d: Decision, i: int, j: int) -> int | None:
        """Which of rows i, j the decision `d` keeps (None: no keeper chosen)."""
        if d.keeper is None:
            return None
        return i if self.sha256[i] == d.keeper else j if self.sha256[j] == d.keeper else None


class DecisionCache:
    """A store's decisions, read again only when its journal changed: a warm Searcher (the service) marks
    every answer's matches without parsing the journal each time. A journal that cannot be read marks
    nothing (logged), never fails a query."""

    def __init__(self, store: str | os.PathLike[str]) -> None:
        self.journal = Journal.of(store)
        self._stamp: tuple[int, int, int] | None = None
        self._state = JournalState()
        self._lock = threading.Lock()

    def state(self) -> JournalState:
        """The journal's state now."""
        try:
            st = os.stat(self.journal.path)
        except OSError:
            return JournalState()
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._state = self.journal.read()
                except (StoreError, OSError) as exc:
                    log.warning("decisions not applied: %s", exc)
                    self._state = JournalState(problems=[str(exc)])
                self._stamp = stamp
            return self._state


def decisions_for(store: Generation | str | os.PathLike[str]) -> JournalState:
    """Every decision recorded for `store` (a path or an open Generation): current, history and problems."""
    path = store.files.store if isinstance(store, Generation) else store
    return Journal.of(path).read()


def decided(gen: Generation) -> Decided:
    """The decisions of `gen`'s store, ready to apply to its catalogue rows (the journal's problems logged)."""
    state = decisions_for(gen)
    for problem in state.problems:
        log.warning("decisions: %s", problem)
    return Decided(state, list(gen.catalog.sha256) if len(gen) else [])


#: Photos of the open generations a caller keeps (the review page's): built once per generation, not per
#: decision, since building them walks every row; gone with the generation.
_PHOTOS: weakref.WeakKeyDictionary[Generation, Photos] = weakref.WeakKeyDictionary()
_PHOTOS_LOCK = threading.Lock()


@contextmanager
def _photos(store: Generation | str | os.PathLike[str]) -> Iterator[Photos]:
    if isinstance(store, Generation):
        with _PHOTOS_LOCK:
            photos = _PHOTOS.get(store) or _PHOTOS.setdefault(store, Photos(store))
        yield photos
        return
    with opened(store) as gen:
        yield Photos(gen)


_SEP = " | "


def _note(pa: str, pb: str) -> str:
    """A decision's note: the paths it was made on (a's, b's), for people and for `export_decisions`."""
    return f"{pa}{_SEP}{pb}"


def record_decision(store: Generation | str | os.PathLike[str], a: str | int, b: str | int, decision: str,
                    keeper: str | int | None = None, *, source: str) -> Decision:
    """Record one decision on the photos `a` and `b` (stored paths, paths from here, or ids); `keeper` is one of
    them (a path or id, or the words "a"/"b") or None; `decision` "duplicate", "distinct" or "undecided"
    (takes back the pair's decision: the page's undo). Raises InputError, recording nothing, for a photo not in
    the store, a pair of a photo with itself, a keeper that is neither, or an unknown decision word."""
    with _photos(store) as photos:
        d = _decision(photos, str(a), str(b), str(decision).strip().lower(),
                      None if keeper is None else str(keeper), source)
        Journal.of(photos.gen.files.store).append([d])
        return d


def _decision(photos: Photos, a: str, b: str, word: str, keeper: str | None, source: str) -> Decision:
    """A decision from what a person wrote; InputError (the reason, without the line) when it is not one."""
    if word not in (*DECISIONS, UNDECIDED):
        raise InputError(f"unknown decision {word!r} (write {', '.join(DECISIONS)} or {UNDECIDED})")
    rows = []
    for name, text in (("a", a), ("b", b)):
        if not text.strip():
            raise InputError(f"{name} is empty")
        r = photos.row(text)
        if r is None:
            raise InputError(f"{name}: {text!r} is not a photo of the store")
        rows.append(r)
    ra, rb = rows
    da, db = photos.sha256[ra], photos.sha256[rb]
    if ra == rb:
        raise InputError(f"a pair of a photo with itself ({photos.paths[ra]})")
    if da == db:
        raise InputError(f"{photos.paths[ra]} and {photos.paths[rb]} are byte-identical copies: always duplicates, "
                         f"nothing to decide")
    kd = None
    if keeper is not None and keeper.strip():
        if word != "duplicate":
            raise InputError(f"a keeper is only for a duplicate, not for {word}")
        k = keeper.strip()
        rk = ra if k.lower() == "a" else rb if k.lower() == "b" else photos.row(k)
        if rk is None or photos.sha256[rk] not in (da, db):
            raise InputError(f"the keeper {k!r} is neither {photos.paths[ra]} nor {photos.paths[rb]}")
        kd = photos.sha256[rk]
    return Decision.make(da, db, word, kd, source=source, note=_note(photos.paths[ra], photos.paths[rb]))


def import_decisions(store: Generation | str | os.PathLike[str], csv_path: str | os.PathLike[str], *,
                     source: str = "import") -> ImportResult:
    """Record the decisions of a CSV with columns a, b, decision[, keeper] (paths as `duplicates` writes them,
    or ids; the columns of a `review export` or of a `duplicates` pairs CSV are accepted, a_path/b_path
    standing for a/b), all in one batch. A row repeating a pair's current decision is not recorded again.
    Raises BadRowsError listing every bad row ("line N: reason") and records nothing when any row is bad."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"no decisions file at {csv_path}")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = [c.strip().lower() for c in next(reader, [])]
            body = [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError:
        raise InputError(f"{csv_path} is not a UTF-8 text file") from None
    except csv.Error as exc:
        raise InputError(f"{csv_path} is not a CSV file ({exc})") from None
    cols = {c: k for k, c in enumerate(header)}
    for short, long in (("a", "a_path"), ("b", "b_path")):
        if short not in cols and long in cols:
            cols[short] = cols[long]
    known = set(EXPORT_COLUMNS) | set(PAIRS_CSV_COLUMNS)
    unknown = [c for c in header if c not in known]
    if unknown or not {"a", "b", "decision"} <= set(cols) or len(set(header)) != len(header):
        raise InputError(f"{csv_path}: the columns must be a,b,decision[,keeper] (found: {','.join(header) or 'none'}"
                         + (f"; unknown: {','.join(unknown)}" if unknown else "")
                         + ("; a column twice" if len(set(header)) != len(header) else "") + ")")
    bad: list[str] = []
    seen: dict[tuple[str, str], tuple[int, Decision]] = {}
    with _photos(store) as photos:
        journal = Journal.of(photos.gen.files.store)
        for line, row in body:
            if not any(c.strip() for c in row):
                continue  # a blank line
            if len(row) != len(header):
                bad.append(f"line {line}: {len(row)} fields, the header has {len(header)}")
                continue
            cell = {c: row[k].strip() for c, k in cols.items()}
            try:
                d = _decision(photos, cell["a"], cell["b"], cell["decision"].lower(), cell.get("keeper") or None,
                              source)
                for side, digest in (("a", "a_sha256"), ("b", "b_sha256")):
                    given = cell.get(digest, "").lower()
                    if given and given not in (d.a, d.b):
                        raise InputError(f"{digest} {given[:12]}... is not the content of {side}'s photo now")
            except InputError as exc:
                bad.append(f"line {line}: {exc}")
                continue
            if d.key in seen:
                first, other = seen[d.key]
                if (other.decision, other.keeper) != (d.decision, d.keeper):
                    bad.append(f"line {line}: conflicts with line {first} on the same pair "
                               f"({other.decision} there, {d.decision} here"
                               + (", another keeper" if other.decision == d.decision else "") + ")")
                continue
            seen[d.key] = (line, d)
        if bad:
            raise BadRowsError(csv_path, bad)
        current = journal.read().current
        new = [d for _, d in seen.values()
               if not (d.key in current and (current[d.key].decision, current[d.key].keeper) == (d.decision, d.keeper))
               and not (d.decision == UNDECIDED and d.key not in current)]
        journal.append(new)
    return ImportResult(str(csv_path), len(body), len(new), len(seen) - len(new), new)


def export_decisions(store: Generation | str | os.PathLike[str], out_csv: str | os.PathLike[str]) -> int:
    """Write every current decision whose two photos the store holds now, with their paths now (columns
    EXPORT_COLUMNS; the file imports again as is). A decision about a photo no longer in the store is not
    written: it stays in the journal and applies again if that content is indexed again. Returns the rows
    written."""
    out = Path(out_csv)
    check_output_path(out)
    with _photos(store) as photos:
        state = decisions_for(photos.gen)
        rows = []
        for d in state.current.values():
            named = set(d.note.split(_SEP))
            pa, pb = photos.path_of(d.a, named), photos.path_of(d.b, named)
            if pa is None or pb is None:
                continue
            keeper = "" if d.keeper is None else pa if d.keeper == d.a else pb
            rows.append([pa, pb, d.decision, keeper, d.a, d.b, d.at, d.source, d.note])
    rows.sort(key=lambda r: (r[0], r[1]))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(EXPORT_COLUMNS)
            w.writerows(rows)

    atomic_write(out, write)
    return len(rows)


def journal_info(store: str | os.PathLike[str]) -> dict:
    """What `info` says of a store's decisions journal: its file, whether it exists, pairs decided, records
    written, and its problems (a damaged journal is described, not raised)."""
    journal = Journal.of(store)
    try:
        state = decisions_for(store)
    except StoreError as exc:
        return {"file": str(journal.path), "exists": True, "pairs": 0, "records": 0, "problems": [str(exc)]}
    return {"file": str(journal.path), "exists": journal.exists(), "pairs": len(state.current),
            "records": len(state.history), "problems": state.problems}
