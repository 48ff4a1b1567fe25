"""Every command through typer's CliRunner: output, exit codes, and one-line errors."""
from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from neardup.cli import app

runner = CliRunner()


def run(*args: str):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.fixture
def indexed(tmp_path: Path, make_images) -> Path:
    make_images(20)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"nope")
    r = run("index", tmp_path / "imgs", "--store", tmp_path / "cat.h5", "--model", "phash")
    assert r.exit_code == 0, r.output
    assert "added 20" in r.output and "failed 1" in r.output and "skipped imgs/broken.png" in r.output
    return tmp_path / "cat.h5"


def test_info(indexed: Path) -> None:
    r = run("info", "--store", indexed)
    assert r.exit_code == 0 and "phash" in r.output and "images  20" in r.output and "failed  1" in r.output
    doc = json.loads(run("info", "--store", indexed, "--json").output)
    assert doc["count"] == 20 and doc["dim"] == 64 and doc["failure_list"][0]["path"] == "imgs/broken.png"
    assert "not a recognised" in run("info", "-s", indexed, "--failures").output


def test_update_no_change_and_env_store(indexed: Path, monkeypatch) -> None:
    monkeypatch.setenv("NEARDUP_STORE", str(indexed))
    r = run("update", indexed.parent / "imgs")
    assert r.exit_code == 0 and "nothing changed" in r.output and "unchanged 20" in r.output


def test_query_exit_codes_and_formats(indexed: Path, tmp_path: Path, make_images) -> None:
    q = tmp_path / "imgs" / "img_0003.jpg"
    r = run("query", q, "--store", indexed, "-k", "3")
    assert r.exit_code == 0 and "imgs/img_0003.jpg  <- match" in r.output
    doc = json.loads(run("query", q, "--store", indexed, "-k", "3", "--json").output)
    assert doc["results"][0]["matches"][0]["score"] == pytest.approx(1.0) and len(doc["results"][0]["matches"]) == 3
    rows = list(csv.DictReader(io.StringIO(run("query", q, "-s", indexed, "-k", "2", "--csv").output)))
    assert len(rows) == 2 and rows[0]["path"] == "imgs/img_0003.jpg" and rows[0]["match"] == "true"
    # an unrelated photo: no match above the threshold -> exit 1
    other = make_images(1, folder="other", start=999)[0]
    assert run("query", other, "-s", indexed, "-t", "0.99").exit_code == 1
    # errors -> exit 2 with one line
    r = run("query", tmp_path / "missing.jpg", "-s", indexed)
    assert r.exit_code == 2 and r.output.strip().startswith("neardup: error:") and r.output.count("\n") == 1
    assert run("query", q, "-s", indexed, "--json", "--csv").exit_code == 2
    assert run("query", q, "-s", indexed, "-t", "3").exit_code == 2


def test_compare(tmp_path: Path, make_images) -> None:
    a, b = make_images(2)
    shutil.copy(a, tmp_path / "a_copy.jpg")
    r = run("compare", a, tmp_path / "a_copy.jpg", "--model", "phash")
    assert r.exit_code == 0 and r.output.startswith("1.0000  duplicate")
    assert run("compare", a, b, "--model", "phash").exit_code == 1
    r = run("compare", a, tmp_path / "nope.jpg", "--model", "phash")
    assert r.exit_code == 2 and "no such image" in r.output


def test_duplicates_writes_csv_and_json(indexed: Path, tmp_path: Path) -> None:
    shutil.copy(tmp_path / "imgs" / "img_0001.jpg", tmp_path / "imgs" / "dup.jpg")
    assert run("update", tmp_path / "imgs", "-s", indexed).exit_code == 0
    r = run("duplicates", "-s", indexed, "--out", tmp_path / "p.csv", "--groups", tmp_path / "g.json")
    assert r.exit_code == 0 and "1 exact" in r.output and "wrote" in r.output
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert rows[0]["kind"] == "exact" and {rows[0]["a_path"], rows[0]["b_path"]} == {"imgs/img_0001.jpg",
                                                                                     "imgs/dup.jpg"}
    doc = json.loads((tmp_path / "g.json").read_text())
    assert any(set(g["removable"]) | {g["keeper_path"]} >= {"imgs/dup.jpg", "imgs/img_0001.jpg"}
               for g in doc["groups"])


@pytest.mark.parametrize("args,message", [
    (["index", "MISSING", "--model", "phash"], "no such file or folder"),
    (["index", "EMPTY", "--model", "phash"], "no images found"),
    (["index", "IMGS", "--model", "phash", "--store", "NODIR/cat.h5"], "does not exist"),
    (["index", "IMGS", "--store", "FOREIGN"], "not a readable HDF5"),
    (["index", "IMGS", "--model", "vgg16", "--store", "STORE"], "made with model phash"),
    (["info", "--store", "FOREIGN"], "not a readable HDF5"),
    (["duplicates", "--store", "MISSINGSTORE"], "no store"),
])
def test_bad_input_gives_one_line_and_exit_2(indexed: Path, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "foreign.h5").write_text("x")
    subst = {"MISSING": tmp_path / "missing", "EMPTY": tmp_path / "empty", "IMGS": tmp_path / "imgs",
             "NODIR": tmp_path / "nodir", "FOREIGN": tmp_path / "foreign.h5", "STORE": indexed,
             "MISSINGSTORE": tmp_path / "none.h5"}
    args = [str(subst.get(a.split("/")[0], a)) + ("/" + a.split("/", 1)[1] if "/" in a else "") for a in args]
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("neardup: error:") and message in r.output and "Traceback" not in r.output
    assert r.output.count("\n") == 1


