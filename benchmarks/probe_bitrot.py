"""Bit rot in a store: every flipped byte is a right answer or one clear line, never a traceback or a hang (issue 29).

Question: when one byte of a store's manifest or of a segment is flipped, does reading the store (what `query`
and `info` do: open the generation, read its catalogue and vectors, search its index) give the right answer, or
the store's one-line damaged-store error — never a wrong answer, a traceback (an exception other than the
store's StoreError) or a hang?

A store of 120 synthetic product photos (phash, as issue 29's probe) is indexed and then updated with 12 more,
so it has a 2.2 MB segment, a small one, a manifest and a previous generation. A read is what `query
--verify` and `duplicates` read: the generation, its catalogue, every vector and local feature, an index search. Sweeps, each flip on a fresh copy
of the store (the file rewritten under a new inode, as a disk would hand back a rotted block): the manifest,
every byte, three times (XOR 0xFF, 0x01, 0x80); the small segment, every 97th byte; the large one, every
2,003rd byte. Each flip is read in a worker process with a 4 s deadline (past it: a hang, the worker is killed
and another started). The baseline is the code before this change (`--baseline-src`, a checkout's `src`),
measured in the same run on a store it wrote itself.

Correctness (exit status 1): the code under test has no wrong answer, traceback or hang.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HANG_S = 4.0
SWEEPS = [("manifest", "manifest", 1, 0xFF), ("manifest", "manifest", 1, 0x01), ("manifest", "manifest", 1, 0x80),
          ("small segment", "small", 97, 0xFF), ("large segment", "large", 2003, 0xFF)]


def _worker(src: str, store: str, jobs: mp.Queue, results: mp.Queue) -> None:
    """Read the store as `query` does, once per flip it is sent; put (outcome, detail)."""
    sys.path.insert(0, src)
    import numpy as np

    from neardup.errors import NeardupError
    from neardup.store import Store

    def answer() -> tuple:
        with Store.open(store) as gen:
            cat = gen.catalog
            xb = gen.vectors()
            _, got = gen.index.search(np.ascontiguousarray(xb[:5]), 1)
            local = gen.local()  # what --verify and duplicates read
            loc = b"" if local is None else local.count.tobytes() + local.xy.tobytes() + local.desc.tobytes()
            return (cat.ids.tolist(), cat.paths, cat.sha256, xb.tobytes(), got.tolist(), gen.meta.model.name,
                    gen.meta.model.dim, loc)

    oracle = answer()
    results.put(("ready", ""))
    while True:
        job = jobs.get()
        if job is None:
            return
        path, data = job
        tmp = path + ".flip"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)  # a new inode: nothing cached from an earlier read of this file
        try:
            got = answer()
            results.put(("no effect", "") if got == oracle else ("WRONG ANSWER", ""))
        except NeardupError as exc:
            msg = str(exc)
            results.put(("detected", "") if "\n" not in msg else ("not one line", msg[:200]))
        except OSError as exc:  # the CLI says these in one line too
            results.put(("detected", "") if "\n" not in str(exc) else ("not one line", str(exc)[:200]))
        except BaseException as exc:  # noqa: BLE001 - what the probe counts as a traceback
            results.put(("traceback", f"{type(exc).__name__}: {str(exc)[:160]}"))


class Reader:
    """A worker process reading one store copy; restarted after a hang."""

    def __init__(self, src: str, store: Path) -> None:
        self.src, self.store = src, store
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.jobs, self.results = ctx.Queue(), ctx.Queue()
        self.proc = ctx.Process(target=_worker, args=(self.src, str(self.store), self.jobs, self.results),
                                daemon=True)
        self.proc.start()
        assert self.results.get(timeout=120)[0] == "ready"

    def read(self, path: Path, data: bytes, pristine: bytes) -> tuple[str, str]:
        self.jobs.put((str(path), data))
        try:
            out = self.results.get(timeout=HANG_S)
        except Exception:  # noqa: BLE001 - queue.Empty: a hang
            out = ("hang", "")
            self.proc.kill()
            self.proc.join()
            path.write_bytes(pristine)
            self._start()
            return out
        if not self.proc.is_alive():
            out = ("crash", "")
        tmp = path.with_name(path.name + ".keep")  # the next flip starts from the intact file
        tmp.write_bytes(pristine)
        os.replace(tmp, path)
        return out

    def close(self) -> None:
        self.jobs.put(None)
        self.proc.join(10)


def make_store(src: str, root: Path) -> Path:
    """Index 120 photos, then update with 12 more (a large and a small segment, a previous generation)."""
    env = {**os.environ, "PYTHONPATH": src}
    store = root / "s.h5"
    run = lambda *a: subprocess.run([sys.executable, "-m", "neardup", *map(str, a)], env=env, check=True,  # noqa: E731
                                    capture_output=True, timeout=600)
    run("index", root / "a", "--store", store, "--model", "phash")
    run("update", root / "a", root / "b", "--store", store)
    return store


def probe(src: str, work: Path, photos: Path, thin: int = 1) -> dict[str, dict[str, int]]:
    root = work / Path(src).parent.name
    root.mkdir()
    for sub in ("a", "b"):
        shutil.copytree(photos / sub, root / sub)
    store = make_store(src, root)
    segs = sorted((root / "s.h5.segments").glob("*.h5"), key=lambda p: p.stat().st_size)
    targets = {"manifest": store, "small": segs[0], "large": segs[-1]}
    reader = Reader(src, store)
    table: dict[str, dict[str, int]] = {}
    examples: dict[str, str] = {}
    try:
        for label, key, step, mask in SWEEPS:
            path = targets[key]
            pristine = path.read_bytes()
            every = step * thin
            name = f"{label} ({len(pristine):,} B), {'every byte' if every == 1 else f'one byte in {every:,}'} ^0x{mask:02X}"
            row = table.setdefault(name, {})
            for off in range(0, len(pristine), step * thin):
                data = bytearray(pristine)
                data[off] ^= mask
                outcome, detail = reader.read(path, bytes(data), pristine)
                row[outcome] = row.get(outcome, 0) + 1
                if detail and outcome not in examples:
                    examples[outcome] = f"{name} @ {off}: {detail}"
    finally:
        reader.close()
    for k, v in examples.items():
        print(f"  example {k}: {v}")
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-src", help="the src folder of the code to compare against (e.g. a git archive of "
                                           "the commit before this change)")
    ap.add_argument("--thin", type=int, default=1, help="flip only every Nth offset of each sweep (a smoke run)")
    ap.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = ap.parse_args()
    src = str(Path(__file__).resolve().parents[1] / "src")
    sys.path.insert(0, src)
    from neardup.testing import write_product_photos

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="probe-bitrot-") as tmp:
        work = Path(tmp)
        write_product_photos(work / "photos" / "a", range(120), fmt="JPEG", size=(200, 200))
        write_product_photos(work / "photos" / "b", range(120, 132), fmt="JPEG", size=(200, 200))
        runs = [("this code", src)] + ([("baseline", str(Path(args.baseline_src).resolve()))]
                                       if args.baseline_src else [])
        results = {}
        for label, s in runs:
            w = work / label.replace(" ", "-")
            w.mkdir()
            print(f"probing {label} ({s})", flush=True)
            results[label] = probe(s, w, work / "photos", args.thin)
    kinds = ["detected", "no effect", "WRONG ANSWER", "not one line", "traceback", "hang", "crash"]
    lines = ["| code | file, flips | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 2) + "|"]
    for label, table in results.items():
        for name, row in table.items():
            lines.append(f"| {label} | {name} | " + " | ".join(f"{row.get(k, 0):,}" for k in kinds) + " |")
    text = "\n".join(lines)
    print(text)
    bad = sum(row.get(k, 0) for row in results["this code"].values() for k in kinds[2:])
    took = time.perf_counter() - t0
    print(f"\nprobe_bitrot.py took {took:.0f} s; {'correctness: all checks passed' if not bad else f'{bad} bad'}")
    if args.record:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
        head = (f"\n## Bit rot: one flipped byte is a right answer or one clear line (issue 29)\n\n"
                f"*{__doc__.splitlines()[2].strip()} ...* (see benchmarks/probe_bitrot.py)\n\n"
                f"`python benchmarks/probe_bitrot.py --baseline-src <git archive of the commit before>/src --record`"
                f", {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}, load average {load} "
                f"(2 cores shared with other engineers' tests)\n\n")
        with open(Path(__file__).with_name("RESULTS.md"), "a") as fh:
            fh.write(head + text + f"\n\n_probe_bitrot.py took {took:.0f} s; "
                     f"{'correctness: all checks passed' if not bad else f'{bad} bad outcomes'}._\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
