"""The HTML report (structure, escaping, thumbnails, placeholders, size at 5,000 pairs), the pair plot, and the CLI."""
from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import neardup.search.report as report_mod
from neardup.cli import app
from neardup.indexer.build import build_index
from neardup.search.duplicates import find_duplicates
from neardup.search.pairs_io import read_pairs_csv
from neardup.search.plots import plot_pair
from neardup.search.report import placeholder_uri, thumbnail_uri, write_report

runner = CliRunner()
EVIL = "<script>alert(1)</script>"  # as a path: folder "<script>alert(1)<", file "script>.jpg"
EVIL_ATTR = '<img src=x onerror="window.__pwned=1">'


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result) -> bool:
    return (result.exit_code == 2 and result.output.strip().startswith("neardup: error:")
            and result.output.count("\n") == 1 and "Traceback" not in result.output)


def data_island(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="neardup-data">(.*?)</script>', page, re.S)
    assert m, "no data island"
    return json.loads(m.group(1))


@pytest.fixture
def dup_store(tmp_path: Path, make_images) -> Path:
    """A phash store of 6 products with copies: a resize, a byte-identical file, and copies under evil names."""
    imgs = make_images(6)
    root = tmp_path / "imgs"
    Image.open(imgs[0]).resize((200, 200), Image.LANCZOS).save(root / "small_0.jpg", "JPEG", quality=60)
    shutil.copy(imgs[1], root / "same_1.jpg")
    (root / "<script>alert(1)<").mkdir()
    Image.open(imgs[2]).save(root / f"{EVIL}.jpg", "JPEG", quality=70)
    Image.open(imgs[3]).save(root / f"{EVIL_ATTR}.jpg", "JPEG", quality=70)
    store = tmp_path / "cat.h5"
    build_index([root], store, model="phash")
    return store


def test_report_structure_thumbnails_and_escaping(dup_store: Path, tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    real = report_mod.thumbnail_uri
    monkeypatch.setattr(report_mod, "thumbnail_uri", lambda p, s=256: calls.append(str(p)) or real(p, s))
    out = tmp_path / "report.html"
    res = write_report(dup_store, out)
    page = out.read_text(encoding="utf-8")
    data = data_island(page)
    # 4 pairs (img0~small_0, img1=same_1 exact, img2~EVIL, img3~EVIL_ATTR), 4 groups of 2
    assert res.pairs == 4 and res.groups == 4 and res.images == 8 and not res.missing
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 8  # each image thumbnailed once
    assert [p[2] for p in data["pairs"]] == sorted((p[2] for p in data["pairs"]), reverse=True)
    assert data["pairs"][0][3] == 1  # the exact pair (score 1.0) is marked
    for im in data["images"]:
        assert im["t"].startswith("data:image/jpeg;base64,")
        thumb = Image.open(io.BytesIO(base64.b64decode(im["t"].split(",", 1)[1])))
        assert thumb.format == "JPEG" and max(thumb.size) <= 256
    assert all(sum(m["k"] for m in g["m"]) == 1 for g in data["groups"])  # exactly one keeper per group
    # The evil names are in the data, as data; the raw page has them only escaped.
    assert {"imgs/" + EVIL + ".jpg", "imgs/" + EVIL_ATTR + ".jpg"} <= {im["p"] for im in data["images"]}
    assert EVIL not in page and "<img src=x" not in page and "alert(1)\\u003c/script\\u003e" in page
    assert page.count("<script") == 2 and page.count("</script>") == 2  # the data island and the renderer
    # self-contained: nothing is fetched from anywhere
    assert not re.search(r'(src|href)=["\']?(https?:)?//', page) and "default-src &#x27;none&#x27;" in page
    assert "images in store" in page and "phash" in page and "0.5625" in page and "generated" in page


def test_report_header_escapes_store_path(tmp_path: Path, make_images) -> None:
    make_images(2)
    folder = tmp_path / "<b>shop & co"
    folder.mkdir()
    store = folder / "cat.h5"
    build_index([tmp_path / "imgs"], store, model="phash")
    page = write_report(store, tmp_path / "r.html").out.read_text()
    assert "<b>shop" not in page and "&lt;b&gt;shop &amp; co" in page


def test_missing_image_gives_placeholder(dup_store: Path, tmp_path: Path) -> None:
    (tmp_path / "imgs" / "small_0.jpg").unlink()
    (tmp_path / "imgs" / "same_1.jpg").write_bytes(b"not an image any more")
    res = write_report(dup_store, tmp_path / "report.html")
    assert sorted(res.missing) == ["imgs/same_1.jpg", "imgs/small_0.jpg"]
    data = data_island(res.out.read_text())
    missing = [im for im in data["images"] if im["t"] is None]
    assert len(missing) == 2 and data["placeholder"] == placeholder_uri()
    assert base64.b64decode(placeholder_uri().split(",", 1)[1]).decode().count("missing") == 1
    assert thumbnail_uri(tmp_path / "nope.jpg") is None


def test_report_from_files_threshold_and_png_dir(dup_store: Path, tmp_path: Path) -> None:
    rep = find_duplicates(dup_store)
    from neardup.search.pairs_io import write_groups_json, write_pairs_csv

    write_pairs_csv(rep, tmp_path / "pairs.csv")
    write_groups_json(rep, tmp_path / "groups.json")
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    res = write_report(dup_store, tmp_path / "a.html", pairs=tmp_path / "pairs.csv", groups=tmp_path / "groups.json",
                       png_dir=pngs)
    assert (res.pairs, res.groups) == (4, 4)
    assert sorted(p.name for p in pngs.iterdir()) == [f"pair_{k:05d}.png" for k in range(1, 5)]
    assert Image.open(pngs / "pair_00001.png").size == (1000, 500)
    only = write_report(dup_store, tmp_path / "b.html", pairs=tmp_path / "pairs.csv", threshold=0.99)
    data = data_island(only.out.read_text())
    assert only.groups == 0 and not data["has_groups"] and all(p[2] >= 0.99 for p in data["pairs"])
    assert "as in the pairs file" not in only.out.read_text()  # the given threshold is shown
    assert len(read_pairs_csv(tmp_path / "pairs.csv")) == 4


def test_5000_pairs_stay_small_and_are_not_prerendered(tmp_path: Path, make_images) -> None:
    paths = make_images(30)
    store = tmp_path / "cat.h5"
    build_index([tmp_path / "imgs"], store, model="phash")
    rel = [f"imgs/{p.name}" for p in paths]
    with open(tmp_path / "pairs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["a_id", "a_path", "b_id", "b_path", "score", "kind"])
        for k in range(5000):
            w.writerow([k % 30, rel[k % 30], (k * 7 + 1) % 30, rel[(k * 7 + 1) % 30], f"{0.5 + k / 10000:.6f}", "near"])
    res = write_report(store, tmp_path / "big.html", pairs=tmp_path / "pairs.csv")
    page = res.out.read_text()
    assert res.pairs == 5000 and res.images == 30
    assert len(page) < 1_500_000  # ~30 thumbnails + ~25 bytes per pair
    assert page.count("data:image/jpeg;base64,") == 30  # each thumbnail embedded once, not once per pair
    assert 'class="card' not in page  # nothing pre-rendered: the script renders one page of 100 at a time
    assert data_island(page)["page_size"] == 100


def test_bad_pairs_and_groups_files(dup_store: Path, tmp_path: Path) -> None:
    from neardup.errors import InputError

    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n")
    with pytest.raises(InputError, match="a_path,b_path,score"):
        write_report(dup_store, tmp_path / "r.html", pairs=bad)
    bad.write_text("a_path,b_path,score\na.jpg,b.jpg,high\n")
    with pytest.raises(InputError, match="line 2"):
        write_report(dup_store, tmp_path / "r.html", pairs=bad)
    bad.write_text("a_path,b_path,score\na.jpg,b.jpg,nan\n")
    with pytest.raises(InputError, match="must be a number"):
        write_report(dup_store, tmp_path / "r.html", pairs=bad)
    badj = tmp_path / "bad.json"
    badj.write_text('{"groups": [{"members": [{"path": "a.jpg", "score_to_keeper": "high"}]}]}')
    with pytest.raises(InputError, match="score_to_keeper"):
        write_report(dup_store, tmp_path / "r.html", groups=badj)
    badj.write_text('{"groups": [{"members": [{"id": 1}]}]}')
    with pytest.raises(InputError, match="group 1"):
        write_report(dup_store, tmp_path / "r.html", groups=badj)
    assert not (tmp_path / "r.html").exists()


# ---------------------------------------------------------------------------------------------------- plot

def test_plot_pair_png_and_panels(tmp_path: Path, make_images) -> None:
    a, b = make_images(2, size=(640, 360))
    fig = plot_pair(a, b, 0.97123, tmp_path / "pair.png")
    assert [ax.get_title() for ax in fig.axes] == ["Original", "Duplicate (Score: 0.9712)"]
    assert Image.open(tmp_path / "pair.png").size == (1000, 500)
    from neardup.errors import InputError

    with pytest.raises(InputError, match="cannot read image"):
        plot_pair(a, tmp_path / "nope.jpg", 0.5, tmp_path / "x.png")
    fig = plot_pair(a, tmp_path / "nope.jpg", 0.5, None, strict=False)  # a "missing" panel instead
    assert len(fig.axes) == 2 and fig.axes[1].texts[0].get_text() == "missing"


# ----------------------------------------------------------------------------------------------------- CLI

def test_cli_report(dup_store: Path, tmp_path: Path) -> None:
    r = run("report", "--store", dup_store, "--out", tmp_path / "r.html")
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "4 groups, 4 pairs, 8 images" in r.output
    r = run("duplicates", "-s", dup_store, "-o", tmp_path / "pairs.csv", "-g", tmp_path / "groups.json")
    assert r.exit_code == 0
    (tmp_path / "pngs").mkdir()
    r = run("report", "-s", dup_store, "--pairs", tmp_path / "pairs.csv", "--groups", tmp_path / "groups.json",
            "-o", tmp_path / "r2.html", "--png-dir", tmp_path / "pngs", "-t", "0.7")
    assert r.exit_code == 0, r.output
    assert "wrote 4 pair images" in r.output and len(list((tmp_path / "pngs").glob("pair_*.png"))) == 4


def test_cli_report_bad_input(dup_store: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("nothing,useful\n")
    assert one_line_error(run("report", "-s", dup_store, "--pairs", bad, "-o", tmp_path / "r.html"))
    assert one_line_error(run("report", "-s", dup_store, "--pairs", tmp_path / "none.csv", "-o", tmp_path / "r.html"))
    assert one_line_error(run("report", "-s", dup_store, "-o", tmp_path / "no" / "r.html"))
    (tmp_path / "afile").write_text("x")
    assert one_line_error(run("report", "-s", dup_store, "-o", tmp_path / "r.html", "--png-dir", tmp_path / "afile"))
    assert one_line_error(run("report", "-s", tmp_path / "none.h5", "-o", tmp_path / "r.html"))


def test_plot_pair_titles_the_verdict_and_draws_the_inliers(tmp_path: Path, make_images) -> None:
    from neardup.search.inliers import file_points
    from neardup.search.plots import MAX_LINES

    a, b = make_images(2)
    small = tmp_path / "small.jpg"
    Image.open(a).resize((200, 200)).save(small, "JPEG", quality=70)
    v = file_points(a, small)
    assert v is not None and v.verified and v.xy_a is not None and len(v.xy_a) == v.inliers > 0
    fig = plot_pair(a, small, 0.98, None, verification=v, threshold=0.9)
    assert fig.axes[1].get_title() == f"verified duplicate, {v.inliers} inliers (score 0.9800)"
    assert len(fig.artists) == min(v.inliers, MAX_LINES)  # one line per inlier match (a subset beyond MAX_LINES)
    # an unrelated pair: never "Duplicate", by the verification or by the threshold
    u = file_points(a, b)
    assert u is not None and u.judged and not u.verified
    fig = plot_pair(a, b, 0.39, None, verification=u, threshold=0.9)
    assert fig.axes[1].get_title() == f"not a duplicate: {u.inliers} inliers, not verified (score 0.3900)"
    assert fig.axes[1].get_title().lower().count("duplicate") == 1
    fig = plot_pair(a, b, 0.39, None, threshold=0.9)
    assert fig.axes[1].get_title() == "not a duplicate (score 0.3900 < 0.9000)" and not fig.artists
    assert plot_pair(a, b, 0.95, None, threshold=0.9).axes[1].get_title() == "duplicate by score (0.9500 >= 0.9000)"
    assert file_points(a, tmp_path / "nope.jpg") is None


def test_cli_plot(tmp_path: Path, make_images) -> None:
    a, b = make_images(2)
    small = tmp_path / "small.jpg"
    Image.open(a).resize((160, 160)).save(small, "JPEG", quality=70)
    r = run("plot", a, b, "--out", tmp_path / "p.png", "--score", "0.5")
    assert r.exit_code == 0 and "score 0.5000" in r.output and Image.open(tmp_path / "p.png").size == (1000, 500)
    r = run("plot", a, small, "--model", "phash", "--out", tmp_path / "q.png")  # score computed, as compare
    assert r.exit_code == 0 and "score 1.0000" in r.output, r.output
    assert "verified duplicate" in r.output and "not a duplicate" not in r.output, r.output
    # an unrelated pair says so (the verification judged it), whatever its score
    r = run("plot", a, b, "--model", "phash", "--out", tmp_path / "u.png")
    assert r.exit_code == 0 and "wrote" in r.output and ": not a duplicate: " in r.output, r.output
    assert one_line_error(run("plot", a, tmp_path / "nope.jpg", "--score", "0.5", "-o", tmp_path / "x.png"))
    assert one_line_error(run("plot", a, b, "--score", "0.5", "-o", tmp_path / "no" / "x.png"))


def test_report_without_duplicates_and_from_a_result(tmp_path: Path, make_images) -> None:
    make_images(3)  # three distinct products: nothing to report
    store = tmp_path / "cat.h5"
    build_index([tmp_path / "imgs"], store, model="phash")
    res = write_report(store, tmp_path / "empty.html")
    data = data_island(res.out.read_text())
    assert (res.pairs, res.groups, res.images) == (0, 0, 0) and data["has_pairs"] and data["pairs"] == []
    rep = find_duplicates(store, threshold=-1.0, verify=False)  # everything pairs up at -1
    res = write_report(store, tmp_path / "all.html", duplicates=rep)
    assert res.pairs == 3 and res.images == 3 and "-1.0000" in res.out.read_text()


def test_report_from_groups_uses_the_pairs_duplicates_recorded(dup_store: Path, tmp_path: Path, make_images,
                                                               monkeypatch) -> None:
    """Issue 29 item 6: `duplicates --out --groups` then `report --groups` neither searches nor verifies again,
    and shows what `report --pairs --groups` shows; a groups file whose pairs no longer hold says why."""
    import neardup.search.duplicates as dup_mod
    import neardup.search.verify as verify_mod

    pairs, groups, alone = tmp_path / "pairs.csv", tmp_path / "groups.json", tmp_path / "alone.json"
    assert run("duplicates", "-s", dup_store, "-o", pairs, "-g", groups).exit_code == 0
    assert run("duplicates", "-s", dup_store, "-g", alone).exit_code == 0  # no pairs file: the pairs go inside
    assert run("report", "-s", dup_store, "--pairs", pairs, "--groups", groups, "-o", tmp_path / "ref.html"
               ).exit_code == 0
    ref = data_island((tmp_path / "ref.html").read_text())
    assert ref["pairs"] and ref["groups"]

    def spy(*args: object, **kwargs: object) -> None:
        raise AssertionError("the pairs were searched or verified again")

    with monkeypatch.context() as m:
        for mod, name in ((report_mod, "find_duplicates"), (dup_mod, "verify_pairs"), (verify_mod, "verify_pairs")):
            m.setattr(mod, name, spy)
        for doc, html in ((groups, "a.html"), (alone, "b.html")):
            r = run("report", "-s", dup_store, "--groups", doc, "-o", tmp_path / html)
            assert r.exit_code == 0 and "again" not in r.output, r.output
            got = data_island((tmp_path / html).read_text())
            assert {k: got[k] for k in ("pairs", "groups", "images")} == {k: ref[k] for k in ("pairs", "groups",
                                                                                             "images")}
        # asked otherwise than the groups file was made: computed again, and said why (here the spy stops it)
        with pytest.raises(AssertionError, match="searched or verified again"):
            run("report", "-s", dup_store, "--groups", groups, "--no-verify", "-o", tmp_path / "c.html")

    # the pairs file edited since: computed again, with the reason on stderr
    pairs.write_bytes(b"".join(pairs.read_bytes().splitlines(keepends=True)[:-1]))  # a pair removed by hand
    r = run("report", "-s", dup_store, "--groups", groups, "-o", tmp_path / "d.html")
    assert r.exit_code == 0 and "computing the pairs from the store again" in r.output
    assert f"its pairs file {pairs} changed since the groups file was written" in r.output
    assert data_island((tmp_path / "d.html").read_text())["pairs"] == ref["pairs"]
    # a new generation of the store: the recorded pairs may be out of date
    make_images(1, folder="more")
    assert build_index([tmp_path / "more"], dup_store).wrote
    r = run("report", "-s", dup_store, "--groups", alone, "-o", tmp_path / "e.html")
    assert r.exit_code == 0 and "the groups file was written for store generation" in r.output, r.output


def test_report_from_groups_says_when_the_store_applies_other_thresholds_now(dup_store: Path, tmp_path: Path
                                                                            ) -> None:
    """Issue 31 item 5: after `evaluate --fit --apply`, a groups file written before shows as written (its
    pairs and groups agree) but the report and the log say it is out of date, naming the threshold that changed."""
    from neardup.store.settings import StoreSettings, write_settings

    groups = tmp_path / "groups.json"
    assert run("duplicates", "-s", dup_store, "-g", groups).exit_code == 0
    doc = json.loads(groups.read_text())
    assert doc["verified"] and isinstance(doc["candidate_threshold"], float)
    r = run("report", "-s", dup_store, "--groups", groups, "-o", tmp_path / "same.html")
    assert r.exit_code == 0 and "other thresholds" not in r.output + (tmp_path / "same.html").read_text()
    loose = round(doc["candidate_threshold"] - 0.05, 4)
    write_settings(dup_store, StoreSettings(candidate_threshold=loose, source="test"))
    r = run("report", "-s", dup_store, "--groups", groups, "-o", tmp_path / "after.html")
    said = f"--candidate-threshold {doc['candidate_threshold']:.4g} then, {loose:.4g} now"
    assert r.exit_code == 0 and said in r.output and "--threshold " not in r.output.split("other thresholds")[1]
    assert said in (tmp_path / "after.html").read_text()
    # the groups shown are the file's, not computed again under the new thresholds
    assert [g["members"] for g in doc["groups"]] and "computing the pairs" not in r.output
    # a flag given on the command line decides instead: nothing to warn of
    r = run("report", "-s", dup_store, "--groups", groups, "--threshold", str(doc["threshold"]), "-o",
            tmp_path / "flag.html")
    assert r.exit_code == 0 and "other thresholds" not in r.output
