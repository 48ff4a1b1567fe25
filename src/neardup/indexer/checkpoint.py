"""Index job, checkpoint: durable chunks of the embeddings a run computed, reused when a killed run resumes."""
from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..embed.pipeline import Embedded
from ..features import LocalTable
from ..fileio import atomic_write

log = logging.getLogger(__name__)


class Checkpoint:
    """Chunks of (content hash → Embedded) in the store's work folder, for one model/weights `key`.

    A folder written for another key (model, weights, dimension, preprocessing) is discarded, never mixed in;
    a damaged chunk only costs re-embedding its images.
    """

    def __init__(self, folder: Path, key: dict[str, object]) -> None:
        self.dir = Path(folder)
        self.key = key
        self.known: dict[str, Embedded] = {}
        self._chunks = 0
        self._load()

    def _load(self) -> None:
        meta = self.dir / "meta.json"
        if not self.dir.is_dir():
            return
        try:
            same = json.loads(meta.read_text()) == self.key
        except (OSError, ValueError):
            same = False
        if not same:
            log.info("discarding checkpoint of another model/weights in %s", self.dir)
            self.discard()
            return
        for chunk in sorted(self.dir.glob("chunk-*.npz")):
            try:
                with np.load(chunk) as z:
                    local = LocalTable(z["lf_count"], z["lf_xy"], z["lf_desc"]) if "lf_count" in z else None
                    for k, (sha, vec, w, h) in enumerate(zip(z["sha256"], z["xb"], z["widths"], z["heights"])):
                        self.known[sha.decode()] = Embedded(vec, int(w), int(h), local.row(k) if local else None)
                self._chunks += 1
            except Exception:  # a damaged chunk (zip, npy, key errors) only costs re-embedding
                log.warning("ignoring unreadable checkpoint chunk %s", chunk)
        log.info("resuming: %d embeddings from %d checkpoint chunks", len(self.known), self._chunks)

    def save(self, rows: dict[str, Embedded]) -> None:
        """Durably add one chunk of content hash → Embedded rows."""
        if not rows:
            return
        self.dir.mkdir(exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            atomic_write(meta, lambda tmp: Path(tmp).write_text(json.dumps(self.key)))
        items = list(rows.items())
        has_local = any(e.local is not None for _, e in items)
        local = LocalTable.of([e.local for _, e in items]) if has_local else None

        def write(tmp: str) -> None:
            lf: dict[str, Any] = {"lf_count": local.count, "lf_xy": local.xy, "lf_desc": local.desc} if local else {}
            with open(tmp, "wb") as fh:
                np.savez(fh, sha256=np.array([sha for sha, _ in items], dtype="S64"),
                         xb=np.stack([e.vector for _, e in items]).astype(np.float32),
                         widths=np.array([e.width for _, e in items], np.int32),
                         heights=np.array([e.height for _, e in items], np.int32), **lf)

        self._chunks += 1
        atomic_write(self.dir / f"chunk-{self._chunks:06d}-{uuid.uuid4().hex[:8]}.npz", write)

    def discard(self) -> None:
        """Remove the checkpoint folder."""
        shutil.rmtree(self.dir, ignore_errors=True)
