"""Evaluation sets from the real photos of the Grocery Store Dataset (Klasson et al., ../shared beside the checkout).

Three truth CSVs (header `path,group,class,role`, read by `neardup evaluate`):

- copies: photos, one independently edited copy of each original (crop, small rotation, resize, colour, JPEG),
  and distractor photos; an original and its copy share a group. `aspect`: the same with width and height
  resized by different factors and harder JPEG.
- reshots: every photo of some kinds in a split; all photos of one product are one group (re-shots).
- catalogue: the 81 iconic packshots are indexed, the photos of a split are queries grouped with their product.

Layout read: `<split>/<kind>/<coarse>/<product>/*.jpg`, or `<split>/<kind>/<coarse>/*.jpg` where the coarse class
is the product (26 fruit and vegetable classes); `iconic-images-and-descriptions/<kind>/<coarse>[/<product>]/
<product>_Iconic.jpg`. Folder names are the truth (they agree with `classes.csv` and `<split>.txt`).

CLI: `python -m neardup.testing.grocery OUT_DIR [--sets copies,reshots,catalogue] [--seed 0] ...`.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from ..errors import InputError

KINDS = ("Fruit", "Vegetables", "Packages")
HEADER = ("path", "group", "class", "role")
ICONIC_DIR = "iconic-images-and-descriptions"
_REL = Path("shared") / "datasets" / "grocery-store" / "dataset"
_EXTS = {".jpg", ".jpeg"}


@dataclasses.dataclass(frozen=True)
class GroceryPhoto:
    """One photo of the dataset: absolute path, product (fine class), coarse class and kind (Fruit, ...)."""

    path: Path
    product: str
    coarse: str
    kind: str


def grocery_root(explicit: str | Path | None = None) -> Path:
    """The dataset folder: `explicit`, else $NEARDUP_GROCERY, else `../shared/datasets/grocery-store/dataset`
    beside the repository (or beside the current directory). InputError naming the paths tried when absent."""
    if explicit is not None:
        tried = [Path(explicit)]
    elif os.environ.get("NEARDUP_GROCERY"):
        tried = [Path(os.environ["NEARDUP_GROCERY"])]
    else:
        tried = [Path(__file__).resolve().parents[3].parent / _REL, Path.cwd().resolve().parent / _REL]
    for p in tried:
        if p.is_dir():
            return p.resolve()
    raise InputError("Grocery Store Dataset not found; tried: " + ", ".join(str(p) for p in dict.fromkeys(tried))
                     + " (pass its folder, or set NEARDUP_GROCERY)")


def _check_kinds(kinds: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise InputError(f"kinds must be among {', '.join(KINDS)}; got {', '.join(kinds) or 'none'}")
    return kinds


def photos(root: str | Path | None = None, split: str = "test",
           kinds: tuple[str, ...] | list[str] = ("Packages",)) -> list[GroceryPhoto]:
    """Every photo of `kinds` in `split` (train, val, test), sorted by path."""
    root = grocery_root(root)
    out = []
    for kind in _check_kinds(kinds):
        base = root / split / kind
        if not base.is_dir():
            raise InputError(f"no folder {base} (split {split!r}, kind {kind!r}) in the Grocery Store Dataset")
        for p in base.rglob("*"):
            if p.suffix.lower() in _EXTS and p.is_file():
                parts = p.relative_to(base).parts  # (coarse, file) or (coarse, product, file)
                if len(parts) >= 2:
                    out.append(GroceryPhoto(p, parts[-2], parts[0], kind))
    return sorted(out, key=lambda ph: ph.path)


def iconic_images(root: str | Path | None = None) -> dict[str, Path]:
    """The catalogue packshots: product -> absolute path of `<product>_Iconic.jpg` (81 in the dataset)."""
    base = grocery_root(root) / ICONIC_DIR
    if not base.is_dir():
        raise InputError(f"no folder {base} (the iconic images) in the Grocery Store Dataset")
    return {p.name[:-len("_Iconic.jpg")]: p for p in sorted(base.rglob("*_Iconic.jpg")) if p.is_file()}


def _inner_rect(w: int, h: int, degrees: float) -> tuple[int, int]:
    """Largest axis-aligned rectangle inside a w x h rectangle rotated by `degrees` (no black corners)."""
    a = math.radians(degrees)
    s, c = abs(math.sin(a)), abs(math.cos(a))
    long_, short = (w, h) if w >= h else (h, w)
    if short <= 2.0 * s * c * long_ or abs(s - c) < 1e-10:
        x = 0.5 * short
        wr, hr = (x / s, x / c) if w >= h else (x / c, x / s)
    else:
        c2 = c * c - s * s
        wr, hr = (w * c - h * s) / c2, (h * c - w * s) / c2
    # 1 px less on each side: bicubic resampling greys the pixels next to the corners.
    return max(1, min(w, int(wr) - 2)), max(1, min(h, int(hr) - 2))


def edit_copy(img: Image.Image, rng: np.random.Generator, anisotropic: bool = False) -> tuple[Image.Image, dict]:
    """An independently edited copy of a product photo: (RGB image, dict of the edits).

    Rotate -2..+2 degrees about the centre, crop 0-10 % off each side independently (at least the rotation's
    black corners, so no side loses more than 10 %), resize by 0.5-1.0 (Lanczos), brightness, contrast and
    saturation x0.8-1.2; `quality` (40-90) is for the caller's JPEG save. `crop` records the fractions taken.
    `anisotropic`: width and height are resized by two independent factors in 0.5-1.0 (the aspect ratio changes
    by up to 2x, as a careless thumbnailer does) and saved at JPEG 45-65.
    """
    drawn = [float(v) for v in rng.uniform(0.0, 0.10, 4)]  # left, top, right, bottom fractions
    degrees = float(rng.uniform(-2.0, 2.0))
    scale = float(rng.uniform(0.5, 1.0))
    brightness, contrast, saturation = (float(v) for v in rng.uniform(0.8, 1.2, 3))
    quality = int(rng.integers(40, 91))
    sx, sy = scale, scale
    if anisotropic:  # drawn after the others: the plain sets stay byte for byte what they were
        sx, sy = (float(v) for v in rng.uniform(0.5, 1.0, 2))
        quality = int(rng.integers(45, 66))

    img = img.convert("RGB")
    w, h = img.size
    img = img.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=False)
    iw, ih = _inner_rect(w, h, degrees)
    mx, my = (w - iw) / 2 / w, (h - ih) / 2 / h  # the black corners' margin, per side
    crop = [max(drawn[0], mx), max(drawn[1], my), max(drawn[2], mx), max(drawn[3], my)]
    box = (math.ceil(crop[0] * w), math.ceil(crop[1] * h), w - math.ceil(crop[2] * w), h - math.ceil(crop[3] * h))
    img = img.crop(box)
    cw, ch = img.size
    size = (max(1, round(cw * sx)), max(1, round(ch * sy)))
    img = img.resize(size, Image.Resampling.LANCZOS)
    img = ImageEnhance.Brightness(img).enhance(brightness)
    img = ImageEnhance.Contrast(img).enhance(contrast)
    img = ImageEnhance.Color(img).enhance(saturation)
    edits = {"crop": crop, "rotate": degrees, "scale": [sx, sy] if anisotropic else scale, "brightness": brightness,
             "contrast": contrast,
             "saturation": saturation, "quality": quality, "size": list(img.size)}
    return img, edits


def _write_csv(path: Path, rows: list[tuple[str, str, str, str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(HEADER)
        wr.writerows(rows)
    return path


def make_copies_set(out_dir: str | Path, *, root: str | Path | None = None, n_originals: int = 240,
                    n_distractors: int = 240, seed: int = 0, split: str = "test",
                    kinds: tuple[str, ...] | list[str] = KINDS, anisotropic: bool = False) -> Path:
    """Write `copies.csv`, `copies/<stem>_copy.jpg` and `copies_edits.json` to `out_dir`; the CSV's path
    (`copies-aspect*` with `anisotropic`: see edit_copy).

    Picks n_originals + n_distractors distinct photos (seeded shuffle, so spread over products); each original
    and its one edited copy form group `c<k>`; distractors have no group. Every role is empty (all indexed).
    """
    if n_originals < 0 or n_distractors < 0:
        raise InputError("n_originals and n_distractors must be >= 0")
    all_photos = photos(root, split, kinds)
    need = n_originals + n_distractors
    if len(all_photos) < need:
        raise InputError(f"split {split!r} ({', '.join(kinds)}) has {len(all_photos)} photos; "
                         f"{n_originals} originals + {n_distractors} distractors asked")
    order = np.random.default_rng([seed, 0]).permutation(len(all_photos))[:need]
    chosen = [all_photos[i] for i in order]
    originals, distractors = chosen[:n_originals], chosen[n_originals:]

    out_dir = Path(out_dir).resolve()
    set_name = "copies-aspect" if anisotropic else "copies"
    copies_dir = out_dir / set_name
    copies_dir.mkdir(parents=True, exist_ok=True)
    rows, edits_doc, names = [], [], set()
    for k, ph in enumerate(originals):
        name = f"{ph.path.stem}_copy.jpg"
        if name in names:  # stems are unique within a split of this dataset; stay safe anyway
            name = f"{ph.path.stem}_{k}_copy.jpg"
        names.add(name)
        with Image.open(ph.path) as im:
            copy, edits = edit_copy(im, np.random.default_rng([seed, 1, k]), anisotropic)
        dst = copies_dir / name
        copy.save(dst, "JPEG", quality=edits["quality"])
        group = f"c{k}"
        rows += [(str(ph.path), group, ph.product, ""), (str(dst), group, ph.product, "")]
        edits_doc.append({"group": group, "original": str(ph.path), "copy": str(dst), "class": ph.product,
                          "edits": edits})
    rows += [(str(ph.path), "", ph.product, "") for ph in distractors]
    doc = {"seed": seed, "split": split, "kinds": list(kinds), "n_originals": n_originals,
           "n_distractors": n_distractors, "copies": edits_doc}
    (out_dir / f"{set_name}_edits.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return _write_csv(out_dir / f"{set_name}.csv", rows)


def make_reshots_set(out_dir: str | Path, *, root: str | Path | None = None, split: str = "test",
                     kinds: tuple[str, ...] | list[str] = ("Packages",)) -> Path:
    """Write `out_dir/reshots.csv`: every photo of `kinds` in `split`, group = class = product; its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [(str(ph.path), ph.product, ph.product, "") for ph in photos(root, split, kinds)]
    return _write_csv(out_dir / "reshots.csv", rows)


