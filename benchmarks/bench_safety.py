"""Issue 32 items 1, 2 and 5: the hostile probe's cases that lost photos or answered wrongly, counted again.

Each case is built in a temporary folder and run through the real `neardup` command, once with this checkout's
code and, with `--baseline REV`, once with the code of a git revision (extracted with `git archive`) in the
same run, on the same cases:

- item 1, "advised deletions of an only copy": `duplicates --groups` is followed to the letter — every file it
  calls removable is deleted — and a group whose keeper is then gone, or no longer holds the photo indexed,
  counts one. Cases: a symlink `0_link_to_X.jpg -> X.jpg` beside its photo; one folder indexed twice, once
  through a symlink; a keeper replaced by other bytes of the same size and mtime; a store that holds two names
  of one file (written before names were resolved; made here with read_catalog / write_catalog).
- item 2, "silently wrong answers" of a damaged store written before segments (tests/data/v1): a query whose
  answer differs from the version that wrote it (answers.json) without saying the store is damaged, an update
  that upgrades the damaged store, its new photo's query that answers with another photo, an `info --check`
  that says ok. Damage: the embeddings chunk, the ids chunk or the sha256 chunk zeroed together with its
  Fletcher-32; `next_id` set from 20 to 3.
- item 5: a damaged segment whose own path list is damaged, repaired with one of its two folders: an exit 0
  that does not say which photos were not found.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

from common import REPO_ROOT, Report, append_results, log, output_options

V1 = REPO_ROOT / "tests" / "data" / "v1"
SAMPLE = REPO_ROOT / "src" / "neardup" / "sample" / "catalog"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Code:
    """One version of neardup: its `src` folder, run as `python -m neardup` in subprocesses."""

    def __init__(self, name: str, src: Path) -> None:
        self.name, self.src = name, src

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.src), "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "200"}

    def nd(self, *args: object, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "neardup", *map(str, args)], capture_output=True, text=True,
                              check=False, timeout=timeout, env=self.env(), cwd=cwd)

    def py(self, code: str, *args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                              timeout=300, env=self.env(), check=True)


def extract(rev: str, into: Path) -> Path:
    """The `src` folder of git revision `rev` of this repository, written under `into`."""
    data = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", rev, "src"], capture_output=True,
                          check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def photos(folder: Path, seeds: range) -> list[Path]:
    from neardup.testing import write_product_photos

    return write_product_photos(folder, seeds)


# ------------------------------------------------------------------------------------ item 1: duplicates

def lost_keepers(code: Code, store: Path, indexed: dict[str, str], tmp: Path) -> tuple[int, int, int]:
    """(groups, removable, keepers lost): run duplicates, delete what it calls removable, count the groups whose
    keeper is then gone or holds other bytes than the photo indexed (`indexed`: path -> SHA-256 then)."""
    r = code.nd("duplicates", "--store", store, "--groups", tmp / "g.json", "--no-verify")
    if r.returncode != 0:
        raise RuntimeError(f"duplicates failed: {r.stderr.strip()}")
    doc = json.loads((tmp / "g.json").read_text())
    removable = [p for g in doc["groups"] for p in g["removable"]]
    for p in removable:
        (store.parent / p).unlink(missing_ok=True)
    lost = 0
    for g in doc["groups"]:
        keeper = store.parent / g["keeper_path"]
        if not keeper.exists() or sha(keeper) != indexed[g["keeper_path"]]:
            lost += 1
    return len(doc["groups"]), len(removable), lost


def contents(root: Path, base: Path) -> dict[str, str]:
    """path (relative to `base`, as a store names it) -> SHA-256, of every file under `root` (links followed)."""
    return {os.path.relpath(p, base): sha(p) for p in sorted(root.rglob("*.jpg")) if p.exists()}


def case_symlink(code: Code, tmp: Path) -> tuple[int, int, int]:
    imgs = tmp / "imgs"
    photos(imgs, range(12))
    for k in (2, 5, 9):
        (imgs / f"0_link_to_img_{k:04d}.jpg").symlink_to(f"img_{k:04d}.jpg")
    indexed = contents(imgs, tmp)
    code.nd("index", imgs, "--store", tmp / "s.h5", "--model", "phash").check_returncode()
    return lost_keepers(code, tmp / "s.h5", indexed, tmp)


def case_twice(code: Code, tmp: Path) -> tuple[int, int, int]:
    imgs = tmp / "imgs"
    photos(imgs, range(12))
    (tmp / "again").symlink_to(imgs)
    indexed = {**contents(imgs, tmp), **{f"again/{p.name}": sha(p) for p in imgs.iterdir()}}
    code.nd("index", imgs, tmp / "again", "--store", tmp / "s.h5", "--model", "phash").check_returncode()
    return lost_keepers(code, tmp / "s.h5", indexed, tmp)


def case_replaced(code: Code, tmp: Path) -> tuple[int, int, int]:
    imgs = tmp / "imgs"
    photos(imgs, range(12))
    copies = []
    for k in (1, 4, 7):
        copy = imgs / f"copy_{k}.jpg"
        copy.write_bytes((imgs / f"img_{k:04d}.jpg").read_bytes())
        os.utime(copy, ns=(10**18, 10**18))  # older than its original: the keeper
        copies.append(copy)
    indexed = contents(imgs, tmp)
    code.nd("index", imgs, "--store", tmp / "s.h5", "--model", "phash").check_returncode()
    for copy in copies:  # other bytes, same size, same mtime
        st = copy.stat()
        copy.write_bytes(os.urandom(st.st_size))
        os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    return lost_keepers(code, tmp / "s.h5", indexed, tmp)


ADD_ALIASES = """
import sys
from dataclasses import replace
import numpy as np
from neardup.store import Catalog, read_catalog, write_catalog
store = sys.argv[1]
for pair in sys.argv[2:]:
    path, of = pair.split("=")
    cat = read_catalog(store, local=True)
    i = cat.paths.index(of)
    take = np.r_[np.arange(len(cat)), i]
    loc = cat.local
    write_catalog(store, Catalog(
        meta=replace(cat.meta, next_id=cat.meta.next_id + 1), ids=np.r_[cat.ids, cat.meta.next_id],
        paths=[*cat.paths, path], sizes=cat.sizes[take], mtimes_ns=cat.mtimes_ns[take],
        sha256=[cat.sha256[k] for k in take.tolist()], widths=cat.widths[take], heights=cat.heights[take],
        xb=cat.xb[take], failures=cat.failures,
        local=type(loc)(loc.count[take], loc.xy[take], loc.desc[take]) if loc is not None else None))
