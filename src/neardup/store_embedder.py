"""The embedder a store was made with: the glue above both the store (which knows no model) and `embed`.

Indexing, querying and evaluation all get their embedder here, so the rule that a store's vectors are
compared only with vectors of the same model, dimension and weights lives in one place.
"""
from __future__ import annotations

import os

from .config import DEFAULTS
from .embed.embedders import Embedder
from .embed.models import make_embedder, split_model
from .errors import StoreError, StoreMismatchError
from .fileio import file_sha256
from .store.files import StoreFiles
from .store.handle import read_meta
from .store.meta import StoreMeta


def random_weights(model: str, weights: str) -> bool:
    """Whether a store's vectors come from seeded random CNN weights (`--weights none`): every photo then
    scores near 1, and its scores show the plumbing, not which photos are alike."""
    return weights == "none" and model in ("resnet50", "vgg16")


def loose_embedder(store: str | os.PathLike[str] | None, model: str | None = None, weights: str | None = None,
                   precision: str = DEFAULTS.precision, runtime: str | None = None,
                   preprocess: str | None = None) -> Embedder:
    """The embedder for loose files (`compare`, `plot`): the store's own when `store` is given (a `model`, if
    given, must be the store's: StoreMismatchError), else `model`'s (default: DEFAULTS.model)."""
    if store is None:
        return make_embedder(model or DEFAULTS.model, weights, precision, runtime=runtime, preprocess=preprocess)
    meta = read_meta(store)
    if model is not None and split_model(model, weights)[0] != meta.model.name:
        raise StoreMismatchError(f"{store} was made with {meta.model.name}; --model {model} cannot follow it")
    return store_embedder(meta, store, weights=weights, precision=precision, runtime=runtime)


def check_embedder(meta: StoreMeta, emb: Embedder, store: str | os.PathLike[str]) -> None:
    """Refuse an embedder whose vectors cannot be compared with the store's: another model, dimension or
    weights fingerprint. The one place this rule lives (indexing and querying both call it)."""
    m = meta.model
    if m.name == "onnx" and emb.preprocessing != m.preprocessing:  # a user's model: its preprocessing
        raise StoreMismatchError(f"{store} was made with the preprocessing {m.preprocessing}; the model given "
                                 f"uses {emb.preprocessing}")
    if emb.name != m.name or emb.dim != m.dim or emb.weights_fingerprint != m.weights_fingerprint:
        raise StoreMismatchError(
            f"{store} was made with {m.name} (dim {m.dim}, weights {m.weights_fingerprint}); "
            f"the model given is {emb.name} (dim {emb.dim}, weights {emb.weights_fingerprint})")


def store_embedder(meta: StoreMeta, store: str | os.PathLike[str], *, weights: str | None = None,
                   precision: str = DEFAULTS.precision, embedder: Embedder | None = None,
                   runtime: str | None = None) -> Embedder:
    """The embedder a store was built with (its model, its weights unless others are given, its onnx
    preprocessing, its int8 model, beside `store`, checked against its digest), checked against the store's
    `meta`; an injected `embedder` is checked the same way. `runtime` may differ from the store's: TensorFlow
    and ONNX Runtime vectors are interchangeable."""
    if meta.model.precision == "int8":
        precision = "int8"  # the store's calibrated model, whatever the default
    quantized = StoreFiles.of_manifest(store).index(meta.model.quantized_file) if meta.model.quantized_file else None
    if quantized is not None and embedder is None:
        if not quantized.is_file():
            raise StoreError(f"the int8 model of {store} is missing ({quantized}); it was calibrated on this "
                             f"store's images, so rebuild the store with `neardup index DIR --precision int8`")
        if meta.model.quantized_sha256 and file_sha256(quantized) != meta.model.quantized_sha256:
            raise StoreError(f"the int8 model of {store} ({quantized}) does not match the digest its store recorded "
                             f"(damaged); rebuild the store with `neardup index DIR --precision int8`")
    emb = embedder or make_embedder(meta.model.name, weights or meta.model.weights, precision, runtime=runtime,
                                    preprocess=meta.model.preprocessing if meta.model.name == "onnx" else None,
                                    quantized=quantized)
    check_embedder(meta, emb, store)
    return emb
