"""neardup's store: one object for the HDF5 store — a manifest of immutable, checked segments — and its writer.

`Store(path).current()` (or `Store.open(path)`) is the current `Generation`: meta, catalogue, vectors, local
features, FAISS index, all from one published generation, every block checked as it is read.
`Store(path).writer()` is the one writer (an OS lock): it publishes new segments, tombstones and a new
manifest, compacts when worthwhile, and restores the previous generation. Only this package reads or writes
HDF5. Names are re-exported lazily: importing this package loads nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # what type checkers and editors see (`X as X`: re-exported); at run time each name
    # loads its module on first use (_EXPORTS below; tests/test_package.py checks that the two agree)
    from .faiss_index import build_flat_index as build_flat_index, save_index as save_index, search as search
    from .files import StoreFiles as StoreFiles
    from .generation import Generation as Generation
    from .handle import (
        Store as Store,
        opened as opened,
        read_catalog as read_catalog,
        read_meta as read_meta,
        write_catalog as write_catalog,
    )
    from .meta import (
        Catalog as Catalog,
        IndexInfo as IndexInfo,
        Manifest as Manifest,
        ModelInfo as ModelInfo,
        Segment as Segment,
        StoreMeta as StoreMeta,
    )
    from .publish import Change as Change, Published as Published, Writer as Writer
    from .restore import Restored as Restored

_EXPORTS = {
    **dict.fromkeys(["Store"], ".handle"),
    **dict.fromkeys(["Generation"], ".generation"),
    **dict.fromkeys(["read_catalog", "read_meta", "opened", "write_catalog"], ".handle"),
    **dict.fromkeys(["Catalog", "StoreMeta", "ModelInfo", "IndexInfo", "Manifest", "Segment"], ".meta"),
    **dict.fromkeys(["Change", "Published", "Writer"], ".publish"),
    **dict.fromkeys(["Restored"], ".restore"),
    **dict.fromkeys(["StoreFiles"], ".files"),
    **dict.fromkeys(["build_flat_index", "save_index", "search"], ".faiss_index"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
