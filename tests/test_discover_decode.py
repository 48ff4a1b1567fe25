"""Discovery and decoding: stable order, every image mode, and bad files as clear errors."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neardup.embed.decode import decode_image, read_and_decode
from neardup.embed.discover import discover
from neardup.errors import DecodeError, InputError


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def test_discover_recursive_case_insensitive_and_sorted(tmp_path: Path) -> None:
    for rel in ["b/z.JPG", "a/y.png", "a/sub/x.WebP", "c.tiff", "notes.txt", "a/.hidden/h.jpg", ".dot.jpg"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in discover([tmp_path])]
    assert found == ["a/sub/x.WebP", "a/y.png", "b/z.JPG", "c.tiff"]
    # a file and its folder given together are not repeated
    assert discover([tmp_path / "c.tiff", tmp_path]) == discover([tmp_path])


def test_discover_refuses_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or folder"):
        discover([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        discover([tmp_path / "empty"])
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(InputError, match="not an image"):
        discover([tmp_path / "a.txt"])


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 100, 100))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    d = decode_image(_jpeg(img, exif=exif), 64)
    assert (d.width, d.height) == (100, 200)
    top, bottom = d.pixels[4, 32], d.pixels[60, 32]
    assert top[2] > 200 and top[0] < 60  # the blue half is now on top
    assert bottom[0] > 200 and bottom[2] < 60


@pytest.mark.parametrize("mode", ["CMYK", "P", "LA", "L", "1", "I;16", "RGBA", "I", "F"])
def test_any_mode_becomes_rgb(mode: str) -> None:
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16)).convert("I;16")
    elif mode in ("I", "F"):
        img = base.convert("L").convert(mode)
    else:
        img = base.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "TIFF" if mode in ("CMYK", "I;16", "I", "F") else "PNG")
    d = decode_image(buf.getvalue(), 32)
    assert d.pixels.shape == (32, 32, 3) and d.pixels.dtype == np.uint8
    assert (d.width, d.height) == (60, 40)
    if mode == "I;16":  # scaled to 8 bits, not clipped to white
        assert 20 < d.pixels.mean() < 235


def test_transparency_is_flattened_on_white() -> None:
    img = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    assert decode_image(buf.getvalue(), 8).pixels.min() == 255


def test_first_frame_of_animation() -> None:
    frames = [Image.new("RGB", (30, 30), c) for c in [(250, 0, 0), (0, 250, 0)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    px = decode_image(buf.getvalue(), 8).pixels
    assert px[..., 0].mean() > 200 and px[..., 1].mean() < 50


def test_large_jpeg_uses_draft_but_reports_true_size() -> None:
    d = decode_image(_jpeg(Image.new("RGB", (3000, 2000), (10, 20, 30))), 224)
    assert (d.width, d.height) == (3000, 2000) and d.pixels.shape == (224, 224, 3)


@pytest.mark.parametrize("data,reason", [
    (b"", "not a recognised image"),
    (b"hello, not an image", "not a recognised image"),
])
def test_garbage_is_a_decode_error(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_image(data, 32)


def test_truncated_jpeg_is_a_decode_error() -> None:
    data = _jpeg(Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 300, 3), dtype=np.uint8)))
    with pytest.raises(DecodeError, match="cannot decode"):
        decode_image(data[: len(data) // 2], 32)


def test_decompression_bomb_guard_stays_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    buf = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buf, "PNG")
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(buf.getvalue(), 32)


def test_read_and_decode_hashes_content(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    Image.new("RGB", (10, 10)).save(p)
    sha, d = read_and_decode(str(p), 16)
    import hashlib

    assert sha == hashlib.sha256(p.read_bytes()).hexdigest()
    with pytest.raises(DecodeError, match="cannot read"):
        read_and_decode(str(tmp_path / "gone.png"), 16)


def test_float_images_in_unit_range_are_scaled_not_black() -> None:
    arr = np.linspace(0, 1, 40 * 60, dtype=np.float32).reshape(40, 60)
    buf = io.BytesIO()
    Image.fromarray(arr, "F").save(buf, "TIFF")
    px = decode_image(buf.getvalue(), 32).pixels
    assert 100 < px.mean() < 155 and px.max() > 240
