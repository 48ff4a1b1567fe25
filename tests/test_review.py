"""Review: decisions on pairs kept in the store's journal (checked, append-only, concurrent), recorded by path,
imported and exported as CSV, and applied by duplicates, query and the report."""
from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from neardup import build_index, find_duplicates, update_index
from neardup.embed.embedders import l2_normalize
from neardup.errors import InputError, StoreError
from neardup.fileio import file_sha256
from neardup.search.pairs_io import read_pairs_csv, write_groups_json, write_pairs_csv
from neardup.search.review import BadRowsError, decisions_for, export_decisions, import_decisions, record_decision
from neardup.store import Catalog, ModelInfo, Store, StoreFiles, StoreMeta, write_catalog
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
def test_a_bad_decision_is_refused(bad) -> None:
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


def test_decisions_on_an_open_generation_build_its_look_up_once(store: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """The review page records each decision on the service's open generation: the photos' look-up (a walk over
    every row) is built once for it, not per key press, and paths from here still resolve."""
    import neardup.search.review as review_mod

    built: list[int] = []
    real = review_mod.Photos.__init__

    def counting(self, gen) -> None:
        built.append(len(gen))
        real(self, gen)

    monkeypatch.setattr(review_mod.Photos, "__init__", counting)
    p = _paths(store)
    with Store.open(store) as gen:
        for k in range(3):
            record_decision(gen, p[2 * k], str(store.parent / p[2 * k + 1]), "distinct", source="page")
        assert len(built) == 1
        with pytest.raises(InputError, match="is not a photo of the store"):
            record_decision(gen, p[0], "nowhere.jpg", "distinct", source="page")
        assert len(built) == 1
    record_decision(store, p[0], p[1], "duplicate", source="cli")  # by path: opened, and built, per call
    assert len(built) == 2
    assert len(decisions_for(store).history) == 4
    # the cache does not keep a generation alive (nor its FAISS index): gone once its holder lets it go
    import gc
    import weakref

    with Store.open(store) as gen:
        gen.index  # noqa: B018 - the index loaded, as the service's generations have it
        record_decision(gen, p[6], p[7], "distinct", source="page")
        ref = weakref.ref(gen)
    del gen
    gc.collect()
    assert ref() is None and not review_mod._PHOTOS


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


# --------------------------------------------------------------------------------------------- applied

def _vector_store(tmp_path: Path, xb: np.ndarray) -> Path:
    """A store of the vectors `xb` (rows p000.jpg...), each row's file written beside it with its real size,
    time and digest (so no photo is stale: a stale file is never a keeper)."""
    n, d = xb.shape
    files = []
    for i in range(n):
        f = tmp_path / f"p{i:03d}.jpg"
        f.write_bytes(f"photo {i} ".encode() * (10 + i))
        files.append(f)
    meta = StoreMeta(ModelInfo("fake", "none", "none", dim=d, input_size=16, preprocessing="p"), next_id=n)
    cat = Catalog(meta=meta, ids=np.arange(n, dtype=np.int64) + 100, paths=[f.name for f in files],
                  sizes=np.array([f.stat().st_size for f in files], np.int64),
                  mtimes_ns=np.array([f.stat().st_mtime_ns for f in files], np.int64),
                  sha256=[file_sha256(f) for f in files], widths=np.full(n, 100, np.int32),
                  heights=np.full(n, 100, np.int32), xb=l2_normalize(xb.astype(np.float32)))
    write_catalog(tmp_path / "v.h5", cat)
    return tmp_path / "v.h5"


def _rows(report, group) -> set[int]:
    return {m.id - 100 for m in group.members}


def test_a_chain_never_joins_through_a_distinct_pair(tmp_path: Path) -> None:
    # a ~ b ~ c, a !~ c: without decisions {a, b} is a group; a-b decided distinct: only {b, c}
    angle = np.radians([0, 10, 20])  # cos 10° = 0.985, cos 20° = 0.940
    xb = np.array([[np.cos(x), np.sin(x), 0] for x in angle] + [[0, 0, 1]])
    store = _vector_store(tmp_path, xb)
    t = 0.97
    plain = find_duplicates(store, threshold=t)
    assert {(p.a_path, p.b_path) for p in plain.pairs} == {("p000.jpg", "p001.jpg"), ("p001.jpg", "p002.jpg")}
    record_decision(store, "p000.jpg", "p001.jpg", "distinct", source="test")
    r = find_duplicates(store, threshold=t)
    assert {(p.a_path, p.b_path) for p in r.pairs} == {("p001.jpg", "p002.jpg")} and r.hidden_distinct == 1
    assert [_rows(r, g) for g in r.groups] == [{1, 2}]
    assert find_duplicates(store, threshold=t, decisions=False).n_pairs == 2  # what the search alone finds
    assert r.groups[0].keeper == 102 and not r.groups[0].keeper_decided  # the larger file, by the rule
    record_decision(store, "p002.jpg", "p001.jpg", "duplicate", keeper="p001.jpg", source="test")
    r = find_duplicates(store, threshold=t)
    assert r.groups[0].keeper == 101 and r.groups[0].keeper_decided and r.decisions == {0: "duplicate"}
    assert [(m.id, m.keeper, m.decision) for m in r.groups[0].members] == [
        (101, True, None), (102, False, "duplicate")]
    write_pairs_csv(r, tmp_path / "pairs.csv")
    write_groups_json(r, tmp_path / "groups.json")
    assert [(row["a_path"], row["decision"]) for row in csv.DictReader(open(tmp_path / "pairs.csv"))] == [
        ("p001.jpg", "duplicate")]
    assert [p.decision for p in read_pairs_csv(tmp_path / "pairs.csv")] == ["duplicate"]
    doc = json.loads((tmp_path / "groups.json").read_text())
    assert doc["groups"][0]["keeper_decided"] and doc["decisions"]["distinct_hidden"] == 1
    assert [m["decision"] for m in doc["groups"][0]["members"]] == [None, "duplicate"]
    assert find_duplicates(store, threshold=t, new_only=True).pairs == []


def test_groups_never_hold_a_distinct_pair_and_confirmed_keepers_are_kept(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((12, 16))
    xb = np.repeat(centres, 5, axis=0) + 0.18 * rng.standard_normal((60, 16))  # 12 clusters of 5
    xb = l2_normalize(xb.astype(np.float32))
    store, t = _vector_store(tmp_path, xb), 0.9
    plain = find_duplicates(store, threshold=t)
    pairs = sorted((p.a_id - 100, p.b_id - 100) for p in plain.pairs)
    assert len(pairs) > 40
    picks = rng.choice(len(pairs), 16, replace=False).tolist()
    distinct = {pairs[k] for k in picks[:10]}
    confirmed = {pairs[k]: pairs[k][1] for k in picks[10:]}  # keep the second of each
    _csv(tmp_path / "d.csv", [[f"p{a:03d}.jpg", f"p{b:03d}.jpg", "distinct", ""] for a, b in distinct]
         + [[f"p{a:03d}.jpg", f"p{b:03d}.jpg", "duplicate", f"p{k:03d}.jpg"] for (a, b), k in confirmed.items()])
    import_decisions(store, tmp_path / "d.csv")
    r = find_duplicates(store, threshold=t)
    listed = {(p.a_id - 100, p.b_id - 100) for p in r.pairs}
    assert listed == set(pairs) - distinct  # the oracle: the search's pairs but the distinct ones
    assert {(p.a_id - 100, p.b_id - 100) for p in r.pairs if p.decision == "duplicate"} == set(confirmed)
    assert all(r.decisions[x] == "duplicate" for x in r.decisions) and len(r.decisions) == len(confirmed)
    S, kept = xb @ xb.T, 0
    for g in r.groups:
        rows = sorted(_rows(r, g))
        for x, a in enumerate(rows):
            for b in rows[x + 1:]:
                assert (a, b) not in distinct  # never grouped through a distinct pair
                assert S[a, b] >= t - 1e-6 or (a, b) in confirmed
        named = {kk for (c, d), kk in confirmed.items() if {c, d} <= set(rows)}
        lost = {x for (c, d), kk in confirmed.items() if {c, d} <= set(rows) for x in (c, d) if x != kk}
        if named - lost:  # a keeper a person chose, that no decision in the group turned down, is kept
            assert g.keeper - 100 in named - lost and g.keeper_decided
            kept += 1
        for m in g.members:
            pair = tuple(sorted((m.id - 100, g.keeper - 100)))
            assert m.decision == ("duplicate" if pair in confirmed else None)
    assert kept >= 2
    new = find_duplicates(store, threshold=t, new_only=True)
    assert {(p.a_id - 100, p.b_id - 100) for p in new.pairs} == set(pairs) - distinct - set(confirmed)
    assert new.hidden_decided == len(confirmed) and new.decisions == {}
    for g in new.groups:  # a group listed holds an undecided pair
        rows = _rows(new, g)
        assert any(a in rows and b in rows for a, b in set(pairs) - distinct - set(confirmed))


# --------------------------------------------------------------------------------------------- the CLI

def test_cli_import_lists_bad_rows_and_records_nothing_then_export(store: Path, tmp_path: Path) -> None:
    p = _paths(store)
    rows = [[p[0], p[1], "distinct", ""]] + [[f"imgs/gone{k}.jpg", p[1], "distinct", ""] for k in range(30)]
    r = nd("review", "import", _csv(tmp_path / "bad.csv", rows), "--store", store)
    assert r.returncode == 2 and r.stdout == ""
    err = r.stderr.splitlines()
    assert "30 bad row(s); nothing was recorded" in err[0]
    assert err[1] == "  line 3: a: 'imgs/gone0.jpg' is not a photo of the store" and len(err) == 1 + 20 + 1
    assert err[-1] == "  ... and 10 more bad row(s)"
    assert not Journal.of(store).exists()
    r = nd("review", "import", _csv(tmp_path / "cols.csv", [[p[0], p[1], "x", "y"]], "a,b,decision,why"),
           "--store", store)
    assert r.returncode == 2 and "unknown: why" in r.stderr and len(r.stderr.splitlines()) == 1
    r = nd("review", "import", _csv(tmp_path / "good.csv", rows[:1] + [[p[2], p[3], "duplicate", p[3]]]),
           "--store", store)
    assert r.returncode == 0 and "2 decision(s) recorded" in r.stdout, r.stderr
    r = nd("review", "export", "--store", store, "--out", tmp_path / "out.csv")
    assert r.returncode == 0 and "wrote 2 decision(s)" in r.stdout, r.stderr
    got = {(frozenset((row["a"], row["b"])), row["decision"], row["keeper"])
           for row in csv.DictReader(open(tmp_path / "out.csv"))}
    assert got == {(frozenset(p[:2]), "distinct", ""), (frozenset(p[2:4]), "duplicate", p[3])}
    assert "bad row" in nd("review", "import", _csv(tmp_path / "k.csv", [[p[4], p[5], "duplicate", p[6]]]),
                           "--store", store).stderr
    r = nd("info", "--store", store)
    assert r.returncode == 0 and "2 pair(s) decided (2 decision(s) recorded)" in r.stdout
    r = nd("review", "import", _csv(tmp_path / "undo.csv", [[p[1], p[0], "undecided", ""]]), "--store", store)
    assert r.returncode == 0 and "1 decision(s) recorded" in r.stdout, r.stderr
    doc = json.loads(nd("info", "--store", store, "--json").stdout)
    assert (doc["decisions"]["pairs"], doc["decisions"]["records"], doc["decisions"]["problems"]) == (1, 3, [])
    with open(Journal.of(store).path, "ab") as fh:
        fh.write(b'0123 {"decisions": [')  # a torn last record
    r = nd("info", "--store", store, "--check")
    assert r.returncode == 1 and "torn last record (20 bytes)" in r.stdout
    r = nd("review", "export", "--store", store, "--out", tmp_path / "out.csv")
    assert r.returncode == 0 and "torn last record" in r.stderr


def test_cli_duplicates_new_only_lists_the_undecided_pairs(tmp_path: Path) -> None:
    angle = np.radians([0, 5, 40, 45, 80, 85])  # three pairs at cos 5° = 0.996
    store = _vector_store(tmp_path, np.array([[np.cos(x), np.sin(x)] for x in angle]))
    record_decision(store, "p000.jpg", "p001.jpg", "distinct", source="test")
    record_decision(store, "p002.jpg", "p003.jpg", "duplicate", keeper="p002.jpg", source="test")
    r = nd("duplicates", "--store", store, "--threshold", "0.99", "--out", tmp_path / "all.csv")
    assert r.returncode == 0, r.stderr
    assert "1 confirmed pair(s) marked, 1 pair(s) decided distinct not listed" in r.stdout
    got = [(row["a_path"], row["b_path"], row["decision"]) for row in csv.DictReader(open(tmp_path / "all.csv"))]
    assert sorted(got) == [("p002.jpg", "p003.jpg", "duplicate"), ("p004.jpg", "p005.jpg", "")]
    r = nd("duplicates", "--store", store, "--threshold", "0.99", "--new-only", "--out", tmp_path / "new.csv",
           "--groups", tmp_path / "new.json")
    assert r.returncode == 0, r.stderr
    got = [(row["a_path"], row["b_path"]) for row in csv.DictReader(open(tmp_path / "new.csv"))]
    assert got == [("p004.jpg", "p005.jpg")]
    doc = json.loads((tmp_path / "new.json").read_text())
    assert [[m["path"] for m in g["members"]] for g in doc["groups"]] == [["p005.jpg", "p004.jpg"]]


def test_query_and_the_service_say_which_matches_were_reviewed(tmp_path: Path) -> None:
    from neardup import answer
    from tests.test_serve import call, start_server, stop_server

    root = tmp_path / "photos"
    photos = write_product_photos(root, range(8))
    store = tmp_path / "catalog.h5"
    build_index([root], store, model="phash")
    q = photos[3]  # a photo of the catalogue, looked up again: its decisions with the others apply
    name = lambda k: f"photos/{photos[k].name}"  # noqa: E731
    proc, url = start_server(store)
    try:
        status, doc, _ = call(url, "v1/query?k=8", [("q.jpg", q.read_bytes())], token=None)
        assert status == 200 and all(m["decision"] is None for m in doc["results"][0]["matches"]), doc
        record_decision(store, name(3), name(5), "distinct", source="test")
        record_decision(store, name(6), name(3), "duplicate", keeper=name(6), source="test")
        record_decision(store, name(1), name(2), "duplicate", source="test")  # not about the query photo
        want = {name(5): ("distinct", None), name(6): ("duplicate", True)}
        status, doc, _ = call(url, "v1/query?k=8", [("q.jpg", q.read_bytes())], token=None)
        assert status == 200, doc
        got = {m["path"]: (m["decision"], m["keeper"]) for m in doc["results"][0]["matches"]}
        assert len(got) == 8 and got == {p: want.get(p, (None, None)) for p in got}
    finally:
        assert "Traceback" not in stop_server(proc)
    a = answer(store, [q], k=8)
    assert {m.path: (m.decision, m.keeper) for m in a.results[0].matches} == got
    record_decision(store, name(3), name(6), "duplicate", keeper=name(3), source="test")  # the query photo kept
    a = answer(store, [q], k=8)
    assert next(m for m in a.results[0].matches if m.path == name(6)).keeper is False
    r = nd("query", q, "--store", store, "-k", "8", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["results"][0]["matches"]
    assert {m["path"]: m["decision"] for m in rows if m["decision"]} == {name(5): "distinct", name(6): "duplicate"}
    r = nd("query", q, "--store", store, "-k", "8")
    # the match rows: rank, score, id, [verified, inliers,] path (from the current folder), marks
    lines = {"photos/" + next(w for w in ln.split() if "photos/" in w).rsplit("photos/", 1)[1]: ln
             for ln in r.stdout.splitlines() if ln.strip()[:1].isdigit()}
    assert lines[name(5)].endswith("[reviewed: distinct]") and lines[name(6)].endswith("[reviewed: duplicate]")
    assert sum("[reviewed" in ln for ln in lines.values()) == 2


def test_the_report_shows_the_decisions(tmp_path: Path) -> None:
    from neardup import write_report
    from tests.test_report import data_island

    angle = np.radians([0, 5, 40, 45, 80, 85])  # three pairs at cos 5° = 0.996
    store = _vector_store(tmp_path, np.array([[np.cos(x), np.sin(x)] for x in angle]))
    record_decision(store, "p002.jpg", "p003.jpg", "duplicate", keeper="p002.jpg", source="test")
    write_pairs_csv(find_duplicates(store, threshold=0.99), tmp_path / "pairs.csv")  # all three, before:
    record_decision(store, "p000.jpg", "p001.jpg", "distinct", source="test")
    write_report(store, tmp_path / "r.html", threshold=0.99)
    data = data_island((tmp_path / "r.html").read_text())
    paths = [im["p"] for im in data["images"]]
    pairs = {(paths[p[0]], paths[p[1]]): p[6] for p in data["pairs"]}
    assert pairs == {("p002.jpg", "p003.jpg"): 1, ("p004.jpg", "p005.jpg"): 0}  # the distinct pair: not listed
    groups = {tuple(paths[m["i"]] for m in g["m"]): (g["d"], [m["dc"] for m in g["m"]]) for g in data["groups"]}
    assert groups == {("p002.jpg", "p003.jpg"): (1, [0, 1]), ("p005.jpg", "p004.jpg"): (0, [0, 0])}
    assert "1 pair(s) shown confirmed duplicate, 0 decided distinct, 1 group keeper(s) chosen" in \
        (tmp_path / "r.html").read_text()
    write_report(store, tmp_path / "f.html", pairs=tmp_path / "pairs.csv")  # a file from before the decision
    data = data_island((tmp_path / "f.html").read_text())
    paths = [im["p"] for im in data["images"]]
    assert {(paths[p[0]], paths[p[1]]): p[6] for p in data["pairs"]} == {
        ("p000.jpg", "p001.jpg"): 2, ("p002.jpg", "p003.jpg"): 1, ("p004.jpg", "p005.jpg"): 0}


class GateEmbedder(FakeEmbedder):
    """A FakeEmbedder that says it started (the file `gate` + ".started") and embeds nothing until the file
    `gate` exists: an update held open for as long as a test needs (it waits for the event, never for a time)."""

    def __init__(self, gate: str) -> None:
        super().__init__()
        self.gate = gate

    def embed(self, batch: np.ndarray) -> np.ndarray:
        Path(self.gate + ".started").touch()
        deadline = time.monotonic() + 240
        while not os.path.exists(self.gate) and time.monotonic() < deadline:
            time.sleep(0.05)
        return super().embed(batch)


def _update(root: str, store: str, gate: str) -> None:
    update_index([root], store, embedder=GateEmbedder(gate))


def _record(store: str, pairs: list[tuple[str, str]]) -> None:
    for a, b in pairs:  # one decision at a time, as the review page saves them
        record_decision(store, a, b, "distinct", source="page")


def test_concurrent_decisions_during_an_update_are_all_kept(store: Path, tmp_path: Path) -> None:
    from itertools import combinations

    from neardup.errors import StoreLockedError
    from neardup.store.lock import writer_lock

    p, root, gate = _paths(store), tmp_path / "imgs", tmp_path / "gate"
    write_product_photos(root, range(100, 104), size=(96, 96))  # something for the update to embed
    ctx = mp.get_context("spawn")
    upd = ctx.Process(target=_update, args=(str(root), str(store), str(gate)))
    upd.start()
    deadline = time.monotonic() + 240
    while not Path(str(gate) + ".started").exists():  # wait for the event: the update is embedding
        assert upd.is_alive() and time.monotonic() < deadline, "the update never started embedding"
        time.sleep(0.05)
    with pytest.raises(StoreLockedError):  # and it holds the store's writer lock (probed only now: a probe
        with writer_lock(StoreFiles.resolved(store)):  # before it took the lock could have refused it)
            pass
    pairs = list(combinations(p, 2))[:20]
    files = [_csv(tmp_path / f"in{k}.csv", [[a, b, "duplicate", a] for a, b in pairs[4 * k:4 * k + 4]])
             for k in range(3)]
    imports = [subprocess.Popen([sys.executable, "-m", "neardup", "review", "import", f, "--store", store],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for f in files]
    pages = [ctx.Process(target=_record, args=(str(store), pairs[12 + 4 * k:16 + 4 * k])) for k in range(2)]
    for q in pages:
        q.start()
    for q in pages:
        q.join(timeout=240)
        assert q.exitcode == 0
    for proc in imports:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0 and "4 decision(s) recorded" in out, err
    assert upd.is_alive()  # every decision was recorded while the update held the store
    gate.touch()
    upd.join(timeout=240)
    assert upd.exitcode == 0
    state = decisions_for(store)
    assert state.problems == [] and len(state.history) == 20
    with Store.open(store) as gen:
        sha = dict(zip(gen.catalog.paths, gen.catalog.sha256))
        assert len(gen) == 9 + 4  # the update published
    assert {k: d.decision for k, d in state.current.items()} == {
        pair_key(sha[a], sha[b]): "duplicate" if k < 12 else "distinct" for k, (a, b) in enumerate(pairs)}


def test_verified_groups_never_join_through_a_distinct_pair(tmp_path: Path) -> None:
    from tests.test_verify import edited

    photos = write_product_photos(tmp_path / "cat", range(6), size=(400, 400))
    edited(photos[0], tmp_path / "cat" / "copy_a.jpg")
    edited(photos[0], tmp_path / "cat" / "copy_b.jpg", crop=0.03, scale=0.8, quality=80)
    store = tmp_path / "s.h5"
    build_index([tmp_path / "cat"], store, embedder=FakeEmbedder())
    three = {f"cat/{photos[0].name}", "cat/copy_a.jpg", "cat/copy_b.jpg"}
    plain = find_duplicates(store, verify=True, k=5, loose_threshold=0.0)
    assert [{m.path for m in g.members} for g in plain.groups] == [three]
    record_decision(store, "cat/copy_a.jpg", "cat/copy_b.jpg", "distinct", source="test")
    r = find_duplicates(store, verify=True, k=5, loose_threshold=0.0)
    assert {frozenset((p.a_path, p.b_path)) for p in r.pairs if p.verified} == {
        frozenset((f"cat/{photos[0].name}", "cat/copy_a.jpg")), frozenset((f"cat/{photos[0].name}", "cat/copy_b.jpg"))}
    grouped = [{m.path for m in g.members} for g in r.groups]
    assert len(grouped) == 1 and len(grouped[0]) == 2 and grouped[0] < three  # one copy is left out
