"""The review page of `neardup serve` (/review) and its JSON API, against a real server: the token, bad input
(400, nothing recorded), the queue less decided pairs, undo as a new record, the inlier lines against
inliers.pair_points (the oracle); and in a real headless Chromium, decisions made with key presses that
`review export` then lists, through a service restart and an `update`."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from neardup.indexer.build import build_index, update_index
from neardup.search.inliers import pair_points
from neardup.search.review import decisions_for
from neardup.store import read_catalog
from neardup.store.generation import Generation
from neardup.testing import product_photo, write_product_photos

from .test_serve import TOKEN, start_server, stop_server

#: Products 1-3 have a resized, recompressed copy: three verified duplicate pairs.
COPIES = (1, 2, 3)


def make_store(root: Path) -> Path:
    write_product_photos(root / "photos", range(8))
    for s in COPIES:
        product_photo(s).resize((260, 260)).save(root / "photos" / f"copy_{s}.jpg", "JPEG", quality=70)
    build_index([root / "photos"], root / "catalog.h5", model="phash")
    return root / "catalog.h5"


def api(url: str, path: str, body: Any = None, token: str | None = TOKEN, raw: bytes | None = None
        ) -> tuple[int, dict]:
    """(status, JSON) of a GET, or of a POST of `body` as JSON (or `raw` bytes)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, method="POST" if data is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def ready_queue(url: str, **params: int) -> dict:
    """The queue once its pairs are found (waits for that, with a generous deadline)."""
    query = "&".join(f"{k}={v}" for k, v in params.items())
    deadline = time.monotonic() + 120
    while True:
        status, q = api(url, "v1/review/queue" + (f"?{query}" if query else ""))
        assert status == 200, q
        if q["status"] in ("ready", "error"):
            return q
        assert time.monotonic() < deadline, q
        time.sleep(0.2)


def ids_by_name(store: Path) -> dict[str, int]:
    cat = read_catalog(store, vectors=False)
    return {Path(p).name: int(i) for p, i in zip(cat.paths, cat.ids)}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Any:
    root = tmp_path_factory.mktemp("review")
    store = make_store(root)
    proc, url = start_server(store, "--token", TOKEN)
    yield url, store
    stop_server(proc)


