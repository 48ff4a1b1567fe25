"""The store as one object (`neardup.store`): append-only segments, tombstones, compaction, every byte checked.

Oracles: a model of the catalogue kept by the test itself (path -> content -> vector), numpy brute force for
the searches, and a store written by neardup before segments with the answers that version gave.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from importlib import resources
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from neardup import build_index, query, update_index
from neardup.embed.embedders import l2_normalize
from neardup.errors import InputError, StoreError
from neardup.features import LocalTable
from neardup.fileio import file_sha256
from neardup.store import Catalog, ModelInfo, Store, StoreFiles, StoreMeta, read_catalog, read_meta, write_catalog
from neardup.store.faiss_index import build_flat_index, search
from neardup.store.publish import Change, merge_start
from neardup.testing import FakeEmbedder, write_product_photos

V1 = Path(__file__).parent / "data" / "v1"
ENV = {**os.environ, "COLUMNS": "100"}


def nd(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "neardup", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=ENV)


def _catalog(n: int, d: int, paths: list[str] | None = None, seed: int = 0) -> Catalog:
    rng = np.random.default_rng(seed)
    meta = StoreMeta(ModelInfo("fake", "none", "none", dim=d, input_size=16, preprocessing="p"), next_id=n)
    return Catalog(meta=meta, ids=np.arange(n, dtype=np.int64) * 3 + 1,
                   paths=paths or [f"imgs/ü {i}.jpg" for i in range(n)],
                   sizes=rng.integers(0, 10**9, n), mtimes_ns=rng.integers(0, 2**62, n),
                   sha256=[f"{i:064x}" for i in range(n)], widths=rng.integers(1, 9000, n).astype(np.int32),
                   heights=rng.integers(1, 9000, n).astype(np.int32),
                   xb=l2_normalize(rng.standard_normal((n, d))), failures=[("bad/ä.jpg", "cannot decode: x")])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 40), d=st.integers(1, 70),
       names=st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                              min_size=1, max_size=30), min_size=40, max_size=40))
def test_store_round_trip(tmp_path: Path, n: int, d: int, names: list[str]) -> None:
    cat = _catalog(n, d, paths=names[:n] if n else None)
    path = tmp_path / "s.h5"
    write_catalog(path, cat)
    back = read_catalog(path)
    np.testing.assert_array_equal(back.xb, cat.xb)
    np.testing.assert_array_equal(back.ids, cat.ids)
    assert back.paths == cat.paths[:n] and back.sha256 == cat.sha256
    for col in ("sizes", "mtimes_ns", "widths", "heights"):
        np.testing.assert_array_equal(getattr(back, col), getattr(cat, col))
    assert back.failures == cat.failures
    meta = read_meta(path)
    assert (meta.count, meta.model.dim, meta.model.name, meta.next_id, meta.failures) == (n, d, "fake", n, 1)
    assert meta.created and meta.updated and meta.neardup_version and len(meta.generation) == 12


def test_refuses_missing_foreign_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store"):
        read_meta(tmp_path / "none.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(StoreError, match="not a readable HDF5"):
        read_meta(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1, 2, 3]
    with pytest.raises(StoreError, match="not a neardup store"):
        read_catalog(tmp_path / "other.h5")
    with pytest.raises(InputError, match="does not exist"):
        write_catalog(tmp_path / "no" / "dir" / "s.h5", _catalog(2, 4))


def test_failed_write_leaves_previous_store_intact(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    write_catalog(path, _catalog(5, 4))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    bad = _catalog(5, 4)
    bad.xb = bad.xb[:3]  # inconsistent: refused before anything is written
    with pytest.raises(ValueError):
        write_catalog(path, bad)
    assert read_meta(path).count == 5
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no temporary left behind


def test_faiss_search_equals_brute_force() -> None:
    rng = np.random.default_rng(1)
    xb = l2_normalize(rng.standard_normal((500, 64)))
    xq = l2_normalize(xb[:20] + 0.05 * rng.standard_normal((20, 64)))
    ids = np.arange(500, dtype=np.int64) * 10 + 7
    D, I = search(build_flat_index(xb, ids), xq, k=5)
    S = xq @ xb.T
    # FAISS and numpy multiply in other orders, so neighbours whose scores differ by rounding could swap
    # places: check that the scores are the 5 best in order, and that each id returned has its score
    np.testing.assert_allclose(D, -np.sort(-S, axis=1)[:, :5], atol=1e-5)
    rows = np.searchsorted(ids, I)
    np.testing.assert_array_equal(ids[rows], I)
    np.testing.assert_allclose(np.take_along_axis(S, rows, 1), D, atol=1e-5)
    assert all(len(set(r)) == 5 for r in I.tolist())
    assert (I[:, 0] == ids[:20]).all()


# ------------------------------------------------------------------------------ append-only segments, oracle

def _expected(root: Path, store: Path) -> dict[str, np.ndarray]:
    """The test's own model of the catalogue: every photo under root -> its FakeEmbedder vector."""
    emb = FakeEmbedder()
    from neardup.embed.pipeline import embed_files

    got = embed_files(sorted(str(p) for p in root.rglob("*.jpg")), emb, local=True)  # decoded as the store decodes
    return {os.path.relpath(p, store.parent): v for p, v in zip(got.paths, got.xq)}


