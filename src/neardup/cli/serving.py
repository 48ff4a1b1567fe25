"""The `serve` command: the query service over HTTP."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ..config import (
    DEFAULTS,
    ENV_ALLOWED_HOSTS,
    ENV_HOST,
    ENV_PORT,
    ENV_TOKEN,
    SERVE,
)
from ..errors import InputError
from .base import app, handled
from .options import RuntimeOpt, StoreOpt, TokenOpt, VerboseOpt, WeightsOpt, serve_options
from .render import _warn_random_weights


@app.command("serve")
@handled
def serve_cmd(
    store: StoreOpt = Path(DEFAULTS.store),
    host: Annotated[str, typer.Option("--host", envvar=ENV_HOST, help="Address to listen on (localhost only "
                                      "by default; put a reverse proxy in front to expose it).")] = SERVE.host,
    port: Annotated[int, typer.Option("--port", "-p", envvar=ENV_PORT, min=0, max=65535,
                                      help="Port (0: any free port, printed).")] = SERVE.port,
    token: TokenOpt = None, weights: WeightsOpt = None, runtime: RuntimeOpt = DEFAULTS.runtime,
    max_upload_mb: Annotated[int, typer.Option("--max-upload-mb", min=1, help="Largest photo accepted (MiB).")]
    = SERVE.max_upload_mb,
    max_images: Annotated[int, typer.Option("--max-images", min=1, help="Photos per request.")] = SERVE.max_images,
    max_pixels: Annotated[int, typer.Option("--max-pixels", min=1, help="Largest decoded photo (pixels; larger "
                                            "ones are refused as decompression bombs; Pillow's own limit, 89 MP, "
                                            "applies too).")] = SERVE.max_pixels,
    max_pending: Annotated[int, typer.Option("--max-pending", min=1, help="Queries in progress at once; more are "
                                             "answered 503 with Retry-After.")] = SERVE.max_pending,
    request_timeout: Annotated[float, typer.Option("--request-timeout", min=0.1, help="Seconds a request may take, "
                                                   "its upload included.")] = SERVE.request_timeout_s,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Photos embedded together (micro-batching)."
                                           )] = SERVE.max_batch,
    batch_wait_ms: Annotated[float, typer.Option("--batch-wait-ms", min=0, help="Longest wait of a batch for "
                                                 "requests still decoding.")] = SERVE.batch_wait_ms,
    reload_poll: Annotated[float, typer.Option("--reload-poll", min=0.05, help="Seconds between checks for a new "
                                               "store generation (published by `neardup update`).")]
    = SERVE.reload_poll_s,
    local_cache_mb: Annotated[int, typer.Option("--local-cache-mb", min=0, help="Memory for the local features of "
                                                "recently verified catalogue photos (~20 kB each).")]
    = SERVE.local_cache_mb,
    max_inflight_mb: Annotated[int, typer.Option("--max-inflight-mb", min=1, help="Upload bytes (MiB, counted as "
                                                 "they arrive) the requests in progress may hold together; beyond, "
                                                 "a client over its equal share is answered 503.")]
    = SERVE.max_inflight_mb,
    max_verify_pairs: Annotated[int, typer.Option(
        "--max-verify-pairs", min=1, help="Candidate pairs verified per request; a request asking more verifies "
        "each photo's best share, the rest judged by the threshold.")] = SERVE.max_verify_pairs,
    open_timeout: Annotated[float, typer.Option(
        "--open-timeout", min=0.1, help="Seconds a newly published generation may take to open (first in a child "
        "process); beyond, the last good one is served on.")] = SERVE.open_timeout_s,
    forwarded_allow_ips: Annotated[str | None, typer.Option(
        "--forwarded-allow-ips", show_default=False,
        help="Comma-separated proxy addresses whose X-Forwarded-For is trusted as the client's address [default: "
             "none]. Limits are counted per client address.")] = None,
    header_timeout: Annotated[float, typer.Option(
        "--header-timeout", min=0.1, help="Seconds a connection may take to send a request's headers.")]
    = SERVE.header_timeout_s,
    max_connections: Annotated[int, typer.Option(
        "--max-connections", min=8, help="Connections open at once (fewer where the process may open fewer files); "
        "beyond, the one idle the longest is closed.")] = SERVE.max_connections,
    max_request_mp: Annotated[float, typer.Option(
        "--max-request-mp", min=1, help="Megapixels the photos of one request may decode to together (413 "
        "beyond).")] = SERVE.max_request_pixels / 1e6,
    max_inflight_mp: Annotated[float, typer.Option(
        "--max-inflight-mp", min=1, help="Megapixels the requests in progress may decode to together (503 "
        "beyond; a request of a few ordinary photos is always taken).")] = SERVE.max_inflight_pixels / 1e6,
    allowed_host: Annotated[list[str] | None, typer.Option(
        "--allowed-host", envvar=ENV_ALLOWED_HOSTS, show_default=False,
        help="A Host name requests may name besides localhost (repeatable; the variable: space-separated), for "
             "a reverse proxy that passes the client's Host. Bound to localhost, other names are refused (DNS "
             "rebinding); bound elsewhere, any name unless this is given.")] = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Serve the store over HTTP: POST /v1/query, a web page at /, reloads each generation `update` publishes."""
    from ..serve import run

    if token is None and os.environ.get(ENV_TOKEN) == "":  # Click takes an empty variable for an unset one
        raise InputError(f"{ENV_TOKEN} is set but empty: set a token, or unset it to serve without one")
    _warn_random_weights(store)
    run(serve_options(store=store, host=host, port=port, token=token, weights=weights, runtime=runtime,
                      max_upload_mb=max_upload_mb, max_images=max_images, max_pixels=max_pixels,
                      max_pending=max_pending, request_timeout=request_timeout, max_batch=max_batch,
                      batch_wait_ms=batch_wait_ms, reload_poll=reload_poll, local_cache_mb=local_cache_mb,
                      max_inflight_mb=max_inflight_mb, allowed_host=allowed_host,
                      forwarded_allow_ips=forwarded_allow_ips, max_verify_pairs=max_verify_pairs,
                      open_timeout=open_timeout, header_timeout=header_timeout, max_connections=max_connections,
                      max_request_mp=max_request_mp, max_inflight_mp=max_inflight_mp))
