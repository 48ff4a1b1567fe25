"""Store, meta: what a store says about itself (StoreMeta: its ModelInfo, its IndexInfo and bookkeeping), its rows
as columns (Catalog), and its manifest. On disk the meta is one flat set of attributes (FLAT), as it always was.

A generation of a store is a manifest: the meta, the list of immutable segments with the digest of each,
the tombstones (rows of those segments that are no longer live) and the files that could not be indexed.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from ..features import LocalTable

FORMAT = "neardup-store"
SEGMENT_FORMAT = "neardup-segment"
#: 1: one HDF5 file holding every row (neardup before segments; read, and upgraded by the next update).
#: 2: a manifest naming append-only segments.
SCHEMA_VERSION = 2
LEGACY_SCHEMA = 1


@dataclass(frozen=True)
class ModelInfo:
    """What embedded a store's rows: the vectors of two stores compare only when these agree."""

    name: str  #: the model's name ("resnet50", "phash", "onnx", ...)
    weights: str
    weights_fingerprint: str
    dim: int
    input_size: int
    preprocessing: str
    normalization: str = "l2"
    runtime: str = ""  #: what embedded the rows: tf, onnx or numpy (vectors of tf and onnx are interchangeable)
    precision: str = "float32"
    quantized_file: str = ""  #: the int8 model beside the store, calibrated on its images ("" unless int8)
    quantized_sha256: str = ""  #: its digest, checked before it embeds anything
    calibration: str = ""  #: the int8 calibration and its measured agreement with float32


@dataclass(frozen=True)
class IndexInfo:
    """The FAISS index (store/index_kinds.py): what was asked for, what was built, and its measured recall."""

    kind: str = "flat"  #: flat, auto, ivf, hnsw or a FAISS index-factory string
    memory: int = 0  #: the memory budget (bytes) auto chose under; 0: none
    target: float = 0.95  #: the recall@10 an approximate index is tuned to
    factory: str = "Flat"  #: the FAISS index-factory string built
    params: str = ""  #: its search knob as tuned ("nprobe=16"); "" for Flat
    recall: float = 1.0  #: its recall@10 against exact search at those params (measured at build)
    recall_queries: int = 0  #: the held-out store vectors it was measured with (0 for Flat: exact)
    file: str = ""  #: a whole-index file (HNSW, or a store written before segments); "" otherwise
    sha256: str = ""  #: its digest


#: The flat names a manifest (and a segment, and a store written before segments) records, by part: the parts'
#: fields, index ones prefixed "index_" ("model" is ModelInfo.name).
_MODEL_NAMES = {("model" if f.name == "name" else f.name): f.name for f in fields(ModelInfo)}
_INDEX_NAMES = {f"index_{f.name}": f.name for f in fields(IndexInfo)}


@dataclass(frozen=True)
class StoreMeta:
    """What a store says about itself: its model, its index, and the bookkeeping of its generations."""

    model: ModelInfo
    index: IndexInfo = IndexInfo()
    created: str = ""
    updated: str = ""
    neardup_version: str = ""
    schema_version: int = SCHEMA_VERSION
    next_id: int = 0
    generation: str = ""  #: 12 hex digits, new at every publish ("" in a store written before segments)
    local_features: str = ""  #: version of the cached local features (local_features.LOCAL_VERSION); "" = none
    count: int = 0  #: live rows
    failures: int = 0

    def flat(self) -> dict[str, Any]:
        """Every attribute under the flat name the store's files (and `info --json`) use, in their order."""
        return {k: (getattr(self.model, _MODEL_NAMES[k]) if k in _MODEL_NAMES else
                    getattr(self.index, _INDEX_NAMES[k]) if k in _INDEX_NAMES else getattr(self, k))
                for k in FLAT}

    @classmethod
    def of_flat(cls, values: dict[str, Any]) -> StoreMeta:
        """The meta of flat attributes (see flat()); index ones missing take their defaults (a store written
        before them has a flat index). Raises TypeError for an unknown name or a missing model attribute."""
        unknown = set(values) - set(_MODEL_NAMES) - set(_INDEX_NAMES) - set(_OWN)
        if unknown:
            raise TypeError(f"not a store attribute: {', '.join(sorted(unknown))}")
        return cls(model=ModelInfo(**{f: values[k] for k, f in _MODEL_NAMES.items() if k in values}),
                   index=IndexInfo(**{f: values[k] for k, f in _INDEX_NAMES.items() if k in values}),
                   **{k: v for k, v in values.items() if k in _OWN})

    def with_flat(self, **changes: Any) -> StoreMeta:
        """A copy with attributes changed by their flat names (`index_factory="Flat"`, `next_id=7`)."""
        return StoreMeta.of_flat({**self.flat(), **changes})


