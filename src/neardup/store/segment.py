"""Store, segment: immutable segments on disk, every byte that decides an answer checked (h5py, with manifest).

A segment is an immutable HDF5 file of rows: `ids`, `paths` (UTF-8, NUL-separated), `sizes`, `mtimes_ns`,
`sha256`, `widths`, `heights`, `embeddings` [n, d] and, when cached, `local/{count,xy,desc}`. Each column is
cut into blocks of rows (one HDF5 chunk each; the small columns are one block) and `digests/<column>` holds
the SHA-256 of every block. The segment's root digest covers its attributes and every digest table; the
manifest records it. So a reader checks the root once when it opens a segment (a few kB of digests), keeps
the tables in memory, and checks each block it reads against them: a zeroed chunk, a truncated file or one
rewritten in place is found on the first read that touches it, and never served. (HDF5's Fletcher-32 is
not enough: a chunk zeroed together with its checksum passes it.)
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import h5py
import numpy as np

from ..config import DEFAULTS
from ..errors import StoreError
from ..fileio import atomic_write, ensure_space
from .h5io import H5_ERRORS, check_file, file_digest, h5_create
from .meta import SEGMENT_FORMAT, Catalog, Segment

#: Bytes of a block of the large columns (embeddings: 32 rows of 2048-d): a scattered row read costs one
#: block read and digest (~0.2 ms), a whole read runs at the disk's and SHA-256's speed.
BLOCK_BYTES = 256 << 10
#: Rows of a local-features block: a query verifies ~10 rows scattered over the store (4 rows: 64 kB a read).
LOCAL_BLOCK_ROWS = 4
#: The columns of a segment, in the order they are written; the small ones are one block.
SMALL = ("ids", "paths", "sizes", "mtimes_ns", "sha256", "widths", "heights", "local/count")
LARGE = ("embeddings", "local/xy", "local/desc")


class Damage(StoreError):
    """Data that does not match its digest, or cannot be read: `reason` says what (no recovery advice), and
    `segment` names the segment it is in ("" for the manifest, or a store written before segments)."""

    def __init__(self, reason: str, segment: str = "") -> None:
        super().__init__(reason)
        self.reason, self.segment = reason, segment


def reason_of(exc: BaseException) -> str:
    text = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return f"a checksum does not match: {text}" if "filter returned failure" in text else text


def plain(v: object) -> object:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, bytes):
        return v.decode("utf-8", "surrogateescape")
    return v


def attrs_of(obj: h5py.HLObject, skip: tuple[str, ...] = ()) -> dict[str, object]:
    return {k: plain(v) for k, v in obj.attrs.items() if k not in skip}


def canonical(attrs: dict[str, object]) -> bytes:
    return json.dumps(attrs, sort_keys=True, ensure_ascii=True).encode()


def blob(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8", "surrogateescape"), np.uint8)


def text_of(a: np.ndarray) -> str:
    return a.tobytes().decode("utf-8", "surrogateescape")


# ------------------------------------------------------------------------------------------------- segments

def block_rows(name: str, row_bytes: int, n: int) -> int:
    """Rows per digest block (and HDF5 chunk) of column `name`: the whole column for the small ones."""
    if name in SMALL:
        return max(n, 1)
    if name.startswith("local/"):
        return LOCAL_BLOCK_ROWS
    return max(1, BLOCK_BYTES // max(row_bytes, 1))


def _root(attrs: dict[str, object], tables: dict[str, tuple[str, tuple[int, ...], int, np.ndarray]]) -> str:
    """The segment's root digest: its attributes and, per column, dtype, shape, block rows and digest table."""
    h = hashlib.sha256(canonical(attrs))
    for name in sorted(tables):
        dtype, shape, block, table = tables[name]
        h.update(f"\0{name}\0{dtype}\0{shape}\0{block}\0".encode())
        h.update(np.ascontiguousarray(table, np.uint8).data)
    return h.hexdigest()


