"""neardup indexing: discover → decode → embed → store → index."""
from __future__ import annotations

from .config import VERSION as __version__  # noqa: E402,F401

from .build import EmbeddedFiles, RunSummary, build_index, embed_files, update_index  # noqa: E402
from .config import DEFAULTS, MODELS, THRESHOLDS, Defaults, default_threshold  # noqa: E402
from .decode import Decoded, decode_image, read_and_decode, sha256_hex  # noqa: E402
from .discover import discover  # noqa: E402
from .embed import (Embedder, KerasEmbedder, PHashEmbedder, cosine_to_hamming, hamming_to_cosine,  # noqa: E402
                    l2_normalize, make_embedder)
from .errors import (DecodeError, InputError, NeardupError, StoreError, StoreLockedError,  # noqa: E402
                     StoreMismatchError, WeightsError)
from .index import build_flat_index, open_index, save_index, search  # noqa: E402
from .store import Catalog, StoreMeta, read_catalog, read_meta, write_catalog  # noqa: E402

__all__ = [
    "__version__", "build_index", "update_index", "embed_files", "RunSummary", "EmbeddedFiles", "DEFAULTS",
    "Defaults", "MODELS", "THRESHOLDS", "default_threshold", "Decoded", "decode_image", "read_and_decode",
    "sha256_hex", "discover", "Embedder", "KerasEmbedder", "PHashEmbedder", "make_embedder", "l2_normalize",
    "hamming_to_cosine", "cosine_to_hamming", "NeardupError", "InputError", "StoreError", "StoreMismatchError",
    "StoreLockedError", "WeightsError", "DecodeError", "build_flat_index", "open_index", "save_index", "search",
    "Catalog", "StoreMeta", "read_catalog", "read_meta", "write_catalog",
]
