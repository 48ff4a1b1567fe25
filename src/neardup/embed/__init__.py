"""neardup's models and the photos they read: discover → decode (with local features) → embedders → pipeline.

Everything that turns files into vectors lives here: finding photos, decoding them, ORB local features, the
`Embedder` seam and its models (ResNet50/VGG16 on TensorFlow, ONNX Runtime, EfficientNet-Lite, pHash), the
ONNX export and int8 calibration, and the weight readers. It knows no store. Names are re-exported lazily:
importing this package loads nothing.
"""
from __future__ import annotations

from .._lazy import lazy_exports

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
