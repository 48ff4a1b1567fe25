"""`neardup serve` under hostile clients (issue 24): slow uploads, idle connections and huge decodes from some
clients must not starve the others. Real servers in subprocesses on loopback; the hostile clients connect
from other loopback addresses (127.0.0.2 and up), as other machines would. Every loop is bounded in count
and time; each waits for the event it needs (a generous DEADLINE), never for a time window."""
from __future__ import annotations

import asyncio
import http.client
import io
import json
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

from neardup import threads
from neardup.indexer.build import build_index
from neardup.serve.fair import FairPool
from neardup.serve.service import LiveStore, QueryService, Upload
from neardup.testing import product_photo, write_product_photos

from .test_serve import DEADLINE, jpeg, multipart, stop_server


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


def query(url: str, data: bytes, source: str = "127.0.0.3", timeout: float = DEADLINE) -> tuple[int, float]:
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
    answered 503 for 30 s; then two trickling uploads that declared 512 MiB between them did the same, and
    so did a client's own trickling uploads to itself. A query takes a place only once its upload is whole,
    and an upload holds only the bytes that have arrived."""
    proc, url, port = start(store, "--request-timeout", "600")  # the slow uploads last until the test ends them
    photo = jpeg(product_photo(3))
    slow, stop = [], threading.Event()
    try:
        for i in range(66):  # 64 from one address; two declaring 320 + 192 MiB; and the bystander's own
            source, length = ("127.0.0.2", 400000) if i < 64 else ("127.0.0.2", (320 << 20) if i == 64 else 192 << 20)
            s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=(source, 0))
            s.sendall(f"POST /v1/query HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; "
                      f"boundary=b\r\nContent-Length: {length}\r\n\r\n-".encode())
            slow.append(s)
        for _ in range(8):
            s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=("127.0.0.3", 0))
            s.sendall(b"POST /v1/query HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; "
                      b"boundary=b\r\nContent-Length: 400000\r\n\r\n-")
            slow.append(s)
        got = _wait_for(lambda: (i := _info(url)["in_progress"])["upload_bytes"] == 74 and i)
        assert got["upload_clients"] == 2 and got["queries"] == 0, got

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
        answers = [query(url, photo) for _ in range(5)]  # the bystander (127.0.0.3) and others, meanwhile
        answers += [query(url, photo, source="127.0.0.4") for _ in range(5)]
        stop.set()
        t.join()
        still = _info(url)["in_progress"]  # answered while every slow upload was still coming
        assert still["upload_clients"] == 2 and still["upload_bytes"] >= 74 and still["queries"] == 0, still
    finally:
        for s in slow:
            s.close()
        err = stop_server(proc)
    assert all(status == 200 for status, _ in answers), answers
    assert "Traceback" not in err, err[-2000:]


def _closed_by_server(s: socket.socket, wait_s: float) -> bool:
    """Whether the server closes `s` within `wait_s` (its end of file, or a reset); False when still open."""
    s.settimeout(max(0.01, wait_s))
    try:
        return s.recv(10) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_idle_connections_cannot_exhaust_the_server(store: Path) -> None:
    """1,100 idle connections exhausted a 1,024-descriptor process (then every accept failed, with a traceback
    each time). Connections are capped below the process's descriptors, the one idle the longest is closed
    for a newcomer, and a silent connection is closed after --header-timeout."""
    # newcomers past the cap: with a header timeout longer than the test, only the eviction of an idle
    # connection can let them in
    proc, url, port = start(store, "--header-timeout", "600", nofile=256)
    idle = []
    try:
        for _ in range(400):
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=DEADLINE,
                                                     source_address=("127.0.0.2", 0)))
            except OSError:
                break
        answers = [query(url, jpeg(product_photo(4))) for _ in range(3)]
        assert all(status == 200 for status, _ in answers), answers
        assert _closed_by_server(idle[0], DEADLINE)  # the one idle the longest made room
        with urllib.request.urlopen(url + "v1/health", timeout=DEADLINE) as r:
            assert r.status == 200
    finally:
        for s in idle:
            s.close()
        err = stop_server(proc)
    assert "Traceback" not in err and len(err) < 5000, err[-2000:]
    # silent connections under the cap are closed once --header-timeout has passed
    proc, url, port = start(store, "--header-timeout", "3", nofile=256)
    try:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=("127.0.0.2", 0))
                for _ in range(8)]
        end = time.monotonic() + DEADLINE
        assert all(_closed_by_server(s, end - time.monotonic()) for s in idle)
        assert query(url, jpeg(product_photo(4)))[0] == 200
    finally:
        for s in idle:
            s.close()
        err = stop_server(proc)
    assert "Traceback" not in err, err[-2000:]


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 60, 30)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def test_huge_decodes_cannot_hold_up_a_small_query(store: Path) -> None:
    """Four requests of 16 single-colour 49 MP PNGs delayed a one-photo query to 24 s. The decoded pixels of a
    request and of all in progress are bounded (413 / 503 beyond, counted from the headers before decoding),
    and small requests decode in a lane of their own."""
    proc, url, port = start(store, "--request-timeout", "600")
    huge, big = _png(7000, 7000), _png(6000, 7500)  # 49 MP; 45 MP
    results: dict[str, list[int]] = {"huge": [], "big": []}

    def post(kind: str, photos: list[bytes], source: str) -> None:  # each from its own address: other clients
        body, ctype = multipart([(f"{kind}{i}.png", p) for i, p in enumerate(photos)])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE, source_address=(source, 0))
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
        # the huge ones are refused and an admitted big one is in progress (decoding)
        _wait_for(lambda: len(results["huge"]) == 4 and _info(url)["in_progress"]["queries"] >= 1)
        small = [query(url, jpeg(product_photo(5))) for _ in range(3)]
        big_done = results["big"].count(200)  # big requests answered before the small queries were
        for t in threads:
            t.join(timeout=DEADLINE)
    finally:
        err = stop_server(proc)
    assert results["huge"] == [413] * 4, results  # 784 MP a request: refused before a pixel is decoded
    assert sorted(results["big"]).count(200) >= 1 and 503 in results["big"], results  # 180 MP each; 400 in all
    assert all(status == 200 for status, _ in small), small
    # the small queries did not wait for the big decodes: a big request still decoding was answered after them
    assert results["big"].count(200) > big_done, (results, big_done)
    assert "Traceback" not in err, err[-2000:]


def _info(url: str) -> dict:
    with urllib.request.urlopen(url + "v1/info", timeout=DEADLINE) as r:
        return json.loads(r.read())


def _wait_for(what, deadline_s: float = DEADLINE):  # poll until truthy, else fail
    end = time.monotonic() + deadline_s
    while not (got := what()):
        assert time.monotonic() < end, "the awaited event did not come"
        time.sleep(0.05)
    return got


def test_busy_uploads_from_many_addresses_cannot_fill_the_connection_cap(store: Path) -> None:
    """Uploads in progress (not idle) filled the connection cap: 26 of 40 new clients were refused with 1,200
    uploads from 300 addresses. A newcomer now closes a connection of the address holding the most."""
    proc, url, port = start(store, "--max-connections", "48", "--request-timeout", "600", "--header-timeout", "600")
    busy, answers = [], []
    try:
        for i in range(47):  # 12 addresses, 3-4 uploads each, every one with its headers and a first byte sent
            s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE,
                                         source_address=(f"127.0.1.{i % 12 + 1}", 0))
            s.sendall(b"POST /v1/query HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; "
                      b"boundary=b\r\nContent-Length: 400000\r\n\r\n-")
            busy.append(s)
        _wait_for(lambda: _info(url)["in_progress"]["upload_bytes"] == 47)  # all 47 are requests in progress
        photo = jpeg(product_photo(6))
        answers = [query(url, photo, source="127.0.0.3") for _ in range(5)]  # each a new connection past the cap
    finally:
        for s in busy:
            s.close()
        err = stop_server(proc)
    assert all(status == 200 for status, _ in answers), answers
    assert "Traceback" not in err, err[-2000:]


def test_x_forwarded_for_is_trusted_only_when_configured(store: Path) -> None:
    """uvicorn trusted X-Forwarded-For from 127.0.0.1: a local client named itself anew in every request and
    escaped every per-client limit. Without --forwarded-allow-ips, the peer's address is the client."""
    for args, clients in (((), 1), (("--forwarded-allow-ips", "127.0.0.1"), 2)):
        proc, url, port = start(store, "--request-timeout", "600", *args)
        held = []
        try:
            for forged in ("10.0.0.1", "10.0.0.2"):
                s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=("127.0.0.1", 0))
                s.sendall(f"POST /v1/query HTTP/1.1\r\nHost: localhost\r\nX-Forwarded-For: {forged}\r\nContent-Type: "
                          f"multipart/form-data; boundary=b\r\nContent-Length: 400000\r\n\r\n-".encode())
                held.append(s)
            got = _wait_for(lambda url=url: (i := _info(url)["in_progress"])["upload_bytes"] == 2 and i)
        finally:
            for s in held:
                s.close()
            err = stop_server(proc)
        assert got["upload_clients"] == clients, (args, got)
        assert "Traceback" not in err, err[-2000:]


