"""Decisions as truth: `evaluate --decisions` scores what `duplicates` lists against the pairs people reviewed,
`evaluate --fit` proposes thresholds from them (oracle: a brute-force search written here), `--apply` saves them
in the store's settings and every command follows."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from neardup.cli import app
from neardup.errors import InputError
from neardup.search.decided import GRID, apply_fit, evaluate_decisions, fit_thresholds
from neardup.search.duplicates import find_duplicates
from neardup.store import Catalog, ModelInfo, StoreMeta, write_catalog
from neardup.store.decisions import Decision, Journal
from neardup.store.settings import read_settings

runner = CliRunner()


def _store(path: Path, xb: np.ndarray) -> list[str]:
    """A store of vectors `xb` (no image files: no photo can be verified); returns the rows' digests."""
    n, dim = xb.shape
    sha = [f"{k + 1:064x}" for k in range(n)]
    meta = StoreMeta(ModelInfo("fake", "none", "none", dim=dim, input_size=16, preprocessing="hand-made"), next_id=n)
    write_catalog(path, Catalog(meta, np.arange(n), [f"p{k:03d}.jpg" for k in range(n)], np.full(n, 1000),
                                np.zeros(n, np.int64), sha, np.full(n, 64, np.int32), np.full(n, 64, np.int32),
                                xb.astype(np.float32)))
    return sha


def _pairs_store(path: Path, cosines: list[float]) -> list[str]:
    """Pair k: rows 2k and 2k+1 at cosine cosines[k]; rows of different pairs are orthogonal."""
    m = len(cosines)
    xb = np.zeros((2 * m, 2 * m), np.float32)
    for k, c in enumerate(cosines):
        xb[2 * k, 2 * k] = 1.0
        xb[2 * k + 1, 2 * k], xb[2 * k + 1, 2 * k + 1] = c, np.sqrt(1 - c * c)
    return _store(path, xb)


def _decide(store: Path, sha: list[str], decisions: list[tuple[int, int, str]]) -> None:
    Journal.of(store).append([Decision.make(sha[a], sha[b], d, source="test") for a, b, d in decisions])


def test_evaluate_decisions_counts_against_what_duplicates_lists(tmp_path: Path) -> None:
    store = tmp_path / "cat.h5"
    sha = _pairs_store(store, [0.96, 0.85, 0.75, 0.93])  # the model's default threshold is 0.90
    gone = f"{999:064x}"
    _decide(store, sha, [(0, 1, "duplicate"),  # .96: listed -> TP
                         (2, 3, "duplicate"),  # .85: not listed -> FN
                         (4, 5, "distinct"),  # .75: not listed -> TN
                         (6, 7, "distinct"),  # .93: listed -> FP
                         (0, 2, "distinct")])  # orthogonal: TN
    Journal.of(store).append([Decision.make(sha[0], gone, "duplicate", source="test")])  # a photo gone
    with_decisions = {(p.a_path, p.b_path) for p in find_duplicates(store).pairs}
    assert ("p006.jpg", "p007.jpg") not in with_decisions  # duplicates applies them; evaluate measures without
    res = evaluate_decisions(store)
    assert (res.decided, res.evaluated, res.not_evaluated) == (6, 5, 1)
    assert (res.tp, res.fp, res.fn, res.tn) == (1, 1, 1, 2) and (res.positives, res.negatives) == (2, 3)
    assert res.precision == pytest.approx(0.5) and res.recall == pytest.approx(0.5)
    assert res.settings["threshold"] == 0.9 and "1 not evaluated" in res.table()
    res = evaluate_decisions(store, threshold=0.8)
    assert (res.tp, res.fp, res.fn, res.tn) == (2, 1, 0, 2)
    r = runner.invoke(app, ["evaluate", "-s", str(store), "--decisions", "--no-verify", "-q"])
    assert r.exit_code == 0 and "TP 1  FP 1  FN 1  TN 2: precision 0.5000, recall 0.5000" in r.output, r.output
    assert "what `neardup duplicates --no-verify --threshold 0.9` lists (the defaults of model fake)" in r.output


