"""Serve stage 2, app: the HTTP API and the web page of `neardup serve` (FastAPI on uvicorn).

FastAPI was measured against Litestar (benchmarks/bench_asgi.py, RESULTS.md): on an upload endpoint that does
no work, Litestar answered 1.23x the requests (1,188 against 970 a second: ~0.2 ms less a request), while a
verified query costs ~37 ms; FastAPI's typed routes give the OpenAPI schema and its validation errors for free,
and it is the framework most users already run.

Every error is JSON `{"error": {"code": ..., "message": ...}}` with a stable code and a status that means
what it says. `Guard`, a plain ASGI middleware, enforces the limits before a route runs: the bearer token, the
request body cap (also for chunked uploads), the bounded number of requests admitted at once (503 with
Retry-After beyond) and the request timeout (a slow upload included).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import mimetypes
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Annotated, Any, Optional

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import DEFAULTS, SERVE, VERSION, resolve_threshold
from ..errors import DecodeError
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
          408: "request_timeout", 413: "too_large", 415: "unsupported_media_type", 422: "invalid_request",
          503: "unavailable"}


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


class Guard:
    """ASGI middleware: token, body cap, admission (bounded pending requests) and timeout; see the module doc."""

    def __init__(self, app: Any, opts: ServeOptions) -> None:
        self.app, self.opts = app, opts
        self.pending = 0

    async def _reply(self, send: Any, resp: JSONResponse) -> None:
        await resp({"type": "http"}, None, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = _with_headers(send)
        opts, path = self.opts, scope["path"]
        if opts.token and path not in OPEN_PATHS:
            got = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(got.encode(), f"Bearer {opts.token}".encode()):
                return await self._reply(send, error_response(
                    401, "unauthorized", "a bearer token is required: send 'Authorization: Bearer TOKEN'",
                    {"WWW-Authenticate": "Bearer"}))
        if path != "/v1/query":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > opts.max_body:
            return await self._reply(send, error_response(
                413, "too_large", f"the request is larger than {opts.max_body} bytes ({opts.max_images} images "
                f"of at most {opts.max_upload_mb} MiB)", {"Connection": "close"}))
        if self.pending >= opts.max_pending:
            return await self._reply(send, error_response(
                503, "overloaded", f"{self.pending} requests are in progress; retry shortly", {"Retry-After": "1"}))
        self.pending += 1
        state = {"received": 0, "done": False, "too_large": False, "started": False}

        async def counted_receive() -> dict:
            msg = await receive()
            if msg["type"] == "http.request":
                state["received"] += len(msg.get("body", b""))
                state["done"] = not msg.get("more_body", False)
                if state["received"] > opts.max_body:
                    state["too_large"] = True
                    raise ApiError(413, "too_large", f"the request is larger than {opts.max_body} bytes")
            return msg

        async def guarded_send(msg: dict) -> None:
            if state["too_large"]:
                return  # the route's answer to a cut-off body is replaced by the 413 below
            state["started"] = True
            await send(msg)

        try:
            async with asyncio.timeout(opts.request_timeout_s):
                await self.app(scope, counted_receive, guarded_send)
        except TimeoutError:
            if not state["started"]:
                if state["done"]:
                    await self._reply(send, error_response(
                        503, "timeout", f"the request took longer than {opts.request_timeout_s:g} s; retry"))
                else:
                    await self._reply(send, error_response(
                        408, "request_timeout", f"the upload did not finish in {opts.request_timeout_s:g} s",
                        {"Connection": "close"}))
        except ApiError:
            if not state["too_large"]:
                raise
        finally:
            self.pending -= 1
        if state["too_large"]:
            await self._reply(send, error_response(413, "too_large", f"the request is larger than {opts.max_body} "
                                                   f"bytes ({opts.max_images} images of at most "
                                                   f"{opts.max_upload_mb} MiB)", {"Connection": "close"}))


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
        ok = bool(m.verified) or ((not r.verified or m.verified is None) and m.score >= a.threshold)
        return {"rank": m.rank, "id": m.id, "path": m.path, "score": round(m.score, 6), "verified": m.verified,
                "inliers": m.inliers, "match": ok}
    return {"generation": a.generation, "count": a.count, "model": a.model, "threshold": a.threshold,
            "verified": a.verified,
            "results": [{"name": r.query, "error": r.error, "found": None if r.error else r.found(a.threshold),
                         "matches": [match(r, m) for m in r.matches]} for r in a.results]}


def create_app(opts: ServeOptions, service: QueryService | None = None) -> FastAPI:
    """The ASGI app serving `opts.store` (or an already built `service`)."""

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
        return error_response(exc.status_code, _CODES.get(exc.status_code, "error"), str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return error_response(422, "invalid_request", where or "invalid request")

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
                return await asyncio.get_running_loop().run_in_executor(None, fn, gen, *args)
            except LookupError as exc:
                raise ApiError(404, "not_found", str(exc)) from None
            except FileNotFoundError as exc:
                raise ApiError(404, "image_gone", str(exc)) from None
            except DecodeError as exc:
                raise ApiError(422, "bad_image", str(exc)) from None

    @app.get("/v1/images/{id}", summary="An indexed photo, by id", response_class=FileResponse)
    async def image_file(request: Request, id: int) -> Response:
        path = await _in_thread(request, svc(request).image_path, id)
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return FileResponse(path, media_type=kind if kind.startswith("image/") else "application/octet-stream",
                            headers={**SECURITY_HEADERS, "Content-Security-Policy": "default-src 'none'"})

    @app.get("/v1/thumbs/{id}", summary="A JPEG thumbnail of an indexed photo, by id")
    async def thumb(request: Request, id: int) -> Response:
        data = await _in_thread(request, svc(request).thumbnail, id)
        return Response(data, media_type="image/jpeg", headers={**SECURITY_HEADERS, "Cache-Control": "max-age=300"})

    return app

