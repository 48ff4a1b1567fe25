"""`neardup serve` under hostile clients (issue 24): slow uploads, idle connections and huge decodes from some
clients must not starve the others. Real servers in subprocesses on loopback; the hostile clients connect
from other loopback addresses (127.0.0.2 and up), as other machines would. Every loop is bounded in count
and time."""
from __future__ import annotations

import http.client
import io
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from neardup.indexer.build import build_index
from neardup.testing import product_photo, write_product_photos

from .test_serve import jpeg, multipart, stop_server


def start(store: Path, *args: str, nofile: int | None = None) -> tuple[subprocess.Popen, str, int]:
    """`neardup serve` on an ephemeral port (with RLIMIT_NOFILE `nofile`); (process, URL, port)."""
    def limit() -> None:
        if nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    proc = subprocess.Popen([sys.executable, "-m", "neardup", "serve", "--store", str(store), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line}{proc.stderr.read()}")
    url = line.split(" at ")[-1].strip()
    return proc, url, int(url.rstrip("/").rsplit(":", 1)[1])


def query(url: str, data: bytes, source: str = "127.0.0.3", timeout: float = 30) -> tuple[int, float]:
    """(status, seconds) of one /v1/query of one photo, sent from loopback address `source`."""
    body, ctype = multipart([("q.jpg", data)])
    host, port = url.split("//")[1].rstrip("/").split(":")
    t0 = time.perf_counter()
    s = socket.create_connection((host, int(port)), timeout=timeout, source_address=(source, 0))
    try:
        s.sendall(f"POST /v1/query HTTP/1.1\r\nHost: localhost\r\nContent-Type: {ctype}\r\nContent-Length: "
                  f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        head = b""
        while b"\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                return 0, time.perf_counter() - t0  # closed without an answer
            head += chunk
    finally:
        s.close()
    return int(head.split()[1]), time.perf_counter() - t0


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fair")
    write_product_photos(root / "photos", range(12))
    build_index([root / "photos"], root / "s.h5", model="phash")
    return root / "s.h5"


def test_slow_uploads_of_one_client_hold_no_place_of_the_others(store: Path) -> None:
    """64 uploads trickling in a byte at a time took every place (--max-pending 64): every other query was
    answered 503 for 30 s. A query now takes a place only once its upload is whole, and one client may have
    4 uploads coming at once."""
    proc, url, port = start(store, "--request-timeout", "12")
    photo = jpeg(product_photo(3))
    slow, refused, stop = [], 0, threading.Event()
    try:
        for _ in range(64):
            s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
            s.sendall(b"POST /v1/query HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; "
                      b"boundary=b\r\nContent-Length: 400000\r\n\r\n-")
            slow.append(s)

        def trickle() -> None:  # a byte per connection every 0.25 s, for at most 6 s
            for _ in range(24):
                if stop.wait(0.25):
                    return
                for s in slow:
                    try:
                        s.send(b"-")
                    except OSError:
                        pass
        t = threading.Thread(target=trickle)
        t.start()
        time.sleep(0.5)
        answers = [query(url, photo) for _ in range(5)]  # another client, meanwhile
        stop.set()
        t.join()
        for s in slow:  # the slow client's uploads past its 4 were refused at once
            s.settimeout(0.2)
            try:
                refused += b" 503 " in s.recv(200)
            except OSError:
                pass
    finally:
        for s in slow:
            s.close()
        err = stop_server(proc)
    assert all(status == 200 and seconds < 3 for status, seconds in answers), answers
    assert refused >= 60, refused
    assert "Traceback" not in err, err[-2000:]


def test_idle_connections_cannot_exhaust_the_server(store: Path) -> None:
    """1,100 idle connections exhausted a 1,024-descriptor process (then every accept failed, with a traceback
    each time). Connections are capped below the process's descriptors, the one idle the longest is closed
    for a newcomer, and a silent connection is closed after --header-timeout."""
    proc, url, port = start(store, "--header-timeout", "3", nofile=256)
    idle = []
    try:
        for _ in range(400):
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0)))
            except OSError:
                break
        time.sleep(0.5)
        answers = [query(url, jpeg(product_photo(4))) for _ in range(3)]
        assert all(status == 200 and seconds < 3 for status, seconds in answers), answers
        time.sleep(3.5)  # past the header timeout: the silent ones are closed
        closed = 0
        for s in idle:
            s.settimeout(0.5)
            try:
                closed += s.recv(10) == b""
            except OSError:
                closed += 1
        assert closed == len(idle), (closed, len(idle))
        with urllib.request.urlopen(url + "v1/health", timeout=5) as r:
            assert r.status == 200
    finally:
        for s in idle:
            s.close()
        err = stop_server(proc)
    assert "Traceback" not in err and len(err) < 5000, err[-2000:]


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 60, 30)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def test_huge_decodes_cannot_hold_up_a_small_query(store: Path) -> None:
    """Four requests of 16 single-colour 49 MP PNGs delayed a one-photo query to 24 s. The decoded pixels of a
    request and of all in progress are bounded (413 / 503 beyond, counted from the headers before decoding),
    and small requests decode in a lane of their own."""
    proc, url, port = start(store, "--request-timeout", "60")
    huge, big = _png(7000, 7000), _png(6000, 7500)  # 49 MP; 45 MP
    results: dict[str, list[int]] = {"huge": [], "big": []}

    def post(kind: str, photos: list[bytes], source: str) -> None:  # each from its own address: other clients
        body, ctype = multipart([(f"{kind}{i}.png", p) for i, p in enumerate(photos)])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
        try:
            conn.request("POST", "/v1/query", body=body, headers={"Content-Type": ctype, "Host": "localhost"})
            results[kind].append(conn.getresponse().status)
        finally:
            conn.close()

    try:
        threads = [threading.Thread(target=post, args=("huge", [huge] * 16, f"127.0.0.{4 + i}")) for i in range(4)]
        threads += [threading.Thread(target=post, args=("big", [big] * 4, f"127.0.0.{8 + i}")) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)  # the uploads have arrived; the admitted big ones are decoding
        small = [query(url, jpeg(product_photo(5))) for _ in range(3)]
        for t in threads:
            t.join(timeout=90)
    finally:
        err = stop_server(proc)
    assert results["huge"] == [413] * 4, results  # 784 MP a request: refused before a pixel is decoded
    assert sorted(results["big"]).count(200) >= 1 and 503 in results["big"], results  # 180 MP each; 400 in all
    assert all(status == 200 and seconds < 3 for status, seconds in small), small
    assert "Traceback" not in err, err[-2000:]
