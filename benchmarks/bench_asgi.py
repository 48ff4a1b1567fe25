"""ASGI framework for `neardup serve` (issue 14): FastAPI versus Litestar, both on uvicorn, measured.

Question: with the same two endpoints (POST /v1/query reading a ~100 kB multipart JPEG field `image` and answering
{"bytes", "sha256"}; GET /v1/health), each served by one real uvicorn process on 127.0.0.1, how many requests per
second do 8 keep-alive stdlib clients get, at what p50/p99 latency, with what peak server RSS (VmHWM), and how long
does importing each framework take? The handler does no neardup work on purpose: what differs between the two is
the framework's cost per upload (multipart parsing, validation, JSON); the model costs the same under both.
Litestar is not a neardup dependency: without it, its row says skipped.
"""
# No `from __future__ import annotations`: both frameworks resolve the handlers' (local) annotations at run time.
import argparse
import hashlib
import importlib.util
import io
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Annotated, Any

CLIENTS = 8
BOUNDARY = "neardupbenchboundary7f3a"
SKIP = "skipped: {0} not installed (pip install {0})"


def _answer(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def fastapi_app() -> Any:
    from fastapi import FastAPI, File, UploadFile

    app = FastAPI()

    @app.post("/v1/query")
    async def query(image: Annotated[UploadFile, File()]) -> dict[str, Any]:
        return _answer(await image.read())

    @app.get("/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def litestar_app() -> Any:
    from dataclasses import dataclass

    from litestar import Litestar, get, post
    from litestar.datastructures import UploadFile
    from litestar.enums import RequestEncodingType
    from litestar.params import Body

    @dataclass
    class QueryForm:
        image: UploadFile

    @post("/v1/query", status_code=200)  # Litestar's POST default is 201; FastAPI's is 200
    async def query(data: Annotated[QueryForm, Body(media_type=RequestEncodingType.MULTI_PART)]) -> dict[str, Any]:
        return _answer(await data.image.read())

    @get("/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return Litestar([query, health])


def make_jpeg() -> bytes:
    """A seeded ~100 kB JPEG: a colour gradient with Gaussian noise (Pillow, quality 85)."""
    import numpy as np
    from PIL import Image

    h, w = 420, 560
    grad = np.stack([*np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h)), np.full((h, w), 128.0)], -1)
    px = np.clip(grad + np.random.default_rng(14).normal(0, 26, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def multipart_body(jpeg: bytes) -> bytes:
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + jpeg + f"\r\n--{BOUNDARY}--\r\n".encode()


def drive(port: int, body: bytes, want: dict[str, Any], seconds: float) -> dict[str, Any]:
    """CLIENTS threads, one keep-alive connection each, POST until the deadline; latencies of good answers, ms."""
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", "Content-Length": str(len(body))}
    lat: list[list[float]] = [[] for _ in range(CLIENTS)]
    failed = [0] * CLIENTS
    start, deadline = threading.Barrier(CLIENTS + 1), [0.0]

    def client(i: int) -> None:
        conn = HTTPConnection("127.0.0.1", port, timeout=30)
        start.wait()
        while (t0 := time.perf_counter()) < deadline[0]:
            try:
                conn.request("POST", "/v1/query", body, headers)
                r = conn.getresponse()
                answer = r.read()
                ok = r.status == 200 and json.loads(answer) == want
            except (OSError, ValueError, HTTPException):
                ok = False
                conn.close()  # http.client reconnects on the next request
            if ok:
                lat[i].append((time.perf_counter() - t0) * 1000)
            else:
                failed[i] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = sorted(x for xs in lat for x in xs)
    nan = float("nan")
    return {"ok": len(ms), "failed": sum(failed), "rps": len(ms) / wall, "cpu": (time.process_time() - cpu0) / wall,
            "p50": statistics.median(ms) if ms else nan, "p99": ms[int(0.99 * (len(ms) - 1))] if ms else nan}


def run_server(framework: str, body: bytes, want: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Start the app in its own uvicorn process, wait for /v1/health, warm up, drive it, always stop it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, __file__, "--serve", framework, "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=err)
        try:
            up, give_up = False, time.monotonic() + 60
            while not up and proc.poll() is None and time.monotonic() < give_up:
                try:
                    c = HTTPConnection("127.0.0.1", port, timeout=2)
                    c.request("GET", "/v1/health")
                    up = json.loads(c.getresponse().read()) == {"status": "ok"}
                    c.close()
                except (OSError, ValueError):
                    time.sleep(0.1)
            if not up:
                err.seek(0)
                raise SystemExit(f"{framework} server not up (exit {proc.poll()}): {err.read().decode()[-800:]}")
            drive(port, body, want, min(2.0, seconds / 5))  # warm-up, not counted
            res = drive(port, body, want, seconds)
            hwm = [ln for ln in Path(f"/proc/{proc.pid}/status").read_text().splitlines() if ln.startswith("VmHWM:")]
            return res | {"rss": int(hwm[0].split()[1]) / 1024}
        finally:
            proc.terminate()  # uvicorn shuts down on SIGTERM
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def import_ms(module: str, runs: int = 3) -> float:
    """Median ms of `import module` in a fresh interpreter (the interpreter's own start-up excluded)."""
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return 1000 * statistics.median(float(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                                         text=True, check=True).stdout) for _ in range(runs))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=15.0, help="timed load per framework (after a short warm-up)")
    p.add_argument("--record", action="store_true", help="append a section to benchmarks/RESULTS.md")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT (for run_all.py)")
    p.add_argument("--serve", choices=("fastapi", "litestar"), help=argparse.SUPPRESS)  # the server process
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:  # one uvicorn worker, no access log, default loop/http: the same settings for both
        import uvicorn

        app = fastapi_app() if args.serve == "fastapi" else litestar_app()
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
        return 0

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on SIGTERM too (finally below)
    from common import Report, _version, append_results, log, machine_info  # numpy: not in the servers

    jpeg = make_jpeg()
    body, want = multipart_body(jpeg), _answer(jpeg)
    have = {m: "yes" if importlib.util.find_spec(m) else "no" for m in ("uvloop", "httptools")}
    report = Report("bench_asgi.py", "ASGI framework (issue 14): FastAPI vs Litestar",
                    " ".join(__doc__.split("\n\n")[1].split()),
                    params={"seconds": args.seconds, "clients": CLIENTS, "jpeg bytes": len(jpeg), "body bytes":
                            len(body), "server": f"uvicorn {_version('uvicorn')}, 1 worker, uvloop {have['uvloop']},"
                            f" httptools {have['httptools']}"})
    rows: list[list[Any]] = []
    res: dict[str, dict[str, Any]] = {}
    for fw in ("fastapi", "litestar"):
        if importlib.util.find_spec(fw) is None:
            rows.append([fw, SKIP.format(fw)] + [""] * 7)
            continue
        log(f"{fw}: {args.seconds:g} s of load with {CLIENTS} clients")
        r = res[fw] = run_server(fw, body, want, args.seconds) | {"imp": import_ms(fw)}
        rows.append([fw, _version(fw), r["ok"] + r["failed"], r["failed"], r["rps"], r["p50"], r["p99"], r["rss"],
                     r["imp"]])
        report.note(f"{fw}: the client threads used {r['cpu']:.0%} of one core during the load")
        report.check(f"{fw}: every answer 200 with the upload's length and sha256", r["failed"] == 0 and r["ok"] > 0,
                     f"{r['failed']} failed of {r['ok'] + r['failed']}")
    if len(res) == 2:
        f, s = res["fastapi"], res["litestar"]
        rows.append(["litestar / fastapi", "", "", ""] + [s[k] / f[k] for k in ("rps", "p50", "p99", "rss", "imp")])
    report.table(f"POST /v1/query, {len(jpeg):,} B JPEG, {CLIENTS} keep-alive clients, {args.seconds:g} s each",
                 ["framework", "version", "requests", "failed", "req/s", "p50 ms", "p99 ms", "server peak RSS MiB",
                  "import ms (median of 3)"], rows)
    status = report.finish(args.json)
    if args.record:
        info = machine_info()
        info.update({n: _version(n.lower()) for n in ("FastAPI", "Litestar", "uvicorn", "Starlette",
                                                      "python-multipart")})
        append_results("ASGI framework (issue 14): FastAPI vs Litestar", "bench_asgi.py",
                       report, "One uvicorn process per framework, one after the other; the clients run in the "
                       "benchmark's process on the same cores, so compare the ratio within this section only.", info)
    return status


if __name__ == "__main__":
    sys.exit(main())