def _check_against(store: Path, want: dict[str, np.ndarray]) -> None:
    with Store.open(store) as gen:
        cat = gen.read()
        assert sorted(cat.paths) == sorted(want) and len(set(cat.ids.tolist())) == len(cat)
        for p, v in zip(cat.paths, cat.xb):
            np.testing.assert_allclose(v, want[p], atol=1e-6)
        # every search of the generation's index equals numpy's brute force over the live vectors
        xq = cat.xb[::3]
        D, I = search(gen.index, xq, 4)
        S = xq @ cat.xb.T
        np.testing.assert_allclose(D, -np.sort(-S, axis=1)[:, :4], atol=1e-5)
        rows = gen.rows_of(I)
        np.testing.assert_allclose(np.take_along_axis(S, rows, 1), D, atol=1e-5)
        assert gen.local(np.arange(len(cat))) is not None
        gen.verify()


def test_updates_append_segments_and_equal_the_oracle(tmp_path: Path) -> None:
    root, store, emb = tmp_path / "imgs", tmp_path / "s.h5", FakeEmbedder()
    write_product_photos(root, range(100), size=(160, 160))  # 4 dead rows a night stay under a quarter
    build_index([root], store, embedder=emb)
    first = Store.open(store)
    seg0 = StoreFiles(store).segment(first.segments[0].name)
    ino, data = seg0.stat().st_ino, seg0.read_bytes()
    first.close()
    rng = np.random.default_rng(5)
    for night in range(6):  # add, delete, change, move and touch files; each night one update
        live = sorted(root.rglob("*.jpg"))
        a, b, c, d = (live[i] for i in rng.choice(len(live), 4, replace=False))
        write_product_photos(root, range(100 + 4 * night, 103 + 4 * night), size=(160, 160))
        a.unlink()
        # new content at a known path
        write_product_photos(root, [500 + night], prefix=b.stem, size=(160, 160))[0].replace(b)
        (root / "moved").mkdir(exist_ok=True)
        c.rename(root / "moved" / f"n{night}_{c.name}")
        os.utime(d, ns=(10**18 + night, 10**18 + night))  # touched: same content
        s = update_index([root], store, embedder=emb)
        assert (s.added, s.removed, s.changed, s.moved, s.touched) == (3, 1, 1, 1, 1), night
        # the rows added, changed, moved and touched, and (some nights) the newest small segments merged
        assert s.embedded == 4 and (s.published.rows_written == 3 + 1 + 1 + 1 or
                                    s.published.compacted.startswith("merged")), s.published
        _check_against(store, _expected(root, store))
    with Store.open(store) as gen:
        assert gen.segments[0].name == seg0.stem and len(gen.segments) <= 4 and gen.manifest.dead_rows <= 6 * 4
    assert seg0.stat().st_ino == ino and seg0.read_bytes() == data  # never rewritten, never touched
    sorted(root.glob("*.jpg"))[0].unlink()  # a delete only: a manifest with one more tombstone, no segment
    s = update_index([root], store, embedder=emb)
    assert s.published.rows_written == 0 and s.published.count == len(_expected(root, store))


