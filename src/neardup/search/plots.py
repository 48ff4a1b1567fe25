"""Search stage 3, plots: the side-by-side pair plot and the PR curve (matplotlib, loaded when one is drawn).

Both draw on a plain Agg canvas (no window, no pyplot global state, safe in scripts and threads) and are saved
atomically. matplotlib costs ~0.3 s to import, so nothing imports it until a figure is asked for.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..embed.decode import open_upright
from ..errors import InputError
from ..fileio import atomic_write, check_output_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .evaluate import EvalResult
    from .verify import Verification

log = logging.getLogger(__name__)

#: Size of the side-by-side pair plot in inches, and its resolution: a fixed 1000x500 px PNG.
PLOT_FIGSIZE = (10.0, 5.0)
PLOT_DPI = 100
#: Images are shrunk to at most this many pixels before plotting; a panel is ~480 px wide.
PLOT_MAX_SIDE = 1024
#: The file formats a figure is written in, chosen by the output's extension.
PLOT_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg", ".webp": "webp"}


def plot_format(out: str | os.PathLike[str]) -> str:
    """The format asked for by `out`'s extension; InputError for one neardup does not write."""
    fmt = PLOT_FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise InputError(f"cannot tell the image format of {out} from its extension; use one of "
                         f"{', '.join(PLOT_FORMATS)}")
    return fmt


def _save(fig: Figure, out: Path, dpi: int) -> None:
    fmt = plot_format(out)
    # zlib level 1: photos barely compress, and level 6 spends ~3x the time (70% of a plot) for ~10% less.
    kwargs = {"pil_kwargs": {"compress_level": 1}} if fmt == "png" else {}
    atomic_write(out, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi, **kwargs))


def _plot_panel(ax: Any, path: Path, title: str, strict: bool) -> tuple[int, int] | None:
    """Draw one photo; its (width, height) as shown, or None when it is missing."""
    shown = None
    try:
        pixels = np.asarray(open_upright(path, PLOT_MAX_SIDE))
        ax.imshow(pixels)
        shown = (pixels.shape[1], pixels.shape[0])
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types; any failure means "missing"
        if strict:
            raise InputError(f"cannot read image {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
        log.info("plot: %s is missing or unreadable (%s)", path, exc)
        ax.set_facecolor("#eeeeee")
        ax.text(0.5, 0.5, "missing", ha="center", va="center", fontsize=20, color="#888888",
                transform=ax.transAxes)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


#: Inlier matches drawn on a verified pair's plot (a random subset beyond this, for legibility).
MAX_LINES = 80


def _draw_matches(fig: Figure, ax1: Any, ax2: Any, size1: tuple[int, int], size2: tuple[int, int],
                  xy1: np.ndarray, xy2: np.ndarray, colour: str) -> None:
    from matplotlib.patches import ConnectionPatch

    pick = np.random.default_rng(0).permutation(len(xy1))[:MAX_LINES]  # deterministic subset
    for (x1, y1), (x2, y2) in zip(xy1[pick] * size1, xy2[pick] * size2):
        fig.add_artist(ConnectionPatch(xyA=(x1, y1), coordsA=ax1.transData, xyB=(x2, y2), coordsB=ax2.transData,
                                       color=colour, linewidth=0.6, alpha=0.7))
    ax1.plot(*(xy1 * size1).T, ".", color=colour, markersize=3)
    ax2.plot(*(xy2 * size2).T, ".", color=colour, markersize=3)


def pair_verdict(score: float, threshold: float | None = None, verification: Verification | None = None) -> str:
    """A pair's verdict as a title says it: by the verification when it judged the pair, else by `threshold`;
    with neither, the caller has called the pair a duplicate (a listed pair: "Duplicate (Score: ...)")."""
    if verification is not None and verification.judged:
        if verification.verified:
            return f"verified duplicate, {verification.inliers} inliers (score {score:.4f})"
        return f"not a duplicate: {verification.inliers} inliers, not verified (score {score:.4f})"
    if threshold is None:
        return f"Duplicate (Score: {score:.4f})"
    plain = "\ntoo plain to verify: judged by the score" if verification is not None else ""
    if score >= threshold:
        return f"duplicate by score ({score:.4f} >= {threshold:.4f}){plain}"
    return f"not a duplicate (score {score:.4f} < {threshold:.4f}){plain}"


def plot_pair(a: str | os.PathLike[str], b: str | os.PathLike[str], score: float,
              out: str | os.PathLike[str] | None = "pair.png", *, strict: bool = True,
              verification: Verification | None = None, threshold: float | None = None) -> Figure:
    """The side-by-side view of a pair, "Original" | its verdict (pair_verdict), a fixed 1000x500 px image.

    The verdict is the `verification`'s when it judged the pair, else the score against `threshold`; with
    neither, the pair is titled "Duplicate (Score: 0.9712)" (a pair the caller lists as one). With inlier points
    in the verification (verify_pair(points=True), inliers.pair_points/file_points), the inlier matches are
    drawn between the photos (green: verified, orange: not).

    Drawn on a plain Agg canvas (no window, no pyplot global state, safe in scripts and threads) and saved
    atomically to `out` (None: not saved) in the format of its extension (PNG, JPEG, PDF, SVG, WebP). With
    strict=False a missing image becomes a "missing" panel instead of an InputError. Returns the figure.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not np.isfinite(score):
        raise InputError(f"the score must be a number, got {score}")
    if out is not None:
        out = Path(out)
        check_output_path(out)
        plot_format(out)
    fig = Figure(figsize=PLOT_FIGSIZE, dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    title = pair_verdict(score, threshold, verification)
    size1 = _plot_panel(ax1, Path(a), "Original", strict)
    size2 = _plot_panel(ax2, Path(b), title, strict)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.03, top=0.90, wspace=0.05)
    v = verification
    if v is not None and v.xy_a is not None and v.xy_b is not None and size1 and size2 and v.inliers:
        _draw_matches(fig, ax1, ax2, size1, size2, v.xy_a, v.xy_b,
                      "#1a7f37" if v.verified else "#d4760a")
    if out is not None:
        _save(fig, out, PLOT_DPI)  # no bbox_inches="tight": the image's size would depend on the photos
    return fig


def plot_pr_curve(result: EvalResult, out: str | os.PathLike[str]) -> Figure:
    """Precision-recall curve over the threshold sweep, best-F1 and default points marked; written atomically
    in the format of `out`'s extension."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    check_output_path(out)
    plot_format(out)
    sw = result.sweep
    fig = Figure(figsize=(7, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(sw["recall"], sw["precision"], "-o", color="#0969da", markersize=3, linewidth=1.5,
            label="thresholds " + f"{min(sw['thresholds']):.2f}–{max(sw['thresholds']):.2f}")
    bp, dp = result.best, result.at_default
    ax.plot([bp["recall"]], [bp["precision"]], marker="*", color="#cf222e", markersize=18, linestyle="none",
            label=f"best F1 {bp['f1']:.3f} at t={bp['threshold']:.4f}")
    ax.plot([dp["recall"]], [dp["precision"]], marker="D", color="#1f2328", markersize=7, linestyle="none",
            fillstyle="none", label=f"default t={dp['threshold']:.4f}: F1 {dp['f1']:.3f}")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("recall (true pairs found)")
    ax.set_ylabel("precision (predicted pairs that are true)")
    ax.set_title(f"Duplicate pairs: precision vs recall ({result.model}, {result.true_pairs} true pairs)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    _save(fig, out, 100)
    return fig
