"""neardup search stages: verify → query → duplicates → report / evaluate (figures in `plots`).

The design card's `search` package; it lives inside `neardup` because a top-level package named `search`
would collide with users' own `search.py`. Names are re-exported lazily: importing this package loads
nothing, so the report and evaluation modules (and matplotlib) load only when used. Functions named like
their modules (query, evaluate) are not re-exported here: once the module is imported, Python binds the
package attribute to the module. Import them from `neardup` or from their modules.
"""
from __future__ import annotations

from .._lazy import lazy_exports

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
