"""Commands that search a store: query, compare, duplicates, report, plot, evaluate."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated

import typer

from ..config import (
    DEFAULTS,
    ENV_SERVER,
    resolve_threshold,
)
from ..errors import InputError
from ..fileio import check_output_path
from .base import _progress, _show, app, handled
from .options import (
    _CANDIDATES,
    BatchOpt,
    LooseStoreOpt,
    MaxFileOpt,
    ModelOpt,
    PrecisionOpt,
    PreprocessOpt,
    QuietOpt,
    RayAddressOpt,
    RuntimeOpt,
    StoreOpt,
    ThresholdOpt,
    TokenOpt,
    VerboseOpt,
    VerifyOpt,
    WeightsOpt,
)
from .render import _place, _print_answer, _query_csv, _removable, _say_stale, _store_folder, _warn_random_weights


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
    from ..search.query import Answer, has_match

    if as_json and as_csv:
        raise InputError("choose one of --json and --csv")
    base = None
    got: Answer
    if server:
        from ..serve.client import query_server

        got = query_server(server, images, k=k, token=token, verify=verify, threshold=threshold,
                           max_file_bytes=max_file_mb << 20)
    else:
        from ..search.query import answer

        # a folder's photos are embedded in batches: progress for those, none for a photo or two
        folder = any(os.path.isdir(p) for p in images)
        got = answer(store, images, k=k, weights=weights, precision=precision, batch_size=batch_size,
                     max_file_bytes=max_file_mb << 20, runtime=runtime, verify=verify, threshold=threshold,
                     progress=_progress(quiet) if folder else None)
        _warn_random_weights(store, got)
        base = _store_folder(store)
    if as_json:
        typer.echo(json.dumps(got.to_json(), indent=1))
    elif as_csv:
        typer.echo(_query_csv(got), nl=False)
    else:
        _print_answer(got, base)
    for r in got.results:
        if r.error:
            typer.echo(f"neardup: skipped {_show(r.query)}: {r.error}", err=True)
    if all(r.error for r in got.results):
        raise typer.Exit(2)
    raise typer.Exit(0 if has_match(got.results, got.threshold) else 1)


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
    from ..search.query import compare
    from ..store_embedder import loose_embedder

    for p in (a, b):
        if not p.is_file():
            raise InputError(f"no such image file: {_show(p)}")
    emb = loose_embedder(store, model, weights, precision, runtime, preprocess)
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
    from ..indexer.ray_job import RayOptions
    from ..search.duplicates import find_duplicates
    from ..search.pairs_io import write_groups_json, write_pairs_csv

    report = find_duplicates(store, threshold=threshold, verify=verify, k=k, loose_threshold=loose, exact=exact,
                             ray=RayOptions.asked(ray, ray_address),
                             progress=_progress(quiet))
    if out:
        write_pairs_csv(report, out)
    if groups:  # records the pairs (the file just written, else the pairs themselves): `report --groups` uses them
        write_groups_json(report, groups, pairs_file=out)
    folder = _store_folder(store)  # listed paths are shown from the current folder
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
            typer.echo(f"  {tag:>6}  {_place(m['path'], folder)}  ({m['width']}x{m['height']})"
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
    from ..search.report import write_report

    res = write_report(store, out, pairs=pairs, groups=groups, threshold=threshold, png_dir=png_dir, verify=verify,
                       progress=_progress(quiet))
    typer.echo(f"wrote {res.out}: {res.groups} groups, {res.pairs} pairs, {res.images} images "
               f"({len(res.missing)} missing or unreadable), {res.seconds:.1f} s")
    for path in res.missing[:10]:
        typer.echo(f"  missing {_place(path, _store_folder(store))}")
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
    from ..search.plots import plot_format, plot_pair
    from ..search.query import compare
    from ..store_embedder import loose_embedder

    for p in (a, b):
        if not p.is_file():
            raise InputError(f"no such image file: {_show(p)}")
    check_output_path(out)
    plot_format(out)  # refused before a model is built, not after
    if score is not None and not math.isfinite(score):
        raise InputError(f"--score must be a number, got {score}")
    if score is None:
        score = compare(a, b, embedder=loose_embedder(store, model, weights, precision, runtime, preprocess))
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
    from ..search.evaluate import evaluate as run_evaluation
    from ..search.evaluate import write_eval_json
    from ..search.plots import plot_pr_curve

    for path in (out, plot):  # refuse a bad output folder before the work, not after it
        if path is not None:
            check_output_path(path)
    if plot is not None:
        from ..search.plots import plot_format

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
