"""Review: decisions on pairs kept in the store's journal (checked, append-only, concurrent), recorded by path,
imported and exported as CSV, and applied by duplicates, query and the report."""
from __future__ import annotations

import csv
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neardup import build_index, update_index
from neardup.errors import InputError, StoreError
from neardup.search.review import BadRowsError, decisions_for, export_decisions, import_decisions, record_decision
from neardup.store import Store, StoreFiles
from neardup.store.decisions import Decision, Journal, pair_key
from neardup.testing import FakeEmbedder, write_product_photos

ENV = {**os.environ, "COLUMNS": "100"}


def nd(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "neardup", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=ENV)


def digest(k: int) -> str:
    return f"{k:064x}"


def dec(x: int, y: int, word: str = "distinct", keeper: int | None = None, source: str = "test") -> Decision:
    return Decision.make(digest(x), digest(y), word, None if keeper is None else digest(keeper), source=source)


# --------------------------------------------------------------------------------------------- the journal

def test_journal_appends_reads_and_a_later_decision_supersedes(tmp_path: Path) -> None:
    j = Journal.of(tmp_path / "s.h5")
    assert j.path == StoreFiles(tmp_path / "s.h5").decisions and not j.exists()
    assert j.read().current == {} and j.read().problems == []
    j.append([dec(1, 2), dec(3, 4, "duplicate", keeper=4)])
    j.append([dec(2, 1, "duplicate", keeper=1)])  # the same pair, given the other way round
    s = j.read()
    assert s.problems == []
    assert [(d.a, d.b, d.decision) for d in s.history] == [
        (digest(1), digest(2), "distinct"), (digest(3), digest(4), "duplicate"), (digest(1), digest(2), "duplicate")]
    assert s.get(digest(2), digest(1)).decision == "duplicate" and s.get(digest(1), digest(2)).keeper == digest(1)
    assert [d.decision for d in s.of(digest(1), digest(2))] == ["distinct", "duplicate"]
    assert set(s.current) == {pair_key(digest(1), digest(2)), pair_key(digest(3), digest(4))}
    j.append([dec(1, 2, "undecided")])  # undo: the pair is undecided again, its history kept
    s = j.read()
    assert set(s.current) == {pair_key(digest(3), digest(4))} and len(s.of(digest(1), digest(2))) == 3


@pytest.mark.parametrize("bad", [
    lambda: Decision(digest(2), digest(1), "distinct", None, "t", "x"),  # not ordered
    lambda: Decision(digest(1), digest(1), "distinct", None, "t", "x"),  # a photo with itself
    lambda: Decision("abc", digest(1), "distinct", None, "t", "x"),  # not a digest
    lambda: Decision(digest(1), digest(2), "same", None, "t", "x"),  # unknown word
    lambda: Decision(digest(1), digest(2), "duplicate", digest(3), "t", "x"),  # keeper not of the pair
    lambda: Decision(digest(1), digest(2), "distinct", digest(1), "t", "x"),  # keeper of a distinct pair
])
def test_a_bad_decision_is_refused(bad) -> None:  # noqa: ANN001
    with pytest.raises(InputError):
        bad()


def test_a_torn_last_record_is_ignored_reported_and_cut_off_by_the_next_append(tmp_path: Path) -> None:
    j = Journal.of(tmp_path / "s.h5")
    j.append([dec(1, 2)])
    whole = j.path.read_bytes()
    j.append([dec(3, 4), dec(5, 6)])
    torn = j.path.read_bytes()[: len(whole) + 40]  # a crash in the middle of the second batch's write
    j.path.write_bytes(torn)
    s = j.read()
    assert list(s.current) == [pair_key(digest(1), digest(2))]  # none of the torn batch: all or nothing
    assert len(s.problems) == 1 and "torn last record (40 bytes)" in s.problems[0]
    j.append([dec(7, 8)])
    s = j.read()
    assert s.problems == [] and set(s.current) == {pair_key(digest(1), digest(2)), pair_key(digest(7), digest(8))}


