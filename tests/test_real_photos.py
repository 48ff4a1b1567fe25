"""Real product photos (Grocery Store Dataset, ../shared): index, info, query and duplicates agree."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from neardup.cli import app
from neardup.indexer.build import build_index
from neardup.search.duplicates import find_duplicates
from neardup.search.query import query
from neardup.store import read_catalog


@pytest.mark.slow
def test_resnet50_index_of_real_photos(grocery: Path, tmp_path: Path) -> None:
    photos = sorted((grocery / "train" / "Packages").rglob("*.jpg"))[::20][:40]
    store = tmp_path / "cat.h5"
    s = build_index(photos, store, model="resnet50", weights="none", batch_size=16)
    assert (s.added, s.embedded, len(s.failures)) == (40, 40, 0)
    r = CliRunner().invoke(app, ["info", "--store", str(store), "--json"])
    doc = json.loads(r.output)
    assert (doc["count"], doc["dim"], doc["model"], doc["weights"]) == (40, 2048, "resnet50", "none")
    results = query(store, photos[:3], k=2)
    for photo, res in zip(photos[:3], results):
        assert (store.parent / res.matches[0].path).resolve() == photo.resolve()
        assert res.matches[0].score == pytest.approx(1.0, abs=1e-4)


def test_duplicates_agree_with_query_on_real_photos(grocery: Path, tmp_path: Path) -> None:
    root = grocery / "train" / "Packages" / "Milk"
    store = tmp_path / "milk.h5"
    build_index([root], store, model="phash")
    report = find_duplicates(store, threshold=0.75, verify=False)  # every pair >= 0.75, as query scores it
    assert report.pairs, "expected some near-duplicate shots among the milk photos"
    cat = read_catalog(store)
    for pair in report.pairs[:5]:
        (res,) = query(store, [store.parent / pair.a_path], k=len(cat))
        scores = {m.id: m.score for m in res.matches}
        assert scores[pair.b_id] == pytest.approx(pair.score, abs=1e-5)
        assert scores[pair.b_id] >= 0.75
    # and every image is at least as similar to itself as to anything else
    S = cat.xb @ cat.xb.T
    assert np.allclose(np.diag(S), 1.0, atol=1e-6)