def test_merges_copy_each_row_a_few_times_and_keep_segments_few() -> None:
    """The merge rule over years of nightly updates (sizes only): a row is copied O(log n) times, a big segment
    never absorbs a small one, and segments stay few."""
    for base, per, nights in ((1_000_000, 100, 3000), (0, 100, 3000), (200_000, 2000, 1000)):
        segs, copies, most = ([base] if base else []), 0, 0
        for _ in range(nights):
            segs.append(per)
            j = merge_start(segs)
            if j is not None:  # the oldest segment is rewritten only with a third of its size or more beside it
                assert j > 0 or 3 * sum(segs[1:]) >= segs[0]
                copies += sum(segs[j:])
                segs = segs[:j] + [sum(segs[j:])]
            most = max(most, len(segs))
        assert copies / (per * nights) <= 8 and most <= 12, (base, copies / (per * nights), most)


def test_compaction_reclaims_deleted_rows_and_merges_small_segments(tmp_path: Path) -> None:
    root, store, emb = tmp_path / "imgs", tmp_path / "s.h5", FakeEmbedder()
    write_product_photos(root, range(40))
    build_index([root], store, embedder=emb)
    written, merges = 0, []
    for k in range(12):  # one small segment a night: similar sizes are merged, never piling up
        write_product_photos(root, [100 + k])
        s = update_index([root], store, embedder=emb)
        written += s.published.rows_written
        merges.append(s.published.compacted)
        with Store.open(store) as gen:
            assert len(gen.segments) <= 6 and len(gen) == 41 + k
    assert sum(m.startswith("merged") for m in merges) >= 3 and written <= 12 * 4  # never the 40-row segment
    _check_against(store, _expected(root, store))
    for p in sorted(root.glob("*.jpg"))[:20]:  # more than a quarter deleted: everything copied into one segment
        p.unlink()
    s = update_index([root], store, embedder=emb)
    assert s.published.compacted == "compacted"
    with Store.open(store) as gen:
        assert len(gen.segments) == 1 and gen.manifest.dead_rows == 0 and len(gen) == 32
    _check_against(store, _expected(root, store))
    left = {p.stem for p in StoreFiles(store).segments.iterdir()}
    with Store.open(store) as gen, Store(store).previous() as prev:
        assert left == {s.name for s in gen.segments} | {s.name for s in prev.segments}  # nothing else kept


def test_a_wholly_deleted_segment_is_dropped_not_compacted(tmp_path: Path) -> None:
    root, store, emb = tmp_path / "imgs", tmp_path / "s.h5", FakeEmbedder()
    write_product_photos(root, range(30))
    build_index([root], store, embedder=emb)
    new = write_product_photos(root, range(100, 112))
    update_index([root], store, embedder=emb)
    for p in new:  # the whole second segment: 12 of 42 rows written, but nothing left to reclaim by copying
        p.unlink()
    s = update_index([root], store, embedder=emb)
    assert s.published.compacted == "" and s.published.rows_written == 0
    with Store.open(store) as gen:
        assert len(gen.segments) == 1 and gen.manifest.dead_rows == 0 and len(gen) == 30


def test_a_store_emptied_and_a_second_publish_of_one_writer(tmp_path: Path) -> None:
    root, store, emb = tmp_path / "imgs", tmp_path / "s.h5", FakeEmbedder()
    paths = write_product_photos(root, range(40))
    build_index([root], store, embedder=emb, index="IVF4,Flat")
    for p in paths[1:]:
        p.unlink()
    assert update_index([root], store, embedder=emb).total == 1
    paths[0].unlink()
    (root / "keep.txt").write_text("not a photo")
    with Store(store).writer() as w:  # every photo gone: an empty generation, its index exact (nothing)
        w.publish(Change(w.current.meta, delete=np.arange(len(w.current)), failures=[]))
        assert len(w.current) == 0 and w.current.meta.index.factory == "Flat"
        cat = _catalog(3, 32)  # a second publish builds on the first one, not on the generation before it
        cat.meta, cat.local = w.current.meta, LocalTable.empty(3)
        w.publish(Change(w.current.meta, append=cat))
        assert len(w.current) == 3
    with Store.open(store) as gen:
        assert len(gen) == 3 and gen.index.ntotal == 3


def test_an_approximate_index_is_built_in_parts_and_merged(tmp_path: Path) -> None:
    root, store, emb = tmp_path / "imgs", tmp_path / "s.h5", FakeEmbedder()
    write_product_photos(root, range(120))
    build_index([root], store, embedder=emb, index="IVF8,Flat", target_recall=0.99)
    write_product_photos(root, range(200, 210))
    sorted(root.glob("*.jpg"))[0].unlink()
    s = update_index([root], store, embedder=emb)
    assert not s.published.reindexed  # a part for the new segment, from the trained template
    with Store.open(store) as gen:
        assert gen.meta.index.factory == "IVF8,Flat" and [bool(seg.index) for seg in gen.segments] == [True, True]
        assert gen.index.ntotal == len(gen) == 129 and gen.index_intact()
    _check_against_knn(store)


