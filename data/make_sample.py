#!/usr/bin/env python3
"""Generate a small synthetic product catalogue with planted near-duplicates.

Usage::

    python data/make_sample.py [--out data/sample] [--seed 0]

Writes ``<out>/catalog/<category>/...`` images and ``<out>/truth.csv``
(``path,group``; one row per image, sorted by path, paths relative to the
directory of truth.csv).  Images sharing a ``group`` are an original and its
near-duplicates / exact copies; every other image has a unique group.

The catalogue contains:

* ~60 "originals": product-like renders (bottle / box / can / jar / tube
  silhouettes on gradient + textured backgrounds, a label with text and a
  price tag).  Originals are rejected and re-drawn if their grayscale DCT
  perceptual hash is too close to an already accepted original, so that
  unplanted lookalikes don't pollute the ground truth (a transformed
  variant can still land near some unrelated image now and then).
* Near-duplicate variants of ~25 originals: downscaled, JPEG re-compressed,
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
import colorsys
import csv
import dataclasses
import io
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

# --------------------------------------------------------------------------
# Catalogue composition
# --------------------------------------------------------------------------

CATEGORIES: tuple[str, ...] = ("bottles", "boxes", "cans", "jars", "tubes")
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

NEAR_DUP_KINDS: tuple[str, ...] = ("resize", "recompress", "color", "crop", "huecontrast")

# Minimum Hamming distance (of 64 bits) between the pHashes of any two
# originals.  Unrelated natural photos sit around 32; 22 leaves a wide margin
# above typical near-duplicate thresholds (~10) without making rejection
# sampling slow.
MIN_ORIGINAL_PHASH_DISTANCE = 22
MAX_ATTEMPTS = 200

SUPERSAMPLE = 2  # products are drawn at 2x and downsampled for smooth edges

JPEG_ORIGINAL_QUALITY = 90
JPEG_VARIANT_QUALITY = 85  # non-"recompress" variants of JPEG originals
JPEG_SUBSAMPLING = 2  # 4:2:0, set explicitly so encoder defaults can't drift
PNG_COMPRESS_LEVEL = 9

BRANDS: tuple[str, ...] = (
    "Nordic", "Sunny", "Acme", "Verde", "Lumen", "Orchard", "Bluebell",
    "Alpine", "Koru", "Maple", "Terra", "Zest", "Harbor", "Willow", "Pico",
    "Golden", "Meadow", "Coral", "Juniper", "Atlas", "Nova", "Birch",
)
PRODUCTS: dict[str, tuple[str, ...]] = {
    "bottles": ("Shampoo", "Olive Oil", "Spring Water", "Hand Soap", "Lotion",
                "Vinegar", "Cold Brew", "Body Wash", "Conditioner", "Lemonade",
                "Soy Sauce", "Mouthwash", "Iced Tea", "Syrup"),
    "boxes": ("Cereal", "Tea Bags", "Crackers", "Pasta", "Detergent", "Granola",
              "Cookies", "Rice", "Oat Flakes", "Tissues", "Matches", "Biscuits",
              "Cocoa", "Muesli"),
    "cans": ("Tomato Soup", "Cola", "Chickpeas", "Tuna", "Energy Drink",
             "Coconut Milk", "Sweet Corn", "Peaches", "Beans", "Sardines",
             "Ginger Ale", "Lentils", "Pineapple", "Tonic"),
    "jars": ("Honey", "Peanut Butter", "Jam", "Pickles", "Face Cream", "Salsa",
             "Pesto", "Olives", "Mustard", "Marmalade", "Tahini", "Capers",
             "Ghee", "Relish"),
    "tubes": ("Toothpaste", "Hand Cream", "Sunscreen", "Tomato Paste",
              "Lip Balm", "Face Wash", "Hair Gel", "Aloe Gel", "Ointment",
              "Night Cream", "Anchovy Paste", "Foot Cream", "Primer", "Wasabi"),
}
SIZES: tuple[str, ...] = ("250 ml", "500 ml", "1 L", "150 g", "300 g", "400 g", "75 ml", "1 kg")


# --------------------------------------------------------------------------
# Specs: everything random is decided here, rendering is a pure function
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ProductSpec:
    """Parameters of one rendered product photo (original or hard negative)."""

    category: str
    width: int
    height: int
    # background
    bg_kind: str  # "linear" | "radial" | "table"
    bg_c1: tuple[int, int, int]
    bg_c2: tuple[int, int, int]
    bg_angle: float
    horizon: float  # fraction of height where the table starts ("table" only)
    texture: str  # "none" | "stripes" | "dots" | "checker" | "blotches" | "grain"
    tex_period: float
    tex_angle: float
    tex_amp: float
    noise_seed: int
    # product
    cx: float  # product centre x, fraction of width
    base: float  # product bottom y, fraction of height
    scale: float  # product height, fraction of image height
    aspect: float  # product width / height
    tilt: float  # degrees
    body_color: tuple[int, int, int]
    accent_color: tuple[int, int, int]
    label_color: tuple[int, int, int]
    text_color: tuple[int, int, int]
    label_pos: float  # label band centre, fraction of body height
    label_h: float  # label band height, fraction of body height
    product_pattern: str  # "none" | "stripes" | "dots"
    # text
    brand: str
    product: str
    size_text: str
    price: str
    tag_corner: int  # 0..3, where the price sticker goes
    tag_shape: str  # "circle" | "rect"
    tag_color: tuple[int, int, int]


def _rand_color(rng: np.random.Generator, lum_lo: float, lum_hi: float) -> tuple[int, int, int]:
    """Random saturated-ish colour whose luminance lies in [lum_lo, lum_hi] (0..1)."""
    h = float(rng.random())
    s = float(rng.uniform(0.35, 0.95))
    target = float(rng.uniform(lum_lo, lum_hi))
    # Iterate on HSV value until the Rec.601 luma hits the target, because the
    # pHash sees luminance only and hue alone must never be what separates two images.
    v = target
    for _ in range(20):
        r, g, b = colorsys.hsv_to_rgb(h, s, min(v, 1.0))
        y = 0.299 * r + 0.587 * g + 0.114 * b
        if abs(y - target) < 0.01 or v >= 1.0:
            break
        v *= target / max(y, 1e-3)
    r, g, b = colorsys.hsv_to_rgb(h, s, min(v, 1.0))
    return (int(round(r * 255)), int(round(g * 255)), int(round(b * 255)))


def _luma(c: tuple[int, int, int]) -> float:
    return (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) / 255.0


def _price(rng: np.random.Generator) -> str:
    euros = int(rng.integers(1, 30))
    cents = int(rng.choice([49, 79, 95, 99, 29, 19]))
    if rng.random() < 0.6:
        return f"${euros}.{cents:02d}"
    return f"{euros},{cents:02d} EUR"


def random_spec(category: str, rng: np.random.Generator, lossless: bool = False) -> ProductSpec:
    """Draw the parameters of one product photo of ``category`` from ``rng``.

    ``lossless`` marks images that will be stored as PNG: they get no
    per-pixel grain, which PNG cannot compress and would blow the size budget
    (clean studio renders are what ships as PNG anyway)."""
    w = int(rng.integers(320, 513))
    h = int(rng.integers(320, 513))
    # Background endpoints far apart in luminance so the gradient itself is
    # a strong low-frequency structure for the pHash, in a random direction.
    dark_first = rng.random() < 0.5
    lo = _rand_color(rng, 0.12, 0.40)
    hi = _rand_color(rng, 0.60, 0.92)
    c1, c2 = (lo, hi) if dark_first else (hi, lo)
    bg_kind = str(rng.choice(["linear", "radial", "table"], p=[0.45, 0.25, 0.30]))
    texture = str(rng.choice(["none", "stripes", "dots", "checker", "blotches", "grain"],
                             p=[0.15, 0.25, 0.2, 0.1, 0.2, 0.1]))
    if lossless and texture == "grain":
        texture = "none"

    aspect_ranges = {
        "bottles": (0.28, 0.45),
        "boxes": (0.55, 0.95),
        "cans": (0.45, 0.75),
        "jars": (0.70, 1.10),
        "tubes": (0.30, 0.45),
    }
    a_lo, a_hi = aspect_ranges[category]
    body = _rand_color(rng, 0.08, 0.95)
    # Label contrasts with the body; text contrasts with the label.
    label = _rand_color(rng, 0.75, 0.97) if _luma(body) < 0.5 else _rand_color(rng, 0.05, 0.30)
    text = (20, 20, 25) if _luma(label) > 0.5 else (245, 245, 240)

    return ProductSpec(
        category=category,
        width=w,
        height=h,
        bg_kind=bg_kind,
        bg_c1=c1,
        bg_c2=c2,
        bg_angle=float(rng.uniform(0, 2 * np.pi)),
        horizon=float(rng.uniform(0.55, 0.80)),
        texture=texture,
        tex_period=float(rng.uniform(14, 48)),
        tex_angle=float(rng.uniform(0, np.pi)),
        tex_amp=float(rng.uniform(0.05, 0.12)),
        noise_seed=int(rng.integers(0, 2**31)),
        cx=float(rng.uniform(0.28, 0.72)),
        base=float(rng.uniform(0.78, 0.95)),
        scale=float(rng.uniform(0.45, 0.78)),
        aspect=float(rng.uniform(a_lo, a_hi)),
        tilt=float(rng.choice([0.0, 0.0, 0.0, rng.uniform(-14, 14)])),
        body_color=body,
        accent_color=_rand_color(rng, 0.1, 0.9),
        label_color=label,
        text_color=text,
        label_pos=float(rng.uniform(0.40, 0.65)),
        label_h=float(rng.uniform(0.22, 0.38)),
        product_pattern=str(rng.choice(["none", "stripes", "dots"], p=[0.5, 0.3, 0.2])),
        brand=str(rng.choice(BRANDS)),
        product=str(rng.choice(PRODUCTS[category])),
        size_text=str(rng.choice(SIZES)),
        price=_price(rng),
        tag_corner=int(rng.integers(0, 4)),
        tag_shape=str(rng.choice(["circle", "rect"])),
        tag_color=_rand_color(rng, 0.2, 0.6),
    )


def hard_negative_spec(template: ProductSpec, rng: np.random.Generator,
                       mode: str) -> ProductSpec:
    """A different product on the same template (background, colours, texture,
    price-sticker position) with other label text, and either other shape
    proportions (``mode="proportions"``: same placement) or another layout
    (``mode="layout"``: same proportions, other position and size)."""
    others = [p for p in PRODUCTS[template.category] if p != template.product]
    brands = [b for b in BRANDS if b != template.brand]
    changes: dict = dict(
        brand=str(rng.choice(brands)),
        product=str(rng.choice(others)),
        size_text=str(rng.choice([s for s in SIZES if s != template.size_text])),
        price=_price(rng),
        label_pos=float(np.clip(1.05 - template.label_pos, 0.35, 0.7)),
    )
    if mode == "proportions":
        # Well outside what a near-duplicate can do: crop/resize change the
        # aspect of the product by a few percent at most.
        changes["aspect"] = template.aspect * float(rng.choice([0.70, 1.35]))
    elif mode == "layout":
        changes["scale"] = float(np.clip(template.scale * float(rng.choice([0.80, 1.20])), 0.40, 0.82))
        changes["cx"] = template.cx + (0.14 if template.cx < 0.5 else -0.14)
    else:
        raise ValueError(f"unknown hard-negative mode {mode!r}")
    return dataclasses.replace(template, **changes)


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------

_FONT_CACHE: dict[int, ImageFont.ImageFont | ImageFont.FreeTypeFont] = {}


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in default font, scalable where FreeType is available."""
    if size not in _FONT_CACHE:
        try:
            _FONT_CACHE[size] = ImageFont.load_default(size=size)
        except (TypeError, ImportError, OSError):
            # Old Pillow / no FreeType: fixed-size bitmap font.
            _FONT_CACHE[size] = ImageFont.load_default()
    return _FONT_CACHE[size]


