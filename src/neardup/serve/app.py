"""Serve, app: the HTTP API and the web page of `neardup serve` (FastAPI on uvicorn).

FastAPI was measured against Litestar (benchmarks/bench_asgi.py, RESULTS.md): Litestar's lead on an upload
endpoint that does no work is small beside what a verified query costs; FastAPI's typed routes give the
OpenAPI schema and its validation errors for free, and it is the framework most users already run.

Every error is JSON `{"error": {"code": ..., "message": ...}}` with a stable code and a status that means
what it says. guard.py's `Guard` enforces the limits before a route runs.
"""
from __future__ import annotations

import asyncio
import logging
import mimetypes
from contextlib import asynccontextmanager
from dataclasses import asdict
from importlib import resources
from typing import Annotated, Any

from fastapi import FastAPI, File, Path as FastApiPath, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import DEFAULTS, VERSION
from ..embed.embedders import Embedder
from ..errors import DecodeError, StoreError
from .guard import (  # noqa: F401
    _CODES,
    OPEN_PATHS,
    PAGE_CSP,
    SECURITY_HEADERS,
    STATIC,
    ApiError,
    Guard,
    ServeOptions,
    check_token,
    error_response,
    is_loopback,
)
from .live import GenerationGone
from .protocol import quiet_accept_errors
from .review import add_review_routes
from .service import LiveStore, QueryService, Refused, Upload

log = logging.getLogger(__name__)

def _client(request: Request) -> str:
    """The address a request's work is counted for (fair.py): the peer's, or the proxy's forwarded one when
    --forwarded-allow-ips trusts it."""
    return request.client.host if request.client else "?"


def _static(name: str) -> str:
    return resources.files("neardup.serve").joinpath("static").joinpath(name).read_text(encoding="utf-8")


#: A catalogue id as the store keeps it (int64, never negative).
PhotoId = Annotated[int, FastApiPath(ge=0, le=2**63 - 1, description="The photo's id in the store.")]


def make_service(opts: ServeOptions, embedder: Embedder | None = None) -> QueryService:
    """The query service `opts` describe (loads the store's current generation and its model; `embedder`
    injects one, checked against the store's, for tests). The one place a QueryService is built."""
    return QueryService(LiveStore(opts.store, weights=opts.weights, runtime=opts.runtime, embedder=embedder,
                                  poll_s=opts.reload_poll_s, local_cache_mb=opts.local_cache_mb,
                                  open_timeout_s=opts.open_timeout_s),
                        max_batch=opts.max_batch, batch_wait_ms=opts.batch_wait_ms, max_pixels=opts.max_pixels,
                        max_request_pixels=opts.max_request_pixels, max_inflight_pixels=opts.max_inflight_pixels,
                        max_verify_pairs=opts.max_verify_pairs)


def create_app(opts: ServeOptions, service: QueryService | None = None) -> FastAPI:
    """The ASGI app serving `opts.store` (or an already built `service`). Raises InputError for a bad token."""
    check_token(opts.token)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = service or make_service(opts)
        quiet_accept_errors(asyncio.get_running_loop())
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
        live = svc(request).live
        # reload_error: the damage found in a newly published generation (the last good one is served)
        return {"status": "ok", "generation": live.current.id, "reload_error": live.reload_error}

    @app.get("/v1/info", summary="The store, model, threshold, limits and batching")
    async def info(request: Request) -> dict:
        s = svc(request)
        gen = s.live.current
        m = gen.searcher.meta
        return {"version": VERSION, "store": s.live.path.name, "generation": gen.id, "count": len(gen.searcher.cat),
                "model": m.model.name, "dim": m.model.dim, "threshold": gen.searcher.gen.threshold(),
                "verify": bool(m.local_features), "updated": m.updated, "loaded_at": gen.loaded_at,
                "reloads": s.live.reloads, "reload_error": s.live.reload_error, "k": DEFAULTS.k,
                "in_progress": guard.counts() if (guard := request.scope.get("state", {}).get("guard")) else None,
                "work": s.work(),
                "batching": {**asdict(s.batcher.stats), "max_batch": opts.max_batch, "wait_ms": opts.batch_wait_ms},
                "local_cache": gen.searcher.cache_info(),
                "limits": {"max_upload_mb": opts.max_upload_mb, "max_images": opts.max_images,
                           "max_pixels": opts.max_pixels, "max_pending": opts.max_pending,
                           "max_inflight_mb": opts.max_inflight_mb, "max_verify_pairs": opts.max_verify_pairs,
                           "request_timeout_s": opts.request_timeout_s}}

    @app.post("/v1/query", summary="Look up photos in the catalogue")
    async def query(request: Request,
                    image: Annotated[list[UploadFile], File(description="One or more photos.")],
                    k: Annotated[int, Query(ge=1, le=100, description="Neighbours per photo.")] = DEFAULTS.k,
                    verify: Annotated[bool | None, Query(description="Verify geometrically [default: when "
                                                            "the store caches local features].")] = None,
                    threshold: Annotated[float | None, Query(ge=-1, le=1, description="Cosine threshold "
                                                                "[default: the model's].")] = None,
                    generation: Annotated[str | None, Query(max_length=200, description=(
                        "Answer from this store generation (a client's first answer's), while the server holds "
                        "it; 409 generation_gone when it does not."))] = None) -> dict:
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
        try:
            answer = await svc(request).query(uploads, k, verify=verify, threshold=threshold,
                                              client=_client(request), generation=generation)
        except GenerationGone as exc:
            raise ApiError(409, "generation_gone", str(exc)) from None
        except Refused as exc:
            raise ApiError(exc.status, exc.code, str(exc), {"Retry-After": "1"} if exc.status == 503 else None) \
                from None
        if all(r.error for r in answer.results):
            first = answer.results[0]
            raise ApiError(422, "bad_image", f"{first.query}: {first.error}" if len(uploads) == 1 else
                           "no photo could be read: " + "; ".join(f"{r.query}: {r.error}" for r in answer.results),
                           images=[{"name": r.query, "error": r.error} for r in answer.results])
        return answer.to_json()

    async def _in_thread(request: Request, fn: Any, *args: Any) -> Any:
        s = svc(request)
        with s.live.use() as gen:
            try:
                return await s.files.run(_client(request), s.live.held, gen, fn, gen, *args)
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

    add_review_routes(app)  # /review and /v1/review/...: review.py
    return app

