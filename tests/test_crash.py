"""Crash safety: SIGKILL at random moments, resume with reuse; readers during updates never fail."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from neardup.indexer.build import build_index
from neardup.indexer.checkpoint import Checkpoint
from neardup.store import Store, read_catalog
from neardup.store.files import StoreFiles
from neardup.testing import product_photo

N_IMAGES = 240


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash") / "imgs"
    root.mkdir()
    for i in range(N_IMAGES):  # PNGs of 700 px take a few ms each to decode: the run lasts long enough to kill
        # drawn at 350 px and enlarged: a 700 px PNG decodes as slowly, and renders in a fifth of the time
        product_photo(i, (350, 350)).resize((700, 700)).save(root / f"img_{i:04d}.png", compress_level=1)
    return root


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from neardup.cli import main; main()", *args]


def _checkpointed(store: Path) -> set[str]:
    work = StoreFiles(store).work
    if not (work / "meta.json").is_file():
        return set()
    return set(Checkpoint(work, json.loads((work / "meta.json").read_text())).known)


def _abs(store: Path, paths: list[str]) -> list[Path]:
    return [(store.parent / p).resolve() for p in paths]  # stored paths are relative to the store's folder


def test_kill_at_random_points_then_resume(photos: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref.h5"
    t0 = time.perf_counter()
    subprocess.run(_cli("index", str(photos), "--store", str(ref), "--model", "phash", "-b", "8"), check=True,
                   capture_output=True, timeout=300)
    full = time.perf_counter() - t0
    expected = read_catalog(ref)
    rng = random.Random(1234)
    reused_total = 0
    for trial in range(5):
        store = tmp_path / f"t{trial}" / "cat.h5"
        store.parent.mkdir()
        proc = subprocess.Popen(_cli("index", str(photos), "--store", str(store), "--model", "phash", "-b", "8"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if trial % 2:  # at a random time: before, during or after the embedding
            time.sleep(rng.uniform(0.3, full * 0.95))
        else:  # soon after a checkpoint chunk is durable, so that some kill always lands mid-run
            work, deadline = StoreFiles(store).work, time.monotonic() + 180
            while not list(work.glob("chunk-*.npz")) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        saved = _checkpointed(store)
        s = build_index([photos], store, model="phash", batch_size=8)
        got = read_catalog(store)
        assert _abs(store, got.paths) == _abs(ref, expected.paths), trial
        np.testing.assert_array_equal(got.ids, expected.ids)
        np.testing.assert_array_equal(got.xb, expected.xb)
        assert got.sha256 == expected.sha256
        if s.wrote:  # killed before publishing: everything checkpointed was reused, nothing embedded twice
            assert s.reused == len(saved) and s.embedded == N_IMAGES - len(saved), trial
        reused_total += s.reused
        assert not store.with_name("cat.h5.work").exists()
        assert not list(store.parent.glob(".cat.h5.*.neardup-tmp"))
        with Store.open(store) as gen:  # nothing is left but what the manifest names
            named = {s.name for s in gen.segments}
        assert {p.stem for p in StoreFiles(store).segments.iterdir()} == named
    assert reused_total > 0  # the kills after a checkpoint resumed from it


READER = r"""
import os, sys
import numpy
from neardup.search.query import Searcher
from neardup.search.duplicates import find_duplicates
store, stop, log = sys.argv[1], sys.argv[2], open(sys.argv[3], "w")
seen = set()
while not os.path.exists(stop):
    try:
        with Searcher.open(store) as s:
            D, I = s.index.search(numpy.eye(1, 64, dtype="float32"), 1)
            assert s.index.ntotal == len(s.cat.ids)
            find_duplicates(s.gen)
            if len(s.cat.ids) not in seen:
                seen.add(len(s.cat.ids))
                log.write(f"SAW {len(s.cat.ids)}\n"); log.flush()
    except Exception as exc:
        log.write(f"ERROR {type(exc).__name__}: {exc}\n"); log.flush()
log.write("DONE\n")
"""


def _wait_for(what: str, check, timeout: float = 180.0) -> None:
    """Wait for `check()` to hold (a busy machine may take long; the event, not a time window, decides)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_readers_never_fail_during_updates(photos: Path, tmp_path: Path) -> None:
    """A reader loops over the store while it grows, shrinks and is compacted: it never fails, and it sees
    each generation (the test waits for the reader to report each one before the next update)."""
    root = tmp_path / "cat"
    root.mkdir()
    store = tmp_path / "cat.h5"
    for i in range(40):
        os.link(photos / f"img_{i:04d}.png", root / f"img_{i:04d}.png")
    build_index([root], store, model="phash")
    log, stop = tmp_path / "reader.log", tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(store), str(stop), str(log)])
    saw = lambda n: lambda: log.is_file() and f"SAW {n}" in log.read_text().splitlines()  # noqa: E731 - a check maker
    try:
        _wait_for("the reader's first read", saw(40))
        for step in range(8):  # grow and shrink the catalogue while the reader loops
            for i in range(40 + step * 10, 50 + step * 10):
                os.link(photos / f"img_{i:04d}.png", root / f"img_{i:04d}.png")
            if step % 3 == 2:
                (root / f"img_{step:04d}.png").unlink()
            build_index([root], store, model="phash")
            if step % 4 == 3:  # compactions too: every row copied into a new segment, the old ones deleted
                Store(store).compact()
            _wait_for(f"the reader to see update {step}", saw(len(read_catalog(store).ids)))
    finally:
        stop.touch()
    assert reader.wait(timeout=120) == 0
    lines = log.read_text().splitlines()
    assert not [ln for ln in lines if ln.startswith("ERROR")], lines[:5]
    assert lines[-1] == "DONE"


