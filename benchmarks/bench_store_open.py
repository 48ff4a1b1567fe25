"""Opening a store: what checking each segment's bytes before HDF5 parses them costs (issue 29).

Question: a reader now checks the digest of every segment's bytes but its vectors' and local features' chunk
data (those are checked block by block when read) before HDF5 opens it. What does a first open of a
generation cost, against the code before (`--baseline-src`), on a store of N rows of d-dim vectors written by
each code through `write_catalog`? Each open is a fresh process (the check is once per file per process), the
files in the page cache (as on a second query), the imports done before the clock starts; the two codes
alternate and the median of `--repeats` is reported.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WRITE = r"""
import sys, numpy as np
from neardup.store import Catalog, ModelInfo, StoreMeta, write_catalog
n, d, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
meta = StoreMeta(ModelInfo("fake", "none", "x", dim=d, input_size=224, preprocessing="none"))
xb = rng.standard_normal((n, d)).astype(np.float32)
cat = Catalog(meta=meta, ids=np.arange(n), paths=[f"photos/{i:07d}.jpg" for i in range(n)], sizes=np.full(n, 1000),
              mtimes_ns=np.zeros(n, np.int64), sha256=[f"{i:064x}" for i in range(n)], widths=np.full(n, 640, np.int32),
              heights=np.full(n, 480, np.int32), xb=xb)
write_catalog(path, cat)
"""
OPEN = r"""
import sys, time
import faiss, h5py, numpy
from neardup.store import Store, generation, manifest, segment  # the imports are not what is measured
t = time.perf_counter()
with Store.open(sys.argv[1]) as gen:
    n = len(gen)
print(time.perf_counter() - t)
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=1280)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline-src", required=True, help="the src folder of the code before")
    args = ap.parse_args()
    runs = [("this code", str(Path(__file__).resolve().parents[1] / "src")),
            ("baseline", str(Path(args.baseline_src).resolve()))]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-open-") as tmp:
        for label, src in runs:
            env = {**os.environ, "PYTHONPATH": src}
            store = Path(tmp) / label.replace(" ", "-") / "s.h5"
            store.parent.mkdir()
            subprocess.run([sys.executable, "-c", WRITE, str(args.n), str(args.d), str(store)], env=env, check=True)
            size = sum(p.stat().st_size for p in store.parent.rglob("*") if p.is_file())
            rows.append([label, size, env, store, []])
        for _ in range(args.repeats):  # the two codes alternate: load on the machine falls on both
            for row in rows:
                row[4].append(float(subprocess.run([sys.executable, "-c", OPEN, str(row[3])], env=row[2], check=True,
                                                   capture_output=True, text=True).stdout))
        rows = [(label, size, statistics.median(times)) for label, size, _, _, times in rows]
    print(f"| code | store ({args.n:,} x {args.d}) | first open in a process, median of {args.repeats} |\n|---|---|---|")
    for label, size, t in rows:
        print(f"| {label} | {size / 2**20:.0f} MiB | {t * 1000:.0f} ms |")
    print(f"\nratio this code / baseline: {rows[0][2] / rows[1][2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
