"""The demo: index the sample catalogue, list its duplicate groups, report and score them against the truth."""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from indexer import RunSummary, build_index, make_embedder, read_meta
from indexer.build import remove_index_files
from indexer.config import DEFAULTS
from indexer.errors import InputError, StoreError, WeightsError
from indexer.store import check_output_path

from .duplicates import DuplicateReport, find_duplicates, write_groups_json, write_pairs_csv
from .evaluate import EvalResult, evaluate, write_eval_json
from .report import write_report

log = logging.getLogger(__name__)

#: The sample catalogue made by data/make_sample.py, in the source checkout.
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample"


@dataclass
class DemoResult:
    """What the demo did and where it put things."""

    out: Path
    store: Path
    model: str
    fallback_reason: str | None
    summary: RunSummary
    duplicates: DuplicateReport
    pairs_csv: Path
    groups_json: Path
    report_html: Path | None = None
    evaluation: EvalResult | None = None


def choose_embedder(weights: str | None):  # noqa: ANN201 - an Embedder
    """ResNet50 with ImageNet weights (cache, download or file) when available, else pHash and the reason."""
    try:
        return make_embedder("resnet50", weights or DEFAULTS.weights), None
    except WeightsError as exc:
        return make_embedder("phash", "none"), str(exc)


def run_demo(out: str | Path, *, sample: str | Path = SAMPLE_DIR, weights: str | None = None,
             embedder=None, progress=None) -> DemoResult:  # noqa: ANN001
    """Index `sample`/catalog into `out`/sample.h5, find duplicates, write CSV/JSON/HTML, evaluate vs truth."""
    sample = Path(sample)
    catalog, truth = sample / "catalog", sample / "truth.csv"
    if not catalog.is_dir():
        raise InputError(f"sample catalogue not found at {catalog}; create it with: python data/make_sample.py")
    out = Path(out)
    check_output_path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder")
    store = out / "sample.h5"
    if out.is_dir() and any(out.iterdir()):
        try:
            read_meta(store)
        except StoreError:
            raise InputError(f"{out} is not empty and holds no earlier demo; give a new or empty folder") from None
        # An earlier demo: start from a clean store (another model may have made it); only neardup's own files
        # go, the outputs below are overwritten.
        store.unlink()
        shutil.rmtree(out / "sample.h5.work", ignore_errors=True)
        remove_index_files(store, keep="")
    out.mkdir(exist_ok=True)
    reason = None
    if embedder is None:
        embedder, reason = choose_embedder(weights)
    summary = build_index([catalog], store, embedder=embedder, progress=progress)
    dups = find_duplicates(store)
    result = DemoResult(out=out, store=store, model=embedder.name, fallback_reason=reason, summary=summary,
                        duplicates=dups, pairs_csv=out / "pairs.csv", groups_json=out / "groups.json")
    write_pairs_csv(dups, result.pairs_csv)
    write_groups_json(dups, result.groups_json)
    result.report_html = write_report(store, out / "report.html", duplicates=dups).out
    if truth.is_file():
        result.evaluation = evaluate(store, truth)
        write_eval_json(result.evaluation, out / "evaluation.json")
    return result