KILLER = r"""
import os, signal, sys
from neardup import update_index
# Every durable step of an update goes through one of these: kill the process just before the N-th one.
real = {name: getattr(os, name) for name in ("replace", "link", "unlink", "fsync", "rename")}
count = 0
def step(name):
    def call(*a, **k):
        global count
        count += 1
        if count == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real[name](*a, **k)
    return call
for name in real:
    setattr(os, name, step(name))
update_index([sys.argv[1]], sys.argv[2], model="phash")
print("STEPS", count)
"""


def _rows(store: Path) -> dict[str, tuple[int, str]]:
    with Store.open(store) as gen:
        gen.verify()
        cat = gen.catalog
        return dict(zip(cat.paths, zip(cat.ids.tolist(), cat.sha256)))


def test_kill_at_every_step_of_an_update(photos: Path, tmp_path: Path) -> None:
    """SIGKILL before each durable step of an update (a rename, link, unlink or fsync) in turn: the store
    always opens, every block checked, as the old generation or the new one, never a mix; and the next run
    ends where an uninterrupted update ends."""
    base = tmp_path / "base"
    (base / "imgs").mkdir(parents=True)
    for i in range(60):
        os.link(photos / f"img_{i:04d}.png", base / "imgs" / f"img_{i:04d}.png")
    build_index([base / "imgs"], base / "s.h5", model="phash")
    old = _rows(base / "s.h5")
    for i in range(60, 70):  # the change: 10 added, 5 deleted, 2 replaced by other content
        os.link(photos / f"img_{i:04d}.png", base / "imgs" / f"img_{i:04d}.png")
    for i in range(5):
        (base / "imgs" / f"img_{i:04d}.png").unlink()
    for i in (10, 11):
        (base / "imgs" / f"img_{i:04d}.png").unlink()
        os.link(photos / f"img_{i + 100:04d}.png", base / "imgs" / f"img_{i:04d}.png")

    def trial(name: str, kill_at: int) -> tuple[Path, subprocess.CompletedProcess[str]]:
        shutil.copytree(base, tmp_path / name, copy_function=os.link)
        store = tmp_path / name / "s.h5"
        shutil.rmtree(StoreFiles(store).segments)  # segments copied, not linked: each trial owns its store
        shutil.copytree(StoreFiles(base / "s.h5").segments, StoreFiles(store).segments)
        store.unlink()
        shutil.copyfile(base / "s.h5", store)
        return store, subprocess.run([sys.executable, "-c", KILLER, str(store.parent / "imgs"), str(store),
                                      str(kill_at)], capture_output=True, text=True, timeout=120)

    ref, r = trial("ref", 0)
    assert r.returncode == 0, r.stderr
    steps, new = int(r.stdout.split()[-1]), _rows(ref)
    assert steps >= 8 and new != old
    for n in range(1, steps + 1):
        store, r = trial(f"k{n}", n)
        assert r.returncode == -signal.SIGKILL, (n, r.stderr)
        assert _rows(store) in (old, new), n  # one whole generation or the other
        build_index([store.parent / "imgs"], store, model="phash")
        assert _rows(store) == new, n
        left = {p.stem for p in StoreFiles(store).segments.iterdir()}
        with Store.open(store) as gen, Store(store).previous() as prev:  # nothing unnamed is left behind
            assert left <= {s.name for s in gen.segments} | {s.name for s in prev.segments}, n
        assert not list(store.parent.rglob("*.neardup-tmp")), n


def test_orphans_of_a_killed_merge_are_reported_and_collected_by_the_next_writer(photos: Path, tmp_path: Path) -> None:
    """A writer killed after a segment (and its index part) was renamed into place but before the manifest that
    names it: `info --check` reports the orphans (exit 1) and the next writer deletes them, even when it has
    nothing to publish."""
    root = tmp_path / "cat"
    root.mkdir()
    for i in range(12):
        os.link(photos / f"img_{i:04d}.png", root / f"img_{i:04d}.png")
    store = tmp_path / "cat.h5"
    build_index([root], store, model="phash")
    files = StoreFiles(store)
    with Store.open(store) as gen:
        seg = files.segment(gen.segments[0].name)
    orphans = [files.segments / "0123456789ab.h5", files.segments / "0123456789ab.faiss"]
    shutil.copyfile(seg, orphans[0])  # what a merge killed before its publish leaves
    orphans[1].write_bytes(b"part")
    r = subprocess.run(_cli("info", "--check", "--store", str(store)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "2 file(s) that no kept generation names" in r.stdout, r.stdout
    s = build_index([root], store, model="phash")  # nothing changed: nothing published
    assert not s.wrote and not any(p.exists() for p in orphans)
    r = subprocess.run(_cli("info", "--check", "--store", str(store)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout
