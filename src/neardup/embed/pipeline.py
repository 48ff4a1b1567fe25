"""Indexing stage 4, pipeline: each file read once (content hash), decoded in threads, embedded in batches.

Pillow releases the GIL while decoding, so a small thread pool overlaps decoding with inference. Results come
back in input order through a bounded window: decoded pixels are ~150 kB each, and a 50k-image job must not
hold them all. The index job and query-time embedding both use this pipeline.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import closing
from dataclasses import dataclass, field

import numpy as np

from ..config import DEFAULTS
from ..errors import DecodeError
from ..features import LocalFeatures
from ..threads import thread_pool
from .decode import Decoded, decode_image, read_file
from .embedders import Embedder


@dataclass(frozen=True)
class Embedded:
    """One image's embedding and the upright size of the photo it came from."""

    vector: np.ndarray  #: float32 [d], unit norm
    width: int
    height: int
    local: LocalFeatures | None = None  #: its ORB features, when the store keeps them


@dataclass(frozen=True)
class Prepared:
    """One file read: its content hash, and its decoded pixels unless its content already has an embedding."""

    sha256: str
    decoded: Decoded | None


@dataclass(frozen=True)
class Outcome:
    """What the pipeline made of one input path: `prepared`, or the reason it failed (a listed, skipped item)."""

    path: str
    prepared: Prepared | None
    error: str | None


def prepare(path: str, emb: Embedder, known: Callable[[str], bool] | None = None,
            max_bytes: int = DEFAULTS.max_file_bytes, local: bool = False) -> Prepared:
    """Read a file once; decode it for `emb` (and extract its local features with `local`) unless
    `known(sha256)` says its content has an embedding already.

    Raises DecodeError with a short reason (also for a file that is not regular or is over `max_bytes`).
    """
    data, sha = read_file(path, max_bytes)
    if known is not None and known(sha):
        return Prepared(sha, None)
    return Prepared(sha, decode_for(data, emb, local=local))


def decode_for(data: bytes, emb: Embedder, *, local: bool = False, max_pixels: int | None = None) -> Decoded:
    """Decode image bytes as `emb` takes them (its size, mode, resampling and fit). Raises DecodeError."""
    return decode_image(data, emb.input_size, mode=emb.input_mode, resample=emb.resample,
                        fit=getattr(emb, "fit", "stretch"), local=local, max_pixels=max_pixels)


def prepare_all(paths: Sequence[str], emb: Embedder, *, known: Callable[[str], bool] | None = None,
                batch_size: int = DEFAULTS.batch_size, decode_workers: int = DEFAULTS.decode_workers,
                max_bytes: int = DEFAULTS.max_file_bytes, local: bool = False) -> Iterator[Outcome]:
    """`prepare` every path in decoding threads; yields one Outcome per path, in input order.

    At most about two batches of decoded images are held at once. A codec bug on one file becomes that
    file's error, never the end of a 50k-image job. Close the generator (contextlib.closing) when stopping
    early: queued files are then dropped and the decoding threads end before it returns.
    """
    window = batch_size * 2 + decode_workers
    # one photo (the interactive query) is decoded inline: starting a thread pool costs more than it saves
    workers = decode_workers if len(paths) > 1 else 1
    with thread_pool(workers, "neardup-decode") as pool:
        pending: deque[tuple[str, Future[Prepared]]] = deque()
        it = iter(paths)
        for path in it:
            pending.append((path, pool.submit(prepare, path, emb, known, max_bytes, local)))
            if len(pending) >= window:
                break
        try:
            while pending:
                path, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(prepare, nxt, emb, known, max_bytes, local)))
                try:
                    out = Outcome(path, fut.result(), None)
                except DecodeError as exc:
                    out = Outcome(path, None, str(exc))
                except Exception as exc:  # noqa: BLE001 - see the docstring
                    out = Outcome(path, None, f"{type(exc).__name__}: {exc}")
                yield out
        finally:  # the consumer stopped early (an error, Ctrl-C, close()): drop the queued files
            for _, fut in pending:
                fut.cancel()


@dataclass
class EmbeddedFiles:
    """Embeddings of loose image files (query photos): xq rows match `paths`; failures are listed."""

    paths: list[str]
    xq: np.ndarray
    failures: list[tuple[str, str]]
    local: list[LocalFeatures | None] | None = None  #: per row of xq, when asked for
    sha256: list[str] = field(default_factory=list)  #: per row of xq, the file's content digest


def embed_files(paths: Sequence[str | os.PathLike[str]], emb: Embedder, *,
                batch_size: int = DEFAULTS.batch_size, decode_workers: int = DEFAULTS.decode_workers,
                max_bytes: int = DEFAULTS.max_file_bytes, local: bool = False,
                progress: Callable[[int, int], None] | None = None) -> EmbeddedFiles:
    """Decode and embed image files in batches with overlapped decoding; undecodable files are listed.
    With `local`, each file's ORB features come back too (from the same decode). `progress` is called with
    (files done, files) after each batch."""
    ok: list[str] = []
    feats: list[LocalFeatures | None] = []
    chunks: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    failures: list[tuple[str, str]] = []
    digests: list[str] = []
    outcomes = prepare_all([str(p) for p in paths], emb, batch_size=batch_size, decode_workers=decode_workers,
                           max_bytes=max_bytes, local=local)
    with closing(outcomes):
        for out in outcomes:
            if out.error is not None:
                failures.append((out.path, out.error))
                continue
            ok.append(out.path)
            digests.append(out.prepared.sha256)
            feats.append(out.prepared.decoded.local)
            batch.append(out.prepared.decoded.pixels)
            if len(batch) >= batch_size:
                chunks.append(emb.embed(np.stack(batch)))
                batch = []
                if progress is not None:
                    progress(len(ok) + len(failures), len(paths))
    if batch:
        chunks.append(emb.embed(np.stack(batch)))
    if progress is not None:
        progress(len(paths), len(paths))
    xq = np.concatenate(chunks) if chunks else np.zeros((0, emb.dim), np.float32)
    return EmbeddedFiles(ok, xq, failures, feats if local else None, digests)
