"""Bottom layer: every default of neardup in one place (the CLI options mirror these) and the threshold rule."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

#: neardup's version, recorded in every store.
VERSION = "0.1.0"

#: File name extensions (lower case) that discovery treats as images.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)

#: The embedding methods neardup knows, by CLI name ("onnx" is a user's own model: --model onnx:PATH).
MODELS: tuple[str, ...] = ("resnet50", "vgg16", "phash", "onnx")
#: Runtimes of the built-in CNNs: TensorFlow (Keras, the models' source) or ONNX Runtime (their export).
RUNTIMES: tuple[str, ...] = ("onnx", "tf")
#: Inference precisions: bf16 runs on TensorFlow, int8 on ONNX Runtime (calibrated on the indexed images).
PRECISIONS: tuple[str, ...] = ("float32", "bf16", "int8")

#: Default cosine thresholds per model for "is a near-duplicate".
#: resnet50: ImageNet GAP features of re-encodes/resizes/small crops of one photo sit well above 0.9, while
#: different products of one category usually sit in 0.6-0.85; 0.90 is a conservative start, tune with
#: `neardup evaluate`. vgg16: the seed's 0.95 for fc1. phash: Hamming distance <= 10 of 64 bits, which is
#: cosine 1 - 2*10/64 = 0.6875 under the +-1/8 bit mapping. onnx: a user's own model has no known scale;
#: 0.90 is only a start, measure yours with `neardup evaluate`.
THRESHOLDS: dict[str, float] = {"resnet50": 0.90, "vgg16": 0.95, "phash": 1.0 - 2.0 * 10 / 64, "onnx": 0.90}

#: Environment variables that jobs (cron, CI) can use instead of options.
ENV_STORE = "NEARDUP_STORE"
ENV_MODEL = "NEARDUP_MODEL"
ENV_WEIGHTS = "NEARDUP_WEIGHTS"
ENV_BATCH_SIZE = "NEARDUP_BATCH_SIZE"
ENV_PRECISION = "NEARDUP_PRECISION"
ENV_MAX_FILE_MB = "NEARDUP_MAX_FILE_MB"
ENV_RUNTIME = "NEARDUP_RUNTIME"
ENV_PREPROCESS = "NEARDUP_PREPROCESS"


@dataclass(frozen=True)
class Defaults:
    """Default values of the pipeline's knobs."""

    store: str = "catalog.h5"
    model: str = "resnet50"
    weights: str = "imagenet"
    precision: str = "float32"
    #: ONNX Runtime: measured faster than TensorFlow on the same CPU (benchmarks/RESULTS.md), same vectors.
    runtime: str = "onnx"
    #: Images of the indexed folders an int8 model is calibrated on (evenly spaced over the sorted paths).
    calibration_images: int = 64
    batch_size: int = 32
    #: Decoding threads; Pillow releases the GIL while decoding, so threads overlap with inference.
    decode_workers: int = 2
    #: Batches between durable checkpoints of a run (crash resume granularity).
    checkpoint_every: int = 4
    k: int = 10
    #: Rows of the similarity matrix computed at once by the duplicate self-join (memory = block * n * 4 bytes).
    join_block: int = 1024
    #: Larger files are listed as skipped before a byte is read (a 4 GB file named *.jpg must not be read into
    #: memory). 128 MiB is several times the largest product photo (a 50 MP PNG is ~100 MB).
    max_file_mb: int = 128
    #: Seed for the random initialisation used with weights=none, so that every process builds the same network.
    init_seed: int = 1234


    @property
    def max_file_bytes(self) -> int:
        """max_file_mb in bytes."""
        return self.max_file_mb << 20


DEFAULTS = Defaults()


def default_threshold(model: str) -> float:
    """The documented default cosine threshold for `model`."""
    return THRESHOLDS.get(model, THRESHOLDS["resnet50"])


def resolve_threshold(threshold: float | None, model: str) -> float:
    """The given threshold, or the model's documented default; refuses values outside [-1, 1]."""
    t = default_threshold(model) if threshold is None else float(threshold)
    if not -1.0 <= t <= 1.0:
        raise InputError(f"threshold must be a cosine between -1 and 1, got {t}")
    return t
