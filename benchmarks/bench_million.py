"""A million photos in one night (issue 29): the candidate search of `duplicates` at 200k and 1M vectors.

Does the candidate search that `neardup duplicates` runs on a store with an approximate index
(search/candidates.store_knn_pairs: PCA codes in an IVF, exact re-scoring from the stored vectors read in
blocks) take at most 20 min on 2 cores and 2 GB of RAM, and find >= 0.95 of the exact k-NN candidate set?

Data that looks like real embeddings: a generator fitted on real EfficientNet-Lite0 vectors of the grocery
photos (--real, a Lite0 store of ../shared/datasets/grocery-store/dataset): their mean and eigenvalue spectrum
(of the cluster centres and of the photos around them, k-means with as many clusters as the dataset has
products), the cluster sizes, and planted near-duplicates (1 % of rows) whose cosine to their original is
drawn from the measured cosines of real edited copies (--copies: `python -m neardup.testing.grocery` copies
set, indexed with Lite0) along a direction shaped like the within-cluster spread. The fit is checked by
nearest-neighbour cosines of the real vectors against synthetic ones of the same size.

Per size: the store is written by the product's own code (index `auto`: build time and bytes of its index,
its tie-aware recall@10 on held-out queries, one query's p50); the candidate search runs in a subprocess
(wall time, peak RSS); its pairs are checked against exact brute force on a seeded sample of rows (each
row's k nearest scoring >= the loose threshold: the candidate-set recall) and against the planted pairs.
The baseline is the former path, k-NN of the store's index per row (join.knn_pairs), timed on a sample of
rows and projected (said so). Verification throughput (pairs a second on one core) is measured on real
Lite0 candidate pairs of the grocery store.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import BENCH_DIR, Report, append_results, log, output_options, peak_rss_bytes, percentile

GB = 10 ** 9
FIT_CACHE = BENCH_DIR / "out" / "lite0_fit.npz"


# ------------------------------------------------------------------------------------------ the generator


def fit(real_store: Path, copies_store: Path | None, copies_csv: Path | None, clusters: int, series: int,
        seed: int = 0) -> dict:
    """Parameters of the Lite0-like generator, fitted on the real vectors: two levels of k-means (products,
    and series of shots within them), the spectrum at each level, the sizes, and real copies' cosines."""
    import faiss

    from neardup.store import Store

    with Store.open(real_store) as gen:
        x = gen.vectors()
        real_paths = {os.path.realpath(gen.image_path(i)): i for i in range(len(gen))}
    mu = x.mean(0)

    def kmeans(k: int) -> tuple[np.ndarray, np.ndarray]:
        km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, spherical=True)
        km.train(x)
        lab = km.index.search(x, 1)[1].ravel()
        return lab, np.stack([x[lab == c].mean(0) if (lab == c).any() else mu for c in range(k)])

    lab1, c1 = kmeans(clusters)
    lab2, c2 = kmeans(series)
    owner = np.array([np.bincount(lab1[lab2 == s], minlength=clusters).argmax() if (lab2 == s).any() else -1
                      for s in range(series)])  # each series' product: the product most of its photos are in
    lt, vt = np.linalg.eigh(np.cov((x - mu).T))
    ls, vs = np.linalg.eigh(np.cov((c2[lab2] - c1[owner[lab2]]).T))  # series around their product
    lw, vw = np.linalg.eigh(np.cov((x - c2[lab2]).T))  # shots around their series
    alpha = max(0.0, (lt.sum() - ls.sum() - lw.sum()) / lt.sum())  # the products' share of the spread
    per_product = np.bincount(owner[owner >= 0], minlength=clusters)
    per_series = np.bincount(lab2, minlength=series)
    copy_scores = np.zeros(0)
    if copies_store and copies_csv:
        import csv

        with Store.open(copies_store) as gen:
            xc = gen.vectors()
            cp = {os.path.realpath(gen.image_path(i)): i for i in range(len(gen))}
        groups: dict[str, list[str]] = {}
        for r in csv.DictReader(open(copies_csv)):
            groups.setdefault(r["group"], []).append(os.path.realpath(r["path"]))
        copy_scores = np.array([float(x[real_paths[o]] @ xc[cp[c]]) for ps in groups.values() for o in ps
                                if o in real_paths for c in ps if c in cp])
    return {"mu": mu, "lt": np.maximum(lt, 0), "vt": vt, "ls": np.maximum(ls, 0), "vs": vs, "lw": np.maximum(lw, 0),
            "vw": vw, "alpha": alpha, "per_product": per_product[per_product > 0],
            "per_series": per_series[per_series > 0], "copy_scores": copy_scores, "real": x}


