"""Search, pairs files: a duplicates result as a pairs CSV and a groups JSON, and reading them back.

The report reads these files too, so a user can review a hand-edited pairs file. A groups JSON records the
pairs its groups came from (the pairs CSV written beside it, by name and digest, or the pairs themselves) and
the store generation they were found in, so that `report --groups` shows them without searching and verifying
again (`recorded_pairs`).
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from pathlib import Path

from ..errors import InputError
from ..fileio import atomic_write, check_output_path
from .dup_records import DuplicateReport, Pair


def write_pairs_csv(report: DuplicateReport, path: str | os.PathLike[str]) -> None:
    """Pairs as CSV: a_id, a_path, b_id, b_path, score, kind (exact pairs first, then by score), a_stale and
    b_stale ("missing" or "changed" for a file no longer as indexed, "alias" for another name of a listed file:
    never to delete as a duplicate of it), and when the pairs were verified:
    verified (true/false), inliers (empty for byte-identical pairs); last, decision: a person's decision on the
    pair ("duplicate"; empty: undecided; a pair decided distinct is never listed)."""
    path = Path(path)
    check_output_path(path)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            head = ["a_id", "a_path", "b_id", "b_path", "score", "kind", "a_stale", "b_stale"]
            w.writerow(head + (["verified", "inliers"] if report.verify else []) + ["decision"])
            for p in report.iter_pairs():
                row = [p.a_id, p.a_path, p.b_id, p.b_path, f"{p.score:.6f}", p.kind, p.a_stale or "", p.b_stale or ""]
                if report.verify:
                    row += ["true" if p.verified else "false", "" if p.inliers is None or p.inliers < 0 else p.inliers]
                w.writerow(row + [p.decision or ""])

    atomic_write(path, write)


#: Columns of the pairs a groups JSON holds when no pairs CSV was written with it.
PAIR_COLUMNS = ["a_id", "a_path", "b_id", "b_path", "score", "kind", "verified", "inliers", "a_stale", "b_stale"]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pairs_record(report: DuplicateReport, groups_path: Path | None, pairs_file: str | os.PathLike[str] | None
                  ) -> dict:
    """What a groups JSON says of its pairs: the generation, and the pairs CSV (its name relative to the groups
    file's folder, and digest) or, without one, the pairs themselves."""
    rec: dict = {"generation": report.generation, "count": report.n_pairs, "threshold": report.threshold,
                 "verified": report.verify}
    if pairs_file is not None:
        pf = Path(pairs_file)
        where = os.path.relpath(pf.resolve(), groups_path.resolve().parent) if groups_path is not None else str(pf)
        rec.update(file=where, sha256=file_sha256(pf))
    else:
        rec.update(columns=PAIR_COLUMNS, rows=[[p.a_id, p.a_path, p.b_id, p.b_path, p.score, p.kind, p.verified,
                                                p.inliers, p.a_stale, p.b_stale] for p in report.iter_pairs()])
    return rec


def groups_document(report: DuplicateReport, *, pairs_file: str | os.PathLike[str] | None = None,
                    groups_path: str | os.PathLike[str] | None = None, record_pairs: bool = True) -> dict:
    """The JSON-ready description of the groups, with the record of their pairs unless `record_pairs` is False
    (`pairs_file`: the pairs CSV written with them, else the pairs are held in the document; `groups_path`:
    where the document goes)."""
    if report.verify:
        rule = (f"complete linkage: every two members of a group are a verified pair (among each image's "
                f"{report.k} nearest neighbours scoring >= {report.loose_threshold:.4f}, geometrically verified) "
                f"or identical files")
    else:
        rule = "complete linkage: every two members of a group score >= threshold (identical files always match)"
    return {
        "store": report.store, "model": report.model, "threshold": report.threshold, "images": report.n,
        "verified": report.verify, "candidate_threshold": report.loose_threshold if report.verify else None,
        "rule": rule + "; a pair a person decided distinct never shares a group, one confirmed duplicate always "
                       "does (its member's decision is \"duplicate\"), and the keeper a person chose is the keeper "
                       "(keeper_decided)"
                       "; keeper = a file still as indexed, then largest resolution, then largest file, then oldest, "
                       "then path; a file gone or changed since it was indexed (size, modification time or "
                       "content) is listed as stale, and another name of a listed file (a symlink or hard link) as "
                       "stale \"alias\" with alias_of: never keeper nor removable",
        "stale": len(report.stale), "generation": report.generation,
        "pairs": _pairs_record(report, Path(groups_path) if groups_path is not None else None, pairs_file)
        if record_pairs else None,
        "decisions": {"confirmed": len(report.decisions), "distinct_hidden": report.hidden_distinct,
                      "new_only": report.new_only, "decided_hidden": report.hidden_decided},
        "groups": [{"group": k + 1, "size": len(g.members), "keeper": g.keeper,
                    "keeper_decided": g.keeper_decided,
                    "keeper_path": next(m.path for m in g.members if m.keeper),
                    "removable": [m.path for m in g.members if m.removable],
                    "stale": [m.path for m in g.members if m.stale], "members": [m.as_json() for m in g.members]}
                   for k, g in enumerate(report.groups)],
    }


def write_groups_json(report: DuplicateReport, path: str | os.PathLike[str], *,
                      pairs_file: str | os.PathLike[str] | None = None) -> None:
    """Groups as JSON (see groups_document): `pairs_file` is the pairs CSV just written from the same report
    (recorded by name and digest); without it, the pairs are written into the document."""
    path = Path(path)
    check_output_path(path)
    doc = groups_document(report, pairs_file=pairs_file, groups_path=path)
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
                verdicts: dict[str, bool | None] = {"true": True, "false": False, "": None}
                if (row.get("verified") or "").lower() not in verdicts:
                    raise InputError(f"{path}, line {line}: verified must be true or false, not {row['verified']!r}")
                ver = verdicts[(row.get("verified") or "").lower()]
                try:
                    inl = int(row["inliers"]) if row.get("inliers") else None
                except ValueError:
                    raise InputError(f"{path}, line {line}: inliers must be a whole number") from None
                decision = row.get("decision") or None
                if decision not in (None, "duplicate", "distinct"):
                    raise InputError(f"{path}, line {line}: decision must be duplicate, distinct or empty, "
                                     f"not {decision!r}")
                pairs.append(Pair(a_id, row["a_path"], b_id, row["b_path"], score, kind, ver, inl,
                                  row.get("a_stale") or None, row.get("b_stale") or None, decision))
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


def recorded_pairs(doc: dict, groups_path: str | os.PathLike[str], generation: str, *,
                   threshold: float | None = None, verify: bool | None = None) -> tuple[list[Pair] | None, str]:
    """The pairs a groups JSON (`doc`, read from `groups_path`) records, when they still hold for the store
    generation `generation` and the options asked (`threshold`, `verify`: None takes the file's): (pairs,
    where they came from); else (None, why they must be computed again)."""
    rec = doc.get("pairs")
    if not isinstance(rec, dict):
        return None, "the groups file records no pairs (written by hand, or by a neardup before 0.1's pairs record)"
    if not generation:
        return None, "the store records no generation (written before segments) to match the groups file with"
    if rec.get("generation") != generation:
        return None, (f"the groups file was written for store generation {rec.get('generation') or 'unknown'}, "
                      f"the store is now at {generation}")
    if verify is not None and bool(verify) != bool(rec.get("verified")):
        return None, f"--{'' if verify else 'no-'}verify was asked, the groups file's pairs were " + \
            ("verified" if rec.get("verified") else "not verified")
    if threshold is not None and not math.isclose(float(threshold), float(rec.get("threshold", math.nan)),
                                                  abs_tol=1e-6):
        return None, f"--threshold {threshold:.4f} was asked, the groups file's pairs are at {rec.get('threshold')}"
    if "file" in rec:
        path = Path(groups_path).parent / str(rec["file"])
        if not path.is_file():
            return None, f"its pairs file {path} is gone"
        if file_sha256(path) != rec.get("sha256"):
            return None, f"its pairs file {path} changed since the groups file was written"
        return read_pairs_csv(path), f"pairs from {path} (recorded in the groups file, generation {generation})"
    rows = rec.get("rows")
    if not isinstance(rows, list) or rec.get("columns") != PAIR_COLUMNS:
        return None, "the groups file's pairs record is not one neardup writes"
    try:
        pairs = [Pair(int(a), str(ap), int(b), str(bp), float(sc), str(kind), v, inl, ast, bst)
                 for a, ap, b, bp, sc, kind, v, inl, ast, bst in rows]
    except (TypeError, ValueError):
        return None, "the groups file's pairs record is damaged"
    return pairs, f"pairs held in the groups file (generation {generation})"


def thresholds_since(doc: dict, threshold: float, candidate_threshold: float | None) -> str | None:
    """None when a groups JSON (`doc`) was written under the thresholds that hold for its store now (`threshold`
    and, for verified groups, `candidate_threshold`: what the store's settings or the model give today); else
    which one changed (`neardup evaluate --fit --apply` since), to say that its groups are out of date. A file
    written before groups recorded their candidate threshold is checked on --threshold alone."""
    changed = []
    for name, now, then in (("--threshold", threshold, doc.get("threshold")),
                            ("--candidate-threshold", candidate_threshold if doc.get("verified") else None,
                             doc.get("candidate_threshold"))):
        if now is not None and isinstance(then, int | float) and not math.isclose(now, then, abs_tol=1e-6):
            changed.append(f"{name} {then:.4g} then, {now:.4g} now")
    return "; ".join(changed) or None
