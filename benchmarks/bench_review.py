"""Issue 31 items 1 and 3: what remembering review decisions costs `duplicates`, and the journal's own speed.

A store of planted near-duplicate vectors (bench_duplicates.make_vectors, "clustered") is written with
write_catalog; `duplicates` (exact join, no verification) finds its pairs; then a share of them is decided: half
distinct, a quarter duplicate with a keeper, recorded as one batch in the store's journal. Measured in one process,
alternating the two so the machine's load falls on both: find_duplicates with the decisions applied against without
them (decisions=False, the baseline); the journal read (parse and check every record); one `record_decision` (open
the store or, as the review page does, use the open generation; append one batch, fsync); `import_decisions` of a
CSV of 1,000 rows. Checks (the script exits 1 when one fails): the pairs listed are exactly the search's pairs but
the distinct ones, no group holds a distinct pair, and every confirmed pair is marked.
"""
from __future__ import annotations

import csv
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_duplicates import make_vectors
from common import Report, append_results, log, median, output_options


def main() -> int:
    p = __import__("argparse").ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000, help="rows in the store")
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--decide", type=float, default=0.5, help="share of the pairs found that are decided")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    output_options(p)
    args = p.parse_args()

    from neardup.search.duplicates import find_duplicates
    from neardup.search.review import decisions_for, import_decisions, record_decision
    from neardup.store import Catalog, ModelInfo, StoreMeta, write_catalog
    from neardup.store.decisions import Decision, Journal
    from neardup.store.generation import Generation

    report = Report("bench_review.py", f"Review decisions applied by duplicates ({args.n:,} x {args.d})",
                    " ".join(__doc__.split("\n\n")[1].split()),
                    params={"n": args.n, "d": args.d, "threshold": args.threshold, "decide": args.decide,
                            "repeat": args.repeat, "seed": args.seed})
    with tempfile.TemporaryDirectory(prefix="neardup-bench-review-") as tmp:
        store = Path(tmp) / "catalog.h5"
        xb, _ = make_vectors(args.n, "clustered", seed=args.seed, d=args.d)
        shas = [hashlib.sha256(f"photo {i}".encode()).hexdigest() for i in range(args.n)]
        meta = StoreMeta(ModelInfo("bench", "none", "none", dim=args.d, input_size=16, preprocessing="bench",
                                   runtime="numpy"), next_id=args.n)
        write_catalog(store, Catalog(meta, np.arange(args.n, dtype=np.int64), [f"p{i:06d}.jpg" for i in range(args.n)],
                                     np.full(args.n, 1000, np.int64), np.zeros(args.n, np.int64), shas,
                                     np.full(args.n, 8, np.int32), np.full(args.n, 8, np.int32), xb))
        plain = find_duplicates(store, threshold=args.threshold)
        rows = sorted({(min(int(a), int(b)), max(int(a), int(b))) for a, b in zip(plain.I, plain.J)})
        rng = np.random.default_rng(args.seed)
        picked = [rows[k] for k in rng.choice(len(rows), int(len(rows) * args.decide), replace=False)]
        distinct, confirmed = picked[: len(picked) * 2 // 3], picked[len(picked) * 2 // 3:]
        batch = ([Decision.make(shas[a], shas[b], "distinct", source="bench") for a, b in distinct]
                 + [Decision.make(shas[a], shas[b], "duplicate", shas[a], source="bench") for a, b in confirmed])
        log(f"{len(rows)} pairs at {args.threshold}; deciding {len(distinct)} distinct, {len(confirmed)} duplicate")
        t0 = time.perf_counter()
        Journal.of(store).append(batch)
        t_append = time.perf_counter() - t0

        t_with, t_without, t_read = [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            base = find_duplicates(store, threshold=args.threshold, decisions=False)
            t_without.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = find_duplicates(store, threshold=args.threshold)
            t_with.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            state = decisions_for(store)
            t_read.append(time.perf_counter() - t0)
        listed = {(min(int(a), int(b)), max(int(a), int(b))) for a, b in zip(got.I, got.J)}
        report.check("pairs listed = the search's pairs but the distinct ones", listed == set(rows) - set(distinct),
                     f"{len(listed)} listed, {len(rows)} found, {len(distinct)} distinct")
        bad = set(distinct)
        in_groups = [sorted(m.id for m in g.members) for g in got.groups]
        report.check("no group holds a pair decided distinct",
                     not any((a, b) in bad for g in in_groups for i, a in enumerate(g) for b in g[i + 1:]))
        report.check("every confirmed pair is marked", len(got.decisions) == len(confirmed),
                     f"{len(got.decisions)} marked of {len(confirmed)}")
        report.check("the baseline lists every pair", base.n_pairs == len(rows))
        paths = plain.paths
        csv_path = Path(tmp) / "in.csv"
        with open(csv_path, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["a", "b", "decision"])
            w.writerows([paths[a], paths[b], "duplicate"] for a, b in distinct[:1000])
        t0 = time.perf_counter()
        imported = import_decisions(store, csv_path)
        t_import = time.perf_counter() - t0
        # one decision at a time, as a script does (the store's path: opened per call) and as the review page
        # does (the service's open generation: its photos' look-up is built once), alternated
        t_record, t_page = [], []
        with Generation.open(store) as gen:
            for k, (a, b) in enumerate(confirmed[:40]):
                t0 = time.perf_counter()
                record_decision(store if k % 2 else gen, paths[a], paths[b], "distinct", source="bench")
                (t_record if k % 2 else t_page).append(time.perf_counter() - t0)
        records = len(Journal.of(store).path.read_bytes().splitlines())
        report.table("duplicates with and without the decisions (median of the runs, same process, alternated)",
                     ["pairs found", "decided", "without (s)", "with (s)", "with ÷ without"],
                     [[len(rows), len(picked), median(t_without), median(t_with),
                       median(t_with) / median(t_without)]])
        report.table("the journal", ["operation", "decisions", "seconds"],
                     [["append one batch", len(batch), t_append],
                      ["read and check it all (median)", len(state.history), median(t_read)],
                      [f"import_decisions of a {min(1000, len(distinct))}-row CSV", imported.recorded, t_import],
                      ["record_decision on the store's path, one (median of 20)", 1, median(t_record)],
                      ["record_decision on an open generation (the page's), one (median of 20; the first "
                       "builds the look-up)", 1, median(t_page)]])
        report.notes.append(f"journal lines at the end: {records} (header + one per batch)")
    status = report.finish(args.json)
    if args.record:
        append_results(f"Review decisions in duplicates, {args.n:,} x {args.d} (issue 31)", "bench_review.py",
                       report, "One process on the shared 2-core machine (loaded by other engineers' tests); the "
                       "baseline (decisions=False) runs alternated with the measured one.")
    return status


if __name__ == "__main__":
    sys.exit(main())
