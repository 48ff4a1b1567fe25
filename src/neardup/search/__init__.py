"""neardup search stages: verify → query → duplicates → report / evaluate (figures in `plots`).

The design card's `search` package; it lives inside `neardup` because a top-level package named `search`
would collide with users' own `search.py`. Names are re-exported lazily: importing this package loads
nothing, so the report and evaluation modules (and matplotlib) load only when used. Functions named like
their modules (query, evaluate) are not re-exported here: once the module is imported, Python binds the
package attribute to the module. Import them from `neardup` or from their modules.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # what type checkers and editors see (`X as X`: re-exported); at run time each name
    # loads its module on first use (_EXPORTS below; tests/test_package.py checks that the two agree)
    from .duplicates import (
        DuplicateReport as DuplicateReport,
        Group as Group,
        Member as Member,
        Pair as Pair,
        complete_linkage as complete_linkage,
        connected_components as connected_components,
        duplicate_rows as duplicate_rows,
        exact_pairs as exact_pairs,
        find_duplicates as find_duplicates,
        knn_pairs as knn_pairs,
        self_join as self_join,
    )
    from .evaluate import (
        EvalOptions as EvalOptions,
        EvalResult as EvalResult,
        pair_metrics as pair_metrics,
        read_truth as read_truth,
        retrieval_metrics as retrieval_metrics,
        retrieval_metrics_blocked as retrieval_metrics_blocked,
        write_eval_json as write_eval_json,
    )
    from .pairs_io import (
        groups_document as groups_document,
        read_groups_json as read_groups_json,
        read_pairs_csv as read_pairs_csv,
        write_groups_json as write_groups_json,
        write_pairs_csv as write_pairs_csv,
    )
    from .plots import plot_pair as plot_pair, plot_pr_curve as plot_pr_curve
    from .query import (
        Match as Match,
        QueryResult as QueryResult,
        Searcher as Searcher,
        compare as compare,
        has_match as has_match,
        neighbours as neighbours,
    )
    from .report import (
        ReportResult as ReportResult,
        make_thumbnails as make_thumbnails,
        thumbnail_uri as thumbnail_uri,
        write_report as write_report,
    )
    from .verify import (
        Verification as Verification,
        Verified as Verified,
        rerank as rerank,
        verify_pair as verify_pair,
        verify_pairs as verify_pairs,
    )

_EXPORTS = {
    **dict.fromkeys(["Match", "QueryResult", "Searcher", "compare", "has_match", "neighbours"], ".query"),
    **dict.fromkeys(["DuplicateReport", "Group", "Member", "Pair", "complete_linkage", "connected_components",
                     "duplicate_rows", "exact_pairs", "find_duplicates", "knn_pairs", "self_join"], ".duplicates"),
    **dict.fromkeys(["groups_document", "write_groups_json", "write_pairs_csv", "read_pairs_csv",
                     "read_groups_json"], ".pairs_io"),
    **dict.fromkeys(["Verification", "Verified", "rerank", "verify_pair", "verify_pairs"], ".verify"),
    **dict.fromkeys(["EvalOptions", "EvalResult", "pair_metrics", "read_truth", "retrieval_metrics",
                     "retrieval_metrics_blocked", "write_eval_json"], ".evaluate"),
    **dict.fromkeys(["ReportResult", "make_thumbnails", "thumbnail_uri", "write_report"], ".report"),
    **dict.fromkeys(["plot_pair", "plot_pr_curve"], ".plots"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
