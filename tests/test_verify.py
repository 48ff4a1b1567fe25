"""Geometric verification: local features cached in the store, the verdict, and its use by duplicates and query.

Synthetic product photos check the plumbing against oracles (brute-force k-NN, hand-made copies); the
grocery photos check the verdict where it matters: edited copies verify, and the known trap (two different
products held up in front of one shelf) does not.
"""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neardup.config import VERIFY
from neardup.embed.decode import file_local_features
from neardup.embed.local_features import extract_local
from neardup.features import LOCAL_VERSION, LocalTable
from neardup.indexer.build import build_index, update_index
from neardup.search.duplicates import find_duplicates
from neardup.search.join import knn_pairs
from neardup.search.pairs_io import read_pairs_csv, write_pairs_csv
from neardup.search.query import Searcher, query
from neardup.search.verify import Verified, rerank, verify_pair
from neardup.store import Store, read_catalog, read_meta
from neardup.testing import write_product_photos

from .conftest import GROCERY, SKIP_GROCERY

DATA = Path(__file__).parent / "data"


def edited(src: Path, dst: Path, crop: float = 0.06, scale: float = 0.7, quality: int = 70) -> Path:
    """A copy of `src` cropped by `crop` on two sides, resized and re-encoded (a hand-made near-duplicate)."""
    with Image.open(src) as im:
        w, h = im.size
        im = im.convert("RGB").crop((int(crop * w), int(crop * h), w, h))
        im = im.resize((int(im.width * scale), int(im.height * scale)), Image.Resampling.LANCZOS)
        dst.parent.mkdir(parents=True, exist_ok=True)
        im.save(dst, "JPEG", quality=quality)
    return dst


def features(path: Path):
    return file_local_features(path)


@pytest.fixture
def copies(tmp_path: Path) -> tuple[Path, list[Path], list[Path]]:
    """A folder of 12 synthetic product photos and edited copies of the first 4."""
    photos = write_product_photos(tmp_path / "cat", range(12), size=(400, 400))
    copies = [edited(p, tmp_path / "cat" / f"copy_{p.stem}.jpg") for p in photos[:4]]
    return tmp_path / "cat", photos, copies


def test_verify_pair_copy_versus_other_photo(copies) -> None:
    _, photos, made = copies
    same = verify_pair(features(photos[0]), features(made[0]))
    other = verify_pair(features(photos[0]), features(photos[5]))
    assert same.verified and same.inliers >= VERIFY.min_inliers
    assert not other.verified
    assert verify_pair(None, features(photos[0])).verified is False  # missing features: never verified