def test_a_damaged_record_in_the_middle_is_reported_and_never_served(tmp_path: Path) -> None:
    j = Journal.of(tmp_path / "s.h5")
    j.append([dec(1, 2)])
    j.append([dec(3, 4)])
    j.append([dec(5, 6)])
    data = bytearray(j.path.read_bytes())
    at = data.index(b"distinct", data.index(digest(3).encode()))
    data[at:at + 8] = b"distinkt"  # one word changed, the checksum kept: never served as "distinkt" nor "distinct"
    j.path.write_bytes(bytes(data))
    s = j.read()
    assert set(s.current) == {pair_key(digest(1), digest(2)), pair_key(digest(5), digest(6))}
    assert len(s.problems) == 1 and "1 damaged record(s) (line 3)" in s.problems[0]
    j.append([dec(7, 8)])  # appending goes on; the damage stays reported
    assert "damaged" in j.read().problems[0] and len(j.read().current) == 3


def test_a_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> None:
    j = Journal.of(tmp_path / "s.h5")
    j.path.write_text("a,b,decision\n")
    with pytest.raises(StoreError, match="not a decisions journal"):
        j.read()
    j.path.unlink()
    j.path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StoreError, match="symbolic link"):
        j.append([dec(1, 2)])
    assert not (tmp_path / "elsewhere").exists()


def _append_many(path: str, worker: int, batches: int) -> None:
    j = Journal(path)
    for k in range(batches):
        j.append([dec(1000 * worker + 2 * k, 1000 * worker + 2 * k + 1, source=f"w{worker}"),
                  dec(1000 * worker + 2 * k, 1000 * worker + 2 * k + 2, "duplicate", source=f"w{worker}")])


