"""Verification of many pairs: stage by stage over all pairs, in worker processes, and when a worker dies.

The oracle of the batched stages is verify_pair, one pair at a time; the oracle of the worker processes is the
same job run in this process. A worker killed mid-run must not lose a pair: its chunks are redone, or the run
fails with one line.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal

import numpy as np
import pytest

from neardup.errors import WorkerError
from neardup.search import verify, verify_jobs
from neardup.search.verify import Verified, pack, verify_pair, verify_pairs
from neardup.search.verify_jobs import verify_many
from neardup.testing import write_product_photos

from .test_verify import edited, features


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list:
    """Local features of 24 synthetic product photos and of edited copies of the first 12 (None for one
    missing photo)."""
    tmp = tmp_path_factory.mktemp("workers")
    made = write_product_photos(tmp / "cat", range(24), size=(400, 400))
    copies = [edited(p, tmp / "copies" / f"copy_{p.stem}.jpg", crop=0.03 * (i % 3), scale=0.6 + 0.05 * (i % 5))
              for i, p in enumerate(made[:12])]
    return [features(p) for p in made + copies] + [None]


def _all_pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    ia, ib = np.triu_indices(n, 1)
    return ia.astype(np.int64), ib.astype(np.int64)


def _same(a: Verified, b: Verified) -> None:
    for f in verify._FIELDS:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


@pytest.mark.parametrize("screen", [False, True])
def test_pairs_verified_together_get_the_verdicts_of_one_pair_alone(photos, screen: bool) -> None:
    ia, ib = _all_pairs(len(photos))
    rng = np.random.default_rng(0)
    swap = rng.random(len(ia)) < 0.5  # either order of a pair
    ia, ib = np.where(swap, ib, ia), np.where(swap, ia, ib)
    together = verify_pairs([photos[i] for i in ia], [photos[j] for j in ib], screen=screen)
    alone = Verified.of([verify_pair(photos[i], photos[j], screen=screen) for i, j in zip(ia, ib)])
    _same(together, alone)
    assert together.verified.sum() >= 12  # each copy with its original, at least
    assert not together.judged[ib == len(photos) - 1].any()  # the missing photo is never judged
    threads = verify_pairs([photos[i] for i in ia], [photos[j] for j in ib], screen=screen, workers=2)
    _same(threads, alone)


def test_worker_processes_give_the_verdicts_of_this_process(photos) -> None:
    t = pack(photos)
    ia, ib = _all_pairs(len(photos))
    here = verify_many(t, ia, ib, screen=True, processes=1)
    seen: list[tuple[int, int]] = []
    spread = verify_many(t, ia, ib, screen=True, processes=2, min_pairs=0, chunk=50,
                         progress=lambda done, total: seen.append((done, total)))
    _same(spread, here)
    assert seen[-1] == (len(ia), len(ia)) and len(seen) == -(-len(ia) // 50)


def _kill_a_worker() -> None:
    children = multiprocessing.active_children()
    assert children, "no worker process to kill"
    os.kill(children[0].pid, signal.SIGKILL)


def test_a_worker_process_killed_mid_run_loses_no_pair(photos, caplog: pytest.LogCaptureFixture) -> None:
    t = pack(photos)
    ia, ib = _all_pairs(len(photos))
    here = verify_many(t, ia, ib, screen=True, processes=1)
    killed: list[int] = []

    def progress(done: int, total: int) -> None:
        if not killed:  # after the first chunk: most chunks are still to do
            killed.append(done)
            _kill_a_worker()

    with caplog.at_level(logging.WARNING, logger="neardup.search.verify_jobs"):
        got = verify_many(t, ia, ib, screen=True, processes=2, min_pairs=0, chunk=20, progress=progress)
    assert killed and killed[0] < len(ia)
    _same(got, here)
    assert any("worker process died" in r.getMessage() for r in caplog.records)


def test_worker_processes_that_keep_dying_fail_with_one_line(photos) -> None:
    t = pack(photos)
    ia, ib = _all_pairs(len(photos))
    with pytest.raises(WorkerError) as err:
        verify_many(t, ia, ib, screen=True, processes=2, min_pairs=0, chunk=10,
                    progress=lambda done, total: _kill_a_worker())
    assert "\n" not in str(err.value) and "died" in str(err.value)


def test_one_process_or_a_small_job_runs_here(photos, monkeypatch) -> None:
    def no_pool(*args, **kwargs):
        raise AssertionError("a process pool was started")

    monkeypatch.setattr(verify_jobs, "process_pool", no_pool)
    t = pack(photos)
    ia, ib = _all_pairs(len(photos))
    verify_many(t, ia, ib, screen=True, processes=1, min_pairs=0)
    verify_many(t, ia, ib, screen=True, processes=2, min_pairs=len(ia) + 1)

