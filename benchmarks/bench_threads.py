"""Thread counts on a busy machine: `neardup duplicates` with two busy processes beside it (issue 29 item 1).

Question: on a machine whose cores are taken by other work, does `neardup duplicates` in its default
environment run about as fast as pinned to one thread per library (OMP_NUM_THREADS=1), now that
neardup/threads.py owns every thread count? Goal: default within 1.3x of pinned. Before the thread owner
(commit 07a4d30, unpacked with `git archive` into a temporary folder and run with PYTHONPATH to its src), the
default run of the issue took minutes.

Data: a real store of grocery photos (EfficientNet-Lite0, verified duplicates as configured), built once under
--workdir from the Grocery Store Dataset's test split (../shared) and reused. Each run is the command line
itself (`python -m neardup duplicates --store ... --out ...`), in a subprocess, while --busy processes spin
(`while True: pass`); they are killed at the end. Runs alternate between the variants, --runs of each; the
median is reported with the ratio to the pinned run of the same code.

A run still going after --cap seconds is stopped and reported as "> cap" (its ratio is then a lower bound), so
that the benchmark ends on a machine where the default environment is many times slower.

Correctness (exit status 1 when violated): every run that finished, of every variant, writes the same pairs
file.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

from common import GROCERY_DIR, REPO_ROOT, Report, append_results, base_parser, log, median

#: The last commit before neardup/threads.py (the baseline).
BASELINE = "07a4d30"


def _build(store: Path, photos: Path, src: Path) -> None:
    log(f"building {store} from {photos} (efficientnet-lite0), once")
    subprocess.run([sys.executable, "-m", "neardup", "index", str(photos), "--store", str(store), "--model",
                    "efficientnet-lite0"], check=True, env=_env(src), stdout=subprocess.DEVNULL)


def _env(src: Path, pinned: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS") and k != "NEARDUP_THREADS"}
    env["PYTHONPATH"] = str(src)
    if pinned:
        env["OMP_NUM_THREADS"] = "1"
    return env


def _unpack(commit: str, into: Path) -> Path:
    """The src folder of `commit` of this repository, unpacked into `into` (git archive: no worktree made)."""
    if not (into / "src" / "neardup").is_dir():
        tar = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", commit, "src"], check=True,
                             capture_output=True).stdout
        with tarfile.open(fileobj=BytesIO(tar)) as tf:
            tf.extractall(into, filter="data")
    return into / "src"


def _run(src: Path, store: Path, out: Path, pinned: bool, cap: float) -> tuple[float, str | None]:
    """(seconds, digest of the pairs file) of one run; (cap, None) when it was stopped at `cap` seconds."""
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        got = subprocess.run([sys.executable, "-m", "neardup", "duplicates", "--store", str(store), "--out",
                              str(out)], env=_env(src, pinned), capture_output=True, text=True,
                             timeout=cap)
    except subprocess.TimeoutExpired:  # subprocess.run kills the child
        return cap, None
    seconds = time.perf_counter() - t0
    if got.returncode != 0:
        raise SystemExit(f"duplicates failed ({got.returncode}): {got.stderr.strip()[-500:]}")
    return seconds, hashlib.sha256(out.read_bytes()).hexdigest()


def _shown(times: list[float], cap: float) -> str:
    """The median of runs, as "> cap" when it is a stopped run (the true time is longer)."""
    m = median(times)
    return f"> {cap:.0f}" if m >= cap else f"{m:.1f}"


def main() -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench_threads",
                   help="where the store (built once) and the baseline's source go")
    p.add_argument("--photos", type=Path, default=GROCERY_DIR / "test", help="folder of photos indexed")
    p.add_argument("--runs", type=int, default=3, help="runs of each variant (alternating)")
    p.add_argument("--busy", type=int, default=2, help="busy processes beside the runs")
    p.add_argument("--cap", type=float, default=300.0, help="seconds after which a run is stopped (its time is then "
                   "reported as > cap: the ratio is a lower bound)")
    p.add_argument("--no-baseline", action="store_true", help=f"skip the code before the thread owner ({BASELINE})")
    p.add_argument("--record", action="store_true", help="append a section to benchmarks/RESULTS.md")
    p.add_argument("--remark", default="", help="how to read this run (recorded with it)")
    args = p.parse_args()

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    # a copy of this checkout's code, so that editing the checkout while the runs go on cannot change them
    here = work / "this-src"
    shutil.rmtree(here, ignore_errors=True)
    shutil.copytree(REPO_ROOT / "src", here, ignore=shutil.ignore_patterns("__pycache__"))
    store = work / "lite0.h5"
    if not store.exists():
        _build(store, args.photos, here)
    codes = {"this branch": here}
    if not args.no_baseline:
        codes[f"before ({BASELINE})"] = _unpack(BASELINE, work / f"neardup-{BASELINE}")
    variants = [(code, pinned) for code in codes for pinned in (False, True)]

    rep = Report("bench_threads.py", "duplicates beside busy processes: default threads against pinned",
                 __doc__.split("Question: ")[1].split("\n\n")[0].replace("\n", " "),
                 params={"store": str(store), "photos": str(args.photos), "runs": args.runs, "busy": args.busy,
                         "cap s": args.cap, "cores": os.cpu_count()})
    times: dict[tuple[str, bool], list[float]] = {v: [] for v in variants}
    digests: set[str] = set()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still ends the busy processes (finally)
    try:
        time.sleep(1.0)  # the busy processes are spinning before the first run
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.runs):
                for code, pinned in variants:
                    s, digest = _run(codes[code], store, Path(tmp) / "pairs.csv", pinned, args.cap)
                    times[(code, pinned)].append(s)
                    if digest is not None:
                        digests.add(digest)
                    log(f"run {r + 1}: {code}, {'OMP_NUM_THREADS=1' if pinned else 'default'}: "
                        + (f"{s:.1f} s" if digest else f"stopped at {args.cap:.0f} s"))
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    rows = []
    for code in codes:
        pinned = median(times[(code, True)])
        for flag in (False, True):
            t = times[(code, flag)]
            ratio = median(t) / pinned
            rows.append([code, "OMP_NUM_THREADS=1" if flag else "default", _shown(t, args.cap),
                         _shown([min(t)], args.cap), _shown([max(t)], args.cap),
                         (">= " if median(t) >= args.cap else "") + f"{ratio:.2f}"])
    rep.table(f"`neardup duplicates` on {store.name}, {args.busy} busy processes beside it: median of {args.runs} "
              f"(s; runs stopped at {args.cap:.0f} s shown as > {args.cap:.0f}), ratio to the same code pinned",
              ["code", "environment", "median s", "min s", "max s", "ratio to pinned"], rows)
    ratio = median(times[("this branch", False)]) / median(times[("this branch", True)])
    rep.target("this branch: default / pinned" + (" (a lower bound: runs were stopped)"
                                                  if median(times[("this branch", False)]) >= args.cap else ""),
               ratio, "<= 1.3", ratio <= 1.3)
    rep.check("every run that finished wrote the same pairs file", len(digests) == 1,
              f"{len(digests)} different files")
    if args.remark:
        rep.note(args.remark)
    code = rep.finish(args.json)
    if args.record:
        append_results("duplicates beside busy processes: default threads against pinned (issue 29 item 1)",
                       "bench_threads.py", rep, args.remark)
    return code


if __name__ == "__main__":
    sys.exit(main())