def _oracle(d: list[float], pos: list[bool], rule: str, min_precision: float, now: float) -> float:
    """The fit without verification, by brute force: thresholds of the grid, ties to the one nearest `now`."""
    best: tuple | None = None
    for t in sorted({*GRID.tolist(), now}):
        pred = [x >= t - 1e-9 for x in d]
        tp = sum(p and q for p, q in zip(pred, pos))
        fp = sum(p and not q for p, q in zip(pred, pos))
        prec = tp / (tp + fp) if tp + fp else 1.0
        rec = tp / sum(pos)
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        score = f1 if rule == "f1" else (rec if prec >= min_precision else -1.0)
        key = (-score, abs(t - now), -t)
        if best is None or key < best[0]:
            best = (key, t)
    assert best is not None
    return best[1]


@pytest.mark.parametrize(("rule", "min_precision"), [("f1", 0.95), ("recall", 0.9), ("recall", 0.8)])
def test_fit_finds_the_thresholds_a_brute_force_search_finds(tmp_path: Path, rule: str, min_precision: float) -> None:
    rng = np.random.default_rng(7)
    dup = rng.uniform(0.78, 0.99, 14).round(3).tolist()
    dis = rng.uniform(0.55, 0.88, 12).round(3).tolist()  # overlapping: no threshold separates them
    store = tmp_path / "cat.h5"
    sha = _pairs_store(store, dup + dis)
    _decide(store, sha, [(2 * k, 2 * k + 1, "duplicate" if k < len(dup) else "distinct")
                         for k in range(len(dup) + len(dis))])
    fit = fit_thresholds(store, rule=rule, min_precision=min_precision, verify=False)
    want = _oracle(dup + dis, [True] * len(dup) + [False] * len(dis), rule, min_precision, 0.9)
    assert fit.threshold == pytest.approx(want) and fit.candidate_threshold is None
    assert (fit.pairs, fit.positives, fit.negatives) == (26, 14, 12)
    assert fit.current["threshold"] == 0.9
    if rule == "recall":
        assert fit.proposed["precision"] >= min_precision
    else:
        assert fit.proposed["f1"] >= fit.current["f1"]
    assert fit.flags() == f"--threshold {want:.4g} --no-verify"


