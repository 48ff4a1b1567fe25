"""Index job, options: `IndexOptions`, how an index or update run works (the library's and the CLI's one record)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import DEFAULTS

if TYPE_CHECKING:
    from .ray_job import RayOptions


@dataclass(frozen=True)
class IndexOptions:
    """How an index/update run works: the model, the job's sizes, the FAISS index, repair and compaction.

    One record for the library and the CLI (which builds it once from its options); defaults are
    config.DEFAULTS'. `build_index(roots, store, **fields)` builds one from keywords, so an unknown name is a
    TypeError that names it."""

    model: str | None = None
    weights: str | None = None
    precision: str | None = None
    batch_size: int = DEFAULTS.batch_size
    prune: bool = False
    decode_workers: int = DEFAULTS.decode_workers
    checkpoint_every: int = DEFAULTS.checkpoint_every
    max_file_bytes: int = DEFAULTS.max_file_bytes
    runtime: str | None = None
    preprocess: str | None = None
    require_existing: bool = False  #: refuse a store that does not exist yet (update_index)
    local_features: bool = True  #: a new store caches local features for verification
    ray: RayOptions | None = None
    index: str | None = None
    memory: int | None = None  #: bytes
    target_recall: float | None = None
    repair: bool = False
    compact: bool = False
    drop_missing: bool = False


def options_of(options: IndexOptions | None, fields: dict[str, object]) -> IndexOptions:
    """`options`, or one made of keyword `fields` (not both)."""
    if options is not None and fields:
        raise TypeError(f"give IndexOptions or keyword fields, not both (got {', '.join(sorted(fields))})")
    if options is not None:
        return options
    try:
        return IndexOptions(**fields)  # type: ignore[arg-type]
    except TypeError as exc:
        known = ", ".join(f.name for f in dataclasses.fields(IndexOptions))
        raise TypeError(f"build_index: {exc}; IndexOptions fields are {known}") from None
