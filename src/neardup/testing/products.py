"""Synthetic product photos, part 1: seeded specs (everything random is decided here; rendering is pure)."""
from __future__ import annotations

import colorsys
import dataclasses
from dataclasses import dataclass

import numpy as np

CATEGORIES: tuple[str, ...] = ("bottles", "boxes", "cans", "jars", "tubes")
NEAR_DUP_KINDS: tuple[str, ...] = ("resize", "recompress", "color", "crop", "huecontrast")

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


def luma(c: tuple[int, int, int]) -> float:
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
    label = _rand_color(rng, 0.75, 0.97) if luma(body) < 0.5 else _rand_color(rng, 0.05, 0.30)
    text = (20, 20, 25) if luma(label) > 0.5 else (245, 245, 240)

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