@pytest.mark.parametrize(("rule", "min_precision"), [("f1", 0.95), ("recall", 0.9)])
def test_the_held_out_figures_judge_each_fold_at_thresholds_fitted_without_it(tmp_path: Path, rule: str,
                                                                              min_precision: float) -> None:
    """The fit's honest estimate: each decided pair judged at the thresholds the same rule picks from the other
    folds (oracle: the brute-force fit above, run on each fold's complement)."""
    from neardup.search.decided import _folds_of, decided_pairs
    from neardup.store.generation import Generation

    rng = np.random.default_rng(11)
    dup = rng.uniform(0.8, 0.99, 23).round(3).tolist()
    dis = rng.uniform(0.6, 0.86, 17).round(3).tolist()
    store = tmp_path / "cat.h5"
    sha = _pairs_store(store, dup + dis)
    _decide(store, sha, [(2 * k, 2 * k + 1, "duplicate" if k < len(dup) else "distinct")
                         for k in range(len(dup) + len(dis))])
    fit = fit_thresholds(store, rule=rule, min_precision=min_precision, verify=False)
    with Generation.open(store) as gen:
        pairs = decided_pairs(gen)
    score = [(dup + dis)[int(a) // 2] for a in pairs.a]  # pair k is rows 2k, 2k+1
    pos = pairs.positive.tolist()
    fold = _folds_of(pairs.positive, 5)
    assert fit.folds == 5  # stratified: every fold holds its share of either kind
    assert max(np.bincount(fold[pairs.positive])) - min(np.bincount(fold[pairs.positive])) <= 1
    assert max(np.bincount(fold[~pairs.positive])) - min(np.bincount(fold[~pairs.positive])) <= 1
    tp = fp = 0
    for f in range(5):
        train = [i for i in range(len(pos)) if fold[i] != f]
        t = _oracle([score[i] for i in train], [pos[i] for i in train], rule, min_precision, 0.9)
        for i in (i for i in range(len(pos)) if fold[i] == f):
            tp += score[i] >= t - 1e-9 and pos[i]
            fp += score[i] >= t - 1e-9 and not pos[i]
    assert fit.held_out is not None
    assert (fit.held_out["tp"], fit.held_out["fp"], fit.held_out["fn"]) == (tp, fp, len(dup) - tp)
    assert "held out" in fit.table() and "folds" in fit.table()
    r = runner.invoke(app, ["evaluate", "-s", str(store), "--fit", "--no-verify", "-q", "--fit-rule", rule,
                            "--min-precision", str(min_precision), "--out", str(tmp_path / "fit.json")])
    assert r.exit_code == 0 and "held out" in r.output, r.output
    assert json.loads((tmp_path / "fit.json").read_text())["fit"]["held_out"] == fit.held_out
    # the advice compares the held-out figures with those of the thresholds in use (nothing fitted there), on the
    # rule's terms: F1, or precision at the target and then recall
    seen = set()
    for t in (0.8, 0.82, 0.84, 0.86, 0.88, 0.9, 0.95):
        f = fit_thresholds(store, rule=rule, min_precision=min_precision, verify=False, threshold=t)
        ho, now = f.held_out, f.current
        assert ho is not None and not f.in_use_fitted
        if rule == "f1":
            better = ho["f1"] > now["f1"]
        else:
            better = ho["precision"] >= min_precision and (now["precision"] < min_precision
                                                           or ho["recall"] > now["recall"])
        if not f.moved:
            seen.add("kept")
            assert "nothing to apply" in f.advice() and f.threshold == pytest.approx(t)
        elif better:
            seen.add("apply")
            assert "expected to help" in f.advice()
        else:
            seen.add("wait")
            assert "review more pairs before applying" in f.advice()
    assert "kept" in seen and len(seen) >= 2, seen
    # after --apply, the thresholds in use were fitted too: the advice says their figure is in-sample
    apply_fit(store, fit_thresholds(store, rule=rule, min_precision=min_precision, verify=False))
    again = fit_thresholds(store, rule=rule, min_precision=min_precision, verify=False)
    assert again.in_use_fitted and not again.moved and "nothing to apply" in again.advice()
    r = runner.invoke(app, ["evaluate", "-s", str(store), "--fit", "--apply", "--no-verify", "-q", "--fit-rule", rule,
                            "--min-precision", str(min_precision)])
    assert r.exit_code == 0 and "nothing applied" in r.output and "saved in" not in r.output, r.output
    moved = fit_thresholds(store, rule=rule, min_precision=min_precision, verify=False, threshold=0.95)
    assert not moved.in_use_fitted  # a flag decides what is in use, not the fitted settings


def test_equal_f1_is_a_tie_and_ties_keep_the_thresholds_in_use(tmp_path: Path) -> None:
    """F1 2/6 (TP 2, FP 5 at 0.90) and 1/3 (TP 1, FP 0 at 0.95) are equal: the fit keeps the thresholds in use
    (through precision and recall the two differed in the last bit, and the fit moved for nothing)."""
    store = tmp_path / "cat.h5"
    dup, dis = [0.97, 0.905, 0.1, 0.05, 0.02], [0.91, 0.92, 0.93, 0.94, 0.95] + [0.3] * 30
    sha = _pairs_store(store, dup + dis)
    _decide(store, sha, [(2 * k, 2 * k + 1, "duplicate" if k < len(dup) else "distinct")
                         for k in range(len(dup) + len(dis))])
    fit = fit_thresholds(store, verify=False)
    assert fit.current["f1"] == fit.proposed["f1"] == 1 / 3
    assert fit.threshold == 0.9 and not fit.moved and "nothing to apply" in fit.advice()


def test_a_fit_without_one_kind_is_a_clear_error_or_a_fit_without_held_out(tmp_path: Path) -> None:
    store = tmp_path / "cat.h5"
    sha = _pairs_store(store, [0.95, 0.9, 0.85, 0.6, 0.5])
    _decide(store, sha, [(2 * k, 2 * k + 1, "distinct") for k in range(5)])  # no duplicate at all
    with pytest.raises(InputError, match="no thresholds find any"):
        fit_thresholds(store, verify=False, min_pairs=1, min_each=0)
    store2 = tmp_path / "dup.h5"
    sha = _pairs_store(store2, [0.95, 0.9, 0.85])
    _decide(store2, sha, [(2 * k, 2 * k + 1, "duplicate") for k in range(3)])  # no distinct one
    fit = fit_thresholds(store2, verify=False, min_pairs=1, min_each=0)
    assert fit.held_out is None and fit.folds == 0 and fit.proposed["recall"] == 1.0


def test_fit_refuses_too_few_decisions_and_says_how_many(tmp_path: Path) -> None:
    store = tmp_path / "cat.h5"
    sha = _pairs_store(store, [0.95] * 20 + [0.6] * 3)
    _decide(store, sha, [(2 * k, 2 * k + 1, "duplicate" if k < 20 else "distinct") for k in range(23)])
    with pytest.raises(InputError, match=r"at least 20 decided pairs .* at least 5 of them duplicate and 5 distinct; "
                                         r".* has 23 \(20 duplicate, 3 distinct\)"):
        fit_thresholds(store, verify=False)
    r = runner.invoke(app, ["evaluate", "-s", str(store), "--fit", "--no-verify", "-q"])
    assert r.exit_code == 2 and "3 distinct" in r.output and "Traceback" not in r.output
    with pytest.raises(InputError, match="unknown fit rule"):
        fit_thresholds(store, rule="best")


def test_fit_apply_is_used_by_every_command_and_a_flag_still_wins(tmp_path: Path) -> None:
    store = tmp_path / "cat.h5"
    dup, dis = [0.8, 0.82, 0.84, 0.86, 0.88, 0.9, 0.93, 0.95, 0.97, 0.99], [0.5, 0.55, 0.6, 0.65, 0.7, 0.72,
                                                                             0.74, 0.75, 0.76, 0.77]
    sha = _pairs_store(store, dup + dis)
    _decide(store, sha, [(2 * k, 2 * k + 1, "duplicate" if k < 10 else "distinct") for k in range(20)])
    r = runner.invoke(app, ["evaluate", "-s", str(store), "--fit", "--no-verify", "-q"])
    # F1 1.0 for any threshold in (0.77, 0.80]: the one nearest the model's 0.90 is 0.80
    assert r.exit_code == 0 and "pass --threshold 0.8 --no-verify to duplicates" in r.output, r.output
    assert read_settings(store).empty  # nothing saved without --apply
    r = runner.invoke(app, ["evaluate", "-s", str(store), "--fit", "--apply", "--no-verify", "-q",
                            "--out", str(tmp_path / "fit.json")])
    assert r.exit_code == 0 and "applied: --threshold 0.8 saved in" in r.output, r.output
    assert json.loads((tmp_path / "fit.json").read_text())["fit"]["threshold"] == 0.8
    s = read_settings(store)
    assert s.threshold == 0.8 and "on 20 decided pairs" in s.source
    assert find_duplicates(store, verify=False, decisions=False).threshold == 0.8
    assert find_duplicates(store, verify=False, threshold=0.95, decisions=False).threshold == 0.95
    res = evaluate_decisions(store, verify=False)  # now at the applied threshold: every decision right
    assert (res.tp, res.fp, res.fn, res.tn) == (10, 0, 0, 10)
    r = runner.invoke(app, ["info", "-s", str(store)])
    assert r.exit_code == 0 and "--threshold 0.8 applied" in r.output and "evaluate --fit (f1)" in r.output
    doc = json.loads(runner.invoke(app, ["info", "-s", str(store), "--json"]).output)
    assert doc["settings"]["threshold"] == 0.8
    r = runner.invoke(app, ["evaluate", "-s", str(store), "--apply", "-q"])
    assert r.exit_code == 2 and "give --fit too" in r.output


def test_fit_verified_uses_the_verdicts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verified: a pair is predicted when it reaches the candidates' threshold and is verified (here the
    verdicts are given: verified = decided duplicate, but for two duplicates verification misses)."""
    import neardup.search.decided as decided

    store = tmp_path / "cat.h5"
    dup = [0.62, 0.66, 0.7, 0.74, 0.8, 0.85, 0.9, 0.95]
    dis = [0.6, 0.7, 0.75, 0.8, 0.85, 0.9]
    sha = _pairs_store(store, dup + dis)
    _decide(store, sha, [(2 * k, 2 * k + 1, "duplicate" if k < len(dup) else "distinct")
                         for k in range(len(dup) + len(dis))])

    def verdicts(gen, a, b, verify, workers):
        d = np.einsum("ij,ij->i", gen.vectors(a), gen.vectors(b)).astype(np.float64)
        ver = np.array([k < len(dup) and k not in (1, 5) for k in range(len(a))])  # order: by digest = by row
        return d, ver, np.ones(len(a), bool)

    monkeypatch.setattr(decided, "_pair_features", verdicts)
    fit = fit_thresholds(store, verify=True, min_pairs=10, min_each=5)
    # verified ones are never distinct, so F1 is highest with every verified duplicate: c <= 0.62; the
    # nearest to the model's candidate threshold (0.70) is 0.62; --threshold is untouched (nobody is plain)
    assert fit.candidate_threshold == pytest.approx(0.62) and fit.threshold == pytest.approx(0.9)
    assert (fit.proposed["tp"], fit.proposed["fp"], fit.proposed["fn"]) == (6, 0, 2)
    assert fit.flags() == "--threshold 0.9 --candidate-threshold 0.62"
    apply_fit(store, fit)
    assert read_settings(store).candidate_threshold == pytest.approx(0.62)
    assert find_duplicates(store, verify=True, decisions=False).loose_threshold == pytest.approx(0.62)


def test_the_fit_counts_the_keypoint_word_candidates_duplicates_uses(tmp_path: Path) -> None:
    """pHash finds cropped copies through the keypoint words whatever their cosine: the fit must count them as
    `duplicates` does, so its "in use" row equals `evaluate --decisions` (on real grocery copies, 4 of which
    score below the candidates' threshold), and it never proposes a lower --candidate-threshold to reach them."""
    import csv

    from neardup.config import model_spec
    from neardup.errors import InputError as _InputError
    from neardup.indexer.build import build_index
    from neardup.store.generation import Generation
    from neardup.testing.grocery import grocery_root, make_copies_set

    try:
        grocery_root()
    except _InputError as e:
        pytest.skip(f"real-photo test skipped: {e}")
    truth = make_copies_set(tmp_path, n_originals=20, n_distractors=20, seed=0)
    rows = list(csv.DictReader(open(truth, encoding="utf-8")))
    store = tmp_path / "cat.h5"
    build_index([r["path"] for r in rows], store, model="phash")
    with Generation.open(store) as gen:
        cat = gen.catalog
        row_of = {(store.parent / p).resolve(): r for r, p in enumerate(cat.paths)}
        groups: dict[str, list[int]] = {}
        for r in rows:
            if r["group"]:
                groups.setdefault(r["group"], []).append(row_of[Path(r["path"]).resolve()])
        dup = [tuple(g) for g in groups.values()]
        low = sum(float(gen.vectors(np.array(p))[0] @ gen.vectors(np.array(p))[1]) < model_spec("phash").loose_threshold
                  for p in dup)
        dis = [(dup[i][0], dup[i + 1][0]) for i in range(8)]
        Journal.of(store).append([Decision.make(cat.sha256[a], cat.sha256[b], word, source="test")
                                  for pairs, word in ((dup, "duplicate"), (dis, "distinct")) for a, b in pairs])
    assert low >= 1  # the case at stake: duplicates only the words bring to verification
    ev = evaluate_decisions(store)
    fit = fit_thresholds(store)
    assert fit.verify and (fit.current["tp"], fit.current["fp"], fit.current["fn"]) == (ev.tp, ev.fp, ev.fn)
    assert ev.tp == len(dup)  # every copy found (the words' and the k-NN's candidates verified)
    assert fit.candidate_threshold == pytest.approx(model_spec("phash").loose_threshold)  # nothing to gain below
