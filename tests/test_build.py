"""The index/update job: contents of the store, bad inputs, and every incremental scenario."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neardup.errors import InputError, StoreError, StoreLockedError, StoreMismatchError
from neardup.indexer.build import build_index, update_index
from neardup.store import Store, read_catalog
from neardup.store.faiss_index import search
from neardup.store.files import StoreFiles
from neardup.store.lock import writer_lock


def _store_map(store: Path) -> dict[str, tuple[int, np.ndarray]]:
    cat = read_catalog(store)
    return {p: (int(i), v) for p, i, v in zip(cat.paths, cat.ids, cat.xb)}


def test_index_writes_store_and_index(tmp_path: Path, make_images, fake_embedder) -> None:
    make_images(12)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    store = tmp_path / "cat.h5"
    s = build_index([tmp_path / "imgs"], store, embedder=fake_embedder, batch_size=5)
    assert (s.added, s.embedded, s.total, s.wrote) == (12, 12, 12, True)
    assert s.failures == [("imgs/broken.jpg", "not a recognised image format")]
    cat = read_catalog(store)
    assert cat.paths == sorted(cat.paths) and cat.paths[0] == "imgs/img_0000.jpg"
    assert cat.failures == s.failures and cat.meta.model.name == "fake" and cat.xb.shape == (12, 32)
    assert list(cat.ids) == list(range(12)) and (cat.widths == 320).all()
    np.testing.assert_allclose(np.linalg.norm(cat.xb, axis=1), 1, atol=1e-6)
    # the FAISS index holds the store's ids and vectors: each image finds itself first
    with Store.open(store) as gen:
        D, I = search(gen.index, cat.xb, 1)
    np.testing.assert_array_equal(I[:, 0], cat.ids)
    assert np.allclose(D[:, 0], 1, atol=1e-5)


def test_batch_size_does_not_change_vectors(tmp_path: Path, make_images, fake_embedder) -> None:
    make_images(9)
    a = build_index([tmp_path / "imgs"], tmp_path / "a.h5", embedder=fake_embedder, batch_size=1)
    b = build_index([tmp_path / "imgs"], tmp_path / "b.h5", embedder=fake_embedder, batch_size=4)
    assert a.total == b.total == 9
    # batch 1 (gemv) and batch 4 (gemm) round differently (up to ~5e-7); a batching bug errs by ~0.1
    np.testing.assert_allclose(read_catalog(tmp_path / "a.h5").xb, read_catalog(tmp_path / "b.h5").xb, atol=1e-5)


def test_bad_inputs_are_refused(tmp_path: Path, make_images, fake_embedder) -> None:
    with pytest.raises(InputError, match="no such"):
        build_index([tmp_path / "missing"], tmp_path / "s.h5", embedder=fake_embedder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        build_index([tmp_path / "empty"], tmp_path / "s.h5", embedder=fake_embedder)
    make_images(2)
    with pytest.raises(InputError, match="does not exist"):
        build_index([tmp_path / "imgs"], tmp_path / "nodir" / "s.h5", embedder=fake_embedder)
    (tmp_path / "foreign.h5").write_bytes(b"garbage")
    with pytest.raises(StoreError):
        build_index([tmp_path / "imgs"], tmp_path / "foreign.h5", embedder=fake_embedder)
    assert (tmp_path / "foreign.h5").read_bytes() == b"garbage"  # never overwritten
    with pytest.raises(StoreError, match="no store"):
        update_index([tmp_path / "imgs"], tmp_path / "new.h5", embedder=fake_embedder)
    with pytest.raises(InputError, match="unknown model"):
        build_index([tmp_path / "imgs"], tmp_path / "s.h5", model="alexnet")


def test_other_model_is_refused_on_existing_store(tmp_path: Path, make_images, fake_embedder) -> None:
    make_images(3)
    build_index([tmp_path / "imgs"], tmp_path / "s.h5", embedder=fake_embedder)
    with pytest.raises(StoreMismatchError, match="made with model fake"):
        build_index([tmp_path / "imgs"], tmp_path / "s.h5", model="phash")
    fake_embedder.weights_fingerprint = "sha256:other"
    make_images(1, start=50)
    with pytest.raises(StoreMismatchError, match="weights"):
        build_index([tmp_path / "imgs"], tmp_path / "s.h5", embedder=fake_embedder)


def test_second_writer_is_refused(tmp_path: Path, make_images, fake_embedder) -> None:
    make_images(2)
    store = tmp_path / "s.h5"
    with writer_lock(StoreFiles(store)):
        with pytest.raises(StoreLockedError, match="being written by neardup pid"):
            build_index([tmp_path / "imgs"], store, embedder=fake_embedder)
    build_index([tmp_path / "imgs"], store, embedder=fake_embedder)  # released: no stale lock to clean


def test_incremental_scenarios(tmp_path: Path, make_images, fake_embedder) -> None:
    paths = make_images(10)
    store = tmp_path / "cat.h5"
    root = tmp_path / "imgs"
    build_index([root], store, embedder=fake_embedder)
    before = _store_map(store)

    # nothing changed: nothing embedded, nothing written
    fake_embedder.embedded = 0
    s = update_index([root], store, embedder=fake_embedder)
    assert (s.unchanged, s.embedded, s.wrote) == (10, 0, False)

    # touched (same bytes, new mtime) costs no embedding; the new mtime is recorded so it is not re-hashed
    os.utime(paths[0], ns=(1, 1_000_000_000))
    s = update_index([root], store, embedder=fake_embedder)
    assert (s.touched, s.embedded, s.changed, s.wrote) == (1, 0, 0, True)
    assert update_index([root], store, embedder=fake_embedder).unchanged == 10

    # changed content keeps the id, gets a new vector
    Image.open(paths[5]).rotate(90).save(paths[5], "JPEG", quality=90)
    # added
    make_images(2, start=100)
    # moved/renamed: same content under a new name keeps id and vector
    (root / "sub").mkdir()
    shutil.move(paths[3], root / "sub" / "renamed.jpg")
    # deleted
    paths[7].unlink()
    fake_embedder.embedded = 0
    s = update_index([root], store, embedder=fake_embedder)
    assert (s.added, s.changed, s.moved, s.removed, s.unchanged, s.embedded) == (2, 1, 1, 1, 7, 3)
    after = _store_map(store)
    assert after["imgs/sub/renamed.jpg"][0] == before["imgs/img_0003.jpg"][0]
    np.testing.assert_array_equal(after["imgs/sub/renamed.jpg"][1], before["imgs/img_0003.jpg"][1])
    assert after["imgs/img_0005.jpg"][0] == before["imgs/img_0005.jpg"][0]
    assert not np.allclose(after["imgs/img_0005.jpg"][1], before["imgs/img_0005.jpg"][1])
    assert "imgs/img_0007.jpg" not in after
    new_ids = {after[f"imgs/img_{i:04d}.jpg"][0] for i in (100, 101)}
    assert new_ids == {10, 11}  # never reuses an id
    # index and store agree after the update
    with Store.open(store) as gen:
        assert gen.index.ntotal == len(gen.catalog) == 11


def test_files_outside_given_folders_are_kept_unless_prune(tmp_path: Path, make_images, fake_embedder) -> None:
    make_images(3, folder="a")
    make_images(2, folder="b", start=10)
    store = tmp_path / "s.h5"
    build_index([tmp_path / "a", tmp_path / "b"], store, embedder=fake_embedder)
    s = update_index([tmp_path / "a"], store, embedder=fake_embedder)
    assert (s.removed, s.total) == (0, 5)
    s = update_index([tmp_path / "a"], store, embedder=fake_embedder, prune=True)
    assert (s.removed, s.total) == (2, 3)


def test_identical_files_are_embedded_once(tmp_path: Path, make_images, fake_embedder) -> None:
    src = make_images(2)
    shutil.copy(src[0], tmp_path / "imgs" / "copy.jpg")
    s = build_index([tmp_path / "imgs"], tmp_path / "s.h5", embedder=fake_embedder)
    assert (s.added, s.embedded) == (3, 2)
    cat = read_catalog(tmp_path / "s.h5")
    assert cat.sha256[cat.paths.index("imgs/copy.jpg")] == cat.sha256[cat.paths.index("imgs/img_0000.jpg")]


def test_image_that_becomes_corrupt_is_listed_and_dropped(tmp_path: Path, make_images, fake_embedder) -> None:
    paths = make_images(3)
    store = tmp_path / "s.h5"
    build_index([tmp_path / "imgs"], store, embedder=fake_embedder)
    paths[1].write_bytes(b"oops")
    s = update_index([tmp_path / "imgs"], store, embedder=fake_embedder)
    assert s.failures == [("imgs/img_0001.jpg", "not a recognised image format")] and s.total == 2
    assert read_catalog(store).failures == s.failures


def test_unlistable_folder_keeps_its_rows(tmp_path: Path, make_images, fake_embedder, monkeypatch) -> None:
    make_images(3, folder="cat/a")
    make_images(2, folder="cat/b", start=10)
    store = tmp_path / "s.h5"
    build_index([tmp_path / "cat"], store, embedder=fake_embedder)
    real_scandir = os.scandir

    def scandir(path):  # 'b' cannot be listed this time (as with a permission error)
        if Path(path).name == "b":
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    s = update_index([tmp_path / "cat"], store, embedder=fake_embedder, prune=True)
    assert (s.removed, s.total) == (0, 5)
    assert s.failures == [("cat/b/", "cannot list folder: Permission denied; its stored images are kept as they "
                                     "were")]


def test_fifo_named_like_an_image_is_listed_not_read(tmp_path: Path, make_images, fake_embedder) -> None:
    make_images(2)
    os.mkfifo(tmp_path / "imgs" / "pipe.jpg")
    s = build_index([tmp_path / "imgs"], tmp_path / "s.h5", embedder=fake_embedder)
    assert s.failures == [("imgs/pipe.jpg", "not a regular file (a FIFO, device or socket)")] and s.total == 2


def test_store_in_a_symlinked_folder(tmp_path: Path, make_images, fake_embedder) -> None:
    make_images(3, folder="real/photos")
    (tmp_path / "real" / "stores").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real" / "stores")
    store = tmp_path / "link" / "s.h5"
    build_index([tmp_path / "real" / "photos"], store, embedder=fake_embedder)
    s = update_index([tmp_path / "real" / "photos" / "img_0000.jpg"], store, embedder=fake_embedder)
    assert (s.removed, s.total) == (0, 3)  # files outside the given path are still found on disk
    assert (tmp_path / "real" / "stores" / "s.h5").is_file()


def test_lost_index_file_is_rewritten_and_stale_work_removed(tmp_path: Path, make_images, fake_embedder) -> None:
    make_images(40)
    store = tmp_path / "s.h5"
    build_index([tmp_path / "imgs"], store, embedder=fake_embedder, index="IVF4,Flat")
    files = StoreFiles(store)
    (part,) = files.segments.glob("*.faiss")  # an approximate index: one part per segment
    part.unlink()
    (tmp_path / "s.h5.work").mkdir()
    (tmp_path / "s.h5.catalog.h5.abcdef012345.faiss").write_text("a sibling store's file")
    with Store.open(store) as gen:  # meanwhile readers search the vectors exactly
        assert not gen.index_intact() and gen.index.ntotal == 40
    s = update_index([tmp_path / "imgs"], store, embedder=fake_embedder)
    assert s.wrote and s.unchanged == 40 and s.embedded == 0 and not (tmp_path / "s.h5.work").exists()
    with Store.open(store) as gen:
        assert gen.index_intact() and gen.meta.index.factory == "IVF4,Flat"
    assert len(list(files.segments.glob("*.faiss"))) == 1
    assert (tmp_path / "s.h5.catalog.h5.abcdef012345.faiss").exists()


def test_an_exact_store_keeps_no_index_file(tmp_path: Path, make_images, fake_embedder) -> None:
    """Flat is the stored vectors searched in memory: nothing to write, lose or damage beside them."""
    make_images(3)
    store = tmp_path / "s.h5"
    build_index([tmp_path / "imgs"], store, embedder=fake_embedder)
    assert not list(tmp_path.rglob("*.faiss"))
    cat = read_catalog(store)
    with Store.open(store) as gen:
        assert gen.index_intact() and gen.meta.index.factory == "Flat"
        D, I = search(gen.index, cat.xb, 1)
    np.testing.assert_array_equal(I[:, 0], cat.ids)


def test_store_records_the_weights_the_injected_embedder_loaded(tmp_path: Path, make_images, fake_embedder) -> None:
    make_images(2)
    fake_embedder.weights = "none"
    build_index([tmp_path / "imgs"], tmp_path / "s.h5", embedder=fake_embedder)
    assert read_catalog(tmp_path / "s.h5").meta.model.weights == "none"


def test_phash_refuses_a_weights_file(tmp_path: Path, make_images) -> None:
    make_images(2)
    with pytest.raises(InputError, match="phash method has no weights"):
        build_index([tmp_path / "imgs"], tmp_path / "s.h5", model="phash", weights="/some/weights.h5")


def test_stale_index_temporaries_are_removed(tmp_path: Path, make_images, fake_embedder) -> None:
    make_images(2)
    store = tmp_path / "s.h5"
    build_index([tmp_path / "imgs"], store, embedder=fake_embedder)
    leftovers = [tmp_path / ".s.h5.0123456789ab.faiss.abcd_123.neardup-tmp", tmp_path / ".s.h5.ab12cd34.neardup-tmp",
                 tmp_path / "s.h5.segments" / ".0123456789ab.h5.ab12cd34.neardup-tmp"]
    for f in leftovers:
        f.write_text("killed mid-write")
    other = tmp_path / ".pairs.csv.ab12cd34.neardup-tmp"
    other.write_text("another writer's")
    make_images(1, start=9)
    update_index([tmp_path / "imgs"], store, embedder=fake_embedder)
    assert not any(f.exists() for f in leftovers) and other.exists()


def test_a_failing_model_stops_the_decoding_threads(tmp_path: Path, make_images, fake_embedder) -> None:
    import threading

    make_images(40)

    class Broken(type(fake_embedder)):
        def embed(self, batch: np.ndarray) -> np.ndarray:
            if self.calls:
                raise RuntimeError("the model broke")
            return super().embed(batch)

    with pytest.raises(RuntimeError, match="the model broke") as info:
        build_index([tmp_path / "imgs"], tmp_path / "s.h5", embedder=Broken(), batch_size=4)
    # no thread is left reading files after the job (and its writer lock) ended, even while the caller
    # still holds the exception (and so the job's frames)
    assert info.value is not None
    assert not [t for t in threading.enumerate() if t.name.startswith("neardup-decode")]


def test_file_and_folder_names_that_are_not_utf8_are_listed(tmp_path: Path, make_images, fake_embedder) -> None:
    """A name the store cannot record (not UTF-8: Linux allows any bytes) is a failure row, whether the bad
    bytes are in the file's name or in a folder's on the way; the other photos are indexed."""
    make_images(3)
    photo = (tmp_path / "imgs" / "img_0000.jpg").read_bytes()
    imgs = os.fsencode(tmp_path / "imgs")
    try:
        os.mkdir(imgs + b"/caf\xe9")
        with open(imgs + b"/caf\xe9/a.jpg", "wb") as fh:
            fh.write(photo)
        with open(imgs + b"/\xff.jpg", "wb") as fh:
            fh.write(photo)
    except OSError as exc:  # a file system that refuses such names cannot hold them either
        pytest.skip(f"this file system refuses names that are not UTF-8: {exc}")
    s = build_index([tmp_path / "imgs"], tmp_path / "s.h5", embedder=fake_embedder)
    assert s.total == 3
    bad = sorted(p for p, why in s.failures if why == "file name is not valid UTF-8")
    assert len(bad) == 2 and any("caf\\xe9/a.jpg" in p for p in bad) and any("\\xff.jpg" in p for p in bad), s.failures
    assert all(p.encode("utf-8") for p in read_catalog(tmp_path / "s.h5").paths)


def test_two_names_of_one_file_are_indexed_once(tmp_path: Path, make_images, fake_embedder) -> None:
    """A symlink to a photo, a hard link, and the same folder given again through a symlinked path: one row a
    file, under its name with fewest links (a link is never kept over its target), the others listed as
    skipped with the name kept; a second run is a quiet night."""
    make_images(4)
    imgs = tmp_path / "imgs"
    (imgs / "0_link_to_photo.jpg").symlink_to("img_0002.jpg")
    os.link(imgs / "img_0003.jpg", imgs / "hard.jpg")
    (tmp_path / "again").symlink_to(imgs)
    s = build_index([tmp_path / "again", imgs], tmp_path / "s.h5", embedder=fake_embedder)
    cat = read_catalog(tmp_path / "s.h5")
    # two hard links are alike: the first by path is kept
    assert cat.paths == ["imgs/hard.jpg", *(f"imgs/img_000{i}.jpg" for i in range(3))] and s.total == 4
    aliases = {p: why for p, why in s.failures}
    assert aliases["imgs/0_link_to_photo.jpg"].startswith("another name of imgs/img_0002.jpg")
    assert aliases["imgs/img_0003.jpg"].startswith("another name of imgs/hard.jpg")
    assert aliases["again/img_0001.jpg"].startswith("another name of imgs/img_0001.jpg")
    assert len(s.failures) == 4 + 2 + 2  # again/: its 4 photos and its 2 links too
    again = update_index([tmp_path / "again", imgs], tmp_path / "s.h5", embedder=fake_embedder)
    assert not again.wrote and again.total == 4


def test_a_new_name_of_a_stored_file_outside_the_folders_given_is_no_second_row(tmp_path: Path, make_images,
                                                                               fake_embedder) -> None:
    make_images(3)
    store = tmp_path / "s.h5"
    build_index([tmp_path / "imgs"], store, embedder=fake_embedder)
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "a.jpg").symlink_to(tmp_path / "imgs" / "img_0001.jpg")
    make_images(1, folder="links", start=7)
    s = update_index([tmp_path / "links"], store, embedder=fake_embedder)
    assert sorted(read_catalog(store).paths) == ["imgs/img_0000.jpg", "imgs/img_0001.jpg", "imgs/img_0002.jpg",
                                         "links/img_0007.jpg"] and s.added == 1
    assert s.failures == [("links/a.jpg", "another name of imgs/img_0001.jpg (a symlink or hard link to it): "
                                          "indexed once, under that name")]
    s = update_index([tmp_path / "links"], store, embedder=fake_embedder, prune=True)  # imgs/ dropped: a.jpg it is
    assert sorted(read_catalog(store).paths) == ["links/a.jpg", "links/img_0007.jpg"] and s.failures == []


def test_index_options_record_and_keywords_agree(tmp_path: Path, make_images, fake_embedder) -> None:
    """build_index takes one IndexOptions, or its fields as keywords; an unknown field, or both, is a TypeError."""
    from neardup.indexer.options import IndexOptions

    make_images(4)
    a = build_index([tmp_path / "imgs"], tmp_path / "a.h5", IndexOptions(batch_size=3, local_features=False),
                    embedder=fake_embedder)
    b = build_index([tmp_path / "imgs"], tmp_path / "b.h5", batch_size=3, local_features=False, embedder=fake_embedder)
    assert (a.added, a.total) == (b.added, b.total) == (4, 4)
    np.testing.assert_allclose(read_catalog(tmp_path / "a.h5").xb, read_catalog(tmp_path / "b.h5").xb, atol=1e-6)
    with pytest.raises(TypeError, match="batchsize"):
        build_index([tmp_path / "imgs"], tmp_path / "c.h5", batchsize=3, embedder=fake_embedder)
    with pytest.raises(TypeError, match="not both"):
        build_index([tmp_path / "imgs"], tmp_path / "c.h5", IndexOptions(), prune=True, embedder=fake_embedder)
    assert not (tmp_path / "c.h5").exists()
    with pytest.raises(StoreError, match="no store"):  # update_index keeps its rule with a record too
        update_index([tmp_path / "imgs"], tmp_path / "d.h5", IndexOptions(), embedder=fake_embedder)