def _fit_font(draw: ImageDraw.ImageDraw, text: str, max_w: float, max_h: float,
              start: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = max(start, 6)
    while size > 6:
        f = _font(size)
        l, t, r, b = draw.textbbox((0, 0), text, font=f)
        if r - l <= max_w and b - t <= max_h:
            return f
        size -= 1
    return _font(6)


def _draw_centered(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str,
                   font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
                   fill: tuple[int, ...]) -> None:
    l, t, r, b = draw.textbbox((0, 0), text, font=font)
    draw.text((xy[0] - (r - l) / 2 - l, xy[1] - (b - t) / 2 - t), text, font=font, fill=fill)


def _background(spec: ProductSpec) -> np.ndarray:
    """Float RGB (H, W, 3) in 0..255: gradient plus optional texture."""
    w, h = spec.width, spec.height
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    xn, yn = xx / (w - 1), yy / (h - 1)
    c1 = np.array(spec.bg_c1, dtype=np.float64)
    c2 = np.array(spec.bg_c2, dtype=np.float64)
    if spec.bg_kind == "radial":
        fx = 0.5 + 0.35 * np.cos(spec.bg_angle)
        fy = 0.5 + 0.35 * np.sin(spec.bg_angle)
        t = np.sqrt((xn - fx) ** 2 + (yn - fy) ** 2) / 0.9
    else:
        t = xn * np.cos(spec.bg_angle) + yn * np.sin(spec.bg_angle)
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    t = np.clip(t, 0, 1)[..., None]
    img = c1 * (1 - t) + c2 * t
    if spec.bg_kind == "table":
        # A tabletop in the lower part: a hard horizontal edge is very
        # "photo-like" and gives the hash a strong structural feature.
        hz = int(spec.horizon * h)
        table = (0.55 * c1 + 0.45 * c2) * 0.55 + np.array([30.0, 24.0, 18.0])
        shade = (1.0 - 0.25 * (yy[hz:] - hz) / max(h - hz, 1))[..., None]
        img[hz:] = table * shade

    rng = np.random.default_rng(spec.noise_seed)
    amp = spec.tex_amp * 255.0
    if spec.texture == "stripes":
        u = xx * np.cos(spec.tex_angle) + yy * np.sin(spec.tex_angle)
        img += (amp * np.sign(np.sin(2 * np.pi * u / spec.tex_period)))[..., None]
    elif spec.texture == "checker":
        p = spec.tex_period * 1.5
        chk = ((np.floor(xx / p) + np.floor(yy / p)) % 2) * 2 - 1
        img += (amp * chk)[..., None]
    elif spec.texture == "dots":
        p = spec.tex_period
        dx = (xx % p) - p / 2
        dy = (yy % p) - p / 2
        dots = (dx * dx + dy * dy) < (p * 0.22) ** 2
        img -= (amp * 1.5 * dots)[..., None]
    elif spec.texture == "blotches":
        # Coarse low-frequency noise (fabric / paper backdrop); coarse rather
        # than per-pixel so it stays cheap to compress.
        gh, gw = max(h // 40, 2), max(w // 40, 2)
        coarse = rng.normal(0, 1, (gh, gw)).astype(np.float32)
        up = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BICUBIC))
        img += (amp * 1.4 * up)[..., None]
    elif spec.texture == "grain":
        # Mild sensor-like grain; amplitude kept small to bound file size.
        img += rng.normal(0, 3.0, (h, w, 1))
    return img


