"""Search, report: one self-contained HTML page of a store's duplicate groups and pairs.

The page opens offline: thumbnails are embedded as data: URIs, the data sits in a JSON island and a small
inline script renders one page of it at a time, so a report of thousands of pairs stays responsive. Every
file name reaches the page either HTML-escaped (the summary header) or through `textContent` (everything the
script renders), and the JSON island escapes `<`, `>` and `&`, so a name such as `</script><script>...`
is shown as text and never runs. A Content-Security-Policy allows only this page's own script (by hash) and
no network access at all, as a second line of defence. The page, its style and its script are package data
files in `templates/`; the CSP hash is computed from the script as loaded.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import html
import io
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..embed.decode import file_local_features, open_upright
from ..errors import DecodeError, InputError
from ..fileio import atomic_write, check_output_path, fmt_bytes, now_iso
from ..progress import Callback, Progress, stage_of
from ..store.decisions import JournalState
from ..store.generation import Generation
from ..store.handle import opened
from ..store.meta import Catalog
from ..threads import thread_pool
from .dup_records import DuplicateReport, Pair
from .duplicates import find_duplicates
from .pairs_io import groups_document, read_groups_json, read_pairs_csv, recorded_pairs, thresholds_since
from .plots import plot_pair
from .review import decisions_for
from .verify import Verification, row_features, verify_pair

log = logging.getLogger(__name__)

#: Longest side of an embedded thumbnail, in pixels.
THUMB_SIDE = 256
#: JPEG quality of embedded thumbnails: ~18 KB of base64 per photo, artefacts invisible at the 220 px shown.
THUMB_QUALITY = 75
#: Pairs (or groups) the page renders at once.
PAGE_SIZE = 100


@functools.cache
def template(name: str) -> str:
    """A file of the report's templates (package data: report.html, report.css, report.js, missing.svg)."""
    return resources.files(__package__).joinpath("templates").joinpath(name).read_text(encoding="utf-8")


def placeholder_uri() -> str:
    """The picture shown instead of a thumbnail when the image is missing or cannot be decoded, as a data URI."""
    return "data:image/svg+xml;base64," + base64.b64encode(template("missing.svg").strip().encode()).decode("ascii")


# ------------------------------------------------------------------------------------------------ thumbnails