def _check_against_knn(store: Path) -> None:
    with Store.open(store) as gen:
        cat = gen.read()
        import faiss

        faiss.extract_index_ivf(gen.index).nprobe = 8  # every list: exact, so brute force is the oracle
        D, I = search(gen.index, cat.xb, 3)
        S = cat.xb @ cat.xb.T
        np.testing.assert_allclose(D, -np.sort(-S, axis=1)[:, :3], atol=1e-5)
        np.testing.assert_allclose(np.take_along_axis(S, gen.rows_of(I), 1), D, atol=1e-5)


# --------------------------------------------------------------------------------------------- integrity

@pytest.fixture
def phash_store(tmp_path: Path) -> Path:
    write_product_photos(tmp_path / "imgs", range(20))
    r = nd("index", tmp_path / "imgs", "--store", tmp_path / "s.h5", "--model", "phash")
    assert r.returncode == 0, r.stderr
    return tmp_path / "s.h5"


def _zero(path: Path, offset: int, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * size)


def _segment(store: Path) -> Path:
    with Store.open(store) as gen:
        return StoreFiles(store).segment(gen.segments[0].name)


def _photos_found(store: Path) -> tuple[int, str]:
    r = nd("query", store.parent / "imgs", "--store", store, "--json")
    if r.returncode != 0:
        return -1, r.stderr.strip()
    doc = json.loads(r.stdout)
    return sum(res["matches"][0]["path"] == os.path.relpath(res["query"], store.parent)
               for res in doc["results"]), ""


def test_a_zeroed_chunk_with_its_checksum_is_never_served(phash_store: Path) -> None:
    """Zeroing a chunk together with its Fletcher-32 checksum passes HDF5's check (all-zero data sums to
    zero); the block digests do not: the store refuses to answer instead of answering wrongly."""
    assert _photos_found(phash_store) == (20, "")
    seg = _segment(phash_store)
    with h5py.File(seg) as f:
        ids = f["ids"].id.get_offset(), f["ids"].id.get_storage_size()
    _zero(seg, *ids)
    found, err = _photos_found(phash_store)
    assert found == -1 and "damaged" in err and "does not match its digest" in err and "\n" not in err, err
    assert "damaged" in nd("info", "--store", phash_store, "--check").stderr


def test_a_zeroed_vector_block_is_found_on_the_read_that_touches_it(phash_store: Path) -> None:
    seg = _segment(phash_store)
    with h5py.File(seg) as f:
        chunk = f["embeddings"].id.get_chunk_info(0)
    _zero(seg, chunk.byte_offset, chunk.size)
    with Store.open(phash_store) as gen:  # the root digest covers the digest tables, not the data: opens
        assert len(gen.catalog) == 20
        with pytest.raises(StoreError, match="embeddings.*does not match its digest"):
            gen.vectors(np.array([0]))
    r = nd("duplicates", "--store", phash_store)
    assert r.returncode == 2 and "does not match its digest" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("where", ["manifest", "segment"])
def test_a_changed_attribute_is_never_served(tmp_path: Path, where: str) -> None:
    """Attributes decide answers too (an onnx store's preprocessing, a segment's dimension): one changed byte
    and the digest fails."""
    cat = _catalog(10, 8)
    store = tmp_path / "s.h5"
    write_catalog(store, cat)
    target = store if where == "manifest" else _segment(store)
    key = "preprocessing" if where == "manifest" else "local_features"
    with h5py.File(target, "r+") as f:
        value = str(f.attrs[key])
        f.attrs[key] = (value[:-1] + chr(ord(value[-1]) ^ 1)) if value else "x"
    with pytest.raises(StoreError, match="does not match"):
        Store.open(store)


