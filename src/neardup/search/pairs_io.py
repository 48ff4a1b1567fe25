"""Search stage 2b, pairs files: a duplicates result as a pairs CSV and a groups JSON, and reading them back.

The report reads these files too, so a user can review a hand-edited pairs file.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from ..errors import InputError
from ..fileio import atomic_write, check_output_path
from .duplicates import DuplicateReport, Pair

def write_pairs_csv(report: DuplicateReport, path: str | os.PathLike[str]) -> None:
    """Pairs as CSV: a_id, a_path, b_id, b_path, score, kind (exact pairs first, then by score), a_stale and
    b_stale ("missing" or "changed" for a file no longer as indexed, "alias" for another name of a listed file:
    never to delete as a duplicate of it), and when the pairs were verified:
    verified (true/false), inliers (empty for byte-identical pairs)."""
    path = Path(path)
    check_output_path(path)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            head = ["a_id", "a_path", "b_id", "b_path", "score", "kind", "a_stale", "b_stale"]
            w.writerow(head + (["verified", "inliers"] if report.verify else []))
            for p in report.iter_pairs():
                row = [p.a_id, p.a_path, p.b_id, p.b_path, f"{p.score:.6f}", p.kind, p.a_stale or "", p.b_stale or ""]
                if report.verify:
                    row += ["true" if p.verified else "false", "" if p.inliers is None or p.inliers < 0 else p.inliers]
                w.writerow(row)

    atomic_write(path, write)


def groups_document(report: DuplicateReport) -> dict:
    """The JSON-ready description of the groups."""
    if report.verify:
        rule = (f"complete linkage: every two members of a group are a verified pair (among each image's "
                f"{report.k} nearest neighbours scoring >= {report.loose_threshold:.4f}, geometrically verified) "
                f"or identical files")
    else:
        rule = "complete linkage: every two members of a group score >= threshold (identical files always match)"
    return {
        "store": report.store, "model": report.model, "threshold": report.threshold, "images": report.n,
        "verified": report.verify,
        "rule": rule + "; keeper = a file still as indexed, then largest resolution, then largest file, then oldest, "
                       "then path; a file gone or changed since it was indexed (size, modification time or "
                       "content) is listed as stale, and another name of a listed file (a symlink or hard link) as "
                       "stale \"alias\" with alias_of: never keeper nor removable",
        "stale": len(report.stale),
        "groups": [{"group": k + 1, "size": len(g.members), "keeper": g.keeper,
                    "keeper_path": next(m["path"] for m in g.members if m["keeper"]),
                    "removable": [m["path"] for m in g.members if not m["keeper"] and not m.get("stale")],
                    "stale": [m["path"] for m in g.members if m.get("stale")], "members": g.members}
                   for k, g in enumerate(report.groups)],
    }


def write_groups_json(report: DuplicateReport, path: str | os.PathLike[str]) -> None:
    """Groups as JSON (see groups_document)."""
    path = Path(path)
    check_output_path(path)
    doc = groups_document(report)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1, ensure_ascii=False),
                                                        encoding="utf-8"))


def read_pairs_csv(path: str | os.PathLike[str]) -> list[Pair]:
    """Read a pairs CSV as written by `neardup duplicates --out` (a_path, b_path, score; a_id, b_id, kind optional).

    Raises InputError for a missing file, missing columns or a bad score.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no pairs file at {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = {c.strip() for c in (reader.fieldnames or [])}
            need = {"a_path", "b_path", "score"}
            if not need <= cols:
                raise InputError(f"{path} is not a pairs CSV: it needs the columns a_path,b_path,score "
                                 f"(found: {','.join(sorted(cols)) or 'nothing'})")
            pairs = []
            for line, row in enumerate(reader, start=2):
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                try:
                    score = float(row["score"])
                    a_id, b_id = int(row.get("a_id") or -1), int(row.get("b_id") or -1)
                except ValueError:
                    raise InputError(f"{path}, line {line}: bad score or id") from None
                if not math.isfinite(score):
                    raise InputError(f"{path}, line {line}: the score must be a number, not {row['score']!r}")
                if not row["a_path"] or not row["b_path"]:
                    raise InputError(f"{path}, line {line}: empty path")
                kind = row.get("kind") or "near"
                if kind not in ("exact", "near"):
                    raise InputError(f"{path}, line {line}: kind must be exact or near, not {kind!r}")
                ver = {"true": True, "false": False, "": None}.get((row.get("verified") or "").lower(), "bad")
                if ver == "bad":
                    raise InputError(f"{path}, line {line}: verified must be true or false, not {row['verified']!r}")
                try:
                    inl = int(row["inliers"]) if row.get("inliers") else None
                except ValueError:
                    raise InputError(f"{path}, line {line}: inliers must be a whole number") from None
                pairs.append(Pair(a_id, row["a_path"], b_id, row["b_path"], score, kind, ver, inl,
                                  row.get("a_stale") or None, row.get("b_stale") or None))
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a UTF-8 text file") from None
    return pairs


def read_groups_json(path: str | os.PathLike[str]) -> dict:
    """Read a groups JSON as written by `neardup duplicates --groups` (see groups_document).

    Raises InputError for a missing file or a document without groups of members with paths.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no groups file at {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not a JSON file ({exc})") from None
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if not isinstance(groups, list):
        raise InputError(f"{path} is not a groups JSON: it has no \"groups\" list")
    for k, g in enumerate(groups, start=1):
        members = g.get("members") if isinstance(g, dict) else None
        if not isinstance(members, list) or not all(isinstance(m, dict) and isinstance(m.get("path"), str)
                                                    for m in members):
            raise InputError(f"{path}: group {k} has no list of members with paths")
        for m in members:
            s = m.get("score_to_keeper", 1.0)
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise InputError(f"{path}: group {k} has a member whose score_to_keeper is not a number")
    return doc