def _product_layer(spec: ProductSpec) -> Image.Image:
    """Render the product on a transparent RGBA canvas (at final resolution)."""
    S = SUPERSAMPLE
    # Boxes get a side face drawn to the right; leave room for it.
    depth_f = 0.28 if spec.category == "boxes" else 0.0
    # Shrink wide products so they always fit the frame: a product cut by
    # the border would make crop variants and hard negatives ill-defined.
    ph = min(spec.scale * spec.height, 0.86 * spec.width / (spec.aspect * (1 + depth_f)))
    pw = ph * spec.aspect
    depth = depth_f * pw
    cw, ch = int((pw + depth) * S) + 4, int(ph * S) + 4
    layer = Image.new("RGBA", (cw, ch), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    W, H = pw * S, ph * S
    x0, y0 = 2.0, 2.0
    body = spec.body_color
    acc = spec.accent_color

    # (left, top, right, bottom) of the part that carries the label.
    if spec.category == "bottles":
        neck_w, cap_h, neck_h = 0.36 * W, 0.10 * H, 0.14 * H
        sh_h = 0.12 * H
        cx = x0 + W / 2
        d.rectangle([cx - neck_w * 0.55, y0, cx + neck_w * 0.55, y0 + cap_h], fill=acc)
        d.rectangle([cx - neck_w / 2, y0 + cap_h, cx + neck_w / 2, y0 + cap_h + neck_h], fill=body)
        top = y0 + cap_h + neck_h
        d.polygon([(cx - neck_w / 2, top), (cx + neck_w / 2, top),
                   (x0 + W, top + sh_h), (x0, top + sh_h)], fill=body)
        d.rounded_rectangle([x0, top + sh_h * 0.5, x0 + W, y0 + H], radius=0.14 * W, fill=body)
        part = (x0, top + sh_h, x0 + W, y0 + H)
    elif spec.category == "boxes":
        dp = depth * S
        side = tuple(int(c * 0.62) for c in body)
        topc = tuple(min(255, int(c * 1.18 + 20)) for c in body)
        d.polygon([(x0 + W, y0 + dp * 0.5), (x0 + W + dp, y0), (x0 + W + dp, y0 + H - dp * 0.5),
                   (x0 + W, y0 + H)], fill=side)
        d.polygon([(x0, y0 + dp * 0.5), (x0 + dp, y0), (x0 + W + dp, y0), (x0 + W, y0 + dp * 0.5)],
                  fill=topc)
        d.rectangle([x0, y0 + dp * 0.5, x0 + W, y0 + H], fill=body)
        d.rectangle([x0, y0 + dp * 0.5, x0 + W, y0 + dp * 0.5 + 0.08 * H], fill=acc)
        part = (x0, y0 + dp * 0.5 + 0.08 * H, x0 + W, y0 + H)
    elif spec.category == "cans":
        eh = 0.12 * W
        metal = (190, 192, 198)
        d.rectangle([x0, y0 + eh / 2, x0 + W, y0 + H - eh / 2], fill=body)
        d.ellipse([x0, y0 + H - eh, x0 + W, y0 + H], fill=body)
        d.ellipse([x0, y0, x0 + W, y0 + eh], fill=metal)
        d.ellipse([x0 + 0.08 * W, y0 + 0.1 * eh, x0 + 0.92 * W, y0 + 0.9 * eh], fill=(150, 152, 158))
        for k in (0.10, 0.90):
            d.rectangle([x0, y0 + eh / 2 + k * (H - eh) - 0.01 * H, x0 + W,
                         y0 + eh / 2 + k * (H - eh) + 0.01 * H], fill=acc)
        part = (x0, y0 + eh, x0 + W, y0 + H - eh)
    elif spec.category == "jars":
        lid_h = 0.18 * H
        d.rounded_rectangle([x0 + 0.06 * W, y0, x0 + 0.94 * W, y0 + lid_h], radius=0.04 * W, fill=acc)
        for k in range(1, 5):  # lid ridges
            yk = y0 + lid_h * k / 5
            d.line([x0 + 0.06 * W, yk, x0 + 0.94 * W, yk], fill=tuple(int(c * 0.7) for c in acc),
                   width=max(1, int(0.01 * H)))
        d.rounded_rectangle([x0, y0 + lid_h * 0.9, x0 + W, y0 + H], radius=0.2 * W, fill=body)
        part = (x0, y0 + lid_h, x0 + W, y0 + H)
    else:  # tubes: crimped flat end at the top, tapering to a cap at the bottom
        crimp_h, cap_h = 0.07 * H, 0.13 * H
        d.rectangle([x0, y0, x0 + W, y0 + crimp_h], fill=acc)
        for k in range(1, 6):
            xk = x0 + W * k / 6
            d.line([xk, y0, xk, y0 + crimp_h], fill=tuple(int(c * 0.7) for c in acc),
                   width=max(1, int(0.01 * W)))
        bot = y0 + H - cap_h
        d.polygon([(x0, y0 + crimp_h), (x0 + W, y0 + crimp_h),
                   (x0 + 0.78 * W, bot), (x0 + 0.22 * W, bot)], fill=body)
        d.rectangle([x0 + 0.3 * W, bot, x0 + 0.7 * W, y0 + H], fill=acc)
        part = (x0 + 0.08 * W, y0 + crimp_h, x0 + 0.92 * W, bot)

    pl, pt, pr, pb = part
    ph_ = pb - pt
    # Pattern on the product body, clipped to the silhouette via alpha below.
    if spec.product_pattern != "none":
        pat = Image.new("L", (cw, ch), 0)
        pd = ImageDraw.Draw(pat)
        step = max(int(0.12 * (pr - pl)), 6)
        if spec.product_pattern == "stripes":
            for yk in np.arange(pt, pb, step * 2):
                pd.rectangle([pl, yk, pr, yk + step * 0.6], fill=255)
        else:
            r = step * 0.25
            for yk in np.arange(pt + step / 2, pb, step):
                for xk in np.arange(pl + step / 2, pr, step):
                    pd.ellipse([xk - r, yk - r, xk + r, yk + r], fill=255)
        pat = Image.fromarray(np.minimum(np.asarray(pat), np.asarray(layer.getchannel("A"))))
        tint = tuple(int(c * 0.75 + a * 0.25) for c, a in zip(body, acc)) + (255,)
        layer.paste(Image.new("RGBA", (cw, ch), tint), (0, 0), pat)

    # Label band with brand / product / size.
    lh = spec.label_h * ph_
    lc = pt + spec.label_pos * ph_
    ly0, ly1 = max(pt, lc - lh / 2), min(pb, lc + lh / 2)
    lx0, lx1 = pl + 0.04 * (pr - pl), pr - 0.04 * (pr - pl)
    d.rectangle([lx0, ly0, lx1, ly1], fill=spec.label_color)
    d.rectangle([lx0, ly0, lx1, ly0 + 0.08 * (ly1 - ly0)], fill=acc)
    tw, th = (lx1 - lx0) * 0.9, (ly1 - ly0)
    lines = [(spec.brand.upper(), 0.30), (spec.product, 0.28), (spec.size_text, 0.18)]
    yk = ly0 + 0.12 * th
    for text, frac in lines:
        f = _fit_font(d, text, tw, frac * th, int(frac * th))
        _draw_centered(d, ((lx0 + lx1) / 2, yk + frac * th / 2), text, f, spec.text_color)
        yk += frac * th + 0.04 * th

    if spec.category != "boxes":
        # Cylindrical shading: darker edges, a highlight left of centre.
        u = np.linspace(0, 1, cw)
        shade = 0.72 + 0.38 * np.sin(np.pi * u) + 0.18 * np.exp(-((u - 0.32) / 0.06) ** 2)
        arr = np.asarray(layer).astype(np.float64)
        arr[..., :3] *= shade[None, :, None]
        layer = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGBA")

    if spec.tilt:
        layer = layer.rotate(spec.tilt, resample=Image.BICUBIC, expand=True)
    return layer.resize((max(layer.width // S, 1), max(layer.height // S, 1)), Image.LANCZOS)


def render(spec: ProductSpec) -> Image.Image:
    """Render a full product photo (RGB) from its spec. Pure function of ``spec``."""
    w, h = spec.width, spec.height
    bg = Image.fromarray(np.clip(_background(spec), 0, 255).round().astype(np.uint8), "RGB")
    prod = _product_layer(spec)

    # Keep the product inside the frame whatever the random placement.
    px = int(round(spec.cx * w - prod.width / 2))
    px = min(max(px, 4), max(w - prod.width - 4, 0))
    py = int(round(spec.base * h - prod.height))
    py = min(max(py, 4), max(h - prod.height - 4, 0))

    # Soft contact shadow under the product.
    sh = Image.new("L", (w, h), 0)
    sd = ImageDraw.Draw(sh)
    sw = prod.width * 0.55
    by = py + prod.height
    sd.ellipse([px + prod.width / 2 - sw, by - 0.04 * prod.height,
                px + prod.width / 2 + sw, by + 0.05 * prod.height], fill=150)
    sh = sh.filter(ImageFilter.GaussianBlur(6))
    bg.paste(Image.new("RGB", (w, h), (0, 0, 0)), (0, 0), sh)

    canvas = bg.convert("RGBA")
    canvas.alpha_composite(prod, (px, py))
    d = ImageDraw.Draw(canvas)

    # Price sticker in a corner.
    r = int(min(w, h) * 0.11)
    m = int(min(w, h) * 0.04)
    cx = m + r if spec.tag_corner in (0, 3) else w - m - r
    cy = m + r if spec.tag_corner in (0, 1) else h - m - r
    box = [cx - r, cy - r * (1 if spec.tag_shape == "circle" else 0.6),
           cx + r, cy + r * (1 if spec.tag_shape == "circle" else 0.6)]
    tag_text = (255, 255, 250) if _luma(spec.tag_color) < 0.55 else (15, 15, 15)
    if spec.tag_shape == "circle":
        d.ellipse(box, fill=spec.tag_color + (255,), outline=tag_text + (255,), width=2)
    else:
        d.rounded_rectangle(box, radius=r * 0.2, fill=spec.tag_color + (255,),
                            outline=tag_text + (255,), width=2)
    f = _fit_font(d, spec.price, 1.7 * r, 0.6 * r, int(0.55 * r))
    _draw_centered(d, (cx, cy), spec.price, f, tag_text + (255,))
    return canvas.convert("RGB")


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
    """64-bit grayscale DCT perceptual hash as a bool array (classic pHash recipe)."""
    a = np.asarray(img.convert("L").resize((32, 32), Image.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ a @ _DCT32.T)[:8, :8].ravel()
    return low > np.median(low[1:])


def hamming(a: np.ndarray, b: np.ndarray) -> int:
    """Number of differing bits between two hashes."""
    return int(np.count_nonzero(a != b))


# --------------------------------------------------------------------------
# Encoding and variants
# --------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, quality: int = JPEG_ORIGINAL_QUALITY) -> bytes:
    """Encode with fully explicit parameters so output bytes are reproducible."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        img.save(buf, format="JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING,
                 optimize=False, progressive=False)
    elif fmt == "png":
        img.save(buf, format="PNG", optimize=False, compress_level=PNG_COMPRESS_LEVEL)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return buf.getvalue()


def make_variant(img: Image.Image, kind: str,
                 rng: np.random.Generator) -> tuple[Image.Image, str, int | None]:
    """Apply one near-duplicate transformation.

    Returns (image, short description, forced JPEG quality or None).  For
    ``recompress`` the image is returned unchanged with the low quality to
    encode it at, so it is compressed exactly once at that quality."""
    w, h = img.size
    if kind == "resize":
        f = float(rng.uniform(0.50, 0.70))
        return (img.resize((max(int(w * f), 1), max(int(h * f), 1)), Image.LANCZOS),
                f"scale={f:.2f}", None)
    if kind == "recompress":
        q = int(rng.integers(40, 61))
        return img, f"q={q}", q
    if kind == "color":
        bright = 1.0 + float(rng.choice([-1, 1])) * float(rng.uniform(0.10, 0.15))
        cast = rng.uniform(-0.05, 0.05, 3)
        arr = np.asarray(img, dtype=np.float64) * (bright * (1.0 + cast))[None, None, :]
        return (Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGB"),
                f"brightness={bright:.2f} cast={np.round(cast, 3).tolist()}", None)
    if kind == "crop":
        sides = [bool(s) for s in rng.random(4) < 0.6]
        if not any(sides):
            sides[int(rng.integers(0, 4))] = True
        fr = [float(rng.uniform(0.03, 0.06)) if s else 0.0 for s in sides]
        box = (int(w * fr[0]), int(h * fr[1]), w - int(w * fr[2]), h - int(h * fr[3]))
        return img.crop(box), "crop(l,t,r,b)=" + ",".join(f"{x:.3f}" for x in fr), None
    if kind == "huecontrast":
        dh = float(rng.choice([-1, 1])) * float(rng.uniform(0.015, 0.035))
        hsv = np.asarray(img.convert("HSV"), dtype=np.int32)
        hsv[..., 0] = (hsv[..., 0] + int(round(dh * 256))) % 256
        out = Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")
        c = 1.0 + float(rng.choice([-1, 1])) * float(rng.uniform(0.08, 0.15))
        return ImageEnhance.Contrast(out).enhance(c), f"hue={dh:+.3f} contrast={c:.2f}", None
    raise ValueError(f"unknown variant kind {kind!r}")


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


def write_sample(out: Path, seed: int) -> tuple[list[Entry], dict]:
    """Build the sample and atomically replace ``out`` with it."""
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
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "sample",
                    help="output directory (replaced atomically; default: data/sample)")
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
