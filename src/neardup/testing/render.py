"""Synthetic product photos, part 2: the pure renderer (bottle, box, can, jar and tube silhouettes on
gradient and textured backgrounds, a label with text, a price sticker), encoding, and near-duplicate edits.

Output is deterministic for a given spec and library versions (Pillow, libjpeg, zlib, FreeType): encoder
parameters are explicit.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from .products import JPEG_ORIGINAL_QUALITY, JPEG_SUBSAMPLING, PNG_COMPRESS_LEVEL, SUPERSAMPLE, ProductSpec, luma

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
        up = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC))
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
        layer = layer.rotate(spec.tilt, resample=Image.Resampling.BICUBIC, expand=True)
    return layer.resize((max(layer.width // S, 1), max(layer.height // S, 1)), Image.Resampling.LANCZOS)


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
    tag_text = (255, 255, 250) if luma(spec.tag_color) < 0.55 else (15, 15, 15)
    if spec.tag_shape == "circle":
        d.ellipse(box, fill=spec.tag_color + (255,), outline=tag_text + (255,), width=2)
    else:
        d.rounded_rectangle(box, radius=r * 0.2, fill=spec.tag_color + (255,),
                            outline=tag_text + (255,), width=2)
    f = _fit_font(d, spec.price, 1.7 * r, 0.6 * r, int(0.55 * r))
    _draw_centered(d, (cx, cy), spec.price, f, tag_text + (255,))
    return canvas.convert("RGB")


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
        return (img.resize((max(int(w * f), 1), max(int(h * f), 1)), Image.Resampling.LANCZOS),
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
