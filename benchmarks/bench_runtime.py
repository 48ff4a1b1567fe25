"""ONNX Runtime versus TensorFlow for the built-in CNN, int8, and what a one-photo query costs.

Question: on the same photos and the same machine, in one run, how much faster is ResNet50 on ONNX Runtime
(the Keras model exported by neardup) than on TensorFlow, model-only and end to end (`build_index`), at
batch 32 and batch 1; what does int8 add; do the vectors agree; and how long does one `neardup query
photo.jpg` CLI call take on a ResNet50 store with each runtime, and does the ONNX one import TensorFlow?

  (a) model only, batch 32: median img/s of embed() on pre-decoded uint8 batches (warm-up excluded)
  (b) batch 1: median warm latency of embed() on one photo
  (c) end to end: build_index of N photos into a fresh store (decode + embed + HDF5 + FAISS), prebuilt
      embedder injected, so the one-time model construction / export is excluded
  (d) CLI: wall time of `neardup query ONE.jpg -s STORE -k 10` in a fresh process (median of R runs), per
      runtime, and whether `tensorflow` was imported by the ONNX one
  (e) agreement: cosine of ORT float32 to TF float32 (random weights); int8 to float32 on the trained
      MobileNetV2 1.4 in ../shared/models (cosine, top-10 neighbour overlap) and its speed there
ResNet50 weights are seeded random (`weights none`: ImageNet weights cannot be downloaded here): they show
speed and plumbing. The int8 agreement that matters is the trained network's.
Targets (issue 12): c(ORT)/c(TF) >= 1.7; a(int8)/a(TF) >= 3; b(ORT) <= 0.65 b(TF); d(ORT) <= 1.5 s;
ORT/TF cosine >= 0.99999.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import GROCERY_DIR, REPO_ROOT, Report, base_parser, cosine_rows, log, median, sample_photos

MOBILENET = REPO_ROOT.parent / "shared" / "models" / "nsfwjs-mobilenet-v2" / "mobilenet_v2_140_features.onnx"


def throughput(emb, x: np.ndarray, batch: int, repeats: int) -> float:  # an Embedder
    """Median images per second of emb.embed over x in batches (one warm-up batch first)."""
    emb.embed(x[:batch])
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            emb.embed(x[i:i + batch])
        runs.append(len(x) / (time.perf_counter() - t0))
    return median(runs)


def latency_ms(emb, x1: np.ndarray, repeats: int) -> float:  # an Embedder
    """Median warm latency of one photo, in ms."""
    emb.embed(x1)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        emb.embed(x1)
        runs.append((time.perf_counter() - t0) * 1000)
    return median(runs)


def build_seconds(paths: list[Path], store: Path, emb, batch: int) -> float:  # an Embedder
    """Wall seconds of build_index into a fresh store with the injected embedder."""
    from neardup.indexer.build import build_index

    t0 = time.perf_counter()
    s = build_index([str(p) for p in paths], store, embedder=emb, batch_size=batch)
    assert s.added == len(paths), s
    return time.perf_counter() - t0


_CLI = ("import sys, time\nt0 = time.perf_counter()\nfrom neardup.cli import app\ntry:\n    app(sys.argv[1:])\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print('RESULT', code, 'tensorflow' in sys.modules, file=sys.stderr)\n")


def cli_query(photo: Path, store: Path, runtime: str, runs: int) -> tuple[float, bool]:
    """(median wall seconds, tensorflow imported) of a one-photo `neardup query` in a fresh process."""
    walls, tf = [], False
    for _ in range(runs):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _CLI, "query", str(photo), "-s", str(store), "-k", "10",
                            "--runtime", runtime], capture_output=True, text=True, timeout=300)
        walls.append(time.perf_counter() - t0)
        line = [x for x in r.stderr.splitlines() if x.startswith("RESULT")]
        if not line or line[0].split()[1] not in ("0", "1"):
            raise SystemExit(f"query failed: {r.stderr[-500:]}")
        tf = tf or line[0].split()[2] == "True"
    return median(walls), tf


def main() -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=128, help="photos (ResNet50 speed, end to end)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--cli-runs", type=int, default=5, help="fresh-process query runs per runtime")
    p.add_argument("--agreement-n", type=int, default=256, help="grocery photos for the MobileNetV2 int8 check")
    args = p.parse_args()

    from neardup.embed.decode import read_and_decode
    from neardup.embed.models import make_embedder
    from neardup.embed.onnx_export import agreement, onnx_cache_dir, quantize_int8
    from neardup.embed.onnx_runtime import OnnxEmbedder, OnnxPreprocess

    report = Report("bench_runtime.py", "ONNX Runtime vs TensorFlow (ResNet50), int8, one-photo query",
                    __doc__.split("\n\n")[1].replace("\n", " "),
                    params={"n": args.n, "batch_size": args.batch_size, "repeats": args.repeats,
                            "cli_runs": args.cli_runs, "agreement_n": args.agreement_n, "weights": "none",
                            "onnx cache": str(onnx_cache_dir())})
    with tempfile.TemporaryDirectory(prefix="neardup-bench-runtime-") as tmp:
        tmp = Path(tmp)
        photos = sample_photos(args.n, tmp, None)
        report.params["photos"] = photos.source
        x = np.stack([read_and_decode(str(q), 224)[1].pixels for q in photos.paths])
        log("building ResNet50 on TensorFlow and on ONNX Runtime (exports once if not cached)")
        t0 = time.perf_counter()
        tf_emb = make_embedder("resnet50", "none", runtime="tf")
        built_tf = time.perf_counter() - t0
        t0 = time.perf_counter()
        ort_emb = make_embedder("resnet50", "none", runtime="onnx")
        built_ort = time.perf_counter() - t0
        log("int8: calibrating on 64 of the photos")
        int8 = quantize_int8(ort_emb, x[:: max(1, len(x) // 64)][:64], tmp / "r50.int8.onnx")

        e_tf, e_ort, e_int8 = tf_emb.embed(x), ort_emb.embed(x), int8.embed(x)
        cos_ort = cosine_rows(e_tf, e_ort)
        rows, speeds = [], {}
        for name, emb in (("TensorFlow float32", tf_emb), ("ONNX Runtime float32", ort_emb),
                          ("ONNX Runtime int8", int8)):
            log(f"timing {name}")
            a = throughput(emb, x, args.batch_size, args.repeats)
            b = latency_ms(emb, x[:1], args.repeats * 5)
            c = len(x) / build_seconds(photos.paths, tmp / f"{name.split()[-1]}-{len(rows)}.h5", emb,
                                       args.batch_size)
            speeds[name] = (a, b, c)
            rows.append([name, a, b, c])
        tf_a, tf_b, tf_c = speeds["TensorFlow float32"]
        rows += [[f"{n} / TensorFlow", speeds[n][0] / tf_a, speeds[n][1] / tf_b, speeds[n][2] / tf_c]
                 for n in ("ONNX Runtime float32", "ONNX Runtime int8")]
        report.table("ResNet50 speed (same photos, same process)",
                     ["runtime", "a: model img/s (batch 32)", "b: batch-1 ms", "c: build_index img/s"], rows)
        report.table("Construction (one-time)", ["runtime", "seconds"],
                     [["TensorFlow (build Keras model)", built_tf], ["ONNX Runtime (cached export, or export now)",
                                                                     built_ort]])

        log("CLI: one-photo query on a ResNet50 store, fresh processes")
        store = tmp / "cli.h5"
        from neardup.indexer.build import build_index

        build_index([str(q) for q in photos.paths[:40]], store, embedder=ort_emb)
        wall_ort, tf_in_ort = cli_query(photos.paths[3], store, "onnx", args.cli_runs)
        wall_tf, _ = cli_query(photos.paths[3], store, "tf", args.cli_runs)
        report.table("One `neardup query photo.jpg` on a 40-photo ResNet50 store (fresh process, median wall s)",
                     ["runtime", "wall s", "imports tensorflow"],
                     [["onnx (default)", wall_ort, tf_in_ort], ["tf", wall_tf, True]])

        agree_rows = [["ResNet50 (random weights): ORT float32 vs TF", float(cos_ort.mean()), float(cos_ort.min()),
                       agreement(e_tf, e_ort).top10_overlap],
                      ["ResNet50 (random weights): int8 vs ORT float32", float(cosine_rows(e_ort, e_int8).mean()),
                       float(cosine_rows(e_ort, e_int8).min()), agreement(e_ort, e_int8).top10_overlap]]
        mob = None
        if MOBILENET.is_file() and GROCERY_DIR.is_dir():
            log("trained MobileNetV2 1.4: int8 agreement and speed on grocery photos")
            gp = sample_photos(args.agreement_n, tmp, None).paths
            xg = np.stack([read_and_decode(str(q), 224)[1].pixels for q in gp])
            fp = OnnxEmbedder(MOBILENET, OnnxPreprocess.parse("output=features"))
            q8 = quantize_int8(fp, xg[:: max(1, len(xg) // 64)][:64], tmp / "mob.int8.onnx")
            ef, e8 = fp.embed(xg), q8.embed(xg)
            mob = agreement(ef, e8)
            agree_rows.append([f"trained MobileNetV2 1.4, {len(xg)} grocery photos: int8 vs float32",
                               mob.cosine_mean, mob.cosine_min, mob.top10_overlap])
            mf, m8 = throughput(fp, xg[:64], args.batch_size, args.repeats), throughput(q8, xg[:64], args.batch_size,
                                                                                         args.repeats)
            report.table("Trained MobileNetV2 1.4 on ONNX Runtime (model only, batch 32)", ["precision", "img/s"],
                         [["float32", mf], ["int8", m8], ["int8 / float32", m8 / mf]])
        else:
            report.note(f"trained-network agreement skipped: {MOBILENET} or the grocery photos are absent")
        report.table("Agreement (cosine of the same photo's two vectors; top-10 neighbours kept)",
                     ["pair", "cosine mean", "cosine min", "top-10 overlap"], agree_rows)

        ort_c, int8_a, ort_b = speeds["ONNX Runtime float32"][2] / tf_c, speeds["ONNX Runtime int8"][0] / tf_a, \
            speeds["ONNX Runtime float32"][1] / tf_b
        report.target("build_index ORT float32 / TF", ort_c, ">= 1.7", ort_c >= 1.7)
        report.target("model int8 / TF (batch 32)", int8_a, ">= 3", int8_a >= 3)
        report.target("batch-1 latency ORT / TF", ort_b, "<= 0.65", ort_b <= 0.65)
        report.target("one-photo query CLI, ORT (s)", wall_ort, "<= 1.5", wall_ort <= 1.5)
        report.check("ORT float32 vs TF: cosine >= 0.99999 on every photo", float(cos_ort.min()) >= 0.99999,
                     f"min {cos_ort.min():.7f}")
        report.check("the ONNX query imports no TensorFlow", not tf_in_ort)
        report.check("vectors finite and unit-norm", bool(np.all(np.isfinite(e_int8)))
                     and bool(np.allclose(np.linalg.norm(e_ort, axis=1), 1, atol=1e-4)))
        report.note(f"CPU threads: ONNX Runtime and TensorFlow both use their defaults (one per core; "
                    f"os.cpu_count()={os.cpu_count()}).")
        if mob is not None:
            report.note(f"int8 on the trained network: {mob.line()}.")
    return report.finish(args.json)


if __name__ == "__main__":
    sys.exit(main())