def test_a_request_verifies_at_most_its_budget_of_pairs(store: Path) -> None:
    """16 photos at k=100 verified 1,600 pairs in one request, and other clients' queries waited 12-18 s. A
    request verifies at most --max-verify-pairs: each photo's best share; the rest are judged by the threshold."""
    proc, _, port = start(store, "--max-verify-pairs", "8")
    try:
        body, ctype = multipart([(f"q{i}.jpg", jpeg(product_photo(i))) for i in range(2)])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
        conn.request("POST", "/v1/query?k=10", body=body, headers={"Content-Type": ctype, "Host": "localhost"})
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        conn.close()
    finally:
        err = stop_server(proc)
    assert resp.status == 200 and doc["verified"], doc
    for r in doc["results"]:
        head, tail = r["matches"][:4], r["matches"][4:]
        assert len(tail) == 6 and all(m["verified"] is None and m["inliers"] is None for m in tail), r
        assert all(m["inliers"] is not None for m in head), r  # these product photos have keypoints to judge
        assert head[0]["verified"] and r["found"]  # the photo itself, verified
    assert "Traceback" not in err, err[-2000:]


def test_workers_take_each_clients_jobs_in_turn_and_drop_cancelled_ones() -> None:
    """A FIFO queue made a one-photo query wait for every job queued before it. Jobs are taken round robin
    across clients, and a job whose future is cancelled (its request timed out or its client left) never runs."""
    pool = FairPool(1, "neardup-test-fair")
    gate, ran = threading.Event(), []
    try:
        blocker = pool.submit("a", gate.wait, DEADLINE)  # the one worker is busy until the gate opens
        _wait_for(lambda: blocker.running())
        hog = [pool.submit("hog", ran.append, f"hog{i}") for i in range(10)]
        dropped = pool.submit("gone", ran.append, "gone")
        small = pool.submit("small", ran.append, "small")
        assert dropped.cancel()
        gate.set()
        small.result(timeout=DEADLINE)
        for f in hog:
            f.result(timeout=DEADLINE)
    finally:
        gate.set()
        pool.close()
    assert ran.index("small") == 1 and "gone" not in ran, ran  # after one hog job, not after ten


