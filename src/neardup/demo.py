"""Top layer, demo: index the bundled sample catalogue, list its duplicate groups, report and score them.

The sample (119 generated product photos with planted near-duplicates and a ground truth, made by
`data/make_sample.py` in the source tree) ships as package data, so the demo works from a wheel install in
any folder. It is copied into the demo's folder before anything is written: the store then names files that
stay where it says, whatever the package's own folder is (read-only, or inside a zip).
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from .config import DEFAULTS, OFFLINE_MODEL
from .embed.embedders import Embedder
from .embed.models import make_embedder
from .errors import InputError, StoreError, WeightsError
from .fileio import check_output_path
from .indexer.build import Progress, RunSummary, build_index
from .search.duplicates import DuplicateReport, find_duplicates
from .search.evaluate import EvalResult, evaluate, write_eval_json
from .search.pairs_io import write_groups_json, write_pairs_csv
from .search.report import write_report
from .store.files import StoreFiles
from .store.generation import Generation
from .store.handle import read_meta

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

log = logging.getLogger(__name__)

#: Marks the demo's copy of the bundled sample, the only sample folder it ever deletes (to copy it anew).
COPY_MARK = ".neardup-demo-copy"
#: Modification time given to every copied file (2026-01-01 UTC). Copies made in listing order would get
#: ascending times, and the keeper rule (largest, then oldest, then path) would then follow that order.
COPY_MTIME_NS = 1_767_225_600 * 10**9


def bundled_sample() -> Traversable:
    """The sample catalogue shipped in the package: `catalog/` and `truth.csv`."""
    return resources.files(__package__).joinpath("sample")


@dataclass
class DemoResult:
    """What the demo did and where it put things."""

    out: Path
    sample: Path  #: the sample that was indexed (the demo's copy of the bundled one, or the folder given)
    store: Path
    model: str
    fallback_reason: str | None
    summary: RunSummary
    duplicates: DuplicateReport
    pairs_csv: Path
    groups_json: Path
    report_html: Path | None = None
    evaluation: EvalResult | None = None


def choose_embedder(weights: str | None) -> tuple[Embedder, str | None]:
    """ResNet50 with ImageNet weights (cache, download or file) when available; else the trained offline model
    (OFFLINE_MODEL, its weights from a registry package) when installed; else pHash. With why ResNet50 was not
    used (and why the offline model was not either), or None."""
    try:
        return make_embedder("resnet50", weights or DEFAULTS.weights), None
    except WeightsError as exc:
        reason = str(exc)
    try:
        return make_embedder(OFFLINE_MODEL), reason
    except WeightsError as exc:
        return make_embedder("phash", "none"), f"{reason}. And {exc}"


def _copy_into(src: Traversable, dst: Path) -> None:
    # Traversable, not a path: package data may sit in a zip; copytree needs a real folder.
    for item in sorted(src.iterdir(), key=lambda t: t.name):
        if item.is_dir():
            (dst / item.name).mkdir()
            _copy_into(item, dst / item.name)
        else:
            (dst / item.name).write_bytes(item.read_bytes())
            os.utime(dst / item.name, ns=(COPY_MTIME_NS, COPY_MTIME_NS))


def run_demo(out: str | Path, *, sample: str | Path | None = None, weights: str | None = None,
             model: str | None = None, embedder: Embedder | None = None,
             progress: Progress | None = None) -> DemoResult:
    """Index the sample's catalog/ into `out`/sample.h5, find duplicates, write CSV/JSON/HTML, evaluate vs truth.

    `sample` is a folder with catalog/ and truth.csv, indexed where it is; by default the bundled sample is
    copied to `out`/sample first. `out` must be new, empty, or an earlier demo's folder. `model` (with
    `weights`) is used as asked, never replaced; None: ResNet50, else the fallbacks of choose_embedder.
    """
    if model is not None and embedder is None:  # an unknown name or missing weights: said before any file
        embedder = make_embedder(model, weights)
    out = Path(out)
    check_output_path(out)
    if sample is not None and not (Path(sample) / "catalog").is_dir():
        raise InputError(f"no sample catalogue at {Path(sample) / 'catalog'}; give a folder with catalog/ and "
                         f"truth.csv")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder")
    store = out / "sample.h5"
    copy = out / "sample"
    if sample is None and copy.exists() and not (copy / COPY_MARK).is_file():
        raise InputError(f"{copy} exists and is not the demo's copy of its sample; move it, or give --out "
                         f"another folder")
    if out.is_dir() and any(out.iterdir()):
        if not (copy / COPY_MARK).is_file():  # an earlier demo's folder has its copy, or at least its store
            try:
                read_meta(store)
            except StoreError:
                raise InputError(f"{out} is not empty and holds no earlier demo; give a new or empty "
                                 f"folder") from None
        # An earlier demo: start from a clean store (another model may have made it). Only the demo's own
        # files go: the store and what it owns, and the sample copy; the outputs below are overwritten.
        StoreFiles(store).remove_store()
    out.mkdir(exist_ok=True)
    if sample is None:
        if (copy / COPY_MARK).is_file():  # the earlier demo's copy (never a folder of the user's)
            shutil.rmtree(copy)
        copy.mkdir()
        # the mark first: a copy cut short by Ctrl-C is still known as the demo's own, and replaced next time
        (copy / COPY_MARK).write_text("neardup demo: a copy of the bundled sample, replaced by each demo run\n")
        _copy_into(bundled_sample(), copy)
        sample = copy
    sample = Path(sample)
    reason = None
    if embedder is None:
        embedder, reason = choose_embedder(weights)
    summary = build_index([sample / "catalog"], store, embedder=embedder, progress=progress)
    with Generation.open(store) as gen:  # one generation for the pairs, the report and the evaluation
        dups = find_duplicates(gen)
        result = DemoResult(out=out, sample=sample, store=store, model=embedder.name, fallback_reason=reason,
                            summary=summary, duplicates=dups, pairs_csv=out / "pairs.csv",
                            groups_json=out / "groups.json")
        write_pairs_csv(dups, result.pairs_csv)
        write_groups_json(dups, result.groups_json, pairs_file=result.pairs_csv)
        result.report_html = write_report(gen, out / "report.html", duplicates=dups).out
        truth = sample / "truth.csv"
        if truth.is_file():
            result.evaluation = evaluate(gen, truth)
            write_eval_json(result.evaluation, out / "evaluation.json")
    return result