def segment_columns(cat: Catalog, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The columns of a segment holding `rows` of `cat` (default: all), as arrays in the stored dtypes."""
    sel = slice(None) if rows is None else np.asarray(rows, np.int64)
    pick = (lambda xs: list(xs)) if rows is None else (lambda xs: [xs[i] for i in sel.tolist()])
    n = len(cat.ids[sel])
    if cat.xb is None:
        raise ValueError("a segment needs the rows' vectors")
    cols = {"ids": np.asarray(cat.ids[sel], np.int64), "paths": pick(cat.paths),
            "sizes": np.asarray(cat.sizes[sel], np.int64), "mtimes_ns": np.asarray(cat.mtimes_ns[sel], np.int64),
            "sha256": np.array(pick(cat.sha256), dtype="S64").reshape(n),
            "widths": np.asarray(cat.widths[sel], np.int32), "heights": np.asarray(cat.heights[sel], np.int32),
            "embeddings": np.ascontiguousarray(cat.xb[sel], np.float32).reshape(n, cat.meta.model.dim)}
    if cat.local is not None:
        cols.update({"local/count": np.asarray(cat.local.count[sel], np.int16),
                     "local/xy": np.asarray(cat.local.xy[sel], np.float16),
                     "local/desc": np.asarray(cat.local.desc[sel], np.uint8)})
    return cols


class _Digester:
    """SHA-256 of each block of `block` rows of a column fed in pieces of any length."""

    def __init__(self, block: int) -> None:
        self.block, self.done, self.h = block, 0, hashlib.sha256()
        self.digests: list[bytes] = []

    def feed(self, a: np.ndarray) -> None:
        at = 0
        while at < len(a):
            take = min(self.block - self.done, len(a) - at)
            self.h.update(np.ascontiguousarray(a[at:at + take]).data)
            at, self.done = at + take, self.done + take
            if self.done == self.block:
                self.digests.append(self.h.digest())
                self.h, self.done = hashlib.sha256(), 0

    def table(self) -> np.ndarray:
        if self.done or not self.digests:
            self.digests.append(self.h.digest())
            self.h, self.done = hashlib.sha256(), 0
        return np.frombuffer(b"".join(self.digests), np.uint8).reshape(-1, 32)


def write_segment(path: Path, n: int, dim: int, local_features: str, created: str,
                  pieces: Iterable[dict[str, np.ndarray | list[str]]], meta: str = "") -> Segment:
    """Write an immutable segment of n rows atomically from `pieces` (segment_columns of consecutive rows,
    in order: memory is one piece, whatever n), and return its manifest entry. With `local_features` the
    pieces carry local/* columns. `meta` (JSON) is the store's meta as it was written: with it, a manifest
    that is lost can be rebuilt from its segments (repair.rebuild)."""
    if n <= 0:
        raise ValueError("a segment holds at least one row")
    k = DEFAULTS.local_keypoints
    large = {"embeddings": ((dim,), np.float32)}
    if local_features:
        large.update({"local/xy": ((k, 2), np.float16), "local/desc": ((k, 32), np.uint8)})
    attrs = {"format": SEGMENT_FORMAT, "rows": n, "dim": dim, "local_features": local_features, "created": created,
             **({"meta": meta} if meta else {})}
    # an upper bound of the file's size: the columns (paths at 256 bytes), their digests and HDF5's own
    row = 4 * dim + 256 + 48 + (k * 2 * 2 + k * 32 + 2 if local_features else 0)
    ensure_space(path, n * row * 1.05 + (1 << 20))

    def write(tmp: str) -> Segment:
        small: dict[str, list] = {}
        digest = {}
        with h5_create(tmp, path) as (f, guard):  # a full disk: an OSError after HDF5 closed the file (h5io)
            for name, (shape, dt) in large.items():
                rows = block_rows(name, int(np.prod(shape)) * np.dtype(dt).itemsize, n)
                f.create_dataset(name, shape=(n, *shape), dtype=dt, chunks=(min(rows, n), *shape))
                digest[name] = _Digester(rows)
            at = 0
            for piece in pieces:
                m = len(piece["ids"])
                if at + m > n:
                    raise ValueError(f"more than the {n} rows announced")
                for name, a in piece.items():
                    if name in large:
                        if len(a) != m:
                            raise ValueError(f"column {name} has {len(a)} rows, not {m}")
                        f[name][at:at + m] = a
                        digest[name].feed(np.asarray(a, large[name][1]))
                    else:
                        small.setdefault(name, []).append(a)
                at += m
                guard.check()  # the disk filled: stop now
            if at != n:
                raise ValueError(f"{at} rows written of the {n} announced")
            cols = {name: (blob("\0".join(p for part in parts for p in part)) if name == "paths"
                           else np.concatenate(parts)) for name, parts in small.items()}
            for name, a in cols.items():
                if name != "paths" and len(a) != n:
                    raise ValueError(f"column {name} has {len(a)} rows, not {n}")
                f.create_dataset(name, data=a)
                digest[name] = _Digester(max(len(a), 1))
                digest[name].feed(a)
            tables = {}
            for name, d in digest.items():
                ds = f[name]
                tables[name] = (ds.dtype.str, tuple(ds.shape), d.block, d.table())
                f.create_dataset(f"digests/{name}", data=tables[name][3])
                f[f"digests/{name}"].attrs["block"] = d.block
            for key, v in attrs.items():
                f.attrs[key] = v
        sha, size, data = file_digest(tmp, LARGE)
        return Segment(name=path.stem, rows=n, sha256=_root(attrs, tables), file_sha256=sha, file_bytes=size,
                       file_data=data)

    return atomic_write(path, write)


class SegmentFile:
    """A segment opened for reading: its root checked against the manifest's digest, then every block read
    checked against the digest tables held in memory. Raises Damage."""

    def __init__(self, path: Path, sha256: str | None, seg: Segment | None = None) -> None:
        """`sha256` None: no manifest to check the root against (a rebuild: `root` is what it computes).
        `seg`: its manifest entry, whose file digest is checked first (when it has one)."""
        self.path = path
        if seg is not None and seg.file_sha256:  # the bytes first: HDF5 never parses a damaged file (it has
            try:                                  # looped forever on one)
                check_file(path, seg.file_sha256, seg.file_bytes, seg.file_data)
            except ValueError as exc:
                raise Damage(f"segment {path.name}: {exc}", self.path.stem) from None
            except OSError as exc:
                raise Damage(f"segment {path.name} cannot be read ({reason_of(exc)})", self.path.stem) from None
        try:
            self._f = h5py.File(path, "r")
        except H5_ERRORS as exc:
            raise Damage(f"segment {path.name} cannot be read ({reason_of(exc)})", self.path.stem) from None
        try:
            attrs = attrs_of(self._f)
            if attrs.get("format") != SEGMENT_FORMAT:
                raise Damage(f"{path.name} is not a neardup segment", self.path.stem)
            self.tables: dict[str, tuple[str, tuple[int, ...], int, np.ndarray]] = {}
            for name in (*SMALL, "paths", *LARGE):
                if name in self._f and name not in self.tables:
                    ds, dg = self._f[name], self._f[f"digests/{name}"]
                    self.tables[name] = (ds.dtype.str, tuple(ds.shape), int(dg.attrs["block"]), dg[()])
            self.attrs, self.root = attrs, _root(attrs, self.tables)
            if sha256 is not None and self.root != sha256:
                raise Damage(f"segment {path.name} does not match the digest its manifest recorded", self.path.stem)
            self.rows, self.dim = int(attrs["rows"]), int(attrs["dim"])
            self.local_features = str(attrs.get("local_features", ""))
        except H5_ERRORS as exc:
            self._f.close()
            raise Damage(f"segment {path.name} is damaged ({reason_of(exc)})", self.path.stem) from None
        except Damage:
            self._f.close()
            raise

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> SegmentFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def has(self, name: str) -> bool:
        """Whether the segment holds column `name`."""
        return name in self.tables

    def _read(self, name: str, start_block: int, stop_block: int) -> np.ndarray:
        """Blocks [start, stop) of a column, each checked against its digest."""
        _, _, block, table = self.tables[name]
        try:
            a = self._f[name][start_block * block:stop_block * block]
        except H5_ERRORS as exc:
            raise Damage(f"segment {self.path.name}: {name} cannot be read ({reason_of(exc)})",
                         self.path.stem) from None
        for b in range(start_block, stop_block):
            part = np.ascontiguousarray(a[(b - start_block) * block:(b - start_block + 1) * block])
            if hashlib.sha256(part.data).digest() != table[b].tobytes():
                raise Damage(f"segment {self.path.name}: block {b} of {name} does not match its digest", self.path.stem)
        return a

    def runs(self, name: str) -> Iterator[tuple[int, np.ndarray]]:
        """A whole column in checked runs of ~64 MB: (first row, rows)."""
        dtype, shape, block, table = self.tables[name]
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        run = max(1, (64 << 20) // max(1, block * row_bytes))
        for b in range(0, len(table) if shape[0] else 0, run):
            yield b * block, self._read(name, b, min(b + run, len(table)))

    def column(self, name: str) -> np.ndarray:
        """A whole column, checked."""
        dtype, shape, _, _ = self.tables[name]
        parts = [a for _, a in self.runs(name)]
        if not parts:
            return np.zeros(shape, np.dtype(dtype))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def take(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows of a column (any order, repeats allowed), reading and checking only the blocks they lie in."""
        rows = np.asarray(rows, np.int64)
        dtype, shape, block, _ = self.tables[name]
        if not len(rows):
            return np.zeros((0, *shape[1:]), np.dtype(dtype))
        if block >= shape[0] or len(rows) * 4 > shape[0] // max(block, 1):  # many rows: read it all
            return self.column(name)[rows]
        blocks = np.unique(rows // block)
        got = {int(b): self._read(name, int(b), int(b) + 1) for b in blocks}
        return np.stack([got[int(r // block)][int(r % block)] for r in rows.tolist()])

    def span(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a column, reading and checking the blocks they lie in."""
        block = self.tables[name][2]
        b0, b1 = start // block, -(-stop // block)
        return self._read(name, b0, b1)[start - b0 * block:stop - b0 * block]

    def paths(self) -> list[str]:
        """The rows' paths."""
        text = text_of(self.column("paths"))
        return text.split("\0") if self.rows else []

    def sha256(self) -> list[str]:
        """The rows' content hashes (hex)."""
        return self.column("sha256").astype("U64").tolist()

    def verify(self) -> None:
        """Read and check every block of every column (info --check)."""
        for name in self.tables:
            self.column(name)
