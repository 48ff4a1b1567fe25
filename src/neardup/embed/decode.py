"""Embed, decode: read image files and decode them into fixed-size pixel arrays."""
from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import warnings
from dataclasses import dataclass

import numpy as np

# The plugins of IMAGE_FORMATS, registered now: Image.open(formats=...) fails (KeyError) on a named format whose
# plugin Pillow has not loaded yet (WebP and TIFF load lazily).
from PIL import (  # noqa: F401 - the plugins are imported to register them (above)
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from ..config import DEFAULTS, IMAGE_FORMATS
from ..errors import DecodeError
from ..features import LocalFeatures
from ..fileio import fmt_bytes
from .local_features import extract_local

# load_upright refuses bombs itself, with a reason per file. Pillow's warning for images between one and two
# times its pixel limit would otherwise leak to stderr with a source line. Set once at import: warnings
# filters are process-wide, and changing them per call would race between decoding threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "lanczos": Image.Resampling.LANCZOS}
_HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass(frozen=True)
class Decoded:
    """One decoded image: `pixels` uint8 [s, s, 3] (RGB) or [s, s] (L), its upright original size, and its
    local features when asked for."""

    pixels: np.ndarray
    width: int
    height: int
    local: LocalFeatures | None = None


def sha256_hex(data: bytes) -> str:
    """Content hash used for exact-duplicate detection and embedding reuse."""
    return hashlib.sha256(data).hexdigest()


def _to_8bit(img: Image.Image) -> Image.Image:
    # Pillow's convert() clips instead of scaling: 16-bit photos would turn white and [0, 1] floats black.
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top = float(np.nanmax(arr)) if arr.size else 0.0
        scale = 255.0 if top <= 1.0 else 255.0 / top if top > 255 else 1.0
    else:  # I;16* and I hold 16-bit samples
        scale = 255.0 / 65535.0
    return Image.fromarray(np.clip(np.nan_to_num(arr * scale), 0, 255).astype(np.uint8), mode="L")


def _flatten_alpha(img: Image.Image) -> Image.Image:
    # Transparent product cut-outs are shown on white in shops; black (Pillow's default) would change the look.
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any Pillow mode (CMYK, P, LA, RGBA, 16-bit, float) to `mode` ("RGB" or "L")."""
    if img.mode in _HIGH_BIT_MODES:
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = _flatten_alpha(img)
    return img if img.mode == mode else img.convert(mode)


def load_upright(data: bytes, min_side: int, *, mode: str = "RGB",
                 max_pixels: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode image bytes upright in `mode`, at a reduced JPEG scale no smaller than `min_side` when possible.

    Returns the image and the photo's original upright (width, height). EXIF orientation is applied, the
    first frame of an animation is used, and Pillow's decompression-bomb limit (or the lower `max_pixels`) is
    enforced before decoding. Raises DecodeError with a short reason.
    """
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            # Checked here rather than through Pillow's warning: warnings filters are process-wide and
            # would race between decoding threads.
            limit = min((x for x in (Image.MAX_IMAGE_PIXELS, max_pixels) if x), default=None)
            if limit and img.width * img.height > limit:
                raise DecodeError(f"refused as a decompression bomb ({img.width}x{img.height} pixels > {limit})")
            original = img.size
            if img.format == "JPEG":
                # DCT-domain downscaling: a 12 MP photo decodes ~8x faster and is never smaller than min_side.
                img.draft("RGB" if mode == "RGB" else "L", (min_side, min_side))
            img.seek(0)
            img.load()
            upright = ImageOps.exif_transpose(img)
            # Orientations 5-8 swap the axes; report the size as the photo is seen.
            swapped = upright.size != img.size
            size = (original[1], original[0]) if swapped else original
            return to_mode(upright, mode), size
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"refused as a decompression bomb ({exc})") from None
    except Image.UnidentifiedImageError:
        raise DecodeError("not a recognised image format") from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError, struct.error) as exc:
        raise DecodeError(f"cannot decode: {exc}") from None


