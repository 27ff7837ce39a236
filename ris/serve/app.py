"""The ASGI application: a JSON API over ``SearchService`` and the page that uses it.

Blocking work (decoding, the CNN, the vector scan, file reads) runs in worker threads; searches
hold one of a few inference slots (``Limiter``), thumbnails one of a few I/O slots, so overload
turns into quick 503s instead of a growing queue. Errors are JSON ``{"detail": "one sentence"}``.
"""
from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any, Callable
from urllib.parse import quote

from anyio import to_thread
from fastapi import FastAPI, File, Form, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ris.serve.files import ServeError
from ris.serve.forms import (FIELD, PARSER_ERRORS, allow_long_part_headers, not_a_file, quiet_parser_log,
                             unreadable)
from ris.serve.limits import Guard, Limiter, Overloaded
from ris.serve.service import RETRY_LOADING_S, SearchService, ServeConfig, shown_text

STATIC = files("ris.serve") / "static"
PAGE_HEADERS = {  # the page loads nothing from elsewhere: no CDN, no fonts, no inline script
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
MULTIPART_SLACK = 64 << 10  # multipart framing and the small form fields around the image


class PageFiles(StaticFiles):
    """The page's files with the page's headers: ``/static/index.html`` is the page too, and was
    served without its Content-Security-Policy (so it could be framed); nosniff suits its script."""

    async def get_response(self, path: str, scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response


def content_disposition(name: str) -> str:
    """``inline`` with the file's name: an ASCII fallback (HTTP headers are Latin-1, and a name in
    another script broke the response) and the name itself as RFC 6266 ``filename*``."""
    text = shown_text(name)
    ascii_name = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in text) or "image"
    return f"inline; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(text, safe='')}"


async def in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a daemon thread: the engine's load (Keras, an index built) and a reload can take
    many seconds, and a worker thread of the event loop's pool would hold the process's exit on
    Ctrl-C/SIGTERM until it ended. Its index files are written atomically, so abandoning it is safe."""
    import threading

    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def work() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task, which reports it
            result, error = None, exc

        def settle() -> None:
            if done.cancelled():
                return
            done.set_exception(error) if error is not None else done.set_result(result)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop has closed: the server stopped meanwhile
            pass

    threading.Thread(target=work, name="ris-serve load", daemon=True).start()
    return await done


def create_app(service: SearchService | ServeConfig, *, on_ready: Callable[[SearchService], None] | None = None,
               on_fatal: Callable[[str], None] | None = None):
    """The app. ``service`` without a loaded engine is loaded in the background at start-up
    (``/api/health`` says "loading" meanwhile); ``on_ready``/``on_fatal`` report how that went."""
    svc = service if isinstance(service, SearchService) else SearchService(service)
    allow_long_part_headers()  # a file name over ~4,000 characters was "Invalid multipart data."
    quiet_parser_log()
    cfg = svc.cfg
    searches = Limiter(cfg.slots, cfg.queue, cfg.queue_timeout)
    thumbs = Limiter(max(2, cfg.slots), 256, cfg.queue_timeout)

    async def load() -> None:
        try:
            if svc.current is None:
                await in_daemon_thread(svc.load)
        except Exception as exc:  # RisError, OSError ...: one line, then the server stops
            svc.error = str(exc) or repr(exc)
            if on_fatal:
                on_fatal(svc.error)
            return
        if on_ready:
            on_ready(svc)

    async def watch() -> None:
        while True:
            await asyncio.sleep(cfg.reload_interval)
            try:
                await in_daemon_thread(svc.poll)
            except Exception as exc:  # never let the watcher die silently
                svc.reload_error = repr(exc)

    @asynccontextmanager
    async def lifespan(app):
        tasks = [asyncio.create_task(load())]
        if cfg.reload_interval > 0:
            tasks.append(asyncio.create_task(watch()))
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()

    app = FastAPI(title="ris-serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Reverse image search over a ris feature database. Send `X-API-Key` or "
                              "`Authorization: Bearer` when the server was started with an API key.")
    app.state.service = svc
    app.state.limiters = {"search": searches, "thumbs": thumbs}

    def error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError):
        return error(exc.status, str(exc), {"Retry-After": str(exc.retry_after)} if exc.retry_after else None)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded):
        return error(503, str(exc), {"Retry-After": "1"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        if request.method == "POST" and request.url.path == "/api/search":
            problem = not_a_file(request.headers.get("content-type"), exc.errors())
            if problem:
                return error(*problem)
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return error(422, f"{where}: {first.get('msg', 'invalid value')}.")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.detail in PARSER_ERRORS:  # Starlette's, before the route
            return error(400, unreadable(exc))
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):  # a bug: answered, then logged by the server
        return error(500, f"internal error ({type(exc).__name__}); the server is still running.")

    async def in_slot(limiter: Limiter, fn, *args):
        async with limiter.slot() as waited:
            out = await to_thread.run_sync(fn, *args)
        return out, waited

    def get_and_head(path: str, **kw):
        """GET and HEAD as two routes, so each gets its own OpenAPI operationId (``..._get``,
        ``..._head``): one route for both gave them one id, which the specification forbids
        (client generators refuse or rename duplicates)."""
        def register(fn):
            app.head(path, **kw)(fn)
            return app.get(path, **kw)(fn)
        return register

    # -- API -----------------------------------------------------------------------------
    @get_and_head("/api/health", summary="Ready or not, and what is served")
    async def health():
        h = svc.health()
        h["limits"] = searches.stats()
        retry = {"Retry-After": str(RETRY_LOADING_S)} if h["status"] in ("loading", "reloading") else None
        return JSONResponse(h, status_code=200 if h["ready"] else 503, headers=retry)

    @app.post("/api/search", summary=f"Search with an uploaded image (multipart/form-data file field `{FIELD}`)")
    async def search_upload(request: Request,
                            image: UploadFile = File(..., description="JPEG, PNG, GIF, BMP, WebP or TIFF"),
                            k: int = Form(cfg.default_k, description=f"results, 1..{cfg.max_k}"),
                            rerank: str | None = Form(None, description="none, qe, dba+qe, diffusion, kreciprocal "
                                                      "(default: the service's default re-ranking)"),
                            rotations: bool | None = Form(None, description="also search with the upload turned by "
                                                          "90/180/270 degrees, each result keeping its best distance "
                                                          "(default: the service's --rotations)")):
        svc.generation()  # 503 while loading, before reading the upload
        sent = len((await request.form()).getlist(FIELD))  # the form FastAPI parsed, cached: not read again
        if sent > 1:  # FastAPI takes the last one, silently
            raise ServeError(400, f"the upload holds {sent} files in the field {FIELD}; send one image per search.")

        def work() -> dict:  # in a slot: at most `slots` uploads are in memory at once
            data = image.file.read(cfg.max_upload_bytes + 1)  # the parser spooled it to disk over 1 MB
            if len(data) > cfg.max_upload_bytes:
                raise ServeError(413, f"the upload is over the limit of {cfg.max_upload_bytes / 1e6:g} MB.")
            return svc.search_upload(data, image.filename, k, rerank, rotations)

        out, waited = await in_slot(searches, work)
        out["timing_ms"]["queue"] = round(waited * 1000, 2)
        return JSONResponse(out)  # plain JSON types already: skips FastAPI's slower generic encoder

    @get_and_head("/api/search", summary="Search with a database row (\"more like this\")")
    async def search_row(id: int = Query(..., ge=0, description="the image's id (stable: the same image's "
                                                              "through --append and --sync)"),
                         k: int = Query(cfg.default_k, description=f"results, 1..{cfg.max_k}"),
                         rerank: str | None = Query(None, description="none, qe, dba+qe, diffusion, kreciprocal "
                                                    "(default: the service's default re-ranking)")):
        out, waited = await in_slot(searches, svc.search_row, id, k, rerank)
        out["timing_ms"]["queue"] = round(waited * 1000, 2)
        return JSONResponse(out)

    @get_and_head("/api/images/{id}", summary="A database image, by id",
                   response_class=Response)
    async def image(id: int = Path(..., ge=0, description="the image's id")):
        fd, size, media, name = await to_thread.run_sync(svc.image, id)
        fh = os.fdopen(fd, "rb")  # closed by the generator, or when dropped if it never starts

        def chunks():
            with fh:
                while block := fh.read(1 << 16):
                    yield block

        return StreamingResponse(chunks(), media_type=media, headers={
            "Content-Length": str(size), "X-Content-Type-Options": "nosniff",
            "Content-Disposition": content_disposition(name), "Cache-Control": "private, max-age=300"})

    @get_and_head("/api/thumbs/{id}", summary="A database image's thumbnail (JPEG), by id",
                   response_class=Response)
    async def thumb(id: int = Path(..., ge=0, description="the image's id")):
        jpeg, _ = await in_slot(thumbs, svc.thumbnail, id)
        return Response(jpeg, media_type="image/jpeg", headers={
            "X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=300"})

    # -- the page --------------------------------------------------------------------------
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page():
        return FileResponse(str(STATIC / "index.html"), media_type="text/html", headers=PAGE_HEADERS)

    app.mount("/static", PageFiles(directory=str(STATIC)), name="static")

    return Guard(app, cfg.max_upload_bytes + MULTIPART_SLACK, cfg.api_key,
                 f"the upload is over the limit of {cfg.max_upload_bytes / 1e6:g} MB.", cfg.allowed_hosts)
