"""Shared fixtures: synthetic photos, a fast deterministic fake embedder, and the real grocery photos."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from indexer.embed import l2_normalize

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

GROCERY = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "grocery-store" / "dataset"
SKIP_GROCERY = (f"real-photo test skipped: the Grocery Store Dataset is not at {GROCERY} "
                "(CI provides it as ../shared beside the checkout)")


def product_image(seed: int, size: tuple[int, int] = (320, 320)) -> Image.Image:
    """A deterministic product-like picture: gradient background, a shape, stripes, a label."""
    rng = np.random.default_rng(seed)
    w, h = size
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    bg = (c0 * (1 - x) * (1 - y) + c1 * x * y + rng.integers(0, 60) * np.sin(x * rng.uniform(3, 12))).clip(0, 255)
    img = Image.fromarray(bg.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        box = (int(x0), int(y0), int(x0 + rng.integers(w // 6, w // 2)), int(y0 + rng.integers(h // 6, h // 2)))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=fill)
    for k in range(int(rng.integers(2, 8))):
        yy = int(rng.integers(0, h))
        d.line((0, yy, w, yy + int(rng.integers(-40, 40))), fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
               width=int(rng.integers(2, 9)))
    d.text((10 + int(rng.integers(0, 40)), h - 30), f"product {seed}", fill=(0, 0, 0))
    return img


@pytest.fixture
def make_images(tmp_path: Path):
    """make_images(n, folder="imgs", fmt="JPEG", start=0) -> sorted list of paths of distinct product images."""

    def make(n: int, folder: str = "imgs", fmt: str = "JPEG", start: int = 0,
             size: tuple[int, int] = (320, 320)) -> list[Path]:
        root = tmp_path / folder
        root.mkdir(parents=True, exist_ok=True)
        ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
        paths = []
        for i in range(start, start + n):
            p = root / f"img_{i:04d}.{ext}"
            product_image(i, size).save(p, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
            paths.append(p)
        return paths

    return make


class FakeEmbedder:
    """Deterministic, fast stand-in for a CNN: a fixed random projection of 16x16 grayscale pixels.

    Used wherever the model is not the subject of the test; near-identical images get near-identical vectors.
    """

    name = "fake"
    dim = 32
    input_size = 16
    input_mode = "RGB"
    resample = "bilinear"
    preprocessing = "fake: 16x16 RGB, random projection"
    weights = "none"
    weights_fingerprint = "none"

    def __init__(self) -> None:
        self.calls = 0
        self.embedded = 0
        self._p = np.random.default_rng(42).standard_normal((16 * 16 * 3, self.dim)).astype(np.float32)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.embedded += len(batch)
        x = np.asarray(batch, np.float32).reshape(len(batch), -1) / 255.0
        return l2_normalize((x - x.mean(1, keepdims=True)) @ self._p)


@pytest.fixture
def fake_embedder() -> FakeEmbedder:
    """A fresh FakeEmbedder."""
    return FakeEmbedder()


@pytest.fixture
def grocery() -> Path:
    """Root of the real Grocery Store Dataset; the test is skipped (with the reason) when it is absent."""
    if not GROCERY.is_dir():
        pytest.skip(SKIP_GROCERY)
    return GROCERY
