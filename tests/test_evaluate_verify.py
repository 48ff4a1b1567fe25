"""evaluate() with the truth's class and role columns and with geometric verification: hand-computed oracles,
synthetic photos with edited copies, query photos embedded by a fake model, and the real grocery photos."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neardup import build_index
from neardup.config import model_spec, stored_model_spec
from neardup.errors import InputError
from neardup.search.evaluate import evaluate
from neardup.search.join import exact_pairs, self_join
from neardup.search.metrics import DEFAULT_SWEEP, _reranked, _topk, pair_metrics, retrieval_metrics_blocked
from neardup.search.truth import read_truth, read_truth_rows
from neardup.search.verify import Verified
from neardup.store import Catalog, ModelInfo, StoreMeta, read_catalog, write_catalog
from neardup.testing import FakeEmbedder, write_product_photos


def write_truth(path: Path, header: list[str], rows: list[tuple[str, ...]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


# ---------------------------------------------------------------------------------- class column: hand store

E = np.eye(8, dtype=np.float32)
HAND = {  # path: (vector, group, class); cosines of interest noted
    "a1.jpg": (E[0], "A", "X"),
    "a2.jpg": (0.96 * E[0] + 0.28 * E[1], "A", "X"),  # a1 .96
    "b1.jpg": (0.8 * E[0] + 0.6 * E[2], "B", "X"),  # a1 .80, a2 .768 (junk: other group, class X)
    "b2.jpg": (E[2], "B", "X"),  # b1 .60; a1, a2 0
    "c1.jpg": (0.7 * E[0] + np.sqrt(0.51) * E[3], "C", "Y"),  # a1 .70, a2 .672, b1 .56: false pairs (class Y)
    "s1.jpg": (0.75 * E[0] + np.sqrt(1 - 0.75 ** 2) * E[4], "", "X"),  # no group, class X: a1 .75, a2 .72,
    #                                                                     b1 .60 junk; c1 .525 false
}
T = [0.5, 0.65, 0.74, 0.9]


@pytest.fixture
def hand(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A store of HAND (no image files, no local features) and its truth with and without the class column."""
    paths = list(HAND)
    n = len(paths)
    xb = np.stack([v for v, _, _ in HAND.values()]).astype(np.float32)
    meta = StoreMeta(ModelInfo("fake", "none", "none", dim=8, input_size=16, preprocessing="hand-made"), next_id=n)
    store = tmp_path / "cat.h5"
    write_catalog(store, Catalog(meta, np.arange(n), paths, np.full(n, 1000), np.zeros(n, np.int64),
                                 [f"{k:064x}" for k in range(n)], np.full(n, 64, np.int32),
                                 np.full(n, 64, np.int32), xb))
    with_class = write_truth(tmp_path / "class.csv", ["path", "group", "class"],
                             [(p, g, c) for p, (_, g, c) in HAND.items()])
    without = write_truth(tmp_path / "plain.csv", ["path", "group"], [(p, g) for p, (_, g, _) in HAND.items()])
    return store, with_class, without