def generate(p: dict, n: int, seed: int, dup_fraction: float = 0.01,
             block: int = 65_536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n Lite0-like unit vectors (float32, rows shuffled) and the planted pairs (i, j) with i < j: products
    (centres shaped like the whole spectrum), series of shots around them, shots around the series."""
    rng = np.random.default_rng(seed)
    d = len(p["mu"])
    sizes = []  # photos per series
    owner = []  # series -> product
    total, product = 0, 0
    while total < n:
        for _ in range(int(rng.choice(p["per_product"]))):
            sizes.append(int(rng.choice(p["per_series"])))
            owner.append(product)
            total += sizes[-1]
        product += 1
    keep = np.cumsum(sizes) - np.array(sizes) < n
    sizes, owner = np.array(sizes)[keep], np.array(owner)[keep]
    sizes[-1] -= sizes.sum() - n
    shape = lambda v, lam, a=1.0: (v * np.sqrt(a * lam)).T.astype(np.float32)  # noqa: E731 - g @ it: a draw
    bt, bs, bw = shape(p["vt"], p["lt"], p["alpha"]), shape(p["vs"], p["ls"]), shape(p["vw"], p["lw"])
    products = p["mu"] + rng.standard_normal((owner.max() + 1, d)).astype(np.float32) @ bt
    centres = products[owner] + rng.standard_normal((len(sizes), d)).astype(np.float32) @ bs
    of = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(of)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, block):
        e = min(n, s + block)
        x[s:e] = centres[of[s:e]] + rng.standard_normal((e - s, d)).astype(np.float32) @ bw
        x[s:e] /= np.linalg.norm(x[s:e], axis=1, keepdims=True)
    m = int(n * dup_fraction)
    if m and len(p["copy_scores"]):
        pick = rng.choice(n, 2 * m, replace=False)
        orig, copy = pick[:m], pick[m:]
        t = rng.choice(p["copy_scores"], m).astype(np.float32)[:, None]
        u = rng.standard_normal((m, d)).astype(np.float32) @ bw
        u -= np.einsum("ij,ij->i", u, x[orig])[:, None] * x[orig]
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        x[copy] = t * x[orig] + np.sqrt(1 - t * t) * u
        return x, np.minimum(orig, copy), np.maximum(orig, copy)
    return x, np.zeros(0, np.int64), np.zeros(0, np.int64)


def nn_profile(x: np.ndarray, rows: np.ndarray) -> list[float]:
    """Median cosine of the 1st and 10th nearest neighbour, and of a random pair, over `rows` of x."""
    import faiss

    D, _ = faiss.knn(x[rows], x, 11, metric=faiss.METRIC_INNER_PRODUCT)
    rand = np.einsum("ij,ij->i", x[rows], x[np.random.default_rng(5).choice(len(x), len(rows))])
    return [float(np.median(D[:, 1])), float(np.median(D[:, 10])), float(np.median(rand))]


def verify_rate(real_store: Path, k: int, loose: float, pairs: int, seed: int = 0) -> tuple[float, float]:
    """Verified pairs a second on one core (geometric verification of real Lite0 candidates of the grocery
    photos, their cached keypoints read first), and the real candidates per photo."""
    from neardup.search.join import candidate_pairs
    from neardup.search.verify import row_features, verify_pairs
    from neardup.store import Store

    with Store.open(real_store) as gen:
        I, J, _, _ = candidate_pairs(gen.vectors(), k, loose)
        sel = np.random.default_rng(seed).choice(len(I), min(pairs, len(I)), replace=False)
        rows, inv = np.unique(np.concatenate([I[sel], J[sel]]), return_inverse=True)
        feats = row_features(gen, rows)
        t0 = time.perf_counter()
        verify_pairs([feats[x] for x in inv[:len(sel)]], [feats[x] for x in inv[len(sel):]], workers=1, screen=True)
        return len(sel) / (time.perf_counter() - t0), len(I) / len(gen)


# ------------------------------------------------------------------------------------------ the child


def child(store: str, k: int, loose: float, out: str) -> None:
    """The candidate search alone in this process: its time, peak RSS and pairs."""
    from neardup.search.candidates import SearchStats, store_knn_pairs
    from neardup.store import Store

    stats = SearchStats()
    base = peak_rss_bytes()
    t0 = time.perf_counter()
    with Store.open(store) as gen:
        I, J, D = store_knn_pairs(gen, k, loose, stats=stats)
    wall = time.perf_counter() - t0
    np.savez(out, I=I, J=J, D=D)
    Path(out + ".json").write_text(json.dumps({"wall": wall, "peak": peak_rss_bytes(), "base": base,
                                               "stats": {**stats.__dict__}}))


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="200000,1000000", help="store sizes, comma-separated")
    p.add_argument("--real", default="/tmp/scale/lite0.h5", help="a Lite0 store of the grocery photos")
    p.add_argument("--copies", default="/tmp/scale/copies.h5", help="a Lite0 store of the copies set's copies")
    p.add_argument("--copies-csv", default="/tmp/scale/sets/copies.csv", help="the copies set's truth CSV")
    p.add_argument("--clusters", type=int, default=81, help="clusters of the fit (the dataset's products)")
    p.add_argument("--series", type=int, default=600, help="series of shots of the fit (second k-means level)")
    p.add_argument("--k", type=int, default=10, help="neighbours per photo (Lite0's candidate rule)")
    p.add_argument("--loose", type=float, default=0.80, help="candidate threshold (Lite0's candidate rule)")
    p.add_argument("--oracle-rows", type=int, default=2000, help="rows whose exact k-NN are the oracle")
    p.add_argument("--baseline-rows", type=int, default=2000, help="rows the former per-row path searches")
    p.add_argument("--verify-pairs", type=int, default=2000, help="real candidate pairs verified for the rate")
    p.add_argument("--workdir", default=None, help="where stores are written (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", nargs=4, metavar=("STORE", "K", "LOOSE", "OUT"), help=argparse.SUPPRESS)
    output_options(p)
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), float(args.child[2]), args.child[3])
        return 0
    import faiss

    from neardup.search.join import knn_pairs
    from neardup.store import Catalog, IndexInfo, ModelInfo, Store, StoreMeta, write_catalog
    from neardup.store.faiss_index import search
    from neardup.store.index_kinds import exact_scores, recall_at

    for need in (args.real, args.copies, args.copies_csv):
        if not Path(need).exists():
            print(f"missing {need}: see this script's docstring (neardup index ... --model efficientnet-lite0)",
                  file=sys.stderr)
            return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    report = Report("bench_million.py", "A million photos in one night: the candidate search of duplicates",
                    " ".join(__doc__.split("\n\n")[1].split()), params={
                        "sizes": sizes, "k": args.k, "loose": args.loose, "oracle rows": args.oracle_rows,
                        "fit": f"{args.real} ({args.clusters} products, {args.series} series)", "seed": args.seed})
    t0 = time.perf_counter()
    prm = fit(Path(args.real), Path(args.copies), Path(args.copies_csv), args.clusters, args.series, args.seed)
    FIT_CACHE.parent.mkdir(exist_ok=True)
    np.savez(FIT_CACHE, **{k: v for k, v in prm.items() if k != "real"})
    real = prm.pop("real")
    syn, _, _ = generate(prm, len(real), args.seed + 99)
    rows = np.random.default_rng(1).choice(len(real), 1000, replace=False)
    var = lambda x, q: float(np.linalg.eigvalsh(x.T @ x)[::-1][:q].sum() / np.einsum("ij,ij->", x, x))  # noqa: E731
    report.table("The generator against the real Lite0 vectors (same size)", [
        "vectors", "n", "median NN1 cosine", "median NN10 cosine", "median random-pair cosine",
        "share of x·x in 128 PCA dims (uncentred)"], [
        ["real Lite0 (grocery)", len(real), *nn_profile(real, rows), var(real, 128)],
        ["generated", len(syn), *nn_profile(syn, rows), var(syn, 128)]])
    cs = prm["copy_scores"]
    report.note(f"real copy cosines ({len(cs)} edited copies): min {cs.min():.3f}, median {np.median(cs):.3f}, "
                f"max {cs.max():.3f}; fitted in {time.perf_counter() - t0:.0f} s")
    del real, syn
    rate, real_per_photo = verify_rate(Path(args.real), args.k, args.loose, args.verify_pairs, args.seed)
    log(f"verification: {rate:.0f} pairs/s on one core; {real_per_photo:.2f} real candidates a photo")

    rows_out = []
    with tempfile.TemporaryDirectory(prefix="neardup-million-", dir=args.workdir) as tmp:
        for n in sizes:
            log(f"{n:,}: generating")
            xb, pi, pj = generate(prm, n, args.seed)
            d = xb.shape[1]
            store = Path(tmp) / f"s{n}.h5"
            meta = StoreMeta(ModelInfo("efficientnet-lite0", "bench", "bench", dim=d, input_size=224,
                                       preprocessing="bench: Lite0-like vectors", runtime="numpy"),
                             next_id=n, index=IndexInfo(kind="auto"))
            cat = Catalog(meta, np.arange(n, dtype=np.int64), [f"p/{i}.jpg" for i in range(n)],
                          np.ones(n, np.int64), np.ones(n, np.int64), [f"{i:064x}" for i in range(n)],
                          np.full(n, 8, np.int32), np.full(n, 8, np.int32), xb)
            log(f"{n:,}: writing the store (index auto: trained, tuned)")
            t0 = time.perf_counter()
            write_catalog(store, cat)
            write_s = time.perf_counter() - t0
            del cat
            ids = np.arange(n, dtype=np.int64)
            rng = np.random.default_rng(args.seed + 7)
            with Store.open(store) as gen:
                factory, params, tuned = gen.meta.index.factory, gen.meta.index.params, gen.meta.index.recall
                index_bytes = gen.disk_bytes().get("index", 0) or sum(
                    v for key, v in gen.disk_bytes().items() if "index" in key)
                index = gen.index
                xq = xb[rng.choice(n, 300, replace=False)]
                gt_d, gt = faiss.knn(xq, xb, 10, metric=faiss.METRIC_INNER_PRODUCT)
                I = index.search(xq, 10)[1]
                r10 = recall_at(I, gt, exact_scores(xq, xb, ids, I), gt_d[:, -1])
                search(index, xq[:1], 10)
                ms = []
                for q in xq[:100]:
                    t1 = time.perf_counter()
                    search(index, q[None], 10)
                    ms.append(1e3 * (time.perf_counter() - t1))
                base_rows = np.sort(rng.choice(n, args.baseline_rows, replace=False))
                t1 = time.perf_counter()
                knn_pairs(xb, args.k, args.loose, index, ids, rows=base_rows)
                base_s = (time.perf_counter() - t1) * n / len(base_rows)
                del index
            log(f"{n:,}: {factory} {params}: recall@10 {r10:.3f}, p50 {percentile(ms, 50):.1f} ms; former path "
                f"projected {base_s / 60:.1f} min; candidate search in a subprocess")
            out = str(Path(tmp) / f"pairs{n}")
            t1 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "--child", str(store), str(args.k), str(args.loose), out],
                           check=True)
            child_wall = time.perf_counter() - t1
            got = np.load(out + ".npz")
            info = json.loads(Path(out + ".json").read_text())
            I, J, D = got["I"], got["J"], got["D"]
            keys = I * n + J
            # oracle: exact k nearest of sampled rows (itself excluded), those scoring >= loose
            orows = np.sort(rng.choice(n, args.oracle_rows, replace=False))
            od, oi = faiss.knn(xb[orows], xb, args.k + 1, metric=faiss.METRIC_INNER_PRODUCT)
            src = np.repeat(orows, args.k + 1)
            ok = (oi.ravel() != src) & (od.ravel() >= args.loose)
            want = np.unique(np.minimum(src, oi.ravel())[ok] * n + np.maximum(src, oi.ravel())[ok])
            cand_recall = float(np.isin(want, keys).mean()) if len(want) else 1.0
            planted = float(np.isin(pi * n + pj, keys).mean()) if len(pi) else float("nan")
            check = np.random.default_rng(3).choice(len(I), min(len(I), 20_000), replace=False)
            exact_ok = bool(np.allclose(np.einsum("ij,ij->i", xb[I[check]], xb[J[check]]), D[check], atol=1e-5)
                            and (D >= args.loose).all())
            st = info["stats"]
            rows_out.append((n, factory, params, write_s, index_bytes, tuned, r10, percentile(ms, 50), info,
                             cand_recall, len(want), planted, len(pi), len(I), base_s, child_wall, exact_ok))
            log(f"{n:,}: candidate search {info['wall']:.0f} s, peak RSS {info['peak'] / GB:.2f} GB, candidate-set "
                f"recall {cand_recall:.3f}, planted {planted:.3f}; {st}")
            report.check(f"{n:,}: every pair scores >= loose and its score is exact", exact_ok)
            del xb
            for f in Path(tmp).iterdir():
                if f.is_file() and f.name.startswith(("pairs", f"s{n}")):
                    f.unlink()
                elif f.is_dir():
                    __import__("shutil").rmtree(f)

    report.table("The store's index (written by write_catalog, index auto)", [
        "n", "index", "knob", "store write + index build s", "index bytes", "recall@10 at build (ties count)",
        "recall@10 held-out (ties count)", "one query p50 ms"], [
        [r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]] for r in rows_out])
    report.table("The candidate search of duplicates (its own process; k nearest >= loose, re-scored exactly)", [
        "n", "PCA dims / lists / nprobe / depth", "codes bytes", "seconds: sample+PCA / IVF build / search / "
        "exact re-scoring", "passes over the stored vectors", "total s", "peak RSS GB", "candidate-set recall "
        "(exact pairs of sampled rows)", "planted pairs found", "neighbours kept by the bound / distinct pairs scored "
        "exactly", "pairs", "former path (per-row k-NN of the "
        "index), projected s"], [
        [r[0], f"{r[8]['stats']['dims']} / {r[8]['stats']['nlist']} / {r[8]['stats']['nprobe']} / "
               f"{r[8]['stats']['depth']}", r[8]['stats']['code_bytes'],
         " / ".join(f"{v:.0f}" for v in r[8]['stats']['seconds'].values()), r[8]['stats']['passes'], r[8]['wall'],
         r[8]['peak'] / GB, f"{r[9]:.4f} of {r[10]:,}", f"{r[11]:.4f} of {r[12]:,}",
         f"{r[8]['stats']['bound_kept']:,} / {r[8]['stats']['scored']:,}", r[13], r[14]]
        for r in rows_out])
    for r in rows_out:
        n, wall, peak = r[0], r[8]["wall"], r[8]["peak"]
        report.target(f"{n:,}: candidate search minutes (2 cores)", wall / 60, "<= 20", wall <= 1200)
        report.target(f"{n:,}: candidate search peak RSS GB", peak / GB, "<= 2", peak <= 2 * GB)
        report.target(f"{n:,}: candidate-set recall", r[9], ">= 0.95", r[9] >= 0.95)
        report.target(f"{n:,}: speed-up over the former path (projected)", r[14] / wall, "> 1", r[14] > wall)
    report.table("Verification of the candidates (real Lite0 candidates of the grocery photos, one core)", [
        "n", "verified pairs a second, per core", "candidates a photo (real grocery: "
        f"{real_per_photo:.2f})", "verification projected at that rate on 2 cores, min"], [
        [r[0], rate, r[13] / r[0], r[13] / rate / 2 / 60] for r in rows_out])
    report.note("Verification minutes are projected from the measured rate and the pairs found (synthetic vectors "
                "have no photos to verify), not measured.")
    report.note("The former path's time is projected from --baseline-rows rows searched (linear in rows), not "
                "measured whole; everything else is measured.")
    status = report.finish(args.json)
    if args.record:
        append_results("A million photos in one night (issue 29)", "bench_million.py", report,
                       "One process for the store and the oracle, one subprocess for the candidate search; the "
                       "machine was shared with other engineers' runs (timings are noisy).")
    return status


if __name__ == "__main__":
    sys.exit(main())
