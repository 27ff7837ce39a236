"""A deadline on each HTTP request, from its first byte to its last: stalled clients are dropped;
and the answer beyond ``--max-connections`` in the API's error shape.

Why: uvicorn times out idle keep-alive connections only after a response. A client that sends part
of a request line, of the headers or of a body (or nothing at all) and then goes silent keeps its
connection, and ``--max-connections`` of them lock every other client out (503) for as long as they
like, API key or not. The deadline is uvicorn's own HTTP protocol (httptools, the serve extra's
parser) with one timer: armed when a connection opens and when a request begins, cancelled when the
request has been read whole; when it fires, the connection is closed.
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


def with_request_deadline(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, whose requests must arrive whole within ``seconds``, and whose
    answer beyond the connection limit is JSON (plain text 'Service Unavailable' before)."""
    from uvicorn.protocols.http import httptools_impl
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    httptools_impl.service_unavailable = _too_many_connections  # the name on_headers_complete calls

    class RequestDeadlineProtocol(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()  # a client that connects and sends nothing counts too

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_message_complete(self) -> None:
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
            if not self.transport.is_closing():
                self.transport.close()

    return RequestDeadlineProtocol
