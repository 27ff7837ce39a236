"""Deadlines on each HTTP request's arrival, so stalled clients are dropped; and the answer
beyond ``--max-connections`` in the API's error shape.

Why: uvicorn times out idle keep-alive connections only after a response. A client that sends part
of a request line, of the headers or of a body (or nothing at all) and then goes silent keeps its
connection, and ``--max-connections`` of them lock every other client out (503) for as long as they
like, API key or not. One deadline on the whole request did stop them, but it also cut a client
that kept sending a large upload at a fair rate (20 MB at 333 kB/s took the whole 60 s).

So, in uvicorn's own HTTP protocol (httptools, the serve extra's parser), one timer: the request
line and headers must arrive within ``seconds`` (of the connection's opening or the request's
start); then the body must never be silent for ``seconds`` and must average at least
``min_rate`` bytes/s (its deadline is ``seconds`` + bytes received / ``min_rate`` after the headers,
so a trickle of a few bytes cannot hold a connection either). When the timer fires early enough,
it is set again for the later deadline; past it, the connection is closed. The answer's own time
(the search) is the app's (``--queue-timeout`` bounds its wait for a slot).
"""
from __future__ import annotations

import asyncio
import json

BUSY = json.dumps({"detail": "the server has as many connections open as it takes (--max-connections); retry in a "
                             "few seconds"}).encode()


async def _too_many_connections(scope, receive, send) -> None:
    """uvicorn's answer beyond its connection limit, as the API's other errors: JSON, Retry-After."""
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BUSY)).encode()),
                            (b"retry-after", b"2"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": BUSY, "more_body": False})


def with_request_deadline(seconds: float, min_rate: float = 10_000.0) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol whose requests' headers must arrive within ``seconds`` and whose
    bodies may not be silent for ``seconds`` nor slower on average than ``min_rate`` bytes/s (after
    ``seconds`` of grace); its answer beyond the connection limit is JSON (plain text 'Service
    Unavailable' before)."""
    from uvicorn.protocols.http import httptools_impl
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    httptools_impl.service_unavailable = _too_many_connections  # the name on_headers_complete calls

    class RequestDeadlineProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None
        _body_start: float | None = None  # when the headers were complete: the body's clock
        _last = 0.0  # when body bytes last arrived
        _received = 0

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()  # a client that connects and sends nothing counts too

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._body_start = None
            self._arm()

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._body_start = self._last = self.loop.time()
            self._received = 0
            self._arm()

        def on_body(self, body: bytes) -> None:
            super().on_body(body)
            self._received += len(body)
            self._last = self.loop.time()  # no timer set again here: _expire looks when it fires

        def on_message_complete(self) -> None:
            self._body_start = None
            self._disarm()  # read whole: the response's time is the app's, the idle time keep-alive's
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self._body_start is not None:  # receiving a body: silent too long, or too slow?
                due = min(self._last + seconds, self._body_start + seconds + self._received / min_rate)
                if due > self.loop.time():
                    self._deadline = self.loop.call_at(due, self._expire)
                    return
            if not self.transport.is_closing():
                self.transport.close()

    return RequestDeadlineProtocol
