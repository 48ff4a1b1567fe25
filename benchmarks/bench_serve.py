"""`neardup serve` under load: 8 clients for 60 s against a 5k-photo store while `neardup update` publishes twice.

Question: does the warm service keep up with the model (micro-batching), answer every request while the nightly
job publishes new generations (each answer from one complete generation), and add little to a lone query?
The store holds --photos real grocery photos (symlinked into a temporary folder, never copied), embedded
with the trained MobileNetV2 of ../shared/models (the only trained network here) and with local features, as
`neardup index` makes it. Queries are edited copies of catalogue photos (rotation, crop, resize, colour, JPEG
40-90) and held-out photos, uploaded one per request by --clients keep-alive stdlib clients on localhost.
Two updates each add --update-photos photos during the load. Measured in the same run on the same machine:
the model alone at batch 32 (pre-decoded pixels), the in-process `Searcher.query` at batch 32 (the same work
per photo as the server: decode, local features, embed, search, verify), and one warm in-process query.

Correctness (exit status 1 when violated): no failed request; every answer names a generation that was
published, has that generation's photo count, and its matches' ids and paths are that generation's; both
updates were served before the end; the server's answers equal the in-process Searcher's for the same photo.
"""
from __future__ import annotations

import argparse
import http.client
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from common import (
    GROCERY_DIR,
    Report,
    all_photos,
    append_results,
    link_photos,
    log,
    median,
    parse_real_photo_args,
    percentile,
)


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    body = (f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


class Conn:
    """One keep-alive HTTP connection to the server."""

    def __init__(self, host: str, port: int) -> None:
        self.c = http.client.HTTPConnection(host, port, timeout=60)

    def post(self, name: str, data: bytes, k: int = 10, verify: bool = True) -> tuple[int, dict]:
        body, ctype = multipart(name, data)
        self.c.request("POST", f"/v1/query?k={k}&verify={str(verify).lower()}", body, {"Content-Type": ctype})
        r = self.c.getresponse()
        return r.status, json.loads(r.read())

    def get(self, path: str) -> dict:
        self.c.request("GET", path)
        r = self.c.getresponse()
        return json.loads(r.read())


def start_server(store: Path) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen([sys.executable, "-m", "neardup", "serve", "--store", str(store), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    host, port = line.rsplit("http://", 1)[1].strip().rstrip("/").rsplit(":", 1)
    return proc, host, int(port)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def catalogue_map(store: Path) -> tuple[str, dict[int, str], int]:
    from neardup.store import read_catalog

    cat = read_catalog(store, vectors=False)
    return cat.meta.generation, dict(zip(cat.ids.tolist(), cat.paths)), len(cat)


def make_queries(photos: list[Path], held_out: list[Path], n_copies: int, folder: Path) -> list[Path]:
    """Edited copies of catalogue photos and held-out photos, written as JPEG files under `folder`."""
    from PIL import Image

    from neardup.testing.grocery import edit_copy

    rng = np.random.default_rng(14)
    folder.mkdir(parents=True)
    out = []
    for i, src in enumerate(rng.choice(len(photos), n_copies, replace=False).tolist()):
        img, edits = edit_copy(Image.open(photos[src]).convert("RGB"), rng)
        path = folder / f"copy_{i:03d}.jpg"
        img.save(path, "JPEG", quality=edits["quality"])
        out.append(path)
    return out + held_out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=5000, help="photos in the store")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the load")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--update-photos", type=int, default=200, help="photos each of the two updates adds")
    p.add_argument("--queries", type=int, default=150, help="edited copies among the query photos")
    p.add_argument("--update-nice", type=int, default=0, help="run the updates under `nice -n N` (how a nightly job "
                   "shares a machine with the service)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="queries without geometric verification (server and in-process baseline alike)")
    parsed = parse_real_photo_args(p)
    if parsed is None:
        return 0
    args, spec, model_name = parsed
    import tempfile

    from neardup.indexer.build import build_index
    from neardup.search.query import Searcher

    report = Report("bench_serve.py", "Query service under load (issue 14)", " ".join(__doc__.split("\n\n")[1].split()),
                    params={"photos": args.photos, "seconds": args.seconds, "clients": args.clients,
                            "update photos": 2 * args.update_photos, "update nice": args.update_nice,
                            "verify": args.verify,
                            "model": model_name})
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    found = all_photos(GROCERY_DIR)
    need = args.photos + 2 * args.update_photos + 50
    if len(found) < need:
        raise SystemExit(f"{len(found)} photos in {GROCERY_DIR}; {need} needed")
    step = len(found) / need
    picked = [found[int(i * step)] for i in range(need)]
    base, extra, held_out = (picked[:args.photos], picked[args.photos:args.photos + 2 * args.update_photos],
                             picked[-50:])
    with tempfile.TemporaryDirectory(prefix="neardup-bench-serve-") as tmp:
        tmp = Path(tmp)
        cat_dir = link_photos(base, tmp / "catalogue")
        store = tmp / "catalog.h5"
        log(f"indexing {len(base)} photos with {args.model}")
        t0 = time.perf_counter()
        build_index([cat_dir], store, **spec)
        report.note(f"indexing {len(base)} photos (with local features) took {time.perf_counter() - t0:.0f} s")
        queries = make_queries(base, held_out, args.queries, tmp / "queries")
        blobs = [(q.name, q.read_bytes()) for q in queries]

        # -- baselines, in this process, before the server starts (nothing else running)
        log("baselines: model at batch 32, in-process query at batch 32, one warm in-process query")
        s = Searcher.open(store)
        pix = np.stack(_decoded(s, queries[:32]))
        s.embedder.embed(pix)
        t0, rounds = time.perf_counter(), 0
        while time.perf_counter() - t0 < 10 or rounds < 3:
            s.embedder.embed(pix)
            rounds += 1
        model_ips = 32 * rounds / (time.perf_counter() - t0)
        s.answer(queries[:32], batch_size=32, verify=args.verify)
        t0 = time.perf_counter()
        inproc = s.answer(queries, batch_size=32, verify=args.verify).results
        pipeline_ips = len(queries) / (time.perf_counter() - t0)
        lone = []
        for q in queries[:45]:
            t0 = time.perf_counter()
            s.answer([q], verify=args.verify)
            lone.append(time.perf_counter() - t0)
        lone_ms = 1000 * median(lone[5:])
        del s

        gens = dict([(g, (m, n)) for g, m, n in [catalogue_map(store)]])
        proc, host, port = start_server(store)
        try:
            conn = Conn(host, port)
            for name, data in blobs[:10]:
                conn.post(name, data, verify=args.verify)
            single = []
            agree = 0
            for i, (name, data) in enumerate(blobs[:45]):
                t0 = time.perf_counter()
                status, doc = conn.post(name, data, verify=args.verify)
                single.append(time.perf_counter() - t0)
                want = inproc[i]
                got = doc["results"][0]["matches"]
                agree += [m["id"] for m in got] == [m.id for m in want.matches] and all(
                    abs(m["score"] - w.score) < 1e-4 for m, w in zip(got, want.matches))
            single_ms = 1000 * median(single[5:])
            report.check("the server answers as the in-process Searcher (same ids, scores within 1e-4)",
                         agree == 45, f"{agree} of 45 photos")

            log(f"load: {args.clients} clients for {args.seconds:g} s; two updates of {args.update_photos} photos")
            results: list[tuple[float, float, int, dict]] = []
            stop = threading.Event()
            lock = threading.Lock()

            def client(c: int) -> None:
                cn = Conn(host, port)
                i = c
                while not stop.is_set():
                    name, data = blobs[i % len(blobs)]
                    i += args.clients
                    t0 = time.perf_counter()
                    try:
                        status, doc = cn.post(name, data, verify=args.verify)
                    except Exception as exc:  # noqa: BLE001 - a failed request is a result
                        status, doc = 0, {"exception": repr(exc)}
                        cn = Conn(host, port)
                    with lock:
                        results.append((t0, time.perf_counter() - t0, status, doc))

            threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            update_s = []
            for u in range(2):
                time.sleep(max(0.0, start + args.seconds * (0.2 + 0.4 * u) - time.perf_counter()))
                for j, src in enumerate(extra[u * args.update_photos:(u + 1) * args.update_photos]):
                    (cat_dir / f"u{u}_{j:04d}{src.suffix}").symlink_to(src)
                t0 = time.perf_counter()
                nice = ["nice", "-n", str(args.update_nice)] if args.update_nice else []
                subprocess.run([*nice, sys.executable, "-m", "neardup", "update", str(cat_dir), "--store", str(store)],
                               check=True, capture_output=True)
                update_s.append((t0, time.perf_counter()))
                g, m, n = catalogue_map(store)
                gens[g] = (m, n)
            time.sleep(max(0.0, start + args.seconds - time.perf_counter()))
            # a slow last update (under nice) may publish near the end: keep the load on until it is served
            last, until = list(gens)[-1], time.perf_counter() + 15
            while Conn(host, port).get("/v1/health")["generation"] != last and time.perf_counter() < until:
                time.sleep(0.2)
            time.sleep(2.0)
            stop.set()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            info = Conn(host, port).get("/v1/info")
            rss = peak_rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    ok = [r for r in results if r[2] == 200]
    failed = [r for r in results if r[2] != 200]
    lat = [1000 * r[1] for r in ok]
    served = {r[3]["generation"] for r in ok}
    consistent = 0
    for _, _, _, doc in ok:
        where, n = gens.get(doc["generation"], ({}, -1))
        consistent += doc["count"] == n and all(where.get(m["id"]) == m["path"] for m in doc["results"][0]["matches"])
    rps = len(ok) / wall
    # the updates are separate processes on the same two cores: also count the time outside them
    quiet = wall - sum(b - a for a, b in update_s)
    busy = [r for r in ok if any(a <= r[0] + r[1] and r[0] <= b for a, b in update_s)]
    rps_quiet = (len(ok) - len(busy)) / quiet if quiet > 0 else float("nan")
    b = info["batching"]
    report.table(f"{args.clients} clients, {wall:.0f} s, one photo per request, two updates published meanwhile", [
        "requests", "failed", "photos/s", "photos/s outside the updates", "p50 ms", "p99 ms", "generations served",
        "model calls", "mean batch", "largest batch", "server peak RSS MiB"],
        [[len(results), len(failed), rps, rps_quiet, percentile(lat, 50), percentile(lat, 99), len(served),
          b["batches"], b["images"] / max(b["batches"], 1), b["largest"], rss]])
    report.table("Baselines measured in the same run", ["what", "value", "server / it"], [
        ["model alone, batch 32 (photos/s)", model_ips, rps / model_ips],
        ["in-process Searcher.query, batch 32 (photos/s)", pipeline_ips, rps / pipeline_ips],
        ["one warm in-process query (ms, median)", lone_ms, single_ms / lone_ms],
        ["one warm request to the server (ms, median)", single_ms, ""]])
    report.note(f"updates took {update_s[0][1] - update_s[0][0]:.1f} s and {update_s[1][1] - update_s[1][0]:.1f} s "
                f"(separate processes on the same cores); {len(busy)} requests overlapped them")
    report.check("no failed request", not failed and len(ok) > 0,
                 f"{len(failed)} failed of {len(results)}" + (f"; first: {failed[0][3]}" if failed else ""))
    report.check("every answer from one complete, published generation", consistent == len(ok),
                 f"{consistent} of {len(ok)} consistent; generations published {len(gens)}, served {len(served)}")
    report.check("both updates were served", len(served & set(list(gens)[1:])) == 2, f"served {sorted(served)}")
    report.target("throughput / model alone at batch 32", rps / model_ips, ">= 0.8", rps / model_ips >= 0.8)
    report.target("throughput / in-process query at batch 32", rps / pipeline_ips, ">= 0.8", rps / pipeline_ips >= 0.8)
    report.target("throughput outside the updates / model alone at batch 32", rps_quiet / model_ips, ">= 0.8",
                  rps_quiet / model_ips >= 0.8)
    report.target("warm request latency / in-process query", single_ms / lone_ms, "<= 1.3", single_ms / lone_ms <= 1.3)
    status = report.finish(args.json)
    if args.record:
        what = f"{args.model}, {'verified' if args.verify else 'without verification'}" + (
            f", updates under nice -n {args.update_nice}" if args.update_nice else "")
        append_results(f"Query service under load (issue 14): {what}", "bench_serve.py", report,
                       "The server, the clients and the updates share the machine's cores; compare ratios within "
                       "this section only.")
    return status


def _decoded(s: Any, paths: list[Path]) -> list[np.ndarray]:
    from neardup.embed.pipeline import decode_for

    return [decode_for(p.read_bytes(), s.embedder).pixels for p in paths]


if __name__ == "__main__":
    sys.exit(main())
