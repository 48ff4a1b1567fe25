"""neardup's models and the photos they read: discover → decode (with local features) → embedders → pipeline.

Everything that turns files into vectors lives here: finding photos, decoding them, ORB local features, the
`Embedder` seam and its models (ResNet50/VGG16 on TensorFlow, ONNX Runtime, EfficientNet-Lite, pHash), the
ONNX export and int8 calibration, and the weight readers. It knows no store. Names are re-exported lazily:
importing this package loads nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # what type checkers and editors see (`X as X`: re-exported); at run time each name
    # loads its module on first use (_EXPORTS below; tests/test_package.py checks that the two agree)
    from .decode import (
        Decoded as Decoded,
        decode_image as decode_image,
        read_and_decode as read_and_decode,
        sha256_hex as sha256_hex,
    )
    from .embedders import (
        Embedder as Embedder,
        KerasEmbedder as KerasEmbedder,
        PHashEmbedder as PHashEmbedder,
        cosine_to_hamming as cosine_to_hamming,
        hamming_to_cosine as hamming_to_cosine,
        l2_normalize as l2_normalize,
    )
    from .models import make_embedder as make_embedder
    from .onnx_runtime import OnnxEmbedder as OnnxEmbedder, OnnxPreprocess as OnnxPreprocess
    from .pipeline import Embedded as Embedded, EmbeddedFiles as EmbeddedFiles, embed_files as embed_files

_EXPORTS = {
    **dict.fromkeys(["Decoded", "decode_image", "read_and_decode", "sha256_hex"], ".decode"),
    **dict.fromkeys(["Embedder", "KerasEmbedder", "PHashEmbedder", "l2_normalize",
                     "hamming_to_cosine", "cosine_to_hamming"], ".embedders"),
    **dict.fromkeys(["OnnxEmbedder", "OnnxPreprocess"], ".onnx_runtime"),
    **dict.fromkeys(["make_embedder"], ".models"),
    **dict.fromkeys(["Embedded", "EmbeddedFiles", "embed_files"], ".pipeline"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