def test_service_verification_workers_run_one_thread_of_each_library(tmp_path: Path, monkeypatch) -> None:
    """The service's pools were bare ThreadPoolExecutors: every verification worker ran FAISS on a full OpenMP
    team of its own beside the decoders and the batcher. They come from the thread owner now."""
    paths = write_product_photos(tmp_path / "photos", range(6))
    build_index([tmp_path / "photos"], tmp_path / "s.h5", model="phash")
    seen: dict[str, dict[str, int]] = {}
    real = QueryService._verify_some

    def spy(self, *args):
        seen[threading.current_thread().name] = threads.seen()
        return real(self, *args)

    monkeypatch.setattr(QueryService, "_verify_some", spy)
    service = QueryService(LiveStore(tmp_path / "s.h5"))
    try:
        answer = asyncio.run(service.query([Upload(paths[2].name, paths[2].read_bytes())], k=3, verify=True))
    finally:
        service.close()
    assert answer.results[0].matches[0].verified
    workers = {name: s for name, s in seen.items() if name.startswith("neardup-verify")}
    assert workers, f"no verification ran in a service worker: {sorted(seen)}"
    for name, s in workers.items():
        assert s["faiss"] == 1 and s["opencv"] == 1 and s["blas"] <= 1, (name, s)


def test_a_cancelled_query_drops_its_queued_verification(tmp_path: Path, monkeypatch) -> None:
    """Work of requests that had timed out kept running. A query cancelled while its verification jobs wait
    (the Guard cancels it on its timeout or when its client goes away) never runs them."""
    paths = write_product_photos(tmp_path / "photos", range(6))
    build_index([tmp_path / "photos"], tmp_path / "s.h5", model="phash")
    calls: list[str] = []
    real = QueryService._verify_some

    def spy(self, *args):
        calls.append(threading.current_thread().name)
        return real(self, *args)

    monkeypatch.setattr(QueryService, "_verify_some", spy)
    service = QueryService(LiveStore(tmp_path / "s.h5"))
    gate = threading.Event()

    async def run() -> None:
        blocker = service._verify.submit("other", gate.wait, DEADLINE)  # the verification worker is busy
        task = asyncio.ensure_future(service.query([Upload(p.name, p.read_bytes()) for p in paths[:3]], k=5,
                                                   verify=True, client="gone"))
        while service._verify.queued() < 3:  # its jobs are queued behind the busy worker
            assert not task.done(), task
            await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        gate.set()
        await asyncio.wrap_future(blocker)
        await service._verify.run("after", lambda: None)  # the queue has been worked through

    try:
        asyncio.run(run())
    finally:
        gate.set()
        service.close()
    assert calls == [], calls


def test_a_client_that_goes_away_takes_its_queued_work_with_it(store: Path) -> None:
    """Work of requests that had been given up kept running, ahead of everyone else's. A query whose client
    disconnects is cancelled, and its jobs still queued are dropped unrun."""
    proc, url, port = start(store, "--request-timeout", "600")
    try:
        body, ctype = multipart([(f"q{i}.jpg", jpeg(product_photo(i % 12))) for i in range(16)])
        s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=("127.0.0.2", 0))
        s.sendall(f"POST /v1/query?k=12 HTTP/1.1\r\nHost: localhost\r\nContent-Type: {ctype}\r\nContent-Length: "
                  f"{len(body)}\r\n\r\n".encode() + body)
        _wait_for(lambda: _info(url)["work"]["verify_queued"] >= 8)  # its verification is queued
        s.close()  # and the client goes away
        work = _wait_for(lambda: (w := _info(url)["work"])["dropped"] and w)
        assert work["dropped"] >= 1, work
        assert query(url, jpeg(product_photo(2)))[0] == 200
    finally:
        err = stop_server(proc)
    assert "Traceback" not in err, err[-2000:]
