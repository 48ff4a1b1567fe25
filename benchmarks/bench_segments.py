"""Nightly updates of a large store: what a 1 % change writes and costs, against a full rewrite (issue 23).

Question: does an update write and cost in proportion to what changed, on a store of 200k x 2048-d vectors?
A catalogue folder of N small distinct PNGs (so the changed ones decode) and a store of N rows whose vectors
are bench_duplicates' "clustered" 2048-d vectors, written through the store's own API with each file's size,
mtime and content hash (so an update sees the unchanged files as unchanged, as after a real index run). The
index is the store's default kind (`auto`: IVF{2*sqrt(n)},SQ8 above 100k vectors) or `--index`. The changed
photos are embedded by a 2048-d random projection of their pixels (the model is not what is measured here).

Runs, one after another in one process: (1) an update with nothing changed; (2) an update after 1 % of the
files changed: a fifth each new content, renamed, deleted, touched (new mtime, same bytes), plus as many new
files; (3) the baseline, `update --compact` of the same folder: the scan, every row copied, the index trained
and tuned again, which is what every update did before segments (neardup <= 637cd09 rewrote the store and
retrained its index on each publish). Bytes written are the sizes of the files a run created (cross-checked
with the process's write() bytes, /proc/self/io wchar); store bytes are what the generation's files hold.

Correctness (exit status 1 when violated): the update's counts are the planted ones and it embeds only the new
and changed files; the changed rows hold the embedder's vectors; searches of the updated generation's index
equal numpy brute force over its live vectors (Flat) or reach the index's recorded recall (IVF).
"""
from __future__ import annotations

import hashlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_duplicates import make_vectors
from common import Report, append_results, log, output_options


