"""Top layer, serve: `neardup serve`, a warm query service over HTTP with a web page (service -> app -> run).

    from neardup.serve import ServeOptions, run
    run(ServeOptions(store="catalog.h5", port=8000))

`neardup query --server URL` is its client (client.py).
"""
from __future__ import annotations

import logging
import socket
import sys
from typing import TYPE_CHECKING

from .._lazy import lazy_exports
from ..errors import InputError

log = logging.getLogger(__name__)


def run(opts: ServeOptions) -> None:
    """Load the store and its model, bind, print the address, and serve until interrupted. Raises
    StoreError/WeightsError (the store cannot be served) or InputError (the address cannot be bound)."""
    import uvicorn

    from .app import check_token, create_app, is_loopback, make_service
    from .protocol import ACCEPT_BATCH, connection_cap, guarded_protocol

    check_token(opts.token)
    if not opts.token and not is_loopback(opts.host):
        log.warning("serving on %s without --token: anyone who can reach this port can query the catalogue and "
                    "fetch its photos", opts.host)
    service = make_service(opts)
    family = socket.AF_INET6 if ":" in opts.host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off only for sockets that say they are TCP, and with
    # it on, a keep-alive client waits for the delayed ACK (40 ms) on every response (measured: 44 ms health)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((opts.host, opts.port))
        sock.listen(2048)  # connections made once the address is printed wait in the backlog, never refused
    except OSError as exc:
        service.close()
        sock.close()
        raise InputError(f"cannot listen on {opts.host}:{opts.port}: {exc.strerror or exc}") from None
    host, port = sock.getsockname()[:2]
    gen = service.live.current
    shown = f"[{host}]" if ":" in host else host
    print(f"neardup: serving {opts.store} (generation {gen.id}, {len(gen.searcher.cat)} photos, model "
          f"{gen.searcher.meta.model.name}) at http://{shown}:{port}/", flush=True)
    # the app's Guard bounds the requests in progress (JSON 503 with Retry-After beyond), not uvicorn; the
    # protocol bounds the connections and the time a client may take to send its request's headers
    http = guarded_protocol(opts.header_timeout_s, connection_cap(opts.max_connections))
    config = uvicorn.Config(create_app(opts, service), log_level="warning", timeout_keep_alive=5,
                            timeout_graceful_shutdown=5, server_header=False, http=http, backlog=ACCEPT_BATCH,
                            # X-Forwarded-For names the client only from a proxy the operator trusts: uvicorn
                            # trusts it from 127.0.0.1 by default, and any local client could forge its address
                            proxy_headers=bool(opts.forwarded_allow_ips),
                            forwarded_allow_ips=opts.forwarded_allow_ips or "")

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            for s in sockets or ():  # asyncio listened with its accept batch: the queue is longer again
                s.listen(2048)

    try:
        Server(config).run(sockets=[sock])
    finally:
        sock.close()
    sys.stdout.flush()


if TYPE_CHECKING:  # what type checkers and editors see (`X as X`: re-exported); at run time each name
    # loads its module on first use (_EXPORTS below; tests/test_package.py checks that the two agree)
    from .app import ServeOptions as ServeOptions, create_app as create_app, make_service as make_service
    from .client import query_server as query_server
    from .service import (
        Answer as Answer,
        Batcher as Batcher,
        LiveStore as LiveStore,
        QueryService as QueryService,
        Upload as Upload,
    )

_EXPORTS = {
    **dict.fromkeys(["ServeOptions", "create_app", "make_service"], ".app"),
    **dict.fromkeys(["LiveStore", "QueryService", "Batcher", "Upload", "Answer"], ".service"),
    **dict.fromkeys(["query_server"], ".client")}
__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
