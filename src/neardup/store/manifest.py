"""Store, manifest: the store's manifest file, and a store written before segments (h5py, with segment).

The manifest (`catalog.h5`) is a small HDF5 file: the meta as attributes, the segment table, the
tombstones and the failures; `manifest_sha256` covers all of them, attributes included. A store written
before segments (schema 1: every row in one file, Fletcher-32 and string digests) is read here too, as one
segment without block digests (`LegacyFile`); the next update upgrades it.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError
from ..fileio import atomic_write, ensure_space
from .files import StoreFiles
from .h5io import H5_ERRORS, HDF5_SIGNATURE, USERBLOCK, h5_create, seal, unseal
from .meta import (
    FORMAT,
    INDEX_DEFAULTS,
    KINDS,
    LEGACY_SCHEMA,
    RECORDED,
    SCHEMA_VERSION,
    Manifest,
    ModelInfo,
    Segment,
    StoreMeta,
)
from .segment import Damage, attrs_of, blob, canonical, plain, reason_of, text_of

log = logging.getLogger(__name__)


def _manifest_digest(attrs: dict[str, object], data: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(canonical(attrs))
    for name in sorted(data):
        a = np.ascontiguousarray(data[name])
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.data)
    return h.hexdigest()


def _manifest_data(man: Manifest) -> dict[str, np.ndarray]:
    order = {s.name: k for k, s in enumerate(man.segments)}
    seg = [np.full(len(rows), order[name], np.int32) for name, rows in man.dead.items() if len(rows)]
    row = [np.asarray(rows, np.int64) for rows in man.dead.values() if len(rows)]
    # the segments' file digests go in an attribute (segment_files), not here: neardup before them reads
    # this table into Segment(**entry) and would call an unknown key damage
    return {"segments": blob(json.dumps([{k: v for k, v in s.__dict__.items() if not k.startswith("file_")}
                                         for s in man.segments])),
            "dead/segment": np.concatenate(seg) if seg else np.zeros(0, np.int32),
            "dead/row": np.concatenate(row) if row else np.zeros(0, np.int64),
            "failures": blob(json.dumps(man.failures))}


def write_manifest(path: Path, man: Manifest, before_replace: Callable[[], object] | None = None) -> None:
    """Publish `man` at `path` atomically (`before_replace`: see atomic_write)."""
    flat = man.meta.flat()
    attrs = {"format": FORMAT, **{k: plain(flat[k]) for k in RECORDED},
             "schema_version": SCHEMA_VERSION, "parent": man.parent,
             "segment_files": json.dumps([[s.file_sha256, s.file_bytes, s.file_data] for s in man.segments])}
    data = _manifest_data(man)
    attrs["manifest_sha256"] = _manifest_digest(attrs, data)
    ensure_space(path, sum(a.nbytes for a in data.values()) + (256 << 10))

    def write(tmp: str) -> None:
        with h5_create(tmp, path, userblock=USERBLOCK) as (f, _):  # a full disk: an OSError (h5io)
            for name, a in data.items():
                f.create_dataset(name, data=a)
            for k, v in attrs.items():
                f.attrs[k] = v
        seal(tmp)  # the digest of its bytes in its userblock: checked before HDF5 parses them

    atomic_write(path, write, before_replace)


def _meta(attrs: dict[str, Any], count: int, failures: int, **extra: Any) -> StoreMeta:
    values: dict[str, Any] = {}
    for k in RECORDED:
        if k in attrs:
            v = attrs[k]
            values[k] = int(v) if KINDS[k] is int else float(v) if KINDS[k] is float else str(v)
    values.update(extra)
    return StoreMeta.of_flat({**INDEX_DEFAULTS, **values, "count": count, "failures": failures})


def _read_manifest(f: h5py.File) -> Manifest:
    """The manifest of the open file `f`, its digest checked. Raises Damage (damaged or unreadable)."""
    try:
        attrs = attrs_of(f)
        data = {name: f[name][()] for name in ("segments", "dead/segment", "dead/row", "failures")}
    except H5_ERRORS as exc:
        raise Damage(reason_of(exc)) from None
    want = attrs.pop("manifest_sha256", None)
    try:
        digest = _manifest_digest(attrs, data)
    except (TypeError, ValueError):  # an attribute no writer of ours makes (an array, say)
        digest = None
    if want != digest:
        raise Damage("the manifest does not match its digest")
    try:
        segments = [Segment(**s) for s in json.loads(text_of(data["segments"]))]
        files = json.loads(str(attrs.get("segment_files", "[]"))) or [["", 0, []]] * len(segments)
        if len(files) != len(segments) or not all(isinstance(x, list) and len(x) == 3 and isinstance(x[0], str)
                                                  and isinstance(x[1], int) for x in files):
            raise ValueError("segment_files does not list the segments")
        segments = [replace(s, file_sha256=x, file_bytes=n, file_data=tuple((int(a), int(b)) for a, b in r))
                    for s, (x, n, r) in zip(segments, files)]
    except (TypeError, ValueError, AttributeError) as exc:  # written by no writer of ours
        raise Damage(f"the manifest's segment table cannot be read ({reason_of(exc)})") from None
    if len({s.name for s in segments}) != len(segments):  # a forged table: rows would be served twice
        raise Damage("the manifest names a segment more than once")
    dead: dict[str, np.ndarray] = {}
    if len(data["dead/segment"]) != len(data["dead/row"]) or (len(data["dead/segment"]) and (
            data["dead/segment"].min() < 0 or data["dead/segment"].max() >= len(segments))):
        raise Damage("the manifest's tombstones name segments it does not have")
    for k, s in enumerate(segments):
        rows = np.unique(data["dead/row"][data["dead/segment"] == k]).astype(np.int64)
        if len(rows) and (rows[0] < 0 or rows[-1] >= s.rows):
            raise Damage(f"the manifest's tombstones name rows segment {s.name} does not have")
        if len(rows):
            dead[s.name] = rows
    failures = [tuple(x) for x in json.loads(text_of(data["failures"]))]
    man = Manifest(meta=StoreMeta(ModelInfo("", "", "", 0, 0, "")), segments=segments, dead=dead, failures=failures,
                   parent=str(attrs.get("parent", "")))
    man.meta = _meta(attrs, man.count, len(failures))
    return man


def _open_checked(path: Path) -> h5py.File:
    """`path` opened by HDF5 — a sealed manifest from its bytes, read once and checked against the digest in
    its userblock first (HDF5 parses exactly the bytes checked); a file without one (a manifest or a store
    written before manifests were sealed) as before. Raises Damage."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(USERBLOCK + 8)
            if head[:8] == HDF5_SIGNATURE:  # not sealed: HDF5 reads it (a schema-1 store may be large)
                return h5py.File(path, "r")
            unseal(head, header_only=True)  # anything else is refused before it is read whole
            data = head + fh.read()
        body = unseal(data)
        assert body is not None  # None only for an unsealed file, which returned above
        return h5py.File(io.BytesIO(body), "r")
    except ValueError as exc:  # from unseal: what is wrong with the bytes
        raise Damage(str(exc)) from None
    except H5_ERRORS as exc:
        raise Damage(f"not a readable HDF5 file ({reason_of(exc)})") from None


