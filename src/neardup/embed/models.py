"""Indexing stage 3d, models: the one factory of embedders, from a model name, weights, runtime and precision.

    phash                      PHashEmbedder (numpy, no weights)
    resnet50 | vgg16           ONNX Runtime on the cached export (default), or TensorFlow with runtime="tf"
    efficientnet-lite0 | -lite2  ONNX Runtime on the cached conversion of the registry package's weights
    onnx:PATH                  the user's own ONNX model with explicit preprocessing (OnnxPreprocess)
    precision="int8"           the int8 file a store was calibrated with (made by `neardup index`)
"""
from __future__ import annotations

import os

from ..config import DEFAULTS, PRECISIONS, RUNTIMES, model_spec
from ..errors import InputError
from .embedders import Embedder, KerasEmbedder, PHashEmbedder, resolve_weights


def split_model(model: str, weights: str | None = None) -> tuple[str, str | None]:
    """`onnx:PATH` -> ("onnx", PATH); other names pass through with `weights`. Refuses unknown names."""
    if model.startswith("onnx:"):
        path = model[len("onnx:"):]
        if not path:
            raise InputError("give the model file: --model onnx:PATH")
        if weights not in (None, "imagenet", "none", path):
            raise InputError("--model onnx:PATH names the model file; drop --weights")
        return "onnx", path
    return model_spec(model).name, weights


def make_embedder(model: str = DEFAULTS.model, weights: str | None = DEFAULTS.weights,
                  precision: str = DEFAULTS.precision, *, runtime: str | None = None,
                  preprocess: str | None = None, quantized: str | os.PathLike[str] | None = None) -> Embedder:
    """Build the embedder for a model name. Raises InputError / WeightsError.

    `preprocess` is an onnx model's OnnxPreprocess spec; `quantized` the int8 file of a store (int8 only).
    """
    model, weights = split_model(model, weights)
    weights = resolve_weights(model, weights)
    runtime = runtime or DEFAULTS.runtime
    if runtime not in RUNTIMES:
        raise InputError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if model == "phash":
        return PHashEmbedder()
    spec = model_spec(model)
    if precision == "bf16" and "tf" not in spec.runtimes:
        raise InputError("bf16 is a TensorFlow precision of ResNet50 and VGG16; an ONNX model runs in float32 "
                         "or int8")
    if precision == "bf16" and runtime != "tf":
        raise InputError("bf16 is a TensorFlow precision of the built-in CNNs: add --runtime tf")
    if precision == "int8" and quantized is None:  # said before any model is loaded
        raise InputError("int8 is calibrated on a catalogue's own images: create the store with "
                         "`neardup index DIR --precision int8`, then query it as usual")
    # EfficientNet-Lite runs on ONNX Runtime whatever the runtime (it has no Keras model), as pHash on numpy
    if "tf" in spec.runtimes and runtime == "tf" and precision != "int8":
        return KerasEmbedder(model, weights, precision)
    from .onnx_export import builtin_embedder, int8_embedder
    from .onnx_runtime import OnnxEmbedder, OnnxPreprocess

    emb = OnnxEmbedder(weights, OnnxPreprocess.parse(preprocess)) if model == "onnx" else builtin_embedder(
        model, weights)
    return int8_embedder(emb, quantized) if precision == "int8" else emb