def test_concurrent_processes_lose_no_decision(tmp_path: Path) -> None:
    path = str(Journal.of(tmp_path / "s.h5").path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(path, w, 40)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    s = Journal(path).read()
    assert s.problems == [] and len(s.history) == 4 * 40 * 2 and len(s.current) == 4 * 40 * 2
    for w in range(4):  # each writer's batches whole and in its order
        mine = [d for d in s.history if d.source == f"w{w}"]
        assert [d.a for d in mine] == [digest(1000 * w + 2 * k) for k in range(40) for _ in range(2)]


# --------------------------------------------------------------------------------------------- by path

@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A store of 8 distinct product photos (p0..p7) and a byte-identical copy of p0 (copy.jpg)."""
    root = tmp_path / "imgs"
    write_product_photos(root, range(8), size=(96, 96))
    (root / "copy.jpg").write_bytes(sorted(root.glob("*.jpg"))[0].read_bytes())
    build_index([root], tmp_path / "s.h5", embedder=FakeEmbedder())
    return tmp_path / "s.h5"


def _paths(store: Path) -> list[str]:
    with Store.open(store) as gen:
        return sorted(p for p in gen.catalog.paths if not p.endswith("copy.jpg"))


def _csv(path: Path, rows: list[list[object]], head: str = "a,b,decision,keeper") -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(head.split(","))
        w.writerows(rows)
    return path


def test_record_import_and_export_by_path_and_id(store: Path, tmp_path: Path) -> None:
    p = _paths(store)
    d = record_decision(store, p[0], p[1], "duplicate", keeper=p[1], source="page")
    with Store.open(store) as gen:
        cat = gen.catalog
        sha = dict(zip(cat.paths, cat.sha256))
        ids = dict(zip(cat.paths, cat.ids.tolist()))
    assert (d.a, d.b) == pair_key(sha[p[0]], sha[p[1]]) and d.keeper == sha[p[1]] and d.source == "page"
    # ids, paths from here (absolute) and the stored paths all name photos
    r = import_decisions(store, _csv(tmp_path / "in.csv", [
        [ids[p[2]], str(store.parent / p[3]), "distinct", ""],
        [p[4], p[5], "DUPLICATE", p[4]],
        [p[1], p[0], "duplicate", "b"],  # the page's pair again, keeping p[0] now: supersedes it
    ]))
    assert r.rows == 3 and r.recorded == 3 and r.unchanged == 0
    s = decisions_for(store)
    assert s.get(sha[p[0]], sha[p[1]]).keeper == sha[p[0]] and len(s.history) == 4
    n = export_decisions(store, tmp_path / "out.csv")
    rows = list(csv.DictReader(open(tmp_path / "out.csv")))
    order = lambda x, y: (x, y) if sha[x] < sha[y] else (y, x)  # noqa: E731 - a journal pair is by digest
    assert n == 3 and [(r["a"], r["b"], r["decision"], r["keeper"]) for r in rows] == sorted([
        (*order(p[0], p[1]), "duplicate", p[0]), (*order(p[2], p[3]), "distinct", ""),
        (*order(p[4], p[5]), "duplicate", p[4])])
    again = import_decisions(store, tmp_path / "out.csv")  # an export imports as is, and changes nothing
    assert (again.recorded, again.unchanged) == (0, 3) and len(decisions_for(store).history) == 4


def test_a_bad_import_lists_every_bad_row_and_applies_nothing(store: Path, tmp_path: Path) -> None:
    p = _paths(store)
    record_decision(store, p[0], p[1], "distinct", source="test")
    before = Journal.of(store).path.read_bytes()
    bad = _csv(tmp_path / "bad.csv", [
        [p[2], p[3], "distinct", ""],  # line 2: good
        ["imgs/nope.jpg", p[3], "distinct", ""],  # 3: not in the store
        [p[2], p[4], "same", ""],  # 4: unknown word
        [p[2], p[4], "duplicate", p[5]],  # 5: keeper neither
        [p[5], p[5], "distinct", ""],  # 6: a photo with itself
        [p[3], p[2], "duplicate", ""],  # 7: conflicts with line 2
        [p[0], "imgs/copy.jpg", "distinct", ""],  # 8: byte-identical copies
        [p[6], p[7], "distinct", p[6]],  # 9: keeper of a distinct pair
    ])
    with pytest.raises(BadRowsError) as err:
        import_decisions(store, bad)
    lines = err.value.lines()
    assert [ln.split(":")[0] for ln in lines] == [f"line {k}" for k in (3, 4, 5, 6, 7, 8, 9)], lines
    assert "not a photo of the store" in lines[0] and "unknown decision" in lines[1] and "neither" in lines[2]
    assert "itself" in lines[3] and "conflicts with line 2" in lines[4] and "byte-identical" in lines[5]
    assert Journal.of(store).path.read_bytes() == before  # nothing applied
    with pytest.raises(InputError, match="unknown: verdict"):
        import_decisions(store, _csv(tmp_path / "cols.csv", [[p[0], p[1], "distinct"]], "a,b,verdict"))
    with pytest.raises(InputError, match="columns must be"):
        import_decisions(store, _csv(tmp_path / "cols2.csv", [[p[0], p[1]]], "a,b"))
    with pytest.raises(InputError, match="not a photo"):
        record_decision(store, p[0], "gone.jpg", "distinct", source="api")
    assert Journal.of(store).path.read_bytes() == before


def test_decisions_survive_renames_update_compaction_restore_and_repair(store: Path, tmp_path: Path) -> None:
    p, root, emb = _paths(store), tmp_path / "imgs", FakeEmbedder()
    record_decision(store, p[0], p[1], "duplicate", keeper=p[1], source="test")
    record_decision(store, p[2], p[3], "distinct", source="test")
    journal = Journal.of(store).path.read_bytes()

    def exported() -> set[tuple[str, str, str, str]]:
        export_decisions(store, tmp_path / "out.csv")
        return {(r["a"], r["b"], r["decision"], r["keeper"]) for r in csv.DictReader(open(tmp_path / "out.csv"))}

    def names(rows: set[tuple[str, str, str, str]]) -> set[tuple[frozenset[str], str, str]]:
        return {(frozenset((a, b)), w, k) for a, b, w, k in rows}

    first = names(exported())
    assert first == {(frozenset(p[:2]), "duplicate", p[1]), (frozenset(p[2:4]), "distinct", "")}
    (root / "moved").mkdir()
    (root / Path(p[1]).name).rename(root / "moved" / "kept.jpg")  # a photo renamed and moved
    update_index([root], store, embedder=emb)
    assert names(exported()) == {(frozenset((p[0], "imgs/moved/kept.jpg")), "duplicate", "imgs/moved/kept.jpg"),
                                 (frozenset(p[2:4]), "distinct", "")}
    Store(store).compact()
    Store(store).restore()
    (root / "moved" / "kept.jpg").rename(root / Path(p[1]).name)
    update_index([root], store, embedder=emb, repair=True)
    assert names(exported()) == first
    assert Journal.of(store).path.read_bytes() == journal  # no writer touched it
    (root / Path(p[3]).name).unlink()  # a decided photo gone: its decision stays, not exported
    update_index([root], store, embedder=emb)
    assert names(exported()) == {(frozenset(p[:2]), "duplicate", p[1])} and len(decisions_for(store).current) == 2
