"""Serve stage 2, app: the HTTP API and the web page of `neardup serve` (FastAPI on uvicorn).

FastAPI was measured against Litestar (benchmarks/bench_asgi.py, RESULTS.md): on an upload endpoint that does
no work, Litestar answered 1.23x the requests (1,188 against 970 a second: ~0.2 ms less a request), while a
verified query costs ~37 ms; FastAPI's typed routes give the OpenAPI schema and its validation errors for free,
and it is the framework most users already run.

Every error is JSON `{"error": {"code": ..., "message": ...}}` with a stable code and a status that means
what it says. `Guard`, a plain ASGI middleware, enforces the limits before a route runs: the Host (DNS
rebinding), the bearer token, the declared body size, the queries and upload bytes admitted at once (503 with
Retry-After beyond) and the request timeout (a slow upload included).
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import mimetypes
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from functools import partial
from importlib import resources
from typing import Annotated, Any, Optional

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi import Path as FastApiPath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import DEFAULTS, SERVE, VERSION, resolve_threshold
from ..errors import DecodeError, InputError, StoreError
from ..search.query import QueryResult
from .service import Answer, LiveStore, QueryService, Upload

log = logging.getLogger(__name__)

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
        self.pending = 0  #: /v1/query requests in progress
        self.pending_bytes = 0  #: their declared bodies: the memory they may hold
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
        if path == "/v1/health" or path in OPEN_PATHS:
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
        if self.pending >= opts.max_pending or (self.pending and self.pending_bytes + size > opts.max_inflight_bytes):
            return await self._reply(send, _overloaded(self.pending))
        self.pending, self.pending_bytes = self.pending + 1, self.pending_bytes + size
        held = True

        def release() -> None:  # once: when the answer's last byte is sent (the client may ask again at once)
            nonlocal held
            if held:
                held = False
                self.pending, self.pending_bytes = self.pending - 1, self.pending_bytes - size

        try:
            await self._timed(scope, receive, send, release)
        finally:
            release()

    async def _timed(self, scope: dict, receive: Any, send: Any, answered: Any = None) -> None:
        """Run the app with the request timeout: 408 when the upload was still coming, else 503. `answered()`
        is called when the response's last part is about to be sent."""
        state = {"done": False, "started": False}

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
            await asyncio.wait_for(self.app(scope, watched_receive, watched_send), timeout)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11; another class in 3.10
            if state["started"]:
                return
            if state["done"] or scope["method"] != "POST":
                await self._reply(send, error_response(503, "timeout", f"the request took longer than {timeout:g} s; "
                                                       "retry", {"Retry-After": "1"}))
            else:
                await self._reply(send, error_response(408, "request_timeout", f"the upload did not finish in "
                                                       f"{timeout:g} s", {"Connection": "close"}))


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


def _static(name: str) -> str:
    return resources.files("neardup.serve").joinpath("static", name).read_text(encoding="utf-8")


def answer_json(a: Answer) -> dict:
    """The JSON of /v1/query (and of `neardup query --json`'s rows): each match with its verdict."""
    def match(r: QueryResult, m: Any) -> dict:
        return {"rank": m.rank, "id": m.id, "path": m.path, "score": round(m.score, 6), "verified": m.verified,
                "inliers": m.inliers, "match": r.is_match(m, a.threshold)}
    return {"generation": a.generation, "count": a.count, "model": a.model, "threshold": a.threshold,
            "verified": a.verified,
            "results": [{"name": r.query, "error": r.error, "found": None if r.error else r.found(a.threshold),
                         "matches": [match(r, m) for m in r.matches]} for r in a.results]}


#: A catalogue id as the store keeps it (int64, never negative).
PhotoId = Annotated[int, FastApiPath(ge=0, le=2**63 - 1, description="The photo's id in the store.")]