def decode_image(data: bytes, size: int, *, mode: str = "RGB", resample: str = "bilinear",
                 fit: str = "stretch", local: bool = False, max_pixels: int | None = None) -> Decoded:
    """Decode encoded image bytes into a `size`x`size` array: stretched (aspect ratio not kept, as Keras'
    load_img) or, with fit="crop", the centre square after resizing the shorter side.

    With `local`, the photo's ORB features are extracted from the same decode (local_features), which then
    happens at >= DEFAULTS.local_side px. See load_upright for orientation, animation, bomb guard and JPEG
    draft decoding. Raises DecodeError.
    """
    # Small targets (pHash's 32 px) decode JPEGs at >= 2x: straight 1/8 DCT scaling aliases, and the hash
    # then drifts from the reference pHash (2.8 bits mean vs imagehash on 500 grocery photos; 0.14 at 2x).
    min_side = size if size >= 64 else 2 * size
    img, (width, height) = load_upright(data, max(min_side, DEFAULTS.local_side) if local else min_side, mode=mode,
                                        max_pixels=max_pixels)
    features = extract_local(img) if local else None
    try:
        sized = (ImageOps.fit(img, (size, size), _RESAMPLE[resample]) if fit == "crop"
                 else img.resize((size, size), _RESAMPLE[resample]))
        pixels = np.asarray(sized, dtype=np.uint8)
    except (OSError, ValueError, MemoryError) as exc:
        raise DecodeError(f"cannot decode: {exc}") from None
    return Decoded(pixels=pixels, width=width, height=height, local=features)


def too_large(size: int, max_bytes: int) -> str | None:
    """The reason a file of `size` bytes is refused under the limit `max_bytes`, or None when it is not."""
    if size <= max_bytes:
        return None
    return f"file too large: {fmt_bytes(size)} (limit {fmt_bytes(max_bytes)}; raise it with --max-file-mb)"


def read_file(path: str | os.PathLike[str], max_bytes: int = DEFAULTS.max_file_bytes) -> tuple[bytes, str]:
    """A regular file's content and its SHA-256. Raises DecodeError (a listed,
    skipped item) for a file that cannot be read, is not a regular file, or is larger than `max_bytes`.

    The file is opened without blocking and checked before a byte is read: a FIFO would block forever, a
    link to /dev/zero would never end, and a 4 GB file must not be read into memory to be refused.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DecodeError(f"cannot read: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb", buffering=0) as fh:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise DecodeError("not a regular file (a FIFO, device or socket)")
            reason = too_large(st.st_size, max_bytes)
            if reason:
                raise DecodeError(reason)
            # One read of the size seen (a file growing meanwhile is hashed as read, so hash and bytes agree),
            # into one bytes object, which the decoder's BytesIO shares rather than copies: the file is held
            # once, and at most max_bytes of it.
            data = fh.read(st.st_size)
            return data, hashlib.sha256(data).hexdigest()
        except OSError as exc:
            raise DecodeError(f"cannot read: {exc.strerror or exc}") from None


def read_bytes(path: str | os.PathLike[str], max_bytes: int = DEFAULTS.max_file_bytes) -> bytes:
    """A file's whole content (see read_file for what is refused). Raises DecodeError."""
    return read_file(path, max_bytes)[0]


def read_and_decode(path: str, size: int, *, mode: str = "RGB", resample: str = "bilinear",
                    max_bytes: int = DEFAULTS.max_file_bytes, fit: str = "stretch") -> tuple[str, Decoded]:
    """Read a file once, returning its content hash and decoded pixels. Raises DecodeError."""
    data, sha = read_file(path, max_bytes)
    return sha, decode_image(data, size, mode=mode, resample=resample, fit=fit)


def file_local_features(path: str | os.PathLike[str], max_bytes: int = DEFAULTS.max_file_bytes, *,
                        mode: str = "RGB") -> LocalFeatures:
    """The local features of an image file, decoded as indexing decodes it in `mode` (a store's embedder's
    input_mode: pHash decodes grayscale). Raises DecodeError."""
    return extract_local(load_upright(read_bytes(path, max_bytes), DEFAULTS.local_side, mode=mode)[0])


def open_upright(path: str | os.PathLike[str], max_side: int,
                 max_bytes: int = DEFAULTS.max_file_bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode the file `path` as an upright RGB image no larger than `max_side` on its longest side (for
    thumbnails and plots). Raises DecodeError."""
    out, _ = load_upright(read_bytes(path, max_bytes), max_side, mode="RGB", max_pixels=max_pixels)
    out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return out
