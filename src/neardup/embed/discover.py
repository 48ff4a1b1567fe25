"""Embed, discover: find image files under the given folders, in a stable order."""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..config import IMAGE_EXTENSIONS
from ..errors import InputError

log = logging.getLogger(__name__)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_image_name(name: str) -> bool:
    """True when `name` has one of the image extensions, in any letter case (".jpg" alone is a hidden file)."""
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def _walk(root: str, unreadable: list[tuple[str, str]] | None) -> Iterator[tuple[str, list[os.DirEntry]]]:
    """(folder, the directory entries of its image files) for each folder under `root`, hidden files and
    folders skipped. Symlinked folders are not entered: a symlink loop in a merchant's folder must not hang
    the nightly job. One list a folder, not one item a file: a nightly scan of 200k files spends its time here."""
    exts = IMAGE_EXTENSIONS
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            if unreadable is None:
                raise InputError(f"cannot read folder {folder}: {exc.strerror or exc}") from None
            unreadable.append((folder, exc.strerror or str(exc)))
            continue
        images, sub = [], []
        for e in entries:
            name = e.name
            if name[0] == ".":
                continue
            dot = name.rfind(".")  # is_image_name, inlined: one call less for each of 200k files
            if dot > 0 and name[dot:].lower() in exts:  # a folder named *.jpg is a folder still
                try:
                    if not e.is_dir():
                        images.append(e)
                        continue
                except OSError:
                    images.append(e)  # its stat says why
                    continue
            try:
                if e.is_dir() and not e.is_symlink():
                    sub.append(e.path)
            except OSError:
                pass
        if images:
            yield folder, images
        stack.extend(sorted(sub, reverse=True))


def walk_images(roots: Sequence[str | os.PathLike[str]], *, unreadable: list[tuple[str, str]] | None = None
                ) -> list[tuple[str, tuple[str, str, os.DirEntry | None]]]:
    """(absolute path, (its folder, its name, its directory entry: None for a root given as a file)) of every
    image under `roots`, sorted by path, without repeats: discover's walk, with the entries whose stat a scan
    reuses (one os.scandir a folder, nothing else a file)."""
    if not roots:
        raise InputError("no folder given")
    found: dict[str, tuple[str, str, os.DirEntry | None]] = {}
    for raw in roots:
        if _URL.match(os.fspath(raw)):  # Path() would turn http://host/x into http:/host/x
            raise InputError(f"URLs are not supported, only local files and folders (download it first): {raw}")
        root = Path(raw).expanduser()
        if not root.exists():
            raise InputError(f"no such file or folder: {root}")
        # abspath, not resolve(): a symlinked photo keeps the name the catalogue gives it
        if not root.is_dir():
            if not is_image_name(root.name):
                raise InputError(f"not an image file (by its extension): {root}")
            path = os.path.abspath(root)
            found.setdefault(path, (*os.path.split(path), None))
        else:
            for folder, entries in _walk(os.path.abspath(root), unreadable):
                for e in entries:
                    found.setdefault(e.path, (folder, e.name, e))
    if not found:
        shown = ", ".join(str(r) for r in roots)
        raise InputError(f"no images found in {shown} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    log.debug("discovered %d images", len(found))
    return sorted(found.items(), key=lambda kv: kv[0])


def discover(roots: Sequence[str | os.PathLike[str]], *,
             unreadable: list[tuple[str, str]] | None = None) -> list[Path]:
    """Return the absolute paths of all images under `roots` (folders or image files), sorted, without repeats.

    Raises InputError for a root that does not exist or is a URL, or when nothing is found. A root that is
    not a folder is taken as a file, whatever its kind: reading refuses FIFOs and devices with a reason.
    A folder that cannot be listed raises InputError, or, when an `unreadable` list is given, is appended
    to it as (folder, reason) and skipped.
    """
    return [Path(p) for p, _ in walk_images(roots, unreadable=unreadable)]