def make_catalogue_set(out_dir: str | Path, *, root: str | Path | None = None, split: str = "test",
                       kinds: tuple[str, ...] | list[str] = ("Packages",)) -> Path:
    """Write `out_dir/catalogue.csv`: the iconic packshots (indexed) and the photos of `kinds` in `split`
    (role `query`), group = class = product; its path.

    Every query must have its product's packshot in the catalogue: InputError naming the products otherwise
    (none is missing in the dataset), so a set never holds queries that cannot be right.
    """
    iconic = iconic_images(root)
    queries = photos(root, split, kinds)
    missing = sorted({ph.product for ph in queries} - set(iconic))
    if missing:
        raise InputError(f"no iconic image for {len(missing)} products: {', '.join(missing)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [(str(p), product, product, "") for product, p in sorted(iconic.items(), key=lambda kv: kv[1])]
    rows += [(str(ph.path), ph.product, ph.product, "query") for ph in queries]
    return _write_csv(out_dir / "catalogue.csv", rows)


def shelf_pairs(root: str | Path | None = None, *, split: str = "test", top: int = 60,
                workers: int = 2) -> list[tuple[Path, Path, int]]:
    """The known trap, measured: the `top` pairs of photos of two DIFFERENT products of one shelf (coarse
    class) of Packages that share the most RANSAC inliers (a shared background and brand), as
    (a, b, raw inliers), most first. Scans every such pair of the split (slow: tens of thousands of pairs).
    """
    from ..config import VerifyRule
    from ..embed.decode import file_local_features
    from ..search.verify import verify_pairs

    pool = photos(root, split, ("Packages",))
    feats = [file_local_features(ph.path) for ph in pool]
    pairs = [(i, j) for i in range(len(pool)) for j in range(i + 1, len(pool))
             if pool[i].coarse == pool[j].coarse and pool[i].product != pool[j].product]
    raw = VerifyRule(min_inliers=0, min_inlier_ratio=0.0, min_support=0.0)
    got = verify_pairs([feats[i] for i, _ in pairs], [feats[j] for _, j in pairs], raw, workers=workers)
    best = np.argsort(-got.inliers, kind="stable")[:top]
    return [(pool[pairs[k][0]].path, pool[pairs[k][1]].path, int(got.inliers[k])) for k in best.tolist()]


def make_shelf_set(out_dir: str | Path, *, root: str | Path | None = None, split: str = "test",
                   top: int = 60) -> Path:
    """Write `out_dir/shelf.csv` (a_path,b_path,inliers): shelf_pairs(); its path. No pair may verify."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = shelf_pairs(root, split=split, top=top)
    path = out_dir / "shelf.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(("a_path", "b_path", "inliers"))
        wr.writerows((str(a), str(b), n) for a, b, n in rows)
    return path


def _counts(csv_path: Path) -> str:
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if "a_path" in rows[0] if rows else False:
        return f"{len(rows)} pairs of different products"
    groups = {r["group"] for r in rows if r["group"]}
    queries = sum(r["role"] == "query" for r in rows)
    return (f"{len(rows) - queries} indexed, {queries} queries, {len(groups)} groups, "
            f"{len({r['class'] for r in rows})} classes")


def main(argv: list[str] | None = None) -> int:
    """CLI: write the asked evaluation sets to OUT_DIR and print each CSV's path and counts."""
    ap = argparse.ArgumentParser(prog="python -m neardup.testing.grocery",
                                 description="Write near-duplicate evaluation sets from the Grocery Store Dataset.")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--sets", default="copies,reshots,catalogue",
                    help="comma-separated: copies,aspect (copies resized anisotropically),reshots,catalogue,shelf")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--originals", type=int, default=240)
    ap.add_argument("--distractors", type=int, default=240)
    ap.add_argument("--split", default="test")
    ap.add_argument("--root", default=None, help="dataset folder [default: $NEARDUP_GROCERY or ../shared/...]")
    args = ap.parse_args(argv)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    makers = {
        "copies": lambda: make_copies_set(args.out_dir, root=args.root, n_originals=args.originals,
                                          n_distractors=args.distractors, seed=args.seed, split=args.split),
        "aspect": lambda: make_copies_set(args.out_dir, root=args.root, n_originals=args.originals,
                                          n_distractors=args.distractors, seed=args.seed, split=args.split,
                                          anisotropic=True),
        "reshots": lambda: make_reshots_set(args.out_dir, root=args.root, split=args.split),
        "catalogue": lambda: make_catalogue_set(args.out_dir, root=args.root, split=args.split),
        "shelf": lambda: make_shelf_set(args.out_dir, root=args.root, split=args.split),
    }
    bad = [s for s in sets if s not in makers]
    if bad or not sets:
        ap.error(f"--sets: unknown {', '.join(bad) or '(none)'}; choose among {', '.join(makers)}")
    try:
        for s in sets:
            t0 = time.perf_counter()
            path = makers[s]()
            print(f"{s}: {path} ({_counts(path)}; {time.perf_counter() - t0:.1f} s)")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