def wchar() -> int:
    """Bytes this process passed to write() so far (0 where /proc has no io file)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def png(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def main() -> int:
    p = __import__("argparse").ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000, help="rows in the store")
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--index", default="auto", help="index kind of the store (auto, flat, ivf, ...)")
    p.add_argument("--change", type=float, default=0.01, help="share of the files changed")
    p.add_argument("--seed", type=int, default=0)
    output_options(p)
    args = p.parse_args()

    from neardup.indexer.build import update_index
    from neardup.indexer.scan import scan
    from neardup.store import Catalog, IndexInfo, ModelInfo, Store, StoreMeta, write_catalog
    from neardup.store.faiss_index import search
    from neardup.store.index_kinds import exact_scores, recall_at
    from neardup.testing import FakeEmbedder

    class Wide(FakeEmbedder):
        """FakeEmbedder's random projection, to the store's dimension."""

        name, dim, weights_fingerprint = "bench-wide", args.d, "bench"
        preprocessing = f"bench: 16x16 RGB, random projection to {args.d}"

    report = Report("bench_segments.py", f"Nightly update of a {args.n:,} x {args.d} store ({args.index} index)",
                    " ".join(__doc__.split("\n\n")[1].split()),
                    params={"n": args.n, "d": args.d, "index": args.index, "change": args.change, "seed": args.seed})
    with tempfile.TemporaryDirectory(prefix="neardup-bench-segments-") as tmp:
        tmp = Path(tmp)
        root, store = tmp / "photos", tmp / "catalog.h5"
        log(f"{args.n} small PNGs in {root}")
        t0 = time.perf_counter()
        names, shas = [], []
        for i in range(args.n):
            folder = root / f"{i // 5000:03d}"
            if i % 5000 == 0:
                folder.mkdir(parents=True)
            data = png(i)
            (folder / f"p{i:06d}.png").write_bytes(data)
            names.append(f"photos/{folder.name}/p{i:06d}.png")
            shas.append(hashlib.sha256(data).hexdigest())
        log(f"  {time.perf_counter() - t0:.0f} s; {args.n} x {args.d} clustered vectors")
        xb, _ = make_vectors(args.n, "clustered", seed=args.seed, d=args.d)
        st = [os.stat(tmp / n) for n in names]
        emb = Wide()
        meta = StoreMeta(ModelInfo(emb.name, "none", emb.weights_fingerprint, dim=args.d, input_size=emb.input_size,
                                   preprocessing=emb.preprocessing, runtime="numpy"),
                         next_id=args.n, index=IndexInfo(kind=args.index))
        cat = Catalog(meta, np.arange(args.n, dtype=np.int64), names, np.array([s.st_size for s in st], np.int64),
                      np.array([s.st_mtime_ns for s in st], np.int64), shas, np.full(args.n, 8, np.int32),
                      np.full(args.n, 8, np.int32), xb)
        log("first write of the store (index trained and tuned)")
        t0 = time.perf_counter()
        write_catalog(store, cat)
        t_first = time.perf_counter() - t0
        del cat, xb
        with Store.open(store) as gen:
            store_bytes = sum(gen.disk_bytes().values())
            factory, params = gen.meta.index.factory, gen.meta.index.params
        log(f"  {t_first:.0f} s, {store_bytes / 2**30:.2f} GiB, index {factory} {params}")

        t0 = time.perf_counter()
        found = scan([root], tmp)
        t_scan = time.perf_counter() - t0
        w0, t0 = wchar(), time.perf_counter()
        same = update_index([root], store, embedder=emb)
        t_same, w_same = time.perf_counter() - t0, wchar() - w0
        log(f"no-change update {t_same:.2f} s (its scan alone {t_scan:.2f} s of {len(found.files)} files)")

        k = max(1, round(args.n * args.change / 5))
        rng = np.random.default_rng(args.seed + 1)
        picks = rng.choice(args.n, 4 * k, replace=False)
        changed, moved, deleted, touched = (picks[j * k:(j + 1) * k] for j in range(4))
        for i in changed:
            (tmp / names[i]).write_bytes(png(10**7 + int(i)))
        for i in moved:
            (tmp / names[i]).rename((tmp / names[i]).with_name(f"moved_{i:06d}.png"))
        for i in deleted:
            (tmp / names[i]).unlink()
        for i in touched:
            os.utime(tmp / names[i], ns=(time.time_ns(), time.time_ns() + 10**9))
        (root / "new").mkdir()
        for j in range(k):
            (root / "new" / f"n{j:06d}.png").write_bytes(png(2 * 10**7 + j))
        log(f"update after {args.change:.0%} of the files changed ({k} of each kind)")
        w0, t0 = wchar(), time.perf_counter()
        delta = update_index([root], store, embedder=emb)
        t_delta, w_delta = time.perf_counter() - t0, wchar() - w0
        pub = delta.published
        log(f"  {t_delta:.2f} s, {pub.bytes_written / 2**20:.1f} MiB written")

        with Store.open(store) as gen:  # correctness of the updated generation
            cat = gen.catalog
            row = {pth: r for r, pth in enumerate(cat.paths)}
            got = gen.vectors(np.array([row[names[i]] for i in changed[:50]]))
            want = emb.embed(np.stack([np.asarray(__import__("PIL.Image").Image.open(tmp / names[i]).convert(
                "RGB").resize((16, 16), __import__("PIL.Image").Image.BILINEAR)) for i in changed[:50]]))
            vectors_ok = bool(np.allclose(got, want, atol=1e-4))
            sample = rng.choice(len(cat), 200, replace=False)
            xq = gen.vectors(sample)
            D, I = search(gen.index, xq, 10)
            xl = gen.vectors()
            S = xq @ xl.T
            top = np.argsort(-S, axis=1)[:, :10]
            gt = cat.ids[top]  # a result tying the 10th exact score counts (recall_at)
            recall = recall_at(I, gt, exact_scores(xq, xl, cat.ids, I), np.take_along_axis(S, top, 1)[:, -1])
            want_recall = gen.meta.index.recall
            del xl, S
            store_after = sum(gen.disk_bytes().values())
            segments_after = len(gen.segments)

        log("baseline: `update --compact` of the same folder (scan, every row copied, index trained and tuned)")
        w0, t0 = wchar(), time.perf_counter()
        full = update_index([root], store, embedder=emb, compact=True).published
        t_full, w_full = time.perf_counter() - t0, wchar() - w0
        log(f"  {t_full:.0f} s, {full.bytes_written / 2**30:.2f} GiB written")

    report.note(f"store: {args.n:,} rows x {args.d}-d, {store_bytes / 2**30:.2f} GiB on disk (vectors "
                f"{args.n * args.d * 4 / 2**30:.2f} GiB), index {factory} ({params or 'exact'}); first write "
                f"{t_first:.0f} s")
    report.table("What each run wrote and took (one process, one run each)",
                 ["run", "seconds", "rows written", "bytes written", "÷ store bytes", "÷ full rewrite time",
                  "write() bytes (/proc)"],
                 [["no-change update", t_same, 0, 0, 0.0, t_same / t_full, w_same],
                  [f"{args.change:.0%} change update", t_delta, pub.rows_written, pub.bytes_written,
                   pub.bytes_written / store_bytes, t_delta / t_full, w_delta],
                  ["update --compact: full rewrite (before segments: every update)", t_full, full.rows_written,
                   full.bytes_written, full.bytes_written / store_bytes, 1.0, w_full]])
    report.table("Inside the no-change update", ["part", "seconds"],
                 [["scan: list and stat every file", t_scan], ["the rest: open the store, read its catalogue, diff",
                                                               max(0.0, t_same - t_scan)]])
    report.note(f"the change: {k} each of new content, renamed, deleted, touched, and {k} new files; "
                f"{delta.embedded} embedded; after it {segments_after} segments, {store_after / 2**30:.2f} GiB")
    planted = (k, k, k, k, k)
    got = (delta.added, delta.changed, delta.moved, delta.removed, delta.touched)
    report.check("update counts are the planted ones (added, changed, moved, removed, touched)", got == planted,
                 f"got {got}, planted {planted}")
    report.check("only new and changed files were embedded", delta.embedded == 2 * k, f"{delta.embedded}")
    report.check("no-change update writes nothing", not same.wrote and same.embedded == 0)
    report.check("changed rows hold the embedder's vectors", vectors_ok)
    exact = factory == "Flat"
    report.check("index search of the updated generation: exact equals brute force, approximate reaches its "
                 "recorded recall", recall == 1.0 if exact else recall >= want_recall - 0.03,
                 f"recall@10 {recall:.3f} (recorded {want_recall:.3f})")
    report.target("1 % change update bytes ÷ store bytes", pub.bytes_written / store_bytes, "<= 0.05",
                  pub.bytes_written / store_bytes <= 0.05)
    report.target("1 % change update time ÷ full rewrite time", t_delta / t_full, "<= 0.10", t_delta / t_full <= 0.10)
    report.target("no-change update (s)", t_same, "<= 1", t_same <= 1.0)
    status = report.finish(args.json)
    if args.record:
        append_results(f"Nightly update of a {args.n:,} x {args.d}-d store, index {args.index} (issue 23)",
                       "bench_segments.py", report, "One process, both cores; the baseline runs in the same process.")
    return status


if __name__ == "__main__":
    sys.exit(main())
