"""Search, truth: read a ground-truth CSV (path, group, and optionally class and role).

See search/evaluate.py for what the columns mean.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError


@dataclass(frozen=True)
class TruthRow:
    """One row of a truth CSV: the path as written and resolved, its group, class and role ("" or "query")."""

    written: str
    full: Path
    group: str
    cls: str = ""
    role: str = ""


ROLES = ("", "query")


def read_truth_rows(truth: str | os.PathLike[str]) -> list[TruthRow]:
    """Rows of a truth CSV (header path,group[,class][,role]). Raises InputError."""
    truth = Path(truth)
    if not truth.is_file():
        raise InputError(f"no truth file at {truth}")
    base = truth.resolve().parent
    rows: dict[Path, TruthRow] = {}
    try:
        with open(truth, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            if "path" not in cols or "group" not in cols:
                raise InputError(f"{truth} must be a CSV with the header path,group "
                                 f"(found: {','.join(cols) or 'nothing'})")
            for line, raw in enumerate(reader, start=2):
                row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
                if not row.get("path"):
                    raise InputError(f"{truth}, line {line}: empty path")
                role = row.get("role", "").lower()
                if role not in ROLES:
                    raise InputError(f"{truth}, line {line}: role must be empty or 'query', not {row['role']!r}")
                full = Path(os.path.normpath(base / row["path"])).resolve()
                new = TruthRow(row["path"], full, row.get("group", ""), row.get("class", ""), role)
                old = rows.setdefault(full, new)
                if old.group != new.group:
                    raise InputError(f"{truth}, line {line}: {row['path']} is listed in two groups "
                                     f"({old.group!r} and {new.group!r})")
                if (old.cls, old.role) != (new.cls, new.role):
                    raise InputError(f"{truth}, line {line}: {row['path']} is listed twice with another class "
                                     f"or role")
    except UnicodeDecodeError:
        raise InputError(f"{truth} is not a UTF-8 text file") from None
    except csv.Error as exc:
        raise InputError(f"{truth} is not a readable CSV ({exc})") from None
    if not rows:
        raise InputError(f"{truth} lists no images")
    return list(rows.values())


def read_truth(truth: str | os.PathLike[str]) -> list[tuple[str, Path, str]]:
    """Rows of a truth CSV as (path as written, resolved absolute path, group). Raises InputError."""
    return [(r.written, r.full, r.group) for r in read_truth_rows(truth)]


def catalogue_paths(truth: str | os.PathLike[str]) -> list[Path]:
    """The photos a truth CSV expects in the store (every row but role=query), for `index --from-truth`: a store
    indexed from them holds exactly the truth's catalogue. Raises InputError."""
    paths = [r.full for r in read_truth_rows(truth) if r.role != "query"]
    if not paths:
        raise InputError(f"{truth} lists no catalogue photo (every row has role=query)")
    return paths
