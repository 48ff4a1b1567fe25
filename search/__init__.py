"""neardup search: query → duplicates → report / evaluate."""
from __future__ import annotations

from .duplicates import (DuplicateReport, Group, Pair, complete_linkage, connected_components,  # noqa: F401
                         duplicate_rows, exact_pairs, find_duplicates, groups_document, self_join,
                         write_groups_json, write_pairs_csv)
from .query import (Match, QueryResult, Searcher, compare, has_match, neighbours, query,  # noqa: F401
                    resolve_threshold, store_embedder)

__all__ = [
    "find_duplicates", "self_join", "exact_pairs", "connected_components", "complete_linkage", "duplicate_rows",
    "DuplicateReport", "Pair", "Group", "write_pairs_csv", "write_groups_json", "groups_document",
    "query", "compare", "Searcher", "QueryResult", "Match", "has_match", "neighbours", "resolve_threshold",
    "store_embedder",
]

from .evaluate import (EvalResult, evaluate, pair_metrics, plot_pr_curve, read_truth,  # noqa: E402,F401
                       retrieval_metrics, retrieval_metrics_blocked, write_eval_json)
from .report import ReportResult, make_thumbnails, plot_pair, thumbnail_uri, write_report  # noqa: E402,F401

__all__ += [
    "write_report", "ReportResult", "plot_pair", "thumbnail_uri", "make_thumbnails",
    "evaluate", "EvalResult", "pair_metrics", "retrieval_metrics", "retrieval_metrics_blocked", "read_truth",
    "write_eval_json", "plot_pr_curve",
]
