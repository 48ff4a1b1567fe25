"""Index job, embed phase on Ray: the pending files of a run decoded and embedded by a Ray Data actor pool.

Only the embed phase moves to the cluster; the driver (this process) scans, diffs, checkpoints and publishes
the store and index exactly as a local run does. Ray Data streams the pending file list through `map_batches`
on an actor pool: each actor loads the model once (on a GPU when it was given one), reads each file once
(content hash), skips content the store or the checkpoint already holds, decodes and embeds the rest. Rows
come back keyed by content hash, bad files as (path, reason) rows, never as task failures. The driver saves
them in the run's checkpoint as they arrive (content-hash-keyed shards), so a killed driver resumes as a
local run does; a killed worker's batches are retried by Ray (actors restart), and nothing is published
before every row is back.

Workers read the files by the driver's absolute paths: a single node, or a shared filesystem mounted at the
same path on every node (README, "Run it on your cluster").
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass

import numpy as np

from ..config import DEFAULTS, ENV_ORT_DEVICE
from ..embed.embedders import Embedder
from ..embed.pipeline import Embedded, Outcome, prepare_all
from ..errors import InputError, WeightsError
from ..features import LocalFeatures
from .checkpoint import Checkpoint
from .embed_job import EmbedPhase, JobOptions, Progress
from .scan import FileRecord

log = logging.getLogger(__name__)

#: How to get Ray, said when --ray is asked for without it.
INSTALL_HINT = "--ray needs Ray Data: pip install 'neardup[ray]' (or pip install 'ray[data]')"


#: Model batches per Ray Data block (one actor call, decoding ahead of the model within it). Measured on 2 cores
#: (bench_ray.py, MobileNetV2): a block of one batch kept the actor at 0.85-0.9 of the local rate (Ray's cost per
#: task, decoding not overlapped with the model).
BATCHES_PER_BLOCK = 8


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the embed phase runs on Ray."""

    #: None: RAY_ADDRESS, else a cluster already running on this machine (`ray start`), else a new local one;
    #: "auto" or "ray://HOST:10001" as ray.init takes them.
    address: str | None = None
    actors: int | None = None  #: at most this many actors (None: as many as the cluster's CPUs or GPUs allow)
    cpus_per_actor: float = DEFAULTS.ray_cpus  #: CPUs reserved per actor (model and decoding threads)
    gpus_per_actor: float | None = None  #: None: 1 when the cluster has GPUs, else 0

    @classmethod
    def asked(cls, ray: bool, address: str | None = None, actors: int | None = None,
              cpus_per_actor: float = DEFAULTS.ray_cpus, gpus_per_actor: float | None = None) -> RayOptions | None:
        """The options of `--ray` and its `--ray-*` settings (None without --ray); settings given without
        --ray are refused (InputError), not ignored."""
        if not ray:
            if address is not None or actors is not None or gpus_per_actor is not None or \
                    cpus_per_actor != DEFAULTS.ray_cpus:
                raise InputError("--ray-address, --ray-actors, --ray-cpus and --ray-gpus go with --ray")
            return None
        return cls(address=address, actors=actors, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor)


def import_ray():  # noqa: ANN201 - the ray module
    """The ray module with Ray Data, or InputError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is the part the job needs (pip extra "data")
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return ray


class EmbedActor:
    """One Ray actor: the model loaded once, then batches of {path, rel} rows in, embedding rows out."""

    def __init__(self, factory: Callable[[], Embedder], fingerprint: str, known: dict, local: bool,
                 opts: JobOptions) -> None:
        import ray

        if ray.get_gpu_ids():  # this actor was given a GPU: ONNX Runtime runs on it when it has CUDA
            os.environ[ENV_ORT_DEVICE] = "cuda"
        self.emb = factory()
        if self.emb.weights_fingerprint != fingerprint:  # another model file on this node than on the driver
            raise WeightsError(f"a Ray worker loaded weights {self.emb.weights_fingerprint}, the driver "
                               f"{fingerprint}: give every node the same model file")
        self.known = ray.get(known["ref"])  # content hashes with an embedding already (store + checkpoint)
        self.local = local
        self.opts = opts

    def __call__(self, block: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Rows of one block, yielded a model batch at a time. Decoding runs ahead in threads (prepare_all) while
        a batch is embedded, as in the local path; identical content within the block is embedded once."""
        rels, size = block["rel"], self.opts.batch_size
        seen: set[str] = set()
        outcomes = prepare_all([str(p) for p in block["path"]], self.emb,
                               known=lambda sha: sha in self.known or sha in seen, batch_size=size,
                               decode_workers=self.opts.decode_workers, max_bytes=self.opts.max_file_bytes,
                               local=self.local)
        with closing(outcomes):
            chunk: list[tuple[int, Outcome]] = []
            for i, out in enumerate(outcomes):
                chunk.append((i, out))
                if len(chunk) == size:
                    yield self._rows(chunk, rels, seen)
                    chunk = []
            if chunk:
                yield self._rows(chunk, rels, seen)

    def _rows(self, chunk: list[tuple[int, Outcome]], rels: np.ndarray, seen: set[str]) -> dict[str, np.ndarray]:
        n = len(chunk)
        sha, error = np.full(n, "", dtype=object), np.full(n, "", dtype=object)
        width, height = np.zeros(n, np.int32), np.zeros(n, np.int32)
        xy, desc = np.empty(n, object), np.empty(n, object)
        todo, pixels = [], []
        for r, (_, out) in enumerate(chunk):
            xy[r], desc[r] = np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
            if out.error is not None:
                error[r] = out.error
                continue
            sha[r] = out.prepared.sha256
            decoded = out.prepared.decoded
            if decoded is None or sha[r] in seen:  # known, or embedded in an earlier row of this block
                continue
            seen.add(sha[r])
            todo.append(r)
            pixels.append(decoded.pixels)
            width[r], height[r] = decoded.width, decoded.height
            if decoded.local is not None:
                xy[r], desc[r] = decoded.local.xy, decoded.local.desc
        xb = np.zeros((n, self.emb.dim), np.float32)
        if todo:
            xb[todo] = self.emb.embed(np.stack(pixels))
        embedded = np.zeros(n, bool)
        embedded[todo] = True
        return {"rel": rels[[i for i, _ in chunk]], "sha": sha.astype(str), "error": error.astype(str), "xb": xb,
                "embedded": embedded, "width": width, "height": height, "lf_xy": xy, "lf_desc": desc}


