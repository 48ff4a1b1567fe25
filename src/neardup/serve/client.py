"""Serve stage 3, client: `neardup query --server URL` asks a running `neardup serve` instead of loading a model.

Only the standard library speaks HTTP here (urllib, a multipart body built by hand): the client starts in a
fraction of a second, which is the point of asking a warm server.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import DEFAULTS
from ..embed.decode import read_bytes
from ..embed.discover import discover
from ..errors import DecodeError, InputError, ServerError
from ..search.query import Answer, QueryResult

#: Retries of a request the server answered 503 with Retry-After (overloaded), each after the time it asks.
RETRIES = 5
#: Runs started again from the first photo when the generation they were pinned to is no longer served.
RESTARTS = 2


class GenerationGone(ServerError):
    """The generation a run was pinned to is no longer served (409 generation_gone)."""


@dataclass
class ServerAnswer(Answer):
    """The Answer of photos queried on a server (its results in the order asked), and where it came from."""

    server: str = ""
    generations: list[str] = field(default_factory=list)  #: the generations that answered (one, when pinned)

    def to_json(self) -> dict:
        """Answer.to_json, with the server asked and the generations that answered."""
        return {"server": self.server, **super().to_json(), "generations": self.generations}


class Client:
    """A connection to a `neardup serve` at `url` (http://host:port/, optionally with a path prefix)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise InputError(f"--server must be an http:// or https:// URL, got {url!r}")
        if token is not None and (not token or not token.isascii() or not token.isprintable()):
            raise InputError("the token (--token / NEARDUP_TOKEN) must be non-empty printable ASCII")
        self.url = url.rstrip("/") + "/"
        self.token, self.timeout = token, timeout

    def _request(self, path: str, data: bytes | None = None, content_type: str | None = None) -> dict:
        req = urllib.request.Request(urllib.parse.urljoin(self.url, path), data=data,
                                     method="POST" if data is not None else "GET")
        if content_type:
            req.add_header("Content-Type", content_type)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        for attempt in range(RETRIES + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                wait = exc.headers.get("Retry-After", "")
                if exc.code != 503 or not wait.isdigit() or attempt == RETRIES:
                    return self._refused(exc)
                exc.close()
                time.sleep(min(int(wait), 30))  # busy: come back when it says
            except (urllib.error.URLError, OSError, ValueError) as exc:
                why = getattr(exc, "reason", exc)
                raise ServerError(f"cannot reach the query server at {self.url}: {why}") from None
        raise AssertionError("unreachable")

    def _refused(self, exc: urllib.error.HTTPError) -> dict:
        try:
            body = json.loads(exc.read())
        except (ValueError, OSError):
            body = {}
        err = body.get("error", {}) if isinstance(body, dict) else {}
        if err.get("code") == "bad_image" and "images" in err:
            return {"failed": err["images"]}
        if exc.code == 409 and err.get("code") == "generation_gone":
            raise GenerationGone(err.get("message", "the generation is no longer served")) from None
        raise ServerError(f"{self.url} answered {exc.code} ({err.get('code', exc.reason)}): "
                          f"{err.get('message', '')}".rstrip(": ")) from None

    def info(self) -> dict:
        """GET /v1/info: the store, model, threshold and limits."""
        return self._request("v1/info")

    def query_files(self, files: Sequence[tuple[str, bytes]], k: int = DEFAULTS.k,
                    verify: bool | None = None, threshold: float | None = None, generation: str | None = None) -> dict:
        """POST /v1/query with (name, bytes) photos, answered from `generation` when given (GenerationGone when
        the server no longer holds it); the response's JSON ({"failed": [...]} when none could be read)."""
        boundary = uuid.uuid4().hex
        parts = []
        for name, data in files:
            safe = name.replace('"', "%22").replace("\r", "").replace("\n", "")
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{safe}"\r\n'
                         f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        params = {"k": k} | ({} if verify is None else {"verify": str(verify).lower()}) | (
            {} if threshold is None else {"threshold": threshold}) | (
            {} if generation is None else {"generation": generation})
        return self._request("v1/query?" + urllib.parse.urlencode(params), body,
                             f"multipart/form-data; boundary={boundary}")


def query_server(url: str, images: Sequence[str | os.PathLike[str]], *, k: int = DEFAULTS.k,
                 token: str | None = None, verify: bool | None = None, threshold: float | None = None,
                 max_file_bytes: int = DEFAULTS.max_file_bytes, timeout: float = 60.0) -> ServerAnswer:
    """Query image files (folders are expanded) on a running `neardup serve`, in requests of at most the
    server's image count, every one answered from the generation of the first answer (pinned: when the server
    replaced it and no longer holds it, the run starts again, at most RESTARTS times); `threshold` (default:
    the server's) is the server's to apply. Unreadable files and photos the server could not decode come back
    with an error. Raises ServerError (unreachable, refused, the generation changed under every try) or
    InputError."""
    client = Client(url, token, timeout)
    paths = [str(p) for p in discover(images)]
    for attempt in range(RESTARTS + 1):
        try:
            return _run(client, paths, k=k, verify=verify, threshold=threshold, max_file_bytes=max_file_bytes)
        except GenerationGone as exc:
            if attempt == RESTARTS:
                raise ServerError(f"{client.url} published a new store generation during each of {RESTARTS + 1} "
                                  f"runs, and no longer holds the one they started with ({exc}); run again")
    raise AssertionError("unreachable")


def _run(client: Client, paths: list[str], *, k: int, verify: bool | None, threshold: float | None,
         max_file_bytes: int) -> ServerAnswer:
    """One run of query_server over `paths`, pinned to the generation of its first answer."""
    info = client.info()
    limits = info.get("limits", {})
    per_request = max(1, int(limits.get("max_images", 1)))
    cap = min(max_file_bytes, int(limits.get("max_upload_mb", 1 << 20)) << 20)
    results: dict[str, QueryResult] = {}
    last: Answer | None = None
    generations: list[str] = []
    t = float(info["threshold"]) if threshold is None else threshold  # until an answer says what it used
    for at in range(0, len(paths), per_request):
        chunk: list[tuple[str, bytes]] = []  # read just before sending: a whole folder is never held at once
        for p in paths[at:at + per_request]:
            try:
                chunk.append((p, read_bytes(p, cap)))
            except DecodeError as exc:
                results[p] = QueryResult(p, error=str(exc), threshold=t)
        if not chunk:
            continue
        doc = client.query_files([(Path(p).name, data) for p, data in chunk], k, verify, threshold,
                                 generations[0] if generations else None)
        if "failed" in doc:
            results.update({p: QueryResult(p, error=f["error"], threshold=t)
                            for (p, _), f in zip(chunk, doc["failed"])})
            continue
        got = Answer.from_json(doc)
        t, last = got.threshold, got
        if got.generation not in generations:
            generations.append(got.generation)
        for (p, _), r in zip(chunk, got.results):
            results[p] = replace(r, query=p)  # the server saw the file's name; the caller asked by its path
    return ServerAnswer(str(info.get("store", "")), generations[0] if generations else str(info.get("generation", "")),
                        last.count if last else int(info.get("count", 0)), str(info["model"]), t,
                        any(r.verified for r in results.values()), [results[p] for p in paths],
                        last.weights if last else "", server=client.url, generations=generations)