def test_knn_pairs_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((300, 16)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    k, t = 5, 0.2
    I, J, D = knn_pairs(xb, k, t)
    S = xb @ xb.T
    np.fill_diagonal(S, -np.inf)
    kth = -np.sort(-S, axis=1)[:, k - 1]
    # FAISS and numpy may round a score differently (~1e-7, per CPU): a pair within `eps` of the threshold or
    # of either row's k-th score may go either way; every other pair must be decided as brute force does
    eps = 1e-5
    sure = lambda i, j: abs(S[i, j] - t) > eps and abs(S[i, j] - kth[i]) > eps and abs(S[i, j] - kth[j]) > eps  # noqa: E731
    want = {(i, j) for i in range(300) for j in range(i + 1, 300)
            if S[i, j] >= t and (S[i, j] >= kth[i] or S[i, j] >= kth[j])}
    got = set(zip(I.tolist(), J.tolist()))
    assert {p for p in got ^ want if sure(*p)} == set()
    assert np.all(I < J) and np.allclose(D, S[I, J], atol=1e-5)


def test_rerank_verified_then_inliers_then_score() -> None:
    D = np.array([0.9, 0.8, 0.7, 0.6])
    v = Verified(np.array([False, False, True, False]), np.array([3, 40, 120, 20], np.int32),
                 np.zeros(4, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32))
    assert rerank(D, v).tolist() == [2, 1, 3, 0]
    # a failed candidate sharing a few inliers comes before a higher-scored one sharing none; a floor keeps it out
    v.inliers[:] = [0, 0, 120, 5]
    assert rerank(D, v).tolist() == [2, 3, 0, 1]
    assert rerank(D, v, min_inliers=15).tolist() == [2, 0, 1, 3]


def test_store_keeps_features_and_update_carries_them(copies, tmp_path: Path, fake_embedder) -> None:
    folder, photos, made = copies
    store = tmp_path / "s.h5"
    build_index([folder], store, embedder=fake_embedder)
    meta = read_meta(store)
    assert meta.local_features == LOCAL_VERSION
    cat = read_catalog(store, local=True)
    row = cat.paths.index(f"cat/{photos[3].name}")
    cached = cat.local.row(row)
    fresh = features(photos[3])
    assert len(cached) == len(fresh) > 50 and np.array_equal(cached.desc, fresh.desc)
    assert np.allclose(cached.xy, fresh.xy, atol=1e-3)  # stored as float16 fractions
    # an update adds a photo: old rows' features are carried over unchanged, the new one extracted
    write_product_photos(folder, [40], size=(400, 400))
    update_index([folder], store, embedder=fake_embedder)
    after = read_catalog(store, local=True)
    r2 = after.paths.index(f"cat/{photos[3].name}")
    assert np.array_equal(after.local.row(r2).desc, cached.desc)
    assert after.local.row(after.paths.index("cat/img_0040.jpg")) is not None
    with Store.open(store) as gen:
        some = gen.local(np.array([r2, 0, r2]))
    assert np.array_equal(some.desc[0], some.desc[2]) and len(some) == 3


def test_local_table_round_trip() -> None:
    rng = np.random.default_rng(1)
    f = extract_local(Image.fromarray(rng.integers(0, 255, (200, 300), np.uint8)))
    t = LocalTable.of([f, None])
    assert t.row(1) is None and np.array_equal(t.row(0).desc, f.desc)


def test_duplicates_verified_pairs_groups_and_csv(copies, tmp_path: Path, fake_embedder) -> None:
    folder, photos, made = copies
    store = tmp_path / "s.h5"
    build_index([folder], store, embedder=fake_embedder)
    rep = find_duplicates(store, verify=True, k=5, loose_threshold=0.0)
    truth = {frozenset((f"cat/{p.name}", f"cat/{c.name}")) for p, c in zip(photos, made)}
    verified = {frozenset((p.a_path, p.b_path)) for p in rep.pairs if p.verified}
    assert verified == truth
    grouped = {frozenset(m.path for m in g.members) for g in rep.groups}
    assert grouped == truth
    assert all(m.inliers_to_keeper >= VERIFY.min_inliers for g in rep.groups for m in g.members if not m.keeper)
    out = tmp_path / "pairs.csv"
    write_pairs_csv(rep, out)
    head = out.read_text().splitlines()[0]
    assert head == "a_id,a_path,b_id,b_path,score,kind,a_stale,b_stale,verified,inliers,decision"
    back = read_pairs_csv(out)
    assert [(p.verified, p.inliers) for p in back] == [(p.verified, p.inliers) for p in rep.pairs]
    plain = find_duplicates(store, verify=False)
    assert all(p.verified is None and p.inliers is None for p in plain.pairs)
    write_pairs_csv(plain, out)
    assert out.read_text().splitlines()[0] == "a_id,a_path,b_id,b_path,score,kind,a_stale,b_stale,decision"


def test_query_verifies_and_reranks(copies, tmp_path: Path, fake_embedder) -> None:
    folder, photos, made = copies
    store = tmp_path / "s.h5"
    for c in made:
        c.rename(tmp_path / c.name)  # the copies are the queries, not in the catalogue
    build_index([folder], store, embedder=fake_embedder)
    res = Searcher.open(store, embedder=fake_embedder).answer([tmp_path / c.name for c in made], k=5,
                                                              verify=True).results
    for r, p in zip(res, photos):
        assert r.verified and r.matches[0].path == f"cat/{p.name}" and r.matches[0].verified
        assert [m.rank for m in r.matches] == list(range(1, len(r.matches) + 1))
        assert r.found(threshold=1.0)  # found by its verdict, whatever the global threshold
    stranger = write_product_photos(tmp_path / "new", [77], size=(400, 400))[0]
    (miss,) = query(store, [stranger], k=5, embedder=fake_embedder, verify=True)
    assert not any(m.verified for m in miss.matches) and not miss.found(threshold=-1.0)


def test_cli_query_and_duplicates_verify_flags(copies, tmp_path: Path) -> None:
    folder, photos, made = copies
    store = tmp_path / "p.h5"
    run = lambda *a: subprocess.run([sys.executable, "-m", "neardup", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=120)
    assert run("index", str(folder), "--store", str(store), "--model", "phash").returncode == 0
    dup = run("duplicates", "--store", str(store), "--verify", "--out", str(tmp_path / "p.csv"))
    assert dup.returncode == 0, dup.stderr
    assert "verified pairs" in dup.stdout
    rows = list(csv.DictReader(io.StringIO((tmp_path / "p.csv").read_text())))
    assert rows and {r["verified"] for r in rows} <= {"true", "false"}
    q = run("query", str(made[0]), "--store", str(store), "--verify", "--csv")
    assert q.returncode == 0, q.stderr
    got = list(csv.DictReader(io.StringIO(q.stdout)))
    assert got[0]["path"] == f"cat/{made[0].name}" and got[0]["verified"] == "true" and got[0]["match"] == "true"
    assert got[1]["path"] == f"cat/{photos[0].name}" and got[1]["verified"] == "true"  # its original, second
    assert "--verify / --no-verify" in run("query", "--help").stdout


# ------------------------------------------------------------------------------------- real photos


@pytest.mark.skipif(not GROCERY.is_dir(), reason=SKIP_GROCERY)
def test_same_shelf_different_products_never_verify() -> None:
    """The known trap, on the 20 pairs of different products of one shelf (test split) that share the most
    RANSAC inliers (tests/data/shelf_pairs.csv, made by neardup.testing.grocery.shelf_pairs): many inliers,
    yet none passes the verdict."""
    rows = list(csv.DictReader(open(DATA / "shelf_pairs.csv", encoding="utf-8")))
    assert len(rows) == 20
    for r in rows:
        v = verify_pair(features(GROCERY / r["a_path"]), features(GROCERY / r["b_path"]))
        assert v.inliers >= 60, (r, v)  # the trap is real: raw inliers alone would call them duplicates
        assert not v.verified, (r, v)


@pytest.mark.skipif(not GROCERY.is_dir(), reason=SKIP_GROCERY)
def test_edited_grocery_copies_verify(tmp_path: Path) -> None:
    from neardup.testing.grocery import make_copies_set

    truth = make_copies_set(tmp_path, n_originals=12, n_distractors=0, seed=5)
    groups: dict[str, list[Path]] = {}
    for r in csv.DictReader(open(truth, encoding="utf-8")):
        groups.setdefault(r["group"], []).append(Path(r["path"]))
    got = [verify_pair(features(a), features(b)) for a, b in groups.values()]
    assert all(v.verified for v in got), [(v.inliers, v.inlier_ratio, v.centre, v.coverage) for v in got]


@pytest.mark.skipif(not GROCERY.is_dir(), reason=SKIP_GROCERY)
def test_copies_resized_anisotropically_verify(tmp_path: Path) -> None:
    """Width and height resized by different factors (up to 2x apart) and saved at JPEG 45-65: features found
    on the aspect-normalised photo keep them verifiable (with the aspect kept, ORB lost a third of them)."""
    from neardup.testing.grocery import make_copies_set

    truth = make_copies_set(tmp_path, n_originals=16, n_distractors=0, seed=27, anisotropic=True)
    edits = json.loads((tmp_path / "copies-aspect_edits.json").read_text())["copies"]
    stretched = [c for c in edits if max(c["edits"]["scale"]) / min(c["edits"]["scale"]) >= 1.5]
    assert len(stretched) >= 5  # the hard ones are there (1.5x and more: none verified with the aspect kept)
    groups: dict[str, list[Path]] = {}
    for r in csv.DictReader(open(truth, encoding="utf-8")):
        groups.setdefault(r["group"], []).append(Path(r["path"]))
    got = [verify_pair(features(a), features(b)) for a, b in groups.values()]
    assert all(v.verified for v in got), [(v.inliers, round(v.inlier_ratio, 3)) for v in got]


@pytest.mark.skipif(not GROCERY.is_dir(), reason=SKIP_GROCERY)
def test_the_verdict_is_symmetric() -> None:
    """verify(a, b) == verify(b, a), screened or not, on 300 pairs of other shots of one product (the borderline
    cases: matching a->b only, duplicates and evaluate disagreed on some of them)."""
    from neardup.testing.grocery import photos

    shots = photos(GROCERY, "test", ("Packages",))
    by_product: dict[str, list[Path]] = {}
    for ph in shots:
        by_product.setdefault(ph.product, []).append(ph.path)
    rng = np.random.default_rng(3)
    pairs = []
    for product in sorted(by_product):
        paths = by_product[product]
        for _ in range(10):
            i, j = rng.choice(len(paths), 2, replace=False)
            pairs.append((paths[i], paths[j]))
    feats = {p: features(p) for pair in pairs[:300] for p in pair}
    flipped = 0
    for a, b in pairs[:300]:
        for screen in (False, True):
            ab, ba = verify_pair(feats[a], feats[b], screen=screen), verify_pair(feats[b], feats[a], screen=screen)
            assert (ab.verified, ab.inliers, ab.inlier_ratio, ab.centre, ab.coverage) == \
                (ba.verified, ba.inliers, ba.inlier_ratio, ba.centre, ba.coverage), (a, b, screen, ab, ba)
            flipped += ab.verified != ba.verified
    assert flipped == 0 and len(pairs) >= 300


# ----------------------------------------------------------------------------------------- hard cases


@pytest.mark.parametrize("size", [(3000, 12), (1, 256), (8, 3000), (1, 1)])
def test_thin_or_tiny_images_have_no_features_and_never_raise(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8))
    assert len(extract_local(img)) == 0


def test_a_pinned_generation_keeps_its_rows_after_updates(copies, tmp_path: Path, fake_embedder) -> None:
    """A reader holding a generation asks for row r after updates shifted the rows and deleted the files of
    its generation: it still reads its own rows' features (its files stay open), never another photo's."""
    folder, photos, made = copies
    store = tmp_path / "s.h5"
    build_index([folder], store, embedder=fake_embedder)
    with Store.open(store) as old:
        rows = np.arange(3)
        write_product_photos(folder, [90], size=(400, 400), prefix="aaa")  # sorts first
        update_index([folder], store, embedder=fake_embedder)
        Store(store).compact()  # twice: no kept manifest names the first generation's segment any more
        Store(store).compact()
        assert not any(Store(store).files.segment(s.name).exists() for s in old.segments)
        from neardup.search.verify import row_features

        got = row_features(old, rows)
        for r, f in zip(rows.tolist(), got):
            assert np.array_equal(f.desc, features(folder.parent / old.catalog.paths[r]).desc)
        assert np.array_equal(old.local(rows).desc[:, :10], np.stack([g.desc[:10] for g in got]))


def test_plain_images_fall_back_to_the_global_threshold(tmp_path: Path) -> None:
    """Too plain to judge (fewer keypoints than VERIFY.min_keypoints): a byte-identical query of a flat
    catalogue image is still found, by its score."""
    cat = tmp_path / "flat"
    cat.mkdir()
    for k, colour in enumerate([(250, 250, 250), (20, 90, 200), (200, 30, 30)]):
        Image.new("RGB", (300, 300), colour).save(cat / f"flat_{k}.png")
    store = tmp_path / "flat.h5"
    build_index([cat], store, model="phash")
    (res,) = query(store, [cat / "flat_1.png"], k=3, verify=True)
    assert res.matches[0].path == "flat/flat_1.png" and res.matches[0].verified is None
    assert res.found(threshold=0.99)


def test_a_photo_with_more_copies_than_k_stays_one_group(tmp_path: Path, fake_embedder) -> None:
    photo = write_product_photos(tmp_path / "cat", [3], size=(400, 400))[0]
    for n in range(6):
        edited(photo, tmp_path / "cat" / f"copy_{n}.jpg", crop=0.01 * n, scale=0.9 - 0.05 * n, quality=90 - 5 * n)
    write_product_photos(tmp_path / "cat", range(10, 16), size=(400, 400))
    store = tmp_path / "s.h5"
    build_index([tmp_path / "cat"], store, embedder=fake_embedder)
    rep = find_duplicates(store, verify=True, k=2, loose_threshold=0.0)  # each photo sees only 2 neighbours
    big = max(rep.groups, key=lambda g: len(g.members))
    assert len(big.members) == 7, [m.path for g in rep.groups for m in g.members]
    listed = {frozenset((p.a_path, p.b_path)) for p in rep.pairs if p.verified}
    members = [m.path for m in big.members]
    assert all(frozenset((a, b)) in listed for i, a in enumerate(members) for b in members[i + 1:])


def test_report_png_shows_the_verdict_of_the_pairs_file(copies, tmp_path: Path) -> None:
    """The drawn inliers come from the store's cached features, screened as duplicates screens them: each
    PNG's verdict and inlier count are the pairs file's (pHash stores decode in grayscale)."""
    from neardup.search.report import _Images, _inliers_of

    folder, photos, made = copies
    store = tmp_path / "p.h5"
    build_index([folder], store, model="phash")
    rep = find_duplicates(store, verify=True, k=5, loose_threshold=-1.0)
    checked = 0
    with Store.open(store) as gen:
        images = _Images(gen.catalog, store.parent)
        for p in rep.pairs:
            if p.kind == "exact" or p.inliers is None or p.inliers < 0:
                continue
            v = _inliers_of(gen, p.a_path, p.b_path, images)
            assert (v.verified, v.inliers) == (p.verified, p.inliers), p
            checked += 1
    assert checked >= 4
