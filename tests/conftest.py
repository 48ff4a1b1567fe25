"""Shared fixtures over neardup.testing (synthetic product photos, the fake embedder) and the real grocery photos."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from neardup.testing import FakeEmbedder, write_product_photos

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One ONNX export cache per test session, so tests never use (or fill) the user's ~/.cache/neardup; the CLI
# subprocesses inherit it. The first test that needs ResNet50 on ONNX Runtime pays its export (~40 s) once.
os.environ.setdefault("NEARDUP_CACHE", tempfile.mkdtemp(prefix="neardup-test-cache-"))

GROCERY = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "grocery-store" / "dataset"
SKIP_GROCERY = (f"real-photo test skipped: the Grocery Store Dataset is not at {GROCERY} "
                "(CI provides it as ../shared beside the checkout)")


@pytest.fixture
def make_images(tmp_path: Path):
    """make_images(n, folder="imgs", fmt="JPEG", start=0) -> sorted list of paths of distinct product images."""

    def make(n: int, folder: str = "imgs", fmt: str = "JPEG", start: int = 0,
             size: tuple[int, int] = (320, 320)) -> list[Path]:
        return write_product_photos(tmp_path / folder, range(start, start + n), fmt=fmt, size=size)

    return make


@pytest.fixture
def fake_embedder() -> FakeEmbedder:
    """A fresh FakeEmbedder."""
    return FakeEmbedder()


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
#: How long a page waits for what a test needs (playwright's default is 30 s), in milliseconds.
BROWSER_DEADLINE_MS = 120_000


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """A headless Chromium (playwright) for the module's tests; they are skipped, saying why, without it."""
    if not CHROMIUM.exists():
        pytest.skip("chromium not installed: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: pip install playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        new_page = b.new_page

        def generous_page(**kwargs: object) -> object:  # a loaded machine only makes the waits longer
            page = new_page(**kwargs)
            page.set_default_timeout(BROWSER_DEADLINE_MS)
            return page

        b.new_page = generous_page
        yield b
        b.close()


@pytest.fixture
def grocery() -> Path:
    """Root of the real Grocery Store Dataset; the test is skipped (with the reason) when it is absent."""
    if not GROCERY.is_dir():
        pytest.skip(SKIP_GROCERY)
    return GROCERY
