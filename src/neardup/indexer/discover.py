"""Indexing stage 1, discover: find image files under the given folders, in a stable order."""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..config import IMAGE_EXTENSIONS
from ..errors import InputError

log = logging.getLogger(__name__)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_image_name(name: str) -> bool:
    """True when `name` has one of the image extensions, in any letter case."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(root: Path, unreadable: list[tuple[str, str]] | None) -> Iterable[Path]:
    def onerror(exc: OSError) -> None:
        if unreadable is None:
            raise InputError(f"cannot read folder {exc.filename}: {exc.strerror or exc}")
        unreadable.append((str(exc.filename), exc.strerror or str(exc)))

    # os.walk without followlinks: a symlink loop in a merchant's folder must not hang the nightly job.
    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if is_image_name(name) and not name.startswith("."):
                yield Path(dirpath, name)


def discover(roots: Sequence[str | os.PathLike[str]], *,
             unreadable: list[tuple[str, str]] | None = None) -> list[Path]:
    """Return the absolute paths of all images under `roots` (folders or image files), sorted, without repeats.

    Raises InputError for a root that does not exist or is a URL, or when nothing is found. A root that is
    not a folder is taken as a file, whatever its kind: reading refuses FIFOs and devices with a reason.
    A folder that cannot be listed raises InputError, or, when an `unreadable` list is given, is appended
    to it as (folder, reason) and skipped.
    """
    if not roots:
        raise InputError("no folder given")
    found: set[Path] = set()
    for raw in roots:
        if _URL.match(os.fspath(raw)):  # Path() would turn http://host/x into http:/host/x
            raise InputError(f"URLs are not supported, only local files and folders (download it first): {raw}")
        root = Path(raw).expanduser()
        if not root.exists():
            raise InputError(f"no such file or folder: {root}")
        if not root.is_dir():
            if not is_image_name(root.name):
                raise InputError(f"not an image file (by its extension): {root}")
            found.add(Path(os.path.abspath(root)))
        else:
            # abspath, not resolve(): a symlinked photo keeps the name the catalogue gives it
            found.update(Path(os.path.abspath(p)) for p in _walk(root, unreadable))
    if not found:
        shown = ", ".join(str(r) for r in roots)
        raise InputError(f"no images found in {shown} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    log.debug("discovered %d images", len(found))
    return sorted(found)