def embed_pending_ray(pending: list[FileRecord], emb: Embedder, factory: Callable[[], Embedder],
                      phase: EmbedPhase, checkpoint: Checkpoint, opts: JobOptions, ray_opts: RayOptions,
                      progress: Progress | None = None, local: bool = False) -> None:
    """The embed phase of `embed_job.embed_pending`, run by Ray actors that each build their model with
    `factory` (checked against `emb`, the driver's). Fills `phase` and saves `checkpoint` the same way."""
    if not pending:
        return
    ray = import_ray()
    started = _connect(ray, ray_opts.address)
    try:
        out = _dataset(ray, pending, emb, factory, phase, opts, ray_opts, local)
        unsaved: dict[str, Embedded] = {}
        done = 0
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            t0 = time.perf_counter()
            for i, rel in enumerate(batch["rel"]):
                rel = str(rel)
                if batch["error"][i]:
                    phase.failures.append((rel, str(batch["error"][i])))
                    continue
                sha = str(batch["sha"][i])
                phase.hashes[rel] = sha
                if batch["embedded"][i]:
                    phase.embedded += 1
                    feats = LocalFeatures(batch["lf_xy"][i], batch["lf_desc"][i]) if local else None
                    e = Embedded(batch["xb"][i].copy(), int(batch["width"][i]), int(batch["height"][i]), feats)
                    if sha not in phase.vectors:  # two new copies of one content in two batches: the first
                        phase.vectors[sha] = unsaved[sha] = e
            done += len(batch["rel"])
            if len(unsaved) >= opts.batch_size * opts.checkpoint_every:
                checkpoint.save(unsaved)
                unsaved = {}
            if progress is not None:
                progress(done, len(pending))
            phase.driver_seconds += time.perf_counter() - t0
        checkpoint.save(unsaved)
    finally:
        if started:
            ray.shutdown()


def _connect(ray, address: str | None) -> bool:  # noqa: ANN001
    """Connect to (or start) a cluster unless this process already is connected; True when we connected."""
    if ray.is_initialized():  # the caller's own connection (a notebook, a test): used, and left open
        return False
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
             configure_logging=False)
    return True


def _dataset(ray, pending: list[FileRecord], emb: Embedder, factory: Callable[[], Embedder], phase: EmbedPhase,
             opts: JobOptions, ray_opts: RayOptions, local: bool):  # noqa: ANN001, ANN202 - ray modules
    """The lazy Ray Data pipeline: pending rows -> EmbedActor pool -> embedding rows."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the CLI draws its own bar from the driver's progress callback
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    if not log.isEnabledFor(logging.INFO):  # Ray Data's per-run notices only with -v
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    resources = ray.cluster_resources()
    gpus = ray_opts.gpus_per_actor if ray_opts.gpus_per_actor is not None else (
        1.0 if resources.get("GPU", 0) >= 1 else 0.0)
    cpus = min(ray_opts.cpus_per_actor, resources.get("CPU", 1.0))  # a 1-CPU cluster still gets its actor
    fits = resources.get("GPU", 0) / gpus if gpus else resources.get("CPU", 1.0) / cpus
    per_block = opts.batch_size * BATCHES_PER_BLOCK
    blocks = max(1, math.ceil(len(pending) / per_block))
    size = max(1, min(ray_opts.actors or math.inf, int(fits) or 1, blocks))  # no more actors than blocks
    known = {"ref": ray.put(frozenset(phase.vectors))}  # nested: the actor fetches it from the object store
    rows = [{"path": f.abs, "rel": f.rel} for f in pending]
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    log.info("embedding %d files on Ray: %d actor(s), %g CPU and %g GPU each", len(rows), size, cpus, gpus)
    return ds.map_batches(EmbedActor, batch_size=per_block, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size),
                          fn_constructor_kwargs={"factory": factory, "fingerprint": emb.weights_fingerprint,
                                                 "known": known, "local": local, "opts": opts},
                          num_cpus=cpus, num_gpus=gpus)