def test_class_pairs_are_neither_right_nor_wrong(hand: tuple[Path, Path, Path]) -> None:
    store, with_class, without = hand
    plain = evaluate(store, without, thresholds=T)
    res = evaluate(store, with_class, thresholds=T)
    assert not plain.verify and not res.verify  # a store without local features: not verified by default
    assert (plain.mode, res.mode) == ("store", "store") and plain.true_pairs == res.true_pairs == 2
    # class X holds a1 a2 b1 b2 s1: C(5,2) = 10 pairs, of which a1a2 and b1b2 are true: 8 ignored
    assert plain.ignored_pairs == 0 and res.ignored_pairs == 8
    # candidates >= 0.5: a1a2 b1b2 (true), a1b1 a2b1 s1a1 s1a2 s1b1 (ignored), c1a1 c1a2 c1b1 s1c1 (false)
    assert plain.candidate_pairs == 11 and res.candidate_pairs == 6 and res.ignored_candidates == 5
    sw, sp = res.sweep, plain.sweep
    assert sw["thresholds"] == sp["thresholds"] == pytest.approx([0.5, 0.65, 0.74, 0.9])
    assert sp["predicted"] == [11, 7, 4, 1] and sp["tp"] == [2, 1, 1, 1]
    assert sw["predicted"] == [6, 3, 1, 1] and sw["tp"] == [2, 1, 1, 1] and sw["fn"] == sp["fn"] == [0, 1, 1, 1]
    assert sp["precision"] == pytest.approx([2 / 11, 1 / 7, 1 / 4, 1])
    assert sw["precision"] == pytest.approx([2 / 6, 1 / 3, 1, 1])  # higher: the ignored pairs are not FP
    assert sw["recall"] == sp["recall"]
    # queries a1 a2 b1 b2. b1 without classes: a1 .8, a2 .768, then b2 tied with s1 at .6 (pessimistic) -> rank 4;
    # with classes a1, a2 and s1 are junk, left out of b1's ranking: b2 .6 beats c1 .56 -> rank 1
    assert plain.retrieval["recall@1"] == pytest.approx(3 / 4) and plain.retrieval["map"] == pytest.approx(3.25 / 4)
    assert res.retrieval == {"queries": 4, "recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "map": 1.0}
    assert "8 pairs of different groups and one class are ignored (5 of them were candidates)" in res.table()
    doc = res.to_dict()
    assert doc["ignored_pairs"] == 8 and doc["mode"] == "store" and "ignored_pair" in doc["definitions"]


def test_empty_classes_change_nothing(hand: tuple[Path, Path, Path], tmp_path: Path) -> None:
    store, _, without = hand
    empty = write_truth(tmp_path / "empty.csv", ["path", "group", "class", "role"],
                        [(p, g, "", "") for p, (_, g, _) in HAND.items()])
    a, b = evaluate(store, without, thresholds=T), evaluate(store, empty, thresholds=T)
    assert (a.sweep, a.retrieval, a.candidate_pairs, b.ignored_pairs) == (b.sweep, b.retrieval, b.candidate_pairs, 0)


def test_truth_columns_are_read_and_checked(tmp_path: Path) -> None:
    t = write_truth(tmp_path / "t.csv", ["path", "group", "class", "role"],
                    [("a.jpg", "g", "milk", ""), ("q/b.jpg", "g", "milk", "Query")])
    rows = read_truth_rows(t)
    assert [(r.written, r.group, r.cls, r.role) for r in rows] == [("a.jpg", "g", "milk", ""),
                                                                    ("q/b.jpg", "g", "milk", "query")]
    assert read_truth(t)[1] == ("q/b.jpg", (tmp_path / "q" / "b.jpg").resolve(), "g")  # the old 3-tuples
    write_truth(t, ["path", "group", "role"], [("a.jpg", "g", "probe")])
    with pytest.raises(InputError, match="role must be empty or 'query'"):
        read_truth_rows(t)
    write_truth(t, ["path", "group", "class"], [("a.jpg", "g", "milk"), ("a.jpg", "g", "juice")])
    with pytest.raises(InputError, match="twice with another class or role"):
        read_truth_rows(t)


# ------------------------------------------------------------------------------------- pure verified ranking

def _verdicts(verified: list[bool], inliers: list[int]) -> Verified:
    m = len(verified)
    return Verified(np.array(verified), np.array(inliers, np.int32), np.zeros(m, np.float32),
                    np.zeros(m, np.float32), np.zeros(m, np.float32))


def test_topk_and_reranked_scores() -> None:
    row = np.array([0.5, -np.inf, 0.9, 0.5, 0.7, 0.5], np.float32)
    assert _topk(row, 3).tolist() == [2, 4, 0]  # equal scores: the lower column first
    assert _topk(row, 9).tolist() == [2, 4, 0, 3, 5]  # -inf (the query itself, junk) never
    D = np.array([0.9, 0.8, 0.8 + 2e-7, 0.6], np.float32)
    s = _reranked(D, _verdicts([False, False, False, True], [3, 0, 0, 40]))
    # rerank: the verified one first, then by shared inliers, then by cosine; 2 and 1 differ by 2e-7 (< TIE_TOL)
    # and only their cosines order them: equal scores, so the ranking breaks their tie pessimistically. All
    # above any cosine.
    assert s.tolist() == [2.75, 2.5, 2.5, 3.0]


def test_reranked_ties_only_where_the_cosine_decides() -> None:
    D = np.array([0.8, 0.8 + 2e-7, 0.5], np.float32)
    tied = _reranked(D, _verdicts([False, False, False], [0, 0, 0]))
    assert tied[0] == tied[1] > tied[2] > 2  # the cosine alone orders 0 and 1: a tie, pessimistic later
    apart = _reranked(D, _verdicts([True, False, False], [30, 0, 0]))
    assert apart[0] > apart[1] > apart[2] > 2  # the verdict orders them: no tie


# ------------------------------------------------------------------------------ role=query with a fake model

def test_query_rows_are_embedded_and_ranked_against_the_catalogue(tmp_path: Path) -> None:
    imgs = write_product_photos(tmp_path / "cat", range(8))
    store = tmp_path / "cat.h5"
    build_index([tmp_path / "cat"], store, embedder=FakeEmbedder())
    qdir = tmp_path / "queries"
    qdir.mkdir()
    for i in (0, 1, 2):  # exact re-encodes: decoded and saved again
        Image.open(imgs[i]).save(qdir / f"q{i}.jpg", "JPEG", quality=85)
    Image.open(imgs[5]).resize((240, 240), Image.LANCZOS).save(qdir / "q5.png")  # resized, another format
    shutil.copy(imgs[6], qdir / "same6.jpg")  # byte-identical to a catalogue image
    (qdir / "broken.jpg").write_text("not an image")
    rows = [(f"cat/img_{i:04d}.jpg", f"g{i}" if i not in (3, 4) else "g34", "", "") for i in range(8)]
    rows += [(f"queries/q{i}.jpg", f"g{i}", "", "query") for i in (0, 1, 2)]
    rows += [("queries/q5.png", "g5", "", "query"), ("queries/same6.jpg", "g6", "", "query"),
             ("queries/broken.jpg", "g7", "", "query"), ("queries/gone.jpg", "g7", "", "query")]
    truth = write_truth(tmp_path / "truth.csv", ["path", "group", "class", "role"], rows)
    for verify in (False, True):
        res = evaluate(store, truth, embedder=FakeEmbedder(), verify=verify)
        assert res.mode == "query" and res.verify is verify and res.k == stored_model_spec("fake").candidates
        assert res.query_images == 7 and res.evaluated == 8  # catalogue rows only
        failed = dict(res.queries_failed)
        assert set(failed) == {"queries/broken.jpg", "queries/gone.jpg"} and all(failed.values())
        # five decoded queries, one catalogue mate each; g34 (two catalogue rows) is not scored in query mode
        assert res.true_pairs == 5 and res.retrieval["queries"] == 5
        assert res.retrieval["recall@1"] == 1.0 and res.retrieval["map"] == 1.0
        assert res.at_default["recall"] == 1.0
        if verify:
            assert res.at_default["precision"] == 1.0 and res.sweep["precision"][0] == 1.0
            assert res.verified_candidates >= 4  # q0 q1 q2 q5 (same6 is byte-identical: verified by its bytes)
        k1 = res.sweep["thresholds"].index(1.0)
        assert res.sweep["tp"][k1] >= 1  # the byte-identical query counts at 1.0
        text = res.table()
        assert "query mode: 7 query photos" in text and "2 failed to decode" in text
        assert "queries/broken.jpg" in text and "query mode" in str(res)
    with pytest.raises(InputError, match="none of the 2 query photos"):
        evaluate(store, write_truth(tmp_path / "bad.csv", ["path", "group", "role"],
                                    [("cat/img_0000.jpg", "g0", ""), ("queries/broken.jpg", "g0", "query"),
                                     ("queries/gone.jpg", "g0", "query")]), embedder=FakeEmbedder())


def test_query_mode_class_junk(tmp_path: Path) -> None:
    imgs = write_product_photos(tmp_path / "cat", range(6))
    store = tmp_path / "cat.h5"
    build_index([tmp_path / "cat"], store, embedder=FakeEmbedder())
    (tmp_path / "q").mkdir()
    Image.open(imgs[0]).save(tmp_path / "q" / "q0.jpg", "JPEG", quality=85)
    # the query's class "milk" is shared by img_0001 and img_0002 (other groups): 2 ignored pairs, and they are
    # left out of its ranking; img_0003 is milk too but of the query's own group (a true pair)
    rows = [("cat/img_0000.jpg", "g0", "milk", ""), ("cat/img_0001.jpg", "g1", "milk", ""),
            ("cat/img_0002.jpg", "", "milk", ""), ("cat/img_0003.jpg", "g0", "milk", ""),
            ("cat/img_0004.jpg", "", "juice", ""), ("cat/img_0005.jpg", "", "", ""),
            ("q/q0.jpg", "g0", "milk", "query")]
    truth = write_truth(tmp_path / "t.csv", ["path", "group", "class", "role"], rows)
    res = evaluate(store, truth, embedder=FakeEmbedder(), verify=False, k=5)
    assert res.true_pairs == 2 and res.ignored_pairs == 2 and res.k == 5
    assert res.candidate_pairs + res.ignored_candidates <= 5  # its top 5, those >= 0.5
    assert res.retrieval["queries"] == 1


# --------------------------------------------------------------------- verification: synthetic edited copies

def edited_copies(tmp_path: Path, n: int = 16, copies: int = 4) -> tuple[Path, Path]:
    imgs = write_product_photos(tmp_path / "imgs", range(n))
    ed = tmp_path / "imgs" / "edits"
    ed.mkdir()
    for i in range(copies):  # crop a few %, resize, JPEG re-save
        with Image.open(imgs[i]) as im:
            w, h = im.size
            c = im.crop((round(0.03 * w), round(0.02 * h), w - round(0.04 * w), h - round(0.03 * h)))
            c.resize((240, 236), Image.LANCZOS).save(ed / f"edit_{i}.jpg", "JPEG", quality=70)
    rows = [(f"imgs/img_{i:04d}.jpg", f"g{i}" if i < copies else "") for i in range(n)]
    rows += [(f"imgs/edits/edit_{i}.jpg", f"g{i}") for i in range(copies)]
    truth = write_truth(tmp_path / "truth.csv", ["path", "group"], rows)
    return truth, tmp_path / "imgs"


def test_verify_finds_the_edited_copies_and_nothing_else(tmp_path: Path) -> None:
    truth, root = edited_copies(tmp_path)
    store = tmp_path / "cat.h5"
    build_index([root], store, embedder=FakeEmbedder())
    res = evaluate(store, truth)  # a new store caches local features: verified by default
    assert res.verify and res.mode == "store" and res.k == stored_model_spec("fake").candidates == 10
    loose = stored_model_spec("fake").loose_threshold
    at = res.sweep["thresholds"].index(loose)
    assert res.true_pairs == 4 and res.sweep["tp"][at] == 4 and res.sweep["fp"][at] == 0  # recall 1, precision 1
    assert res.verified_candidates == 4 and res.candidate_pairs > 4  # unrelated candidates were not verified
    assert res.retrieval["recall@1"] == 1.0 and res.retrieval["map"] == 1.0
    assert "verified pairs" in res.table() and "(verified)" in str(res)
    assert res.to_dict()["verify"] is True


def test_no_verify_is_the_old_evaluation(tmp_path: Path) -> None:
    truth, root = edited_copies(tmp_path)
    store = tmp_path / "cat.h5"
    build_index([root], store, embedder=FakeEmbedder())
    res = evaluate(store, truth, verify=False)
    assert not res.verify and res.ignored_pairs == 0 and res.mode == "store"
    # the old definition, from the pure cores: all pairs >= 0.5 by the self-join, byte-identical files at 1.0
    cat = read_catalog(store)
    row = {p: r for r, p in enumerate(cat.paths)}
    rows = list(csv.DictReader(open(truth, encoding="utf-8")))
    ev = np.array([row[r["path"]] for r in rows])
    groups = [r["group"] or f"single{k}" for k, r in enumerate(rows)]
    labels = np.unique(groups, return_inverse=True)[1]
    xe = cat.xb[ev]
    sweep = np.unique(np.round(np.array(list(DEFAULT_SWEEP) + [0.9]), 6))
    I, J, D = self_join(xe, 0.5)
    ei, ej = exact_pairs([cat.sha256[r] for r in ev])
    assert len(ei) == 0
    m = pair_metrics(D, labels[I] == labels[J], 4, sweep)
    assert res.candidate_pairs == len(D) > 4 and res.sweep == {k: v.tolist() for k, v in m.items()}
    assert res.retrieval == retrieval_metrics_blocked(xe, labels)
    # and verification changes only what it should: same truth, same true pairs, fewer false positives
    ver = evaluate(store, truth, verify=True)
    assert ver.true_pairs == res.true_pairs and sum(ver.sweep["fp"]) < sum(res.sweep["fp"])


# ------------------------------------------------------------------------------------ real photos: grocery

def test_grocery_copies_verified_beat_the_threshold(tmp_path: Path) -> None:
    from neardup.testing.grocery import grocery_root, make_copies_set

    try:
        grocery_root()
    except InputError as e:
        pytest.skip(f"real-photo test skipped: {e}")
    truth = make_copies_set(tmp_path, n_originals=20, n_distractors=20, seed=3)
    paths = [r["path"] for r in csv.DictReader(open(truth, encoding="utf-8"))]
    store = tmp_path / "cat.h5"
    build_index(paths, store, model="phash")
    k, loose = model_spec("phash").candidates, model_spec("phash").loose_threshold
    sweep = [loose, *DEFAULT_SWEEP]
    ver = evaluate(store, truth, verify=True, thresholds=sweep)
    plain = evaluate(store, truth, verify=False, thresholds=sweep)
    assert ver.verify and ver.k == k and ver.true_pairs == plain.true_pairs == 20
    assert ver.ignored_pairs == plain.ignored_pairs > 0  # distractors of an original's product: class junk
    at = ver.sweep["thresholds"].index(loose)
    assert ver.sweep["recall"][at] >= plain.at_default["recall"]
    assert ver.sweep["precision"][at] == 1.0 and ver.at_default["precision"] == 1.0
    assert ver.retrieval["recall@1"] >= plain.retrieval["recall@1"]
