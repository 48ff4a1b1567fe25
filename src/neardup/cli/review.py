"""The `review` commands: decisions people made about pairs (duplicate or distinct), imported and exported as
CSV; and what `duplicates` and `info` say about them."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import DEFAULTS
from .base import _show, app, handled
from .options import StoreOpt, VerboseOpt

review_app = typer.Typer(
    name="review", no_args_is_help=True, rich_markup_mode=None,
    help="Decisions on pairs of photos (duplicate, with a keeper, or distinct), kept in the store's journal "
         "(<store>.decisions) by the photos' content: they survive renames, moves, update, compaction, restore "
         "and repair. `duplicates` never lists a pair decided distinct nor groups through one, marks confirmed "
         "pairs and keeps their keeper; `duplicates --new-only` lists only the pairs nobody decided.")
app.add_typer(review_app, name="review")

#: `duplicates --new-only` (declared here, used by cli/searching.py).
NewOnlyOpt = Annotated[bool, typer.Option(
    "--new-only", help="List only the pairs nobody decided (see `neardup review`), and the groups holding one: "
    "the nightly delta. Pairs decided distinct are never listed, with or without it.")]


@review_app.command("import")
@handled
def import_cmd(
    csv_file: Annotated[Path, typer.Argument(metavar="FILE.csv", help=(
        "CSV with the columns a,b,decision[,keeper]: a and b are photos as `duplicates` writes them (stored "
        "paths), paths from here or ids; decision is duplicate, distinct or undecided (takes a pair's decision "
        "back); keeper (duplicates only) is a's or b's path, or the word a or b. A `review export` file, and a "
        "`duplicates --out` pairs CSV with its decision column filled in, import as they are."))],
    store: StoreOpt = Path(DEFAULTS.store), verbose: VerboseOpt = 0,
) -> None:
    """Record the decisions of a CSV, all or nothing: any bad row (a photo not in the store, an unknown column
    or decision, a keeper that is neither photo, two rows on one pair that disagree, a photo paired with
    itself) is listed with its line number, and nothing is recorded (exit 2). A row repeating a pair's current
    decision is not recorded again."""
    from ..search.review import BadRowsError, import_decisions

    try:
        result = import_decisions(store, csv_file)
    except BadRowsError as exc:
        typer.echo(f"neardup: error: {_show(exc.path)}: {len(exc.rows)} bad row(s); nothing was recorded", err=True)
        for line in exc.lines():
            typer.echo(f"  {_show(line)}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{result.rows} row(s) read: {result.recorded} decision(s) recorded, {result.unchanged} already "
               f"decided the same way")


@review_app.command("export")
@handled
def export_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV to write: a,b,decision,keeper (paths as the store "
                                      "knows them now), then a_sha256,b_sha256,at,source,note.")],
    store: StoreOpt = Path(DEFAULTS.store), verbose: VerboseOpt = 0,
) -> None:
    """Write every current decision with the photos' paths as the store knows them now (a photo renamed or moved
    since shows its new path). A decision about a photo no longer in the store is not written: it stays in the
    journal, and applies again if that content is indexed again. The file imports again as it is."""
    from ..search.review import decisions_for, export_decisions

    n = export_decisions(store, out)
    state = decisions_for(store)
    gone = len(state.current) - n
    typer.echo(f"wrote {n} decision(s) to {_show(out)}" + (
        f"; {gone} more are about photos no longer in the store (kept in the journal, not written)" if gone else ""))
    for problem in state.problems:
        typer.echo(f"neardup: warning: {_show(problem)}", err=True)


def say_decisions(report: Any) -> None:
    """The line `duplicates` prints about decisions (nothing when no pair it found was decided)."""
    if report.decisions or report.hidden_distinct or report.hidden_decided:
        typer.echo(f"decisions: {len(report.decisions)} confirmed pair(s) marked, {report.hidden_distinct} pair(s) "
                   f"decided distinct not listed" + (f", {report.hidden_decided} decided pair(s) not listed "
                                                     f"(--new-only)" if report.new_only else ""))
    for problem in report.decision_problems:
        typer.echo(f"neardup: warning: decisions: {_show(problem)}", err=True)


def decisions_line(info: dict) -> str:
    """The `info` row of the decisions journal."""
    if not info["exists"]:
        return "none recorded yet (`neardup review import`, or the review page)"
    return (f"{info['pairs']} pair(s) decided ({info['records']} decision(s) recorded) in {info['file']}"
            + "".join(f"; {p}" for p in info["problems"]))