@pytest.mark.slow
def test_offline_imagenet_is_one_line_error(tmp_path: Path, make_images, monkeypatch) -> None:
    import keras

    def offline(*a, **k):
        raise Exception("URL fetch failure on https://storage.googleapis.com/x: None -- [Errno -3] no network")

    monkeypatch.setattr(keras.applications, "ResNet50", offline)
    make_images(2)
    r = run("index", tmp_path / "imgs", "--store", tmp_path / "c.h5", "--weights", "imagenet")
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert "--weights PATH" in r.output and "--model phash" in r.output and ".keras" in r.output
    assert not (tmp_path / "c.h5").exists()


def test_help_lists_commands() -> None:
    r = run("--help")
    for cmd in ("index", "update", "info", "query", "compare", "duplicates"):
        assert cmd in r.output


def test_output_path_that_is_a_folder_is_one_line_error(indexed: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    r = run("duplicates", "-s", indexed, "--out", tmp_path / "out")
    assert r.exit_code == 2 and r.output.startswith("neardup: error:") and "is a folder" in r.output


def test_query_says_its_verdict_with_paths_from_the_current_folder(indexed: Path, tmp_path: Path, make_images,
                                                                   monkeypatch) -> None:
    """One verdict line per photo (the match and why, or why it is new), catalogue paths that open from the
    current folder: relative under it, absolute elsewhere."""
    q = tmp_path / "imgs" / "img_0003.jpg"
    monkeypatch.chdir(tmp_path)
    r = run("query", q, "--store", indexed, "-k", "2", "--no-verify")
    assert r.exit_code == 0, r.output
    assert "  match: imgs/img_0003.jpg (score 1.0000 >= threshold" in r.output, r.output
    assert "  imgs/img_0003.jpg  <- match" in r.output  # the neighbour's row, relative to the current folder
    other = make_images(1, folder="other", start=999)[0]
    r = run("query", other, "-s", indexed, "-t", "0.999", "--no-verify")
    assert r.exit_code == 1 and "  new: no match at or above 0.9990" in r.output, r.output
    r = run("query", q, other, "-s", indexed, "-k", "2", "--verify")  # verified: the verdict says so, and the rows
    assert r.exit_code == 0 and "  match: imgs/img_0003.jpg (verified, " in r.output, r.output
    assert "(re-ranked by verification: verified first, then by inliers)" in r.output
    assert any(line.split()[3:4] == ["yes"] and "imgs/img_0003.jpg  <- match" in line for line in r.output.splitlines())
    assert "other/img_0999.jpg\n  new: no verified match\n" in r.output, r.output
    monkeypatch.chdir(tmp_path / "other")  # the store's photos are not under it: absolute paths
    r = run("query", q, "--store", indexed, "-k", "1", "--no-verify")
    assert f"  match: {tmp_path / 'imgs' / 'img_0003.jpg'} (score" in r.output, r.output


def test_csv_booleans_are_lower_case_and_old_files_still_read(indexed: Path, tmp_path: Path) -> None:
    """Every CSV neardup writes spells booleans true/false; a pairs CSV of an older version (True/False) reads."""
    from neardup.search.pairs_io import read_pairs_csv

    q = tmp_path / "imgs" / "img_0003.jpg"
    out = run("query", q, "-s", indexed, "-k", "3", "--csv").output
    rows = list(csv.DictReader(io.StringIO(out)))
    assert {row["match"] for row in rows} <= {"true", "false"} and rows[0]["match"] == "true"
    assert "True" not in out and "False" not in out
    old = tmp_path / "old.csv"
    old.write_text("a_id,a_path,b_id,b_path,score,kind,verified,inliers\n0,a.jpg,1,b.jpg,0.95,near,True,40\n"
                   "2,c.jpg,3,d.jpg,0.93,near,False,3\n")
    assert [p.verified for p in read_pairs_csv(old)] == [True, False]


def test_info_json_and_text_say_the_same_store(indexed: Path, tmp_path: Path) -> None:
    """`info` and `info --json` render one Store.describe(): the previous generation after an update."""
    shutil.copy(tmp_path / "imgs" / "img_0001.jpg", tmp_path / "imgs" / "again.jpg")
    assert run("update", tmp_path / "imgs", "-s", indexed).exit_code == 0
    doc = json.loads(run("info", "-s", indexed, "--json").output)
    assert doc["previous"]["count"] == 20 and doc["count"] == 21 and doc["check"] is None
    text = run("info", "-s", indexed).output
    assert f"{doc['previous']['path']} (20 images, written {doc['previous']['updated']}" in text
    assert run("index", tmp_path / "imgs", "-s", indexed, "--ray-actors", "2").exit_code == 2  # without --ray