def test_a_truncated_segment_is_never_served(phash_store: Path) -> None:
    seg = _segment(phash_store)
    with open(seg, "r+b") as fh:
        fh.truncate(seg.stat().st_size * 2 // 3)
    found, err = _photos_found(phash_store)
    assert found == -1 and "truncated" in err and "--repair" in err and "\n" not in err, err
    r = nd("update", phash_store.parent / "imgs", "--store", phash_store, "--repair")
    assert r.returncode == 0 and "added 20" in r.stdout, r.stdout  # indexed again from the photos
    assert _photos_found(phash_store) == (20, "")


def test_an_update_never_builds_on_a_damaged_store(phash_store: Path) -> None:
    seg = _segment(phash_store)
    with h5py.File(seg) as f:
        off = f["paths"].id.get_offset()
    _zero(seg, off, 8)
    def files() -> dict[str, bytes]:  # everything the store owns but the lock file (it names the last writer)
        return {str(p): p.read_bytes() for p in phash_store.parent.rglob("s.h5*") if p.is_file()
                and p.suffix != ".lock"} | {str(p): p.read_bytes() for p in StoreFiles(phash_store).segments.iterdir()}

    before = files()
    (phash_store.parent / "imgs" / "img_0000.jpg").unlink()  # something to publish
    r = nd("update", phash_store.parent / "imgs", "--store", phash_store)
    assert r.returncode == 2 and "damaged" in r.stderr
    assert files() == before


# ------------------------------------------------------------------------- a store written before segments

@pytest.fixture
def v1_store(tmp_path: Path) -> Path:
    """The schema-1 store of tests/data/v1 beside copies of the photos it indexed, as it was written."""
    sample = resources.files("neardup").joinpath("sample", "catalog", "bottles")
    (tmp_path / "catalog" / "bottles").mkdir(parents=True)
    for f in sample.iterdir():
        dst = tmp_path / "catalog" / "bottles" / f.name
        dst.write_bytes(f.read_bytes())
        os.utime(dst, ns=(1_767_225_600 * 10**9,) * 2)
    (tmp_path / "store").mkdir()
    for f in V1.iterdir():
        if f.suffix in (".h5", ".faiss"):
            shutil.copyfile(f, tmp_path / "store" / f.name)
    return tmp_path / "store" / "v1.h5"


def _answers(store: Path) -> list[list[dict]]:
    want = json.loads((V1 / "answers.json").read_text())
    sample = resources.files("neardup").joinpath("sample", "catalog")
    photos = [store.parent.parent / q if q.startswith("catalog/") else Path(str(sample.joinpath(q[7:])))
              for q in want["queries"]]
    got = {Path(r.query).resolve(): r for r in query(store, photos, k=5, verify=want["verify"])}
    # and verified, every catalogue photo finds itself first (verification itself has changed since)
    for r in query(store, [p for q, p in zip(want["queries"], photos) if q.startswith("catalog/")], k=5):
        assert r.matches[0].verified and Path(store.parent / r.matches[0].path).resolve() == Path(r.query).resolve()
    return [[{"id": m.id, "path": m.path, "score": m.score, "verified": m.verified, "inliers": m.inliers}
             for m in got[p.resolve()].matches] for p in photos], want["results"]


def _same(got: list[list[dict]], want: list[list[dict]]) -> None:
    for g, w in zip(got, want):
        assert [(m["id"], m["path"], m["verified"], m["inliers"]) for m in g] == \
            [(m["id"], m["path"], m["verified"], m["inliers"]) for m in w]
        np.testing.assert_allclose([m["score"] for m in g], [m["score"] for m in w], atol=1e-6)


def test_a_store_written_before_segments_answers_as_it_did_then_upgrade(v1_store: Path) -> None:
    with Store.open(v1_store) as gen:
        assert gen.meta.schema_version == 1 and len(gen) == 20 and gen.manifest is None
        gen.verify()
    _same(*_answers(v1_store))  # read as it is: the answers the version that wrote it gave
    assert "written before segments" in nd("info", "--store", v1_store, "--check").stdout
    s = update_index([v1_store.parent.parent / "catalog"], v1_store)  # upgraded: rows copied, nothing embedded
    assert s.wrote and s.embedded == 0 and s.unchanged == 20 and s.published.rows_written == 20
    with Store.open(v1_store) as gen:
        assert gen.meta.schema_version == 2 and len(gen.segments) == 1 and gen.meta.next_id == 20
        assert gen.local() is not None and (gen.local().count > 0).all()
    _same(*_answers(v1_store))  # and the same answers after
    r = nd("info", "--store", v1_store, "--check")
    assert r.returncode == 0 and "v1.h5.prev (20 images" in r.stdout
    assert nd("restore", "--store", v1_store).returncode == 0  # the schema-1 file is the previous generation
    with Store.open(v1_store) as gen:
        assert gen.meta.schema_version == 1
    _same(*_answers(v1_store))


def _v1_damage(store: Path, how: str) -> None:
    """Damage of a store written before segments that HDF5 itself cannot see: a chunk zeroed with its Fletcher-32
    (all-zero data sums to zero), or an attribute changed (schema 1 has no digest over them)."""
    with h5py.File(store, "r+" if how.startswith("next_id") else "r") as f:
        if how.startswith("next_id"):
            f.attrs["next_id"] = int(how.split("=")[1])
            return
        chunk = f[how].id.get_chunk_info(0)
    _zero(store, chunk.byte_offset, chunk.size)


@pytest.mark.parametrize("how", ["embeddings", "ids", "sha256", "local/desc", "next_id=3"])
def test_a_damaged_store_written_before_segments_is_never_served_nor_upgraded(v1_store: Path, how: str) -> None:
    """Every read says it is damaged (one line, exit 2), never "no match"; an update refuses to upgrade it (and
    writes nothing), saying what to index again; `info --check` never certifies it."""
    _v1_damage(v1_store, how)
    files = lambda: {p.name: p.read_bytes() for p in v1_store.parent.iterdir() if p.suffix != ".lock"}  # noqa: E731 - read twice
    before = files()
    photo = v1_store.parent.parent / "catalog" / "bottles" / "bottle_02.jpg"
    r = nd("query", photo, "--store", v1_store)
    if how == "local/desc":  # damaged cached keypoints are never used: verified from the photos themselves
        # the photo, its verdict, the table's head, then its first neighbour: itself
        assert r.returncode == 0 and "bottle_02.jpg  <- match" in r.stdout.splitlines()[3], r.stdout
    else:
        assert r.returncode == 2 and "damaged" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    (v1_store.parent.parent / "catalog" / "apple.jpg").write_bytes(
        (resources.files("neardup") / "sample" / "catalog").joinpath("boxes", "box_01.jpg").read_bytes())
    r = nd("update", v1_store.parent.parent / "catalog", "--store", v1_store)
    assert r.returncode == 2 and "damaged" in r.stderr and "neardup index" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert files() == before  # nothing written
    r = nd("info", "--store", v1_store, "--check")
    assert r.returncode == 2 and "damaged" in r.stderr, (r.stdout, r.stderr)


def test_a_repair_never_loses_photos_it_would_not_index_again(tmp_path: Path) -> None:
    """Two damaged segments, one shared with the previous generation: the repair needs every folder the store
    indexes (else refused, nothing written), indexes the photos again, and keeps no generation that names a
    damaged segment."""
    write_product_photos(tmp_path / "a", range(10))
    write_product_photos(tmp_path / "b", range(20, 30))
    store = tmp_path / "s.h5"
    assert nd("index", tmp_path / "a", tmp_path / "b", "--store", store, "--model", "phash").returncode == 0
    write_product_photos(tmp_path / "b", range(40, 43))
    assert nd("update", tmp_path / "a", tmp_path / "b", "--store", store).returncode == 0
    with Store.open(store) as gen:
        segs = [StoreFiles(store).segment(s.name) for s in gen.segments]
    for seg in segs:  # the newest segment (this generation's) and the shared one
        with h5py.File(seg) as f:
            off = f["embeddings"].id.get_chunk_info(0).byte_offset
        _zero(seg, off, 64)
    before = {p.name: p.read_bytes() for p in StoreFiles(store).segments.iterdir()}
    r = nd("update", tmp_path / "a", "--store", store, "--repair")
    assert r.returncode == 2 and "photos outside the folders given" in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in StoreFiles(store).segments.iterdir()} == before
    r = nd("update", tmp_path / "a", tmp_path / "b", "--store", store, "--repair")
    assert r.returncode == 0 and r.stdout.count("repaired: dropped damaged segment") == 2, r.stdout
    r = nd("info", "--check", "--store", store)
    assert r.returncode == 0 and "none kept yet" in r.stdout, r.stdout  # no unrestorable previous generation
    assert _photos_found_in(store, tmp_path / "a") == 10 and _photos_found_in(store, tmp_path / "b") == 13


