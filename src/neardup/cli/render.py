"""What the commands print: run summaries, the index line, query rows, notes on stale photos."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ..fileio import fmt_bytes
from .base import _show

if TYPE_CHECKING:
    from ..indexer.build import RunSummary
    from ..search.query import QueryResult


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

    if meta is None:
        m = read_meta(store).model
        model, weights = m.name, m.weights
    else:  # a query's Answer: its model's name and weights
        model, weights = meta.model, meta.weights
    if weights == "none" and model in ("resnet50", "vgg16"):
        typer.echo(f"neardup: note: {store} uses random weights (--weights none): its scores show the plumbing, "
                   f"not which photos are alike", err=True)


def _index_line(meta: Any) -> str:
    """The store's FAISS index as `info` shows it: what was built, why, and its measured recall."""
    asked = f"asked {meta.index.kind}" + (f", memory {fmt_bytes(meta.index.memory)}" if meta.index.memory else "")
    if meta.index.factory == "Flat":
        return f"Flat (exact; {asked})"
    return (f"{meta.index.factory} at {meta.index.params or 'its defaults'}: recall@10 {meta.index.recall:.3f} "
            f"against exact search on {meta.index.recall_queries} store vectors (target {meta.index.target:.2f}; "
            f"{asked})")


def _match_rows(r: QueryResult, threshold: float) -> list[dict]:
    return [{"rank": m.rank, "score": round(m.score, 6), "id": m.id, "path": m.path,
             "match": r.is_match(m, threshold), "verified": m.verified, "inliers": m.inliers}
            for m in r.matches]


def _query_rows(results: list[QueryResult], threshold: float) -> list[dict]:
    return [{"query": r.query, **row} for r in results for row in _match_rows(r, threshold)]


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
