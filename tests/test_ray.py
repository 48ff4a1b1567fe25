"""`--ray`: the embed phase on a local Ray cluster gives the local run's store, loses nothing when a worker or
the driver is killed, and lists bad photos as rows. Real grocery photos, the trained MobileNetV2."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from neardup.cli import app
from neardup.errors import InputError
from neardup.indexer.build import build_index, update_index
from neardup.indexer.ray_job import INSTALL_HINT, RayOptions
from neardup.store import read_catalog
from neardup.store.files import StoreFiles
from neardup.testing import FakeEmbedder

from .conftest import GROCERY, SKIP_GROCERY

MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "nsfwjs-mobilenet-v2" / \
    "mobilenet_v2_100_features.onnx"
SPEC = dict(model=f"onnx:{MODEL}", preprocess="output=features")
ACTOR = "MapBatches(EmbedActor)"  #: in the process title Ray gives an embedding actor
DEADLINE = 120.0  #: how long a test waits for the event it needs (a loaded machine is only slower)


@pytest.fixture(scope="module")
def cluster():
    """A local 2-CPU Ray cluster for the module (no network, no dashboard)."""
    ray = pytest.importorskip("ray", reason="Ray not installed: pip install 'neardup[ray]'")
    if not MODEL.is_file() or not GROCERY.is_dir():
        pytest.skip(SKIP_GROCERY if not GROCERY.is_dir() else f"trained-network test skipped: no {MODEL}")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 grocery photos (links to ../shared, never copies), one of them twice, and one file that is no photo."""
    if not GROCERY.is_dir():
        pytest.skip(SKIP_GROCERY)
    found = sorted((GROCERY / "test" / "Packages").rglob("*.jpg"))
    folder = tmp_path_factory.mktemp("ray-photos") / "photos"
    folder.mkdir()
    for i, src in enumerate(found[::max(1, len(found) // 96)][:96]):
        (folder / f"p{i:03d}.jpg").symlink_to(src)
    (folder / "again.jpg").symlink_to(folder / "p000.jpg")  # one content, two names: embedded once
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    return folder


def _same_store(a: Path, b: Path, local: bool = True) -> None:
    """Two stores hold the same rows: paths, ids, content, sizes, failures, local features; vectors within the
    runtime's tolerance (batches of other sizes may round differently)."""
    ca, cb = read_catalog(a, local=True), read_catalog(b, local=True)
    assert ca.paths == cb.paths and ca.paths
    assert (ca.ids == cb.ids).all() and list(ca.sha256) == list(cb.sha256)
    assert (ca.widths == cb.widths).all() and (ca.heights == cb.heights).all()
    assert sorted(ca.failures) == sorted(cb.failures)
    np.testing.assert_allclose(ca.xb, cb.xb, atol=1e-4)
    for i in range(len(ca) if local else 0):
        la, lb = ca.local.row(i), cb.local.row(i)
        assert (la.desc == lb.desc).all()
        np.testing.assert_allclose(la.xy, lb.xy, atol=1e-6)
    assert ca.meta.model.name == cb.meta.model.name
    assert ca.meta.model.weights_fingerprint == cb.meta.model.weights_fingerprint


def test_ray_run_makes_the_local_runs_store_and_updates_alike(cluster, photos: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder, symlinks=True)
    local, on_ray = tmp_path / "local.h5", tmp_path / "ray.h5"
    a = build_index([folder], local, batch_size=16, **SPEC)
    b = build_index([folder], on_ray, batch_size=16, ray=RayOptions(), **SPEC)
    assert b.embedded == a.embedded == 96  # the second name of p000's content is not embedded again
    # again.jpg names p000's file: indexed once, under the name closer to the file
    assert [p for p, _ in b.failures] == ["photos/again.jpg", "photos/broken.jpg"] and b.failures == a.failures
    _same_store(local, on_ray)
    assert not StoreFiles(on_ray).work.exists()  # the run's checkpoint is gone once published

    for p in sorted(folder.glob("p0[0-1]*.jpg")):  # an update: 20 photos gone, one back under a new name
        p.unlink()
    (folder / "renamed.jpg").symlink_to(next(photos.glob("p005.jpg")).resolve())
    a = update_index([folder], local, **SPEC)
    b = update_index([folder], on_ray, ray=RayOptions(), **SPEC)
    # moved: renamed.jpg, and again.jpg (a link to the fixture's p000.jpg, so the same file as the copy's p000,
    # indexed under that name until it went): each keeps its row and id
    assert (b.removed, b.moved, b.embedded) == (a.removed, a.moved, a.embedded) and (a.moved, a.embedded) == (2, 0)
    _same_store(local, on_ray)


def _actor_pids() -> list[int]:
    """Processes of embedding actors (Ray names them in their process title)."""
    import psutil

    return [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
            if ACTOR in " ".join(p.info["cmdline"] or [])]


def test_a_killed_worker_is_retried_and_nothing_is_lost(cluster, photos: Path, tmp_path: Path) -> None:
    # a slow stand-in model (0.25 s a batch of 4: ~6 s of work); an actor is killed once the run's first shard of
    # 16 embeddings is durable (the actors are embedding), while most shards are still to come
    reference, store = tmp_path / "local.h5", tmp_path / "ray.h5"
    build_index([photos], reference, batch_size=4, embedder=FakeEmbedder())
    killed: list[tuple[int, int, bool]] = []
    earlier = set(_actor_pids())  # an earlier test's pool may still be shutting down
    work = StoreFiles(store).work

    def killer() -> None:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline and not (list(work.glob("chunk-*.npz")) and set(_actor_pids()) - earlier):
            time.sleep(0.02)
        mine = sorted(set(_actor_pids()) - earlier)[:1]
        shards = len(list(work.glob("chunk-*.npz")))
        for pid in mine:
            os.kill(pid, signal.SIGKILL)
        killed.append((mine[0] if mine else 0, shards, store.exists()))

    thread = threading.Thread(target=killer)
    thread.start()
    s = build_index([photos], store, batch_size=4, embedder=FakeEmbedder(delay=0.25), ray=RayOptions())
    thread.join()
    pid, shards, published = killed[0]
    # an actor was killed while work remained (at most 5 of the 6 shards of 16 embeddings saved, nothing
    # published); Ray restarted it and redid its block
    assert pid and 1 <= shards <= 5 and not published, killed
    # again.jpg is another name of p000.jpg: indexed once, listed as skipped with broken.jpg
    assert s.total == 96 and sorted(Path(p).name for p, _ in s.failures) == ["again.jpg", "broken.jpg"]
    _same_store(reference, tmp_path / "ray.h5", local=False)


def test_a_killed_driver_resumes_from_its_shards(cluster, photos: Path, tmp_path: Path) -> None:
    reference, store = tmp_path / "local.h5", tmp_path / "ray.h5"
    build_index([photos], reference, **SPEC)
    work = StoreFiles(store).work
    env = {**os.environ, "RAY_ADDRESS": cluster.get_runtime_context().gcs_address}  # the test's cluster
    cmd = [sys.executable, "-m", "neardup", "index", str(photos), "--store", str(store), "--ray", "--batch-size", "4",
           "--model", SPEC["model"], "--preprocess", SPEC["preprocess"]]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    # the event: a durable shard. On a busy machine Ray's start and each actor's model load come first (the
    # README's suite beside two spinning processes once saw no shard within 120 s), so the wait is long
    deadline = time.monotonic() + 5 * DEADLINE
    while not (shards := list(work.glob("chunk-*.npz"))) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()  # kill -9 of the driver, once one shard of 16 embeddings is durable
    err = proc.communicate()[1].decode(errors="replace")
    assert shards, f"the driver wrote no shard in {5 * DEADLINE:.0f} s (exit {proc.returncode}): {err[-2000:]}"
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert not store.exists()  # nothing published
    s = build_index([photos], store, ray=RayOptions(), **SPEC)
    assert s.reused >= 16 and s.embedded + s.reused >= 96
    _same_store(reference, store)


def test_ray_without_ray_installed_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(InputError, match=r"pip install 'neardup\[ray\]'"):
        build_index([tmp_path], tmp_path / "s.h5", ray=RayOptions())
    assert INSTALL_HINT.startswith("--ray needs Ray Data")
    res = CliRunner().invoke(app, ["index", str(tmp_path), "--store", str(tmp_path / "s.h5"), "--ray-actors", "2"])
    assert res.exit_code != 0 and "go with --ray" in res.output


def test_duplicates_verified_on_ray_gives_the_local_pairs(cluster, photos: Path, tmp_path: Path) -> None:
    from neardup.search.duplicates import find_duplicates
    from neardup.search.join import knn_pairs
    from neardup.search.verify_jobs import verify_many
    from neardup.store import Store

    store = tmp_path / "s.h5"
    build_index([photos], store, **SPEC)
    here = find_duplicates(store, verify=True, processes=1)
    there = find_duplicates(store, verify=True, ray=RayOptions())
    assert here.candidates == there.candidates > 0
    for f in ("I", "J", "D", "exact", "verified", "inliers"):
        assert (getattr(here, f) == getattr(there, f)).all(), f
    # the same through the CLI, and in many chunks (one Ray task each)
    out = [tmp_path / "here.csv", tmp_path / "ray.csv"]
    for path, extra in zip(out, ([], ["--ray"])):
        res = CliRunner().invoke(app, ["duplicates", "--store", str(store), "--out", str(path), *extra])
        assert res.exit_code == 0, res.output
    assert out[0].read_text() == out[1].read_text()
    with Store.open(store) as gen:
        table, xb = gen.local(), gen.read(vectors=True).xb
    ia, ib, _ = knn_pairs(xb, 10, -1.0)  # every photo's 10 nearest: ~900 pairs
    a = verify_many(table, ia, ib, screen=True, processes=1)
    b = verify_many(table, ia, ib, screen=True, ray=RayOptions(), chunk=64)
    for f in ("verified", "inliers", "inlier_ratio", "centre", "coverage", "judged"):
        assert (getattr(a, f) == getattr(b, f)).all(), f
    assert a.verified.any()
    res = CliRunner().invoke(app, ["duplicates", "--store", str(store), "--ray-address", "auto"])
    assert res.exit_code != 0 and "go with --ray" in res.output