def open_any(path: Path) -> Manifest | LegacyFile:
    """The store at `path`: its manifest, or (schema 1) the whole store file opened. Raises StoreError, Damage."""
    f = _open_checked(path)
    try:
        if f.attrs.get("format") != FORMAT:
            raise StoreError(f"{path} is an HDF5 file but not a neardup store")
        schema = int(f.attrs.get("schema_version", -1))
        if schema == LEGACY_SCHEMA:
            legacy = LegacyFile(path, f)
            f = None  # kept open by LegacyFile
            return legacy
        if schema != SCHEMA_VERSION:
            raise StoreError(f"{path} has store schema {schema}; this neardup reads schemas {LEGACY_SCHEMA} and "
                             f"{SCHEMA_VERSION}")
        return _read_manifest(f)
    except H5_ERRORS as exc:
        raise Damage(reason_of(exc)) from None
    finally:
        if f is not None:
            f.close()


class LegacyFile:
    """A store written before segments (schema 1), read as one segment: HDF5's Fletcher-32 checks each chunk
    and a digest attribute each string column (no block digests: the next update rewrites it as segments).
    What those miss (a chunk zeroed with its checksum, an attribute changed) is caught by checking the values
    read (_plausible) and the ids when it is opened (_check_ids): a damaged one is never served nor upgraded."""

    def __init__(self, path: Path, f: h5py.File) -> None:
        self.path, self._f = path, f
        self._count: np.ndarray | None = None  # local/count, read once to check the keypoints
        try:
            a = attrs_of(f)
            self.rows, self.dim = int(f["ids"].shape[0]), int(a["dim"])
            self.local_features = str(a.get("local_features", "")) if "local" in f else ""
            self.failures = list(zip(self._strings("failures/paths"), self._strings("failures/reasons")))
            token = str(a.get("index_file", "")).rsplit(".", 2)
            gen = token[-2] if len(token) == 3 and len(token[-2]) == 12 else hashlib.sha256(
                f"{a.get('updated')}/{self.rows}/{a.get('next_id')}".encode()).hexdigest()[:12]
            self.meta = _meta(a, self.rows, len(self.failures), schema_version=LEGACY_SCHEMA, generation=gen,
                              local_features=self.local_features)
            self._check_ids()
        except H5_ERRORS as exc:
            f.close()
            raise Damage(reason_of(exc)) from None
        except Damage:
            f.close()
            raise

    def _check_ids(self) -> None:
        """Ids are unique and below next_id: schema 1 has no digest over its attributes, and an id handed out
        twice would make a new photo "match" an old one."""
        ids = self.column("ids").astype(np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.meta.next_id):
            raise Damage(f"its ids run from {ids.min()} to {ids.max()} but its next id is {self.meta.next_id} "
                         f"(an id would be handed out twice)")
        if len(np.unique(ids)) != len(ids):
            raise Damage(f"{len(ids) - len(np.unique(ids))} of its {len(ids)} ids are repeated")

    def _plausible(self, name: str, a: np.ndarray, rows: np.ndarray | slice) -> np.ndarray:
        """`a`, rows `rows` of column `name`, when every value is one neardup could have written. HDF5's
        Fletcher-32 misses a chunk zeroed together with its checksum (all-zero data sums to zero), so the
        values themselves are checked: unit vectors, 64-hex content hashes, sizes of at least one, keypoint
        descriptors that are not all zero. Raises Damage naming the rows and a photo to index again."""
        if name == "embeddings":
            norms = np.linalg.norm(np.asarray(a, np.float64), axis=1) if a.ndim == 2 else np.ones(0)
            bad = ~(np.abs(norms - 1) <= 1e-3)  # NaN fails too
            what = "vectors that are not unit vectors (zeroed or overwritten)"
        elif name == "sha256":
            c = np.frombuffer(np.ascontiguousarray(a, "S64").tobytes(), np.uint8).reshape(len(a), 64)
            bad = ~(((c >= 48) & (c <= 57)) | ((c >= 97) & (c <= 102))).all(axis=1)  # 0-9, a-f
            what = "content hashes that are not SHA-256 digests"
        elif name in ("sizes", "widths", "heights"):
            bad, what = a < 1, f"{name} below 1"
        elif name in ("local/desc", "local/xy") and len(a):
            if self._count is None:
                self._count = self.column("local/count")
            count = self._count[rows]
            bad = (count >= 8) & ~a.reshape(len(a), -1).any(axis=1)
            what = "keypoints all zero"
        else:
            return a
        if bad.any():
            at = np.arange(self.rows)[rows][bad] if isinstance(rows, slice) else np.asarray(rows)[bad]
            try:
                photo = f"; e.g. {self.paths()[int(at[0])]}"
            except Damage:
                photo = ""
            raise Damage(f"{int(bad.sum())} rows of {name} hold {what}{photo}")
        return a

    def close(self) -> None:
        self._f.close()

    def has(self, name: str) -> bool:
        return name in self._f

    def _strings(self, name: str) -> list[str]:
        ds = self._f[name]
        out = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in ds[()]]
        want = ds.attrs.get("sha256")
        digest = hashlib.sha256(b"\0".join(s.encode("utf-8", "surrogateescape") for s in out)).hexdigest()
        if want is not None and digest != str(want):
            raise Damage(f"checksum mismatch in {name}")
        return out

    def runs(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        yield 0, self.column(name)

    def column(self, name: str) -> np.ndarray:
        try:
            a = self._f[name][()]
        except H5_ERRORS as exc:
            raise Damage(f"{name} cannot be read ({reason_of(exc)})") from None
        return self._plausible(name, a, slice(None))

    def span(self, name: str, start: int, stop: int) -> np.ndarray:
        try:
            a = self._f[name][start:stop]
        except H5_ERRORS as exc:
            raise Damage(f"{name} cannot be read ({reason_of(exc)})") from None
        return self._plausible(name, a, slice(start, start + len(a)))

    def take(self, name: str, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        if len(rows) * 8 > self.rows:
            return self.column(name)[rows]
        uniq, inverse = np.unique(rows, return_inverse=True)
        try:  # one read a row: h5py's point selection costs ~1 ms a row on /local
            got = [self._f[name][int(r)] for r in uniq]
        except H5_ERRORS as exc:
            raise Damage(f"{name} cannot be read ({reason_of(exc)})") from None
        return self._plausible(name, np.stack(got), uniq)[inverse] if got else self.column(name)[:0]

    def paths(self) -> list[str]:
        try:
            return self._strings("paths")
        except H5_ERRORS as exc:
            raise Damage(reason_of(exc)) from None

    def sha256(self) -> list[str]:
        return self.column("sha256").astype("U64").tolist()

    def verify(self) -> None:
        for name in ("ids", "sizes", "mtimes_ns", "sha256", "widths", "heights", "embeddings"):
            self.column(name)
        self.paths()
        if self.local_features:
            for name in ("local/count", "local/xy", "local/desc"):
                self.column(name)


def is_store(path: Path) -> bool:
    """Whether `path` opens as a neardup store (any schema; a sealed manifest's bytes checked first)."""
    try:
        with _open_checked(path) as f:
            return f.attrs.get("format") == FORMAT
    except (Damage, *H5_ERRORS):
        return False


def named(man: Manifest | LegacyFile) -> tuple[set[str], set[str]]:
    """(segment and index-part names, whole-index files) a manifest names."""
    if isinstance(man, LegacyFile):
        return set(), {man.meta.index.file} - {""}
    return ({s.name for s in man.segments} | {s.index for s in man.segments if s.index},
            {man.meta.index.file} - {""})


def unnamed(files: StoreFiles, *kept: Manifest | Path) -> list[Path] | None:
    """The segments and index files that no manifest in `kept` (in memory, or a file) names; None when a
    manifest file exists but cannot be read (what it names is unknown)."""
    names: set[str] = set()
    index_files: set[str] = set()
    for m in kept:
        man: Manifest | LegacyFile
        if isinstance(m, Path):
            if not m.exists():
                continue
            try:
                man = open_any(m)
            except (StoreError, OSError) as exc:
                log.warning("not deleting unused segments: %s cannot be read (%s)", m, exc)
                return None
            if isinstance(man, LegacyFile):
                man.close()
        else:
            man = m
        a, b = named(man)
        names |= a
        index_files |= b
    return files.unnamed(names, index_files)


def remove_unnamed(files: StoreFiles, *kept: Manifest | Path) -> None:
    """Delete the segments and index files that no manifest in `kept` names, under the writer lock. A manifest
    file that exists but cannot be read stops the clean-up (it is said, and the next writer tries again)."""
    for f in unnamed(files, *kept) or ():
        try:
            f.unlink()
        except OSError:
            pass


def moved_on(path: Path, source: Manifest, files: StoreFiles, index: bool = False) -> bool:
    """Whether a file `source` names is gone because a writer has published since (read the manifest again)."""
    gone = [s.name for s in source.segments if not files.segment(s.name).exists()]
    if index:
        gone += [s.index for s in source.segments if s.index and not files.segment_index(s.index).exists()]
    if not gone:
        return False
    try:
        now = open_any(path)
    except StoreError:
        return False
    if isinstance(now, LegacyFile):
        now.close()
    return now.meta.generation != source.meta.generation
