"""Index job, embed phase: read, hash, decode and embed the pending files of a run, checkpointing as it goes.

`embed_pending` runs the phase in this process (decoding threads overlapped with the model); `ray_job` runs
the same phase on a Ray cluster and fills the same tables, so the build publishes either result the same way.
"""
from __future__ import annotations

from collections.abc import Callable, MutableMapping
from contextlib import closing
from dataclasses import dataclass

import numpy as np

from ..config import DEFAULTS
from ..embed.embedders import Embedder
from ..embed.pipeline import Embedded, prepare_all
from ..features import LocalFeatures
from .checkpoint import Checkpoint
from .scan import FileRecord

Progress = Callable[[int, int], None]  # (done, total)


@dataclass(frozen=True)
class JobOptions:
    """The knobs of the decode+embed phase."""

    batch_size: int = DEFAULTS.batch_size
    checkpoint_every: int = DEFAULTS.checkpoint_every
    decode_workers: int = DEFAULTS.decode_workers
    max_file_bytes: int = DEFAULTS.max_file_bytes


@dataclass
class EmbedPhase:
    """The tables the embed phase fills; the build assembles the new store from them."""

    #: content hash -> embedding (the old store's, the checkpoint's, and new ones)
    vectors: MutableMapping[str, Embedded]
    hashes: dict[str, str]  #: rel path -> content hash, for every pending file that could be read
    failures: list[tuple[str, str]]  #: (rel path, reason) of files that could not be read or decoded
    embedded: int = 0  #: images run through the model in this phase
    driver_seconds: float = 0.0  #: Ray: the driver's own time on the rows that came back (its ceiling)


def embed_pending(pending: list[FileRecord], emb: Embedder, phase: EmbedPhase, checkpoint: Checkpoint,
                  opts: JobOptions, progress: Progress | None = None, local: bool = False) -> None:
    """Read every pending file (hash into `phase.hashes`), embed content not in `phase.vectors` yet, and save
    new embeddings to `checkpoint` every few batches; failures go into `phase.failures`. With `local`, each new
    content's local features are extracted from the same decode and kept with its embedding."""
    vectors = phase.vectors
    batch: dict[str, np.ndarray] = {}  # content hash -> pixels: identical new files embed once
    sizes: dict[str, tuple[int, int]] = {}
    feats: dict[str, LocalFeatures | None] = {}
    unsaved: dict[str, Embedded] = {}

    def flush_batch() -> None:
        if not batch:
            return
        xb = emb.embed(np.stack(list(batch.values())))
        for sha, vec in zip(batch, xb):
            vectors[sha] = unsaved[sha] = Embedded(vec, *sizes[sha], feats.pop(sha, None))
        phase.embedded += len(batch)
        batch.clear()

    known = lambda sha: sha in vectors or sha in batch  # noqa: E731 - read by the decoding threads
    outcomes = prepare_all([f.abs for f in pending], emb, known=known, batch_size=opts.batch_size,
                           decode_workers=opts.decode_workers, max_bytes=opts.max_file_bytes, local=local)
    with closing(outcomes):  # an error or Ctrl-C here also ends the decoding threads
        for done, (f, out) in enumerate(zip(pending, outcomes), start=1):
            if out.error is not None:
                phase.failures.append((f.rel, out.error))
            else:
                assert out.prepared is not None  # an outcome without an error holds what was prepared
                sha, decoded = out.prepared.sha256, out.prepared.decoded
                phase.hashes[f.rel] = sha
                if decoded is not None and sha not in vectors and sha not in batch:
                    batch[sha] = decoded.pixels
                    sizes[sha] = (decoded.width, decoded.height)
                    feats[sha] = decoded.local
            if len(batch) >= opts.batch_size:
                flush_batch()
                if len(unsaved) >= opts.batch_size * opts.checkpoint_every:
                    checkpoint.save(unsaved)
                    unsaved = {}
            if progress is not None:
                progress(done, len(pending))
    flush_batch()
    checkpoint.save(unsaved)
