"""The HTML report in a real headless Chromium: thumbnails decode, no console errors, filter, paging, escaping."""
from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from neardup.indexer.build import build_index
from neardup.search.report import write_report
from neardup.testing import product_photo

EVIL = "<script>window.__pwned=1</script>"  # as a path: folder "<script>window.__pwned=1<", file "script>.jpg"
EVIL_ATTR = '<img src=x onerror="window.__pwned=2">'


@pytest.fixture
def page(browser) -> Iterator[tuple[object, list[str]]]:
    """A fresh page and the list its console errors and uncaught exceptions are collected into."""
    pg = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    yield pg, errors
    pg.close()


def open_report(pg, path: Path) -> None:
    pg.goto(path.resolve().as_uri())
    pg.wait_for_selector("#list .card")
    pg.wait_for_function("Array.from(document.images).every(i => i.complete)")


def undecoded(pg) -> int:
    return pg.evaluate("Array.from(document.querySelectorAll('#list img')).filter(i => !(i.naturalWidth > 0)).length")


@pytest.fixture(scope="module")
def small_report(tmp_path_factory) -> Path:
    """4 products, each with a copy (two under evil names), one copy then deleted: 4 groups, 4 pairs."""
    tmp = tmp_path_factory.mktemp("small")
    root = tmp / "imgs"
    (root / "<script>window.__pwned=1<").mkdir(parents=True)
    for i in range(6):
        product_photo(i).save(root / f"img_{i}.jpg", "JPEG", quality=90)
    Image.open(root / "img_0.jpg").resize((200, 200)).save(root / "small_0.jpg", "JPEG", quality=60)
    shutil.copy(root / "img_1.jpg", root / "same_1.jpg")
    Image.open(root / "img_2.jpg").save(root / f"{EVIL}.jpg", "JPEG", quality=70)
    Image.open(root / "img_3.jpg").save(root / f"{EVIL_ATTR}.jpg", "JPEG", quality=70)
    store = tmp / "cat.h5"
    build_index([root], store, model="phash")
    (root / "small_0.jpg").unlink()  # indexed, then gone: the report shows the placeholder
    res = write_report(store, tmp / "report.html")
    assert res.missing == ["imgs/small_0.jpg"] and res.pairs == 4
    return res.out


@pytest.fixture(scope="module")
def big_report(tmp_path_factory) -> Path:
    """5,000 synthetic pairs over 20 images, score of pair k (#k+1) = 0.5 + k / 10000 ... shown descending."""
    tmp = tmp_path_factory.mktemp("big")
    root = tmp / "imgs"
    root.mkdir()
    for i in range(20):
        product_photo(100 + i, (200, 160)).save(root / f"p{i:02d}.jpg", "JPEG", quality=85)
    store = tmp / "cat.h5"
    build_index([root], store, model="phash")
    with open(tmp / "pairs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["a_path", "b_path", "score", "kind"])
        for k in range(5000):
            w.writerow([f"imgs/p{k % 20:02d}.jpg", f"imgs/p{(k * 3 + 1) % 20:02d}.jpg", f"{0.5 + k / 10000:.4f}",
                        "near"])
    return write_report(store, tmp / "big.html", pairs=tmp / "pairs.csv").out


def test_small_report_renders_escapes_and_marks_keepers(page, small_report: Path) -> None:
    pg, errors = page
    open_report(pg, small_report)
    # groups first: 4 groups of 2, one keeper each, every thumbnail (and the placeholder) decoded
    assert pg.locator("#list .group").count() == 4
    assert pg.locator("#list figure.keeper").count() == 4
    assert pg.locator("#list img").count() == 8 and undecoded(pg) == 0
    assert pg.locator("#list figure.missing").count() == 1
    names = pg.eval_on_selector_all("#list .path", "els => els.map(e => e.textContent)")
    assert f"{EVIL}.jpg" in names and f"{EVIL_ATTR}.jpg" in names  # shown as text...
    assert pg.get_by_text("window.__pwned=1<", exact=False).first.is_visible()
    assert pg.evaluate("typeof window.__pwned") == "undefined"  # ...and nothing ran
    assert pg.locator("#list img[onerror]").count() == 0
    # pairs tab: 4 pairs, scores descending, the exact one marked
    pg.click("#tab-pairs")
    assert pg.locator("#list .pair").count() == 4 and undecoded(pg) == 0
    scores = [float(s) for s in pg.eval_on_selector_all("#list .pair .score", "els => els.map(e => e.textContent)")]
    assert scores == sorted(scores, reverse=True) and scores[0] == 1.0
    assert pg.locator("#list .kind.exact").count() == 1
    assert pg.evaluate("typeof window.__pwned") == "undefined"
    assert errors == []


def test_big_report_pages_and_filters(page, big_report: Path) -> None:
    pg, errors = page
    open_report(pg, big_report)
    assert pg.locator("#list .pair").count() == 100  # only one page of the 5,000 is in the DOM
    assert pg.get_attribute("#count", "data-matching") == "5000"
    assert pg.text_content("#page") == "page 1 of 50" and pg.is_disabled("#prev")
    first = pg.locator("#list .pair .idx").first
    assert first.text_content() == "#1" and pg.locator("#list .pair .score").first.text_content() == "0.9999"
    assert undecoded(pg) == 0
    # paging
    pg.click("#next")
    assert pg.text_content("#page") == "page 2 of 50" and first.text_content() == "#101"
    assert pg.locator("#list .pair").count() == 100 and undecoded(pg) == 0
    pg.click("#prev")
    assert first.text_content() == "#1"
    # filter: scores 0.9905 .. 0.9950 are pairs k = 4905 .. 4950, i.e. 46 pairs on one page
    pg.fill("#min", "0.99045")
    pg.fill("#max", "0.99505")
    assert pg.get_attribute("#count", "data-matching") == "46"
    assert pg.locator("#list .pair").count() == 46 and pg.text_content("#page") == "page 1 of 1"
    shown = [float(s) for s in pg.eval_on_selector_all("#list .pair .score", "els => els.map(e => e.textContent)")]
    assert max(shown) == 0.995 and min(shown) == 0.9905
    pg.fill("#max", "")  # an empty bound is no bound
    assert pg.get_attribute("#count", "data-matching") == str(5000 - 4905)
    pg.fill("#min", "2")
    assert pg.locator("#list .pair").count() == 0 and pg.get_by_text("No pairs in this score range").is_visible()
    pg.click("#reset")
    assert pg.get_attribute("#count", "data-matching") == "5000" and pg.locator("#list .pair").count() == 100
    assert pg.get_by_text("No pairs were given to this report").count() == 0
    pg.click("#tab-groups")
    assert pg.get_by_text("No groups were given to this report").is_visible()
    assert errors == []


def test_empty_report_says_so(page, tmp_path: Path) -> None:
    pg, errors = page
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(2):
        product_photo(i).save(root / f"img_{i}.jpg", "JPEG", quality=90)
    build_index([root], tmp_path / "cat.h5", model="phash")
    out = write_report(tmp_path / "cat.h5", tmp_path / "empty.html").out
    pg.goto(out.resolve().as_uri())
    assert pg.get_by_text("No duplicate pairs were found.").is_visible()
    assert pg.get_attribute("#count", "data-matching") == "0" and pg.is_disabled("#next")
    assert errors == []
