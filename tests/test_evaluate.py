"""Evaluation against hand-made truths with known answers: the pure cores, evaluate() end to end, and the CLI."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from neardup.cli import app
from neardup.embed.embedders import l2_normalize
from neardup.errors import InputError
from neardup.indexer.build import build_index
from neardup.search.evaluate import (
    TIE_TOL,
    best_index,
    evaluate,
    pair_metrics,
    read_truth,
    retrieval_metrics,
    retrieval_metrics_blocked,
    write_eval_json,
)
from neardup.search.plots import plot_pr_curve
from neardup.store import Catalog, ModelInfo, StoreMeta, write_catalog

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result) -> bool:
    return (result.exit_code == 2 and result.output.strip().startswith("neardup: error:")
            and result.output.count("\n") == 1 and "Traceback" not in result.output)


# ------------------------------------------------------------------------------------------ pure: pair level

def test_pair_metrics_hand_case() -> None:
    # 5 candidate pairs; 4 true pairs exist in all (one is never a candidate).
    scores = np.array([0.95, 0.9, 0.8, 0.7, 0.6], np.float32)
    is_true = np.array([1, 0, 1, 1, 0], bool)
    m = pair_metrics(scores, is_true, 4, [0.55, 0.65, 0.75, 0.8, 0.85, 1.0])
    assert m["predicted"].tolist() == [5, 4, 3, 3, 2, 0]  # 0.8 itself counts at t = 0.8 (>=)
    assert m["tp"].tolist() == [3, 3, 2, 2, 1, 0]
    assert m["fp"].tolist() == [2, 1, 1, 1, 1, 0]
    assert m["fn"].tolist() == [1, 1, 2, 2, 3, 4]
    assert m["precision"] == pytest.approx([3 / 5, 3 / 4, 2 / 3, 2 / 3, 1 / 2, 1.0])  # nothing predicted: 1.0
    assert m["recall"] == pytest.approx([3 / 4, 3 / 4, 1 / 2, 1 / 2, 1 / 4, 0.0])
    assert m["f1"] == pytest.approx([2 / 3, 3 / 4, 4 / 7, 4 / 7, 1 / 3, 0.0])
    assert best_index(m["f1"], m["thresholds"]) == 1


def test_pair_metrics_edge_cases_and_ties() -> None:
    # without true pairs, recall and F1 are undefined (NaN), never a perfect 1.0
    m = pair_metrics(np.zeros(0, np.float32), np.zeros(0, bool), 0, [0.5, 0.9])
    assert m["precision"].tolist() == [1.0, 1.0] and np.isnan(m["recall"]).all() and np.isnan(m["f1"]).all()
    m = pair_metrics(np.array([0.9], np.float32), np.array([False]), 0, [0.5])
    assert m["precision"][0] == 0 and np.isnan(m["recall"][0]) and np.isnan(m["f1"][0])
    m = pair_metrics(np.array([0.9, 0.4], np.float32), np.array([True, False]), 2, [0.5])
    assert (m["precision"][0], m["recall"][0]) == (1.0, 0.5) and abs(m["f1"][0] - 2 / 3) < 1e-12
    # equal F1 at several thresholds: the highest one (most conservative) wins
    assert best_index(np.array([0.5, 0.8, 0.8, 0.2]), np.array([0.6, 0.7, 0.8, 0.9])) == 2
    with pytest.raises(ValueError):
        pair_metrics(np.zeros(2, np.float32), np.zeros(3, bool), 1, [0.5])


def test_pair_metrics_equals_brute_force() -> None:
    rng = np.random.default_rng(3)
    scores = rng.choice(np.linspace(0.5, 1.0, 21), 400).astype(np.float32)  # many exact ties
    truth = rng.random(400) < 0.4
    thresholds = np.round(np.arange(0.5, 1.001, 0.01), 2)
    m = pair_metrics(scores, truth, 250, thresholds)
    for k, t in enumerate(thresholds):
        pred = scores >= np.float32(t)
        tp = int((pred & truth).sum())
        assert m["predicted"][k] == pred.sum() and m["tp"][k] == tp
        p = tp / pred.sum() if pred.sum() else 1.0
        r = tp / 250
        assert m["f1"][k] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)


# ------------------------------------------------------------------------------------------- pure: retrieval

def test_retrieval_metrics_hand_case() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])  # item 5 is alone: never a query, always a distractor
    up = {(0, 1): .9, (0, 2): .5, (0, 3): .8, (0, 4): .1, (0, 5): .6, (1, 2): .4, (1, 3): .3, (1, 4): .2,
          (1, 5): .95, (2, 3): .1, (2, 4): .2, (2, 5): .3, (3, 4): .7, (3, 5): .2, (4, 5): .5}
    S = np.eye(6)
    for (i, j), s in up.items():
        S[i, j] = S[j, i] = s
    r = retrieval_metrics(S, labels, ks=(1, 2, 5))
    # q0: 1+ 3 5 2+ 4 -> AP (1/1 + 2/4)/2 = 3/4, hit@1 | q1: 5 0+ 2+ -> AP (1/2 + 2/3)/2 = 7/12, first at 2
    # q2: 0+ 1+ -> 1 | q3: 0 4+ -> 1/2, first at 2 | q4: 3+ -> 1
    assert r["queries"] == 5
    assert r["recall@1"] == pytest.approx(3 / 5) and r["recall@2"] == 1.0 and r["recall@5"] == 1.0
    assert r["map"] == pytest.approx((3 / 4 + 7 / 12 + 1 + 1 / 2 + 1) / 5)  # 23/30


def test_retrieval_ties_are_pessimistic_and_no_queries() -> None:
    S = np.full((4, 4), 0.5)
    r = retrieval_metrics(S, np.array([0, 0, 1, 2]), ks=(1, 3))
    # every score ties: each of the two queries finds its mate after both negatives, at rank 3
    assert r["queries"] == 2 and r["recall@1"] == 0.0 and r["recall@3"] == 1.0 and r["map"] == pytest.approx(1 / 3)
    r = retrieval_metrics(S, np.array([0, 1, 2, 3]))
    assert r == {"queries": 0, "recall@1": None, "recall@5": None, "recall@10": None, "map": None}


def _reference(S: np.ndarray, labels: np.ndarray, ks: tuple[int, ...]) -> dict:
    """Definition, spelled out: the n-th best positive (1-based) ranks at n + the negatives scoring within
    TIE_TOL of it or above (pessimistic ties); read recall@k and AP off those ranks."""
    hits, aps = np.zeros(len(ks)), []
    for q in range(len(S)):
        others = [j for j in range(len(S)) if j != q]
        pos = sorted((S[q, j] for j in others if labels[j] == labels[q]), reverse=True)
        if not pos:
            continue
        neg = [S[q, j] for j in others if labels[j] != labels[q]]
        ranks = [n + 1 + sum(1 for s in neg if s >= p - TIE_TOL) for n, p in enumerate(pos)]
        aps.append(np.mean([(n + 1) / rk for n, rk in enumerate(ranks)]))
        hits += [ranks[0] <= k for k in ks]
    return {"queries": len(aps), **{f"recall@{k}": h / len(aps) for k, h in zip(ks, hits)}, "map": np.mean(aps)}


def test_retrieval_ties_tolerate_rounding() -> None:
    # q0's mate scores 5e-7 above a negative: float32 rounding, a tie (pessimistic); 5e-6 above is a real lead
    for gap, first_at in ((5e-7, 2), (5e-6, 1)):
        S = np.array([[1, 0.5 + gap, 0.5], [0.5 + gap, 1, 0.1], [0.5, 0.1, 1]], np.float32)
        r = retrieval_metrics(S, np.array([0, 0, 1]), ks=(1,))
        assert r["recall@1"] == (0.5 if first_at == 2 else 1.0), (gap, r)


@pytest.mark.parametrize("block", [1, 5, None])
def test_retrieval_blocked_equals_full_and_reference(block: int | None) -> None:
    rng = np.random.default_rng(7)
    # coarse vectors so that many scores tie (up to rounding: ~3,000 pairs of equal cosines differ by <= 1e-6
    # in float32, differently per code path and CPU); group sizes 1..40 (the sorted path for > 32 positives)
    xb = l2_normalize(rng.integers(-1, 2, (120, 6)).astype(np.float32) + 0.01)
    labels = np.concatenate([np.zeros(40, int), rng.integers(1, 30, 80)])
    ks = (1, 5, 10)
    full = retrieval_metrics(xb @ xb.T, labels, ks)
    blocked = retrieval_metrics_blocked(xb, labels, ks, block)
    # the reference in float64: the metrics must agree with it whichever float32 kernel computed the scores
    ref = _reference(xb.astype(np.float64) @ xb.T.astype(np.float64), labels, ks)
    for key in ref:
        assert full[key] == pytest.approx(ref[key]) and blocked[key] == pytest.approx(ref[key])


# --------------------------------------------------------------------------------- evaluate() on a hand store

E = np.eye(8, dtype=np.float32)
HAND = {  # path: (vector, group or None when not in the truth); cosines noted where they are not 0
    "imgs/a1.jpg": (E[0], "A"),
    "imgs/a2.jpg": (0.96 * E[0] + 0.28 * E[1], "A"),  # a1: .96
    "imgs/b1.jpg": (E[2], "B"),
    "imgs/b2.jpg": (0.92 * E[2] + np.sqrt(1 - 0.92 ** 2) * E[3], "B"),  # b1: .92
    "imgs/b3.jpg": (0.7 * E[2] + np.sqrt(0.51) * E[4], "B"),  # b1: .70, b2: .644
    "imgs/c1.jpg": (0.8 * E[0] + 0.6 * E[5], ""),  # alone; a1: .80, a2: .768 (false pairs)
    "imgs/d1.jpg": (E[6], "D"),
    "imgs/d2.jpg": (E[7], "D"),  # cosine 0 to d1, but byte-identical to it (same sha256)
    "imgs/x.jpg": (E[0], None),  # a1's twin, not in the truth: ignored
}


@pytest.fixture
def hand_store(tmp_path: Path) -> tuple[Path, Path]:
    paths = list(HAND)
    xb = np.stack([v for v, _ in HAND.values()]).astype(np.float32)
    n = len(paths)
    sha = [f"{k:064x}" for k in range(n)]
    sha[paths.index("imgs/d2.jpg")] = sha[paths.index("imgs/d1.jpg")]
    meta = StoreMeta(ModelInfo("fake", "none", "none", dim=8, input_size=16, preprocessing="hand-made"), next_id=n)
    store = tmp_path / "cat.h5"
    write_catalog(store, Catalog(meta, np.arange(n), paths, np.full(n, 1000), np.zeros(n, np.int64), sha,
                                 np.full(n, 64, np.int32), np.full(n, 64, np.int32), xb))
    (tmp_path / "truth").mkdir()
    truth = tmp_path / "truth" / "truth.csv"
    with open(truth, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "group"])
        for p, (_, g) in HAND.items():
            if g is not None:  # relative to the truth file's folder; one absolute path
                w.writerow([str(tmp_path / p) if p.endswith("b3.jpg") else f"../{p}", g])
        w.writerow(["../imgs/gone.jpg", "A"])  # not in the store
    return store, truth


def test_evaluate_hand_store_exact_numbers(hand_store: tuple[Path, Path]) -> None:
    store, truth = hand_store
    res = evaluate(store, truth, thresholds=[0.6, 0.75, 0.85, 0.95, 0.99])
    assert (res.images_in_store, res.images_in_truth, res.evaluated) == (9, 9, 8)
    assert res.truth_missing_from_store == 1 and res.missing_examples == ["../imgs/gone.jpg"]
    assert res.store_missing_from_truth == 1 and res.unlabelled_examples == ["imgs/x.jpg"]
    # true pairs: a1a2, b1b2, b1b3, b2b3, d1d2. Candidates >= 0.6: those 5 (d1d2 as exact, 1.0) + a1c1, a2c1
    assert res.true_pairs == 5 and res.candidate_pairs == 7
    sw = res.sweep
    assert sw["thresholds"] == pytest.approx([0.6, 0.75, 0.85, 0.9, 0.95, 0.99])  # 0.90 = default of "fake"
    assert sw["predicted"] == [7, 5, 3, 3, 2, 1] and sw["tp"] == [5, 3, 3, 3, 2, 1]
    assert sw["precision"] == pytest.approx([5 / 7, 3 / 5, 1, 1, 1, 1])
    assert sw["recall"] == pytest.approx([1, 3 / 5, 3 / 5, 3 / 5, 2 / 5, 1 / 5])
    assert sw["f1"] == pytest.approx([5 / 6, 3 / 5, 3 / 4, 3 / 4, 4 / 7, 1 / 3])
    assert res.best == pytest.approx({"threshold": 0.6, "precision": 5 / 7, "recall": 1.0, "f1": 5 / 6})
    assert res.default_threshold == 0.9
    assert res.at_default == pytest.approx({"threshold": 0.9, "precision": 1.0, "recall": 0.6, "f1": 0.75})
    # queries a1 a2 b1 b2 b3 d1 d2; five find a mate first; d1/d2 tie at 0 with 6 others -> rank 7, AP 1/7
    r = res.retrieval
    assert r["queries"] == 7
    assert r["recall@1"] == pytest.approx(5 / 7) and r["recall@5"] == pytest.approx(5 / 7) and r["recall@10"] == 1.0
    assert r["map"] == pytest.approx((5 + 2 / 7) / 7)
    text = res.table()
    assert "best F1 0.8333 at threshold 0.6000" in text and "<- default" in text and "mAP 0.7551" in text
    assert "best F1 0.833" in str(res)


def test_evaluate_phash_store_end_to_end(tmp_path: Path, make_images) -> None:
    imgs = make_images(9)  # img_0000 .. img_0008: distinct products (phash cosines <= 0.25)
    copies = tmp_path / "imgs" / "copies"
    copies.mkdir()
    for i in (0, 1):  # resized + recompressed copies
        Image.open(imgs[i]).resize((200, 200), Image.LANCZOS).save(copies / f"small_{i}.jpg", "JPEG", quality=60)
    shutil.copy(imgs[2], copies / "same_2.jpg")  # byte-identical
    store = tmp_path / "cat.h5"
    build_index([tmp_path / "imgs"], store, model="phash")
    truth = tmp_path / "truth.csv"
    truth.write_text("path,group\n"
                     "imgs/img_0000.jpg,p0\nimgs/copies/small_0.jpg,p0\n"
                     "imgs/img_0001.jpg,p1\nimgs/copies/small_1.jpg,p1\n"
                     "imgs/img_0002.jpg,p2\nimgs/copies/same_2.jpg,p2\n"
                     "imgs/img_0004.jpg,p3\nimgs/img_0008.jpg,p3\n"  # labelled duplicates that are not: a miss
                     "imgs/gone.jpg,p9\n")  # img_0003, 5, 6 and 7 are not in the truth
    res = evaluate(store, truth, verify=False)  # the global-threshold definition (verified: test_evaluate_verify)
    assert (res.evaluated, res.truth_missing_from_store, res.store_missing_from_truth) == (8, 1, 4)
    assert res.true_pairs == 4 and res.candidate_pairs == 3  # the copies score 1.0, the rest <= 0.25
    assert res.default_threshold == 0.5625
    assert res.at_default == pytest.approx({"threshold": 0.5625, "precision": 1.0, "recall": 0.75, "f1": 6 / 7})
    # F1 6/7 holds up to 1.0 (every copy's hash equals its original's); the highest tied threshold is reported
    assert res.best == pytest.approx({"threshold": 1.0, "precision": 1.0, "recall": 0.75, "f1": 6 / 7})
    k = res.sweep["thresholds"].index(1.0)
    assert res.sweep["predicted"][k] == 3 and res.sweep["f1"][k] == pytest.approx(6 / 7)
    # img_0004 and img_0008 rank each other last of 7 (cosine -0.44); images not in the truth are ignored,
    # not distractors
    r = res.retrieval
    assert r["queries"] == 8 and r["recall@1"] == 0.75 and r["recall@5"] == 0.75 and r["recall@10"] == 1.0
    assert r["map"] == pytest.approx((6 + 2 / 7) / 8)

    out, png = tmp_path / "eval.json", tmp_path / "pr.png"
    write_eval_json(res, out)
    doc = json.loads(out.read_text())
    assert doc["best"]["threshold"] == 1.0 and len(doc["sweep"]["f1"]) == 52 and "map" in doc["definitions"]
    fig = plot_pr_curve(res, png)
    assert len(fig.axes) == 1 and Image.open(png).size == (700, 600)


def test_read_truth_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no truth file"):
        read_truth(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.jpg,1\n")
    with pytest.raises(InputError, match="header path,group"):
        read_truth(bad)
    bad.write_text("path,group\na.jpg,1\na.jpg,2\n")
    with pytest.raises(InputError, match="two groups"):
        read_truth(bad)
    bad.write_text("path,group\n")
    with pytest.raises(InputError, match="lists no images"):
        read_truth(bad)
    bad.write_bytes(b"path,group\n\xff\xfe.jpg,1\n")
    with pytest.raises(InputError, match="UTF-8"):
        read_truth(bad)


def test_evaluate_no_overlap_is_an_input_error(hand_store: tuple[Path, Path], tmp_path: Path) -> None:
    store, _ = hand_store
    other = tmp_path / "other.csv"
    other.write_text("path,group\nelsewhere/a.jpg,1\n")
    with pytest.raises(InputError, match="none of the 1 images"):
        evaluate(store, other)


# ----------------------------------------------------------------------------------------------------- CLI

def test_cli_evaluate(hand_store: tuple[Path, Path], tmp_path: Path) -> None:
    store, truth = hand_store
    out, png = tmp_path / "eval.json", tmp_path / "pr.png"
    r = run("evaluate", "--store", store, "--truth", truth, "--out", out, "--plot", png, "--min-threshold", "0.6")
    assert r.exit_code == 0, r.output
    assert "threshold  predicted" in r.output and "<- best F1" in r.output and "recall@10 1.0000" in r.output
    doc = json.loads(out.read_text())
    assert doc["best"]["f1"] == pytest.approx(5 / 6) and doc["sweep"]["thresholds"][0] == 0.6
    assert len(doc["sweep"]["thresholds"]) == 41 and Image.open(png).size == (700, 600)
    r = run("evaluate", "-s", store, "--truth", truth, "-t", "0.95", "--min-threshold", "0.6")
    # the default row is what `duplicates -t 0.95` lists, scored on its own pairs, and says which flag moves it
    assert r.exit_code == 0 and ("what `neardup duplicates --no-verify --threshold 0.95` lists (the command line): "
                                 "2 pairs among the evaluated images, TP 2, FP 0, FN 3: precision 1.0000, recall "
                                 "0.4000, F1 0.5714; --threshold 0.9500 decides them") in r.output
    assert "0.9500          2        2        0        3     1.0000   0.4000   0.5714  <- default (--threshold of " \
           "duplicates)" in r.output


def test_cli_evaluate_bad_input(hand_store: tuple[Path, Path], tmp_path: Path) -> None:
    store, _ = hand_store
    r = run("evaluate", "-s", store, "--truth", tmp_path / "missing.csv")
    assert one_line_error(r) and "no truth file" in r.output
    bad = tmp_path / "bad.csv"
    bad.write_text("image,label\nimgs/a1.jpg,A\n")
    r = run("evaluate", "-s", store, "--truth", bad)
    assert one_line_error(r) and "path,group" in r.output
    good = tmp_path / "good.csv"
    good.write_text("path,group\nimgs/a1.jpg,A\n")
    r = run("evaluate", "-s", tmp_path / "nostore.h5", "--truth", good)
    assert one_line_error(r) and "no store" in r.output
    r = run("evaluate", "-s", store, "--truth", good, "--out", tmp_path / "no" / "eval.json")
    assert one_line_error(r) and "does not exist" in r.output


def test_index_from_truth_indexes_exactly_its_catalogue_photos(tmp_path: Path) -> None:
    """`index --from-truth` (named in evaluate's help): the store holds the truth's photos, not the role=query
    ones nor the other photos of their folders; and evaluate then scores it."""
    from typer.testing import CliRunner

    from neardup.cli import app
    from neardup.store import read_catalog
    from neardup.testing import product_photo

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        product_photo(i).save(photos / f"p{i}.png")
    (tmp_path / "truth.csv").write_text("path,group,role\nphotos/p0.png,a,\nphotos/p1.png,a,\nphotos/p2.png,b,\n"
                                        "photos/p3.png,b,query\n")
    store = tmp_path / "s.h5"
    runner = CliRunner()
    r = runner.invoke(app, ["index", "--from-truth", str(tmp_path / "truth.csv"), "-s", str(store), "-m", "phash"])
    assert r.exit_code == 0, r.output
    names = sorted(Path(p).name for p in read_catalog(store).paths)
    assert names == ["p0.png", "p1.png", "p2.png"], names
    r = runner.invoke(app, ["evaluate", "--truth", str(tmp_path / "truth.csv"), "-s", str(store)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["index", str(photos), "--from-truth", str(tmp_path / "truth.csv"), "-s", str(store)])
    assert r.exit_code == 2 and "not both" in r.output, r.output
    r = runner.invoke(app, ["index", "-s", str(store)])
    assert r.exit_code == 2 and "--from-truth" in r.output, r.output
