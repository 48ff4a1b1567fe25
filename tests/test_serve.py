"""`neardup serve` over real HTTP: a uvicorn server started as a user starts it, answers checked against the
in-process Searcher (the oracle), every limit and error as JSON, reload during traffic, and the CLI client."""
from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from neardup.indexer.build import build_index, update_index
from neardup.search.query import Searcher
from neardup.serve import client as client_mod
from neardup.serve.app import ServeOptions, make_service
from neardup.serve.service import LiveStore, Upload
from neardup.store import Store, StoreFiles, read_catalog, read_meta
from neardup.testing import FakeEmbedder, product_photo, write_product_photos

TOKEN = "s3cret-token"
#: How long a test waits for an event it needs (a reply, a published generation, a server's exit): generous, so
#: that a machine whose cores are taken by other work only makes the test slower, never fail.
DEADLINE = 120.0


def start_server(store: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`neardup serve --port 0 ...` as a subprocess; its URL read from the line it prints when ready."""
    proc = subprocess.Popen([sys.executable, "-m", "neardup", "serve", "--store", str(store), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "http://" not in line:
        proc.kill()
        raise AssertionError(f"server did not start: {line}{proc.stderr.read()}")
    return proc, line.split(" at ")[-1].strip()


def stop_server(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("server did not stop on SIGTERM") from None
    return err


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{n}"\r\n'
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + d + b"\r\n" for n, d in files)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def call(url: str, path: str, files: list[tuple[str, bytes]] | None = None, token: str | None = TOKEN,
         method: str | None = None) -> tuple[int, dict, Any]:
    """(status, JSON body, headers) of one request."""
    data, ctype = multipart(files) if files is not None else (None, None)
    req = urllib.request.Request(url + path, data=data, method=method)
    if ctype:
        req.add_header("Content-Type", ctype)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=DEADLINE) as r:
            raw, status, headers = r.read(), r.status, r.headers
    except urllib.error.HTTPError as exc:
        raw, status, headers = exc.read(), exc.code, exc.headers
    try:
        return status, json.loads(raw), headers
    except ValueError:
        return status, {"raw": raw}, headers


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Path:
    """A pHash store of 30 product photos (weight-free, so the server subprocess needs no model files)."""
    root = tmp_path_factory.mktemp("serve")
    write_product_photos(root / "photos", range(30))
    build_index([root / "photos"], root / "catalog.h5", model="phash")
    return root


#: The limits of the module's server. Its request timeout is generous: an upload the test holds open stays held
#: until the test closes it, however slow the machine (the timeout itself is tested on a server of its own).
LIMITS = ("--token", TOKEN, "--max-images", "3", "--max-upload-mb", "1", "--max-pixels", "1000000", "--max-pending",
          "2", "--max-inflight-mb", "1")


@pytest.fixture(scope="module")
def server(catalogue: Path) -> Iterator[str]:
    proc, url = start_server(catalogue / "catalog.h5", *LIMITS, "--request-timeout", "600")
    yield url
    err = stop_server(proc)
    assert "Traceback" not in err, err


def test_query_answers_as_the_in_process_searcher(server: str, catalogue: Path) -> None:
    store = catalogue / "catalog.h5"
    copy = jpeg(product_photo(7).resize((280, 280)), quality=70)  # a re-encoded, resized copy of photo 7
    new = jpeg(product_photo(900))
    status, doc, _ = call(server, "v1/query?k=5", [("copy.jpg", copy), ("new.jpg", new)])
    assert status == 200, doc
    assert doc["generation"] == read_meta(store).generation and doc["count"] == 30 and doc["verified"]
    for name, data in (("copy.jpg", copy), ("new.jpg", new)):
        (catalogue / name).write_bytes(data)
    with Searcher.open(store) as s:
        oracle = s.answer([catalogue / "copy.jpg", catalogue / "new.jpg"], k=5).results
    for got, want in zip(doc["results"], oracle):
        assert [m["id"] for m in got["matches"]] == [m.id for m in want.matches]
        assert [m["verified"] for m in got["matches"]] == [m.verified for m in want.matches]
        np.testing.assert_allclose([m["score"] for m in got["matches"]], [m.score for m in want.matches], atol=1e-5)
        assert got["found"] == want.found(doc["threshold"])
    assert doc["results"][0]["found"] and doc["results"][0]["matches"][0]["path"].endswith("0007.jpg")
    assert not doc["results"][1]["found"]


def test_token_guards_everything_but_health_and_the_page(server: str) -> None:
    status, _, headers = call(server, "v1/health", token=None)
    assert status == 200 and headers["X-Content-Type-Options"] == "nosniff"
    status, doc, headers = call(server, "v1/info", token=None)
    assert status == 401 and doc["error"]["code"] == "unauthorized" and headers["WWW-Authenticate"] == "Bearer"
    assert call(server, "v1/info", token="wrong")[0] == 401
    assert call(server, "v1/thumbs/0", token=None)[0] == 401
    assert call(server, "v1/query", [("a.jpg", jpeg(product_photo(1)))], token=None)[0] == 401
    status, schema, _ = call(server, "v1/openapi.json")
    assert status == 200 and "/v1/query" in schema["paths"] and "/v1/images/{id}" in schema["paths"]
    with urllib.request.urlopen(server, timeout=DEADLINE) as r:  # the page holds no data: served without the token
        assert "default-src 'none'" in r.headers["Content-Security-Policy"] and b"app.js" in r.read()


def test_errors_are_json_with_stable_codes_never_500(server: str) -> None:
    good = jpeg(product_photo(3))
    cases = {
        "not_found": call(server, "v1/nothing"),
        "method_not_allowed": call(server, "v1/query"),
        "bad_image": call(server, "v1/query", [("notes.jpg", b"this is not an image")]),
        "too_many_images": call(server, "v1/query", [(f"{i}.jpg", good) for i in range(4)]),
        "file_too_large": call(server, "v1/query", [("big.jpg", good + os.urandom(1_100_000))]),
        "invalid_request": call(server, "v1/query?k=0", [("a.jpg", good)]),
    }
    buf = io.BytesIO()
    Image.new("L", (1500, 1000)).save(buf, "PNG")  # 1.5 MP > --max-pixels 1000000, a few kB on the wire
    cases["bomb"] = call(server, "v1/query", [("bomb.png", buf.getvalue())])
    want = {"not_found": 404, "method_not_allowed": 405, "bad_image": 422, "too_many_images": 413,
            "file_too_large": 413, "invalid_request": 422, "bomb": 422}
    for code, (status, doc, headers) in cases.items():
        assert status == want[code], (code, status, doc)
        assert doc["error"]["code"] == (code if code != "bomb" else "bad_image") and doc["error"]["message"]
        assert headers["Content-Type"] == "application/json"
    assert "not a recognised image format" in cases["bad_image"][1]["error"]["message"]
    assert "decompression bomb" in cases["bomb"][1]["error"]["message"]
    # one bad photo among good ones is that photo's error, and the others are answered
    status, doc, _ = call(server, "v1/query", [("ok.jpg", good), ("bad.jpg", b"\xff\xd8\xff junk")])
    assert status == 200 and doc["results"][0]["matches"]
    assert doc["results"][1]["error"] == "not a recognised image format"


def raw_request(url: str, head: bytes, body: bytes = b"", source: str = "127.0.0.1") -> socket.socket:
    host, port = url.split("//")[1].rstrip("/").split(":")
    s = socket.create_connection((host, int(port)), timeout=DEADLINE, source_address=(source, 0))
    s.sendall(head + body)
    return s


def wait_for(what: Any, deadline_s: float = DEADLINE, every_s: float = 0.05) -> Any:
    """Poll `what()` until it is truthy (its value), or fail after a generous deadline."""
    end = time.monotonic() + deadline_s
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < end, "the awaited event did not come"
        time.sleep(every_s)


def held(url: str) -> dict:
    """What the server's requests in progress hold (/v1/info's in_progress)."""
    return call(url, "v1/info")[1]["in_progress"]


def read_status(s: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_body_cap_admission_and_timeouts(server: str) -> None:
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    # a declared body over the cap is refused before a byte of it is read
    s = raw_request(server, b"POST /v1/query HTTP/1.1\r\nHost: localhost\r\n" + auth +
                    b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 99999999999\r\n\r\n")
    status, data = read_status(s)
    assert status == 413 and b'"too_large"' in data + s.recv(65536)
    s.close()
    # an upload must declare its length (so that the cap and the byte budget apply before it is read)
    s = raw_request(server, b"POST /v1/query HTTP/1.1\r\nHost: localhost\r\n" + auth +
                    b"Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n")
    status, data = read_status(s)
    assert status == 411 and b"length_required" in data + s.recv(65536)
    s.close()
    # uploads still coming hold no query's place (--max-pending 2) and reserve no bytes: four trickling in from
    # this very client's address (issue 32: eight of them made 3,745 of 3,746 of its queries 503), one from
    # another address declaring ~1 MiB, the whole --max-inflight-mb
    slow_head = (b"POST /v1/query HTTP/1.1\r\nHost: localhost\r\n" + auth +
                 b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 5000\r\n\r\n")
    big_head = slow_head.replace(b"5000", b"1048000")
    slow = [raw_request(server, slow_head, b"--b\r\n") for _ in range(4)]
    slow.append(raw_request(server, big_head, b"--b\r\n", source="127.0.0.2"))
    wait_for(lambda: held(server)["upload_bytes"] == 5 * 5)  # the first bytes of each have arrived
    assert call(server, "v1/query", [("a.jpg", jpeg(product_photo(2)))])[0] == 200
    assert call(server, "v1/health")[0] == 200  # health is never queued behind queries
    still = held(server)  # the slow uploads are still coming (they end when the test closes them)
    assert (still["upload_bytes"], still["upload_clients"], still["queries"]) == (25, 2, 0), still
    for s in slow:
        s.close()
    wait_for(lambda: held(server)["upload_bytes"] == 0)  # an upload given up gives its bytes back
    # bytes that did arrive are held, per client: another address that sent ~1 MiB (all but its last bytes)
    # fills the budget; a query of this client still goes through (its share), the hog's next upload is refused
    hog = raw_request(server, big_head, b"--b\r\n" + b"x" * 1_040_000, source="127.0.0.2")
    wait_for(lambda: held(server)["upload_bytes"] == 1_040_005)
    status, doc, _ = call(server, "v1/query", [("a.jpg", jpeg(product_photo(2)))])
    assert status == 200, doc
    more = raw_request(server, big_head, b"--b\r\n" + b"x" * 200_000, source="127.0.0.2")
    status, data = read_status(more)
    assert status == 503 and b"retry-after: 1" in data.lower()  # then closed: the rest of its body is unread
    more.close()
    hog.close()
    wait_for(lambda: held(server)["upload_bytes"] == 0)  # all given back
    assert call(server, "v1/query", [("a.jpg", jpeg(product_photo(2)))])[0] == 200


def test_uploads_that_do_not_finish_in_time_are_answered_408(catalogue: Path) -> None:
    """--request-timeout bounds an upload still coming, a trickle or one that sent a good part of its body: 408,
    and the bytes it held are given back. (A server of its own with a short timeout: the test waits for it.)"""
    proc, url = start_server(catalogue / "catalog.h5", *LIMITS, "--request-timeout", "5")
    head = (b"POST /v1/query HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + TOKEN.encode() +
            b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 5000\r\n\r\n")
    try:
        slow = [raw_request(url, head, b"--b\r\n") for _ in range(2)]
        slow.append(raw_request(url, head.replace(b"5000", b"1048000"), b"--b\r\n" + b"x" * 200_000,
                                source="127.0.0.2"))
        for s in slow:
            status, data = read_status(s)
            assert status == 408 and b"request_timeout" in data + s.recv(65536), data
            s.close()
        wait_for(lambda: held(url)["upload_bytes"] == 0)
    finally:
        err = stop_server(proc)
    assert "Traceback" not in err, err


def test_host_token_and_id_edges(server: str) -> None:
    host, port = server.split("//")[1].rstrip("/").split(":")
    for name, want in (("evil.example", 400), (f"localhost:{port}", 200), (f"[::1]:{port}", 200)):
        s = raw_request(server, f"GET /v1/health HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        status, data = read_status(s)
        assert status == want, (name, data)
        s.close()
    s = raw_request(server, f"GET /v1/info HTTP/1.1\r\nHost: x.example\r\nAuthorization: bearer {TOKEN}\r\n"
                    f"Connection: close\r\n\r\n".encode())
    assert read_status(s)[0] == 400  # the Host check comes first, token or not
    s.close()
    req = urllib.request.Request(server + "v1/info", headers={"Authorization": f"bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=DEADLINE) as r:  # the scheme is case-insensitive
        assert r.status == 200
    for path in ("v1/images/99999999999999999999", "v1/thumbs/-1", "v1/images/abc"):
        status, doc, _ = call(server, path)
        assert status == 422 and doc["error"]["code"] == "invalid_request", (path, doc)
    status, doc, headers = call(server, "v1/query")
    assert status == 405 and headers["Allow"] == "POST"
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    status, doc, _ = call(server, "v1/query", [("photo.jpg", eps)])
    assert status == 422 and "not a recognised image format" in doc["error"]["message"]


def test_images_and_thumbnails_by_id_only(server: str, catalogue: Path) -> None:
    cat = read_catalog(catalogue / "catalog.h5", vectors=False)
    i = int(cat.ids[5])
    req = urllib.request.Request(server + f"v1/images/{i}", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=DEADLINE) as r:
        assert r.read() == (catalogue / cat.paths[5]).read_bytes() and r.headers["Content-Type"] == "image/jpeg"
    req = urllib.request.Request(server + f"v1/thumbs/{i}", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=DEADLINE) as r:
        thumb = Image.open(io.BytesIO(r.read()))
        assert thumb.format == "JPEG" and max(thumb.size) <= 256
    assert call(server, "v1/images/999999")[1]["error"]["code"] == "not_found"
    status, doc, _ = call(server, "v1/images/..%2F..%2Fetc%2Fpasswd")
    assert status in (404, 422) and "error" in doc
    # a file changed on disk since it was indexed is not served as if it were the indexed photo
    victim = catalogue / cat.paths[6]
    victim.write_bytes(jpeg(product_photo(777)))
    status, doc, _ = call(server, f"v1/images/{int(cat.ids[6])}")
    assert status == 404 and doc["error"]["code"] == "image_gone"


def test_reload_publishes_without_a_gap(tmp_path: Path) -> None:
    """Queries run without pause while `update` publishes twice: none fails, each answer comes from one whole
    generation (its ids and paths are that generation's), and the new photos are found once published."""
    photos = tmp_path / "photos"
    write_product_photos(photos, range(20))
    store = tmp_path / "catalog.h5"
    build_index([photos], store, model="phash")
    gens = {read_meta(store).generation: read_catalog(store, vectors=False)}
    proc, url = start_server(store, "--reload-poll", "0.1")
    answers: list[tuple[int, dict]] = []
    stop = threading.Event()
    probe = jpeg(product_photo(4))

    def hammer() -> None:
        while not stop.is_set():
            status, doc, _ = call(url, "v1/query?k=3", [("p.jpg", probe)], token=None)
            answers.append((status, doc))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        for step in range(2):
            before = len(answers)
            wait_for(lambda before=before: len(answers) >= before + 10)  # queries under way meanwhile
            write_product_photos(photos, range(100 + 10 * step, 110 + 10 * step))
            update_index([photos], store)
            gens[read_meta(store).generation] = read_catalog(store, vectors=False)
        last = list(gens)[-1]
        wait_for(lambda: call(url, "v1/health", token=None)[1]["generation"] == last)
        wait_for(lambda: sum(d.get("generation") == last for _, d in answers[-50:]) >= 3)  # and answered from it
    finally:
        stop.set()
        for t in threads:
            t.join()
    new = jpeg(product_photo(115))
    status, doc, _ = call(url, "v1/query?k=1", [("new.jpg", new)], token=None)
    err = stop_server(proc)
    assert "Traceback" not in err, err
    assert status == 200 and doc["generation"] == list(gens)[-1] and doc["results"][0]["found"]
    assert doc["results"][0]["matches"][0]["path"].endswith("0115.jpg")
    assert len(answers) > 20 and all(s == 200 for s, _ in answers), [d for s, d in answers if s != 200][:3]
    seen = {d["generation"] for _, d in answers}
    assert len(seen) >= 2 and seen <= set(gens)
    for _, d in answers:
        cat = gens[d["generation"]]
        where = dict(zip(cat.ids.tolist(), cat.paths))
        assert d["count"] == len(cat)
        assert all(where.get(m["id"]) == m["path"] for m in d["results"][0]["matches"])


def test_query_cli_through_the_server(server: str, catalogue: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (catalogue / "q").mkdir(exist_ok=True)
    (catalogue / "q" / "copy.jpg").write_bytes(jpeg(product_photo(9), quality=75))
    (catalogue / "q" / "new.jpg").write_bytes(jpeg(product_photo(901)))
    env = {**os.environ, "NEARDUP_TOKEN": TOKEN}
    cmd = [sys.executable, "-m", "neardup", "query", "--json", "-k", "3"]
    remote = subprocess.run([*cmd, str(catalogue / "q"), "--server", server], capture_output=True, text=True, env=env)
    local = subprocess.run([*cmd, str(catalogue / "q"), "--store", str(catalogue / "catalog.h5")],
                           capture_output=True, text=True)
    assert remote.returncode == local.returncode == 0, remote.stderr
    r, l_ = json.loads(remote.stdout), json.loads(local.stdout)
    assert r["generations"] == [read_meta(catalogue / "catalog.h5").generation]
    for a, b in zip(r["results"], l_["results"]):
        assert [(m["id"], m["match"], m["verified"]) for m in a["matches"]] == \
            [(m["id"], m["match"], m["verified"]) for m in b["matches"]]
    one = subprocess.run([*cmd, str(catalogue / "q" / "new.jpg"), "--server", server], capture_output=True,
                         text=True, env=env)
    assert one.returncode == 1  # not in the catalogue
    down = subprocess.run([*cmd, str(catalogue / "q"), "--server", "http://127.0.0.1:9"], capture_output=True,
                          text=True)
    assert down.returncode == 2 and "cannot reach the query server" in down.stderr
    assert "Traceback" not in down.stderr and len(down.stderr.strip().splitlines()) == 1
    denied = subprocess.run([*cmd, str(catalogue / "q"), "--server", server], capture_output=True, text=True)
    assert denied.returncode == 2 and "401" in denied.stderr
    # a busy server (this client's share of the upload bytes held by its own slow upload, which sent ~1 MiB and
    # then stalls) answers 503 with Retry-After; the client (the one `query --server` runs) waits as asked and
    # tries again. Its pause is the test's cue to end the slow upload, so the retry goes through.
    head = (f"POST /v1/query HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: "
            f"multipart/form-data; boundary=b\r\nContent-Length: 1048500\r\n\r\n").encode()
    # (it leaves less of the 1 MiB budget than the query's upload: the query must wait for it)
    slow = raw_request(server, head, b"--b\r\n" + b"x" * 1_048_300)
    wait_for(lambda: held(server)["upload_bytes"] == 1_048_305)
    refused, freed, asked = threading.Event(), threading.Event(), []

    def pause(seconds: float) -> None:  # the client's pause after a 503: the test frees the budget meanwhile
        asked.append(seconds)
        refused.set()
        assert freed.wait(DEADLINE)
        time.sleep(seconds)

    monkeypatch.setattr(client_mod, "time", SimpleNamespace(sleep=pause))
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(client_mod.query_server(
        server, [catalogue / "q" / "copy.jpg"], k=3, token=TOKEN)))
    waiter.start()
    try:
        assert refused.wait(DEADLINE), "the client was never answered 503"
        slow.close()
        wait_for(lambda: held(server)["upload_bytes"] == 0)
    finally:
        freed.set()
        waiter.join(DEADLINE)
    assert asked == [1] and got and got[0].results[0].matches[0].path.endswith("0009.jpg"), got
    empty = subprocess.run([sys.executable, "-m", "neardup", "serve", "--port", "0", "--store",
                            str(catalogue / "catalog.h5")], capture_output=True, text=True, timeout=DEADLINE,
                           env={**os.environ, "NEARDUP_TOKEN": ""})
    assert empty.returncode == 2 and "token" in empty.stderr and "Traceback" not in empty.stderr


class SlowFake(FakeEmbedder):
    """The fake embedder, whose first call lasts until the other requests' images are queued behind it (`queued()`
    of them, `total` images in all): concurrent requests then wait for the model, however slow the machine."""

    def __init__(self, total: int) -> None:
        super().__init__()
        self.total, self.sizes = total, []
        self.queued: Any = lambda: 0

    def embed(self, batch: np.ndarray) -> np.ndarray:
        if not self.sizes:
            wait_for(lambda: self.queued() >= self.total - len(batch), every_s=0.005)
        self.sizes.append(len(batch))
        return super().embed(batch)


def test_micro_batching_embeds_concurrent_requests_together(tmp_path: Path) -> None:
    paths = write_product_photos(tmp_path / "photos", range(12))
    store = tmp_path / "catalog.h5"
    build_index([tmp_path / "photos"], store, embedder=FakeEmbedder())
    slow = SlowFake(len(paths))
    service = make_service(ServeOptions(store=str(store), batch_wait_ms=10), embedder=slow)
    slow.queued = service.batcher._q.qsize  # one image a request
    ups = [Upload(p.name, p.read_bytes()) for p in paths]

    async def run() -> list:
        return await asyncio.gather(*(service.query([u], k=3) for u in ups))

    try:
        answers = asyncio.run(run())
    finally:
        service.close()
    assert sum(slow.sizes) == 12 and len(slow.sizes) < 12 and max(slow.sizes) > 1  # batched
    with Searcher.open(store, embedder=FakeEmbedder()) as s:
        oracle = s.answer(paths, k=3).results
    for a, want in zip(answers, oracle):
        got = a.results[0]
        assert [m.id for m in got.matches] == [m.id for m in want.matches]
        np.testing.assert_allclose([m.score for m in got.matches], [m.score for m in want.matches], atol=1e-5)


def test_serve_refuses_what_it_cannot_serve(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "neardup", "serve", "--port", "0"]
    missing = subprocess.run([*run, "--store", str(tmp_path / "none.h5")], capture_output=True, text=True,
                             timeout=DEADLINE)
    assert missing.returncode == 2 and "no store at" in missing.stderr and "Traceback" not in missing.stderr
    write_product_photos(tmp_path / "p", range(2))
    build_index([tmp_path / "p"], tmp_path / "c.h5", model="phash")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = subprocess.run([*run[:-2], "--port", str(busy.getsockname()[1]), "--store", str(tmp_path / "c.h5")],
                           capture_output=True, text=True, timeout=DEADLINE)
    busy.close()
    assert taken.returncode == 2 and "cannot listen on" in taken.stderr and "Traceback" not in taken.stderr
    shutil.rmtree(tmp_path / "p")


def test_a_damaged_new_generation_is_not_served(tmp_path: Path) -> None:
    """A store file replaced by a damaged one: the service keeps answering from the generation it has, says
    why in /v1/info's reload_error, and takes the next good generation."""
    write_product_photos(tmp_path / "photos", range(6))
    store = tmp_path / "catalog.h5"
    build_index([tmp_path / "photos"], store, model="phash")
    live = LiveStore(store, poll_s=60)
    try:
        first = live.current.id
        good = store.read_bytes()
        broken = tmp_path / "broken.h5"
        broken.write_bytes(good[: len(good) // 2])
        os.replace(broken, store)
        assert not live.check() and live.current.id == first and "damaged" in live.reload_error
        with live.use() as gen:  # still answers from the generation it holds open
            assert len(gen.searcher.search(np.eye(1, 64, dtype=np.float32), 2)[0]) == 2
        store.write_bytes(good)  # the good file back (a new inode and mtime), then a real update
        write_product_photos(tmp_path / "photos", range(6, 8))
        update_index([tmp_path / "photos"], store)
        assert live.check() and live.current.id != first and live.reload_error is None
        assert len(live.current.searcher.cat) == 8
    finally:
        live.stop()


def test_a_store_rewritten_in_place_while_served_is_never_answered_wrongly(tmp_path: Path) -> None:
    """The manifest, then a segment, overwritten in place (same inode) by another store's bytes while the
    service serves: every answer stays right (the generation served reads its verified blocks, or the photos),
    the bad manifest is refused with a reason, and once the files are restored it serves on, no restart."""
    write_product_photos(tmp_path / "a", range(12))
    write_product_photos(tmp_path / "b", range(100, 112))
    build_index([tmp_path / "a"], tmp_path / "a.h5", model="phash")
    build_index([tmp_path / "b"], tmp_path / "b.h5", model="phash")
    photos = [(p.name, p.read_bytes()) for p in sorted((tmp_path / "a").iterdir())]
    # no cache of verified rows' features: every verification reads the segment (or, damaged, the photos)
    proc, url = start_server(tmp_path / "a.h5", "--reload-poll", "0.1", "--local-cache-mb", "0")

    def all_right() -> tuple[int, int]:
        right = wrong = 0
        for name, data in photos:
            status, doc, _ = call(url, "v1/query?k=3", [(name, data)], token=None)
            if status != 200:
                continue  # an error is not a wrong answer (none is expected here either)
            top = doc["results"][0]["matches"][0]
            ok = top["path"] == f"a/{name}" and doc["results"][0]["found"]
            right, wrong = right + ok, wrong + (not ok)
        return right, wrong

    def in_place(path: Path, data: bytes) -> None:
        with open(path, "r+b") as fh:  # the same inode: what `cp other.h5 a.h5` or a restore from tape does
            fh.write(data)
            fh.truncate(len(data))

    try:
        assert all_right() == (12, 0)
        good = (tmp_path / "a.h5").read_bytes()
        in_place(tmp_path / "a.h5", (tmp_path / "b.h5").read_bytes())  # names segments that are not ours
        info = wait_for(lambda: (doc := call(url, "v1/info", token=None)[1])["reload_error"] and doc)
        assert "damaged" in info["reload_error"], info
        assert all_right() == (12, 0)
        with Store.open(tmp_path / "b.h5") as b:
            other = StoreFiles(tmp_path / "b.h5").segment(b.segments[0].name).read_bytes()
        in_place(tmp_path / "a.h5", good)
        with Store.open(tmp_path / "a.h5") as a:
            seg = StoreFiles(tmp_path / "a.h5").segment(a.segments[0].name)
        saved = seg.read_bytes()
        in_place(seg, other)  # the segment the service reads its local features from, under it
        assert all_right() == (12, 0)  # from the photos themselves, said in the log
        in_place(seg, saved)  # a failed load is tried again after a pause, the manifest unchanged
        info = wait_for(lambda: (doc := call(url, "v1/info", token=None)[1])["reload_error"] is None and doc)
        assert info["count"] == 12, info
        assert all_right() == (12, 0)
    finally:
        err = stop_server(proc)
    assert "verifying from the photos themselves" in err and "Traceback" not in err, err[-2000:]


#: Makes Generation.open hang, holding the GIL as HDF5 does in a damaged file, on a manifest that starts with
#: b"HANGHANG" (loaded as sitecustomize in the server's processes only). ~70 s of C: bounded, should a
#: probe outlive a failed test.
HANG_SITE = '''
def _install():
    from neardup.store import generation as g
    real = g.Generation.open.__func__

    def open_(cls, path, *args, **kwargs):
        with open(path, "rb") as fh:
            if fh.read(8) == b"HANGHANG":
                sum(range(2 * 10**9))  # one C call: the GIL is never released
        return real(cls, path, *args, **kwargs)
    g.Generation.open = classmethod(open_)


_install()
'''


def test_a_manifest_that_hangs_hdf5_freezes_nothing(tmp_path: Path) -> None:
    """A damaged manifest that hung HDF5 froze `serve`: /v1/health went unanswered, SIGTERM was ignored, and it
    stayed frozen after the file was repaired. A new generation is opened in a child process first, with a
    deadline; health and info say what was found, the last good generation answers, SIGTERM stops it."""
    write_product_photos(tmp_path / "photos", range(6))
    store = tmp_path / "catalog.h5"
    build_index([tmp_path / "photos"], store, model="phash")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(HANG_SITE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    # --open-timeout 15: a good generation's probe (a fresh Python) opens well within it on a loaded machine
    proc = subprocess.Popen([sys.executable, "-m", "neardup", "serve", "--store", str(store), "--port", "0",
                             "--reload-poll", "0.1", "--open-timeout", "15"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    assert "http://" in line, line + proc.stderr.read()
    url = line.split(" at ")[-1].strip()
    first = read_meta(store).generation
    good = store.read_bytes()

    def replace_with(data: bytes) -> None:  # a new file (new inode), as a restore or a bad copy makes it
        (tmp_path / "next.h5").write_bytes(data)
        os.replace(tmp_path / "next.h5", store)

    try:
        replace_with(b"HANGHANG" + good[8:])
        health = wait_for(lambda: (doc := call(url, "v1/health", token=None)[1])["reload_error"] and doc)
        assert health["generation"] == first and "did not open within 15 s" in health["reload_error"], health
        assert "did not open" in call(url, "v1/info", token=None)[1]["reload_error"]
        status, doc, _ = call(url, "v1/query?k=1", [("p.jpg", jpeg(product_photo(2)))], token=None)
        assert status == 200 and doc["generation"] == first and doc["results"][0]["found"]
        replace_with(good)  # repaired: served again, no restart
        wait_for(lambda: call(url, "v1/health", token=None)[1]["reload_error"] is None)
        replace_with(b"HANGHANG" + good[8:])  # and damaged again: SIGTERM still stops it
        wait_for(lambda: call(url, "v1/health", token=None)[1]["reload_error"])
    finally:
        err = stop_server(proc)
    assert "Traceback" not in err, err[-2000:]


def test_thumbnails_of_photos_over_the_upload_pixel_limit(tmp_path: Path) -> None:
    """A 64-megapixel photo was indexed but its thumbnail refused (422): thumbnails decoded under the uploads'
    --max-pixels. A thumbnail is made of any photo the indexer took; uploads keep their limit."""
    write_product_photos(tmp_path / "photos", range(3))
    big = product_photo(50).resize((1500, 1100))  # 1.65 MP, over --max-pixels 1000000 below
    (tmp_path / "photos" / "big.jpg").write_bytes(jpeg(big))
    Image.new("RGB", (1400, 1000), (30, 90, 200)).save(tmp_path / "photos" / "big.png")
    store = tmp_path / "catalog.h5"
    build_index([tmp_path / "photos"], store, model="phash")
    cat = read_catalog(store, vectors=False)
    proc, url = start_server(store, "--max-pixels", "1000000")
    try:
        for name in ("big.jpg", "big.png"):
            i = int(cat.ids[[p.endswith(name) for p in cat.paths].index(True)])
            with urllib.request.urlopen(url + f"v1/thumbs/{i}", timeout=DEADLINE) as r:
                thumb = Image.open(io.BytesIO(r.read()))
                assert thumb.format == "JPEG" and max(thumb.size) == 256, (name, thumb.size)
        status, doc, _ = call(url, "v1/query", [("big.jpg", jpeg(big))], token=None)
        assert status == 422 and "decompression bomb" in doc["error"]["message"]
    finally:
        err = stop_server(proc)
    assert "Traceback" not in err, err


def test_a_run_is_answered_from_one_generation(tmp_path: Path) -> None:
    """`query --server` over 160 photos was answered from 4 generations, said only by --json. A request may
    name the generation to answer from (the client pins its first answer's): served while the server holds
    it, else 409 generation_gone, and the client starts its run again."""
    write_product_photos(tmp_path / "photos", range(8))
    store = tmp_path / "catalog.h5"
    build_index([tmp_path / "photos"], store, model="phash")
    first = read_meta(store).generation
    proc, url = start_server(store, "--reload-poll", "0.1")
    probe = [("p.jpg", jpeg(product_photo(3)))]
    try:
        write_product_photos(tmp_path / "photos", range(100, 104))
        update_index([tmp_path / "photos"], store)
        second = read_meta(store).generation
        wait_for(lambda: call(url, "v1/health", token=None)[1]["generation"] == second)
        status, doc, _ = call(url, f"v1/query?k=3&generation={first}", probe, token=None)
        assert status == 200 and doc["generation"] == first and doc["count"] == 8, doc
        assert call(url, "v1/query?k=3", probe, token=None)[1]["generation"] == second
        status, doc, _ = call(url, "v1/query?k=3&generation=0123456789ab", probe, token=None)
        assert status == 409 and doc["error"]["code"] == "generation_gone", doc
    finally:
        err = stop_server(proc)
    assert "Traceback" not in err, err


def test_the_client_starts_again_when_its_generation_is_gone(tmp_path: Path, monkeypatch) -> None:
    """query_server pins the generation of its first answer; when the server no longer holds it (409), the
    run starts again from its first photo, so that every result comes from one generation."""
    from neardup.serve import client as client_mod

    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(product_photo(i)))
    asked: list[tuple[str | None, int]] = []
    gens = iter(["g1", "g2", "g2", "g2"])

    def info(self):
        return {"model": "phash", "threshold": 0.9, "limits": {"max_images": 1, "max_upload_mb": 20}}

    def query_files(self, files, k, verify, threshold, generation=None):
        asked.append((generation, len(files)))
        if generation == "g1" and len(asked) == 2:  # g1 replaced and released after the first answer
            raise client_mod.GenerationGone("generation g1 is no longer served")
        g = next(gens)
        return {"generation": g, "count": 3, "model": "phash", "threshold": 0.9, "verified": False,
                "results": [{"query": name, "error": None, "found": False, "matches": []} for name, _ in files]}

    monkeypatch.setattr(client_mod.Client, "info", info)
    monkeypatch.setattr(client_mod.Client, "query_files", query_files)
    got = client_mod.query_server("http://127.0.0.1:9/", [tmp_path])
    assert got.generations == ["g2"] and got.generation == "g2" and len(got.results) == 3
    assert [r.query for r in got.results] == [str(tmp_path / f"{i}.jpg") for i in range(3)]
    assert asked == [(None, 1), ("g1", 1), (None, 1), ("g2", 1), ("g2", 1)], asked


def test_answer_has_one_json_form_that_reads_back() -> None:
    """Answer.to_json is what /v1/query sends and `query --json` prints; from_json (the client) reads it back
    to the same answer, verdicts included."""
    from neardup.search.query import Answer, Match, QueryResult

    near = [Match(1, 0.97, 4, "imgs/x.jpg", True, 41), Match(2, 0.95, 7, "imgs/y.jpg", False, 3)]
    results = [QueryResult("a.jpg", near, verified=True, threshold=0.9),
               QueryResult("b.jpg", error="not a recognised image format", threshold=0.9)]
    a = Answer("catalog.h5", "g1", 20, "phash", 0.9, True, results, "none")
    doc = json.loads(json.dumps(a.to_json()))
    assert list(doc) == ["store", "generation", "count", "model", "weights", "threshold", "verified", "results"]
    assert doc["results"][0] == {"query": "a.jpg", "error": None, "found": True, "matches": [
        {"rank": 1, "id": 4, "path": "imgs/x.jpg", "score": 0.97, "verified": True, "inliers": 41, "match": True,
             "decision": None, "keeper": None},
        {"rank": 2, "id": 7, "path": "imgs/y.jpg", "score": 0.95, "verified": False, "inliers": 3, "match": False,
             "decision": None, "keeper": None}]}
    assert doc["results"][1]["found"] is None and doc["results"][1]["error"]
    back = Answer.from_json(doc)
    assert back == a
