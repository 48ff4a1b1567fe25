"""Nightly re-index cost: first index, a no-change update, and an update after 1% of the files changed.

Question: does an update cost in proportion to what changed? On N photos (grocery photos when ../shared is
present, else synthetic JPEGs), copied into a temporary catalogue folder, time (1) a first `build_index`,
(2) `update_index` with nothing changed, (3) `update_index` after 1% of files changed: a quarter touched
(new mtime, same bytes), a quarter re-encoded (new content), a quarter renamed, a quarter deleted, plus a
quarter as many new files again. Uses ResNet50 with weights="none" (same compute as ImageNet weights).

Correctness (exit status 1 when violated): the no-change update embeds nothing and writes nothing; the 1%
update embeds exactly the re-encoded and new files, and its counts (added, changed, moved, removed,
touched) are the planted ones; the store equals a fresh index of the final folder (ids aside).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import Report, base_parser, log, sample_photos


def main() -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="photos in the catalogue")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--photos", default=None, help="folder of JPEGs to sample from (default: grocery)")
    args = p.parse_args()

    from PIL import Image

    from neardup.embed.models import make_embedder
    from neardup.indexer.build import build_index, update_index
    from neardup.store import read_catalog

    rep = Report("bench_update.py", "Nightly re-index: first index, no-change update, 1% change update",
                 "Does an update cost in proportion to what changed?", params={"n": args.n,
                                                                             "batch_size": args.batch_size})
    with tempfile.TemporaryDirectory(prefix="neardup-bench-update-") as tmp:
        tmp = Path(tmp)
        k = max(1, args.n // 400)  # 1% of the files, in 4 kinds of change of k files each (+ k new files)
        sample = sample_photos(args.n + k, tmp, args.photos)
        rep.note(f"photos: {sample.source}")
        cat_dir = tmp / "catalog"
        cat_dir.mkdir()
        files = []
        for i, src in enumerate(sample.paths[:args.n]):
            dst = cat_dir / f"p{i:05d}.jpg"
            shutil.copyfile(src, dst)
            files.append(dst)
        extra = sample.paths[args.n:]
        store = tmp / "catalog.h5"
        emb = make_embedder("resnet50", "none")  # built once: model construction is not what is measured
        log(f"first index of {args.n} photos")
        t = time.perf_counter()
        first = build_index([cat_dir], store, embedder=emb, batch_size=args.batch_size)
        t_first = time.perf_counter() - t
        t = time.perf_counter()
        same = update_index([cat_dir], store, embedder=emb, batch_size=args.batch_size)
        t_same = time.perf_counter() - t

        touched, changed, moved, deleted = files[:k], files[k:2 * k], files[2 * k:3 * k], files[3 * k:4 * k]
        for f in touched:
            os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
        for f in changed:
            Image.open(f).convert("RGB").rotate(180).save(f, "JPEG", quality=85)
        for f in moved:
            f.rename(f.with_name("renamed_" + f.name))
        for f in deleted:
            f.unlink()
        for i, src in enumerate(extra[:k]):
            shutil.copyfile(src, cat_dir / f"new_{i:05d}.jpg")
        log("update after 1% changes")
        t = time.perf_counter()
        delta = update_index([cat_dir], store, embedder=emb, batch_size=args.batch_size)
        t_delta = time.perf_counter() - t
        fresh = tmp / "fresh.h5"
        build_index([cat_dir], fresh, embedder=emb, batch_size=args.batch_size)
        a, b = read_catalog(store), read_catalog(fresh)

    rep.table("Wall time (model construction excluded)", ["run", "seconds", "embedded", "img/s embedded",
                                                          "added", "changed", "moved", "removed", "touched",
                                                          "unchanged"],
              [["first index", t_first, first.embedded, first.embedded / t_first, first.added, 0, 0, 0, 0, 0],
               ["no-change update", t_same, same.embedded, "", same.added, same.changed, same.moved,
                same.removed, same.touched, same.unchanged],
               ["1% change update", t_delta, delta.embedded, "", delta.added, delta.changed, delta.moved,
                delta.removed, delta.touched, delta.unchanged]])
    rep.check("no-change update embeds and writes nothing", same.embedded == 0 and not same.wrote,
              f"embedded {same.embedded}, wrote {same.wrote}")
    planted = (k, k, k, k, k)
    got = (delta.added, delta.changed, delta.moved, delta.removed, delta.touched)
    rep.check("1% update counts are the planted ones (added, changed, moved, removed, touched)", got == planted,
              f"got {got}, planted {planted}")
    rep.check("1% update embeds only new and re-encoded files", delta.embedded == 2 * k,
              f"embedded {delta.embedded}, expected {2 * k}")
    # rows of a segmented store follow the order they were published in (an update appends): compare by path
    row_of = {p: i for i, p in enumerate(a.paths)}
    equal = sorted(a.paths) == sorted(b.paths) and np.allclose(a.xb[[row_of[p] for p in b.paths]], b.xb, atol=1e-5)
    rep.check("updated store equals a fresh index of the final folder (same paths, same vector per path)", equal,
              f"{len(a.paths)} rows updated, {len(b.paths)} fresh")
    rep.target("no-change update", t_same, "seconds, not minutes", t_same < 10)
    rep.target("1% update / first index", t_delta / t_first, "about 1-5 % (cost follows the change)",
               t_delta / t_first <= 0.10)
    return rep.finish(args.json)


if __name__ == "__main__":
    sys.exit(main())
