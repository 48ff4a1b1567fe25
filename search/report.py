"""Report stage: one self-contained HTML page of duplicate groups and pairs, and side-by-side pair plots.

The page opens offline: thumbnails are embedded as data: URIs, the data sits in a JSON island and a small
inline script renders one page of it at a time, so a report of thousands of pairs stays responsive. Every
file name reaches the page either HTML-escaped (the summary header) or through `textContent` (everything the
script renders), and the JSON island escapes `<`, `>` and `&`, so a name such as `</script><script>...`
is shown as text and never runs. A Content-Security-Policy allows only this page's own script (by hash) and
no network access at all, as a second line of defence.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from indexer import Catalog, read_catalog
from indexer.decode import load_upright
from indexer.errors import InputError
from indexer.store import atomic_write, check_output_path, now_iso

from .duplicates import DuplicateReport, Pair, find_duplicates, groups_document

if TYPE_CHECKING:  # matplotlib is imported only when a plot is drawn (it costs ~0.3 s at start-up)
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

#: Longest side of an embedded thumbnail, in pixels.
THUMB_SIDE = 256
#: JPEG quality of embedded thumbnails: ~18 KB of base64 per photo, artefacts invisible at the 220 px shown.
THUMB_QUALITY = 75
#: Pairs (or groups) the page renders at once.
PAGE_SIZE = 100
#: Size of the side-by-side pair plot in inches, and its resolution: a fixed 1000x500 px PNG.
PLOT_FIGSIZE = (10.0, 5.0)
PLOT_DPI = 100
#: Images are shrunk to at most this many pixels before plotting; a panel is ~480 px wide.
PLOT_MAX_SIDE = 1024

_PLACEHOLDER_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="256" height="192" viewBox="0 0 256 192">'
    '<rect width="256" height="192" fill="#eeeeee" stroke="#bbbbbb" stroke-width="4" stroke-dasharray="10 6"/>'
    '<text x="128" y="104" font-family="sans-serif" font-size="26" fill="#888888" text-anchor="middle">'
    "missing</text></svg>")
#: Shown instead of a thumbnail when the image is missing or cannot be decoded.
PLACEHOLDER_URI = "data:image/svg+xml;base64," + base64.b64encode(_PLACEHOLDER_SVG.encode()).decode("ascii")


# ------------------------------------------------------------------------------------------------ thumbnails

def _open_upright(path: str | os.PathLike[str], max_side: int) -> Image.Image:
    """Decode `path` as an upright RGB image no larger than `max_side` on its longest side.

    Uses the indexer's own decoder (orientation, modes, transparency, bomb guard, JPEG draft); raises
    OSError or DecodeError.
    """
    with open(path, "rb") as fh:
        out, _ = load_upright(fh.read(), max_side, mode="RGB")
    out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return out


def thumbnail_uri(path: str | os.PathLike[str], max_side: int = THUMB_SIDE,
                  quality: int = THUMB_QUALITY) -> str | None:
    """A `data:image/jpeg;base64,...` thumbnail of `path` (longest side <= max_side), or None if unreadable."""
    try:
        thumb = _open_upright(path, max_side)
        buf = io.BytesIO()
        thumb.save(buf, "JPEG", quality=quality, optimize=True)
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types; any failure means "show the placeholder"
        # info, not warning: write_report returns (and the CLI prints) the list of missing images
        log.info("no thumbnail for %s: %s", path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def make_thumbnails(paths: Iterable[str | os.PathLike[str]], *, workers: int | None = None,
                    max_side: int = THUMB_SIDE) -> dict[str, str | None]:
    """Thumbnail every distinct path once, in parallel threads (Pillow releases the GIL while decoding).

    Returns {str(path): data URI or None}.
    """
    unique = list(dict.fromkeys(str(p) for p in paths))
    if not unique:
        return {}
    workers = workers or min(8, (os.cpu_count() or 2) + 2)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="thumb") as pool:
        return dict(zip(unique, pool.map(lambda p: thumbnail_uri(p, max_side), unique)))


# ------------------------------------------------------------------------------------------------- pair plot

def _plot_panel(ax: Any, path: Path, title: str, strict: bool) -> None:
    try:
        ax.imshow(np.asarray(_open_upright(path, PLOT_MAX_SIDE)))
    except Exception as exc:  # noqa: BLE001 - see thumbnail_uri
        if strict:
            raise InputError(f"cannot read image {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
        log.info("plot: %s is missing or unreadable (%s)", path, exc)
        ax.set_facecolor("#eeeeee")
        ax.text(0.5, 0.5, "missing", ha="center", va="center", fontsize=20, color="#888888",
                transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_pair(a: str | os.PathLike[str], b: str | os.PathLike[str], score: float,
              out: str | os.PathLike[str] | None = "pair.png", *, strict: bool = True) -> "Figure":
    """The seed's side-by-side view: "Original" | "Duplicate (Score: 0.9712)", a fixed 1000x500 px PNG.

    Drawn on a plain Agg canvas (no window, no pyplot global state, safe in scripts and threads) and saved
    atomically to `out` (None: not saved). With strict=False a missing image becomes a "missing" panel
    instead of an InputError. Returns the figure (two axes).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if out is not None:
        out = Path(out)
        check_output_path(out)
    fig = Figure(figsize=PLOT_FIGSIZE, dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    _plot_panel(ax1, Path(a), "Original", strict)
    _plot_panel(ax2, Path(b), f"Duplicate (Score: {score:.4f})", strict)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.03, top=0.92, wspace=0.05)
    if out is not None:
        # No bbox_inches="tight": it would make the PNG's size depend on the images. zlib level 1: photos
        # barely compress, and level 6 spends ~3x the time (70% of a plot) for files only ~10% smaller.
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=PLOT_DPI, pil_kwargs={"compress_level": 1}))
    return fig