def create_app(opts: ServeOptions, service: QueryService | None = None) -> FastAPI:
    """The ASGI app serving `opts.store` (or an already built `service`). Raises InputError for a bad token."""
    check_token(opts.token)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = service or QueryService(LiveStore(opts.store, weights=opts.weights, runtime=opts.runtime,
                                                poll_s=opts.reload_poll_s, local_cache_mb=opts.local_cache_mb),
                                      max_batch=opts.max_batch, batch_wait_ms=opts.batch_wait_ms,
                                      max_pixels=opts.max_pixels)
        svc.live.start()
        app.state.service = svc
        yield
        svc.close()

    app = FastAPI(title="neardup", version=VERSION, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/v1/openapi.json",
                  description="Is this photo already in the catalogue? Near-duplicate search over a neardup store.")
    app.add_middleware(Guard, opts=opts)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers, **exc.details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, _CODES.get(exc.status_code, "error"), str(exc.detail),
                              getattr(exc, "headers", None))  # 405 keeps its Allow

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error_response(422, "invalid_request", where or "invalid request")

    @app.exception_handler(StoreError)
    async def _store(request: Request, exc: StoreError) -> JSONResponse:  # damage found on a read: never served
        log.error("%s", exc)
        return error_response(503, "store_damaged", str(exc))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return error_response(500, "internal", f"internal error ({type(exc).__name__}); see the server's log")

    def svc(request: Request) -> QueryService:
        return request.app.state.service

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return Response(_static("index.html"), media_type="text/html; charset=utf-8",
                        headers={**SECURITY_HEADERS, "Content-Security-Policy": PAGE_CSP})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC:
            raise ApiError(404, "not_found", "no such file")
        return Response(_static(name), media_type=STATIC[name], headers=SECURITY_HEADERS)

    @app.get("/v1/health", summary="Liveness and the generation being served")
    async def health(request: Request) -> dict:
        return {"status": "ok", "generation": svc(request).live.current.id}

    @app.get("/v1/info", summary="The store, model, threshold, limits and batching")
    async def info(request: Request) -> dict:
        s = svc(request)
        gen = s.live.current
        m = gen.searcher.meta
        return {"version": VERSION, "store": s.live.path.name, "generation": gen.id, "count": len(gen.searcher.cat),
                "model": m.model, "dim": m.dim, "threshold": resolve_threshold(None, m.model),
                "verify": bool(m.local_features), "updated": m.updated, "loaded_at": gen.loaded_at,
                "reloads": s.live.reloads, "reload_error": s.live.reload_error, "k": DEFAULTS.k,
                "batching": {**asdict(s.batcher.stats), "max_batch": opts.max_batch, "wait_ms": opts.batch_wait_ms},
                "local_cache": gen.searcher.cache_info(),
                "limits": {"max_upload_mb": opts.max_upload_mb, "max_images": opts.max_images,
                           "max_pixels": opts.max_pixels, "max_pending": opts.max_pending,
                           "max_inflight_mb": opts.max_inflight_mb,
                           "request_timeout_s": opts.request_timeout_s}}

    @app.post("/v1/query", summary="Look up photos in the catalogue")
    async def query(request: Request,
                    image: Annotated[list[UploadFile], File(description="One or more photos.")],
                    k: Annotated[int, Query(ge=1, le=100, description="Neighbours per photo.")] = DEFAULTS.k,
                    verify: Annotated[Optional[bool], Query(description="Verify geometrically [default: when "
                                                            "the store caches local features].")] = None,
                    threshold: Annotated[Optional[float], Query(ge=-1, le=1, description="Cosine threshold "
                                                                "[default: the model's].")] = None) -> dict:
        if not image:
            raise ApiError(422, "no_images", "send at least one photo as multipart field 'image'")
        if len(image) > opts.max_images:
            raise ApiError(413, "too_many_images", f"{len(image)} images; at most {opts.max_images} per request")
        cap = opts.max_upload_mb << 20
        uploads = []
        for f in image:
            if f.size is not None and f.size > cap:
                raise ApiError(413, "file_too_large", f"{f.filename or 'an image'} is larger than "
                               f"{opts.max_upload_mb} MiB")
            uploads.append(Upload(f.filename or "upload", await f.read()))
        answer = await svc(request).query(uploads, k, verify=verify, threshold=threshold)
        if all(r.error for r in answer.results):
            first = answer.results[0]
            raise ApiError(422, "bad_image", f"{first.query}: {first.error}" if len(uploads) == 1 else
                           "no photo could be read: " + "; ".join(f"{r.query}: {r.error}" for r in answer.results),
                           images=[{"name": r.query, "error": r.error} for r in answer.results])
        return answer_json(answer)

    async def _in_thread(request: Request, fn: Any, *args: Any) -> Any:
        s = svc(request)
        with s.live.use() as gen:
            try:
                return await asyncio.get_running_loop().run_in_executor(s.files, partial(s.live.held, gen, fn, gen,
                                                                                         *args))
            except LookupError as exc:
                raise ApiError(404, "not_found", str(exc)) from None
            except FileNotFoundError as exc:
                raise ApiError(404, "image_gone", str(exc)) from None
            except DecodeError as exc:
                raise ApiError(422, "bad_image", str(exc)) from None

    @app.get("/v1/images/{id}", summary="An indexed photo, by id", response_class=FileResponse)
    async def image_file(request: Request, id: PhotoId) -> Response:
        path = await _in_thread(request, svc(request).image_path, id)
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=kind if kind.startswith("image/") else "application/octet-stream",
                            headers={**SECURITY_HEADERS, "Content-Security-Policy": "default-src 'none'"})

    @app.get("/v1/thumbs/{id}", summary="A JPEG thumbnail of an indexed photo, by id")
    async def thumb(request: Request, id: PhotoId) -> Response:
        data = await _in_thread(request, svc(request).thumbnail, id)
        return Response(data, media_type="image/jpeg", headers={**SECURITY_HEADERS, "Cache-Control": "max-age=300"})

    return app