"""


def case_old_store(code: Code, tmp: Path) -> tuple[int, int, int]:
    imgs = tmp / "imgs"
    photos(imgs, range(12))
    code.nd("index", imgs, "--store", tmp / "s.h5", "--model", "phash").check_returncode()
    pairs = []
    for k in (2, 5, 9):  # links named to sort first: a path-order keeper rule picks them
        (imgs / f"0_link_to_img_{k:04d}.jpg").symlink_to(f"img_{k:04d}.jpg")
        pairs.append(f"imgs/0_link_to_img_{k:04d}.jpg=imgs/img_{k:04d}.jpg")
    code.py(ADD_ALIASES, tmp / "s.h5", *pairs)
    return lost_keepers(code, tmp / "s.h5", contents(imgs, tmp), tmp)


# ------------------------------------------------------------------------ item 2: stores before segments

def v1_copy(tmp: Path) -> Path:
    (tmp / "catalog" / "bottles").mkdir(parents=True)
    for f in (SAMPLE / "bottles").iterdir():
        dst = tmp / "catalog" / "bottles" / f.name
        dst.write_bytes(f.read_bytes())
        os.utime(dst, ns=(1_767_225_600 * 10**9,) * 2)
    (tmp / "store").mkdir()
    for f in V1.iterdir():
        if f.suffix in (".h5", ".faiss"):
            shutil.copyfile(f, tmp / "store" / f.name)
    return tmp / "store" / "v1.h5"


def damage_v1(store: Path, how: str) -> None:
    import h5py

    if how == "next_id 20 -> 3":
        with h5py.File(store, "r+") as f:
            f.attrs["next_id"] = 3
        return
    with h5py.File(store, "r") as f:
        chunk = f[how.split()[0]].id.get_chunk_info(0)
    with open(store, "r+b") as fh:  # the chunk and its Fletcher-32 checksum: all zero, which HDF5 accepts
        fh.seek(chunk.byte_offset)
        fh.write(b"\0" * chunk.size)


def wrong_v1_answers(code: Code, tmp: Path, how: str) -> tuple[int, str]:
    """Silently wrong answers of a damaged schema-1 store, and what each command did."""
    store = v1_copy(tmp)
    damage_v1(store, how)
    want = json.loads((V1 / "answers.json").read_text())
    asked = [(q, r) for q, r in zip(want["queries"], want["results"]) if q.startswith("catalog/")][:5]
    wrong, said = 0, []
    r = code.nd("query", *(tmp / q for q, _ in asked), "--store", store, "--json", "--no-verify", "-k", "5")
    if r.returncode == 2:
        said.append("query: refused (damaged)")
    else:
        got = {str(Path(x["query"]).resolve()): x["matches"] for x in json.loads(r.stdout)["results"]}
        bad = 0
        for q, w in asked:
            m = got[str((tmp / q).resolve())]
            if [(x["id"], x["path"]) for x in m] != [(x["id"], x["path"]) for x in w] or any(
                    abs(a["score"] - b["score"]) > 1e-4 for a, b in zip(m, w)):
                bad += 1
        wrong += bad
        said.append(f"query: exit {r.returncode}, {bad} of {len(asked)} answers wrong")
    new = tmp / "catalog" / "apple.jpg"
    new.write_bytes((SAMPLE / "boxes" / "box_01.jpg").read_bytes())
    r = code.nd("update", tmp / "catalog", "--store", store)
    if r.returncode == 0:
        wrong += 1
        said.append("update: upgraded it")
        q = code.nd("query", new, "--store", store, "--json", "--no-verify", "-k", "1")
        if q.returncode in (0, 1):
            top = json.loads(q.stdout)["results"][0]["matches"][0]
            if top["path"] != "../catalog/apple.jpg":
                wrong += 1
                said.append(f"new photo's query: {top['path']} at {top['score']:.2f}")
    else:
        said.append(f"update: refused (exit {r.returncode})")
    r = code.nd("info", "--store", store, "--check")
    if r.returncode == 0:
        wrong += 1
        said.append("info --check: ok")
    else:
        said.append("info --check: damaged")
    return wrong, "; ".join(said)


# --------------------------------------------------------------------------------------- item 5: repair

def repair_claims(code: Code, tmp: Path) -> tuple[int, str]:
    """1 when a repair given one of two folders exits 0 without saying which photos it did not find."""
    import h5py

    photos(tmp / "a", range(10))
    photos(tmp / "b", range(20, 25))
    store = tmp / "s.h5"
    code.nd("index", tmp / "a", tmp / "b", "--store", store, "--model", "phash").check_returncode()
    seg = next((tmp / "s.h5.segments").glob("*.h5"))
    with h5py.File(seg) as f:
        ds = f["paths"]
        where = ((ds.id.get_chunk_info(0).byte_offset, ds.id.get_chunk_info(0).size) if ds.chunks
                 else (ds.id.get_offset(), 64))
    with open(seg, "r+b") as fh:
        fh.seek(where[0])
        fh.write(b"\0" * where[1])
    r = code.nd("update", tmp / "a", "--store", store, "--repair")
    if r.returncode != 0:
        return 0, f"exit {r.returncode}: " + r.stderr.strip().splitlines()[-1][:160]
    line = next((x for x in r.stdout.splitlines() if "repaired:" in x), "")
    told = "5 were not found" in line or "not found" in line
    return (0 if told else 1), f"exit 0: {line.split(';', 1)[-1].strip()[:160]}"


# ------------------------------------------------------------------------------------------------- cost

def duplicates_cost(codes: list[Code], n: int, root: Path, repeats: int, verify: bool) -> list[list[object]]:
    """Wall time of `duplicates` (CLI, median of `repeats`, the codes alternating) on one pHash store of `n`
    photos, without verification (and with it when `verify`): what reading every grouped file again costs."""
    from common import link_photos, median, sample_photos

    sample = sample_photos(n, root)
    folder = link_photos(sample.paths, root / "cost" / "photos")
    store = root / "cost" / "s.h5"
    codes[-1].nd("index", folder, "--store", store, "--model", "phash", timeout=3600).check_returncode()
    rows = []
    for flag in ("--no-verify", "--verify") if verify else ("--no-verify",):
        times: dict[str, list[float]] = {c.name: [] for c in codes}
        for _ in range(repeats):
            for c in codes:
                t0 = time.perf_counter()
                c.nd("duplicates", "--store", store, flag, "--groups", root / "cost" / "g.json",
                     timeout=3600).check_returncode()
                times[c.name].append(time.perf_counter() - t0)
        groups = json.loads((root / "cost" / "g.json").read_text())["groups"]
        rows.append([f"duplicates {flag}, {n} photos ({sum(len(g['members']) for g in groups)} in groups)",
                     *(f"{median(times[c.name]):.2f} s" for c in codes),
                     f"{median(times[codes[-1].name]) / median(times[codes[0].name]):.2f}" if len(codes) > 1 else ""])
    return rows


# ------------------------------------------------------------------------------------------------ main

CASES1: list[tuple[str, Callable[[Code, Path], tuple[int, int, int]]]] = [
    ("symlink 0_link_to_X.jpg -> X.jpg beside X.jpg (3 links, 12 photos)", case_symlink),
    ("one folder indexed twice, once through a symlink (12 photos)", case_twice),
    ("3 keepers replaced by other bytes, same size and mtime", case_replaced),
    ("a store holding both names of 3 files (indexed before names were resolved)", case_old_store),
]
DAMAGE = ["embeddings chunk zeroed", "ids chunk zeroed", "sha256 chunk zeroed", "next_id 20 -> 3"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", metavar="REV", default="",
                   help="also run every case with the code of this git revision (e.g. the one before the fix)")
    p.add_argument("--cost", type=int, default=0, metavar="N",
                   help="also time duplicates on a pHash store of N grocery photos (0: not)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each timing (--cost)")
    p.add_argument("--cost-verify", action="store_true", help="with --cost, also time verified duplicates")
    output_options(p)
    args = p.parse_args()
    report = Report("bench_safety.py", "Nothing lost, nothing silently wrong (issue 32 items 1, 2, 5)",
                    "Does `duplicates` ever advise deleting the only copy of a photo; does a damaged store "
                    "written before segments, or a repair, ever answer wrongly without saying so?",
                    params={"baseline": args.baseline or "none", "cost": args.cost,
                            "cost_verify": args.cost_verify})
    with tempfile.TemporaryDirectory(prefix="bench-safety-") as td:
        root = Path(td)
        codes = [Code("this code", REPO_ROOT / "src")]
        if args.baseline:
            codes.insert(0, Code(f"baseline {args.baseline}", extract(args.baseline, root / "baseline")))
        names = [c.name for c in codes]
        rows, total = [], {c.name: 0 for c in codes}
        for title, fn in CASES1:
            row: list[object] = [title]
            for c in codes:
                log(f"{c.name}: {title}")
                groups, removable, lost = fn(c, Path(tempfile.mkdtemp(dir=root)))
                row.append(f"{lost} (of {groups} groups, {removable} removable)")
                total[c.name] += lost
            rows.append(row)
        report.table("Item 1: groups whose keeper is lost once every file called removable is deleted",
                     ["case", *names], rows)
        rows, wrong = [], {c.name: 0 for c in codes}
        for how in DAMAGE:
            row = [how]
            for c in codes:
                log(f"{c.name}: v1 store, {how}")
                n, said = wrong_v1_answers(c, Path(tempfile.mkdtemp(dir=root)), how)
                row.append(f"{n}: {said}")
                wrong[c.name] += n
            rows.append(row)
        row = ["repair: a segment's paths damaged, 1 of its 2 folders given (10 of 15 photos)"]
        for c in codes:
            log(f"{c.name}: repair")
            n, said = repair_claims(c, Path(tempfile.mkdtemp(dir=root)))
            row.append(f"{n}: {said}")
            wrong[c.name] += n
        rows.append(row)
        report.table("Items 2 and 5: silently wrong answers (wrong query answers, upgrades of damaged data, "
                     "'ok' checks, repairs that do not say what they did not find)", ["case", *names], rows)
        report.table("Totals", ["", *names], [["advised deletions of an only copy", *(total[n] for n in names)],
                                             ["silently wrong answers", *(wrong[n] for n in names)]])
        if args.cost:
            log(f"cost: duplicates on {args.cost} photos")
            report.table("What it costs: duplicates through the CLI, median wall time (one shared 2-core machine)",
                         ["", *names, "this code ÷ baseline"], duplicates_cost(codes, args.cost, root, args.repeats,
                                                                         args.cost_verify))
    report.check("this code: no advised deletion of an only copy", total["this code"] == 0,
                 f"{total['this code']} keepers lost")
    report.check("this code: no silently wrong answer", wrong["this code"] == 0, f"{wrong['this code']}")
    status = report.finish(args.json)
    if args.record:
        append_results("Nothing lost, nothing silently wrong (issue 32 items 1, 2, 5)", "bench_safety.py", report,
                       "Every case through the `neardup` command in subprocesses, each code on its own copy of "
                       "the case; the machine was shared with other jobs: compare timings within a row only.")
    return status


if __name__ == "__main__":
    sys.exit(main())
