"""Serve, guard: the service's options and the limits every request meets before a route runs.

`Guard`, a plain ASGI middleware: the Host (DNS rebinding), the bearer token, the declared body size, the
upload bytes held (counted as they arrive, per client: a declared length reserves nothing, and a client over
its share of a full budget is refused, not the others), the request timeout (a slow upload included), and
only then, its upload whole, the queries admitted at once (503 with Retry-After beyond): slow uploads wait
outside, never in a query's place. A query whose client goes away, or that times out, is cancelled, and with
it its queued work. Every error is JSON `{"error": {"code", "message"}}`.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse

from ..config import DEFAULTS, SERVE
from ..errors import InputError

#: The page's own files (package data in static/), the only files served besides indexed images.
STATIC = {"api.js": "text/javascript", "app.js": "text/javascript", "app.css": "text/css",
          "favicon.svg": "image/svg+xml", "review.js": "text/javascript", "review.css": "text/css"}
#: Paths answered without the token: the health check, and the page and its files, which hold no data (every
#: call the page makes for data sends the token).
OPEN_PATHS = {"/v1/health", "/", "/review", *(f"/static/{name}" for name in STATIC)}
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "Cross-Origin-Resource-Policy": "same-origin"}
_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
          408: "request_timeout", 411: "length_required", 413: "too_large", 415: "unsupported_media_type",
          422: "invalid_request", 503: "unavailable"}


@dataclass(frozen=True)
class ServeOptions:
    """How `neardup serve` runs (the CLI's options; defaults in config.SERVE)."""

    store: str = DEFAULTS.store
    host: str = SERVE.host
    port: int = SERVE.port
    token: str | None = None
    weights: str | None = None
    runtime: str | None = None
    max_upload_mb: int = SERVE.max_upload_mb
    max_images: int = SERVE.max_images
    max_pixels: int = SERVE.max_pixels
    max_pending: int = SERVE.max_pending
    request_timeout_s: float = SERVE.request_timeout_s
    max_batch: int = SERVE.max_batch
    batch_wait_ms: float = SERVE.batch_wait_ms
    reload_poll_s: float = SERVE.reload_poll_s
    local_cache_mb: int = SERVE.local_cache_mb
    max_inflight_mb: int = SERVE.max_inflight_mb
    allowed_hosts: tuple[str, ...] = ()
    #: Addresses whose X-Forwarded-For/-Proto headers are trusted (uvicorn's forwarded_allow_ips): none by
    #: default, so a client cannot pick the address it is counted as.
    forwarded_allow_ips: str | None = None
    header_timeout_s: float = SERVE.header_timeout_s
    max_connections: int = SERVE.max_connections
    max_request_pixels: int = SERVE.max_request_pixels
    max_inflight_pixels: int = SERVE.max_inflight_pixels
    max_verify_pairs: int = SERVE.max_verify_pairs
    open_timeout_s: float = SERVE.open_timeout_s

    @property
    def max_inflight_bytes(self) -> int:
        """The upload bytes that requests in progress may hold together."""
        return self.max_inflight_mb << 20

    @property
    def max_body(self) -> int:
        """The largest request body: every image at its cap, plus room for the multipart framing."""
        return self.max_images * (self.max_upload_mb << 20) + (64 << 10)


class ApiError(Exception):
    """An error answered as JSON with an HTTP status and a stable code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 **details: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.details = status, code, message, headers or {}, details


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None,
                   **details: Any) -> JSONResponse:
    """The JSON error body: {"error": {"code", "message", and any details}}."""
    return JSONResponse({"error": {"code": code, "message": message, **details}}, status_code=status,
                        headers={**SECURITY_HEADERS, **(headers or {})})


def check_token(token: str | None) -> None:
    """Refuse (InputError) a token that is set but empty or not printable ASCII: an empty NEARDUP_TOKEN would
    otherwise turn authentication off silently, and HTTP headers carry ASCII."""
    if token is not None and (not token or not token.isascii() or not token.isprintable() or " " in token):
        raise InputError("the token (--token / NEARDUP_TOKEN) must be non-empty printable ASCII without spaces")


def allowed_hosts(opts: ServeOptions) -> frozenset[str] | None:
    """Host names requests may name (None: any). Bound to a loopback address, only loopback names and the
    --allowed-host ones: a web page elsewhere cannot reach the service by re-pointing its own name at
    127.0.0.1 (DNS rebinding). Bound elsewhere, any host unless --allowed-host names them."""
    loopback = {"127.0.0.1", "localhost", "::1"}
    if opts.allowed_hosts:
        return frozenset(loopback | {h.lower() for h in opts.allowed_hosts})
    return frozenset(loopback | {opts.host.lower()}) if is_loopback(opts.host) else None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _host_name(header: bytes) -> str:
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _authorized(header: bytes, token: str) -> bool:
    scheme, _, value = header.decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode("latin-1"), token.encode())


class Guard:
    """ASGI middleware: host, token, body cap, admission and timeout; see the module doc."""

    def __init__(self, app: Any, opts: ServeOptions) -> None:
        self.app, self.opts = app, opts
        self.hosts = allowed_hosts(opts)
        self.pending = 0  #: /v1/query requests in progress, their uploads whole
        self.received = 0  #: upload bytes received and held by requests in progress: the memory they hold
        self.held_by: dict[str, int] = {}  #: client address -> its share of `received`
        self.active = 0  #: other requests in progress (thumbnails, images, info)

    def counts(self) -> dict[str, int]:
        """What the requests in progress hold: queries admitted, upload bytes received, clients holding them."""
        return {"queries": self.pending, "upload_bytes": self.received, "upload_clients": len(self.held_by),
                "other_requests": self.active}

    async def _reply(self, send: Any, resp: JSONResponse) -> None:
        await resp({"type": "http"}, None, send)  # type: ignore[arg-type]  # a response never calls receive

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = _with_headers(send)
        scope.setdefault("state", {})["guard"] = self  # /v1/info reports its counts
        opts, path, headers = self.opts, scope["path"], dict(scope["headers"])
        if self.hosts is not None and _host_name(headers.get(b"host", b"")) not in self.hosts:
            return await self._reply(send, error_response(
                400, "host_not_allowed", "this Host is not served (start neardup serve with --allowed-host NAME "
                "to serve it behind a proxy that keeps the client's Host)"))
        if opts.token and path not in OPEN_PATHS and not _authorized(headers.get(b"authorization", b""), opts.token):
            return await self._reply(send, error_response(
                401, "unauthorized", "a bearer token is required: send 'Authorization: Bearer TOKEN'",
                {"WWW-Authenticate": "Bearer"}))
        if path in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if path != "/v1/query" or scope["method"] != "POST":
            if self.active >= 4 * opts.max_pending:
                return await self._reply(send, _overloaded(self.active))
            self.active += 1
            try:
                return await self._timed(scope, receive, send)
            finally:
                self.active -= 1
        length = headers.get(b"content-length", b"")
        if not length.isdigit():
            return await self._reply(send, error_response(
                411, "length_required", "send the upload with a Content-Length (chunked uploads are not accepted)",
                {"Connection": "close"}))
        size = int(length)
        if size > opts.max_body:
            return await self._reply(send, error_response(
                413, "too_large", f"the request is larger than {opts.max_body} bytes ({opts.max_images} images of "
                f"at most {opts.max_upload_mb} MiB)", {"Connection": "close"}))
        client = (scope.get("client") or ("?", 0))[0]
        taken, admitted = 0, False

        def take(n: int) -> str | None:  # n more bytes of this upload arrived: hold them, or say why not
            nonlocal taken
            cap, mine = opts.max_inflight_bytes, self.held_by.get(client, 0)
            if self.received + n > cap:  # full: a request alone may go on, clients up to an equal share
                share = cap // (len(self.held_by) + (client not in self.held_by))
                alone = self.received == taken
                if (not alone and mine + n > share) or self.received + n > 2 * max(cap, opts.max_body):
                    return (f"the uploads in progress hold {self.received >> 20} MiB (this client's "
                            f"{mine >> 20} MiB of them); retry shortly")
            self.received += n
            self.held_by[client] = mine + n
            taken += n
            return None

        def release() -> None:  # once: when the answer's last byte is sent (the client may ask again at once)
            nonlocal taken, admitted
            if taken:
                self.received -= taken
                left = self.held_by.get(client, 0) - taken
                if left > 0:
                    self.held_by[client] = left
                else:
                    self.held_by.pop(client, None)
                taken = 0
            if admitted:
                admitted = False
                self.pending -= 1

        def arrived() -> bool:  # the upload is whole: admit the query, or say the server is full
            nonlocal admitted
            if self.pending >= opts.max_pending:
                return False
            self.pending, admitted = self.pending + 1, True
            return True

        try:
            await self._timed(scope, receive, send, release, arrived, take)
        finally:
            release()

    async def _timed(self, scope: dict, receive: Any, send: Any, answered: Any = None, arrived: Any = None,
                     take: Any = None) -> None:
        """Run the app with the request timeout: 408 when the upload was still coming, else 503. `answered()`
        is called when the response's last part is about to be sent. With `arrived`, the whole body is read
        first (within the timeout; `take(n)` holds each part's bytes, or says why not: 503), then `arrived()`
        says whether the request is admitted (else 503), and the app reads the body from memory; if the
        client goes away before its answer, the app is cancelled (and with it the request's queued work)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.request_timeout_s
        raw_receive = receive
        if arrived is not None:
            try:
                body = await asyncio.wait_for(_read_body(receive, take), self.opts.request_timeout_s)
            except asyncio.TimeoutError:
                return await self._reply(send, error_response(
                    408, "request_timeout", f"the upload did not finish in {self.opts.request_timeout_s:g} s",
                    {"Connection": "close"}))
            except _Full as exc:
                return await self._reply(send, error_response(503, "overloaded", str(exc), {"Retry-After": "1",
                                                                                         "Connection": "close"}))
            if body is None:  # the client went away
                return
            if not arrived():
                return await self._reply(send, _overloaded(self.pending))
            receive = _replay(body, receive)
        state = {"done": arrived is not None, "started": False, "finished": False}

        async def watched_receive() -> dict:
            msg = await receive()
            state["done"] = msg["type"] != "http.request" or not msg.get("more_body", False)
            return msg

        async def watched_send(msg: dict) -> None:
            state["started"] = True
            if msg["type"] == "http.response.body" and not msg.get("more_body", False):
                state["finished"] = True
                if answered is not None:
                    answered()
            await send(msg)

        task = asyncio.ensure_future(self.app(scope, watched_receive, watched_send))
        gone = False

        async def watch() -> None:  # the body was read whole: the connection's next message is its end
            nonlocal gone
            while (await raw_receive())["type"] == "http.request":
                pass
            if not state["finished"]:
                gone = True
                task.cancel()

        watcher = asyncio.ensure_future(watch()) if arrived is not None else None
        timeout = self.opts.request_timeout_s
        try:
            await asyncio.wait_for(task, max(0.001, deadline - loop.time()))
        except asyncio.CancelledError:
            if gone:  # the client went away: nobody to answer
                return
            raise
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11; another class in 3.10
            if state["started"]:
                return
            if state["done"] or scope["method"] != "POST":
                await self._reply(send, error_response(503, "timeout", f"the request took longer than {timeout:g} s; "
                                                       "retry", {"Retry-After": "1"}))
            else:
                await self._reply(send, error_response(408, "request_timeout", f"the upload did not finish in "
                                                       f"{timeout:g} s", {"Connection": "close"}))
        finally:
            if watcher is not None:
                watcher.cancel()


class _Full(Exception):
    """An upload refused part-way: the bytes it would hold are over its client's share of a full budget."""


async def _read_body(receive: Any, take: Any) -> list[dict] | None:
    """The request's body messages, read whole, each part held by `take` (None: the client disconnected
    first; _Full: refused part-way)."""
    messages = []
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            return None
        why = take(len(msg.get("body", b"")))
        if why is not None:
            raise _Full(why)
        messages.append(msg)
        if not msg.get("more_body", False):
            return messages


def _replay(messages: list[dict], receive: Any) -> Any:
    """A receive() that gives the body read already, then waits on the connection (for its disconnect)."""
    queue = list(messages)

    async def replay() -> dict:
        return queue.pop(0) if queue else await receive()
    return replay


def _overloaded(n: int) -> JSONResponse:
    return error_response(503, "overloaded", f"{n} requests are in progress; retry shortly", {"Retry-After": "1"})


_RAW_HEADERS = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]


def _with_headers(send: Any) -> Any:
    """`send` that adds SECURITY_HEADERS to every response that does not set them itself."""
    async def wrapped(msg: dict) -> None:
        if msg["type"] == "http.response.start":
            have = {k for k, _ in msg.get("headers", [])}
            msg = {**msg, "headers": [*msg.get("headers", []), *(h for h in _RAW_HEADERS if h[0] not in have)]}
        await send(msg)
    return wrapped