def test_review_api_token_bad_input_and_undo(served) -> None:
    url, store = served
    ids = ids_by_name(store)
    a, b = ids["copy_1.jpg"], ids["img_0001.jpg"]
    good = {"a": a, "b": b, "decision": "distinct"}
    # the token, as for /v1/query: nothing served or recorded without it; the page itself is open
    assert api(url, "v1/review/queue", token=None)[0] == 401
    assert api(url, "v1/review/decisions", good, token=None)[0] == 401
    assert api(url, "v1/review/decisions", good, token="wrong")[0] == 401
    with urllib.request.urlopen(url + "review", timeout=30) as r:
        assert r.status == 200 and b'id="keys"' in r.read()
    q = ready_queue(url)
    assert q["status"] == "ready" and q["total"] == len(COPIES) and q["decided"] == 0
    names = {(Path(p["a"]["path"]).name, Path(p["b"]["path"]).name) for p in q["pairs"]}
    assert names == {(f"copy_{s}.jpg", f"img_000{s}.jpg") for s in COPIES}
    assert all(p["verified"] is True and p["inliers"] > 0 for p in q["pairs"])
    # bad input: 400 with a message that says what is wrong, and nothing recorded
    bad = [({**good, "decision": "maybe"}, "unknown_decision", "unknown decision 'maybe'"),
           ({**good, "a": 10**9}, "unknown_photo", f"no photo with id {10**9}"),
           ({**good, "b": a}, "unknown_pair", "two photos"),
           ({**good, "a": "x.jpg"}, "bad_request", "'a' must be a photo id"),
           ({**good, "decision": "duplicate", "keeper": ids["img_0005.jpg"]}, "bad_request", "must be one of the pair"),
           ({**good, "keeper": a}, "bad_request", "only a duplicate pair has a keeper"),
           ({**good, "extra": 1}, "bad_request", "unknown field(s) extra"),
           ({"a": a, "b": b}, "unknown_decision", "unknown decision None")]
    for body, code, words in bad:
        status, got = api(url, "v1/review/decisions", body)
        assert status == 400 and got["error"]["code"] == code and words in got["error"]["message"], (body, got)
    status, got = api(url, "v1/review/decisions", raw=b"{not json")
    assert status == 400 and "JSON object" in got["error"]["message"]
    status, got = api(url, "v1/review/decisions", raw=b"x" * 5000)
    assert status == 413
    status, got = api(url, "v1/review/undo", {"a": a, "b": b})
    assert status == 400 and got["error"]["code"] == "nothing_to_undo"
    assert decisions_for(store).history == []
    # a decision: recorded in the journal, its pair gone from the queue
    status, got = api(url, "v1/review/decisions", {"a": a, "b": b, "decision": "duplicate", "keeper": b})
    assert status == 200 and got["recorded"]["decision"] == "duplicate", got
    assert got["recorded"]["keeper"].endswith("img_0001.jpg") and got["recorded"]["source"] == "page"
    state = decisions_for(store)
    assert len(state.history) == 1 and len(state.current) == 1
    q = ready_queue(url)
    assert q["total"] == len(COPIES) - 1 and q["decided"] == 1
    assert all(p["a"]["id"] != a for p in q["pairs"])
    # undo: a new record ("undecided": the pair had no decision before), history kept, the pair back in the queue
    status, got = api(url, "v1/review/undo", {"a": b, "b": a})
    assert status == 200 and got["undid"]["decision"] == "duplicate" and got["recorded"]["decision"] == "undecided"
    state = decisions_for(store)
    assert [d.decision for d in state.history] == ["duplicate", "undecided"] and not state.current
    assert ready_queue(url)["total"] == len(COPIES)
    # decide twice, undo once: the first decision again
    for word in ("distinct", "duplicate"):
        assert api(url, "v1/review/decisions", {"a": a, "b": b, "decision": word})[0] == 200
    status, got = api(url, "v1/review/undo", {"a": a, "b": b})
    assert got["recorded"]["decision"] == "distinct"
    assert [d.decision for d in decisions_for(store).current.values()] == ["distinct"]
    # pagination: one pair a page, every undecided pair once
    seen = [ready_queue(url, offset=k, limit=1)["pairs"] for k in range(3)]
    assert [len(s) for s in seen] == [1, 1, 0]
    assert len({(s[0]["a"]["id"], s[0]["b"]["id"]) for s in seen[:2]}) == 2
    assert api(url, "v1/review/queue?limit=100000")[0] == 422
    # a decision recorded elsewhere (`review import`) drops its pair from the served queue too
    left = seen[0][0]
    csv_path = store.parent / "elsewhere.csv"
    csv_path.write_text(f"a,b,decision\n{left['a']['path']},{left['b']['path']},distinct\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "neardup", "review", "import", str(csv_path), "--store", str(store)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    q = ready_queue(url)
    assert q["total"] == 1 and q["decided"] == 2 and q["pairs"][0] == seen[1][0] and not q["problems"]


def test_inlier_lines_are_the_verification_s(served) -> None:
    url, store = served
    ids = ids_by_name(store)
    a, b = ids["img_0002.jpg"], ids["copy_2.jpg"]
    status, got = api(url, f"v1/review/inliers?a={a}&b={b}")
    assert status == 200, got
    with Generation.open(store) as gen:  # the oracle: the library's inlier pairs of the same rows
        ra, rb = gen.rows_of([a, b]).tolist()
        v = pair_points(gen, ra, rb)
    assert got["verified"] is True and got["inliers"] == v.inliers > 0
    lines = np.array(got["lines"])
    assert len(lines) == min(v.inliers, 150)
    want = {tuple(np.round(r, 4)) for r in np.hstack([v.xy_a, v.xy_b]).astype(np.float64)}
    assert all(tuple(r) in want for r in lines)
    # a copy is a resized photo: a point and its match sit at the same place in both (fractions)
    assert np.abs(lines[:, :2] - lines[:, 2:]).max() < 0.03
    assert api(url, f"v1/review/inliers?a={a}&b={10**9}")[0] == 400


def _export(store: Path, out: Path) -> list[dict[str, str]]:
    """The rows `neardup review export` writes (the CLI, as a user runs it)."""
    r = subprocess.run([sys.executable, "-m", "neardup", "review", "export", "--store", str(store), "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(out, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _open_review(browser: Any, url: str, errors: list[str]) -> Any:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    page.goto(url + "review")
    return page


def _wait_drawn(page: Any) -> tuple[str, str]:
    """The pair shown once its photos and inlier lines are drawn: (a's path, b's path)."""
    page.wait_for_function("() => { const p = document.getElementById('pair'); return !p.hidden && "
                           "p.dataset.drawn === p.dataset.a + '-' + p.dataset.b; }")
    return page.locator("#path-a").inner_text(), page.locator("#path-b").inner_text()


def test_keys_record_decisions_that_survive_restart_and_update(browser, tmp_path: Path) -> None:
    store = make_store(tmp_path)
    proc, url = start_server(store, "--token", TOKEN)
    errors: list[str] = []
    try:
        page = _open_review(browser, url, errors)
        page.wait_for_selector("#token-row:not([hidden])")  # the page asks for the token the server wants
        assert page.locator("#keys").inner_text().count("\n") >= 6  # the keys are shown
        page.fill("#token", TOKEN)
        page.dispatch_event("#token", "change")
        first = _wait_drawn(page)
        assert page.locator("#position").inner_text() == f"Pair 1 of {len(COPIES)}"
        assert int(page.locator("#lines").get_attribute("data-lines")) > 0  # the inlier lines, drawn as SVG
        assert page.locator("#lines line").count() == int(page.locator("#lines").get_attribute("data-lines"))
        assert page.locator("#lines").get_attribute("class") == "verified"
        page.keyboard.press("n")  # distinct: recorded, and the next pair shown
        page.wait_for_function("() => document.getElementById('position').textContent.startsWith('Pair 2')")
        second = _wait_drawn(page)
        assert second != first
        page.keyboard.press("2")  # duplicate, keep the right photo
        page.wait_for_function("() => document.getElementById('position').textContent.startsWith('Pair 3')")
        third = _wait_drawn(page)
        page.keyboard.press("d")
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Recorded')")
        page.keyboard.press("u")  # undo the third: a new record, the pair shown again, undecided
        page.wait_for_function("() => document.getElementById('status').textContent.startsWith('Undone')")
        assert _wait_drawn(page) == third
        page.keyboard.press("k")  # previous: the second pair, its decision shown
        page.wait_for_function("() => document.getElementById('position').textContent.startsWith('Pair 2')")
        assert _wait_drawn(page) == second
        assert page.locator("#decided").inner_text().startswith("Decided: duplicate, keep")
        assert not errors, errors
        page.close()
    finally:
        stop_server(proc)

    def check() -> None:
        rows = {tuple(sorted((Path(r["a"]).name, Path(r["b"]).name))): r for r in _export(store, tmp_path / "x.csv")}
        pair1 = tuple(sorted(Path(p).name for p in first))
        pair2 = tuple(sorted(Path(p).name for p in second))
        assert set(rows) == {pair1, pair2}, rows
        assert rows[pair1]["decision"] == "distinct" and not rows[pair1]["keeper"]
        assert rows[pair2]["decision"] == "duplicate" and Path(rows[pair2]["keeper"]).name == Path(second[1]).name

    check()
    history = [d.decision for d in decisions_for(store).history]
    assert history == ["distinct", "duplicate", "duplicate", "undecided"]
    # a restart: the decided pairs stay out of the queue
    proc, url = start_server(store, "--token", TOKEN)
    try:
        assert ready_queue(url)["total"] == 1
        # an update (a new photo with a copy): the decisions hold, the served queue has the new pair and the
        # undecided one only
        product_photo(20).save(tmp_path / "photos" / "new.jpg", "JPEG", quality=90)
        product_photo(20).resize((250, 250)).save(tmp_path / "photos" / "new_copy.jpg", "JPEG", quality=70)
        update_index([tmp_path / "photos"], store)
        deadline = time.monotonic() + 120
        while (q := ready_queue(url))["total"] != 2 or q["status"] != "ready":
            assert time.monotonic() < deadline, q
            time.sleep(0.3)
        names = {tuple(sorted((Path(p["a"]["path"]).name, Path(p["b"]["path"]).name))) for p in q["pairs"]}
        assert names == {("new.jpg", "new_copy.jpg"), tuple(sorted(Path(p).name for p in third))}
        check()
        page = _open_review(browser, url, errors)
        page.evaluate(f"sessionStorage.setItem('neardup-token', '{TOKEN}')")
        page.reload()
        _wait_drawn(page)
        assert page.locator("#position").inner_text() == "Pair 1 of 2"
        assert not errors, errors
        page.close()
    finally:
        stop_server(proc)


def test_page_and_import_decisions_during_an_update_none_lost(tmp_path: Path) -> None:
    """Decisions posted to the service (as the page posts them) while `review import` records others and
    `update` publishes a generation: every one is in the journal afterwards, as made."""
    store = make_store(tmp_path)
    cat = read_catalog(store, vectors=False)
    ids, paths = [int(i) for i in cat.ids], list(cat.paths)
    pairs = [(i, j) for i in range(len(ids)) for j in range(i + 1, len(ids))]
    posted, imported = pairs[0::2][:20], pairs[1::2][:20]
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["a", "b", "decision"])
        w.writerows([paths[i], paths[j], "distinct"] for i, j in imported)
    for s in range(30, 36):  # enough new photos that the update runs while the others record
        product_photo(s).save(tmp_path / "photos" / f"new_{s}.jpg", "JPEG", quality=90)
    proc, url = start_server(store, "--token", TOKEN)
    try:
        cmd = [sys.executable, "-m", "neardup"]
        update = subprocess.Popen([*cmd, "update", str(tmp_path / "photos"), "--store", str(store), "-q"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        imp = subprocess.Popen([*cmd, "review", "import", str(tmp_path / "d.csv"), "--store", str(store)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i, j in posted:
            status, got = api(url, "v1/review/decisions", {"a": ids[i], "b": ids[j], "decision": "duplicate"})
            assert status == 200, got
        for p in (imp, update):
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, out + err
    finally:
        stop_server(proc)
    state = decisions_for(store)
    sha = list(cat.sha256)
    want = {**{tuple(sorted((sha[i], sha[j]))): "duplicate" for i, j in posted},
            **{tuple(sorted((sha[i], sha[j]))): "distinct" for i, j in imported}}
    assert {k: d.decision for k, d in state.current.items()} == want
    assert len(state.history) == len(want) and not state.problems
