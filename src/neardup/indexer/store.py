"""Indexing stage 6, store: the HDF5 store — embeddings and per-image metadata, self-describing, written atomically.

Layout (schema 1):
  /embeddings  float32 [n, d]  chunked, resizable
  /ids         int64   [n]     stable id per image (also the FAISS id)
  /paths       utf-8   [n]     path relative to the store's folder
  /sizes       int64   [n]     file size in bytes
  /mtimes_ns   int64   [n]     modification time
  /sha256      ascii   [n]     content hash (hex)
  /widths, /heights int32 [n]  upright original image size
  /failures/paths, /failures/reasons  utf-8 [m]
  /local/count int16 [n], /local/xy float16 [n, K, 2], /local/desc uint8 [n, K, 32]   ORB features for
               verification (count -1: not extracted); absent in stores written before them
  attrs: format, schema_version, model, weights, weights_fingerprint, input_size, preprocessing, dim,
         normalization, created, updated, neardup_version, next_id, index_file, index_sha256, runtime,
         precision, quantized_file, calibration, local_features

A published store is never modified in place: writers build a new file beside it and `os.replace` it, so
readers see the old or the new store, never a half-written one. Damage is detected, never served: every
dataset carries HDF5's Fletcher-32 checksum filter (a flipped byte fails the read of its chunk), object
headers carry the checksums of the HDF5 1.10 format, and `index_sha256` is the digest of the FAISS index
file the store names. Stores written before checksums existed stay readable.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import h5py
import numpy as np

from ..config import DEFAULTS, VERSION
from ..errors import StoreError, StoreMismatchError
from ..fileio import atomic_write, check_output_path, now_iso
from .embed import Embedder
from .models import make_embedder
from .files import StoreFiles
from .local_features import LocalTable

log = logging.getLogger(__name__)

FORMAT = "neardup-store"
SCHEMA_VERSION = 1
_STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class StoreMeta:
    """What a store says about itself."""

    model: str
    weights: str
    weights_fingerprint: str
    dim: int
    input_size: int
    preprocessing: str
    normalization: str = "l2"
    created: str = ""
    updated: str = ""
    neardup_version: str = ""
    schema_version: int = SCHEMA_VERSION
    next_id: int = 0
    index_file: str = ""
    index_sha256: str = ""  #: digest of the index file; "" in stores written before it was recorded
    runtime: str = ""  #: what embedded the rows: tf, onnx or numpy (vectors of tf and onnx are interchangeable)
    precision: str = "float32"
    quantized_file: str = ""  #: the int8 model beside the store, calibrated on its images ("" unless int8)
    calibration: str = ""  #: the int8 calibration and its measured agreement with float32
    local_features: str = ""  #: version of the cached local features (local_features.LOCAL_VERSION); "" = none
    # The FAISS index (indexer/index_kinds.py): what was asked for, what was built, and its measured recall.
    index_kind: str = "flat"  #: flat, auto, ivf, hnsw or a FAISS index-factory string
    index_memory: int = 0  #: the memory budget (bytes) auto chose under; 0: none
    index_target: float = 0.95  #: the recall@10 an approximate index is tuned to
    index_factory: str = "Flat"  #: the FAISS index-factory string built
    index_params: str = ""  #: its search knob as tuned ("nprobe=16"); "" for Flat
    index_recall: float = 1.0  #: its recall@10 against exact search at those params (measured at build)
    index_recall_queries: int = 0  #: the held-out store vectors it was measured with (0 for Flat: exact)
    count: int = 0
    failures: int = 0


@dataclass
class Catalog:
    """The rows of a store as column arrays (row i of every array describes one image)."""

    meta: StoreMeta
    ids: np.ndarray  # int64 [n]
    paths: list[str]
    sizes: np.ndarray  # int64 [n]
    mtimes_ns: np.ndarray  # int64 [n]
    sha256: list[str]
    widths: np.ndarray  # int32 [n]
    heights: np.ndarray  # int32 [n]
    xb: np.ndarray | None  # float32 [n, d], None when read without vectors
    failures: list[tuple[str, str]] = field(default_factory=list)
    local: LocalTable | None = None  #: cached local features, when read with them (read_catalog(local=True))

    def __len__(self) -> int:
        return len(self.ids)


def _is_store(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FORMAT
    except OSError:
        return False


def recovery_hint(path: str | os.PathLike[str]) -> str:
    """How to get a usable store back when the one at `path` cannot be read."""
    files = StoreFiles.resolved(path)  # beside the real file, also through a symlink
    if files.previous.is_file() and _is_store(files.previous):
        return (f"the previous generation is kept as {files.previous}: restore it with "
                f"`neardup restore --store {path}`, then `neardup update` to add what changed since")
    if files.previous.is_file():
        return (f"its previous generation {files.previous} is damaged too; move both away and rebuild the store "
                f"with `neardup index DIR --store {path}`")
    return f"no previous generation is kept; move {path} away and rebuild it with `neardup index DIR --store {path}`"


def _damaged(message: str, reason: str) -> StoreError:
    err = StoreError(message)
    err.reason = reason  # without the recovery advice, for callers that give their own
    return err


def open_pinned(path: str | os.PathLike[str]) -> h5py.File:
    """The store at `path` opened read-only and kept open: this generation stays readable through the handle
    after a writer replaces the file (os.replace unlinks the name, not the open file). For warm processes
    (serve) that must answer from one generation while the next is published. Raises StoreError."""
    with _open(Path(path), keep=True) as f:
        _meta(f)  # every attribute and count a reader needs is there
        return f


@contextmanager
def _open(path: Path | h5py.File, keep: bool = False) -> Iterator[h5py.File]:
    """The store at `path` open for reading, checked to be one, with read errors turned into StoreError; closed
    after, unless `keep` (and the block succeeded). A pinned h5py.File is used as it is and never closed."""
    if isinstance(path, h5py.File):  # a pinned generation (open_pinned): read it, never close it here
        try:
            yield path
        except (KeyError, OSError, ValueError) as exc:
            raise _damaged(f"{path.filename} is damaged ({str(exc)[:160]})", str(exc)[:160]) from None
        return
    path = Path(path)
    if not path.exists():
        raise StoreError(f"no store at {path}")
    if path.is_dir():
        raise StoreError(f"{path} is a folder; give the store's file name (e.g. {path / DEFAULTS.store})")
    kept = False
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        why = str(exc).splitlines()[0][:120]
        if h5py.is_hdf5(path) or path.suffix in (".h5", ".hdf5", ".prev"):
            raise _damaged(f"{path} is not a readable HDF5 file ({why}); {recovery_hint(path)}", why) from None
        raise _damaged(f"{path} is not a readable HDF5 file ({why})", why) from None
    try:
        if f.attrs.get("format") != FORMAT:
            raise StoreError(f"{path} is an HDF5 file but not a neardup store")
        schema = int(f.attrs.get("schema_version", -1))
        if schema != SCHEMA_VERSION:
            raise StoreError(f"{path} has store schema {schema}; this neardup reads schema {SCHEMA_VERSION}")
        yield f
        kept = keep
    except (KeyError, OSError, ValueError) as exc:  # a checksum failure is an OSError of the read
        why = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        if "filter returned failure" in why:  # HDF5's words for a Fletcher-32 mismatch
            why = f"a checksum does not match: {why}"
        raise _damaged(f"{path} is damaged or incomplete ({why}); {recovery_hint(path)}", why) from None
    finally:
        if not kept:
            f.close()


def _meta(f: h5py.File) -> StoreMeta:
    a = f.attrs
    return StoreMeta(
        model=str(a["model"]), weights=str(a["weights"]), weights_fingerprint=str(a["weights_fingerprint"]),
        dim=int(a["dim"]), input_size=int(a["input_size"]), preprocessing=str(a["preprocessing"]),
        normalization=str(a["normalization"]), created=str(a["created"]), updated=str(a["updated"]),
        neardup_version=str(a["neardup_version"]), schema_version=int(a["schema_version"]),
        next_id=int(a["next_id"]), index_file=str(a["index_file"]), index_sha256=str(a.get("index_sha256", "")),
        runtime=str(a.get("runtime", "")), precision=str(a.get("precision", "float32")),
        quantized_file=str(a.get("quantized_file", "")), calibration=str(a.get("calibration", "")),
        local_features=str(a.get("local_features", "")) if "local" in f else "", count=int(f["ids"].shape[0]),
        failures=int(f["failures/paths"].shape[0]),
        **{k: type(v)(a.get(k, v)) for k, v in _INDEX_DEFAULTS.items()})  # absent in stores made before them


#: The index_* attributes and their defaults (a store written before them has a flat index).
_INDEX_DEFAULTS = {f.name: f.default for f in fields(StoreMeta) if f.name.startswith("index_")
                   and f.name not in ("index_file", "index_sha256")}


def read_meta(path: str | os.PathLike[str] | h5py.File) -> StoreMeta:
    """Read only the attributes and counts of a store. Raises StoreError."""
    with _open(path) as f:
        return _meta(f)


def _strings_digest(strings: list[str]) -> str:
    return hashlib.sha256(b"\0".join(s.encode("utf-8", "surrogateescape") for s in strings)).hexdigest()


def _strings(ds: h5py.Dataset) -> list[str]:
    out = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in ds[()]]
    want = ds.attrs.get("sha256")
    if want is not None and _strings_digest(out) != str(want):
        raise ValueError(f"checksum mismatch in {ds.name}")
    return out


def _rows(ds: h5py.Dataset, rows: np.ndarray | None) -> np.ndarray:
    """`ds[rows]` (all rows for None), in the order asked, repeats allowed."""
    if rows is None or len(rows) * 8 > len(ds):  # many rows: one sequential read beats a point selection
        whole = ds[()]
        return whole if rows is None else whole[rows]
    uniq, inverse = np.unique(rows, return_inverse=True)
    if not len(uniq):
        return ds[0:0]
    # one read per row: h5py's point selection (ds[list]) costs ~1 ms a row on /local (measured: 10 rows of
    # a 4-row-chunked /local/desc in 11 ms that way, 1.1 ms row by row)
    return np.stack([ds[int(r)] for r in uniq])[inverse]


def _local(f: h5py.File, rows: np.ndarray | None = None) -> LocalTable:
    g = f["local"]
    return LocalTable(_rows(g["count"], rows), _rows(g["xy"], rows), _rows(g["desc"], rows))


def read_local(path: str | os.PathLike[str] | h5py.File, rows: np.ndarray | None = None,
               sha256: list[str] | None = None) -> LocalTable | None:
    """The cached local features of `rows` (default: all) of a store, or None when it has none. With `sha256`
    (the content hashes the caller's catalogue has for those rows), a row whose hash differs in the store read
    now (replaced by an update since) comes back as not extracted (count -1), never as another photo's.
    `path` may be a pinned generation (open_pinned). Raises StoreError (a checksum failure included)."""
    with _open(path) as f:
        meta = _meta(f)
        if not meta.local_features:
            return None
        rows = np.arange(meta.count) if rows is None else np.asarray(rows, np.int64)
        valid = (rows >= 0) & (rows < meta.count)
        if not meta.count:
            return LocalTable.empty(len(rows))
        safe = np.where(valid, rows, 0)
        table = _local(f, safe)
        if sha256 is not None:  # the hashes of the rows read, not of the whole store (a query reads ten)
            now = _rows(f["sha256"], safe)
            valid &= now == np.array(sha256, dtype="S64")
        table.count[~valid] = -1
        return table


def read_vectors(path: str | os.PathLike[str] | h5py.File, rows: np.ndarray, index_file: str) -> np.ndarray:
    """The stored vectors of `rows` (one read a row), from the generation that names `index_file` (the one the
    caller's rows came from); StoreError when another generation is there now. `path` may be pinned."""
    with _open(path) as f:
        if str(f.attrs["index_file"]) != index_file:
            raise StoreError(f"{path} was updated during the search; run it again")
        return _rows(f["embeddings"], np.asarray(rows, np.int64)).astype(np.float32, copy=False)


def read_catalog(path: str | os.PathLike[str], *, vectors: bool = True, local: bool = False) -> Catalog:
    """Read a whole store into memory (embeddings only when `vectors`, local features only when `local` and
    the store has them). Raises StoreError."""
    with _open(Path(path)) as f:
        meta = _meta(f)
        xb = f["embeddings"][()].astype(np.float32, copy=False) if vectors else None
        if xb is not None and xb.shape != (meta.count, meta.dim):
            raise StoreError(f"{path} is damaged: embeddings {xb.shape} for {meta.count} rows of dim {meta.dim}")
        return Catalog(
            meta=meta, ids=f["ids"][()].astype(np.int64), paths=_strings(f["paths"]),
            sizes=f["sizes"][()].astype(np.int64), mtimes_ns=f["mtimes_ns"][()].astype(np.int64),
            sha256=_strings(f["sha256"]), widths=f["widths"][()].astype(np.int32),
            heights=f["heights"][()].astype(np.int32), xb=xb,
            failures=list(zip(_strings(f["failures/paths"]), _strings(f["failures/reasons"]))),
            local=_local(f) if local and meta.local_features else None)


def write_catalog(path: str | os.PathLike[str], cat: Catalog,
                  before_replace: Callable[[], object] | None = None) -> StoreMeta:
    """Write `cat` as a complete store at `path`, atomically (`before_replace`: see atomic_write). Returns the
    meta written."""
    path = Path(path)
    check_output_path(path)
    n, d = len(cat), cat.meta.dim
    if cat.xb is None or cat.xb.shape != (n, d):
        raise ValueError(f"embeddings must be [{n}, {d}]")
    meta = replace(cat.meta, count=n, failures=len(cat.failures), neardup_version=VERSION,
                   local_features=cat.meta.local_features if cat.local is not None else "",
                   updated=now_iso(), created=cat.meta.created or now_iso())

    def column(f: h5py.Group, name: str, data: np.ndarray, **kw) -> None:
        # chunked (the checksum filter needs chunks), resizable, Fletcher-32 on every chunk; HDF5 filters
        # cannot apply to variable-length strings, so those carry a digest attribute instead
        if kw.get("dtype") is _STR:
            ds = f.create_dataset(name, data=data, maxshape=(None,), **kw)
            ds.attrs["sha256"] = _strings_digest(list(data))
        else:
            f.create_dataset(name, data=data, maxshape=(None, *data.shape[1:]), fletcher32=True, **kw)

    def write(tmp: str) -> None:
        with h5py.File(tmp, "w", libver=("v110", "latest")) as f:
            column(f, "embeddings", np.asarray(cat.xb, np.float32).reshape(n, d), chunks=(max(1, min(n, 256)), d))
            column(f, "ids", np.asarray(cat.ids, np.int64), chunks=True)
            column(f, "paths", np.array(cat.paths, dtype=object), dtype=_STR, chunks=True)
            column(f, "sizes", np.asarray(cat.sizes, np.int64), chunks=True)
            column(f, "mtimes_ns", np.asarray(cat.mtimes_ns, np.int64), chunks=True)
            column(f, "sha256", np.array(cat.sha256, dtype="S64").reshape(n), chunks=True)
            column(f, "widths", np.asarray(cat.widths, np.int32), chunks=True)
            column(f, "heights", np.asarray(cat.heights, np.int32), chunks=True)
            g = f.create_group("failures")
            column(g, "paths", np.array([p for p, _ in cat.failures], dtype=object), dtype=_STR, chunks=True)
            column(g, "reasons", np.array([r for _, r in cat.failures], dtype=object), dtype=_STR, chunks=True)
            if cat.local is not None:
                lt = cat.local
                if len(lt) != n:
                    raise ValueError(f"local features must have {n} rows")
                g = f.create_group("local")
                # 4 rows a chunk (64 kB of descriptors): a query verifies 10 rows scattered over the store, and each
                # row read decodes and checksums its whole chunk (64 rows: 8 ms for 10 rows; 4 rows: 1.1 ms)
                rows = max(1, min(n, 4))
                column(g, "count", np.asarray(lt.count, np.int16), chunks=True)
                column(g, "xy", np.asarray(lt.xy, np.float16), chunks=(rows, *lt.xy.shape[1:]))
                column(g, "desc", np.asarray(lt.desc, np.uint8), chunks=(rows, *lt.desc.shape[1:]))
            for key, value in (("format", FORMAT), ("schema_version", SCHEMA_VERSION), ("model", meta.model),
                               ("weights", meta.weights), ("weights_fingerprint", meta.weights_fingerprint),
                               ("dim", d), ("input_size", meta.input_size), ("preprocessing", meta.preprocessing),
                               ("normalization", meta.normalization), ("created", meta.created),
                               ("updated", meta.updated), ("neardup_version", meta.neardup_version),
                               ("next_id", meta.next_id), ("index_file", meta.index_file),
                               ("index_sha256", meta.index_sha256), ("runtime", meta.runtime),
                               ("precision", meta.precision), ("quantized_file", meta.quantized_file),
                               ("calibration", meta.calibration), ("local_features", meta.local_features),
                               *((k, getattr(meta, k)) for k in _INDEX_DEFAULTS)):
                f.attrs[key] = value

    atomic_write(path, write, before_replace)
    return meta


def check_embedder(meta: StoreMeta, emb: Embedder, store: str | os.PathLike[str]) -> None:
    """Refuse an embedder whose vectors cannot be compared with the store's: another model, dimension or
    weights fingerprint. The one place this rule lives (indexing and querying both call it)."""
    if meta.model == "onnx" and emb.preprocessing != meta.preprocessing:  # a user's model: its preprocessing
        raise StoreMismatchError(f"{store} was made with the preprocessing {meta.preprocessing}; the model given "
                                 f"uses {emb.preprocessing}")
    if emb.name != meta.model or emb.dim != meta.dim or emb.weights_fingerprint != meta.weights_fingerprint:
        raise StoreMismatchError(
            f"{store} was made with {meta.model} (dim {meta.dim}, weights {meta.weights_fingerprint}); "
            f"the model given is {emb.name} (dim {emb.dim}, weights {emb.weights_fingerprint})")


def store_embedder(meta: StoreMeta, store: str | os.PathLike[str], *, weights: str | None = None,
                   precision: str = DEFAULTS.precision, embedder: Embedder | None = None,
                   runtime: str | None = None) -> Embedder:
    """The embedder a store was built with (its model, its weights unless others are given, its onnx
    preprocessing, its int8 file), checked against the store; an injected `embedder` is checked the same way.
    `runtime` may differ from the store's: TensorFlow and ONNX Runtime vectors are interchangeable."""
    if meta.precision == "int8":
        precision = "int8"  # the store's calibrated model, whatever the default
    quantized = StoreFiles(Path(store)).index(meta.quantized_file) if meta.quantized_file else None
    if quantized is not None and not quantized.is_file() and embedder is None:
        raise StoreError(f"the int8 model of {store} is missing ({quantized}); it was calibrated on this store's "
                         f"images, so rebuild the store with `neardup index DIR --precision int8`")
    emb = embedder or make_embedder(meta.model, weights or meta.weights, precision, runtime=runtime,
                                    preprocess=meta.preprocessing if meta.model == "onnx" else None,
                                    quantized=quantized)
    check_embedder(meta, emb, store)
    return emb