def test_a_repair_that_cannot_read_a_segments_paths_says_which_photos_it_did_not_find(tmp_path: Path) -> None:
    """A damaged segment whose own path list is damaged too: the photos are recognised by their content (the
    segment's hashes, which still read true). Given only some folders, the repair refuses (nothing written),
    naming the photos it did not find; all folders, or --drop-missing, and it goes on, saying what it did."""
    write_product_photos(tmp_path / "a", range(10))
    write_product_photos(tmp_path / "b", range(20, 25))
    stores = [tmp_path / "s1.h5", tmp_path / "s2.h5"]
    for store in stores:
        assert nd("index", tmp_path / "a", tmp_path / "b", "--store", store, "--model", "phash").returncode == 0
        seg = _segment(store)
        with h5py.File(seg) as f:
            chunk = f["paths"].id.get_chunk_info(0) if f["paths"].chunks else None
            where = (chunk.byte_offset, chunk.size) if chunk else (f["paths"].id.get_offset(), 64)
        _zero(seg, *where)
    b_sha = {file_sha256(p) for p in (tmp_path / "b").iterdir()}
    before = {p.name: p.read_bytes() for p in StoreFiles(stores[0]).segments.iterdir()}
    r = nd("update", tmp_path / "a", "--store", stores[0], "--repair")
    assert r.returncode == 2 and "5 of its 15 photos were not found under the folders given" in r.stderr, r.stderr
    err = r.stderr.strip().splitlines()[-1]  # after the warnings that name the damaged segment
    assert err.startswith("neardup: error:") and "--drop-missing" in err and "Traceback" not in r.stderr
    assert sum(sha[:12] in r.stderr for sha in b_sha) == 3  # named by content: the first three
    assert {p.name: p.read_bytes() for p in StoreFiles(stores[0]).segments.iterdir()} == before
    r = nd("update", tmp_path / "a", tmp_path / "b", "--store", stores[0], "--repair")
    assert r.returncode == 0 and "its 15 photos were indexed again" in r.stdout, r.stdout
    assert _photos_found_in(stores[0], tmp_path / "a") == 10 and _photos_found_in(stores[0], tmp_path / "b") == 5
    r = nd("update", tmp_path / "a", "--store", stores[1], "--repair", "--drop-missing")
    assert r.returncode == 0 and "10 of its 15 photos were indexed again; 5 were not found" in r.stdout, r.stdout
    assert _photos_found_in(stores[1], tmp_path / "a") == 10 and len(read_catalog(stores[1])) == 10


