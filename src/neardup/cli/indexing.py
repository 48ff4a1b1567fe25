"""Commands that make and keep a store: index, update, info, restore, and the demo."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import (
    DEFAULTS,
    ENV_MODEL,
    OFFLINE_MODEL,
)
from ..errors import InputError
from .base import _progress, app, handled
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
    index_options,
)
from .render import _place, _print_info, _print_summary, _store_folder, _warn_random_weights
from .review import decisions_line


def _run_index(update: bool, dirs: list[str], store: Path, options: Any, quiet: bool) -> None:
    from ..indexer.build import build_index, update_index

    with _progress(quiet).stage("update" if update else "index", unit="img") as bar:
        summary = (update_index if update else build_index)(dirs, store, options, progress=bar)
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
    _run_index(False, dirs or [], store, index_options(
        model=model, weights=weights, precision=precision, batch_size=batch_size, prune=prune, max_file_mb=max_file_mb,
        runtime=runtime, preprocess=preprocess, ray=ray, ray_address=ray_address, ray_actors=ray_actors,
        ray_cpus=ray_cpus, ray_gpus=ray_gpus, index=index, memory=memory, target_recall=target_recall, repair=repair,
        drop_missing=drop_missing), quiet)


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
    _run_index(True, dirs, store, index_options(
        model=model, weights=weights, precision=precision, batch_size=batch_size, prune=prune, max_file_mb=max_file_mb,
        runtime=runtime, ray=ray, ray_address=ray_address, ray_actors=ray_actors, ray_cpus=ray_cpus,
        ray_gpus=ray_gpus, index=index, memory=memory, target_recall=target_recall, repair=repair,
        drop_missing=drop_missing, compact=compact), quiet)


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
    from ..search.review import journal_info
    from ..store.handle import Store
    from ..store.settings import applied as applied_settings

    about = Store(store).describe(failures=failures or as_json, check=check)
    applied, journal = applied_settings(store), journal_info(store)
    if as_json:
        typer.echo(json.dumps({**about.to_json(), "decisions": journal, "settings": applied}, indent=1))
    else:
        settings_file = Store(store).files.settings
        _print_info(about, [
            ("decisions", decisions_line(journal)),
            ("thresholds", "the model's defaults (none applied)" if not applied else applied["error"]
             if "error" in applied else f"{applied['flags']} applied {applied['at']} by {applied['source']} "
             f"({settings_file}; a flag on the command line still wins)")])
    raise typer.Exit(1 if about.problems else 0)


@app.command("restore")
@handled
def restore_cmd(store: StoreOpt = Path(DEFAULTS.store), verbose: VerboseOpt = 0) -> None:
    """Make the store's previous generation current again (after damage, or to undo the last update)."""
    from ..store.handle import Store

    r = Store(store).restore()
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
    decides = (f"verified candidates: each image's {d.k} nearest at cosine >= {d.loose_threshold:.4f} "
               f"(--candidate-threshold)" if d.verify else f"cosine >= {d.threshold:.4f} (--threshold)")
    listed = int(d.verified.sum()) if d.verify else d.n_pairs  # unverified ones are only listed for review
    typer.echo(f"\n{len(d.groups)} duplicate groups ({listed} pairs, {d.n_exact} byte-identical) among "
               f"{d.n} images, model {d.model}; pairs: {decides}:")
    folder = _store_folder(res.store)
    for k, g in enumerate(d.groups[:show]):
        names = [_place(m.path, folder) + (" (keep)" if m.keeper else "") for m in g.members]
        typer.echo(f"  group {k + 1}: " + ", ".join(names))
    if len(d.groups) > show:
        typer.echo(f"  ... {len(d.groups) - show} more in {res.groups_json}")
    if res.evaluation is not None:
        ev = res.evaluation
        typer.echo(f"\nagainst the sample's ground truth ({ev.true_pairs} true pairs): these pairs, at "
                   f"{ev.default_flag} {ev.default_threshold:.4f}: precision {ev.at_default['precision']:.3f}, recall "
                   f"{ev.at_default['recall']:.3f}, F1 {ev.at_default['f1']:.3f}; best F1 {ev.best['f1']:.3f} at "
                   f"{ev.default_flag} {ev.best['threshold']:.2f}; query recall@1 "
                   f"{ev.retrieval.get('recall@1', float('nan')):.3f}")
    typer.echo(f"\nstore {res.store}\npairs {res.pairs_csv}\ngroups {res.groups_json}"
               + (f"\nevaluation {res.out / 'evaluation.json'}" if res.evaluation is not None else ""))
    if res.report_html:
        typer.echo(f"report {res.report_html}  (open it in a browser)")
