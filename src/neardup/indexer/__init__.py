"""neardup indexing: stages discover → decode → embed → pipeline → faiss_index, then the job (scan → diff → build).

The job publishes into `neardup.store`.

The design card's `indexer` package; it lives inside `neardup` because a top-level package of that name
would collide with users' own modules. Names are re-exported lazily: importing this package loads nothing.
A function named like its module (discover) is not re-exported: once the module is imported, Python binds
the package attribute to the module. Import it from its module, or from `neardup`.
"""
from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["Decoded", "decode_image", "read_and_decode", "sha256_hex"], ".decode"),
    **dict.fromkeys(["Embedder", "KerasEmbedder", "PHashEmbedder", "l2_normalize",
                     "hamming_to_cosine", "cosine_to_hamming"], ".embed"),
    **dict.fromkeys(["OnnxEmbedder", "OnnxPreprocess"], ".onnx_runtime"),
    **dict.fromkeys(["make_embedder"], ".models"),
    **dict.fromkeys(["Embedded", "EmbeddedFiles", "embed_files"], ".pipeline"),
    **dict.fromkeys(["build_flat_index", "save_index", "search"], ".faiss_index"),
    **dict.fromkeys(["RunSummary", "build_index", "update_index"], ".build"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
