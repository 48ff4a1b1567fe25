"""Store, settings: the thresholds applied to one store (`neardup evaluate --fit --apply`), kept beside it.

`catalog.h5.settings.json` is a small JSON document `{"version": 1, "settings": {...}, "sha256": ...}`; the
digest covers the settings as canonical JSON, so a damaged or hand-edited file is refused with an error naming
it, never half-read. It is written by fileio.atomic_write (temporary file, fsync, rename). Every command that
resolves a threshold for the store (Generation.threshold, Generation.candidate_threshold) reads it; a value
given on the command line still wins. A store without the file uses the model's documented defaults.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import InputError, StoreError
from ..fileio import atomic_write
from .files import StoreFiles

SETTINGS_VERSION = 1


@dataclass(frozen=True)
class StoreSettings:
    """Thresholds applied to a store; None: the model's default."""

    threshold: float | None = None  #: the strict cosine (duplicates/query --threshold)
    candidate_threshold: float | None = None  #: the candidates' loose cosine (duplicates --candidate-threshold)
    source: str = ""  #: how they were chosen, for people reading `neardup info`
    at: str = ""  #: ISO-8601 UTC time they were applied

    def __post_init__(self) -> None:
        for name in ("threshold", "candidate_threshold"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int | float) and math.isfinite(v) and -1.0 <= v <= 1.0):
                raise InputError(f"{name} must be a cosine between -1 and 1, got {v!r}")

    @property
    def empty(self) -> bool:
        """True when nothing is applied."""
        return self.threshold is None and self.candidate_threshold is None

    def flags(self) -> str:
        """The command-line flags that give the same thresholds."""
        out = []
        if self.threshold is not None:
            out.append(f"--threshold {self.threshold:.4g}")
        if self.candidate_threshold is not None:
            out.append(f"--candidate-threshold {self.candidate_threshold:.4g}")
        return " ".join(out)


def _digest(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def settings_path(store: str | os.PathLike[str]) -> Path:
    """The settings file of the store at `store`."""
    return StoreFiles.resolved(store).settings


def read_settings(store: str | os.PathLike[str]) -> StoreSettings:
    """The settings applied to `store` (empty when none were). Raises StoreError naming the file when it is
    damaged (unreadable JSON, a wrong checksum, an unknown version or field)."""
    path = settings_path(store)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return StoreSettings()
    except OSError as exc:
        raise StoreError(f"cannot read the store's settings {path}: {exc.strerror or exc}") from None
    why = None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        doc, why = None, f"not JSON ({exc})"
    if why is None:
        if not isinstance(doc, dict) or not isinstance(doc.get("settings"), dict):
            why = "no settings object"
        elif doc.get("version") != SETTINGS_VERSION:
            why = f"version {doc.get('version')!r}, this neardup reads {SETTINGS_VERSION}"
        elif doc.get("sha256") != _digest(doc["settings"]):
            why = "its checksum does not match (damaged or edited by hand)"
        elif set(doc["settings"]) - {f.name for f in fields(StoreSettings)}:
            why = f"unknown fields {sorted(set(doc['settings']) - {f.name for f in fields(StoreSettings)})}"
    if why is None:
        try:
            return StoreSettings(**doc["settings"])
        except (InputError, TypeError) as exc:
            why = str(exc)
    raise StoreError(f"the store's settings {path} are damaged: {why}; remove the file to use the model's "
                     f"defaults, or apply thresholds again with `neardup evaluate --fit --apply`")


def write_settings(store: str | os.PathLike[str], settings: StoreSettings) -> Path:
    """Save `settings` for `store` atomically (temporary file, fsync, rename); returns the file's path."""
    path = settings_path(store)
    body = asdict(settings)
    text = json.dumps({"version": SETTINGS_VERSION, "settings": body, "sha256": _digest(body)}, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    return path


class SettingsFile:
    """The settings of one store, read again only when the file changes (inode, size or modification time)."""

    def __init__(self, store: str | os.PathLike[str]) -> None:
        self.store = store
        self.path = settings_path(store)
        self._lock = threading.Lock()
        self._cached: tuple[tuple[int, ...], StoreSettings] | None = None

    def current(self) -> StoreSettings:
        """The settings now (empty without a file). Raises StoreError when the file is damaged."""
        try:
            st = self.path.stat()
            key: tuple[int, ...] = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            key = ()
        with self._lock:
            if self._cached is None or self._cached[0] != key:
                self._cached = (key, read_settings(self.store) if key else StoreSettings())
            return self._cached[1]


def applied(store: str | os.PathLike[str]) -> dict[str, Any]:
    """What `info` says of the thresholds applied to `store` (`evaluate --fit --apply`): {} when none, else the
    thresholds, their flags, source and time; {"error": ...} when the settings file is damaged (described, not
    raised, so that `info` still describes the rest)."""
    try:
        s = read_settings(store)
    except StoreError as exc:
        return {"error": str(exc)}
    return {} if s.empty else {"threshold": s.threshold, "candidate_threshold": s.candidate_threshold,
                               "flags": s.flags(), "source": s.source, "at": s.at}
