"""Top layer, demo: index the bundled sample catalogue, list its duplicate groups, report and score them.

The sample (119 generated product photos with planted near-duplicates and a ground truth, made by
`data/make_sample.py` in the source tree) ships as package data, so the demo works from a wheel install in
any folder. It is copied into the demo's folder before anything is written: the store then names files that
stay where it says, whatever the package's own folder is (read-only, or inside a zip).
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

from .config import DEFAULTS
from .errors import InputError, StoreError, WeightsError
from .fileio import check_output_path
from .indexer.build import Progress, RunSummary, build_index
from .indexer.embed import Embedder, make_embedder
from .indexer.files import StoreFiles
from .indexer.store import read_meta
from .search.duplicates import DuplicateReport, find_duplicates, write_groups_json, write_pairs_csv
from .search.evaluate import EvalResult, evaluate, write_eval_json
from .search.report import write_report

log = logging.getLogger(__name__)


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
    """ResNet50 with ImageNet weights (cache, download or file) when available, else pHash and the reason."""
    try:
        return make_embedder("resnet50", weights or DEFAULTS.weights), None
    except WeightsError as exc:
        return make_embedder("phash", "none"), str(exc)


def _copy_tree(src: Traversable, dst: Path) -> None:
    # Traversable, not a path: package data may sit in a zip; copytree needs a real folder.
    dst.mkdir()
    for item in src.iterdir():
        if item.is_dir():
            _copy_tree(item, dst / item.name)
        else:
            (dst / item.name).write_bytes(item.read_bytes())


def run_demo(out: str | Path, *, sample: str | Path | None = None, weights: str | None = None,
             embedder: Embedder | None = None, progress: Progress | None = None) -> DemoResult:
    """Index the sample's catalog/ into `out`/sample.h5, find duplicates, write CSV/JSON/HTML, evaluate vs truth.

    `sample` is a folder with catalog/ and truth.csv, indexed where it is; by default the bundled sample is
    copied to `out`/sample first. `out` must be new, empty, or an earlier demo's folder.
    """
    out = Path(out)
    check_output_path(out)
    if sample is not None and not (Path(sample) / "catalog").is_dir():
        raise InputError(f"no sample catalogue at {Path(sample) / 'catalog'}; give a folder with catalog/ and "
                         f"truth.csv")
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder")
    store = out / "sample.h5"
    copy = out / "sample"
    if out.is_dir() and any(out.iterdir()):
        try:
            read_meta(store)
        except StoreError:
            raise InputError(f"{out} is not empty and holds no earlier demo; give a new or empty folder") from None
        # An earlier demo: start from a clean store (another model may have made it). Only the demo's own
        # files go: the store and what it owns, and the sample copy; the outputs below are overwritten.
        files = StoreFiles(store)
        store.unlink()
        files.remove_work()
        files.remove_index_files(keep="")
        shutil.rmtree(copy, ignore_errors=True)
    out.mkdir(exist_ok=True)
    if sample is None:
        _copy_tree(bundled_sample(), copy)
        sample = copy
    sample = Path(sample)
    reason = None
    if embedder is None:
        embedder, reason = choose_embedder(weights)
    summary = build_index([sample / "catalog"], store, embedder=embedder, progress=progress)
    dups = find_duplicates(store)
    result = DemoResult(out=out, sample=sample, store=store, model=embedder.name, fallback_reason=reason,
                        summary=summary, duplicates=dups, pairs_csv=out / "pairs.csv",
                        groups_json=out / "groups.json")
    write_pairs_csv(dups, result.pairs_csv)
    write_groups_json(dups, result.groups_json)
    result.report_html = write_report(store, out / "report.html", duplicates=dups).out
    truth = sample / "truth.csv"
    if truth.is_file():
        result.evaluation = evaluate(store, truth)
        write_eval_json(result.evaluation, out / "evaluation.json")
    return result