def thumbnail_uri(path: str | os.PathLike[str], max_side: int = THUMB_SIDE,
                  quality: int = THUMB_QUALITY) -> str | None:
    """A `data:image/jpeg;base64,...` thumbnail of `path` (longest side <= max_side), or None if unreadable."""
    try:
        thumb = open_upright(path, max_side)
        buf = io.BytesIO()
        thumb.save(buf, "JPEG", quality=quality, optimize=True)
    except Exception as exc:  # Pillow raises many types; any failure means "show the placeholder"
        # info, not warning: write_report returns (and the CLI prints) the list of missing images
        log.info("no thumbnail for %s: %s", path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def make_thumbnails(paths: Iterable[str | os.PathLike[str]], *, workers: int | None = None,
                    max_side: int = THUMB_SIDE, progress: Callback | None = None) -> dict[str, str | None]:
    """Thumbnail every distinct path once, in parallel threads (Pillow releases the GIL while decoding).
    `progress` is called with (done, total) as thumbnails come.

    Returns {str(path): data URI or None}.
    """
    unique = list(dict.fromkeys(str(p) for p in paths))
    if not unique:
        return {}
    workers = workers or min(8, (os.cpu_count() or 2) + 2)
    out: dict[str, str | None] = {}
    with thread_pool(workers, "thumb") as pool:
        for path, uri in zip(unique, pool.map(lambda p: thumbnail_uri(p, max_side), unique)):
            out[path] = uri
            if progress is not None:
                progress(len(out), len(unique))
    return out


# ----------------------------------------------------------------------------------------------- the report

@dataclass
class ReportResult:
    """What write_report wrote."""

    out: Path
    pairs: int
    groups: int
    images: int  #: distinct images shown (each thumbnailed once)
    missing: list[str] = field(default_factory=list)  #: shown images that could not be read
    png_files: list[Path] = field(default_factory=list)
    seconds: float = 0.0


class _Images:
    """Distinct images of the report, indexed in first-seen order, with what the store knows about them."""

    def __init__(self, cat: Catalog, base: Path) -> None:
        self.cat, self.base = cat, base
        self.row = {p: r for r, p in enumerate(cat.paths)}
        self.index: dict[str, int] = {}

    def __call__(self, path: str) -> int:
        if path not in self.index:
            self.index[path] = len(self.index)
        return self.index[path]

    def absolute(self, path: str) -> Path:
        return self.base / path  # store paths are relative to the store's folder (absolute ones stay absolute)

    def common_folder(self) -> str:
        """The deepest folder holding every shown image, as stored ("" when there is none)."""
        parents = [os.path.dirname(os.path.normpath(p)) for p in self.index]
        try:
            return os.path.commonpath(parents) if parents else ""
        except ValueError:  # absolute and relative paths mixed
            return ""

    def documents(self, thumbs: dict[str, str | None]) -> list[dict]:
        """One JSON object per image: stored path p, display path d (relative to the common folder),
        thumbnail t (None: missing), file URI u of the original, width w, height h, size s."""
        common = self.common_folder()
        docs = []
        for path in self.index:
            r = self.row.get(path)
            full = self.absolute(path)
            try:
                uri = full.resolve().as_uri()
            except ValueError:
                uri = ""
            shown = os.path.relpath(os.path.normpath(path), common) if common else path
            docs.append({"p": path, "d": shown, "t": thumbs.get(str(full)), "u": uri,
                         "w": int(self.cat.widths[r]) if r is not None else 0,
                         "h": int(self.cat.heights[r]) if r is not None else 0,
                         "s": fmt_bytes(int(self.cat.sizes[r])) if r is not None else ""})
        return docs


def _json_island(data: dict) -> str:
    """JSON safe inside <script type="application/json">: no `<`, `>` or `&` can end the element early."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _csp_hash(source: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii")


def render_html(data: dict, summary: Sequence[tuple[str, str]], title: str) -> str:
    """The report page: summary rows (escaped here), controls, the JSON data island and the renderer script."""
    esc = html.escape
    script = "\n" + template("report.js")  # the leading newline as the page always had (the CSP hash covers it)
    rows = "\n".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in summary)
    csp = (f"default-src 'none'; img-src data: file:; style-src 'unsafe-inline'; "
           f"script-src '{_csp_hash(script)}'; base-uri 'none'; form-action 'none'")
    parts = {"CSP": esc(csp), "TITLE": esc(title), "SUMMARY": rows, "STYLE": "\n" + template("report.css"),
             "SCRIPT": script, "DATA": _json_island(data)}
    # One pass, so that a file name which happens to contain "%%DATA%%" is never expanded itself.
    return re.sub(r"%%([A-Z]+)%%", lambda m: parts[m.group(1)], template("report.html"))


def _inliers_of(gen: Generation, a: str, b: str, images: _Images) -> Verification | None:
    """The verification of a pair (stored paths) with its inlier points, for drawing: from the store's cached
    features, screened as duplicates screens, so the drawing shows what the verdict counted. A path not in
    the store is decoded as the store's model decodes (None when unreadable)."""
    mode = "L" if gen.meta.model.name == "phash" else "RGB"
    feats = []
    for p in (a, b):
        if p in images.row:
            feats += row_features(gen, np.array([images.row[p]]))
            continue
        try:
            feats.append(file_local_features(images.absolute(p), mode=mode))
        except (DecodeError, OSError) as exc:
            log.info("no inlier drawing for %s: %s", p, exc)
            return None
    return verify_pair(feats[0], feats[1], points=True, screen=True)


class _Reviewed:
    """The decisions recorded on the report's pairs (by the photos' content now): the page's badges."""

    def __init__(self, state: JournalState, cat: Catalog) -> None:
        self.state, self.sha = state, dict(zip(cat.paths, cat.sha256))

    def code(self, a: str, b: str) -> int:
        """0 undecided (or a path not in the store), 1 confirmed duplicate, 2 decided distinct."""
        da, db = self.sha.get(a), self.sha.get(b)
        d = self.state.get(da, db) if da and db and da != db and self.state.current else None
        return 0 if d is None else 1 if d.decision == "duplicate" else 2

    def keeper_chosen(self, keeper: str, others: list[str]) -> bool:
        """Whether a person chose `keeper` over one of `others` (a duplicate decision naming it)."""
        dk = self.sha.get(keeper)
        return any((d := self.state.get(dk, self.sha[o])) is not None and d.keeper == dk
                   for o in others if dk and o in self.sha and self.sha[o] != dk)

    def summary(self, pair_rows: list[list], group_rows: list[dict]) -> str:
        """The summary row: how many pairs and groups shown carry a decision."""
        dup, dis = sum(r[6] == 1 for r in pair_rows), sum(r[6] == 2 for r in pair_rows)
        chosen = sum(bool(g["d"]) for g in group_rows)
        where = f"{len(self.state.current)} pair(s) decided in the store's journal"
        return (f"{dup} pair(s) shown confirmed duplicate, {dis} decided distinct, {chosen} group keeper(s) chosen "
                f"by a person ({where})" + "".join(f"; {p}" for p in self.state.problems))


def _groups_from(doc_groups: list[dict], images: _Images, decided: _Reviewed) -> list[dict]:
    out = []
    for k, g in enumerate(doc_groups, start=1):
        members: list[dict[str, Any]] = [{"i": images(m["path"]), "k": bool(m.get("keeper")), "x": bool(m.get("exact")),
                    "s": round(float(m.get("score_to_keeper", 1.0)), 6),
                    "v": int(m.get("inliers_to_keeper", -1)) if isinstance(m.get("inliers_to_keeper"), int) else -1,
                    "st": str(m["stale"]) if m.get("stale") else "",  # never removable: gone, changed, an alias
                    "p": m["path"]}
                   for m in g["members"]]
        if members and not any(m["k"] for m in members):
            members[0]["k"] = True  # a hand-made file without keeper flags: its first member, as in our files
        members.sort(key=lambda m: not m["k"])  # keeper first, the rest in the file's order
        keeper = members[0]["p"] if members else ""
        for m in members:  # 1: confirmed a duplicate of the keeper, 2: decided distinct from it (a hand-made file)
            path = m.pop("p")
            m["dc"] = 0 if m["k"] else decided.code(keeper, path)
        others = [m["s"] for m in members if not m["k"]]
        chosen = decided.keeper_chosen(keeper, [m["path"] for m in g["members"] if m["path"] != keeper])
        out.append({"n": k, "lo": min(others) if others else 1.0, "m": members, "d": int(chosen)})
    return out


def write_report(store: Generation | str | os.PathLike[str], out: str | os.PathLike[str] = "report.html", *,
                 pairs: str | os.PathLike[str] | None = None, groups: str | os.PathLike[str] | None = None,
                 duplicates: DuplicateReport | None = None, threshold: float | None = None,
                 png_dir: str | os.PathLike[str] | None = None, page_size: int = PAGE_SIZE,
                 workers: int | None = None, verify: bool | None = None,
                 progress: Progress | None = None) -> ReportResult:
    """Write one self-contained HTML report of a store's duplicate groups and pairs to `out`.

    The pairs and groups come from `duplicates` (a find_duplicates result), else from the files `pairs`
    (CSV of `neardup duplicates --out`) and/or `groups` (JSON of `--groups`), else from
    find_duplicates(store, threshold=threshold). With files, `threshold` hides pairs scoring below it.
    Given groups alone, the pairs are those the groups file records (pairs_io.recorded_pairs: written by
    `duplicates` for the same store generation and options); else (said in a warning, with why) they are computed
    from the store at the groups file's threshold (or `threshold`), so the page is complete; given pairs alone,
    the page shows pairs only. `png_dir` (created if needed) gets one
    side-by-side PNG per pair, `pair_00001.png` for the report's pair #1, and so on; a verified pair's PNG
    draws its inlier matches. `verify` is find_duplicates' (when the pairs are computed here). `store` is an
    open Generation or a store's path. `progress` (default: silent) is told of each stage. Raises InputError
    (bad files, missing output folder) and StoreError.
    """
    with opened(store) as gen:
        t0 = time.perf_counter()
        out = Path(out)
        check_output_path(out)
        if png_dir is not None:
            if Path(png_dir).exists() and not Path(png_dir).is_dir():
                raise InputError(f"--png-dir {png_dir} is a file, not a folder")
            Path(png_dir).mkdir(parents=True, exist_ok=True)
        if page_size < 1:
            raise InputError("page size must be at least 1")
        store, cat = gen.path, gen.catalog
        images = _Images(cat, gen.folder)

        source: list[str] = []
        pair_list: list[Pair] | None = None
        group_docs: list[dict] | None = None
        t_shown: float | None = threshold
        if duplicates is None and pairs is None and groups is None:
            duplicates = find_duplicates(gen, threshold=threshold, verify=verify, progress=progress)
            source.append("computed from the store (neardup duplicates" + (", verified)" if duplicates.verify else ")"))
        if duplicates is not None:
            pair_list, t_shown = duplicates.pairs, duplicates.threshold
            group_docs = groups_document(duplicates, record_pairs=False)["groups"]
            source = source or ["a find_duplicates result"]
        else:
            if pairs is not None:
                pair_list = read_pairs_csv(pairs)
                if threshold is not None:
                    # pairs.csv holds scores rounded to 6 decimals: allow that rounding below the threshold.
                    pair_list = [p for p in pair_list if p.score >= threshold - 1e-6]
                source.append(f"pairs from {pairs}")
            if groups is not None:
                gdoc = read_groups_json(groups)
                group_docs = gdoc["groups"]
                if t_shown is None and isinstance(gdoc.get("threshold"), (int, float)):
                    t_shown = float(gdoc["threshold"])
                source.append(f"groups from {groups}")
                if threshold is None and verify is None and (since := thresholds_since(
                        gdoc, gen.threshold(), gen.candidate_threshold())):
                    # shown as written (its pairs and groups agree), but said to be out of date
                    log.warning("%s was written under other thresholds than the store applies now (%s): run "
                                "`neardup duplicates --groups` again for groups under them", groups, since)
                    source.append(f"written under other thresholds than the store applies now ({since}): run "
                                  f"neardup duplicates again for groups under them")
            if pair_list is None:  # groups alone would show "Pairs (0)": the pairs they were made from...
                assert groups is not None  # given files, and no pairs file: a groups file
                pair_list, why = recorded_pairs(gdoc, groups, gen.id, threshold=threshold, verify=verify)
                if pair_list is not None:
                    source.append(why)
                else:  # ...or, when those no longer hold, the pairs computed again at the groups' threshold
                    log.warning("%s: computing the pairs from the store again (every candidate searched and verified): "
                                "%s", groups, why)
                    computed = find_duplicates(gen, threshold=t_shown, verify=verify, progress=progress)
                    t_shown, pair_list = computed.threshold, computed.pairs
                    source.append(f"pairs computed from the store at {computed.threshold:.4f} ({why})")

        # Sorted by score, highest first; a stable sort keeps the file's order among equal scores.
        ordered = sorted(pair_list or [], key=lambda p: -p.score)
        # the decisions recorded now (by content: whatever file the pairs came from); 1 duplicate, 2 distinct
        decided = _Reviewed(decisions_for(gen), cat)
        pair_rows = [[images(p.a_path), images(p.b_path), round(float(p.score), 6), 1 if p.kind == "exact" else 0,
                      -1 if p.verified is None else int(p.verified), -1 if p.inliers is None else int(p.inliers),
                      decided.code(p.a_path, p.b_path)] for p in ordered]
        group_rows = _groups_from(group_docs or [], images, decided)

        t1 = time.perf_counter()
        with stage_of(progress, "thumbnails", len(images.index), "img") as bar:
            thumbs = make_thumbnails([images.absolute(p) for p in images.index], workers=workers, progress=bar)
        image_docs = images.documents(thumbs)
        missing = [d["p"] for d in image_docs if d["t"] is None]
        log.info("%d thumbnails in %.1f s (%d missing)", len(image_docs), time.perf_counter() - t1, len(missing))

        scores = [r[2] for r in pair_rows] + [m["s"] for g in group_rows for m in g["m"] if not m["k"]]
        lo = float(np.floor(min(scores) * 100) / 100) if scores else 0.0
        hi = max(1.0, float(np.ceil(max(scores) * 1e6) / 1e6)) if scores else 1.0
        data = {"page_size": int(page_size), "placeholder": placeholder_uri(), "images": image_docs,
                "pairs": pair_rows, "groups": group_rows, "has_pairs": pair_list is not None,
                "has_groups": group_docs is not None, "lo": lo, "hi": hi}

        png_files: list[Path] = []
        if png_dir is not None:
            with stage_of(progress, "pair images", len(ordered), "pairs") as bar:
                for k, p in enumerate(ordered, start=1):
                    target = Path(png_dir) / f"pair_{k:05d}.png"
                    plot_pair(images.absolute(p.a_path), images.absolute(p.b_path), p.score, target, strict=False,
                              verification=_inliers_of(gen, p.a_path, p.b_path, images)
                              if p.verified is not None and p.kind != "exact" else None)
                    png_files.append(target)
                    bar(k, len(ordered))

        exact = sum(r[3] for r in pair_rows)
        seconds = time.perf_counter() - t0
        summary = [
            ("store", str(store)), ("model", f"{cat.meta.model.name} (weights {cat.meta.model.weights})"),
            ("threshold", f"{t_shown:.4f}" if t_shown is not None else "as in the pairs file"),
            ("images in store", str(len(cat))),
            ("pairs", f"{len(pair_rows)} ({exact} exact, {len(pair_rows) - exact} near)" if pair_list is not None
             else "not given"),
            ("groups", f"{len(group_rows)} ({sum(not m['k'] and not m['st'] for g in group_rows for m in g['m'])} "
                       f"removable images)"
             if group_docs is not None else "not given"),
            ("images shown", f"{len(image_docs)} ({len(missing)} missing or unreadable)"),
            ("images under", str((store.parent / images.common_folder()).resolve())),
            ("decisions", decided.summary(pair_rows, group_rows)),
            ("source", "; ".join(source)),
            ("generated", f"{now_iso()} in {seconds:.1f} s"),
        ]
        page = render_html(data, summary, f"neardup report: {store.name}")
        atomic_write(out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
        log.info("wrote %s (%d bytes)", out, len(page))
        return ReportResult(out=out, pairs=len(pair_rows), groups=len(group_rows), images=len(image_docs),
                            missing=missing, png_files=png_files, seconds=time.perf_counter() - t0)
