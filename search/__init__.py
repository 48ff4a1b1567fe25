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
