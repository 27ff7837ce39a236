"""Bounds on what requests may cost: inference slots with a short queue, body size, API key; and
which host names a request may be addressed to.

Why here and not in the routes: the body cap and the key must act before a multipart body is
parsed (FastAPI parses it before a route runs), so they are plain ASGI middleware around the app.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import time
from collections import deque
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

Scope = dict
Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Overloaded(Exception):
    """Every slot is busy and the queue is full (or the wait timed out): answer 503 now."""


class Limiter:
    """At most ``slots`` jobs run at once; at most ``queue`` more wait, each at most ``timeout`` s.

    Why: a search holds a CPU (decoding, the CNN, a scan of the vectors) for tens of ms; queueing
    without limit under overload only makes every answer late and memory grow. A request that
    finds the queue full is refused at once (503 + Retry-After), so clients can back off.
    Waiters are plain futures served first come, first served; a freed slot is handed straight to
    the next waiter. (Not ``asyncio.wait_for(semaphore.acquire())``: on Python < 3.12 it can
    swallow a cancellation, leaving a disconnected client's request holding a slot.)
    """

    def __init__(self, slots: int, queue: int, timeout: float = 30.0) -> None:
        if slots < 1 or queue < 0:
            raise ValueError("need slots >= 1 and queue >= 0")
        self.slots, self.queue, self.timeout = int(slots), int(queue), float(timeout)
        self.running = 0
        self.refused = 0
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """Hold one slot for the block; yields the seconds spent waiting for it."""
        t0 = time.perf_counter()
        if self.running < self.slots and not self._waiters:
            self.running += 1
        else:
            await self._wait()
        try:
            yield time.perf_counter() - t0
        finally:
            self._release()

    async def _wait(self) -> None:
        if len(self._waiters) >= self.queue:
            self.refused += 1
            raise Overloaded(f"server busy: {self.running} searches running and {len(self._waiters)} waiting; "
                             f"retry in a moment")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiters.append(fut)

        def expire() -> None:
            if not fut.done():
                self.refused += 1
                fut.set_exception(Overloaded(f"server busy: no search slot free within {self.timeout:g} s; "
                                             f"retry later"))

        timer = loop.call_later(self.timeout, expire)
        try:
            await fut  # resolved by _release(), which hands its slot over
        except BaseException:
            if fut in self._waiters:
                self._waiters.remove(fut)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release()  # handed a slot, then cancelled before using it: pass it on
            raise
        finally:
            timer.cancel()

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1

    def stats(self) -> dict:
        return {"slots": self.slots, "queue": self.queue, "running": self.running,
                "waiting": self.waiting, "refused": self.refused}


async def send_json(send: Send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
            (b"connection", b"close")]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": data})


class _BodyTooLarge(Exception):
    pass


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def api_key_of(scope: Scope) -> str | None:
    """The key a request carries: ``X-API-Key: K`` or ``Authorization: Bearer K``."""
    key = _header(scope, b"x-api-key")
    if key:
        return key.strip()
    auth = _header(scope, b"authorization") or ""
    scheme, _, value = auth.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def host_name(scope: Scope) -> str | None:
    """The host a request is addressed to (its Host header): lower case, without the port or an
    IPv6 address' brackets; None without a Host header."""
    host = _header(scope, b"host")
    if host is None:
        return None
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(name: str | None, allowed: tuple[str, ...]) -> bool:
    """An IP address, localhost (or a name under .localhost) or a name in ``allowed``.

    Why: anyone can point a DNS name of theirs at 127.0.0.1 (DNS rebinding); a page of theirs then
    shares the server's origin and reads every answer. A browser sends that name as Host, and never
    an address or localhost for a name it looked up, so refusing other names stops it."""
    if name is None or name in allowed or name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    """ASGI middleware: the host a request is addressed to (``allowed_hosts``: None = any), the API
    key on every ``/api/`` request, and a cap on request bodies.

    The cap is enforced while the body streams in: a declared ``Content-Length`` over it is
    refused before a byte is read; otherwise bytes are counted as they arrive and reading stops
    at the first chunk past the cap, and whatever the app then answers is replaced by the 413.
    """

    def __init__(self, app: ASGIApp, max_body: int, api_key: str | None = None,
                 too_large_message: str = "", allowed_hosts: tuple[str, ...] | None = None) -> None:
        self.app, self.max_body, self.api_key = app, int(max_body), api_key or None
        self.allowed_hosts = None if allowed_hosts is None else tuple(h.lower() for h in allowed_hosts)
        self.too_large_message = too_large_message or f"request body over {self.max_body:,} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        name = host_name(scope)
        if self.allowed_hosts is not None and not host_allowed(name, self.allowed_hosts):
            shown = (name or "")[:100]
            await send_json(send, 403, {"detail": f"this server answers requests addressed to localhost or an IP "
                                                  f"address, not to {shown} (a web page elsewhere may be reaching it "
                                                  f"through DNS rebinding); start it with --allow-host {shown} if "
                                                  "that name is yours"})
            return
        if self.api_key and scope.get("path", "").startswith("/api/") and scope.get("method") != "OPTIONS":
            given = api_key_of(scope)
            if given is None or not hmac.compare_digest(given.encode(), self.api_key.encode()):
                why = "this server needs an API key" if given is None else "wrong API key"
                await send_json(send, 401, {"detail": f"{why}: send it as X-API-Key or Authorization: Bearer"},
                                {"WWW-Authenticate": "Bearer"})
                return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await send_json(send, 413, {"detail": self.too_large_message})
            return
        state = {"read": 0, "over": False, "started": False}

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > self.max_body:
                    state["over"] = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            if state["over"]:
                if message["type"] == "http.response.start" and not state["started"]:
                    state["started"] = True
                    await send_json(send, 413, {"detail": self.too_large_message})
                return  # the app's own answer to the broken body is dropped
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            await send_json(send, 413, {"detail": self.too_large_message})
