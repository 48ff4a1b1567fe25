"""Serve stage 2a, guard: the service's options and the limits every request meets before a route runs.

`Guard`, a plain ASGI middleware: the Host (DNS rebinding), the bearer token, the declared body size, the
uploads a client may have coming at once and the upload bytes of all, the request timeout (a slow upload
included), and only then, its upload whole, the queries admitted at once (503 with Retry-After beyond): slow
uploads wait outside, never in a query's place. Every error is JSON `{"error": {"code", "message"}}`.
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
STATIC = {"app.js": "text/javascript", "app.css": "text/css", "favicon.svg": "image/svg+xml"}
#: Paths answered without the token: the health check, and the page and its files, which hold no data (every
#: call the page makes for data sends the token).
OPEN_PATHS = {"/v1/health", "/", *(f"/static/{name}" for name in STATIC)}
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
    max_uploads_per_client: int = SERVE.max_uploads_per_client
    header_timeout_s: float = SERVE.header_timeout_s
    max_connections: int = SERVE.max_connections
    max_request_pixels: int = SERVE.max_request_pixels
    max_inflight_pixels: int = SERVE.max_inflight_pixels

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
        self.pending_bytes = 0  #: declared bodies of the uploads coming or held: the memory they may hold
        self.uploading: dict[str, int] = {}  #: client address -> its uploads still coming
        self.active = 0  #: other requests in progress (thumbnails, images, info)

    async def _reply(self, send: Any, resp: JSONResponse) -> None:
        await resp({"type": "http"}, None, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = _with_headers(send)
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
        if self.uploading.get(client, 0) >= opts.max_uploads_per_client:
            return await self._reply(send, error_response(
                503, "overloaded", f"{opts.max_uploads_per_client} uploads of this client are still coming; send the "
                f"next when one has arrived", {"Retry-After": "1"}))
        if self.pending_bytes and self.pending_bytes + size > opts.max_inflight_bytes:
            return await self._reply(send, _overloaded(self.pending))
        self.pending_bytes += size
        self.uploading[client] = self.uploading.get(client, 0) + 1
        held, admitted, coming = True, False, True

        def release() -> None:  # once: when the answer's last byte is sent (the client may ask again at once)
            nonlocal held, admitted
            if held:
                held = False
                self.pending_bytes -= size
            if admitted:
                admitted = False
                self.pending -= 1

        def arrived() -> bool:  # the upload is whole: admit the query, or say the server is full
            nonlocal admitted, coming
            coming = False
            self._done_uploading(client)
            if self.pending >= opts.max_pending:
                return False
            self.pending, admitted = self.pending + 1, True
            return True

        try:
            await self._timed(scope, receive, send, release, arrived)
        finally:
            if coming:  # given up, or timed out, before the upload was whole
                self._done_uploading(client)
            release()

    def _done_uploading(self, client: str) -> None:
        """One upload of `client` is no longer coming (arrived, or given up)."""
        n = self.uploading.get(client, 0) - 1
        if n > 0:
            self.uploading[client] = n
        else:
            self.uploading.pop(client, None)

    async def _timed(self, scope: dict, receive: Any, send: Any, answered: Any = None, arrived: Any = None) -> None:
        """Run the app with the request timeout: 408 when the upload was still coming, else 503. `answered()`
        is called when the response's last part is about to be sent. With `arrived`, the whole body is read
        first (within the timeout), then `arrived()` says whether the request is admitted (else 503), and the
        app reads the body from memory."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.request_timeout_s
        if arrived is not None:
            try:
                body = await asyncio.wait_for(_read_body(receive), self.opts.request_timeout_s)
            except asyncio.TimeoutError:
                return await self._reply(send, error_response(
                    408, "request_timeout", f"the upload did not finish in {self.opts.request_timeout_s:g} s",
                    {"Connection": "close"}))
            if body is None:  # the client went away
                return
            if not arrived():
                return await self._reply(send, _overloaded(self.pending))
            receive = _replay(body, receive)
        state = {"done": arrived is not None, "started": False}

        async def watched_receive() -> dict:
            msg = await receive()
            state["done"] = msg["type"] != "http.request" or not msg.get("more_body", False)
            return msg

        async def watched_send(msg: dict) -> None:
            state["started"] = True
            if answered is not None and msg["type"] == "http.response.body" and not msg.get("more_body", False):
                answered()
            await send(msg)

        timeout = self.opts.request_timeout_s
        try:
            await asyncio.wait_for(self.app(scope, watched_receive, watched_send), max(0.001, deadline - loop.time()))
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11; another class in 3.10
            if state["started"]:
                return
            if state["done"] or scope["method"] != "POST":
                await self._reply(send, error_response(503, "timeout", f"the request took longer than {timeout:g} s; "
                                                       "retry", {"Retry-After": "1"}))
            else:
                await self._reply(send, error_response(408, "request_timeout", f"the upload did not finish in "
                                                       f"{timeout:g} s", {"Connection": "close"}))


async def _read_body(receive: Any) -> list[dict] | None:
    """The request's body messages, read whole (None: the client disconnected first)."""
    messages = []
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            return None
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
