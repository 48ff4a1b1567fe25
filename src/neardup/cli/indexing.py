"""Commands that make and keep a store: index, update, info, restore, and the demo."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import (
    DEFAULTS,
    ENV_MODEL,
    OFFLINE_MODEL,
    parse_size,
)
from ..errors import InputError
from ..fileio import fmt_bytes
from .base import _progress, _show, app, handled
from .options import (
    BatchOpt,
    CompactOpt,
    DropMissingOpt,
    IndexKindOpt,
    MaxFileOpt,
    MemoryOpt,
    ModelOpt,
    PreprocessOpt,
    QuietOpt,
    RayActorsOpt,
    RayAddressOpt,
    RayCpusOpt,
    RayGpusOpt,
    RayOpt,
    RepairOpt,
    RuntimeOpt,
    StoreOpt,
    StorePrecisionOpt,
    TargetRecallOpt,
    VerboseOpt,
    WeightsOpt,
)
from .render import _index_line, _print_summary, _warn_random_weights


def _run_index(update: bool, dirs: list[str], store: Path, model: str | None, weights: str | None,
               precision: str | None, batch_size: int, prune: bool, max_file_mb: int, runtime: str,
               preprocess: str | None, ray: Any, index: str | None, memory: str | None,
               target_recall: float | None, repair: bool = False, compact: bool = False,
               drop_missing: bool = False, quiet: bool = False) -> None:
    from ..indexer.build import build_index, update_index

    with _progress(quiet).stage("update" if update else "index", unit="img") as bar:
        fn = update_index if update else build_index
        summary = fn(dirs, store, model=model, weights=weights, precision=precision,
                     batch_size=batch_size, prune=prune, max_file_bytes=max_file_mb << 20, runtime=runtime,
                     preprocess=preprocess, progress=bar, ray=ray, index=index,
                     memory=parse_size(memory) if memory else None, target_recall=target_recall, repair=repair,
                     compact=compact, drop_missing=drop_missing)
    _print_summary(summary)
    _warn_random_weights(store)


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
        from ..search.truth import catalogue_paths

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


def _ray_options(ray: bool, address: str | None, actors: int | None, cpus: float,
                 gpus: float | None) -> Any:
    """The RayOptions of --ray (None without it); the --ray-* options alone are refused, not ignored."""
    if not ray:
        if address is not None or actors is not None or gpus is not None or cpus != DEFAULTS.ray_cpus:
            raise InputError("--ray-address, --ray-actors, --ray-cpus and --ray-gpus go with --ray")
        return None
    from ..indexer.ray_job import RayOptions

    return RayOptions(address=address, actors=actors, cpus_per_actor=cpus, gpus_per_actor=gpus)


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
    from ..store.handle import Store

    handle = Store(store)
    problems = handle.check() if check else []
    previous = _previous(handle)
    with handle.current() as gen:
        meta, size, segs, dead = gen.meta, gen.disk_bytes(), gen.segments, gen.manifest.dead_rows if gen.manifest else 0
        failed = gen.failures if (failures or as_json) else []
    if as_json:
        doc = meta.flat()
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
            ("images", str(meta.count)), ("failed", str(meta.failures)), ("model", meta.model.name),
            ("weights", f"{meta.model.weights} (fingerprint {meta.model.weights_fingerprint})"),
            ("dim", str(meta.model.dim)),
            ("input", f"{meta.model.input_size}x{meta.model.input_size}"), ("preprocessing", meta.model.preprocessing),
            ("runtime", f"{meta.model.runtime or 'not recorded'}, {meta.model.precision}"
             + (f" ({meta.model.quantized_file}; {meta.model.calibration})" if meta.model.quantized_file else "")),
            ("local features", f"{meta.local_features} (cached for --verify)" if meta.local_features else
             "none: --verify extracts them from the files (a store made before they were cached)"),
            ("faiss index", _index_line(meta) + (f", {fmt_bytes(size['index'])} on disk" if size["index"] else
                                                 ", searched from the stored vectors (no file)")),
            ("normalization", meta.model.normalization), ("created", meta.created), ("updated", meta.updated),
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
    from ..errors import StoreError

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
    from ..indexer.build import restore_previous

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
    from ..demo import run_demo

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
        names = [os.path.relpath(res.store.parent / m.path, catalog) + (" (keep)" if m.keeper else "")
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
