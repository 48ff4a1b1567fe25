"""Query and duplicates against a brute-force oracle, the anti-chaining rule, and the keeper rule."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neardup.config import resolve_threshold
from neardup.embed.embedders import l2_normalize
from neardup.errors import InputError, StoreMismatchError
from neardup.indexer.build import build_index
from neardup.search.duplicates import complete_linkage, connected_components, duplicate_rows, find_duplicates
from neardup.search.join import exact_pairs, self_join
from neardup.search.pairs_io import groups_document, write_groups_json, write_pairs_csv
from neardup.search.query import Searcher, has_match, query
from neardup.store import Catalog, ModelInfo, StoreMeta, write_catalog
from neardup.testing import write_product_photos


def planted(n: int, d: int, seed: int = 0, dups: int = 30) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """Unit vectors with `dups` planted near-duplicate rows (cosine ~0.97) of earlier rows."""
    rng = np.random.default_rng(seed)
    xb = l2_normalize(rng.standard_normal((n, d)))
    src = rng.choice(n // 2, dups, replace=False)
    dst = rng.choice(np.arange(n // 2, n), dups, replace=False)
    xb[dst] = l2_normalize(xb[src] + 0.25 / np.sqrt(d) * rng.standard_normal((dups, d)))
    return xb, {(min(a, b), max(a, b)) for a, b in zip(src.tolist(), dst.tolist())}


def brute_force(xb: np.ndarray, t: float) -> set[tuple[int, int]]:
    S = xb @ xb.T
    i, j = np.nonzero(np.triu(S, 1) >= t)
    return set(zip(i.tolist(), j.tolist()))


@pytest.mark.parametrize("block", [1, 7, 64, None])
def test_self_join_equals_brute_force(block: int | None) -> None:
    xb, plant = planted(700, 48)
    I, J, D = self_join(xb, 0.8, block)
    got = set(zip(I.tolist(), J.tolist()))
    assert got == brute_force(xb, 0.8)
    assert plant <= got and (I < J).all()
    np.testing.assert_allclose(D, (xb[I] * xb[J]).sum(1), atol=1e-5)


def test_self_join_threshold_boundary_and_empty() -> None:
    xb = l2_normalize(np.array([[1, 0], [1, 0], [0, 1]], np.float32))
    I, J, D = self_join(xb, 1.0)
    assert (I.tolist(), J.tolist()) == ([0], [1])
    assert len(self_join(np.zeros((0, 4), np.float32), 0.5)[0]) == 0


def test_random_2048d_vectors_deduplicate_to_the_planted_pairs() -> None:
    # 5k rows of 2048-d: several default-sized blocks, no random pair near the threshold; the speed at 10k and
    # 50k is benchmarks/bench_duplicates.py's question, not a test's
    xb, plant = planted(5_000, 2048, dups=50)
    I, J, _ = self_join(xb, 0.9)
    assert set(zip(I.tolist(), J.tolist())) == plant


def test_exact_pairs() -> None:
    I, J = exact_pairs(["a", "b", "a", "c", "a", "b"])
    assert sorted(zip(I.tolist(), J.tolist())) == [(0, 2), (0, 4), (1, 5), (2, 4)]


def test_chain_is_not_merged() -> None:
    # A~B (0.95), B~C (0.95), A!~C (0.80): complete linkage keeps C out of {A, B}
    S = np.array([[1, .95, .80], [.95, 1, .95], [.80, .95, 1]])
    assert complete_linkage(S, 0.9) == [[0, 1]]
    # a clique stays one group; two cliques joined by one weak bridge split at the bridge
    S = np.full((5, 5), 0.5)
    S[:3, :3] = 0.97
    S[3:, 3:] = 0.96
    S[2, 3] = S[3, 2] = 0.92
    np.fill_diagonal(S, 1)
    assert complete_linkage(S, 0.9) == [[0, 1, 2], [3, 4]]
    forced = np.zeros((3, 3), bool)
    forced[0, 2] = forced[2, 0] = True  # byte-identical files always group
    S = np.array([[1, .95, .5], [.95, 1, .5], [.5, .5, 1]])
    assert complete_linkage(S, 0.9, forced) == [[0, 2]] or complete_linkage(S, 0.9, forced) == [[0, 1]]


def test_connected_components() -> None:
    comps = connected_components(6, np.array([0, 1, 4]), np.array([1, 2, 5]))
    assert [c.tolist() for c in comps] == [[0, 1, 2], [4, 5]]


def _catalog(xb: np.ndarray, sha: list[str] | None = None) -> Catalog:
    n, d = xb.shape
    meta = StoreMeta(ModelInfo("fake", "none", "none", dim=d, input_size=16, preprocessing="p"), next_id=n)
    return Catalog(meta=meta, ids=np.arange(n, dtype=np.int64) + 100, paths=[f"p{i:03d}.jpg" for i in range(n)],
                   sizes=np.full(n, 1000, np.int64), mtimes_ns=np.arange(n, dtype=np.int64),
                   sha256=sha or [f"{i:064x}" for i in range(n)], widths=np.full(n, 100, np.int32),
                   heights=np.full(n, 100, np.int32), xb=xb)


def test_find_duplicates_matches_oracle_with_exact_pairs_first(tmp_path: Path) -> None:
    xb, _ = planted(400, 32, dups=20)
    xb[399] = xb[5]  # byte-identical copy: same hash
    sha = [f"{i:064x}" for i in range(400)]
    sha[399] = sha[5]
    cat = _catalog(xb, sha)
    cat.widths[5], cat.heights[5] = 50, 50  # the copy is bigger: it should be the keeper
    write_catalog(tmp_path / "s.h5", cat)
    report = find_duplicates(tmp_path / "s.h5", threshold=0.8)
    got = {(min(p.a_id, p.b_id) - 100, max(p.a_id, p.b_id) - 100) for p in report.pairs}
    assert got == brute_force(xb, 0.8)
    assert report.pairs[0].kind == "exact" and {report.pairs[0].a_id, report.pairs[0].b_id} == {105, 499}
    assert all(p.kind == "near" for p in report.pairs[1:])
    scores = [p.score for p in report.pairs[1:]]
    assert scores == sorted(scores, reverse=True)
    # every group is a clique above threshold and has one keeper
    by_id = {i + 100: i for i in range(400)}
    for g in report.groups:
        rows = [by_id[m.id] for m in g.members]
        assert (xb[rows] @ xb[rows].T >= 0.8 - 1e-6).all()
        assert sum(m.keeper for m in g.members) == 1
    exact_group = next(g for g in report.groups if 105 in [m.id for m in g.members])
    assert exact_group.keeper == 499
    # outputs are complete and parseable
    write_pairs_csv(report, tmp_path / "pairs.csv")
    write_groups_json(report, tmp_path / "groups.json")
    rows = list(csv.DictReader(open(tmp_path / "pairs.csv")))
    assert len(rows) == len(report.pairs) and rows[0]["kind"] == "exact"
    doc = json.loads((tmp_path / "groups.json").read_text())
    assert doc == json.loads(json.dumps(groups_document(report)))
    assert len(doc["groups"]) == len(report.groups) and "complete linkage" in doc["rule"]
    with pytest.raises(InputError):
        write_pairs_csv(report, tmp_path / "missing" / "pairs.csv")


def test_keeper_rule_resolution_then_size_then_age() -> None:
    from neardup.search.grouping import keeper_order

    cat = _catalog(l2_normalize(np.ones((4, 4))))
    cat.widths[:] = [100, 200, 200, 200]
    cat.sizes[:] = [9, 5, 7, 7]
    cat.mtimes_ns[:] = [0, 0, 5, 3]
    assert keeper_order(cat, np.arange(4)).tolist() == [3, 2, 1, 0]


def test_duplicate_rows_pure_core() -> None:
    xb = l2_normalize(np.array([[1, 0], [1, 0.01], [0, 1], [1, 0]], np.float32))
    I, J, D, exact = duplicate_rows(_catalog(xb, ["a", "b", "c", "a"]), 0.99)
    assert list(zip(I.tolist(), J.tolist(), exact.tolist())) == [(0, 3, True), (0, 1, False), (1, 3, False)]


# ---------------------------------------------------------------------------- query on a real store


@pytest.fixture
def phash_store(tmp_path: Path, make_images) -> Path:
    make_images(30)
    store = tmp_path / "cat.h5"
    build_index([tmp_path / "imgs"], store, model="phash")
    return store


def test_query_an_indexed_image_returns_itself_first(tmp_path: Path, phash_store: Path) -> None:
    img = tmp_path / "imgs" / "img_0007.jpg"
    (r,) = query(phash_store, [img], k=3)
    assert r.error is None and r.matches[0].path == "imgs/img_0007.jpg"
    assert r.matches[0].score == pytest.approx(1.0) and r.matches[0].rank == 1
    assert [m.rank for m in r.matches] == [1, 2, 3]
    # a resized, recompressed copy still finds it, above the default threshold
    Image.open(img).resize((160, 160)).save(tmp_path / "q.jpg", quality=60)
    (r,) = query(phash_store, [tmp_path / "q.jpg"], k=1)
    assert r.matches[0].path == "imgs/img_0007.jpg" and has_match([r], resolve_threshold(None, "phash"))


def test_query_folder_batches_and_lists_bad_files(tmp_path: Path, phash_store: Path) -> None:
    q = tmp_path / "queries"
    q.mkdir()
    for i in (1, 2, 3):
        shutil.copy(tmp_path / "imgs" / f"img_{i:04d}.jpg", q / f"q{i}.jpg")
    (q / "zz_bad.png").write_bytes(b"nope")
    results = query(phash_store, [q], k=2, batch_size=2)
    assert [Path(r.query).name for r in results] == ["q1.jpg", "q2.jpg", "q3.jpg", "zz_bad.png"]
    assert [r.matches[0].path for r in results[:3]] == [f"imgs/img_{i:04d}.jpg" for i in (1, 2, 3)]
    assert results[3].error == "not a recognised image format" and results[3].matches == []


def test_query_refuses_other_weights(phash_store: Path, fake_embedder) -> None:
    with pytest.raises(StoreMismatchError):
        Searcher.open(phash_store, embedder=fake_embedder)


def test_threshold_validation() -> None:
    assert resolve_threshold(None, "phash") == pytest.approx(0.5625)
    assert resolve_threshold(0.5, "resnet50") == 0.5
    with pytest.raises(InputError):
        resolve_threshold(1.5, "phash")


def test_neighbours_maps_sparse_ids_to_paths() -> None:
    from neardup.search.query import neighbours
    from neardup.store.faiss_index import id_lookup, rows_for

    cat = _catalog(l2_normalize(np.eye(4, dtype=np.float32)))
    cat.ids = np.array([40, 7, 99, 12], np.int64)
    D = np.array([[0.9, 0.5, 0.1], [0.8, -1, -1]], np.float32)
    I = np.array([[99, 7, 12], [40, -1, -1]], np.int64)
    got = neighbours(D, I, cat.paths, rows_for(id_lookup(cat.ids), I))
    assert [(m.id, m.path, m.rank) for m in got[0]] == [(99, "p002.jpg", 1), (7, "p001.jpg", 2), (12, "p003.jpg", 3)]
    assert [(m.id, m.path) for m in got[1]] == [(40, "p000.jpg")]


def test_duplicates_say_which_listed_files_changed_since_indexing(tmp_path: Path) -> None:
    """A keeper that vanished and a member replaced by another photo since indexing are flagged stale: never
    the keeper, never removable, said on stderr and in the CSV and JSON."""
    write_product_photos(tmp_path / "imgs", range(6))
    copy = (tmp_path / "imgs" / "img_0001.jpg").read_bytes()
    for name, t in (("a.jpg", 1), ("b.jpg", 2), ("c.jpg", 3)):  # three copies; the oldest, a, would be keeper
        (tmp_path / "imgs" / name).write_bytes(copy)
        os.utime(tmp_path / "imgs" / name, ns=(t * 10**18, t * 10**18))
    store = tmp_path / "s.h5"
    build_index([tmp_path / "imgs"], store, model="phash")
    (tmp_path / "imgs" / "a.jpg").unlink()
    (tmp_path / "imgs" / "b.jpg").write_bytes((tmp_path / "imgs" / "img_0004.jpg").read_bytes())
    r = subprocess.run([sys.executable, "-m", "neardup", "duplicates", "--store", str(store), "--out",
                        str(tmp_path / "p.csv"), "--groups", str(tmp_path / "g.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "2 listed photos are no longer as indexed (1 missing, 1 changed" in r.stderr, r.stderr
    group = next(g for g in json.loads((tmp_path / "g.json").read_text())["groups"]
                 if "imgs/c.jpg" in [m["path"] for m in g["members"]])
    assert group["keeper_path"] != "imgs/a.jpg" and "imgs/a.jpg" not in group["removable"]
    assert {m["path"]: m["stale"] for m in group["members"] if m["stale"]} == {"imgs/a.jpg": "missing",
                                                                               "imgs/b.jpg": "changed"}
    assert set(group["stale"]) == {"imgs/a.jpg", "imgs/b.jpg"} and "imgs/b.jpg" not in group["removable"]
    rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8")))
    flagged = {(row["a_path"], row["a_stale"]) for row in rows} | {(row["b_path"], row["b_stale"]) for row in rows}
    assert ("imgs/a.jpg", "missing") in flagged and ("imgs/c.jpg", "") in flagged


# ------------------------------------------------------------- never advise deleting the only copy of a photo

def _remove_what_is_removable(store: Path, groups: Path) -> None:
    """The oracle of a duplicates listing: delete every file it calls removable, then every keeper must still
    hold the photo that was indexed (its stored SHA-256), and no file may be left dangling."""
    from neardup.fileio import file_sha256
    from neardup.store import read_catalog

    sha = dict(zip(read_catalog(store, vectors=False).paths, read_catalog(store, vectors=False).sha256))
    doc = json.loads(groups.read_text())
    for g in doc["groups"]:
        for p in g["removable"]:
            (store.parent / p).unlink()
    for g in doc["groups"]:
        keeper = store.parent / g["keeper_path"]
        assert keeper.exists(), f"keeper {g['keeper_path']} was deleted with a removable file"
        assert file_sha256(keeper) == sha[g["keeper_path"]], f"keeper {g['keeper_path']} is not the photo indexed"


def _duplicates(store: Path, groups: Path) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "neardup", "duplicates", "--store", str(store), "--groups", str(groups),
                        "--no-verify"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def _with_alias(store: Path, path: str, of: str) -> None:
    """Add to `store` a row for `path` as a second name of `of` (what a store indexed before names were
    resolved holds): same content, size, mtime and vector."""
    from dataclasses import replace as _replace

    from neardup.store import read_catalog

    cat = read_catalog(store, local=True)
    i = cat.paths.index(of)
    take = np.r_[np.arange(len(cat)), i]
    local = cat.local
    cat = Catalog(meta=_replace(cat.meta, next_id=cat.meta.next_id + 1), ids=np.r_[cat.ids, cat.meta.next_id],
                  paths=[*cat.paths, path], sizes=cat.sizes[take], mtimes_ns=cat.mtimes_ns[take],
                  sha256=[cat.sha256[k] for k in take.tolist()], widths=cat.widths[take], heights=cat.heights[take],
                  xb=cat.xb[take], failures=cat.failures,
                  local=type(local)(local.count[take], local.xy[take], local.desc[take]) if local is not None else None)
    write_catalog(store, cat)


def test_a_link_is_never_keeper_over_its_target(tmp_path: Path) -> None:
    """photo.jpg and a symlink 0_link_to_photo.jpg -> photo.jpg, both in the store (indexed before names were
    resolved): one file, so the link is listed as its alias, never keeper nor removable; the photo is never
    removable. Indexed today, the link is not even a row."""
    write_product_photos(tmp_path / "imgs", range(4))
    (tmp_path / "imgs" / "photo.jpg").write_bytes((tmp_path / "imgs" / "img_0002.jpg").read_bytes())
    (tmp_path / "imgs" / "img_0002.jpg").unlink()
    (tmp_path / "imgs" / "0_link_to_photo.jpg").symlink_to("photo.jpg")
    store = tmp_path / "s.h5"
    s = build_index([tmp_path / "imgs"], store, model="phash")
    assert ("imgs/0_link_to_photo.jpg", "another name of imgs/photo.jpg (a symlink or hard link to it): indexed "
            "once, under that name") in s.failures
    _with_alias(store, "imgs/0_link_to_photo.jpg", "imgs/photo.jpg")
    r = _duplicates(store, tmp_path / "g.json")
    group = next(g for g in json.loads((tmp_path / "g.json").read_text())["groups"]
                 if "imgs/photo.jpg" in [m["path"] for m in g["members"]])
    assert group["keeper_path"] == "imgs/photo.jpg" and group["removable"] == []
    link = next(m for m in group["members"] if m["path"] == "imgs/0_link_to_photo.jpg")
    assert (link["stale"], link["alias_of"]) == ("alias", "imgs/photo.jpg")
    assert "1 listed name is another name of a listed file" in r.stderr, r.stderr
    from neardup.search.report import write_report

    write_report(store, tmp_path / "r.html", groups=tmp_path / "g.json")  # the page never calls it removable
    page = (tmp_path / "r.html").read_text()
    assert f"{len(json.loads((tmp_path / 'g.json').read_text())['groups'])} (0 removable images)" in page
    assert '"st": "alias"' in page or '"st":"alias"' in page
    _remove_what_is_removable(store, tmp_path / "g.json")


def test_a_folder_indexed_twice_through_a_symlink_lists_no_real_file_as_removable(tmp_path: Path) -> None:
    write_product_photos(tmp_path / "imgs", range(6))
    (tmp_path / "again").symlink_to(tmp_path / "imgs")
    store = tmp_path / "s.h5"
    build_index([tmp_path / "imgs"], store, model="phash")
    for p in sorted((tmp_path / "imgs").iterdir()):  # the store a run over both folders made before the fix
        _with_alias(store, f"again/{p.name}", f"imgs/{p.name}")
    _duplicates(store, tmp_path / "g.json")
    doc = json.loads((tmp_path / "g.json").read_text())
    assert all(g["removable"] == [] for g in doc["groups"]) and len(doc["groups"]) >= 6
    assert all(g["keeper_path"].startswith("imgs/") for g in doc["groups"])
    _remove_what_is_removable(store, tmp_path / "g.json")


def test_a_file_replaced_with_the_same_size_and_mtime_is_never_keeper_nor_removable(tmp_path: Path) -> None:
    """Size and mtime cannot tell a replaced file: its content is hashed again before it is listed."""
    write_product_photos(tmp_path / "imgs", range(4))
    copy = tmp_path / "imgs" / "copy.jpg"
    copy.write_bytes((tmp_path / "imgs" / "img_0001.jpg").read_bytes())
    os.utime(copy, ns=(10**18, 10**18))  # older: the keeper
    store = tmp_path / "s.h5"
    build_index([tmp_path / "imgs"], store, model="phash")
    st = copy.stat()
    copy.write_bytes(os.urandom(st.st_size))  # another file, same size, same mtime
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = _duplicates(store, tmp_path / "g.json")
    group = next(g for g in json.loads((tmp_path / "g.json").read_text())["groups"]
                 if "imgs/copy.jpg" in [m["path"] for m in g["members"]])
    assert group["keeper_path"] == "imgs/img_0001.jpg" and "imgs/copy.jpg" not in group["removable"]
    assert "imgs/copy.jpg" in group["stale"] and "1 changed" in r.stderr, r.stderr
    _remove_what_is_removable(store, tmp_path / "g.json")
