"""Serve, protocol: uvicorn's HTTP/1.1 protocol with what a public port needs against idle clients.

uvicorn times out an idle keep-alive connection, but not one that never finishes its request headers, and
it accepts connections until the process runs out of file descriptors (then every accept fails, logging a
traceback each time). Here every connection must send complete request headers within `header_timeout_s`,
before its first request and between requests, and at most `max_connections` are open at once: when a new
one would pass that, a connection of the client (peer address) holding the most is closed to make room: the
one of its connections idle the longest (no request in progress), else its slowest upload (fewest bytes a
second). One client holding connections, idle or trickling uploads, can then neither exhaust the process's
descriptors nor keep other clients out: a newcomer closes one of its own older connections before anyone
else's only when its own address already holds the most.
"""
from __future__ import annotations

import asyncio
import resource
import time
from collections import Counter
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

#: File descriptors kept free of connections: the store's files, the model, thumbnails, logs, the loop.
FD_RESERVE = 128
#: Connections the event loop accepts in one go (asyncio accepts up to its backlog at once: with uvicorn's
#: 2,048 a flood ran out of descriptors before the cap could close any). A new connection's callbacks run two
#: loop turns after its accept, so up to four batches can be open beyond the cap.
ACCEPT_BATCH = 16


def connection_cap(asked: int) -> int:
    """`asked`, or fewer where this process may open fewer file descriptors (its soft RLIMIT_NOFILE): room is
    left for its own files and for one batch of accepts beyond the cap."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return asked
    return max(8, min(asked, soft - FD_RESERVE - 4 * ACCEPT_BATCH))


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """An H11Protocol class with these limits (uvicorn.Config(http=...) takes a class)."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn's H11Protocol takes a Transport
            super().connection_made(transport)
            self._opened = time.monotonic()
            self._received = 0
            peer = transport.get_extra_info("peername")
            self._peer = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
            self._timer: asyncio.TimerHandle | None = None
            self._arm()
            open_ = [c for c in self.connections if not c.transport.is_closing()]  # closing: gone a turn later
            if len(open_) > max_connections:
                _victim([c for c in open_ if c is not self]).transport.close()

        def _waiting(self) -> bool:
            """No request in progress: connected and silent, or between requests."""
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._timer = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            timer = getattr(self, "_timer", None)  # (none yet when connection_made first disarms)
            if timer is not None:
                timer.cancel()
                self._timer = None

        def _expire(self) -> None:
            self._timer = None
            if self._waiting() and not self.transport.is_closing():
                self.transport.close()  # its request headers did not come in time

        def data_received(self, data: bytes) -> None:
            self._received += len(data)
            super().data_received(data)
            if not self._waiting():  # a request's headers arrived: its own timeout governs it now
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers must come in time too

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


def _victim(conns: list[Any]) -> Any:
    """The connection to close for a newcomer: of the peer holding the most connections, the one idle the
    longest, else the one that sent the fewest bytes a second."""
    per_peer = Counter(c._peer for c in conns)
    most = max(per_peer.values())
    theirs = [c for c in conns if per_peer[c._peer] == most]
    idle = [c for c in theirs if c._waiting()]
    if idle:
        return min(idle, key=lambda c: c._opened)
    now = time.monotonic()
    return min(theirs, key=lambda c: (c._received / max(now - c._opened, 1e-3), c._opened))


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log an error of the event loop's accept (out of descriptors, say) as one line a minute at most, not a
    traceback on every retry; anything else goes to the loop's usual handler."""
    import logging

    log = logging.getLogger("neardup.serve")
    last = [0.0]
    default = loop.get_exception_handler()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and "accept" in str(context.get("message", "")):
            now = time.monotonic()
            if now - last[0] >= 60:
                last[0] = now
                log.error("cannot accept connections: %s (said once a minute)", exc.strerror or exc)
            return
        if default is not None:
            default(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
