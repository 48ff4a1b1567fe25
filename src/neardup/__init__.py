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

from ._lazy import lazy_exports
from .config import VERSION as __version__

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
