#!/usr/bin/env python3
"""Regenerate the demo's sample catalogue (package data in src/neardup/sample/) with planted near-duplicates.

Usage::

    python data/make_sample.py [--out src/neardup/sample] [--seed 0]

Writes ``<out>/catalog/<category>/...`` images and ``<out>/truth.csv``
(``path,group``; one row per image, sorted by path, paths relative to the
directory of truth.csv).  Images sharing a ``group`` are an original and its
near-duplicates / exact copies; every other image has a unique group.
``<out>/provenance.json`` records the seed and library versions; ``tests/test_sample.py`` checks that this
script rebuilds the shipped files byte for byte wherever those versions are the same.

The catalogue contains:

* 60 "originals": synthetic product photos from ``neardup.testing`` (the
  generator the tests and benchmarks use).  Originals are rejected and
  re-drawn if their grayscale DCT perceptual hash is too close to an already
  accepted original, so that unplanted lookalikes don't pollute the ground
  truth (a transformed variant can still land near some unrelated image now
  and then).
* Near-duplicate variants of 25 originals: downscaled, JPEG re-compressed,
  brightness/colour shifted, cropped, hue/contrast tweaked.
* A few byte-for-byte exact copies under other names / folders.
* A few "hard negatives": same template as an original (background,
  colours, texture) but a different product (other label text, and other
  shape proportions or placement) - lookalikes that are NOT duplicates.

Output is deterministic for a given seed and library versions (Pillow,
libjpeg, zlib, FreeType): everything is driven by seeded numpy generators,
encoder parameters are explicit and no metadata/timestamps are written.
The output directory is built in a temporary sibling directory and swapped
in only when complete, so an interrupted run never leaves a broken sample.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, features

REPO = Path(__file__).resolve().parents[1]
try:
    import neardup  # noqa: F401 - installed (pip install -e .)
except ImportError:  # run from a plain checkout
    sys.path.insert(0, str(REPO / "src"))

from neardup.testing.products import (CATEGORIES, JPEG_VARIANT_QUALITY, NEAR_DUP_KINDS, ProductSpec,  # noqa: E402
                                      hard_negative_spec, random_spec)
from neardup.testing.render import encode, make_variant, render  # noqa: E402

#: Where the package ships the sample.
DEFAULT_OUT = REPO / "src" / "neardup" / "sample"

SINGULAR: dict[str, str] = {
    "bottles": "bottle",
    "boxes": "box",
    "cans": "can",
    "jars": "jar",
    "tubes": "tube",
}
ORIGINALS_PER_CATEGORY = 12  # 5 x 12 = 60 originals
N_DUP_GROUPS = 25  # originals that receive planted near-duplicates
N_HARD_NEGATIVES = 5  # one lookalike per category

# Minimum Hamming distance (of 64 bits) between the pHashes of any two
# originals.  Unrelated natural photos sit around 32; 22 leaves a wide margin
# above typical near-duplicate thresholds (~10) without making rejection
# sampling slow.
MIN_ORIGINAL_PHASH_DISTANCE = 22
MAX_ATTEMPTS = 200


# --------------------------------------------------------------------------
# Perceptual hash used only to reject accidental lookalike originals
# --------------------------------------------------------------------------


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def phash(img: Image.Image) -> np.ndarray:
    """64-bit grayscale DCT perceptual hash as a bool array (classic pHash recipe).

    Why not neardup's own rule (`PHashEmbedder.bits`: unnormalized DCT, median over all 64 coefficients, as
    imagehash)? The two differ by 0.18 bits per image on average (at most 2) on the 119 shipped images, far
    below the 22-bit rejection margin, so either serves here; but swapping them re-draws different originals
    (18 of the 119 files change), which would change the demo's figures. The sample is kept byte-identical.
    """
    a = np.asarray(img.convert("L").resize((32, 32), Image.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ a @ _DCT32.T)[:8, :8].ravel()
    return low > np.median(low[1:])


def hamming(a: np.ndarray, b: np.ndarray) -> int:
    """Number of differing bits between two hashes."""
    return int(np.count_nonzero(a != b))



def _decoded_hash(data: bytes) -> np.ndarray:
    # Hash what a reader of the file will see, encoder losses included.
    with Image.open(io.BytesIO(data)) as im:
        return phash(im.convert("RGB"))


# --------------------------------------------------------------------------
# Catalogue assembly
# --------------------------------------------------------------------------


@dataclass
class Entry:
    """One image file of the sample."""

    path: str  # relative to <out>, forward slashes
    data: bytes
    group: str = ""
    role: str = ""  # original | hard_negative | variant:<kind> | exact_copy
    base: str = ""  # path of the base image (original / hard negative) it derives from
    note: str = ""


def build(seed: int) -> tuple[list[Entry], dict]:
    """Generate all sample files in memory; returns entries and summary stats."""
    # Independent per-purpose streams so changing one part (e.g. the variant
    # recipe) doesn't reshuffle every original.
    s_orig, s_neg, s_var, s_layout = (np.random.default_rng([seed, k]) for k in range(1, 5))

    # Storage format is decided up front because PNG originals are drawn
    # without grain (see random_spec).
    n_orig = len(CATEGORIES) * ORIGINALS_PER_CATEGORY
    is_png = [bool(u < 0.3) for u in s_layout.random(n_orig + N_HARD_NEGATIVES)]

    # 1) Originals with pHash-based rejection of accidental lookalikes.
    originals: list[tuple[ProductSpec, Image.Image, np.ndarray]] = []
    rejected = 0
    for cat in CATEGORIES:
        for _ in range(ORIGINALS_PER_CATEGORY):
            for _attempt in range(MAX_ATTEMPTS):
                spec = random_spec(cat, s_orig, lossless=is_png[len(originals)])
                img = render(spec)
                hsh = phash(img)
                if all(hamming(hsh, o[2]) >= MIN_ORIGINAL_PHASH_DISTANCE for o in originals):
                    originals.append((spec, img, hsh))
                    break
                rejected += 1
            else:
                raise RuntimeError("could not draw a distinct original; lower the threshold")

    # 2) Hard negatives: one per category, from a random original's template.
    negatives: list[tuple[ProductSpec, Image.Image, np.ndarray, int]] = []
    for ci, cat in enumerate(CATEGORIES[:N_HARD_NEGATIVES]):
        idx = ci * ORIGINALS_PER_CATEGORY + int(s_neg.integers(0, ORIGINALS_PER_CATEGORY))
        spec = hard_negative_spec(originals[idx][0], s_neg, "proportions" if ci % 2 else "layout")
        img = render(spec)
        negatives.append((spec, img, phash(img), idx))

    # 3) File names: originals and hard negatives share the numbering of
    # their category, shuffled, so a hard negative is not "the last one".
    bases: list[dict] = []
    for i, (spec, img, hsh) in enumerate(originals):
        bases.append(dict(spec=spec, img=img, hash=hsh, role="original", idx=i))
    for spec, img, hsh, tmpl in negatives:
        bases.append(dict(spec=spec, img=img, hash=hsh, role="hard_negative", idx=tmpl))
    for cat in CATEGORIES:
        members = [b for b in bases if b["spec"].category == cat]
        numbers = s_layout.permutation(len(members)) + 1
        for b, n in zip(members, numbers):
            b["stem"] = f"catalog/{cat}/{SINGULAR[cat]}_{int(n):02d}"
    for b, png in zip(bases, is_png):
        b["fmt"] = "png" if png else "jpeg"
        b["ext"] = ".png" if b["fmt"] == "png" else ".jpg"
    # A few upper-case / alternative extensions to exercise case-insensitive
    # discovery; chosen among originals only so truth stays simple to read.
    jpeg_orig = [i for i, b in enumerate(bases) if b["role"] == "original" and b["fmt"] == "jpeg"]
    png_orig = [i for i, b in enumerate(bases) if b["role"] == "original" and b["fmt"] == "png"]
    pick = s_layout.choice(jpeg_orig, size=3, replace=False)
    bases[int(pick[0])]["ext"] = ".JPG"
    bases[int(pick[1])]["ext"] = ".JPG"
    bases[int(pick[2])]["ext"] = ".jpeg"
    bases[int(s_layout.choice(png_orig))]["ext"] = ".PNG"

    entries: list[Entry] = []
    for b in bases:
        data = encode(b["img"], b["fmt"])
        b["path"] = b["stem"] + b["ext"]
        b["data"] = data
        note = ""
        if b["role"] == "hard_negative":
            tmpl = bases[b["idx"]]
            note = f"template={tmpl['stem']} phash_dist={hamming(b['hash'], tmpl['hash'])}"
        entries.append(Entry(path=b["path"], data=data, role=b["role"], base=b["path"], note=note))

    # 4) Near-duplicates of N_DUP_GROUPS originals.
    dup_idx = sorted(int(i) for i in s_var.choice(len(originals), size=N_DUP_GROUPS, replace=False))
    n_copies = int(s_var.integers(3, 5))
    copy_idx = set(int(i) for i in s_var.choice(dup_idx, size=n_copies, replace=False))
    used_copy_names: set[str] = set()
    for i in dup_idx:
        b = bases[i]
        # Decode the *saved* original: real duplicates derive from the
        # published file, compression artefacts included.
        src = Image.open(io.BytesIO(b["data"])).convert("RGB")
        n_near = int(s_var.integers(1, 3 if i in copy_idx else 4))
        kinds = [str(k) for k in s_var.choice(NEAR_DUP_KINDS, size=n_near, replace=False)]
        for v, kind in enumerate(kinds, start=1):
            img, desc, q = make_variant(src, kind, s_var)
            if q is not None:
                data, ext = encode(img, "jpeg", q), ".jpg"
            elif b["fmt"] == "png" and kind in ("resize", "crop"):
                # Geometric edits keep the PNG format; colour edits of PNGs
                # are stored as JPEG (typical re-upload, and keeps size down).
                data, ext = encode(img, "png"), ".png"
            else:
                data, ext = encode(img, "jpeg", JPEG_VARIANT_QUALITY), ".jpg"
            entries.append(Entry(path=f"{b['stem']}_v{v}{ext}", data=data, role=f"variant:{kind}",
                                 base=b["path"],
                                 note=f"{desc} phash_dist={hamming(_decoded_hash(data), b['hash'])}"))
        if i in copy_idx:
            # Exact copy under an unrelated-looking name in another folder.
            while True:
                name = f"catalog/imports/IMG_{int(s_var.integers(1000, 9999))}{b['ext'].lower()}"
                if name not in used_copy_names:
                    break
            used_copy_names.add(name)
            entries.append(Entry(path=name, data=b["data"], role="exact_copy", base=b["path"]))

    # 5) Groups: numbered in path order of the base images so labels carry
    # no information about roles.
    base_paths = sorted({e.base for e in entries})
    group_of = {p: f"g{k:03d}" for k, p in enumerate(base_paths, start=1)}
    for e in entries:
        e.group = group_of[e.base]
    entries.sort(key=lambda e: e.path)
    paths = [e.path for e in entries]
    if len(set(p.lower() for p in paths)) != len(paths):
        raise RuntimeError("path collision (case-insensitive)")

    stats = dict(rejected=rejected, dup_groups=len(dup_idx), exact_copies=n_copies)
    return entries, stats


def provenance(seed: int) -> dict[str, object]:
    """What the bytes depend on: the seed and the versions of the libraries that draw and encode."""
    return {"generator": "data/make_sample.py", "seed": seed, "numpy": np.__version__, "pillow": PIL.__version__,
            "libjpeg": features.version("jpg"), "libjpeg_turbo": features.version("libjpeg_turbo"),
            "zlib": features.version("zlib"), "freetype2": features.version("freetype2")}


def write_sample(out: Path, seed: int) -> tuple[list[Entry], dict]:
    """Build the sample and atomically replace ``out`` with it (images, truth.csv, provenance.json)."""
    entries, stats = build(seed)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old: Path | None = None
    try:
        for e in entries:
            p = tmp / e.path
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(e.data)
        (tmp / "provenance.json").write_text(json.dumps(provenance(seed), indent=1) + "\n", encoding="utf-8")
        # newline="" + explicit lineterminator: identical bytes on every OS.
        with open(tmp / "truth.csv", "w", newline="", encoding="utf-8") as fh:
            wr = csv.writer(fh, lineterminator="\n")
            wr.writerow(["path", "group"])
            for e in entries:
                wr.writerow([e.path, e.group])
        # mkdtemp creates 0700; make the result look like a normal directory.
        for root, dirs, _files in os.walk(tmp):
            for dname in dirs:
                os.chmod(os.path.join(root, dname), 0o755)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rmdir(old)
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out.exists():
            os.rename(old, out)  # put the previous sample back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return entries, stats


def summarize(entries: list[Entry], stats: dict) -> str:
    """Human-readable counts of what was generated."""
    roles: dict[str, int] = {}
    for e in entries:
        roles[e.role] = roles.get(e.role, 0) + 1
    size = sum(len(e.data) for e in entries)
    lines = [f"files: {len(entries)} images + truth.csv, {size / 1e6:.2f} MB of image data",
             f"originals: {roles.get('original', 0)} "
             f"(re-drawn {stats['rejected']} lookalike candidates)",
             f"originals with planted duplicates: {stats['dup_groups']}",
             f"hard negatives: {roles.get('hard_negative', 0)}",
             f"exact copies: {roles.get('exact_copy', 0)}"]
    for k in NEAR_DUP_KINDS:
        lines.append(f"variants {k}: {roles.get('variant:' + k, 0)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="output directory (replaced atomically; default: src/neardup/sample)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="also list every generated non-original file with its recipe")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    entries, stats = write_sample(args.out, args.seed)
    print(summarize(entries, stats))
    if args.verbose:
        for e in entries:
            if e.role != "original":
                print(f"  {e.group} {e.role:22s} {e.path}  <- {e.base}  {e.note}")
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