# ---------------------------------------------------------------------------------------------- input files

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
                pairs.append(Pair(a_id, row["a_path"], b_id, row["b_path"], score, kind))
    except UnicodeDecodeError:
        raise InputError(f"{path} is not a UTF-8 text file") from None
    return pairs


def read_groups_json(path: str | os.PathLike[str]) -> dict:
    """Read a groups JSON as written by `neardup duplicates --groups` (see search.duplicates.groups_document).

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


def fmt_bytes(n: int) -> str:
    """A byte count for people: 812 B, 23.4 KB, 1.2 GB."""
    x = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if x < 1024 or unit == "GB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return ""


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
    rows = "\n".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in summary)
    csp = (f"default-src 'none'; img-src data: file:; style-src 'unsafe-inline'; "
           f"script-src '{_csp_hash(_SCRIPT)}'; base-uri 'none'; form-action 'none'")
    parts = {"CSP": esc(csp), "TITLE": esc(title), "SUMMARY": rows, "STYLE": _STYLE, "SCRIPT": _SCRIPT,
             "DATA": _json_island(data)}
    # One pass, so that a file name which happens to contain "%%DATA%%" is never expanded itself.
    return re.sub(r"%%([A-Z]+)%%", lambda m: parts[m.group(1)], _PAGE)


def _groups_from(doc_groups: list[dict], images: _Images) -> list[dict]:
    out = []
    for k, g in enumerate(doc_groups, start=1):
        members = [{"i": images(m["path"]), "k": bool(m.get("keeper")), "x": bool(m.get("exact")),
                    "s": round(float(m.get("score_to_keeper", 1.0)), 6)} for m in g["members"]]
        if members and not any(m["k"] for m in members):
            members[0]["k"] = True  # a hand-made file without keeper flags: its first member, as in our files
        members.sort(key=lambda m: not m["k"])  # keeper first, the rest in the file's order
        others = [m["s"] for m in members if not m["k"]]
        out.append({"n": k, "lo": min(others) if others else 1.0, "m": members})
    return out


def write_report(store: str | os.PathLike[str], out: str | os.PathLike[str] = "report.html", *,
                 pairs: str | os.PathLike[str] | None = None, groups: str | os.PathLike[str] | None = None,
                 duplicates: DuplicateReport | None = None, threshold: float | None = None,
                 png_dir: str | os.PathLike[str] | None = None, page_size: int = PAGE_SIZE,
                 workers: int | None = None) -> ReportResult:
    """Write one self-contained HTML report of a store's duplicate groups and pairs to `out`.

    The pairs and groups come from `duplicates` (a find_duplicates result), else from the files `pairs`
    (CSV of `neardup duplicates --out`) and/or `groups` (JSON of `--groups`), else from
    find_duplicates(store, threshold=threshold). With files, `threshold` hides pairs scoring below it.
    `png_dir` also gets one side-by-side PNG per pair, `pair_00001.png` for the report's pair #1, and so on.
    Raises InputError (bad files, missing output folder) and StoreError.
    """
    t0 = time.perf_counter()
    out = Path(out)
    check_output_path(out)
    if png_dir is not None and not Path(png_dir).is_dir():
        raise InputError(f"the --png-dir folder does not exist: {png_dir}")
    if page_size < 1:
        raise InputError("page size must be at least 1")
    store = Path(store)
    cat = read_catalog(store, vectors=False)
    images = _Images(cat, Path(store).resolve().parent)

    source: list[str] = []
    pair_list: list[Pair] | None = None
    group_docs: list[dict] | None = None
    t_shown: float | None = threshold
    if duplicates is None and pairs is None and groups is None:
        duplicates = find_duplicates(store, threshold=threshold)
        source.append("computed from the store (neardup duplicates)")
    if duplicates is not None:
        pair_list, group_docs, t_shown = duplicates.pairs, groups_document(duplicates)["groups"], duplicates.threshold
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

    # Sorted by score, highest first; a stable sort keeps the file's order among equal scores.
    ordered = sorted(pair_list or [], key=lambda p: -p.score)
    pair_rows = [[images(p.a_path), images(p.b_path), round(float(p.score), 6), 1 if p.kind == "exact" else 0]
                 for p in ordered]
    group_rows = _groups_from(group_docs or [], images)

    t1 = time.perf_counter()
    thumbs = make_thumbnails([images.absolute(p) for p in images.index], workers=workers)
    image_docs = images.documents(thumbs)
    missing = [d["p"] for d in image_docs if d["t"] is None]
    log.info("%d thumbnails in %.1f s (%d missing)", len(image_docs), time.perf_counter() - t1, len(missing))

    scores = [r[2] for r in pair_rows] + [m["s"] for g in group_rows for m in g["m"] if not m["k"]]
    lo = float(np.floor(min(scores) * 100) / 100) if scores else 0.0
    hi = max(1.0, float(np.ceil(max(scores) * 1e6) / 1e6)) if scores else 1.0
    data = {"page_size": int(page_size), "placeholder": PLACEHOLDER_URI, "images": image_docs,
            "pairs": pair_rows, "groups": group_rows, "has_pairs": pair_list is not None,
            "has_groups": group_docs is not None, "lo": lo, "hi": hi}

    png_files: list[Path] = []
    if png_dir is not None:
        for k, p in enumerate(ordered, start=1):
            target = Path(png_dir) / f"pair_{k:05d}.png"
            plot_pair(images.absolute(p.a_path), images.absolute(p.b_path), p.score, target, strict=False)
            png_files.append(target)
            if k % 100 == 0:
                log.info("plotted %d of %d pairs", k, len(ordered))

    exact = sum(r[3] for r in pair_rows)
    seconds = time.perf_counter() - t0
    summary = [
        ("store", str(store)), ("model", f"{cat.meta.model} (weights {cat.meta.weights})"),
        ("threshold", f"{t_shown:.4f}" if t_shown is not None else "as in the pairs file"),
        ("images in store", str(len(cat))),
        ("pairs", f"{len(pair_rows)} ({exact} exact, {len(pair_rows) - exact} near)" if pair_list is not None
         else "not given"),
        ("groups", f"{len(group_rows)} ({sum(len(g['m']) - 1 for g in group_rows)} removable images)"
         if group_docs is not None else "not given"),
        ("images shown", f"{len(image_docs)} ({len(missing)} missing or unreadable)"),
        ("images under", str((store.parent / images.common_folder()).resolve())),
        ("source", "; ".join(source)),
        ("generated", f"{now_iso()} in {seconds:.1f} s"),
    ]
    page = render_html(data, summary, f"neardup report: {store.name}")
    atomic_write(out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    log.info("wrote %s (%d bytes)", out, len(page))
    return ReportResult(out=out, pairs=len(pair_rows), groups=len(group_rows), images=len(image_docs),
                        missing=missing, png_files=png_files, seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------- page template

_STYLE = """
:root { --keep: #1a7f37; --exact: #8250df; --near: #0969da; --line: #d0d7de; --muted: #57606a; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328;
       background: #f6f8fa; }
header { background: #fff; border-bottom: 1px solid var(--line); padding: 12px 20px; }
h1 { font-size: 20px; margin: 0 0 8px; }
dl.summary { display: flex; flex-wrap: wrap; gap: 4px 24px; margin: 0; }
dl.summary div { display: flex; gap: 6px; }
dl.summary dt { color: var(--muted); }
dl.summary dd { margin: 0; font-weight: 600; overflow-wrap: anywhere; }
nav.controls { position: sticky; top: 0; z-index: 2; display: flex; flex-wrap: wrap; align-items: center;
               gap: 8px 16px; padding: 8px 20px; background: #fff; border-bottom: 1px solid var(--line); }
.tabs button { font: inherit; padding: 5px 12px; border: 1px solid var(--line); background: #f6f8fa;
               cursor: pointer; }
.tabs button:first-child { border-radius: 6px 0 0 6px; }
.tabs button:last-child { border-radius: 0 6px 6px 0; border-left: 0; }
.tabs button[aria-selected="true"] { background: #0969da; border-color: #0969da; color: #fff; }
nav label { color: var(--muted); }
nav input[type=number] { width: 6.5em; font: inherit; padding: 3px 4px; }
nav button { font: inherit; padding: 4px 10px; cursor: pointer; }
nav button:disabled { cursor: default; opacity: .45; }
#count { color: var(--muted); }
.pager { display: flex; align-items: center; gap: 8px; margin-left: auto; }
main { padding: 16px 20px; display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
.empty { color: var(--muted); font-size: 16px; padding: 24px 0; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px; }
.card-head { display: flex; align-items: baseline; gap: 10px; margin-bottom: 8px; }
.idx { color: var(--muted); font-variant-numeric: tabular-nums; }
.score { font-size: 17px; font-weight: 700; font-variant-numeric: tabular-nums; }
.kind { font-size: 11px; font-weight: 700; text-transform: uppercase; letter-spacing: .05em; color: #fff;
        border-radius: 10px; padding: 1px 8px; background: var(--near); }
.kind.exact { background: var(--exact); }
.sides { display: flex; gap: 10px; }
.group .sides { flex-wrap: wrap; }
figure { margin: 0; width: 232px; border: 2px solid transparent; border-radius: 6px; padding: 4px; }
figure .frame { display: flex; align-items: center; justify-content: center; width: 220px; height: 220px;
                background: #eaeef2; border-radius: 4px; overflow: hidden; }
figure img { max-width: 220px; max-height: 220px; display: block; }
figcaption { margin-top: 4px; font-size: 12px; }
figcaption .path { display: block; font-family: ui-monospace, SFMono-Regular, Menlo, monospace;
                   overflow-wrap: anywhere; }
figcaption .path .dir { color: var(--muted); }
figcaption .path .name { font-weight: 600; }
figcaption .meta { display: block; color: var(--muted); }
figure.keeper { border-color: var(--keep); background: #dafbe1; }
.badge { display: inline-block; font-size: 11px; font-weight: 700; border-radius: 10px; padding: 1px 8px;
         margin-bottom: 4px; background: #eaeef2; color: var(--muted); }
figure.keeper .badge { background: var(--keep); color: #fff; }
figure.missing .path .name { color: #cf222e; }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  // Everything from the data island is put into the page with textContent or DOM properties, never innerHTML.
  var D = JSON.parse(document.getElementById("neardup-data").textContent);
  var state = { tab: D.has_groups && D.groups.length ? "groups" : "pairs", page: { groups: 0, pairs: 0 },
                lo: null, hi: null };
  function $(id) { return document.getElementById(id); }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }
  function readBound(id) {
    var v = parseFloat($(id).value);
    return isNaN(v) ? null : v;
  }
  function inRange(s) {
    // 1e-9 absorbs decimal round-off between the typed bound and the 6-decimal scores
    return (state.lo === null || s >= state.lo - 1e-9) && (state.hi === null || s <= state.hi + 1e-9);
  }
  function figure(i, badge, keeper) {
    var im = D.images[i];
    var f = el("figure", keeper ? "keeper" : "");
    if (!im.t) { f.classList.add("missing"); }
    if (badge) { f.appendChild(el("span", "badge", badge)); }
    var frame = el(im.u ? "a" : "div", "frame");
    if (im.u) { frame.href = im.u; frame.target = "_blank"; frame.rel = "noopener"; frame.title = "open the original"; }
    var img = el("img");
    img.alt = im.p;
    img.src = im.t || D.placeholder;
    frame.appendChild(img);
    f.appendChild(frame);
    var cap = el("figcaption");
    var name = el("span", "path");
    name.title = im.p;
    var cut = im.d.lastIndexOf("/");
    if (cut >= 0) { name.appendChild(el("span", "dir", im.d.slice(0, cut + 1))); }
    name.appendChild(el("span", "name", im.d.slice(cut + 1)));
    cap.appendChild(name);
    var meta = im.t ? (im.w ? im.w + "\u00d7" + im.h + " px \u00b7 " + im.s : "") : "missing or unreadable";
    cap.appendChild(el("span", "meta", meta));
    f.appendChild(cap);
    return f;
  }
  function pairCard(k) {
    var p = D.pairs[k];
    var card = el("div", "card pair");
    var head = el("div", "card-head");
    head.appendChild(el("span", "idx", "#" + (k + 1)));
    head.appendChild(el("span", "score", p[2].toFixed(4)));
    head.appendChild(el("span", p[3] ? "kind exact" : "kind near", p[3] ? "exact" : "near"));
    card.appendChild(head);
    var sides = el("div", "sides");
    sides.appendChild(figure(p[0], "", false));
    sides.appendChild(figure(p[1], "", false));
    card.appendChild(sides);
    return card;
  }
  function groupCard(k) {
    var g = D.groups[k];
    var card = el("div", "card group");
    var head = el("div", "card-head");
    head.appendChild(el("span", "idx", "Group " + g.n));
    head.appendChild(el("span", "", g.m.length + " images"));
    head.appendChild(el("span", "score", g.lo.toFixed(4)));
    head.appendChild(el("span", "idx", "lowest score to keeper"));
    card.appendChild(head);
    var sides = el("div", "sides");
    g.m.forEach(function (m) {
      var badge = m.k ? "\u2605 KEEP" : (m.x ? "exact copy" : "score " + m.s.toFixed(4));
      sides.appendChild(figure(m.i, badge, m.k));
    });
    card.appendChild(sides);
    return card;
  }
  function matching() {
    var out = [], i;
    if (state.tab === "pairs") {
      for (i = 0; i < D.pairs.length; i++) { if (inRange(D.pairs[i][2])) { out.push(i); } }
    } else {
      for (i = 0; i < D.groups.length; i++) { if (inRange(D.groups[i].lo)) { out.push(i); } }
    }
    return out;
  }
  function render() {
    var list = $("list"), items = matching(), size = D.page_size;
    var pages = Math.max(1, Math.ceil(items.length / size));
    var page = Math.min(state.page[state.tab], pages - 1);
    state.page[state.tab] = page;
    var first = page * size, last = Math.min(items.length, first + size);
    var fragment = document.createDocumentFragment();
    for (var k = first; k < last; k++) {
      fragment.appendChild(state.tab === "pairs" ? pairCard(items[k]) : groupCard(items[k]));
    }
    list.replaceChildren(fragment);
    var given = state.tab === "pairs" ? D.has_pairs : D.has_groups;
    var noun = state.tab === "pairs" ? "pairs" : "groups";
    var total = state.tab === "pairs" ? D.pairs.length : D.groups.length;
    if (!items.length) {
      list.appendChild(el("p", "empty", !given ? "No " + noun + " were given to this report." :
                                        !total ? "No duplicate " + noun + " were found." :
                                                 "No " + noun + " in this score range."));
    }
    var count = $("count");
    count.dataset.matching = String(items.length);
    count.textContent = items.length ? "showing " + (first + 1) + "\u2013" + last + " of " + items.length +
        " " + noun + (items.length < total ? " (" + total + " in all)" : "") : "0 of " + total + " " + noun;
    $("page").textContent = "page " + (page + 1) + " of " + pages;
    $("prev").disabled = page === 0;
    $("next").disabled = page >= pages - 1;
    $("tab-pairs").setAttribute("aria-selected", String(state.tab === "pairs"));
    $("tab-groups").setAttribute("aria-selected", String(state.tab === "groups"));
  }
  function go(delta) {
    state.page[state.tab] += delta;
    if (state.page[state.tab] < 0) { state.page[state.tab] = 0; }
    render();
    window.scrollTo(0, 0);
  }
  function onFilter() {
    state.lo = readBound("min");
    state.hi = readBound("max");
    state.page.pairs = 0;
    state.page.groups = 0;
    render();
  }
  $("tab-pairs").textContent = "Pairs (" + D.pairs.length + ")";
  $("tab-groups").textContent = "Groups (" + D.groups.length + ")";
  $("min").value = D.lo.toFixed(2);
  $("max").value = String(D.hi);
  state.lo = readBound("min");
  state.hi = readBound("max");
  $("min").addEventListener("input", onFilter);
  $("max").addEventListener("input", onFilter);
  $("reset").addEventListener("click", function () {
    $("min").value = D.lo.toFixed(2);
    $("max").value = String(D.hi);
    onFilter();
  });
  $("prev").addEventListener("click", function () { go(-1); });
  $("next").addEventListener("click", function () { go(1); });
  $("tab-pairs").addEventListener("click", function () { state.tab = "pairs"; render(); });
  $("tab-groups").addEventListener("click", function () { state.tab = "groups"; render(); });
  document.addEventListener("keydown", function (e) {
    if (e.target && e.target.tagName === "INPUT") { return; }
    if (e.key === "ArrowLeft" && !$("prev").disabled) { go(-1); }
    if (e.key === "ArrowRight" && !$("next").disabled) { go(1); }
  });
  render();
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="%%CSP%%">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%%TITLE%%</title>
<style>%%STYLE%%</style>
</head>
<body>
<header>
<h1>neardup duplicate report</h1>
<dl class="summary">
%%SUMMARY%%
</dl>
</header>
<nav class="controls">
<div class="tabs" role="tablist"><button id="tab-groups" role="tab">Groups</button><button id="tab-pairs"
  role="tab">Pairs</button></div>
<label>min score <input id="min" type="number" step="0.01" min="-1" max="1.01"></label>
<label>max score <input id="max" type="number" step="0.01" min="-1" max="1.01"></label>
<button id="reset" type="button">reset</button>
<span id="count"></span>
<span class="pager"><button id="prev" type="button">&larr; prev</button><span id="page"></span><button
  id="next" type="button">next &rarr;</button></span>
</nav>
<noscript><p class="empty">This report draws its pairs and groups with JavaScript; please allow scripts for
this file.</p></noscript>
<main id="list"></main>
<script type="application/json" id="neardup-data">%%DATA%%</script>
<script>%%SCRIPT%%</script>
</body>
</html>
"""
