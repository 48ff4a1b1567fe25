"""All-pairs near-duplicates: neardup's exact blocked self-join versus the seed's per-pair loop and FAISS.

Question: how long does finding every pair of a catalogue with cosine >= threshold take at 10k and 50k
2048-d vectors, how much memory does it need, and is the pair set exactly right?

Data: synthetic unit vectors with planted near-duplicates (1% of rows get 1-3 perturbed copies at cosine
0.93-0.99 to their original). Two backgrounds: "random" (Gaussian, so non-duplicates are nearly
orthogonal: easy) and "clustered" (small clusters whose members sit at cosine ~0.70-0.92 from each other,
so many non-duplicate pairs lie near the threshold: the hard case for exactness).

Each timed case (neardup `self_join`, neardup `find_duplicates` on an HDF5 store written with
`write_catalog`, FAISS `IndexFlatIP.range_search`) runs in its own subprocess, so its peak RSS increase
(BLAS buffers included, which tracemalloc cannot see) is measured on its own. The seed's method, a Python
double loop of `np.dot(a, b) / (norm(a) * norm(b))`, is timed on a random sample of pairs and extrapolated
to n(n-1)/2 pairs.

Correctness (exit status 1 when violated): the pair set of `self_join` equals the exact brute-force set
(full rectangular numpy blocks) at n <= --full-check-max; above it, every planted pair is found, every
found pair truly scores >= threshold (float64), and the set is complete on a random block of rows.
`find_duplicates` must report the same pairs, and FAISS must agree. Pairs whose float64 score lies within
--tie-eps of the threshold may differ between methods (float32 rounding) and are counted, not failed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common import Report, base_parser, log, peak_rss_bytes, reset_peak_rss, rss_bytes, synthetic_catalog, unit_rows

D = 2048
MIB = 1 << 20


# ------------------------------------------------------------------------------------------ data


@dataclass
class Planted:
    """Rows of the planted near-duplicate pairs (i < j) and their constructed cosine."""

    i: np.ndarray
    j: np.ndarray
    cos: np.ndarray


def make_vectors(n: int, variant: str, seed: int, dup_fraction: float = 0.01, d: int = D,
                 cos_range: tuple[float, float] = (0.93, 0.99), cluster_size: int = 8,
                 cluster_rho: tuple[float, float] = (0.70, 0.92)) -> tuple[np.ndarray, Planted]:
    """n float32 unit vectors of dimension d (rows shuffled) and the planted duplicate pairs.

    `dup_fraction` of the originals get 1-3 copies `t*b + sqrt(1-t^2)*u` (u a unit vector orthogonal to
    b), so cos(b, copy) = t exactly, t uniform in `cos_range`. In the "clustered" variant, background rows
    are sqrt(rho)*centre + sqrt(1-rho)*noise with rho uniform in `cluster_rho`, so two members of a
    cluster score about sqrt(rho_a * rho_b): many fall within a few hundredths of a 0.90 threshold.
    """
    rng = np.random.default_rng(seed)
    n_orig = max(1, round(n * dup_fraction))
    counts = rng.integers(1, 4, n_orig)
    while counts.sum() > n // 2:  # tiny n: keep the copies a minority
        counts = np.maximum(counts - 1, 1)
        n_orig = max(1, n_orig // 2)
        counts = counts[:n_orig]
    n_copies = int(counts.sum())
    n_bg = n - n_copies
    xb = np.empty((n, d), np.float32)
    step = 8192
    if variant == "random":
        for r in range(0, n_bg, step):
            xb[r:min(r + step, n_bg)] = rng.standard_normal((min(step, n_bg - r), d), dtype=np.float32)
    elif variant == "clustered":
        n_clusters = -(-n_bg // cluster_size)
        centres = unit_rows(rng.standard_normal((n_clusters, d), dtype=np.float32))
        labels = rng.permutation(np.arange(n_bg) // cluster_size)
        rho = rng.uniform(*cluster_rho, n_bg).astype(np.float32)
        for r in range(0, n_bg, step):
            e = min(r + step, n_bg)
            noise = unit_rows(rng.standard_normal((e - r, d), dtype=np.float32))
            xb[r:e] = np.sqrt(rho[r:e, None]) * centres[labels[r:e]] + np.sqrt(1 - rho[r:e, None]) * noise
    else:
        raise ValueError(f"unknown variant {variant!r}")
    unit_rows(xb[:n_bg])  # in place (a view of xb)
    originals = rng.choice(n_bg, n_orig, replace=False)
    src = np.repeat(originals, counts)
    t = rng.uniform(*cos_range, n_copies).astype(np.float64)
    for r in range(0, n_copies, step):
        e = min(r + step, n_copies)
        b = xb[src[r:e]].astype(np.float64)
        u = rng.standard_normal((e - r, d))
        u -= (u * b).sum(1, keepdims=True) * b
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        xb[n_bg + r:n_bg + e] = t[r:e, None] * b + np.sqrt(1 - t[r:e, None] ** 2) * u
    perm = rng.permutation(n)
    xb = xb[perm]
    pos = np.empty(n, np.int64)
    pos[perm] = np.arange(n)
    a, b = pos[src], pos[n_bg + np.arange(n_copies)]
    return np.ascontiguousarray(xb), Planted(np.minimum(a, b), np.maximum(a, b), t)


# ------------------------------------------------------------------------------------------ reference


def brute_force_rows(xb: np.ndarray, rows: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact pairs (i < j) with xb[i].xb[j] >= threshold for i or j in `rows`: full rectangular blocks."""
    n = len(xb)
    out_i, out_j = [], []
    block = max(1, (64 * MIB) // (4 * n))
    for r in range(0, len(rows), block):
        q = rows[r:r + block]
        sims = xb[q] @ xb.T
        a, j = np.nonzero(sims >= threshold)
        i = q[a]
        keep = i != j
        out_i.append(np.minimum(i[keep], j[keep]))
        out_j.append(np.maximum(i[keep], j[keep]))
    keys = np.unique(np.concatenate(out_i) * n + np.concatenate(out_j)) if out_i else np.zeros(0, np.int64)
    return keys // n, keys % n


def near_threshold_count(xb: np.ndarray, rows: np.ndarray, threshold: float, band: float = 0.02) -> int:
    """Pairs (i in rows, j != i) whose cosine lies within +-band of the threshold (how hard the data is)."""
    block = max(1, (64 * MIB) // (4 * len(xb)))
    total = 0
    for r in range(0, len(rows), block):
        q = rows[r:r + block]
        sims = xb[q] @ xb.T
        sims[np.arange(len(q)), q] = 0.0
        total += int(np.count_nonzero(np.abs(sims - threshold) < band))
    return total


def exact_scores(xb: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """float64 inner products of the row pairs (i, j)."""
    out = np.empty(len(i), np.float64)
    for r in range(0, len(i), 4096):
        out[r:r + 4096] = (xb[i[r:r + 4096]].astype(np.float64) * xb[j[r:r + 4096]]).sum(1)
    return out


@dataclass
class Diff:
    """How a found pair set differs from an expected one."""

    missing: int  #: expected, not found, clearly above the threshold
    extra: int  #: found, not expected, clearly below the threshold
    ties: int  #: differences within tie_eps of the threshold (float32 rounding; tolerated)

    @property
    def ok(self) -> bool:
        """No difference beyond rounding ties."""
        return self.missing == 0 and self.extra == 0

    def __str__(self) -> str:
        return f"missing {self.missing}, extra {self.extra}, threshold ties {self.ties}"


def compare_pairs(xb: np.ndarray, found: tuple[np.ndarray, np.ndarray], expected: tuple[np.ndarray, np.ndarray],
                  threshold: float, tie_eps: float) -> Diff:
    """Compare two pair sets, judging every difference by its float64 score."""
    n = len(xb)
    fk = np.unique(found[0] * n + found[1])
    ek = np.unique(expected[0] * n + expected[1])
    miss = np.setdiff1d(ek, fk, assume_unique=True)
    extra = np.setdiff1d(fk, ek, assume_unique=True)
    s_miss = exact_scores(xb, miss // n, miss % n)
    s_extra = exact_scores(xb, extra // n, extra % n)
    ties = int(np.count_nonzero(np.abs(s_miss - threshold) <= tie_eps)
               + np.count_nonzero(np.abs(s_extra - threshold) <= tie_eps))
    return Diff(int(np.count_nonzero(s_miss > threshold + tie_eps)),
                int(np.count_nonzero(s_extra < threshold - tie_eps)), ties)


def seed_loop_seconds_per_pair(xb: np.ndarray, threshold: float, pairs: int, seed: int) -> float:
    """The seed's method, timed per pair: Python loops over pairs with np.dot(a, b) / (norm(a) * norm(b))."""
    from numpy.linalg import norm

    rng = np.random.default_rng(seed)
    n = len(xb)
    I = rng.integers(0, n, pairs)
    J = (I + rng.integers(1, n, pairs)) % n
    hits = 0
    for i, j in zip(I[:200].tolist(), J[:200].tolist()):  # warm-up
        a, b = xb[i], xb[j]
        _ = np.dot(a, b) / (norm(a) * norm(b))
    t0 = time.perf_counter()
    for i, j in zip(I.tolist(), J.tolist()):
        a, b = xb[i], xb[j]
        if np.dot(a, b) / (norm(a) * norm(b)) >= threshold:
            hits += 1
    return (time.perf_counter() - t0) / pairs


# ------------------------------------------------------------------------------------------ children


def child(kind: str, data: str, store: str, threshold: float, repeats: int, out: str) -> None:
    """Run one timed case in this (fresh) process; write its timings and pairs to `out` (.npz)."""
    times, peaks = [], []
    base = 0
    if kind == "selfjoin":
        from neardup.search.join import self_join

        xb = np.load(data)
        self_join(xb[:1024], threshold)  # warm-up: BLAS threads and buffers
        for _ in range(repeats):
            base = rss_bytes()
            reset_peak_rss()
            t0 = time.perf_counter()
            I, J, _ = self_join(xb, threshold)
            times.append(time.perf_counter() - t0)
            peaks.append(peak_rss_bytes() - base)
            del _
    elif kind == "find":
        from neardup.search.duplicates import find_duplicates
        from neardup.search.join import self_join

        self_join(unit_rows(np.random.default_rng(0).standard_normal((1024, D), dtype=np.float32)), threshold)
        for _ in range(repeats):
            base = rss_bytes()
            reset_peak_rss()
            t0 = time.perf_counter()
            rep = find_duplicates(store, threshold=threshold)
            times.append(time.perf_counter() - t0)
            peaks.append(peak_rss_bytes() - base)
            I = np.array([p.a_id for p in rep.pairs], np.int64)
            J = np.array([p.b_id for p in rep.pairs], np.int64)
            groups = len(rep.groups)
            del rep
    elif kind == "faiss":
        import faiss

        xb = np.load(data)
        n, d = xb.shape
        radius = float(np.nextafter(np.float32(threshold), np.float32(-1)))  # FAISS keeps scores > radius
        warm = faiss.IndexFlatIP(d)
        warm.add(xb[:1024])
        warm.range_search(xb[:256], radius)
        del warm
        for _ in range(repeats):
            base = rss_bytes()
            reset_peak_rss()
            t0 = time.perf_counter()
            index = faiss.IndexFlatIP(d)
            index.add(xb)
            out_i, out_j = [], []
            for r in range(0, n, 4096):
                lims, _, labels = index.range_search(xb[r:r + 4096], radius)
                rows = np.repeat(np.arange(r, min(r + 4096, n)), np.diff(lims).astype(np.int64))
                keep = labels > rows
                out_i.append(rows[keep])
                out_j.append(labels[keep])
            times.append(time.perf_counter() - t0)
            peaks.append(peak_rss_bytes() - base)
            del index
            I, J = np.concatenate(out_i), np.concatenate(out_j)
    else:
        raise SystemExit(f"unknown child kind {kind}")
    np.savez(out, I=I, J=J, times=np.array(times), peaks=np.array(peaks),
             groups=np.array(groups if kind == "find" else -1))


def run_child(kind: str, data: Path, store: Path, threshold: float, repeats: int, workdir: Path) -> dict:
    """Run `child` in a fresh interpreter and return its results."""
    out = workdir / f"{kind}.npz"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--data", str(data), "--store",
           str(store), "--threshold", repr(threshold), "--repeats", str(repeats), "--child-out", str(out)]
    subprocess.run(cmd, check=True)
    with np.load(out) as z:
        res = {k: z[k] for k in z.files}
    out.unlink()
    return res


# ------------------------------------------------------------------------------------------ main


def bench_case(report: Report, n: int, variant: str, args: argparse.Namespace, workdir: Path, rows_time: list,
               rows_data: list, rows_seed: list) -> None:
    """Generate one data set, time every method on it, and check the pair sets."""
    from neardup.store import write_catalog

    t = args.threshold
    log(f"n={n} {variant}: generating vectors")
    xb, planted = make_vectors(n, variant, seed=args.seed + n)
    nbytes = xb.nbytes
    data = workdir / "xb.npy"
    np.save(data, xb)
    store = workdir / "dups.h5"
    t0 = time.perf_counter()
    write_catalog(store, synthetic_catalog(xb))
    write_s = time.perf_counter() - t0

    log(f"n={n} {variant}: self_join")
    sj = run_child("selfjoin", data, store, t, args.repeats, workdir)
    found = (sj["I"], sj["J"])
    log(f"n={n} {variant}: find_duplicates")
    fd = run_child("find", data, store, t, args.repeats, workdir)
    fa = None
    if not args.no_faiss:
        log(f"n={n} {variant}: FAISS range_search")
        fa = run_child("faiss", data, store, t, args.repeats, workdir)
    per_pair = seed_loop_seconds_per_pair(xb, t, args.seed_pairs, args.seed)
    all_pairs = n * (n - 1) // 2

    # correctness of self_join
    rng = np.random.default_rng(args.seed + 7)
    label = f"n={n:,} {variant}"
    if n <= args.full_check_max:
        log(f"{label}: exact brute force over all rows")
        rows = np.arange(n)
        expected = brute_force_rows(xb, rows, t)
        diff = compare_pairs(xb, found, expected, t, args.tie_eps)
        report.check(f"{label}: self_join == exact brute force (all {all_pairs:,} pairs)", diff.ok,
                     f"{len(found[0]):,} found vs {len(expected[0]):,} expected; {diff}")
        checked_rows = rows
    else:
        log(f"{label}: planted pairs, false positives, random row block")
        scores = exact_scores(xb, *found)
        bad = int(np.count_nonzero(scores < t - args.tie_eps))
        report.check(f"{label}: no false positive (float64 rescoring of all found pairs)", bad == 0,
                     f"{bad} of {len(scores):,} found pairs score below the threshold")
        checked_rows = np.sort(rng.choice(n, min(n, args.check_rows), replace=False))
        expected = brute_force_rows(xb, checked_rows, t)
        in_rows = np.isin(found[0], checked_rows) | np.isin(found[1], checked_rows)
        diff = compare_pairs(xb, (found[0][in_rows], found[1][in_rows]), expected, t, args.tie_eps)
        report.check(f"{label}: complete on {len(checked_rows)} random rows (all their pairs, brute force)",
                     diff.ok, f"{int(in_rows.sum()):,} found vs {len(expected[0]):,} expected; {diff}")
    planted_found = int(np.isin(planted.i * n + planted.j, found[0] * n + found[1]).sum())
    report.check(f"{label}: every planted pair found (cosine {planted.cos.min():.3f}-{planted.cos.max():.3f})",
                 planted_found == len(planted.i), f"{planted_found:,} of {len(planted.i):,}")
    sample = checked_rows[:2000]
    near = near_threshold_count(xb, sample, t) * n / len(sample) / 2
    rows_data.append([n, variant, len(planted.i), planted_found, len(found[0]), round(near), write_s])

    # the same self_join runs in both, bit for bit today; args.tie_eps keeps the check valid if their blocks differ
    fd_diff = compare_pairs(xb, (fd["I"], fd["J"]), found, t, args.tie_eps)
    report.check(f"{label}: find_duplicates reports the same pairs as self_join", fd_diff.ok,
                 f"{len(fd['I']):,} pairs, {int(fd['groups']):,} groups; {fd_diff}")
    if fa is not None:
        fa_diff = compare_pairs(xb, (fa["I"], fa["J"]), found, t, args.tie_eps)
        report.check(f"{label}: FAISS range_search agrees with self_join", fa_diff.ok,
                     f"{len(fa['I']):,} FAISS pairs; {fa_diff}")

    def summary(res: dict, mem_includes_xb: bool) -> tuple[float, float, float]:
        secs = float(np.median(res["times"]))
        extra = float(np.max(res["peaks"]))
        return secs, extra / MIB, (extra if mem_includes_xb else nbytes + extra) / nbytes

    sj_s, sj_mib, sj_ratio = summary(sj, False)
    fd_s, fd_mib, fd_ratio = summary(fd, True)
    rows_time.append([n, variant, "neardup self_join", sj_s, sj_mib, sj_ratio, len(sj["I"])])
    rows_time.append([n, variant, "neardup find_duplicates (HDF5 read + join + groups)", fd_s, fd_mib, fd_ratio,
                      len(fd["I"])])
    if fa is not None:
        rows_time.append([n, variant, "FAISS IndexFlatIP add + range_search (reference)", *summary(fa, False),
                          len(fa["I"])])
    seed_s = per_pair * all_pairs
    rows_time.append([n, variant, f"seed: Python pair loop, {per_pair * 1e6:.2f} µs/pair × {all_pairs:,} pairs",
                      seed_s, float("nan"), float("nan"), float("nan")])
    rows_seed.append([n, variant, per_pair * 1e6, seed_s / 3600, seed_s / sj_s])

    report.target(f"self_join peak memory / vector bytes, n={n:,} {variant}", sj_ratio, "<= 2.0", sj_ratio <= 2.0)
    if n == 50_000:
        report.target(f"self_join wall time, n=50,000 {variant} (s)", sj_s, "<= 60", sj_s <= 60)
        report.target(f"find_duplicates wall time, n=50,000 {variant} (s)", fd_s, "<= 60", fd_s <= 60)
    for p in (data, store):
        p.unlink(missing_ok=True)


def main() -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000], help="numbers of vectors")
    p.add_argument("--variants", nargs="+", default=["random", "clustered"], choices=["random", "clustered"])
    p.add_argument("--threshold", type=float, default=0.90, help="cosine threshold (resnet50's default)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per case (median reported)")
    p.add_argument("--seed-pairs", type=int, default=20_000, help="pairs timed for the seed's loop")
    p.add_argument("--full-check-max", type=int, default=10_000,
                   help="largest n checked against the full brute-force set")
    p.add_argument("--check-rows", type=int, default=512, help="random rows brute-forced above --full-check-max")
    p.add_argument("--tie-eps", type=float, default=2e-5, help="score distance from the threshold counted as a tie")
    p.add_argument("--no-faiss", action="store_true", help="skip the FAISS reference")
    p.add_argument("--seed", type=int, default=0, help="random seed of the data")
    p.add_argument("--child", help=argparse.SUPPRESS, default=None)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.data, args.store, args.threshold, args.repeats, args.child_out)
        return 0

    report = Report("bench_duplicates.py", "All-pairs near-duplicates (synthetic 2048-d vectors)",
                    "How fast and how memory-hungry is neardup's exact self-join at 10k/50k vectors, versus the "
                    "seed's Python pair loop and FAISS range_search, and is its pair set exact?",
                    params={"sizes": args.sizes, "variants": args.variants, "threshold": args.threshold,
                            "repeats": args.repeats, "seed_pairs": args.seed_pairs, "dim": D,
                            "threads (OMP/BLAS)": os.environ.get("OMP_NUM_THREADS", "default")})
    rows_time: list = []
    rows_data: list = []
    rows_seed: list = []
    with tempfile.TemporaryDirectory(prefix="neardup-bench-dups-") as tmp:
        for n in args.sizes:
            for variant in args.variants:
                bench_case(report, n, variant, args, Path(tmp), rows_time, rows_data, rows_seed)
    report.table("Data sets", ["n", "background", "planted pairs", "planted found", "pairs >= threshold",
                               "≈ pairs within ±0.02 of threshold", "store write s (write_catalog)"], rows_data)
    report.table("Wall time and peak memory (each case in a fresh process, warm-up excluded)",
                 ["n", "background", "method", "seconds", "peak extra MiB", "peak / vector bytes", "pairs"],
                 rows_time)
    report.table("Seed's method (per-pair Python loop) extrapolated to all pairs",
                 ["n", "background", "µs per pair", "hours for n(n-1)/2 pairs", "× slower than self_join"],
                 rows_seed)
    report.note("peak / vector bytes: (vectors + peak RSS increase during the call) / bytes of the float32 vectors "
                "for self_join and FAISS (the vectors are already loaded); for find_duplicates the increase "
                "already contains reading the vectors from the store, so it is the increase alone.")
    report.note("find_duplicates reads a store just written by this process' parent: the file is in the page cache.")
    report.note("The seed's loop is timed on random pairs and multiplied by n(n-1)/2; it has no memory cost "
                "beyond the vectors (n/a).")
    return report.finish(args.json)


if __name__ == "__main__":
    sys.exit(main())
