"""neardup: near-duplicate image search for product catalogues.

The public API, importable from here (each name loads its module on first use, so `import neardup` is cheap):

    from neardup import IndexOptions, answer, build_index, find_duplicates
    summary = build_index(["photos/"], "catalog.h5", IndexOptions(model="phash"))
    found = answer("catalog.h5", ["new.jpg"], k=5)  # an Answer: .results, .to_json()
    report = find_duplicates("catalog.h5", threshold=0.9)

Layers, bottom up: `errors`, `config`, `fileio`, `threads`, `features` → `embed` (discover → decode → embedders
→ models → pipeline) beside `store` (the FAISS index, segments, manifest, Generation, the writer), neither
importing the other → `store_embedder` (the glue) → the index job (`indexer`: scan → diff → build) → `search`
(query → duplicates → report / evaluate) → `demo`, `serve` → `cli`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports
from .config import VERSION as __version__

if TYPE_CHECKING:  # what type checkers and editors see (`X as X`: re-exported); at run time each name
    # loads its module on first use (_EXPORTS below; tests/test_package.py checks that the two agree)
    from .config import (
        DEFAULTS as DEFAULTS,
        MODEL_TABLE as MODEL_TABLE,
        MODELS as MODELS,
        ModelSpec as ModelSpec,
        default_threshold as default_threshold,
        model_spec as model_spec,
        resolve_threshold as resolve_threshold,
    )
    from .embed.embedders import Embedder as Embedder
    from .embed.models import make_embedder as make_embedder
    from .embed.onnx_runtime import OnnxPreprocess as OnnxPreprocess
    from .errors import (
        DecodeError as DecodeError,
        InputError as InputError,
        NeardupError as NeardupError,
        StoreError as StoreError,
        StoreLockedError as StoreLockedError,
        StoreMismatchError as StoreMismatchError,
        WeightsError as WeightsError,
    )
    from .indexer.build import RunSummary as RunSummary, build_index as build_index, update_index as update_index
    from .indexer.options import IndexOptions as IndexOptions
    from .search.dup_records import DuplicateReport as DuplicateReport
    from .search.duplicates import DuplicateOptions as DuplicateOptions, find_duplicates as find_duplicates
    from .search.evaluate import EvalResult as EvalResult, evaluate as evaluate
    from .search.query import (
        Answer as Answer,
        Match as Match,
        QueryResult as QueryResult,
        Searcher as Searcher,
        answer as answer,
        compare as compare,
        query as query,
    )
    from .search.report import ReportResult as ReportResult, write_report as write_report
    from .search.review import (
        ImportResult as ImportResult,
        decisions_for as decisions_for,
        export_decisions as export_decisions,
        import_decisions as import_decisions,
        record_decision as record_decision,
    )
    from .store.decisions import (
        Decision as Decision,
        Journal as Journal,
        JournalState as JournalState,
        pair_key as pair_key,
    )
    from .store.generation import Generation as Generation
    from .store.handle import Store as Store, read_catalog as read_catalog, read_meta as read_meta
    from .store.meta import Catalog as Catalog, IndexInfo as IndexInfo, ModelInfo as ModelInfo, StoreMeta as StoreMeta

_EXPORTS = {
    **dict.fromkeys(["DEFAULTS", "MODELS", "MODEL_TABLE", "ModelSpec", "model_spec", "default_threshold",
                     "resolve_threshold"], ".config"),
    **dict.fromkeys(["NeardupError", "InputError", "StoreError", "StoreMismatchError", "StoreLockedError",
                     "WeightsError", "DecodeError"], ".errors"),
    **dict.fromkeys(["Embedder"], ".embed.embedders"),
    **dict.fromkeys(["make_embedder"], ".embed.models"),
    **dict.fromkeys(["OnnxPreprocess"], ".embed.onnx_runtime"),
    **dict.fromkeys(["Store"], ".store.handle"),
    **dict.fromkeys(["Generation"], ".store.generation"),
    **dict.fromkeys(["read_catalog", "read_meta"], ".store.handle"),
    **dict.fromkeys(["Catalog", "StoreMeta", "ModelInfo", "IndexInfo"], ".store.meta"),
    **dict.fromkeys(["RunSummary", "build_index", "update_index"], ".indexer.build"),
    **dict.fromkeys(["IndexOptions"], ".indexer.options"),
    **dict.fromkeys(["QueryResult", "Match", "Answer", "Searcher", "answer", "query", "compare"], ".search.query"),
    **dict.fromkeys(["DuplicateOptions", "find_duplicates"], ".search.duplicates"),
    **dict.fromkeys(["DuplicateReport"], ".search.dup_records"),
    **dict.fromkeys(["EvalResult", "evaluate"], ".search.evaluate"),
    **dict.fromkeys(["ReportResult", "write_report"], ".search.report"),
    **dict.fromkeys(["Decision", "Journal", "JournalState", "pair_key"], ".store.decisions"),
    **dict.fromkeys(["ImportResult", "decisions_for", "record_decision", "import_decisions", "export_decisions"],
                    ".search.review"),
}
__all__ = ["__version__", *sorted(_EXPORTS)]
__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
