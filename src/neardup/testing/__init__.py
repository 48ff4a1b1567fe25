"""Test and benchmark helpers (as numpy.testing): synthetic product photos and a fake embedder.

One generator of synthetic product photos (`products` + `render`) serves the test suite, the benchmarks
(when no real photos are at hand) and `data/make_sample.py`, the regenerator of the demo's sample catalogue.
`FakeEmbedder` stands in for a CNN wherever the model is not the subject of a test.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..embed.embedders import l2_normalize
from .products import CATEGORIES, random_spec
from .render import render


def product_photo(seed: int, size: tuple[int, int] = (320, 320)) -> Image.Image:
    """A deterministic synthetic product photo (RGB, `size` = (width, height)); other seeds, other products."""
    rng = np.random.default_rng([seed, 7])
    spec = random_spec(CATEGORIES[seed % len(CATEGORIES)], rng)
    return render(dataclasses.replace(spec, width=int(size[0]), height=int(size[1])))


@functools.lru_cache(maxsize=1024)
def _encoded(seed: int, size: tuple[int, int], fmt: str, quality: int) -> bytes:
    # A test suite writes the same few photos again and again (~30 ms to render each, ~20 kB encoded).
    buf = io.BytesIO()
    product_photo(seed, size).save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_product_photos(folder: str | Path, seeds: range | list[int], *, fmt: str = "JPEG",
                         size: tuple[int, int] = (320, 320), quality: int = 92,
                         prefix: str = "img") -> list[Path]:
    """Write `product_photo(seed, size)` for each seed to `folder` as `<prefix>_<seed:04d>.jpg|png`; their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    paths = []
    for seed in seeds:
        p = folder / f"{prefix}_{seed:04d}.{ext}"
        p.write_bytes(_encoded(int(seed), (int(size[0]), int(size[1])), fmt, quality))
        paths.append(p)
    return paths


class FakeEmbedder:
    """Deterministic, fast stand-in for a CNN: a fixed random projection of 16x16 RGB pixels (32-d).

    It satisfies the `Embedder` seam; near-identical images get near-identical vectors. `calls` and
    `embedded` count what it was asked to do.
    """

    name = "fake"
    dim = 32
    input_size = 16
    input_mode = "RGB"
    resample = "bilinear"
    preprocessing = "fake: 16x16 RGB, random projection"
    weights = "none"
    weights_fingerprint = "none"

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.embedded = 0
        self.delay = delay  #: seconds each embed call takes (a slow model, for tests that kill a worker mid-run)
        self._p = np.random.default_rng(42).standard_normal((16 * 16 * 3, self.dim)).astype(np.float32)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [n, 16, 16, 3] -> float32 [n, 32] unit rows."""
        self.calls += 1
        self.embedded += len(batch)
        if self.delay:
            time.sleep(self.delay)
        x = np.asarray(batch, np.float32).reshape(len(batch), -1) / 255.0
        return l2_normalize((x - x.mean(1, keepdims=True)) @ self._p)
