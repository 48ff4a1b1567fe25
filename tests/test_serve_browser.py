"""The `neardup serve` page in a real headless Chromium against a real server: upload a photo, see its match's
thumbnail, no console errors, nothing fetched from elsewhere, hostile file names shown as text."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from neardup.indexer.build import build_index
from neardup.store import read_catalog
from neardup.testing import product_photo, write_product_photos

from .test_serve import TOKEN, start_server, stop_server

EVIL = '<img src=x onerror="window.__pwned=1">'


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, Path, int]]:
    """A server over 12 photos, one of them under a hostile file name; (url, folder, that photo's id)."""
    root = tmp_path_factory.mktemp("page")
    write_product_photos(root / "photos", range(12))
    product_photo(50).save(root / "photos" / f"{EVIL}.jpg", "JPEG", quality=92)
    build_index([root / "photos"], root / "catalog.h5", model="phash")
    cat = read_catalog(root / "catalog.h5", vectors=False)
    evil_id = int(cat.ids[[p.endswith(f"{EVIL}.jpg") for p in cat.paths].index(True)])
    proc, url = start_server(root / "catalog.h5", "--token", TOKEN, "--max-images", "2")
    yield url, root, evil_id
    stop_server(proc)


def test_upload_shows_the_match_and_escapes_names(served, browser, tmp_path: Path) -> None:
    url, root, evil_id = served
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(url)
    page.wait_for_selector("#token-row:not([hidden])")  # the page asks for the token the server wants
    page.fill("#token", TOKEN)
    page.dispatch_event("#token", "change")
    page.wait_for_function("() => document.getElementById('store').textContent.includes('13 photos')")
    assert errors == ["console: Failed to load resource: the server responded with a status of 401 (Unauthorized)"]
    errors.clear()  # that 401 was the page learning that a token is needed

    upload = tmp_path / f"{EVIL}.jpg"  # a copy of the hostile-named catalogue photo, under the same name
    product_photo(50).resize((300, 300)).save(upload, "JPEG", quality=80)
    page.set_input_files("#files", str(upload))
    page.wait_for_selector(".result .match img.thumb")
    page.wait_for_function("() => Array.from(document.querySelectorAll('img.thumb')).every(i => i.complete && "
                           "i.naturalWidth > 0)")
    first = page.locator(".result .match").first
    assert first.locator("img.thumb").get_attribute("data-id") == str(evil_id)
    assert "is-match" in first.get_attribute("class")
    assert page.locator(".result .verdict").inner_text() == "Already in the catalogue"
    # the thumbnail shown is the server's thumbnail of that id (same size as decoded here)
    shown = page.evaluate("(() => { const i = document.querySelector('img.thumb'); return [i.naturalWidth, "
                          "i.naturalHeight]; })()")
    want = Image.open(root / "photos" / f"{EVIL}.jpg")
    want.thumbnail((256, 256))
    assert tuple(shown) == want.size
    # hostile names are text: in the heading, in the match's path, and nothing ran
    # (browsers send a file name's quotes as %22 in a multipart upload, per the HTML standard)
    assert page.locator(".result .name").inner_text() == f"{EVIL}.jpg".replace('"', "%22")
    assert first.locator(".path").inner_text().endswith(f"{EVIL}.jpg")
    assert page.locator(".result img[src='x']").count() == 0
    assert page.evaluate("window.__pwned === undefined")
    assert first.locator("a.full").get_attribute("href") == f"v1/images/{evil_id}"
    # the threshold slider re-renders the verdicts without asking the server again
    before = len(requests)
    page.eval_on_selector("#threshold", "el => { el.value = '0.99'; el.dispatchEvent(new Event('input')); }")
    assert page.locator("#threshold-value").inner_text() == "0.990"
    assert len(requests) == before
    # offline: every request went to the server itself (or a blob: of the page)
    assert all(r.startswith(url) or r.startswith("blob:") for r in requests), requests
    assert not errors, errors
    page.close()


def test_photos_beyond_the_request_size_and_a_bad_one(served, browser, tmp_path: Path) -> None:
    """Three photos with --max-images 2: two requests, answers in the order dropped; the bad one shows why."""
    url, _, _ = served
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.evaluate(f"sessionStorage.setItem('neardup-token', '{TOKEN}')")
    page.reload()
    page.wait_for_function("() => document.getElementById('store').textContent.includes('photos')")
    files = []
    for i, seed in enumerate((3, None, 7)):
        f = tmp_path / f"{i}.jpg"
        if seed is None:
            f.write_bytes(b"not a photo")
        else:
            product_photo(seed).save(f, "JPEG", quality=85)
        files.append(str(f))
    page.set_input_files("#files", files)
    page.wait_for_function("() => document.querySelectorAll('.result').length === 3 && "
                           "document.getElementById('status').textContent.startsWith('Answered')")
    cards = page.locator(".result")
    assert [cards.nth(i).locator(".name").inner_text() for i in range(3)] == ["0.jpg", "1.jpg", "2.jpg"]
    assert cards.nth(1).locator(".error").inner_text() == "not a recognised image format"
    assert cards.nth(0).locator(".match").count() > 0 and cards.nth(2).locator(".match").count() > 0
    assert cards.nth(0).locator(".verdict").inner_text() == "Already in the catalogue"
    assert not errors, errors
    page.close()


def test_no_token_box_without_a_token(served, browser) -> None:
    """A server without --token: the page shows no token box (the `hidden` attribute wins over the CSS that
    lays out the controls), and answers without one."""
    _, root, _ = served
    proc, url = start_server(root / "catalog.h5")
    try:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("() => document.getElementById('store').textContent.includes('13 photos')")
        assert page.locator("#token-row").is_hidden()
        assert page.eval_on_selector("#token-row", "el => getComputedStyle(el).display") == "none"
        assert page.locator("#threshold").is_visible()  # the other controls are laid out as before
        page.goto(url + "review")
        page.wait_for_function("() => document.getElementById('status').textContent.includes('to review')")
        assert page.locator("#token-row").is_hidden()
        page.close()
    finally:
        stop_server(proc)


def test_the_page_says_which_matches_a_person_reviewed(served, browser) -> None:
    """A decision recorded in the store's journal shows on the match it is about, and says how it was decided."""
    from neardup.search.review import record_decision
    from neardup.store import Store

    url, root, _ = served
    store = root / "catalog.h5"
    upload = root / "photos" / "img_0003.jpg"  # a catalogue photo itself: its bytes are the decided content
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    page.wait_for_selector("#token-row:not([hidden])")
    page.fill("#token", TOKEN)
    page.dispatch_event("#token", "change")
    page.wait_for_function("() => document.getElementById('store').textContent.includes('13 photos')")
    page.set_input_files("#files", str(upload))
    page.wait_for_selector(".result .match")
    paths = [p.inner_text() for p in page.locator(".result .match .path").all()]
    other = next(p for p in paths if not p.endswith("img_0003.jpg"))  # a neighbour the person says is distinct
    assert page.locator(".result .reviewed:not([hidden])").count() == 0  # nothing decided yet
    with Store.open(store) as gen:
        stored = [p for p in gen.catalog.paths if p.endswith("img_0003.jpg")][0]
    record_decision(store, stored, other, "distinct", source="test")
    try:
        page.set_input_files("#files", [])
        page.set_input_files("#files", str(upload))
        shown = page.locator(".result .match", has=page.locator(".path", has_text=other))
        shown.locator(".reviewed:not([hidden])").wait_for()
        assert shown.locator(".reviewed").inner_text() == "reviewed: not a duplicate (distinct)"
        assert page.locator(".result .reviewed:not([hidden])").count() == 1  # only the decided match
    finally:
        record_decision(store, stored, other, "undecided", source="test")  # the module's other tests see none
        page.close()