_OWN = tuple(f.name for f in fields(StoreMeta) if f.name not in ("model", "index"))
#: The flat attributes in the order the store's files and `info --json` have always listed them.
FLAT = ("model", "weights", "weights_fingerprint", "dim", "input_size", "preprocessing", "normalization", "created",
        "updated", "neardup_version", "schema_version", "next_id", "generation", "index_file", "index_sha256",
        "runtime", "precision", "quantized_file", "quantized_sha256", "calibration", "local_features", "index_kind",
        "index_memory", "index_target", "index_factory", "index_params", "index_recall", "index_recall_queries",
        "count", "failures")
assert set(FLAT) == {*_MODEL_NAMES, *_INDEX_NAMES, *_OWN}, "FLAT names every attribute once"
#: The flat attributes a manifest records (count and failures are counted, not recorded).
RECORDED = FLAT[:-2]
#: The type of each flat attribute (HDF5 attributes are read back as numpy scalars).
KINDS: dict[str, type] = {k: type(v) for k, v in StoreMeta(ModelInfo("", "", "", 0, 0, "")).flat().items()}
#: The index_* attributes and their defaults (a store written before them has a flat index).
INDEX_DEFAULTS = {k: getattr(IndexInfo(), f) for k, f in _INDEX_NAMES.items()
                  if k not in ("index_file", "index_sha256")}


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


@dataclass(frozen=True)
class Segment:
    """One immutable segment as a manifest names it."""

    name: str  #: 12 hex digits: the file `<store>.segments/<name>.h5`
    rows: int  #: rows written (live or not)
    sha256: str  #: root digest: the segment's attributes and the digest of every block of every column
    index: str = ""  #: its part of an approximate index: `<store>.segments/<index>.faiss` ("" for none)
    index_sha256: str = ""  #: that file's digest
    #: the digest of the segment file's bytes but its large columns' chunk data, checked before HDF5 parses it
    #: ("": written before segments had one; the next writer adds it)
    file_sha256: str = ""
    file_bytes: int = 0  #: the segment file's size
    file_data: tuple[tuple[int, int], ...] = ()  #: the byte ranges file_sha256 leaves out (chunk data)


@dataclass
class Manifest:
    """One published generation: meta, segments in row order, tombstones, failures."""

    meta: StoreMeta
    segments: list[Segment]
    #: per segment name, the rows (of that segment) that are deleted: sorted int64 arrays
    dead: dict[str, np.ndarray] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    parent: str = ""  #: the generation this one was published over ("" for the first)

    def live(self, seg: Segment) -> np.ndarray:
        """Bool mask [seg.rows] of the live rows of `seg`."""
        mask = np.ones(seg.rows, bool)
        mask[self.dead.get(seg.name, np.zeros(0, np.int64))] = False
        return mask

    @property
    def count(self) -> int:
        """Live rows."""
        return sum(s.rows for s in self.segments) - self.dead_rows

    @property
    def dead_rows(self) -> int:
        """Rows written but deleted since (reclaimed by compaction)."""
        return sum(len(v) for v in self.dead.values())
