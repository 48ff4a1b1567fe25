"""Options shared by several commands; each mirrors a field of config.DEFAULTS and shows it in --help."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..config import (
    DEFAULTS,
    ENV_BATCH_SIZE,
    ENV_INDEX,
    ENV_INDEX_MEMORY,
    ENV_MAX_FILE_MB,
    ENV_MODEL,
    ENV_PRECISION,
    ENV_PREPROCESS,
    ENV_RAY,
    ENV_RUNTIME,
    ENV_STORE,
    ENV_TOKEN,
    ENV_VERIFY,
    ENV_WEIGHTS,
    MODEL_TABLE,
    RUNTIMES,
    parse_size,
)

if TYPE_CHECKING:
    from ..indexer.options import IndexOptions
    from ..serve.guard import ServeOptions

StoreOpt = Annotated[Path, typer.Option("--store", "-s", envvar=ENV_STORE, help="HDF5 store file.")]
_MODEL_NAMES = [("onnx:PATH" if m.name == "onnx" else m.name) + (f" ({m.note})" if m.note else "")
                for m in MODEL_TABLE]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", envvar=ENV_MODEL, help=f"Embedding method: {', '.join(_MODEL_NAMES[:-1])}, or "
    f"{_MODEL_NAMES[-1]} [default: the store's, else {DEFAULTS.model}].")]
WeightsOpt = Annotated[str | None, typer.Option(
    "--weights", "-w", envvar=ENV_WEIGHTS, help="imagenet | none | PATH to a weights file [default: the store's, "
    f"else {DEFAULTS.weights}].")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", envvar=ENV_PRECISION, help="float32; bf16 (with --runtime tf); or int8 (ONNX Runtime, "
    "calibrated on the indexed images when the store is created; queries then follow the store).")]
StorePrecisionOpt = Annotated[str | None, typer.Option(
    "--precision", envvar=ENV_PRECISION, help="float32; bf16 (with --runtime tf); or int8 (ONNX Runtime, "
    "calibrated on 64 of the indexed images and kept beside the store). Chosen when a store is created "
    "[default: the store's, else float32].")]
RuntimeOpt = Annotated[str, typer.Option(
    "--runtime", envvar=ENV_RUNTIME, help=f"Runtime of resnet50/vgg16: {' or '.join(RUNTIMES)} (ONNX Runtime runs "
    "the model exported from Keras once and cached; the vectors are interchangeable). EfficientNet-Lite always "
    "runs on ONNX Runtime.")]
PreprocessOpt = Annotated[str | None, typer.Option(
    "--preprocess", envvar=ENV_PREPROCESS, help="For --model onnx:PATH, what the model expects, as key=value,...: "
    "size, layout (nhwc|nchw), scale (e.g. 1/255), mean and std (a:b:c), order (rgb|bgr), fit (stretch|crop), "
    "dtype (float32|uint8), input, output (tensor names), pool (none|nchw|nhwc|tokens|first, for outputs of more "
    "than two axes) [default: size=224,layout=nhwc,scale=1/255,mean=0:0:0,std=1:1:1,order=rgb,fit=stretch,"
    "dtype=float32,pool=none, the only input and output].")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", envvar=ENV_BATCH_SIZE, min=1,
                                       help="Images per model call.")]
_PER_MODEL = ", ".join(f"{m.name} {m.threshold:.4g}" for m in MODEL_TABLE)
ThresholdOpt = Annotated[float | None, typer.Option(
    "--threshold", "-t", help=f"Cosine score at or above which two photos are duplicates without verification "
    f"(with it: for photos too plain to verify; failed candidates above it are listed for review) [default: per model: "
    f"{_PER_MODEL} (phash: Hamming <= 14 of 64 bits)].")]
MaxFileOpt = Annotated[int, typer.Option(
    "--max-file-mb", envvar=ENV_MAX_FILE_MB, min=1, help="Image files larger than this (MiB) are listed as "
    "skipped without being read.")]
VerifyOpt = Annotated[bool | None, typer.Option(
    "--verify/--no-verify", envvar=ENV_VERIFY, show_default=False,
    help="Check candidates geometrically (ORB keypoints + RANSAC): a match must show the same thing, not only "
         "look alike; measured to find more and wrong less (README \"Verification\") [default: verify when the "
         "store caches local features, as every store made by this version does].")]
TokenOpt = Annotated[str | None, typer.Option(
    "--token", envvar=ENV_TOKEN, show_default=False,
    help=f"Bearer token of the query service (prefer the {ENV_TOKEN} variable: a command line is visible to other "
         f"users of the machine).")]
_CANDIDATES = ", ".join(f"{m.name} k {m.candidates} cosine {m.loose_threshold:.4g}" for m in MODEL_TABLE)
IndexKindOpt = Annotated[str | None, typer.Option(
    "--index", envvar=ENV_INDEX, help="The FAISS index: flat (exact), auto (exact up to 100k vectors, then IVF "
    "sized to --memory), ivf, hnsw, or a FAISS index-factory string such as 'IVF4096,PQ64'. An approximate one is "
    "tuned to --target-recall and its measured recall is kept in the store (neardup info) [default: auto for a "
    "new store, else the store's].")]
MemoryOpt = Annotated[str | None, typer.Option(
    "--memory", envvar=ENV_INDEX_MEMORY, help="Memory budget of the index for auto and ivf, e.g. 2G "
    "[default: none, else the store's].")]
TargetRecallOpt = Annotated[float | None, typer.Option(
    "--target-recall", min=0.01, max=1.0, help="recall@10 against exact search that an approximate index's "
    "nprobe/efSearch is tuned to at build [default: 0.95, else the store's].")]
RayOpt = Annotated[bool, typer.Option(
    "--ray", envvar=ENV_RAY, help="Decode and embed on a Ray cluster (Ray Data actors; pip install "
    "'neardup[ray]'). Scanning, the checkpoint and the store stay here; the store is the one a local run makes.")]
RayAddressOpt = Annotated[str | None, typer.Option(
    "--ray-address", help="With --ray: the cluster (auto, or ray://HOST:10001) [default: RAY_ADDRESS, else a cluster "
    "started on this machine with `ray start`, else a new local one].")]
RayActorsOpt = Annotated[int | None, typer.Option(
    "--ray-actors", min=1, help="With --ray: at most this many embedding actors [default: as many as the cluster's "
    "CPUs or GPUs hold].")]
RayCpusOpt = Annotated[float, typer.Option("--ray-cpus", min=0.1, help="With --ray: CPUs per actor.")]
RayGpusOpt = Annotated[float | None, typer.Option(
    "--ray-gpus", min=0.0, help="With --ray: GPUs per actor [default: 1 when the cluster has GPUs, else 0].")]
VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (-vv: debug).")]
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", "-q", help="No progress: neither the bar shown on a terminal nor, when stderr is not one (cron, a "
    f"log), the line written at most every {DEFAULTS.progress_interval_s:g} s (NEARDUP_PROGRESS_INTERVAL) with "
    "done/total, rate and ETA.")]
CompactOpt = Annotated[bool, typer.Option(
    "--compact", help="Copy every live row into one segment now and train the index anew (updates compact by "
    "themselves when deleted rows pass a quarter of those written; this also retrains an approximate index).")]
DropMissingOpt = Annotated[bool, typer.Option(
    "--drop-missing", help="With --repair: drop the photos of a damaged segment that are not found under DIRS "
    "(listed) instead of refusing the repair.")]
RepairOpt = Annotated[bool, typer.Option(
    "--repair", help="Read and check every block of the store first (as `info --check`); drop damaged segments and "
    "index their photos again (they get new ids), and write damaged index files anew. Nothing is lost but the "
    "embedding time.")]


LooseStoreOpt = Annotated[Path | None, typer.Option(
    "--store", "-s", help="Embed as this store does: its model and weights (--model, if given, must match).")]


def index_options(*, max_file_mb: int, memory: str | None, ray: bool, ray_address: str | None,
                  ray_actors: int | None, ray_cpus: float, ray_gpus: float | None, **fields: Any) -> IndexOptions:
    """The IndexOptions of `index` and `update` from their options (the one place both build them): sizes in
    bytes, --ray and its settings as RayOptions, the other fields as given."""
    from ..indexer.options import IndexOptions
    from ..indexer.ray_job import RayOptions

    return IndexOptions(max_file_bytes=max_file_mb << 20, memory=parse_size(memory) if memory else None,
                        ray=RayOptions.asked(ray, ray_address, ray_actors, ray_cpus, ray_gpus), **fields)


def serve_options(*, store: Path, request_timeout: float, reload_poll: float, open_timeout: float,
                  header_timeout: float, max_request_mp: float, max_inflight_mp: float,
                  allowed_host: list[str] | None, **fields: Any) -> ServeOptions:
    """The ServeOptions of `serve` from its options (the one place they are built): seconds and megapixels as
    the service counts them, the other fields as given."""
    from ..serve.guard import ServeOptions

    return ServeOptions(store=str(store), request_timeout_s=request_timeout, reload_poll_s=reload_poll,
                        open_timeout_s=open_timeout, header_timeout_s=header_timeout,
                        max_request_pixels=int(max_request_mp * 1e6), max_inflight_pixels=int(max_inflight_mp * 1e6),
                        allowed_hosts=tuple(allowed_host or ()), **fields)
