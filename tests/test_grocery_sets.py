"""Evaluation sets from the real Grocery Store Dataset photos (neardup.testing.grocery): copies, reshots, catalogue."""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neardup.errors import InputError
from neardup.testing.grocery import HEADER, grocery_root, make_catalogue_set, make_copies_set, make_reshots_set, photos


@pytest.fixture(scope="module")
def root() -> Path:
    try:
        return grocery_root()
    except InputError as e:
        pytest.skip(f"real-photo test skipped: {e}")


def read(csv_path: Path) -> list[dict[str, str]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        assert next(csv.reader(f)) == list(HEADER)
    with open(csv_path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def copies(root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    out = tmp_path_factory.mktemp("copies")
    path = make_copies_set(out, root=root, n_originals=6, n_distractors=6, seed=0)
    return out, read(path)


def test_copies_set_rows_and_files(root: Path, copies: tuple[Path, list[dict[str, str]]]) -> None:
    out, rows = copies
    assert len(rows) == 6 * 2 + 6
    assert all(r["role"] == "" for r in rows)
    assert len({r["path"] for r in rows}) == len(rows)
    groups = Counter(r["group"] for r in rows if r["group"])
    assert len(groups) == 6 and set(groups.values()) == {2}
    assert sum(not r["group"] for r in rows) == 6
    for g in groups:
        orig, copy = sorted((Path(r["path"]) for r in rows if r["group"] == g),
                            key=lambda p: p.parent == out / "copies")
        assert copy.parent == out / "copies" and copy.name == f"{orig.stem}_copy.jpg"  # its own original's copy
        assert orig.is_absolute() and orig.is_relative_to(root) and orig.is_file()
        assert len({r["class"] for r in rows if r["group"] == g}) == 1
        assert copy.read_bytes() != orig.read_bytes()
        with Image.open(copy) as c, Image.open(orig) as o:
            c.load()
            assert c.mode == "RGB"
            assert c.size != o.size or not np.array_equal(np.asarray(c), np.asarray(o.convert("RGB")))
    for r in rows:
        if not r["group"]:
            assert Path(r["path"]).is_relative_to(root) and Path(r["path"]).is_file()
    doc = json.loads((out / "copies_edits.json").read_text())
    assert len(doc["copies"]) == 6
    for c in doc["copies"]:
        e = c["edits"]
        assert all(0 <= f <= 0.10 for f in e["crop"]) and -2 <= e["rotate"] <= 2 and 0.5 <= e["scale"] <= 1.0
        assert 40 <= e["quality"] <= 90
        assert all(0.8 <= e[k] <= 1.2 for k in ("brightness", "contrast", "saturation"))


def test_copies_are_deterministic_by_seed(root: Path, copies: tuple[Path, list[dict[str, str]]],
                                          tmp_path: Path) -> None:
    _, rows = copies

    def copy_bytes(rows_: list[dict[str, str]]) -> list[bytes]:
        return [Path(r["path"]).read_bytes() for r in rows_ if "/copies/" in r["path"]]

    again = read(make_copies_set(tmp_path / "a", root=root, n_originals=6, n_distractors=6, seed=0))
    assert [(Path(r["path"]).name, r["group"], r["class"]) for r in again] == \
        [(Path(r["path"]).name, r["group"], r["class"]) for r in rows]
    assert copy_bytes(again) == copy_bytes(rows)
    other = read(make_copies_set(tmp_path / "b", root=root, n_originals=6, n_distractors=6, seed=1))
    assert [r["path"] for r in other if r["group"]] != [r["path"] for r in again if r["group"]]
    assert set(copy_bytes(other)).isdisjoint(copy_bytes(rows))


def test_copies_set_refuses_more_than_the_split_holds(root: Path, tmp_path: Path) -> None:
    n = len(photos(root, "val", ("Packages",)))
    with pytest.raises(InputError, match="photos"):
        make_copies_set(tmp_path, root=root, n_originals=n, n_distractors=1, split="val", kinds=("Packages",))


def test_reshots_set(root: Path, tmp_path: Path) -> None:
    rows = read(make_reshots_set(tmp_path, root=root))
    groups = Counter(r["group"] for r in rows)
    assert len(groups) >= 31 and min(groups.values()) >= 2
    assert all(r["group"] == r["class"] and r["role"] == "" for r in rows)
    assert all(Path(r["path"]).is_file() for r in rows)


def test_catalogue_set(root: Path, tmp_path: Path) -> None:
    rows = read(make_catalogue_set(tmp_path, root=root))
    cat = [r for r in rows if r["role"] == ""]
    queries = [r for r in rows if r["role"] == "query"]
    assert len(cat) == 81 and len(cat) + len(queries) == len(rows)
    assert len({r["group"] for r in cat}) == 81
    assert queries and {r["group"] for r in queries} <= {r["group"] for r in cat}
    assert all(Path(r["path"]).is_file() for r in cat[:5] + queries[:5])


def test_grocery_root_names_a_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(InputError, match="no-such-dataset"):
        grocery_root(missing)
