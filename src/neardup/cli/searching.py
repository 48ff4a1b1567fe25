"""Commands that search a store: query, compare, duplicates, report, plot, evaluate."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any

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
from .review import NewOnlyOpt, say_decisions


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
    if threshold is None and store is not None:  # the thresholds applied to the store (evaluate --fit --apply)
        from ..store.settings import read_settings

        threshold = read_settings(store).threshold
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
                                                "verified,inliers with --verify; decision (`neardup review`).")] = None,
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
        "--candidate-threshold", help="With --verify: the loose cosine a neighbour must reach to be checked; it "
        "decides which pairs can be verified, so the verified pairs and the groups [default: the store's settings "
        "(evaluate --fit --apply), else per model, see -k].")] = None,
    exact: Annotated[bool, typer.Option("--exact", help="Exact search even on a store with an approximate index "
                                        "(the n² join: hours at a million images).")] = False,
    ray: Annotated[bool, typer.Option(
        "--ray", help="Verify the candidates on a Ray cluster (pip install 'neardup[ray]'); the "
        "search, the groups and the outputs stay here, and the pairs are the ones a local run finds [default: "
        "worker processes on every local core].")] = False,
    ray_address: RayAddressOpt = None, new_only: NewOnlyOpt = False,
    quiet: QuietOpt = False, verbose: VerboseOpt = 0,
) -> None:
    """List every near-duplicate pair and group of a store (nothing is ever deleted). With --verify, pairs are
    verified candidates (--candidate-threshold decides which are checked); unverified candidates above --threshold
    are listed (verified=false), never grouped. Without it, --threshold decides the pairs."""
    from ..indexer.ray_job import RayOptions
    from ..search.duplicates import find_duplicates
    from ..search.pairs_io import write_groups_json, write_pairs_csv

    report = find_duplicates(store, threshold=threshold, verify=verify, k=k, loose_threshold=loose, exact=exact,
                             ray=RayOptions.asked(ray, ray_address),
                             progress=_progress(quiet), new_only=new_only)
    if out:
        write_pairs_csv(report, out)
    if groups:  # records the pairs (the file just written, else the pairs themselves): `report --groups` uses them
        write_groups_json(report, groups, pairs_file=out)
    folder = _store_folder(store)  # listed paths are shown from the current folder
    typer.echo(f"pairs from: {report.method}")
    if report.verify:
        nv = int(report.verified.sum()) - report.n_exact
        typer.echo(f"{report.n} images, model {report.model}: {report.candidates} candidates (k {report.k}, cosine >= "
                   f"{report.loose_threshold:.4f}: -k, --candidate-threshold) verified in {report.verify_seconds:.1f} "
                   f"s: {nv} verified pairs, {report.n_exact} exact, {report.n_pairs - nv - report.n_exact} "
                   f"unverified above {report.threshold:.4f} (--threshold; listed for review, never grouped); "
                   f"{len(report.groups)} groups, {_removable(report)} removable, {report.seconds:.1f} s")
    else:
        typer.echo(f"{report.n} images, model {report.model}, threshold {report.threshold:.4f} (--threshold): "
                   f"{report.n_pairs} pairs ({report.n_exact} exact), {len(report.groups)} groups, "
                   f"{_removable(report)} removable, {report.seconds:.1f} s")
    for k, g in enumerate(report.groups[:show]):
        typer.echo(f"group {k + 1} ({len(g.members)} images)")
        for m in g.members[:show_members]:
            tag = "keep" if m.keeper else ("exact" if m.exact else f"{m.score_to_keeper:.4f}")
            if m.inliers_to_keeper is not None and m.inliers_to_keeper >= 0:
                tag += f" {m.inliers_to_keeper:>4} inl"
            typer.echo(f"  {tag:>6}  {_place(m.path, folder)}  ({m.width}x{m.height})"
                       + (f"  STALE: {m.stale} since indexed" if m.stale else ""))
        if len(g.members) > show_members:
            typer.echo(f"          ... and {len(g.members) - show_members} more")
    if len(report.groups) > show:
        typer.echo(f"... {len(report.groups) - show} more groups" + (f" in {groups}" if groups else
                                                                     " (write them all with --groups FILE)"))
    _say_stale(report)
    say_decisions(report)
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
    preprocess: PreprocessOpt = None, threshold: ThresholdOpt = None, verbose: VerboseOpt = 0,
) -> None:
    """Draw two images side by side into an image file, titled with the pair's verdict (verified by their
    keypoints, else the score against the threshold) and with the inlier lines of the verification."""
    from ..search.inliers import file_points
    from ..search.plots import pair_verdict, plot_format, plot_pair
    from ..search.query import compare
    from ..store.handle import read_meta
    from ..store_embedder import loose_embedder

    for p in (a, b):
        if not p.is_file():
            raise InputError(f"no such image file: {_show(p)}")
    check_output_path(out)
    plot_format(out)  # refused before a model is built, not after
    if score is not None and not math.isfinite(score):
        raise InputError(f"--score must be a number, got {score}")
    name = read_meta(store).model.name if store is not None else model or DEFAULTS.model
    if score is None:
        emb = loose_embedder(store, model, weights, precision, runtime, preprocess)
        score, name = compare(a, b, embedder=emb), emb.name
    t = resolve_threshold(threshold, name)
    v = file_points(a, b, mode="L" if name == "phash" else "RGB")  # decoded as the model's store decodes
    plot_pair(a, b, score, out, verification=v, threshold=t)
    typer.echo(f"wrote {out}: {pair_verdict(score, t, v)}".replace("\n", "; "))


@app.command("evaluate")
@handled
def evaluate_cmd(
    truth: Annotated[Path | None, typer.Option("--truth", help="Ground-truth CSV with the header path,group and "
                                               "optionally class (pairs of one class in different groups are not "
                                               "counted) and role (query: a photo to embed and look up, not in the "
                                               "store); paths relative to the CSV's folder, or absolute. `neardup "
                                               "index --from-truth FILE.csv` makes the store of exactly its photos; "
                                               "`python -m neardup.testing.grocery OUT` writes such sets.")] = None,
    decisions: Annotated[bool, typer.Option(
        "--decisions", help="Score what `duplicates` lists against the pairs reviewed in this store (`review "
        "import`, the /review page): duplicate = positive, distinct = negative. Give --truth, --decisions, or "
        "both.")] = False,
    fit: Annotated[bool, typer.Option(
        "--fit", help="Propose --threshold (and, verifying, --candidate-threshold) from the store's decisions by "
        "--fit-rule, and print the exact flags; refused with fewer than "
        f"{DEFAULTS.fit_min_pairs} decided pairs ({DEFAULTS.fit_min_each} of each kind).")] = False,
    fit_rule: Annotated[str, typer.Option(
        "--fit-rule", help="f1: the highest F1; recall: the highest recall at precision >= --min-precision.")]
    = DEFAULTS.fit_rule,
    min_precision: Annotated[float, typer.Option(
        "--min-precision", min=0.0, max=1.0, help="With --fit-rule recall: the precision to keep.")]
    = DEFAULTS.fit_min_precision,
    apply: Annotated[bool, typer.Option(
        "--apply", help="With --fit: save the thresholds in the store's settings (beside the store; `neardup info` "
        "shows them): every command uses them from then on, a flag given on the command line still wins.")]
    = False,
    store: StoreOpt = Path(DEFAULTS.store),
    out: Annotated[Path | None, typer.Option("--out", "-o", help="JSON file with every number.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG of the precision-recall curve (--truth).")] = None,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", "-t", help="As `duplicates --threshold`: without verification it decides the pairs and is the "
        "default row; with it, it only accepts pairs too plain to verify [default: the store's settings, else the "
        "model's].")] = None,
    loose: Annotated[float | None, typer.Option(
        "--candidate-threshold", help="As `duplicates --candidate-threshold`: with verification it decides which "
        "pairs are verified, and is the default row [default: the store's settings, else per model, see -k].")]
    = None,
    min_threshold: Annotated[float, typer.Option(
        "--min-threshold", min=-1.0, max=1.0, help="Lower end of the 0.01-step threshold sweep (raise it for "
        "a large store whose scores run high: every pair above it is held in memory).")] = 0.5,
    verify: VerifyOpt = None,
    k: Annotated[int | None, typer.Option("-k", min=1, help="Candidates per image with --verify, and per "
                                             "query photo (role query) always "
                                             f"[default: per model: {_CANDIDATES}].")] = None,
    runtime: RuntimeOpt = DEFAULTS.runtime, quiet: QuietOpt = False, verbose: VerboseOpt = 0,
) -> None:
    """Score duplicate detection against a truth CSV (pair precision/recall/F1 per threshold, and search: recall@k,
    mAP) and/or the store's reviewed pairs; the default row is what `duplicates` lists on the store. --fit
    proposes thresholds from the reviewed pairs (--apply saves them)."""
    from ..search.evaluate import evaluate as run_evaluation, write_eval_json
    from ..search.plots import plot_pr_curve

    if apply and not fit:
        raise InputError("--apply saves the thresholds of --fit: give --fit too")
    if truth is None and not decisions and not fit:
        raise InputError("give --truth FILE.csv, --decisions (the pairs reviewed in the store), or both")
    if plot is not None and truth is None:
        raise InputError("--plot draws the curve of --truth: give --truth too")
    for path in (out, plot):  # refuse a bad output folder before the work, not after it
        if path is not None:
            check_output_path(path)
    if plot is not None:
        from ..search.plots import plot_format

        plot_format(plot)
    doc: dict[str, Any] = {}
    if truth is not None:
        sweep = sorted({round(min_threshold, 6)} | {k / 100 for k in range(-100, 101) if k / 100 >= min_threshold})
        res = run_evaluation(store, truth, thresholds=sweep, threshold=threshold, loose_threshold=loose,
                             verify=verify, k=k, runtime=runtime, progress=_progress(quiet))
        typer.echo(res.table())
        doc["truth"] = res.to_dict()
        if plot is not None:
            plot_pr_curve(res, plot)
    if decisions or fit:
        from ..search.decided import apply_fit, evaluate_decisions, fit_thresholds

        if decisions:
            dec = evaluate_decisions(store, threshold=threshold, loose_threshold=loose, verify=verify, k=k,
                                     progress=_progress(quiet))
            typer.echo(("\n" if doc else "") + dec.table())
            doc["decisions"] = dec.to_dict()
        if fit:
            got = fit_thresholds(store, rule=fit_rule, min_precision=min_precision, verify=verify,
                                 threshold=threshold, loose_threshold=loose)
            typer.echo(("\n" if doc else "") + got.table())
            doc["fit"] = {**got.__dict__, "flags": got.flags(), "advice": got.advice()}
            if apply and not got.moved:
                typer.echo("nothing applied: the thresholds in use are already the best on these decisions")
            elif apply:
                where = apply_fit(store, got)
                typer.echo(f"applied: {got.settings().flags()} saved in {where}; every command on {store} uses them "
                           f"now (a flag on the command line still wins)")
            elif got.moved:
                typer.echo(f"pass {got.flags()} to duplicates, or save them for every command with --fit --apply")
    if out is not None:
        if list(doc) == ["truth"]:  # the document evaluate always wrote
            write_eval_json(res, out)
        else:
            from ..fileio import atomic_write

            text = json.dumps(doc, indent=1, ensure_ascii=False)
            atomic_write(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        typer.echo(f"wrote {out}")
    if plot is not None:
        typer.echo(f"wrote {plot}")
