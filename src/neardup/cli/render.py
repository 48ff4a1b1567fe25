"""What the commands print: run summaries, the index line, query rows, notes on stale photos."""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ..fileio import fmt_bytes
from .base import _show

if TYPE_CHECKING:
    from ..indexer.build import RunSummary
    from ..search.query import Answer, QueryResult
    from ..store.handle import StoreInfo


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


def _warn_random_weights(store: Path, meta: Any = None) -> None:
    """Seeded random CNN weights give every photo a score near 1: say so wherever such a store is used."""
    from ..store.handle import read_meta
    from ..store_embedder import random_weights

    if meta is None:  # the store's meta; else a query's Answer, which names its model and weights
        m = read_meta(store).model
        model, weights = m.name, m.weights
    else:
        model, weights = meta.model, meta.weights
    if random_weights(model, weights):
        typer.echo(f"neardup: note: {store} uses random weights (--weights none): its scores show the plumbing, "
                   f"not which photos are alike", err=True)


def _print_info(about: StoreInfo, extra: Sequence[tuple[str, str]] = ()) -> None:
    """`neardup info` as a table (store.handle.StoreInfo; `info --json` writes its to_json), with `extra` rows
    (the decisions journal, the applied settings) before the check."""
    meta, size, segs, dead, previous = about.meta, about.sizes, about.segments, about.dead_rows, about.previous
    m = meta.model
    layout = (f"{len(segs)} in {about.segments_dir} ({fmt_bytes(size['segments'])}"
              + (f"; {dead} deleted rows until compaction" if dead else "") + ")") if meta.schema_version > 1 else \
        "none: written before segments (schema 1; `neardup update` rewrites it as segments)"
    rows = [("store", f"{about.store} (manifest {fmt_bytes(size['manifest'])}, {fmt_bytes(about.total_bytes)} in all)"),
            ("generation", meta.generation or "not recorded"), ("segments", layout),
            ("images", str(meta.count)), ("failed", str(meta.failures)), ("model", m.name),
            ("weights", f"{m.weights} (fingerprint {m.weights_fingerprint})"), ("dim", str(m.dim)),
            ("input", f"{m.input_size}x{m.input_size}"), ("preprocessing", m.preprocessing),
            ("runtime", f"{m.runtime or 'not recorded'}, {m.precision}"
             + (f" ({m.quantized_file}; {m.calibration})" if m.quantized_file else "")),
            ("local features", f"{meta.local_features} (cached for --verify)" if meta.local_features else
             "none: --verify extracts them from the files (a store made before they were cached)"),
            ("faiss index", _index_line(meta) + (f", {fmt_bytes(size['index'])} on disk" if size["index"] else
                                                 ", searched from the stored vectors (no file)")),
            ("normalization", m.normalization), ("created", meta.created), ("updated", meta.updated),
            ("neardup", f"{meta.neardup_version} (schema {meta.schema_version})"),
            ("previous", "none kept yet" if not previous else
             f"{previous.path}: damaged ({previous.damaged}), cannot be restored" if previous.damaged is not None else
             f"{previous.path} ({previous.count} images, written {previous.updated}; "
             f"`neardup restore` makes it current)"), *extra]
    if about.problems is not None:
        rows.append(("check", "; ".join(about.problems) if about.problems else
                     "ok: every block of every segment and every index file match their digests"))
    for k, v in rows:
        typer.echo(f"{k:>14}  {_show(v)}")
    for p, r in about.failures:
        typer.echo(f"  skipped {_show(p)}: {r}")


def _index_line(meta: Any) -> str:
    """The store's FAISS index as `info` shows it: what was built, why, and its measured recall."""
    asked = f"asked {meta.index.kind}" + (f", memory {fmt_bytes(meta.index.memory)}" if meta.index.memory else "")
    if meta.index.factory == "Flat":
        return f"Flat (exact; {asked})"
    return (f"{meta.index.factory} at {meta.index.params or 'its defaults'}: recall@10 {meta.index.recall:.3f} "
            f"against exact search on {meta.index.recall_queries} store vectors (target {meta.index.target:.2f}; "
            f"{asked})")


def _place(path: str | os.PathLike[str], base: Path | None = None) -> str:
    """A path as printed: relative to the current folder when it lies under it, else absolute, so that it opens
    from where the command ran. A stored path is relative to its store's folder `base`."""
    p = Path(path)
    if base is not None and not p.is_absolute():
        p = base / p
    p = Path(os.path.abspath(p))
    try:
        return _show(p.relative_to(Path.cwd()))
    except ValueError:
        return _show(p)


def _store_folder(store: str | os.PathLike[str]) -> Path:
    """The folder a store's paths are relative to: its real file's (through symlinks)."""
    from ..store.files import StoreFiles

    return StoreFiles.resolved(store).store.parent


def _csv_value(v: object) -> object:
    """A CSV cell as neardup writes them: booleans true/false (lower case, in every CSV), None empty."""
    return ("true" if v else "false") if isinstance(v, bool) else v


def _query_csv(answer: Answer) -> str:
    """`query --csv`: one row per match (the fields of Answer.to_json), then one per photo that failed."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["query", "rank", "score", "id", "path", "match", "verified", "inliers",
                                        "decision", "keeper", "error"])
    w.writeheader()
    doc = answer.to_json()
    for r, res in zip(answer.results, doc["results"]):
        w.writerows({"query": r.query, **{k: _csv_value(v) for k, v in m.items()}} for m in res["matches"])
    w.writerows({"query": r.query, "error": r.error} for r in answer.results if r.error)
    return buf.getvalue()


def _verdict(r: QueryResult, t: float, base: Path | None) -> str:
    """The verdict line of one photo: its match and why (verified, or its score against the threshold), or
    why it is new."""
    m = r.first_match(t)
    if m is None:
        return "new: no verified match" if r.verified else f"new: no match at or above {t:.4f}"
    where = _place(m.path, base) if base is not None else _show(m.path)
    if r.verified and m.verified:
        return f"match: {where} (verified, {m.inliers} inliers)"
    return f"match: {where} (score {m.score:.4f} >= threshold {t:.4f})"


def _print_answer(answer: Answer, base: Path | None) -> None:
    """`query`'s text: per photo a verdict line, then its neighbours (verified ones marked, re-ranked by
    verification when it ran). Catalogue paths are shown from the current folder when the store's folder
    `base` is known (a local store), else as the server stored them."""
    t = answer.threshold
    for r in answer.results:
        typer.echo(_place(r.query))
        if r.error:
            typer.echo(f"  skipped: {r.error}")
            continue
        typer.echo(f"  {_verdict(r, t, base)}")
        typer.echo(f"  {'rank':>4}  {'score':>7}  {'id':>7}  " + ("verified  inliers  " if r.verified else "") + "path"
                   + ("  (re-ranked by verification: verified first, then by inliers)" if r.verified else ""))
        for m in r.matches:
            mark = ("  <- match" if r.is_match(m, t) else "") + (
                f"  [reviewed: {m.decision}{', keep this one' if m.keeper else ''}]" if m.decision else "")
            said = f"{'-' if m.verified is None else 'yes' if m.verified else 'no':>8}  " \
                   f"{'-' if m.inliers is None else m.inliers:>7}  " if r.verified else ""
            where = _place(m.path, base) if base is not None else _show(m.path)
            typer.echo(f"  {m.rank:>4}  {m.score:7.4f}  {m.id:>7}  {said}{where}{mark}")


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
    return sum(1 for g in report.groups for m in g.members if m.removable)
