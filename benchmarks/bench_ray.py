"""Indexing on Ray (issue 16): `index --ray` against the local path, on one machine, in one run.

How much does running the decode+embed phase on Ray (Ray Data, an actor pool) cost against the local
path on the same cores, and what would N such nodes give? The same photos are indexed into fresh stores
by the local path and by --ray on a local cluster of this machine's CPUs; the stores are compared (paths,
ids, vectors). Throughput counts the decode+embed phase (Ray's actor start included); the cluster's own
start is reported apart, as a job pays it once. The N-node figures are a projection from the measured
per-actor rate and the driver's measured time per row, not a measurement.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import GROCERY_DIR, Report, all_photos, append_results, link_photos, log, parse_real_photo_args


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=5000, help="photos indexed by each path")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="alternating local/Ray runs; medians are reported")
    parsed = parse_real_photo_args(p)
    if parsed is None:
        return 0
    args, spec, model_name = parsed
    try:
        import ray
    except ImportError:
        print("skipped: Ray is not installed (pip install 'neardup[ray]')")
        return 0
    from neardup.indexer.build import build_index
    from neardup.indexer.ray_job import BATCHES_PER_BLOCK, RayOptions
    from neardup.store import read_catalog

    found = all_photos(GROCERY_DIR)
    step = max(1, len(found) // args.photos)
    picked = found[::step][:args.photos]
    report = Report("bench_ray.py", "Indexing on Ray (issue 16)", " ".join(__doc__.split("\n\n")[1].split()),
                    params={"photos": len(picked), "batch size": args.batch_size, "repeats": args.repeats,
                            "model": model_name,
                            "cluster": "ray.init(num_cpus=2) on this machine: one actor of 2 CPUs"})
    with tempfile.TemporaryDirectory(prefix="neardup-bench-ray-") as tmp:
        tmp = Path(tmp)
        folder = link_photos(picked, tmp / "photos")
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        cluster_s = time.perf_counter() - t0
        runs: dict[str, list] = {"local": [], "ray": []}
        first: list[float] = []
        for r in range(args.repeats):
            for mode in ("local", "ray"):
                store = tmp / f"{mode}-{r}.h5"
                start, seen = time.perf_counter(), []

                def progress(done: int, total: int, seen: list = seen) -> None:
                    seen.append((time.perf_counter(), done))

                log(f"{mode} run {r + 1}/{args.repeats}: {len(picked)} photos")
                s = build_index([folder], store, batch_size=args.batch_size, progress=progress,
                                ray=RayOptions() if mode == "ray" else None, **spec)
                runs[mode].append(s)
                if mode == "ray":  # (seconds to the first batch back, rows/s after it)
                    (t1, n1), (t2, n2) = seen[0], seen[-1]
                    first.append((t1 - start, (n2 - n1) / max(t2 - t1, 1e-9)))
        ray.shutdown()
        a, b = read_catalog(tmp / "local-0.h5"), read_catalog(tmp / "ray-0.h5")
        same_rows = a.paths == b.paths and bool((a.ids == b.ids).all())
        gap = float(np.abs(a.xb - b.xb).max()) if same_rows else float("nan")

    def med(mode: str, attr: str) -> float:
        return float(np.median([getattr(s, attr) for s in runs[mode]]))

    local_ips, ray_ips = med("local", "images_per_second"), med("ray", "images_per_second")
    embedded = runs["ray"][0].embedded
    ray_embed_s = med("ray", "embed_seconds")
    start_s, steady = (float(np.median([f[k] for f in first])) for k in (0, 1))
    driver_per_row = med("ray", "driver_seconds") / max(embedded, 1)
    report.table("Decode+embed throughput, same photos, same machine", ["path", "img/s", "phase s", "run s", "ratio"], [
        ["local (threads + ONNX Runtime)", local_ips, med("local", "embed_seconds"), med("local", "seconds"), 1.0],
        ["--ray (1 actor, Ray Data)", ray_ips, ray_embed_s, med("ray", "seconds"), ray_ips / local_ips],
    ])
    report.table("Where Ray's time goes", ["part", "seconds", "note"], [
        ["cluster start (ray.init)", cluster_s, "once per job; not in the phase"],
        ["first rows at the driver", start_s, "from the run's start: scan, the driver's model check, the actor's "
                                             f"start (imports, model load), its first blocks ({BATCHES_PER_BLOCK} "
                                             "batches each; Ray Data hands a few over at once)"],
        ["rows after the first ones", f"{steady:.1f} img/s", "the rate rows reached the driver after that"],
        ["driver's own time on rows", med("ray", "driver_seconds"), f"{1e3 * driver_per_row:.2f} ms a row"],
    ])
    ceiling = 1.0 / driver_per_row if driver_per_row > 0 else float("inf")
    if steady > 0:  # a run whose rows all came back in the first blocks (a smoke run) has no steady rate
        report.table("Projection for N nodes like this one (not measured)", ["nodes", "actors", "img/s", "10M photos"],
                     [[n, n, min(n * steady, ceiling), f"{1e7 / min(n * steady, ceiling) / 3600:.1f} h"]
                      for n in (1, 4, 16, 64)])
    report.note(f"projection: N x the measured steady per-actor rate ({steady:.1f} img/s), capped by the driver's "
                f"measured time per returned row ({ceiling:.0f} rows/s); assumes the shared storage serves the "
                "photos at that rate and leaves out each actor's start")
    report.check("same paths and ids as the local store", same_rows, f"{len(a.paths)} rows")
    report.check("vectors within the runtime's tolerance", gap <= 1e-4, f"max |difference| {gap:.2e}")
    report.target("--ray throughput / local path", ray_ips / local_ips, ">= 0.85", ray_ips / local_ips >= 0.85)
    status = report.finish(args.json)
    if args.record:
        append_results(f"Indexing on Ray (issue 16): {args.model}", "bench_ray.py", report,
                       "The local cluster, the driver and the actor share the machine's 2 cores.")
    return status


if __name__ == "__main__":
    sys.exit(main())