def _photos_found_in(store: Path, folder: Path) -> int:
    r = nd("query", folder, "--store", store, "--json")
    doc = json.loads(r.stdout)
    return sum(res["matches"][0]["path"] == os.path.relpath(res["query"], store.parent) for res in doc["results"])


def test_a_manifest_naming_a_segment_twice_or_an_id_twice_is_refused(tmp_path: Path) -> None:
    """A forged manifest (its digests made anew) listing one segment twice, or two copies of one segment: each
    photo would pair with itself. Refused as damaged, by readers and by the full check."""
    from neardup.store.manifest import write_manifest

    store = tmp_path / "s.h5"
    write_catalog(store, _catalog(10, 8))
    with Store.open(store) as gen:
        man = gen.manifest
    twice = replace(man, segments=man.segments * 2)
    twice.meta = replace(man.meta, count=20)
    write_manifest(store, twice)
    with pytest.raises(StoreError, match="names a segment more than once"):
        Store.open(store)
    copy = replace(man.segments[0], name="0123456789ab")
    shutil.copyfile(StoreFiles(store).segment(man.segments[0].name), StoreFiles(store).segment(copy.name))
    write_manifest(store, replace(twice, segments=[man.segments[0], copy]))
    with pytest.raises(StoreError, match="an id is in more than one row"):
        Store(store).check()
    r = nd("duplicates", "--store", store)
    assert r.returncode == 2 and "an id is in more than one row" in r.stderr and "\n" not in r.stderr.strip()


def test_a_large_file_that_is_not_a_store_is_refused_unread(tmp_path: Path) -> None:
    """A 2 GB sparse file given as the store: refused from its first bytes, never read whole into memory."""
    big = tmp_path / "video.h5"
    with open(big, "wb") as fh:
        fh.truncate(2 << 30)
    code = ("import resource, sys\nfrom neardup.store import read_meta\n"
            "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
            "try:\n    read_meta(sys.argv[1])\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n")
    r = subprocess.run([sys.executable, "-c", code, str(big)], capture_output=True, text=True, timeout=120)
    assert r.stdout.startswith("StoreError") and "not a readable HDF5" in r.stdout, r.stdout + r.stderr
