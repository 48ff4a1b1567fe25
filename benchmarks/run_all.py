"""Run every neardup benchmark and write benchmarks/RESULTS.md.

    python benchmarks/run_all.py            # full sizes (about 15 minutes on 2 cores; use a quiet machine)
    python benchmarks/run_all.py --quick    # small sizes: a smoke test of the whole chain (about 1 minute)

Each benchmark runs as its own subprocess with `--json`; their reports are collected into one markdown file
with the machine's description and the exact command. The exit status is 1 when any correctness check
failed or a benchmark crashed; time targets are reported as met/missed and never change the exit status.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BENCH_DIR, REPO_ROOT, fmt, machine_info, markdown_table, report_markdown

#: (script, full-size arguments, quick arguments)
SUITE: list[tuple[str, list[str], list[str]]] = [
    ("bench_embed.py", ["--n", "256", "--batch-size", "32", "--seed-n", "64", "--repeats", "3"],
     ["--n", "16", "--batch-size", "8", "--seed-n", "8", "--repeats", "1"]),
    ("bench_duplicates.py", ["--sizes", "10000", "50000"],
     ["--sizes", "2000", "4000", "--full-check-max", "2000", "--check-rows", "200", "--seed-pairs", "5000"]),
    ("bench_query.py", ["--n", "50000", "--queries", "50", "--warmup", "5"],
     ["--n", "2000", "--queries", "10", "--warmup", "2"]),
    ("bench_precision.py", ["--n", "128", "--batch-size", "32", "--repeats", "3"],
     ["--n", "16", "--batch-size", "8", "--repeats", "1"]),
    ("bench_update.py", ["--n", "1000"], ["--n", "40"]),
    ("bench_runtime.py", ["--n", "128", "--repeats", "3", "--cli-runs", "5"],
     ["--n", "16", "--batch-size", "8", "--repeats", "1", "--cli-runs", "1", "--agreement-n", "32"]),
    ("bench_verify.py", ["--originals", "240", "--shelf", "60", "--repeats", "3"],
     ["--originals", "20", "--shelf-csv", "tests/data/shelf_pairs.csv", "--cost-split", "val", "--repeats", "1",
      "--resnet-n", "16"]),
    ("bench_models.py", [], ["--originals", "20", "--speed-n", "32", "--models", "phash,efficientnet-lite0",
                             "--no-cost"]),
    ("bench_safety.py", [], []),
]


def run_one(script: str, extra: list[str], workdir: Path) -> dict:
    """Run one benchmark; return its JSON report (or a stub describing the crash) plus command and status."""
    out = workdir / (Path(script).stem + ".json")
    cmd = [sys.executable, str(BENCH_DIR / script), *extra, "--json", str(out)]
    shown = " ".join(["python", f"benchmarks/{script}", *map(shlex.quote, extra)])
    print(f"\n=== {shown}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=REPO_ROOT, env=env).returncode
    wall = time.perf_counter() - t0
    if out.exists():
        rep = json.loads(out.read_text())
    else:
        rep = {"script": script, "title": script, "question": "(no report: the benchmark crashed)", "params": {},
               "tables": [], "targets": [], "notes": [f"exited with status {rc} before writing its report; "
                                                      "see the console output"],
               "checks": [{"name": "benchmark ran to completion", "ok": False, "detail": f"exit status {rc}"}],
               "correct": False, "seconds": wall}
    rep["command"] = shown
    rep["exit_status"] = rc
    rep["wall_seconds"] = wall
    if rc != 0 and rep.get("correct", False):  # a crash after the report was written still counts as a failure
        rep["correct"] = False
    return rep


def results_markdown(reports: list[dict], command: str, machine: dict[str, str], quick: bool, wall: float) -> str:
    """The whole RESULTS.md."""
    lines = ["# neardup benchmark results", ""]
    if quick:
        lines += ["> **QUICK SMOKE RUN** (`--quick`): tiny sizes that only show the chain works. These numbers say",
                  "> nothing about performance at the target sizes; run without `--quick` on a quiet machine.", ""]
    lines += ["Command (from the repository root):", "", "```", command, "```", "",
              f"Total wall time: {wall / 60:.1f} min.", "", "## Machine", "",
              markdown_table(["", ""], [[k, v] for k, v in machine.items()]), "", "## Summary", ""]
    rows = []
    for r in reports:
        targets = r.get("targets", [])
        met = sum(t["met"] for t in targets)
        missed = [t["name"] for t in targets if not t["met"]]
        rows.append([r["script"], "pass" if r.get("correct") else "**FAIL**",
                     f"{met} met, {len(missed)} missed" + (f" ({'; '.join(missed)})" if missed else ""),
                     fmt(float(r.get("wall_seconds", 0.0))), f"`{r['command']}`"])
    lines += [markdown_table(["benchmark", "correctness", "targets", "seconds", "command"], rows), ""]
    for r in reports:
        lines.append(report_markdown(r, level=2))
    ok = all(r.get("correct") for r in reports)
    lines.append(f"**Overall: {'all correctness checks passed' if ok else 'SOME CORRECTNESS CHECKS FAILED'}.**")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the whole chain")
    p.add_argument("--only", nargs="+", metavar="SCRIPT", choices=[s for s, _, _ in SUITE],
                   help="run only these benchmarks")
    p.add_argument("--out", default=str(BENCH_DIR / "RESULTS.md"), help="markdown file to write")
    args = p.parse_args()

    command = " ".join(["python", "benchmarks/run_all.py", *map(shlex.quote, sys.argv[1:])])
    machine = machine_info()
    t0 = time.perf_counter()
    reports = []
    with tempfile.TemporaryDirectory(prefix="neardup-bench-all-") as tmp:
        for script, full, quick in SUITE:
            if args.only and script not in args.only:
                continue
            reports.append(run_one(script, quick if args.quick else full, Path(tmp)))
    wall = time.perf_counter() - t0
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    machine["load average (1/5/15 min) at end"] = " / ".join(f"{x:.2f}" for x in load)
    text = results_markdown(reports, command, machine, args.quick, wall)
    out = Path(args.out)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(text, encoding="utf-8")
    os.replace(tmp_out, out)
    ok = all(r.get("correct") for r in reports)
    print(f"\nwrote {out}; {'all correctness checks passed' if ok else 'SOME CORRECTNESS CHECKS FAILED'} "
          f"({wall / 60:.1f} min)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
