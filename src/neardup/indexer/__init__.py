"""neardup indexing, the job: scan → diff → embed_job (or ray_job) → build, publishing into `neardup.store`.

The photos and models it runs are `neardup.embed`'s; the FAISS index is `neardup.store`'s.

The design card's `indexer` package; it lives inside `neardup` because a top-level package of that name
would collide with users' own modules. Names are re-exported lazily: importing this package loads nothing.
A function named like its module (discover) is not re-exported: once the module is imported, Python binds
the package attribute to the module. Import it from its module, or from `neardup`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # what type checkers and editors see (`X as X`: re-exported); at run time each name
    # loads its module on first use (_EXPORTS below; tests/test_package.py checks that the two agree)
    from .build import RunSummary as RunSummary, build_index as build_index, update_index as update_index
    from .options import IndexOptions as IndexOptions

_EXPORTS = {
    **dict.fromkeys(["RunSummary", "build_index", "update_index"], ".build"),
    **dict.fromkeys(["IndexOptions"], ".options"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
